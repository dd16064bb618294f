"""Differential privacy: the mechanisms really run (clipping bounds each example, noise of the
stated size), epsilon is the accountant library's, the budget stops a run, a resume continues the
same epsilon and model, and a client that cannot follow the run's privacy is refused."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from conftest import make_model, tiny_config
from parablock.core.pipeline import At
from parablock.core.privacy import Ledger, NoiseShare, ServerNoise, calibrate
from parablock.errors import RunInterrupted
from parablock.model.blocks import block_state, freeze_all_but, model_blocks
from parablock.model.forward import BlockForward
from parablock.model.train import DPStep, TrainSettings, train_block
from parablock.run.build import prepare
from parablock.run.runner import run
from parablock.wire.messages import MessageError
from parablock.wire.protocol import PROTOCOL, JoinRequest


def _per_example_grads(model, block, data, idx, pad_id):
    fw = BlockForward(model, 0, precision="fp32")
    params = freeze_all_but(model, block)
    out = []
    for i in idx:
        fw.loss(data, [i], pad_id, per_example=True).backward()
        out.append({n: p.grad.clone() for n, p in zip(block.param_names, params, strict=True)})
        for p in params:
            p.grad = None
    for p in params:
        p.requires_grad_(False)
    return out


def test_per_example_clipping_bounds_each_examples_contribution(tiny_examples, tiny_tokenizer):
    """A DP step without noise and at lr-free SGD-like scale: the block moves by exactly what the
    clipped per-example gradients, hand-computed one example at a time, say."""
    model = make_model(len(tiny_tokenizer))
    block = model_blocks(model)[1]
    idx, clip = [0, 1, 2, 3], 0.05
    grads = _per_example_grads(model, block, tiny_examples, idx, tiny_tokenizer.pad_token_id)
    norms = [math.sqrt(sum(float((g**2).sum()) for g in gi.values())) for gi in grads]
    assert all(n > clip for n in norms)  # every example is clipped: the bound is what binds
    want = {
        n: sum(gi[n] * min(1.0, clip / norm) for gi, norm in zip(grads, norms, strict=True))
        / len(idx)
        for n in block.param_names
    }
    captured = {}
    real_step = torch.optim.AdamW.step

    def capture(self, *a, **k):
        for group in self.param_groups:
            for p in group["params"]:
                captured[id(p)] = p.grad.clone()
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = capture
    try:
        params = dict(model.named_parameters())
        train_block(
            model,
            block,
            tiny_examples,
            [idx],
            TrainSettings(1, 4, 1e-3, precision="fp32"),
            tiny_tokenizer.pad_token_id,
            dp=DPStep(clip, 0.0, len(idx), 2, seed=1),
        )
    finally:
        torch.optim.AdamW.step = real_step
    for n in block.param_names:
        torch.testing.assert_close(captured[id(params[n])], want[n], rtol=1e-4, atol=1e-8)


def test_dp_sgd_noise_has_the_stated_deviation_and_the_block_really_moves(
    tiny_examples, tiny_tokenizer
):
    """The same step with and without noise: their gradients differ by N(0, (sigma C / B)^2)
    per coordinate (a fixed seed, a tolerance of 3% on about 37,000 draws), and the trained
    block's weights really change under DP."""
    grads = {}
    for sigma in (0.0, 1.3):
        model = make_model(len(tiny_tokenizer))
        block = model_blocks(model)[1]
        before = block_state(model, block)
        seen = {}
        real_step = torch.optim.AdamW.step

        def capture(self, *a, seen=seen, real_step=real_step, **k):
            for group in self.param_groups:
                for p in group["params"]:
                    seen[id(p)] = p.grad.clone()
            return real_step(self, *a, **k)

        torch.optim.AdamW.step = capture
        try:
            train_block(
                model,
                block,
                tiny_examples,
                [[0, 1, 2]],
                TrainSettings(1, 4, 1e-3, precision="fp32"),
                tiny_tokenizer.pad_token_id,
                dp=DPStep(0.5, sigma, 4, 8, seed=7),
            )
        finally:
            torch.optim.AdamW.step = real_step
        grads[sigma] = torch.cat([g.flatten() for g in seen.values()])
        after = block_state(model, block)
        assert any(not torch.equal(before[n], after[n]) for n in before)
    noise = grads[1.3] - grads[0.0]
    assert noise.numel() > 30_000
    assert float(noise.std()) == pytest.approx(1.3 * 0.5 / 4, rel=0.03)
    assert abs(float(noise.mean())) < 0.01 * 1.3 * 0.5 / 4


def test_client_level_noise_has_the_stated_deviation_at_the_server_and_in_shares():
    zero = {"w": torch.zeros(200_000)}
    at = At(3, 1, torch.Generator().manual_seed(5), {"participants": 4})
    out = ServerNoise(2.0, 0.1)(zero, at)["w"]
    assert float(out.std()) == pytest.approx(2.0 * 0.1 / 4, rel=0.02)
    share = NoiseShare(2.0, 0.1, clients=4)(zero, At(3, 1, torch.Generator().manual_seed(6)))
    assert float(share["w"].std()) == pytest.approx(2.0 * 0.1 / 2, rel=0.02)  # sigma C / sqrt(n)


def test_reported_epsilon_is_the_accountant_librarys(tiny_model_dir, tmp_path):
    from opacus.accountants import RDPAccountant

    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path),
        federation={"rounds": 3, "local_steps": 2, "batch_size": 2},
        privacy={"mode": "record", "noise_multiplier": 1.1, "clip_norm": 0.5},
        eval={"accuracy_size": 0},
    )
    summary = run(cfg)
    records = prepare(cfg).placements[0].data
    acc = RDPAccountant()
    acc.history = [(1.1, 2 / len(records), 3 * 2)]
    assert summary["privacy_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert summary["privacy_epsilon_by_client"]["0"] == summary["privacy_epsilon"]
    # client mode: one release per round, q = 1
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path / "client"),
        federation={"rounds": 3, "aggregator": "mean"},
        privacy={"mode": "client", "noise_multiplier": 1.5, "clip_norm": 0.05},
        eval={"accuracy_size": 0},
    )
    summary = run(cfg)
    acc = RDPAccountant()
    acc.history = [(1.5, 1.0, 3)]
    assert summary["privacy_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert summary["updates_rejected"] == 0
    rows = [json.loads(x) for x in open(f"{summary['run_dir']}/metrics.jsonl")]
    per_round = [r["epsilon"] for r in rows if r.get("kind") == "round"]
    assert per_round == sorted(per_round) and per_round[-1] == summary["privacy_epsilon"]


def test_target_epsilon_sets_the_noise_and_max_epsilon_stops_before_it_is_passed(
    tiny_model_dir, tmp_path
):
    fed = {"rounds": 6, "aggregator": "mean"}
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path / "target"),
        federation=fed,
        privacy={"mode": "client", "target_epsilon": 20.0, "clip_norm": 0.05},
        eval={"accuracy_size": 0},
    )
    summary = run(cfg)
    assert summary["privacy_noise_multiplier"] == pytest.approx(
        calibrate(20.0, 1e-5, 1.0, 6, "rdp")
    )
    assert summary["privacy_epsilon"] == pytest.approx(20.0, rel=0.02)
    assert summary["privacy_epsilon"] <= 20.0
    # a budget that 6 rounds would pass: the run ends cleanly before the round that would
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path / "budget"),
        federation=fed,
        privacy={"mode": "client", "noise_multiplier": 1.0, "clip_norm": 0.05, "max_epsilon": 10},
        eval={"accuracy_size": 0},
    )
    summary = run(cfg)
    done = summary["rounds"]
    assert done == 3 and summary["privacy_epsilon"] <= 10.0
    assert Ledger("rdp", [(1.0, 1.0, done + 1)]).epsilon(1e-5) > 10.0


def test_a_resumed_private_run_continues_the_same_epsilon_and_model(tiny_model_dir, tmp_path):
    def cfg(out):
        return tiny_config(
            tiny_model_dir,
            str(tmp_path / out),
            federation={"rounds": 5},
            privacy={"mode": "record", "noise_multiplier": 0.9, "clip_norm": 0.5},
            eval={"accuracy_size": 0},
            run={"threads": 1},
        )

    whole = run(cfg("whole"))
    stop = threading.Event()

    def halt(client, t):
        if t == 2:
            stop.set()

    with pytest.raises(RunInterrupted):
        run(cfg("halted"), on_barrier=halt, stop=stop)
    resumed = run(cfg("halted"), resume=True)
    assert resumed["final_model_fingerprint"] == whole["final_model_fingerprint"]
    assert resumed["privacy_epsilon"] == whole["privacy_epsilon"]
    assert resumed["privacy_epsilon_by_client"] == whole["privacy_epsilon_by_client"]


def test_a_client_that_cannot_follow_the_runs_privacy_is_refused(tiny_model_dir, tmp_path):
    cfg = tiny_config(
        tiny_model_dir, str(tmp_path), privacy={"mode": "record", "noise_multiplier": 1.0}
    )
    server = prepare(cfg).server
    with pytest.raises(MessageError, match="needs privacy.mode=record, which client 0 cannot"):
        server.join(JoinRequest(PROTOCOL, 0, "", privacy_modes=["none", "client"]), 0)
    assert server.join(JoinRequest(PROTOCOL, 1, ""), 1).settings.privacy.mode == "record"


def test_privacy_combinations_that_break_the_promise_are_refused(tiny_model_dir):
    from parablock.config import ConfigError

    with pytest.raises(ConfigError, match="federation.aggregator=median breaks that bound"):
        tiny_config(
            tiny_model_dir,
            "o",
            privacy={"mode": "client"},
            federation={"aggregator": "median"},
        )
    with pytest.raises(ConfigError, match="local_steps_max"):
        tiny_config(
            tiny_model_dir, "o", privacy={"mode": "record"}, federation={"local_steps_max": 8}
        )
