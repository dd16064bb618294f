"""benchmarks/tune.py's ParaBlock-against-FedBCD comparison over seeds (``--gap``), on the tiny
random Llama (``--quick``): each seed runs a point and its FedBCD twin for real, and the table's
gaps and mean are the ones the saved final losses give."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import tempfile
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def tune():
    sys.path.insert(0, str(BENCHMARKS))  # tune.py imports its sibling ray_overhead
    try:
        spec = importlib.util.spec_from_file_location("tune_bench", BENCHMARKS / "tune.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def main(tune, monkeypatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["tune.py", *argv])
    return tune.main()


def test_gap_over_seeds_reads_each_seeds_point_and_its_fedbcd_twin(
    tune, tmp_path, monkeypatch, capsys
):
    # tune.py keeps its run directories for inspection (in the temp dir): here under tmp_path
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "work"))
    (tmp_path / "work").mkdir()
    dirs = [str(tmp_path / f"seed{s}") for s in (0, 1)]
    for seed, out in zip((0, 1), dirs, strict=True):
        args = [
            "--quick",
            "--rounds",
            "2",
            "--eval-every",
            "0",
            "--train-size",
            "8",
            "--eval-size",
            "4",
        ]
        assert (
            main(
                tune,
                monkeypatch,
                *args,
                "--points",
                "default,fedbcd-default",
                "--seed",
                str(seed),
                "--out",
                out,
            )
            == 0
        )
    capsys.readouterr()
    assert main(tune, monkeypatch, "--gap", "default", *dirs) == 0
    table = capsys.readouterr().out
    gaps = []
    for d in dirs:
        saved = json.loads((Path(d) / "points.json").read_text())
        assert saved["default"]["algorithm"] == "parablock"
        assert saved["fedbcd-default"]["algorithm"] == "fedbcd"
        pb, fb = saved["default"]["final"], saved["fedbcd-default"]["final"]
        gaps.append(pb / fb - 1)
        assert f"| {d} | " in table and f"{pb:.4f} | {fb:.4f} | {gaps[-1]:+.1%} |" in table
    finals = [json.loads((Path(d) / "points.json").read_text())["default"]["final"] for d in dirs]
    assert finals[0] != finals[1]  # --seed reached the runs: each seed its own data and training
    mean = re.search(r"mean gap over 2 seeds ([-+][0-9.]+)%", table)
    assert mean and float(mean.group(1)) == pytest.approx(100 * sum(gaps) / 2, abs=0.006)
    assert "95% interval [" in table
    # --against: any saved point as the reference, here the other way round
    assert main(tune, monkeypatch, "--gap", "fedbcd-default", "--against", "default", *dirs) == 0
    table = capsys.readouterr().out
    for g in gaps:
        assert f"{1 / (1 + g) - 1:+.1%} |" in table
    assert list((tmp_path / "work").glob("parablock-tune-*"))  # the runs' work went there

    # a point the directory does not hold, or a directory with no points.json: one line, exit 2
    assert main(tune, monkeypatch, "--gap", "default", "--against", "lora", *dirs) == 2
    said = capsys.readouterr().out
    assert said.count("\n") == 1 and "points.json: no point lora; it has: default" in said
    assert main(tune, monkeypatch, "--gap", "default", dirs[0], str(tmp_path / "none")) == 2
    said = capsys.readouterr().out
    assert said.count("\n") == 1 and "none/points.json: no such file" in said
    assert "| run |" not in said  # nothing printed before the check


def test_gap_refuses_directories_without_gap(tune, monkeypatch, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(tune, monkeypatch, str(tmp_path))
    assert stop.value.code == 2
    assert main(tune, monkeypatch, "--gap", "default") == 2  # and --gap with none
