"""The timing model against hand computations, real parameter counts, and a measured run."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from parablock.cli import main
from parablock.config import ConfigError
from parablock.run.runner import run
from parablock.tools.estimate import (
    EstimateError,
    EstimateSettings,
    estimate,
    load,
    model_sizes,
)
from parablock.tools.estimate_runs import from_run

# One tiny-Llama layer (hidden 64, intermediate 128, 4 heads of 16, 2 KV heads), by hand:
# q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate/up/down 3 x 64x128 + two RMSNorms of 64.
LAYER_PARAMS = 4096 + 2048 + 2048 + 4096 + 3 * 8192 + 2 * 64


def test_block_sizes_are_real_parameter_counts(tiny_model_dir, tmp_path):
    sizes = model_sizes(tiny_config(tiny_model_dir, str(tmp_path)))
    assert sizes.block_params == {i: LAYER_PARAMS for i in range(4)}


def test_llama3_8b_architecture_counts_match_the_published_size(tmp_path):
    cfg, _ = load(None, ["model.name_or_path=arch:llama-3-8b", "model.blocks=all"])
    sizes = model_sizes(cfg)
    assert sizes.total_params == 8_030_261_248  # Meta-Llama-3-8B
    # a layer: attention 4096x(4096+1024+1024+4096), MLP 3 x 4096x14336, two norms
    assert set(sizes.block_params.values()) == {
        4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336 + 2 * 4096
    }


def test_estimate_matches_a_hand_computation(tiny_model_dir, tmp_path):
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path),
        federation={"rounds": 4},
        link={"up_mbps": 8.0, "down_mbps": 16.0, "latency_ms": 10.0},
    )
    r = estimate(cfg, EstimateSettings(compute_s=0.2, aggregate_s=0.05))
    nbytes = LAYER_PARAMS * 4  # fp32
    t_up = 0.010 + nbytes * 8 / 8e6
    t_down = 0.010 + nbytes * 8 / 16e6
    comm = t_up + 0.05 + t_down
    assert r["mean_block_bytes"] == nbytes
    assert r["upload_s"] == pytest.approx(t_up) and r["download_s"] == pytest.approx(t_down)
    assert r["fedbcd_round_s"] == pytest.approx(0.2 + comm)
    assert r["parablock_round_s"] == pytest.approx(max(0.2, comm))
    assert r["speedup"] == pytest.approx((0.2 + comm) / max(0.2, comm))
    # round 0 sends nothing; rounds 1..3 send the previous round's block
    assert r["mean_round_s"]["fedbcd"] == pytest.approx((0.2 + 3 * (0.2 + comm)) / 4)
    assert r["mean_round_s"]["parablock"] == pytest.approx((0.2 + 3 * max(0.2, comm)) / 4)
    assert r["total_s"]["parablock"] == pytest.approx(0.2 + 3 * max(0.2, comm) + comm)
    # crossover: 0.02 + 0.05 + 8 B / s (1/8 + 1/16) / 1e6 = 0.2
    scale = 8 * nbytes / 1e6 * (1 / 8 + 1 / 16) / (0.2 - 0.07)
    assert r["crossover_mbps"]["up"] == pytest.approx(8 * scale)
    assert r["crossover_mbps"]["down"] == pytest.approx(16 * scale)
    at = cfg.replace(link={"up_mbps": 8 * scale, "down_mbps": 16 * scale})
    assert estimate(at, EstimateSettings(compute_s=0.2, aggregate_s=0.05))["speedup"] == (
        pytest.approx(2.0)
    )


def test_baselines_round_times_match_a_hand_computation(tiny_model_dir, tmp_path):
    """fedavg_full: FedBCD's sequence over the whole model at the full-training compute time;
    cyclic: one client per round, which first downloads what moved since its last turn."""
    link = {"up_mbps": 8.0, "down_mbps": 16.0, "latency_ms": 10.0}
    cfg = tiny_config(tiny_model_dir, str(tmp_path), federation={"rounds": 4}, link=link)
    r = estimate(cfg, EstimateSettings(compute_s=0.2, aggregate_s=0.05, full_compute_s=0.5))
    whole = model_sizes(cfg).total_params * 4
    assert r["whole_model_bytes"] == whole and r["full_compute_source"] == "given"
    comm_full = 0.010 + whole * 8 / 8e6 + 0.05 + 0.010 + whole * 8 / 16e6
    assert r["mean_round_s"]["fedavg_full"] == pytest.approx((0.5 + 3 * (0.5 + comm_full)) / 4)
    assert r["total_s"]["fedavg_full"] == pytest.approx(0.5 + 3 * (0.5 + comm_full) + comm_full)
    nbytes = LAYER_PARAMS * 4
    t_up, t_down = 0.010 + nbytes * 8 / 8e6, 0.010 + nbytes * 8 / 16e6
    turn = 0.2 + t_up + 0.05
    # 2 clients over blocks 0,1,2,3: rounds 1..3 each download the block the other just trained
    assert r["mean_round_s"]["cyclic"] == pytest.approx((4 * turn + 3 * t_down) / 4)
    assert r["total_s"]["cyclic"] == pytest.approx(4 * turn + 3 * t_down + t_down)
    # 3 clients: round 2's client lacks blocks 0 and 1, round 3's blocks 1 and 2 (its own block
    # 0 it took with its turn); after round 3 client 2 lacks blocks 2 and 3
    three = cfg.replace(federation={"clients": 3})
    r3 = estimate(three, EstimateSettings(compute_s=0.2, aggregate_s=0.05, full_compute_s=0.5))
    assert r3["mean_round_s"]["cyclic"] == pytest.approx((4 * turn + 5 * t_down) / 4)
    assert r3["total_s"]["cyclic"] == pytest.approx(4 * turn + 5 * t_down + 2 * t_down)
    # without a full-training time: an assumed multiple of the block's
    assumed = estimate(cfg, EstimateSettings(compute_s=0.2))
    assert assumed["full_compute_s"] == pytest.approx(0.6)
    assert assumed["full_compute_source"] == "assumed 3 x T_comp"


def test_no_crossover_when_latency_alone_exceeds_compute(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, str(tmp_path), link={"latency_ms": 200.0})
    r = estimate(cfg, EstimateSettings(compute_s=0.3))
    assert r["crossover_mbps"] is None


def test_estimate_loader_and_errors(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown config key estimate.bogus"):
        load(None, ["estimate.bogus=1"])
    with pytest.raises(ConfigError, match="estimate.dtype='int8' is not allowed"):
        load(None, ["estimate.dtype=int8"])
    cfg, est = load(None, [f"model.name_or_path={tiny_model_dir}", "federation.local_steps=3"])
    with pytest.raises(EstimateError, match="no compute time"):
        estimate(cfg, est)
    cfg, est = load(None, [f"model.name_or_path={tiny_model_dir}", "estimate.step_s=0.5"])
    assert estimate(cfg, est)["compute_s"] == 0.5 * cfg.federation.local_steps
    assert main(["estimate", "--set", "model.name_or_path=arch:gpt-9"]) == 2
    err = capsys.readouterr().err
    assert "unknown architecture" in err and err.count("\n") == 1


def test_measure_times_the_local_step(tiny_model_dir, capsys):
    args = ["estimate", "--measure", "--json", "--set", f"model.name_or_path={tiny_model_dir}"]
    assert main(args + ["--set", "data.max_length=64", "--set", "federation.batch_size=2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["compute_source"] == "measured here" and 0 < r["compute_s"] < 10
    assert r["full_compute_source"] == "measured here" and 0 < r["full_compute_s"] < 10


def test_from_run_predicts_from_the_runs_own_numbers(tiny_model_dir, tmp_path, capsys):
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path / "run"),
        federation={"rounds": 3, "algorithm": "fedbcd"},
        link={"up_mbps": 20.0, "down_mbps": 40.0, "latency_ms": 5.0},
    )
    summary = run(cfg)
    (row,) = from_run(tmp_path / "run")
    rounds = [
        json.loads(x)
        for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"kind": "round"' in x
    ]
    agg = sum(r["aggregate_s"] for r in rounds) / len(rounds)
    nbytes = LAYER_PARAMS * 4
    comm = 0.005 + nbytes * 8 / 20e6 + agg + 0.005 + nbytes * 8 / 40e6
    c = summary["mean_compute_s"]
    assert row["predicted_mean_round_s"] == pytest.approx((c + 2 * (c + comm)) / 3)
    assert row["measured_mean_round_s"] == summary["mean_round_s"]
    # the algorithms over the same blocks (fedavg_full's whole-model rounds are not comparable)
    assert set(row["predicted_by_algorithm"]) == {"cyclic", "fedbcd", "parablock"}
    # the payload is the block's fp32 tensors plus a small safetensors header
    assert nbytes < row["measured_upload_bytes"] < nbytes * 1.02
    assert main(["estimate", "--from-run", str(tmp_path / "run")]) == 0
    assert "predicted" in capsys.readouterr().out
