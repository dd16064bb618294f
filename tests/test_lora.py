"""fedit_lora: FedAvg over PEFT LoRA adapters, in the same round loop, server and links."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import parablock.backends.local as local_backend
from conftest import make_model, tiny_config
from parablock.backends.local import run_local
from parablock.backends.shared import FrozenShare
from parablock.config import ConfigError, FederationConfig, load
from parablock.core.server import Server
from parablock.data.examples import round_indices
from parablock.errors import BlockError, MessageError
from parablock.evaluation.evaluate import eval_loss
from parablock.model.blocks import block_nbytes, block_state, set_block
from parablock.model.forward import first_trained_layer
from parablock.model.load import load_model
from parablock.model.lora import (
    LoraSettings,
    adapter_blocks,
    blocks_for,
    inject,
)
from parablock.model.train import train_block
from parablock.run.runner import prepare, run
from parablock.run.settings import client_lr, lora_settings, run_settings
from parablock.tools.compare import compare
from parablock.tools.estimate_runs import from_run
from parablock.wire.messages import BlockUpdate, BlockValue
from parablock.wire.protocol import JoinReply, RunSettings

LORA = {"algorithm": "fedit_lora"}
NO_GENERATION = {"accuracy_size": 0}  # greedy decoding is not what these tests are about
SMALL = LoraSettings(4, 8.0, 0.0, "q_proj,v_proj")


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _lora_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".lora_" in n}


# -- the adapter and its block -----------------------------------------------------------------
def test_every_copy_gets_the_same_adapter_that_leaves_the_model_unchanged(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    a, b, base = make_model(vocab), make_model(vocab), make_model(vocab)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    inject(a, SMALL, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is untouched
    inject(b, SMALL, seed=5)
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
    assert type(a).__name__ == "LlamaForCausalLM"  # still the HF model, not a PeftModel
    names = _lora_names(a)
    # q_proj and v_proj of 4 layers, A and B each
    assert len(names) == 4 * 2 * 2
    assert all(pa[n].abs().sum() == 0 for n in names if ".lora_B." in n)  # B starts at zero
    assert all(pa[n].abs().sum() > 0 for n in names if ".lora_A." in n)
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, base(ids).logits)
    (block,) = adapter_blocks(a)
    assert block.index == 0 and block.name == "adapter" and set(block.param_names) == names
    # a different seed draws a different A
    c = make_model(vocab)
    inject(c, SMALL, seed=6)
    assert any(not torch.equal(pa[n], p) for n, p in _params(c).items() if ".lora_A." in n)


def test_rank_alpha_dropout_and_targets_reach_peft(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer))
    inject(model, LoraSettings(2, 6.0, 0.25, "gate_proj"), seed=0)
    layer = model.model.layers[0].mlp.gate_proj
    assert layer.r["default"] == 2 and layer.scaling["default"] == 3.0
    assert isinstance(layer.lora_dropout["default"], torch.nn.Dropout)
    assert layer.lora_dropout["default"].p == 0.25
    assert {n.split(".")[4] for n in _lora_names(model)} == {"gate_proj"}


def test_the_adapter_trains_from_layer_0_so_no_prefix_is_cached(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer))
    blocks = blocks_for(model, "", SMALL, 0)
    assert first_trained_layer(model, blocks, {0}) == 0


def test_adapters_in_the_top_layers_only_cache_the_forward_below_them(tiny_tokenizer):
    top = LoraSettings(4, 8.0, 0.0, "q_proj,v_proj", layers="top:2")
    model = make_model(len(tiny_tokenizer))  # 4 layers
    blocks = blocks_for(model, "", top, 0)
    assert {int(n.split(".")[2]) for n in _lora_names(model)} == {2, 3}
    assert len(_lora_names(model)) == 2 * 2 * 2  # q_proj and v_proj of 2 layers, A and B each
    assert first_trained_layer(model, blocks, {0}) == 2
    listed = make_model(len(tiny_tokenizer))
    inject(listed, LoraSettings(4, 8.0, 0.0, "q_proj", layers="0,3"), 0)
    assert {int(n.split(".")[2]) for n in _lora_names(listed)} == {0, 3}
    # 'all' is PEFT's default: the same adapter as before the option existed
    every, default = make_model(len(tiny_tokenizer)), make_model(len(tiny_tokenizer))
    inject(every, LoraSettings(4, 8.0, 0.0, "q_proj,v_proj", layers="all"), 0)
    inject(default, SMALL, 0)
    a, b = _params(every), _params(default)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_lora_layers_outside_the_model_or_malformed_are_one_line_errors(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer))
    with pytest.raises(BlockError, match=r"lora.layers='7' selects no valid block .*layers 0-3"):
        inject(model, LoraSettings(4, 8.0, 0.0, "q_proj", layers="7"), 0)
    assert not _lora_names(model)  # nothing was injected
    with pytest.raises(ConfigError, match="lora.layers='top:0' is malformed"):
        LoraSettings(4, 8.0, 0.0, "q_proj", layers="top:0")  # before any model is loaded
    for bad in ("top", "top:0", "bottom:01", "last:2", "1-", "a,b", "x" * 2000):
        with pytest.raises(ConfigError, match="lora.layers=.* is malformed; use 'all', 'top:N'"):
            load(None, [f"lora.layers={bad}"])
    assert load(None, ["lora.layers=top:12"]).lora.layers == "top:12"


def test_bad_targets_and_impossible_adapters_are_one_line_errors(tiny_tokenizer):
    with pytest.raises(ConfigError, match="lora.target_modules: qkv is not a linear module"):
        inject(make_model(len(tiny_tokenizer)), LoraSettings(4, 8.0, 0.0, "q_proj,qkv"), 0)
    with pytest.raises(ConfigError, match="lora.target_modules: lm_head is not"):
        inject(make_model(len(tiny_tokenizer)), LoraSettings(4, 8.0, 0.0, "lm_head"), 0)
    for bad in ("", "q_proj,,v_proj", "q proj"):
        with pytest.raises(ConfigError, match="lora.target_modules"):
            load(None, [f"lora.target_modules={bad}"])
    with pytest.raises(ConfigError, match="lora.r=0 is out of range"):
        load(None, ["lora.r=0"])
    with pytest.raises(ConfigError, match="trains a LoRA adapter only; model.extra_blocks"):
        load(None, ["federation.algorithm=fedit_lora", "model.extra_blocks=embed"])
    with pytest.raises(ConfigError, match="algorithm=fedit_lora always applies the aggregate"):
        load(None, ["federation.algorithm=fedit_lora", "federation.correction=none"])


def test_fedit_lora_trains_at_lora_lr_unless_federation_lr_is_set():
    assert client_lr(load(None, ["federation.algorithm=fedit_lora"])) == load().lora.lr
    assert client_lr(load(None, ["federation.algorithm=fedit_lora", "lora.lr=0.02"])) == 0.02
    cfg = load(None, ["federation.algorithm=fedit_lora", "federation.lr=0.005"])
    assert client_lr(cfg) == 0.005
    assert client_lr(load(None, ["lora.lr=0.02"])) == load().federation.lr  # parablock
    assert lora_settings(load()) is None


def test_run_settings_carry_the_adapter_and_refuse_an_impossible_one():
    common = ("fedit_lora", "replace", [0], "", 2, 2, 1e-3, 0.0, 0, "constant", 0.0, 0, 64, 8, "")
    assert RunSettings(*common).lora() is None
    s = RunSettings(
        *common, lora_r=8, lora_alpha=16.0, lora_dropout=0.0, lora_target_modules="q_proj,v_proj"
    )
    back = JoinReply.from_bytes(JoinReply(1, s, 0, False, {}).to_bytes()).settings
    assert back == s and back.lora() == LoraSettings(8, 16.0, 0.0, "q_proj,v_proj")
    cfg = load(None, ["federation.algorithm=fedit_lora", "lora.r=8"])
    handed = run_settings(cfg, [0])  # what a server hands its clients
    assert handed.lora() == lora_settings(cfg) and handed.lr == cfg.lora.lr
    assert run_settings(load(), [0]).lora() is None
    top = RunSettings(
        *common, lora_r=8, lora_alpha=16.0, lora_target_modules="q_proj", lora_layers="top:2"
    )
    back = JoinReply.from_bytes(JoinReply(1, top, 0, False, {}).to_bytes()).settings
    assert back.lora() == LoraSettings(8, 16.0, 0.0, "q_proj", "top:2")
    cfg = load(None, ["federation.algorithm=fedit_lora", "lora.layers=top:12"])
    assert run_settings(cfg, [0]).lora().layers == "top:12"
    raw = json.loads(JoinReply(1, s, 0, False, {}).to_bytes())
    for key, value in (
        ("lora_r", -1),
        ("lora_dropout", 1.0),
        ("lora_target_modules", "a b"),
        ("lora_layers", "top:2;rm"),
    ):
        bad = {**raw, "settings": {**raw["settings"], key: value}}
        with pytest.raises(MessageError):
            JoinReply.from_bytes(json.dumps(bad).encode())


# -- what crosses the link, and how it is aggregated -------------------------------------------
def test_only_adapter_tensors_cross_the_link(tiny_model_dir, tmp_path):
    fed = prepare(tiny_config(tiny_model_dir, str(tmp_path), federation=LORA))
    server = fed.server
    (block,) = server.blocks
    assert fed.selected == [0] and server.plan == [0, 0, 0, 0]
    names = _lora_names(server.model)
    assert set(block.param_names) == names
    ups, downs = [], []
    receive, payload = server.receive_update, server.block_payload

    def receive_update(data, client):
        ups.append((client, BlockUpdate.deserialize(data), len(data)))
        return receive(data, client)

    def block_payload(b, version, base=None):
        data = payload(b, version, base)
        downs.append((BlockValue.deserialize(data), len(data)))
        return data

    server.receive_update, server.block_payload = receive_update, block_payload
    logs = run_local(fed.placements, server, threads=1)

    rounds = len(server.plan)
    assert len(ups) == len(downs) == 2 * rounds  # every round's delta up, its aggregate down
    for _, u, _ in ups:
        assert set(u.tensors) == names and u.block == 0
    for v, _ in downs:
        assert set(v.tensors) == names and v.block == 0
    # bytes_up of a client's round record is exactly its serialized adapter delta
    sizes = {(c, u.round): n for c, u, n in ups}
    for lg in logs:
        for r in lg.rounds[1:]:  # round t+1 (or the drain) uploads round t's delta
            assert r.bytes_up == sizes[(lg.client, r.round - 1)]
        assert lg.rounds[0].bytes_up == 0
    adapter = block_nbytes(server.model, block)  # the adapter's fp32 bytes, and a header
    assert all(adapter < n < adapter + 16 * 1024 for n in sizes.values())


def test_aggregation_is_the_weighted_mean_of_the_adapter_deltas(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer))
    blocks = blocks_for(model, "", SMALL, 0)
    server = Server(model, blocks, [0], clients=2)
    init = block_state(model, blocks[0])
    gen = torch.Generator().manual_seed(0)
    deltas = [
        {n: torch.randn(t.shape, generator=gen) * 1e-2 for n, t in init.items()} for _ in "ab"
    ]
    counts = [3, 1]
    for c in (0, 1):
        u = BlockUpdate(c, 0, 0, -1, counts[c], 1.0, deltas[c])
        assert server.receive_update(u.serialize(), c) == (True, "accepted")
    assert server.versions == {0: 0}
    got = block_state(model, blocks[0])
    for n, t in init.items():
        want = t.double() + (3 * deltas[0][n].double() + 1 * deltas[1][n].double()) / 4
        assert (got[n].double() - want).abs().max() < 1e-7, n
        assert not torch.equal(got[n], t)
    # only the adapter moved
    assert all(
        torch.equal(p, make_model(len(tiny_tokenizer)).state_dict()[n.replace(".base_layer", "")])
        for n, p in model.named_parameters()
        if ".lora_" not in n
    )


def test_identical_data_equals_single_client_lora_training_bit_for_bit(tiny_model_dir, tmp_path):
    """Every client trains on the same data with the same batches, so every delta is the same
    and their weighted mean (0.5 d + 0.5 d) is that delta exactly: the global adapter follows
    one client's training bit for bit (same code, one torch thread on both sides)."""
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path),
        federation={**LORA, "rounds": 3},
        data={"partition": "replicate"},
    )
    fed = prepare(cfg)
    run_local(fed.placements, fed.server, threads=1)

    spec, s = fed.placements[0], fed.server.settings.train_settings()
    assert s.lr == cfg.lora.lr
    model = load_model(tiny_model_dir)
    (block,) = blocks_for(model, "", lora_settings(cfg), cfg.run.seed)
    for t in range(cfg.federation.rounds):
        batches = round_indices(len(spec.data), t, s.steps, s.batch_size, fed.server.settings.seed)
        r = train_block(model, block, list(spec.data), batches, s, spec.pad_id)
        set_block(model, block, {n: r.before[n] + r.delta[n] for n in r.before})
    want, got = _params(model), _params(fed.model)
    assert want.keys() == got.keys()
    for n in want:
        assert torch.equal(want[n], got[n]), n
    trained = [n for n in block.param_names if ".lora_B." in n]
    assert all(got[n].abs().sum() > 0 for n in trained)  # B moved away from zero


def test_clients_share_the_base_weights_and_never_write_them(tiny_model_dir, tmp_path, monkeypatch):
    shares: list[FrozenShare] = []

    class Recording(FrozenShare):
        def __init__(self) -> None:
            super().__init__()
            shares.append(self)

    monkeypatch.setattr(local_backend, "FrozenShare", Recording)
    fed = prepare(tiny_config(tiny_model_dir, str(tmp_path), federation=LORA))
    clients = {}
    run_local(
        fed.placements, fed.server, threads=1, on_barrier=lambda c, t: clients.update({c.id: c})
    )
    (base,) = shares[0]._bases.values()
    fresh = _params(load_model(tiny_model_dir))
    assert _params(base).keys() == fresh.keys()  # no adapter injected into the shared base
    assert all(torch.equal(p, fresh[n]) for n, p in _params(base).items())
    shared = {id(p) for p in base.parameters()}
    for c in clients.values():
        own = [n for n, p in c.model.named_parameters() if id(p) not in shared]
        assert set(own) == _lora_names(c.model)  # each client holds only its adapter
        # and ends equal to the server (the drain)
        glob = _params(fed.model)
        assert all(torch.equal(p, glob[n]) for n, p in _params(c.model).items())


# -- the exported model, the whole run, the comparison -----------------------------------------
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")  # PEFT's call
@pytest.mark.parametrize("layers", ["all", "top:2"])
def test_the_merged_export_loads_and_matches_the_adapter_model(tiny_model_dir, tmp_path, layers):
    from peft import PeftModel

    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path / "run"),
        federation=LORA,
        eval=NO_GENERATION,
        lora={"layers": layers},
    )
    summary = run(cfg)
    assert summary["lr"] == cfg.lora.lr and summary["blocks"] == [0]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    adapted = PeftModel.from_pretrained(
        load_model(tiny_model_dir), tmp_path / "run" / "model-adapter"
    )
    base = load_model(tiny_model_dir)
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    changed = {
        int(n.split(".")[2])
        for n, p in merged.named_parameters()
        if n.startswith("model.layers.") and not torch.equal(p, dict(base.named_parameters())[n])
    }
    assert changed == ({0, 1, 2, 3} if layers == "all" else {2, 3})  # only adapted layers merge
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    for m in (merged, adapted, base):
        m.eval()
    with torch.no_grad():
        want = adapted(ids).logits
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5)
        assert (base(ids).logits - want).abs().max() > 1e-4  # the adapter learned something
    # the export is the run's final global model: the same held-out loss
    f = prepare(cfg)
    loss = eval_loss(merged, f.heldout, cfg.eval.batch_size, f.tokenizer.pad_token_id)
    assert loss == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]


def test_compare_runs_block_methods_and_fedit_lora_each_at_its_lr(tiny_model_dir, tmp_path):
    default = FederationConfig().lr
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path / "cmp"),
        federation={"rounds": 2, "lr": default},
        lora={"lr": 5e-3},
        eval=NO_GENERATION,
    )
    result = compare(cfg, ["parablock", "fedbcd", "fedit_lora"])
    rows = {r["algorithm"]: r for r in result["rows"]}
    assert set(rows) == {"parablock", "fedbcd", "fedit_lora"}
    summaries = {
        alg: json.loads((tmp_path / "cmp" / alg / "summary.json").read_text()) for alg in rows
    }
    assert {alg: s["lr"] for alg, s in summaries.items()} == {
        "parablock": default,
        "fedbcd": default,
        "fedit_lora": 5e-3,
    }
    lora = summaries["fedit_lora"]
    assert rows["fedit_lora"]["final_eval_loss"] == lora["final_eval_loss"]
    assert lora["final_eval_loss"] < lora["initial_eval_loss"]
    assert (tmp_path / "cmp" / "fedit_lora" / "model-adapter" / "adapter_config.json").exists()
    # the timing model covers the block methods and skips fedit_lora instead of failing
    assert sorted(r["algorithm"] for r in from_run(tmp_path / "cmp")) == ["fedbcd", "parablock"]
