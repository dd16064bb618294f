"""``compare`` and ``report`` on the tiny model: table, plots, and the numbers behind them."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from conftest import tiny_config
from parablock.cli import main
from parablock.tools.compare import compare
from parablock.tools.progress import PlainProgress
from parablock.tools.report import PLOTS, eval_series, load_run, round_split

PNG = b"\x89PNG\r\n\x1a\n"
ROUNDS = 4
METHODS = ["parablock", "fedbcd", "fedavg_full", "cyclic"]


@pytest.fixture(scope="module")
def compared(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    cfg = tiny_config(tiny_model_dir, str(out), federation={"rounds": ROUNDS})
    streams = {}

    def hooks(sub):
        streams[sub.federation.algorithm] = io.StringIO()
        return PlainProgress(sub, streams[sub.federation.algorithm])

    result = compare(cfg, METHODS, hooks=hooks)
    return out, result, streams


def test_compare_writes_table_and_valid_plots(compared):
    out, result, _ = compared
    assert (out / "compare.md").is_file() and (out / "compare.json").is_file()
    for name in PLOTS:
        data = (out / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(result))


def test_compare_table_matches_each_runs_summary(compared):
    out, result, _ = compared
    rows = {r["algorithm"]: r for r in result["rows"]}
    assert set(rows) == set(METHODS)
    summaries = {a: json.loads((out / a / "summary.json").read_text()) for a in rows}
    for alg, s in summaries.items():
        assert s["algorithm"] == alg
        for key in (
            "wall_time_s",
            "mean_round_s",
            "mean_compute_s",
            "mean_comm_s",
            "ideal_speedup",
            "final_eval_loss",
            "final_eval_accuracy",
            "final_eval_accuracy_ci",
            "bytes_up",
            "bytes_down",
        ):
            assert rows[alg][key] == s[key], (alg, key)
    pb, fb = summaries["parablock"], summaries["fedbcd"]
    assert rows["parablock"]["speedup"] == pytest.approx(fb["mean_round_s"] / pb["mean_round_s"])
    assert rows["parablock"]["speedup_wall"] == pytest.approx(fb["wall_time_s"] / pb["wall_time_s"])
    assert rows["fedbcd"]["speedup"] == 1.0
    # identical data and links: both algorithms send the same bytes
    assert pb["bytes_up"] == fb["bytes_up"]
    md = (out / "compare.md").read_text()
    for alg in rows:
        line = next(x for x in md.splitlines() if x.startswith(f"| {alg} |"))
        assert f"{summaries[alg]['wall_time_s']:.2f}" in line
        assert f"{summaries[alg]['final_eval_loss']:.4f}" in line
        assert f"{summaries[alg]['bytes_up']:,}" in line
        low, high = summaries[alg]["final_eval_accuracy_ci"]
        assert f"| {low:.3f}-{high:.3f} |" in line
    assert "| accuracy 95% CI |" in md.splitlines()[0] + "|"


def test_plain_progress_prints_one_line_per_round(compared):
    _, _, streams = compared
    for alg, stream in streams.items():
        lines = stream.getvalue().splitlines()
        assert [x.split(" block")[0] for x in lines[:-1]] == [
            f"round {t}/{ROUNDS}" for t in range(1, ROUNDS + 1)
        ], alg
        assert lines[-1].startswith("drain:") and len(lines) == ROUNDS + 1


def test_round_split_stacks_to_the_clients_round_time(compared):
    out, _, _ = compared
    for alg in ("parablock", "fedbcd"):
        run = load_run(out / alg)
        split = round_split(run)
        assert split.rounds == list(range(ROUNDS))
        for i, t in enumerate(split.rounds):
            rows = [r for r in run.client_rounds if r["round"] == t and not r["drain"]]
            mean = sum(r["round_s"] for r in rows) / len(rows)
            total = split.compute[i] + split.comm[i] + split.idle[i]
            assert total == pytest.approx(mean, abs=1e-9)
    # FedBCD's computation thread waits for every transfer; round 0 has none
    fb = round_split(load_run(out / "fedbcd"))
    assert fb.comm[0] == 0 and all(c > 0 for c in fb.comm[1:])


def test_report_regenerates_plots_from_the_run_directory(compared, tmp_path, capsys):
    out, _, _ = compared
    run_dir = tmp_path / "run"
    shutil.copytree(out / "parablock", run_dir)
    shutil.rmtree(run_dir / "plots", ignore_errors=True)
    shutil.rmtree(run_dir / "model")  # the plots need the run's files only
    assert main(["report", str(run_dir)]) == 0
    for name in PLOTS:
        assert (run_dir / "plots" / name).read_bytes().startswith(PNG)
    assert "timeline.png" in capsys.readouterr().out


def test_eval_series_supports_periodic_eval_records(compared, tmp_path):
    out, _, _ = compared
    run_dir = tmp_path / "run"
    shutil.copytree(out / "fedbcd", run_dir)
    # before (round -1) and after the last round's aggregate (round T-1), with their times
    s = eval_series(load_run(run_dir))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["kind"] == "eval"][-1]
    assert final["round"] == ROUNDS - 1
    assert s.rounds == [0, ROUNDS] and s.times == [0.0, final["time_s"]]
    # periodic records: with time_s, and without it (derived from the timeline)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(
            json.dumps(
                {"kind": "eval", "round": 1, "time_s": 1.5, "eval_loss": 3.0, "eval_accuracy": 0.25}
            )
            + "\n"
        )
        f.write(
            json.dumps({"kind": "eval", "round": 2, "eval_loss": 2.0, "eval_accuracy": None}) + "\n"
        )
    run = load_run(run_dir)
    s = eval_series(run)
    ends = {}
    for span in run.spans:
        ends[span["round"]] = max(ends.get(span["round"], 0.0), span["end"])
    assert s.rounds == [0, 2, 3, ROUNDS]
    assert s.times[1] == 1.5 and s.times[2] == pytest.approx(ends[2])
    assert s.accuracies[1] == 0.25 and s.accuracies[2] is None
    assert main(["report", str(run_dir)]) == 0  # with an accuracy panel


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no run" in err and err.count("\n") == 1
    (tmp_path / "summary.json").write_text("{}")
    assert main(["report", str(tmp_path)]) == 2
    assert "config.toml is missing" in capsys.readouterr().err


def test_compare_rejects_unknown_algorithm(tiny_model_dir, tmp_path, capsys):
    args = ["compare", "--algorithms", "parablock,fedsgd", "--set", f"run.out={tmp_path}"]
    assert main(args) == 2
    assert "valid: cyclic, fedavg_full, fedbcd, fedit_lora, parablock" in capsys.readouterr().err


def _evals(run_dir) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sorted((r for r in rows if r["kind"] == "eval"), key=lambda r: r["round"])


def test_compare_rows_have_time_to_target_bytes_per_round_and_memory(compared):
    """Every method's row, with the wall time at which it first reached the target loss (by
    default the worst final loss, which every method reaches), checked against its eval rows."""
    out, result, _ = compared
    rows = {r["algorithm"]: r for r in result["rows"]}
    assert list(rows) == METHODS
    finals = {a: _evals(out / a)[-1]["eval_loss"] for a in METHODS}
    target = max(finals.values())
    assert result["target"] == {
        "loss": target,
        "source": "the worst of the methods' final losses",
    }
    for alg, row in rows.items():
        first = next(e for e in _evals(out / alg) if e["eval_loss"] <= target)
        assert row["time_to_target_s"] == (first["time_s"] if first["round"] >= 0 else 0.0)
        assert row["rounds_to_target"] == (0 if first["round"] < 0 else first["round"] + 1)
        s = json.loads((out / alg / "summary.json").read_text())
        assert row["bytes_per_round"] == (s["bytes_up"] + s["bytes_down"]) / ROUNDS
        assert row["peak_rss_mb_per_client"] == s["peak_rss_mb_per_client"] > 0
    worst = max(finals, key=finals.get)
    assert rows[worst]["rounds_to_target"] == ROUNDS  # it gets there with its final model
    # the costs the baselines stand for: the whole model travels; one client uploads per round
    assert rows["fedavg_full"]["bytes_per_round"] > 3 * rows["fedbcd"]["bytes_per_round"]
    assert rows["cyclic"]["bytes_up"] == pytest.approx(rows["fedbcd"]["bytes_up"] / 2, rel=1e-3)
    md = (out / "compare.md").read_text()
    assert "| time to target (s) |" in md and "peak MB/client" in md
    for alg in METHODS:
        line = next(x for x in md.splitlines() if x.startswith(f"| {alg} |"))
        assert f"{rows[alg]['time_to_target_s']:.2f}" in line
    assert f"held-out loss <= {target:.4f}" in md
    # eval.every=0 (compare() as called here): only before/after points, and the table says so
    assert any("eval.every=0" in n for n in result["notes"])


def test_cli_compare_evaluates_every_round_and_takes_a_target(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    sets = {
        "model.name_or_path": tiny_model_dir,
        "model.blocks": "all",
        "data.train_size": "16",
        "data.max_length": "320",
        "federation.rounds": "3",
        "federation.local_steps": "1",
        "federation.batch_size": "2",
        "link.up_mbps": "inf",
        "link.down_mbps": "inf",
        "eval.size": "4",
        "eval.accuracy_size": "0",
        "run.out": str(out),
        "run.threads": "1",
    }
    args = ["compare", "--quiet", "--algorithms", "fedbcd,cyclic", "--target-loss", "1e6"]
    assert main(args + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["target"] == {"loss": 1e6, "source": "given (--target-loss)"}
    for alg in ("fedbcd", "cyclic"):
        assert [e["round"] for e in _evals(out / alg)] == [-1, 0, 1, 2]  # eval.every=1
    # the base model is already below 1e6: reached at time 0, before any round
    assert all(r["time_to_target_s"] == 0.0 for r in result["rows"])
    assert not any("eval.every=0" in n for n in result["notes"])
    assert "time to target" in capsys.readouterr().out
    assert main(["compare", "--target-loss", "-1", "--set", f"run.out={tmp_path / 'x'}"]) == 2
