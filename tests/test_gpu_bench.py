"""benchmarks/gpu.py, the GPU check, run on the CPU with tiny shapes so that it cannot rot while
no GPU is at hand: every stage runs (step timing, links sized to the compute, ParaBlock and
FedBCD over them) and the table holds what the rows hold."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_benchmark_runs_on_the_cpu_with_tiny_shapes(gpu_bench, tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--tiny", "--out", str(tmp_path / "runs"), "--json", str(out)]
    assert gpu_bench.main(argv) == 0
    (row,) = json.loads(out.read_text())
    assert row["model"] == "arch:tiny-llama"
    assert len(row["step_s"]) == 2 and all(t > 0 for t in row["step_s"].values())
    assert row["step_peak_gb"] is None  # no GPU memory to report on the CPU
    # links sized so that one block's upload and download take a round's compute
    assert row["link_mbps"] == pytest.approx(16 * row["block_bytes"] / row["compute_s"] / 1e6)
    for algorithm in ("parablock", "fedbcd"):
        assert row[algorithm]["mean_round_s"] > 0 and row[algorithm]["peak_rss_mb"] > 0
        assert (tmp_path / "runs" / "arch-tiny-llama" / algorithm / "summary.json").is_file()
    assert row["speedup"] == pytest.approx(
        row["fedbcd"]["mean_round_s"] / row["parablock"]["mean_round_s"]
    )
    table = capsys.readouterr().out
    assert f"| arch:tiny-llama | {row['block_mb']:.1f} MB |" in table
    assert f"{row['speedup']:.2f}x" in table


def test_a_model_that_cannot_fit_is_skipped_with_its_reason(
    gpu_bench, monkeypatch, capsys, tmp_path
):
    monkeypatch.setattr(gpu_bench, "_host_available", lambda: 2**30)  # 1 GB of host memory
    # --out: else the script makes a work dir under /tmp that outlives the test
    argv = ["--device", "cpu", "--tiny", "--models", "arch:llama-3-8b", "--out", str(tmp_path)]
    assert gpu_bench.main(argv) == 0
    assert "| arch:llama-3-8b | skipped: host memory: needs ~90 GB" in capsys.readouterr().out


def test_the_gpu_benchmark_refuses_a_device_that_is_not_one(gpu_bench):
    from parablock.errors import ConfigError

    with pytest.raises(ConfigError, match="--device='gpu'"):
        gpu_bench.main(["--device", "gpu", "--tiny"])
