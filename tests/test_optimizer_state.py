"""federation.optimizer_state and federation.lr_schedule_scope: AdamW moments carried across a
block's visits (on the host between them, in the client's checkpoint, restored bit for bit), and
warm-up and cosine laid over the whole run instead of each round."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_model, tiny_config
from parablock.core.checkpoint import ClientState
from parablock.core.server import _honest_bound
from parablock.data.examples import round_indices
from parablock.errors import ConfigError
from parablock.model.blocks import model_blocks
from parablock.model.train import Moments, TrainSettings, lr_factor, train_block
from parablock.run.rundir import check_rounds, resumed_config
from parablock.run.runner import RunInterrupted, run
from parablock.run.settings import run_settings

PER_BLOCK = {"optimizer_state": "per_block"}


def _model(out: Path) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())


def _visits(examples, tokenizer, settings: TrainSettings, carry: bool):
    """Train block 1 of a fresh tiny model twice (rounds 0 and 1), carrying the moments or not;
    the results of both visits."""
    model = make_model(len(tokenizer))
    block = model_blocks(model)[1]
    results, moments = [], None
    for r in range(2):
        batches = round_indices(len(examples), r, settings.steps, 2, seed=0)
        res = train_block(
            model, block, examples, batches, settings, tokenizer.pad_token_id, round=r,
            moments=moments if carry else None,
        )  # fmt: skip
        results.append(res)
        moments = res.moments
    return results


def test_per_block_carries_the_moments_and_step_count_to_the_next_visit(
    tiny_examples, tiny_tokenizer
):
    per_block = TrainSettings(3, 2, 1e-3, optimizer_state="per_block")
    carried = _visits(tiny_examples, tiny_tokenizer, per_block, carry=True)
    first, second = (r.moments for r in carried)
    assert first.step == 3 and second.step == 6  # the second visit went on from step 3
    assert all(t.device.type == "cpu" for t in (*first.exp_avg.values(), *second.exp_avg.values()))
    reset = _visits(tiny_examples, tiny_tokenizer, per_block, carry=False)
    assert reset[1].moments.step == 3  # a fresh AdamW each visit
    # the first visits agree; the second starts from different moments and moves differently
    assert all(torch.equal(carried[0].delta[n], reset[0].delta[n]) for n in reset[0].delta)
    n = next(iter(first.exp_avg))
    assert not torch.equal(second.exp_avg[n], reset[1].moments.exp_avg[n])
    assert any(not torch.equal(carried[1].delta[n], reset[1].delta[n]) for n in reset[1].delta)
    # reset keeps nothing
    plain = _visits(tiny_examples, tiny_tokenizer, TrainSettings(3, 2, 1e-3), carry=True)
    assert plain[0].moments is None and plain[1].moments is None


def test_moments_survive_a_checkpoint_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    m = Moments(12, {"w": torch.randn(3, 4, generator=g)}, {"w": torch.rand(3, 4, generator=g)})
    state = ClientState(0, 5, {1: 3}, None, {}, moments={1: m, 3: m})
    back = ClientState.from_bytes(state.to_bytes())
    assert set(back.moments) == {1, 3} and back.moments[1].step == 12
    assert torch.equal(back.moments[3].exp_avg["w"], m.exp_avg["w"])
    assert torch.equal(back.moments[3].exp_avg_sq["w"], m.exp_avg_sq["w"])
    assert ClientState.from_bytes(ClientState(0, 5, {}, None, {}).to_bytes()).moments == {}


def test_schedule_scope_run_spans_rounds_times_steps():
    s = TrainSettings(4, 2, 1e-3, warmup_steps=4, lr_schedule="cosine")
    run_long = TrainSettings(
        4, 2, 1e-3, warmup_steps=4, lr_schedule="cosine", lr_schedule_scope="run", rounds=3
    )
    # per round: warm-up over the round's 4 steps, every round again
    assert [lr_factor(k, s, 2) for k in range(4)] == [0.2, 0.4, 0.6, 0.8]
    # over the run: warm-up in round 0, then one cosine over the 8 steps of rounds 1 and 2
    assert [lr_factor(k, run_long, 0) for k in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert lr_factor(0, run_long, 1) == 1.0
    for r, k in ((1, 3), (2, 0), (2, 3)):
        g = r * 4 + k - 4
        assert lr_factor(k, run_long, r) == pytest.approx(0.5 * (1 + math.cos(math.pi * g / 8)))
    assert lr_factor(3, run_long, 2) > 0  # the last step still learns
    constant = TrainSettings(4, 2, 1e-3, warmup_steps=6, lr_schedule_scope="run", rounds=3)
    assert [lr_factor(k, constant, 1) for k in range(4)] == pytest.approx([5 / 7, 6 / 7, 1, 1])


def test_a_run_carries_each_blocks_state_and_resumes_bit_for_bit(tiny_model_dir, tmp_path):
    """6 rounds over 4 blocks: blocks 0 and 1 are visited twice; the run is cut after round 2,
    so their second visits start from moments restored from the checkpoint."""
    fed = {
        "rounds": 6,
        "warmup_steps": 2,
        "lr_schedule": "cosine",
        "lr_schedule_scope": "run",
        **PER_BLOCK,
    }
    ev = {"every": 1, "accuracy_size": 0}
    steps: dict[tuple[int, int], int] = {}

    def watch(client, t):
        if t < len(client.plan):  # not the drain
            steps[client.id, t] = client.moments[client.plan[t]].step

    full = run(tiny_config(tiny_model_dir, str(tmp_path / "full"), federation=fed, eval=ev),
               on_barrier=watch)  # fmt: skip
    assert steps[0, 1] == 2 and steps[0, 4] == 4 and steps[1, 5] == 4  # K=2 per visit
    assert full["updates_rejected"] == 0  # the server's bound allows carried moments
    reset = run(
        tiny_config(tiny_model_dir, str(tmp_path / "reset"), federation={**fed, **{
            "optimizer_state": "reset"}}, eval=ev)
    )  # fmt: skip
    assert reset["final_eval_loss"] != full["final_eval_loss"]

    cfg = tiny_config(tiny_model_dir, str(tmp_path / "cut"), federation=fed, eval=ev)
    stop = threading.Event()

    def halt(client, t):
        if client.id == 0 and t == 2:
            stop.set()

    with pytest.raises(RunInterrupted):
        run(cfg, on_barrier=halt, stop=stop)
    resumed = run(cfg, resume=True)
    a, b = _model(tmp_path / "full"), _model(tmp_path / "cut")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed["final_eval_loss"] == full["final_eval_loss"]


def test_per_block_with_record_level_dp(tiny_model_dir, tmp_path):
    seen = {}

    def watch(client, t):
        if t < len(client.plan):
            seen[t] = client.moments[client.plan[t]].step

    summary = run(
        tiny_config(
            tiny_model_dir,
            str(tmp_path),
            model={"blocks": "top:2"},
            federation={"rounds": 4, **PER_BLOCK},
            privacy={"mode": "record", "noise_multiplier": 1.0, "clip_norm": 0.5},
            eval={"accuracy_size": 0},
        ),
        on_barrier=watch,
    )
    assert seen[3] == 4 and summary["updates_rejected"] == 0  # each block's second visit
    assert math.isfinite(summary["final_eval_loss"])


def test_config_keys_are_checked_and_fixed_on_resume(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="federation.optimizer_state"):
        tiny_config(tiny_model_dir, "o", federation={"optimizer_state": "keep"})
    with pytest.raises(ConfigError, match="federation.lr_schedule_scope"):
        tiny_config(tiny_model_dir, "o", federation={"lr_schedule_scope": "epoch"})
    # the run-long cosine fixes the run's length once rounds have been trained with it
    fed = {"rounds": 4, "lr_schedule": "cosine", "lr_schedule_scope": "run"}
    saved = tiny_config(tiny_model_dir, "o", federation=fed)
    longer = tiny_config(tiny_model_dir, "o", federation={**fed, "rounds": 8})
    with pytest.raises(ConfigError, match="keep federation.rounds=4"):
        check_rounds(saved, longer, [0, 1, 2, 3], 2, tmp_path)
    # both keys change what is computed: a resume may not change them
    (tmp_path / "config.toml").write_text(saved.to_toml())
    for key, value in (("optimizer_state", "per_block"), ("lr_schedule_scope", "round")):
        changed = tiny_config(tiny_model_dir, "o", federation={**fed, key: value})
        with pytest.raises(ConfigError, match=f"federation.{key}"):
            resumed_config(changed, tmp_path)


def test_the_servers_bound_widens_for_carried_moments(tiny_model_dir):
    plain = tiny_config(tiny_model_dir, "o", federation={"rounds": 8})
    carried = tiny_config(tiny_model_dir, "o", federation={"rounds": 8, **PER_BLOCK})
    a = _honest_bound(run_settings(plain, list(range(8))))
    b = _honest_bound(run_settings(carried, list(range(8))))
    assert b.reach > a.reach
    # a run-long warm-up: the bound takes each step's largest lr over the rounds (1.0 here)
    warm = {"rounds": 8, "warmup_steps": 4, "lr_schedule_scope": "run"}
    w = _honest_bound(run_settings(tiny_config(tiny_model_dir, "o", federation=warm), [0] * 8))
    assert w.reach == pytest.approx(a.reach)


def test_both_settings_reach_every_client_in_the_join_reply(tiny_model_dir):
    """Local, Ray, networked and Flower clients are all built from the join's RunSettings
    (``backends/assembly.py``): the two keys travel in it, and a bad value is refused there."""
    import json

    from parablock.wire.messages import MessageError
    from parablock.wire.protocol import JoinReply

    fed = {"optimizer_state": "per_block", "lr_schedule_scope": "run", "rounds": 5}
    s = run_settings(tiny_config(tiny_model_dir, "o", federation=fed), [0, 1, 2, 3, 0])
    back = JoinReply.from_bytes(JoinReply(1, s, 0, False, {}).to_bytes()).settings
    train = back.train_settings()
    assert (train.optimizer_state, train.lr_schedule_scope, train.rounds) == ("per_block", "run", 5)
    raw = json.loads(JoinReply(1, s, 0, False, {}).to_bytes())
    raw["settings"]["optimizer_state"] = "keep"
    with pytest.raises(MessageError):
        JoinReply.from_bytes(json.dumps(raw).encode())
