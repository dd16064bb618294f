"""Watching a run: TensorBoard event files, `parablock status`, the end-of-run table, the
rejection reasons the server counts (the Prometheus endpoint's networked test is in
test_observe_network.py)."""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import make_model, tiny_config
from parablock.cli import main
from parablock.config import ConfigError
from parablock.core.server import Server
from parablock.errors import RunInterrupted
from parablock.model.blocks import block_state, model_blocks
from parablock.run.runner import run
from parablock.tools.status import format_status, status, summary_table
from parablock.wire.messages import BlockUpdate

DOCS = Path(__file__).resolve().parents[1] / "docs" / "observability.md"


def documented(section: str, pattern: str) -> set[str]:
    """The names in the first column of the table under ``## <section>`` in the docs page."""
    text = DOCS.read_text()
    part = text[text.index(f"## {section}") :]
    part = part[: part.index("\n## ", 1)]
    return set(re.findall(pattern, part, flags=re.M))


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def rows(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def test_event_files_hold_the_documented_tags_and_the_metrics_values(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    cfg = tiny_config(
        tiny_model_dir,
        str(out),
        federation={"rounds": 3, "aggregator": "mean"},
        privacy={"mode": "client", "noise_multiplier": 1.5, "clip_norm": 0.05},
        eval={"every": 1, "accuracy_size": 2, "max_new_tokens": 4},
        run={"tensorboard": True},
    )
    summary = run(cfg)
    assert summary["tensorboard_dir"] == str(out / "tb")
    got = scalars(out / "tb")
    # every tag is documented; each documented tag is here (record mode's epsilon aside)
    tags = documented("TensorBoard", r"^\| `([a-z_/]+(?:<c>)?)` \|")
    named = {re.sub(r"client_\d+$", "client_<c>", t) for t in got}
    assert named <= tags
    assert tags - named == {"epsilon/client_<c>"}
    # the held-out evaluations: base at step 0, then after each round
    evals = rows(out, "eval")
    assert got["eval/loss"] == [(e["round"] + 1, pytest.approx(e["eval_loss"])) for e in evals]
    assert [s for s, _ in got["eval/accuracy"]] == [0, 1, 2, 3]
    # each client's round at step round + 1 (the drain at T + 1), as metrics.jsonl has it
    for c in (0, 1):
        mine = [r for r in rows(out, "client_round") if r["client"] == c]
        want = [(r["round"] + 1, pytest.approx(r["wait_s"])) for r in mine]
        assert got[f"wait_s/client_{c}"] == want
        trained = [(r["round"] + 1, pytest.approx(r["train_loss"])) for r in mine if not r["drain"]]
        assert got[f"train_loss/client_{c}"] == trained
        assert [s for s, _ in got[f"bytes_up/client_{c}"]] == [1, 2, 3, 4]
    rounds = rows(out, "round")
    assert got["round/seconds"] == [(r["round"] + 1, pytest.approx(r["round_s"])) for r in rounds]
    assert [v for _, v in got["round/updates_accepted"]] == [2.0, 2.0, 2.0]
    assert [v for _, v in got["round/updates_rejected"]] == [0.0, 0.0, 0.0]
    eps = [v for _, v in got["privacy/epsilon"]]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(summary["privacy_epsilon"])
    ups = {s: v for s, v in got["round/bytes_up"]}
    for t in range(3):  # a round's bytes: its clients' rows summed
        want = sum(r["bytes_up"] for r in rows(out, "client_round") if r["round"] == t)
        assert ups[t + 1] == want


def test_tensorboard_settings_are_checked_and_may_change_on_resume(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="run.tensorboard_dir is set but run.tensorboard"):
        tiny_config(tiny_model_dir, str(tmp_path), run={"tensorboard_dir": str(tmp_path / "x")})
    from parablock.run.rundir import RESUME_FREE

    assert {"run.tensorboard", "run.tensorboard_dir"} <= set(RESUME_FREE)


def _wait_for(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_status_of_a_running_a_stopped_and_a_finished_run(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "r"

    def cfg():
        return tiny_config(
            tiny_model_dir,
            str(out),
            federation={"rounds": 6},
            eval={"accuracy_size": 0},
            run={"tensorboard": True},
        )

    stop = threading.Event()
    seen: dict = {}

    def watch(client, t):
        if client.id == 0 and t == 3 and not seen:
            # rounds 0 and 1 are committed by now (client 0 had round 1's aggregate)
            seen.update(_wait_for(lambda: (s := status(out))["rounds_done"] >= 2 and s))
            seen["text"] = format_status(seen)
            stop.set()

    with pytest.raises(RunInterrupted):
        run(cfg(), on_barrier=watch, stop=stop)
    # while it ran: this process held the lock
    assert seen["state"] == "running" and seen["pid"] == os.getpid()
    assert seen["rounds"] == 6 and seen["clients"] == 2
    assert set(seen["clients_seen"]) == {"0", "1"}
    assert all(math.isfinite(c["train_loss"]) for c in seen["clients_seen"].values())
    assert seen["time_left_s"] > 0 and seen["mean_round_s"] > 0
    assert seen["evals"][0]["round"] == -1  # the base model, written at the start
    assert seen["updates_rejected"] == 0 and seen["clients_dropped"] == []
    assert "written at the end" in seen["model"]
    assert f"running (pid {os.getpid()})" in seen["text"] and "time left about" in seen["text"]
    assert "tensorboard --logdir" in seen["text"]
    # stopped: nobody holds the lock, no summary; the checkpoint resumes it
    stopped = status(out)
    assert stopped["state"] == "stopped" and stopped["checkpoint_round"] >= 2
    assert "resume to finish it" in stopped["model"]
    run(cfg(), resume=True)
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{out}: finished; parablock on local, 2 clients")
    assert "6 of 6 done, drained" in text and str(out / "model") in text
    assert main(["status", "--json", str(out)]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["state"] == "finished" and done["time_left_s"] == 0
    assert done["updates_accepted"] == 12 and done["evals"][-1]["round"] == 5
    # a compare-like directory: each run in it; not a run directory: one line, exit 2
    assert main(["status", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: finished")
    assert main(["status", str(tmp_path / "nothing")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    # the resume purged the steps it ran again: each step once in the event files
    steps = [s for s, _ in scalars(out / "tb")["train_loss/client_0"]]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_the_end_of_run_table_says_what_ran_how_long_quality_bytes_and_where():
    base = {
        "algorithm": "parablock",
        "backend": "local",
        "clients": 2,
        "rounds": 4,
        "mean_round_s": 1.5,
        "wall_time_s": 75.0,
        "initial_eval_loss": 2.5,
        "final_eval_loss": 2.25,
        "initial_eval_accuracy": None,
        "final_eval_accuracy": None,
        "bytes_up": 2_500_000,
        "bytes_down": 5_000_000,
        "updates_accepted": 8,
        "updates_rejected": 1,
        "clients_dropped": [],
        "run_dir": "runs/a",
        "privacy_mode": "none",
        "tensorboard_dir": None,
    }
    text = summary_table({"run": base}, "done:")
    assert text.splitlines() == [
        "done:",
        "  ran            parablock on local, 2 clients",
        "  rounds         4, mean 1.50s",
        "  wall time      1:15",
        "  held-out loss  2.5000 -> 2.2500",
        "  bytes up/down  2.5 MB / 5.0 MB",
        "  updates        8 accepted, 1 rejected",
        "  files          runs/a",
    ]
    other = {**base, "algorithm": "fedbcd", "run_dir": "runs/b", "final_eval_accuracy": 0.5}
    other.update(initial_eval_accuracy=0.0, initial_eval_accuracy_ci=[0.0, 0.0566])
    other.update(final_eval_accuracy_ci=[0.381, 0.619])
    other.update(privacy_mode="client", privacy_epsilon=3.25, privacy_delta=1e-5)
    text = summary_table({"parablock": base, "fedbcd": other}, "done:")
    lines = text.splitlines()
    assert lines[1].split() == ["parablock", "fedbcd"]
    assert "runs/a" in lines[-1] and "runs/b" in lines[-1]
    assert any(x.split()[:1] == ["epsilon"] and "3.25 (delta 1e-05)" in x for x in lines)
    (acc,) = [x for x in lines if x.split()[:1] == ["accuracy"]]
    assert acc.split("  ")[-1] == "0.000 (95% CI 0.000-0.057) -> 0.500 (95% CI 0.381-0.619)"
    assert acc.split()[1] == "-"  # parablock's column: no accuracy


def test_rejected_updates_are_counted_by_reason_and_by_round():
    model = make_model(64, layers=2)
    blocks = model_blocks(model)
    server = Server(model, blocks, [0, 1], clients=2)
    delta = {n: torch.zeros_like(t) for n, t in block_state(model, blocks[0]).items()}
    bad = dict(delta)
    name = next(iter(bad))
    bad[name] = torch.zeros(3)  # not the parameter's shape
    assert not server.submit(BlockUpdate(0, 0, 0, -1, 4, 1.0, bad), 0)[0]
    assert not server.submit(BlockUpdate(1, 0, 0, -1, 4, 1.0, delta), 0)[0]  # claims client 1
    later = {n: torch.zeros_like(t) for n, t in block_state(model, blocks[1]).items()}
    assert not server.submit(BlockUpdate(1, 1, 1, -1, 4, 1.0, later), 1)[0]  # round 1: future
    assert not server.receive_update(b"not an update", 1)[0]
    rejected = server.stats.rejected
    assert dict(rejected.by_kind) == {
        "shape": 1,
        "impersonation": 1,
        "future": 1,
        "malformed": 1,
    }
    assert dict(rejected.by_round) == {0: 3, 1: 1} and len(rejected) == 4
    snap = server.snapshot()
    assert snap["rejected"] == dict(rejected.by_kind) and snap["rounds_done"] == 0
