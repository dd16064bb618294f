"""model.frozen_dtype=bf16: the weights no block trains in bf16, read from the files; int8: the
frozen layers' linear weights in int8 through torchao (an optional extra: its tests run where it
is installed, and its absence is a one-line error)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from parablock.config import from_dict
from parablock.data.examples import Example
from parablock.errors import ConfigError
from parablock.model.blocks import model_blocks
from parablock.model.forward import BlockForward
from parablock.model.frozen import base_fingerprint, hold_frozen
from parablock.model.load import load_model, model_fingerprint
from parablock.run.runner import run

TRAINED = (2, 3)


def _trained_names(model) -> set[str]:
    blocks = model_blocks(model)
    return {n for b in TRAINED for n in blocks[b].param_names}


def test_the_file_fingerprint_is_the_models(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert base_fingerprint(model, tiny_model_dir) == model_fingerprint(model)


def test_matrices_outside_the_trained_blocks_become_bf16_and_nothing_else_changes(
    tiny_model_dir,
):
    model = load_model(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = _trained_names(model)
    saved = hold_frozen(model, tiny_model_dir, trained)
    assert saved > 0
    for n, p in model.named_parameters():
        want = before[n]
        if n not in trained and p.dim() >= 2:
            assert p.dtype == torch.bfloat16, n
            assert torch.equal(p, want.to(torch.bfloat16)), n
        else:  # trained blocks and every norm: fp32 and bit-identical
            assert p.dtype == torch.float32 and torch.equal(p, want), n
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


def test_the_bf16_forward_of_bf16_frozen_weights_matches_fp32_frozen(tiny_model_dir):
    data = [
        Example(tuple(range(5 + i, 37 + i)), (-100,) * 16 + tuple(range(21 + i, 37 + i)))
        for i in range(4)
    ]
    ref = load_model(tiny_model_dir)
    held = load_model(tiny_model_dir)
    hold_frozen(held, tiny_model_dir, _trained_names(held))
    for start in (0, 2):  # the full forward, and the one from the prefix cache
        losses = []
        for m in (ref, held):
            f = BlockForward(m, start, precision="bf16", prefix_cache_mb=16 if start else 0)
            losses.append(f.loss(data, [0, 1, 2, 3], pad_id=1))
        # the embedding rows are the only weights rounded beyond what autocast rounds
        assert losses[1].item() == pytest.approx(losses[0].item(), rel=2e-3)
        hidden = held.model.embed_tokens(torch.tensor([[3, 4]]))
        assert hidden.dtype == torch.float32  # the residual stream stays fp32


def test_a_run_with_bf16_frozen_weights_trains_and_says_so(tiny_model_dir, tmp_path):
    sections = dict(model={"blocks": "top:2"}, train={"precision": "bf16"})
    ref = run(tiny_config(tiny_model_dir, str(tmp_path / "fp32"), **sections))
    sections["model"]["frozen_dtype"] = "bf16"
    held = run(tiny_config(tiny_model_dir, str(tmp_path / "bf16"), **sections))
    assert held["frozen_dtype"] == "bf16" and ref["frozen_dtype"] == "fp32"
    assert held["final_eval_loss"] < held["initial_eval_loss"]
    assert held["final_eval_loss"] == pytest.approx(ref["final_eval_loss"], rel=2e-2)
    # the server's model is fp32 throughout: a trained block's bits differ only via training
    assert held["initial_eval_loss"] == ref["initial_eval_loss"]


@pytest.mark.parametrize(
    "sections,field",
    [
        ({"train": {"precision": "fp32"}}, "train.precision"),
        ({"federation": {"algorithm": "fedit_lora"}}, "fedit_lora"),
    ],
)
def test_bf16_frozen_weights_refuse_what_cannot_use_them(sections, field):
    with pytest.raises(ConfigError, match=field):
        from_dict({"model": {"frozen_dtype": "bf16"}, **sections})


def test_int8_frozen_weights_without_torchao_are_a_one_line_error(tiny_model_dir, monkeypatch):
    import importlib.util

    import parablock.model.frozen as frozen

    real = importlib.util.find_spec
    monkeypatch.setattr(
        frozen.importlib.util, "find_spec", lambda n, *a: None if n == "torchao" else real(n, *a)
    )
    model = load_model(tiny_model_dir)
    with pytest.raises(ConfigError) as e:
        hold_frozen(model, tiny_model_dir, _trained_names(model), "int8")
    assert "\n" not in str(e.value) and "model.frozen_dtype=int8 needs torchao" in str(e.value)


def _int8_data():
    return [
        Example(tuple(range(5 + i, 37 + i)), (-100,) * 16 + tuple(range(21 + i, 37 + i)))
        for i in range(4)
    ]


def test_int8_frozen_layers_are_int8_and_the_trained_blocks_update_stays_near_bf16s(
    tiny_model_dir,
):
    pytest.importorskip("torchao")
    from parablock.model.train import TrainSettings, train_block

    deltas = {}
    for dtype in ("bf16", "int8"):
        model = load_model(tiny_model_dir)
        trained = _trained_names(model)
        hold_frozen(model, tiny_model_dir, trained, dtype)
        params = dict(model.named_parameters())
        if dtype == "int8":
            frozen_linear = "model.layers.0.mlp.down_proj.weight"
            assert hasattr(params[frozen_linear], "qdata")  # held as int8
            assert params[frozen_linear].qdata.dtype == torch.int8
            for n in trained:  # the trained blocks stay plain fp32
                assert type(params[n].data) is torch.Tensor and params[n].dtype == torch.float32
            assert params["model.embed_tokens.weight"].dtype == torch.bfloat16
        block = model_blocks(model)[3]
        settings = TrainSettings(2, 4, 1e-3, precision="bf16")
        result = train_block(model, block, _int8_data(), [[0, 1, 2, 3]] * 2, settings, 1)
        deltas[dtype] = result.delta
        assert all(
            type(t) is torch.Tensor and t.dtype == torch.float32 for t in result.delta.values()
        )
    # the documented tolerance: the int8 path's upload within 10% (relative L2) of the bf16 one's
    num = sum((deltas["int8"][n] - deltas["bf16"][n]).norm() ** 2 for n in deltas["bf16"])
    den = sum(deltas["bf16"][n].norm() ** 2 for n in deltas["bf16"])
    assert 0 < (num / den).sqrt().item() < 0.1


@pytest.mark.parametrize("dtype", ["int8", "nf4"])
def test_a_run_with_quantised_frozen_weights_leaves_the_servers_frozen_weights_alone(
    tiny_model_dir, tmp_path, dtype
):
    pytest.importorskip("torchao")
    sections = dict(model={"blocks": "top:2", "frozen_dtype": dtype}, train={"precision": "bf16"})
    held = run(tiny_config(tiny_model_dir, str(tmp_path / dtype), **sections))
    assert held["frozen_dtype"] == dtype and held["updates_rejected"] == 0
    assert held["final_eval_loss"] < held["initial_eval_loss"]
    base = dict(load_model(tiny_model_dir).named_parameters())
    final = dict(load_model(str(tmp_path / dtype / "model")).named_parameters())
    trained = _trained_names(load_model(tiny_model_dir))
    for n, p in final.items():  # the server's model: fp32, its frozen weights the base's bits
        assert p.dtype == torch.float32
        if n not in trained:
            assert torch.equal(p, base[n]), n


def test_nf4_frozen_weights_without_torchao_are_a_one_line_error(tiny_model_dir, monkeypatch):
    import importlib.util

    import parablock.model.frozen as frozen

    real = importlib.util.find_spec
    monkeypatch.setattr(
        frozen.importlib.util, "find_spec", lambda n, *a: None if n == "torchao" else real(n, *a)
    )
    model = load_model(tiny_model_dir)
    with pytest.raises(ConfigError) as e:
        hold_frozen(model, tiny_model_dir, _trained_names(model), "nf4")
    assert "\n" not in str(e.value) and "model.frozen_dtype=nf4 needs torchao" in str(e.value)


def _update(model_dir: str, dtype: str) -> dict[str, torch.Tensor]:
    from parablock.model.train import TrainSettings, train_block

    model = load_model(model_dir)
    hold_frozen(model, model_dir, _trained_names(model), dtype)
    settings = TrainSettings(2, 4, 1e-3, precision="bf16")
    return train_block(model, model_blocks(model)[3], _int8_data(), [[0, 1, 2, 3]] * 2, settings, 1)


def test_nf4_frozen_layers_are_4_bit_and_the_trained_blocks_update_stays_near_bf16s(
    tiny_model_dir,
):
    pytest.importorskip("torchao")
    model = load_model(tiny_model_dir)
    trained = _trained_names(model)
    saved = hold_frozen(model, tiny_model_dir, trained, "nf4")
    params = dict(model.named_parameters())
    for n, p in params.items():
        if n in trained:  # the trained blocks stay plain fp32
            assert type(p.data) is torch.Tensor and p.dtype == torch.float32, n
        elif n.startswith("model.layers.") and n.endswith("proj.weight"):
            assert hasattr(p, "quantized_data") and not p.requires_grad, n  # held as nf4
            assert p.quantized_data.dtype == torch.uint8  # two values a byte
            assert p.quantized_data.numel() == p.numel() // 2
    assert params["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert saved > 0
    # the nf4 weights read as their dequantised values: the trained blocks' fingerprint is the
    # fp32 model's, the whole model's is not
    fp32 = load_model(tiny_model_dir)
    assert model_fingerprint(model, trained) == model_fingerprint(fp32, trained)
    assert model_fingerprint(model) != model_fingerprint(fp32)
    bf16, nf4 = _update(tiny_model_dir, "bf16"), _update(tiny_model_dir, "nf4")
    assert all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in nf4.delta.values())
    # the documented tolerance: the nf4 path's upload within 40% (relative L2) of the bf16
    # one's, and pointing the same way (cosine > 0.9)
    a = torch.cat([bf16.delta[n].flatten() for n in sorted(bf16.delta)])
    b = torch.cat([nf4.delta[n].flatten() for n in sorted(bf16.delta)])
    assert 0 < ((b - a).norm() / a.norm()).item() < 0.4
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9
