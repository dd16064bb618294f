"""The run directory: one run at a time, no mixed runs, resume settings, private checkpoints,
metrics written as the run goes, one-line errors for unusable directories and checkpoints."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import slow_run_sets, tiny_config
from parablock.backends import BACKENDS
from parablock.cli import main
from parablock.core.checkpoint import CheckpointError, CheckpointStore
from parablock.errors import ConfigError, RunDirError
from parablock.run.runner import RunInterrupted, run
from parablock.tools.report import load_run


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _complete_rows(path: Path) -> list[dict]:
    """The rows of a file being written: a last line without its newline is not there yet."""
    if not path.is_file():
        return []
    text = path.read_text()
    return [json.loads(x) for x in text[: text.rfind("\n") + 1].splitlines()]


def _client_keys(out: Path) -> list[tuple]:
    rows = _rows(out / "metrics.jsonl")
    return [(r["client"], r["round"]) for r in rows if r["kind"] == "client_round"]


def _interrupt(cfg, after_round: int, match: str = "resume with") -> None:
    """Stop the run once client 0 has passed barrier ``after_round``."""
    stop = threading.Event()

    def hook(client, t):
        if client.id == 0 and t == after_round:
            stop.set()

    with pytest.raises(RunInterrupted, match=match):
        run(cfg, on_barrier=hook, stop=stop)


def _model(out: Path) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# -- 1, 2: one run per directory -------------------------------------------------------------
def test_a_second_run_into_a_running_runs_directory_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, str(out), federation={"rounds": 3})
    inside, go = threading.Event(), threading.Event()
    result: dict = {}

    def hold(client, t):
        if t == 0:
            inside.set()
            go.wait(120)

    def first():
        try:
            result["summary"] = run(cfg, on_barrier=hold)
        except BaseException as e:  # reported by the assertions below
            result["error"] = e

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert inside.wait(120)
        with pytest.raises(RunDirError, match=f"{out} is in use by another run"):
            run(cfg)
    finally:
        go.set()
        thread.join(120)
    assert "error" not in result and result["summary"]["rounds"] == 3
    with open(out / "lock") as f:  # released at the end
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_fresh_run_into_an_interrupted_runs_directory_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, str(out))
    _interrupt(cfg, after_round=1)
    before = sorted(p.name for p in (out / "checkpoint").iterdir())
    with pytest.raises(RunDirError, match=f"--resume {out}, or choose another run.out"):
        run(cfg)
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == before


# -- 3: resume settings ----------------------------------------------------------------------
def test_resume_refuses_changes_to_the_training_in_one_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, str(out), federation={"rounds": 6, "round_timeout_s": 20.0})
    _interrupt(cfg, after_round=4)
    config = (out / "config.toml").read_text()
    args = ["run", "--resume", str(out), "--set"]
    assert main([*args, "federation.lr=0.01", "--set", "data.train_size=16"]) == 2
    line = _error_line(capsys)
    assert "federation.lr 0.001 -> 0.01" in line and "data.train_size 32 -> 16" in line
    started = time.monotonic()
    assert main([*args, "federation.rounds=3"]) == 2  # it used to wait for round_timeout_s
    assert time.monotonic() - started < 20
    line = _error_line(capsys)
    assert "federation.rounds=3" in line and "already finished" in line
    assert (out / "config.toml").read_text() == config
    assert not (out / "summary.json").exists()


def test_resume_accepts_and_records_settings_that_do_not_change_results(
    tiny_model_dir, tmp_path, caplog
):
    fed = {"rounds": 6}
    run(tiny_config(tiny_model_dir, str(tmp_path / "full"), federation=fed))
    out = tmp_path / "cut"
    _interrupt(tiny_config(tiny_model_dir, str(out), federation={"rounds": 4}), after_round=1)
    # a longer run (the finished rounds keep their blocks) on a different link, fewer threads
    args = ["run", "--resume", str(out), "--set", "federation.rounds=6"]
    assert main([*args, "--set", "link.latency_ms=1", "--set", "run.threads=2"]) == 0
    saved = (out / "config.toml").read_text()
    assert "rounds = 6" in saved and "latency_ms = 1.0" in saved and "threads = 2" in saved
    assert "resume: link.latency_ms changed from 5.0 to 1.0" in caplog.text
    a, b = _model(tmp_path / "full"), _model(out)
    assert all(torch.equal(a[n], b[n]) for n in a)  # the same as a 6-round run from the start
    assert json.loads((out / "summary.json").read_text())["rounds"] == 6


def test_more_rounds_must_keep_the_blocks_of_the_finished_rounds(monkeypatch, tmp_path):
    from parablock.run import rundir
    from parablock.run.rundir import check_rounds

    saved = tiny_config("m", str(tmp_path), federation={"rounds": 4})
    longer = tiny_config("m", str(tmp_path), federation={"rounds": 8})
    check_rounds(saved, longer, [0, 1, 2, 3], 3, tmp_path)  # cyclic: same first rounds
    monkeypatch.setattr(rundir, "make_plan", lambda name, blocks, n, seed: list(range(n))[::-1])
    with pytest.raises(ConfigError, match="changes the blocks of the 3 round"):
        check_rounds(saved, longer, [0, 1, 2, 3], 3, tmp_path)


def test_optimizer_state_and_schedule_scope_change_results_on_resume():
    """Both change what a run computes (the moments each step starts from, the lr of each
    step): a resume may not change them; only the keys ``RESUME_FREE`` lists are free."""
    from parablock.run.rundir import _free

    assert not _free("federation.optimizer_state")
    assert not _free("federation.lr_schedule_scope")


# -- 4: private checkpoints ------------------------------------------------------------------
def test_checkpoint_files_are_readable_by_their_owner_only(tiny_model_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        _interrupt(tiny_config(tiny_model_dir, str(out)), after_round=1)
    finally:
        os.umask(old)
    ckpt = out / "checkpoint"
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o700
    clients = list(ckpt.glob("client*.st"))
    assert clients
    for p in ckpt.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


# -- 5: no resume without checkpoints --------------------------------------------------------
def test_a_stop_without_checkpoints_does_not_advertise_a_resume(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, str(tmp_path / "run"), run={"checkpoint": False})
    _interrupt(cfg, after_round=1, match="cannot be resumed: it ran with run.checkpoint=false")


def test_sigterm_without_checkpoints_says_the_run_cannot_be_resumed(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    sets = [*slow_run_sets(tiny_model_dir, out), "run.checkpoint=false"]
    args = [sys.executable, "-m", "parablock.cli", "run", "--quiet"]
    args += [x for s in sets for x in ("--set", s)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stdout:  # --quiet: one line per round on stdout
        if line.startswith("round 2/"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "cannot be resumed" in err and "--resume" not in err and "Traceback" not in err


# -- 6: metrics and timeline as the run goes -------------------------------------------------
def test_metrics_and_timeline_grow_while_the_run_runs(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    seen: dict = {}

    def watch(client, t):
        if client.id != 0 or t != 3:
            return
        deadline = time.time() + 30  # the writer thread is a little behind the barrier
        while time.time() < deadline:
            rows = _complete_rows(out / "metrics.jsonl")
            done = {(r["client"], r["round"]) for r in rows if r["kind"] == "client_round"}
            rounds = {r["round"] for r in rows if r["kind"] == "round"}
            if {(0, 0), (1, 0), (0, 1), (1, 1)} <= done and 0 in rounds:
                break
            time.sleep(0.05)
        seen["rows"] = rows
        seen["spans"] = _complete_rows(out / "timeline.jsonl")

    run(tiny_config(tiny_model_dir, str(out), federation={"rounds": 5}), on_barrier=watch)
    kinds = [r["kind"] for r in seen["rows"]]
    assert kinds[0] == "eval" and "round" in kinds
    done = {(r["client"], r["round"]) for r in seen["rows"] if r["kind"] == "client_round"}
    assert {(0, 0), (1, 0), (0, 1), (1, 1)} <= done
    assert {s["round"] for s in seen["spans"]} >= {0, 1}
    # the finished files hold every row once, and the readers see what the summary says
    keys = _client_keys(out)
    assert len(keys) == len(set(keys)) == 2 * 6  # 5 rounds and the drain
    rows = _rows(out / "metrics.jsonl")
    assert sorted(r["round"] for r in rows if r["kind"] == "round") == list(range(5))
    assert [r["round"] for r in rows if r["kind"] == "eval"] == [-1, 4]
    run_data = load_run(out)
    assert len(run_data.client_rounds) == 12 and len(run_data.rounds) == 5


def test_a_resume_appends_to_the_files_and_writes_each_round_once(tiny_model_dir, tmp_path):
    fed = {"rounds": 6}
    run(tiny_config(tiny_model_dir, str(tmp_path / "full"), federation=fed))
    out = tmp_path / "cut"
    cfg = tiny_config(tiny_model_dir, str(out), federation=fed)
    _interrupt(cfg, after_round=3)
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    last = max(r["round"] for r in map(json.loads, lines) if r["kind"] == "client_round")
    # a hard kill: the last round's rows never reached the file (the checkpoint has them) and
    # a row was cut half-way
    kept = [x for x in lines if not ('"client_round"' in x and f'"round": {last},' in x)]
    metrics.write_text("".join(kept) + '{"kind": "client_round", "clie')
    before = "".join(kept)
    timeline = (out / "timeline.jsonl").read_text()
    run(cfg, resume=True)
    after = metrics.read_text()
    assert after.startswith(before) and (out / "timeline.jsonl").read_text().startswith(timeline)
    keys = _client_keys(out)
    assert sorted(keys) == sorted(_client_keys(tmp_path / "full"))  # each once, none lost
    rows = _rows(metrics)
    rounds = [r["round"] for r in rows if r["kind"] == "round"]
    assert sorted(rounds) == list(range(6))
    assert [r["round"] for r in rows if r["kind"] == "eval"][0] == -1
    spans = _rows(out / "timeline.jsonl")
    spans_key = [(s["client"], s["round"], s["phase"]) for s in spans]
    assert len(spans_key) == len(set(spans_key))


def test_readers_keep_the_last_row_of_a_round_written_twice(tiny_model_dir, tmp_path):
    from parablock.tools.report import latest_rows

    out = tmp_path / "run"
    run(tiny_config(tiny_model_dir, str(out), federation={"rounds": 3}))
    rows = _rows(out / "metrics.jsonl")
    again = dict(next(r for r in rows if r["kind"] == "client_round" and r["round"] == 1))
    again["train_loss"] = 123.0  # as when a round re-runs after a hard kill and a resume
    spans = _rows(out / "timeline.jsonl")
    span = dict(spans[0], end=spans[0]["end"] + 1.0)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(again) + "\n")
    with open(out / "timeline.jsonl", "a") as f:
        f.write(json.dumps(span) + "\n")
    data = load_run(out)
    same = [r for r in data.client_rounds if (r["client"], r["round"]) == (again["client"], 1)]
    assert [r["train_loss"] for r in same] == [123.0]
    assert len(data.client_rounds) == 2 * 4 and len(data.spans) == len(spans)
    assert span in data.spans
    assert latest_rows([{"kind": "eval", "round": 2, "x": 1}, {"kind": "eval", "round": 2}]) == [
        {"kind": "eval", "round": 2}
    ]


# -- 7: unusable checkpoints and directories -------------------------------------------------
def test_a_corrupt_run_json_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    _interrupt(tiny_config(tiny_model_dir, str(out)), after_round=1)
    run_json = out / "checkpoint" / "run.json"
    run_json.write_text('{"started_at": 17')
    assert main(["run", "--resume", str(out)]) == 2
    line = _error_line(capsys)
    assert str(run_json) in line and "corrupt" in line
    with pytest.raises(CheckpointError, match="run.json is corrupt"):
        CheckpointStore(out / "checkpoint").load(2, [0, 1, 2, 3])
    run_json.write_text("[]")
    assert main(["run", "--resume", str(out)]) == 2
    assert str(run_json) in _error_line(capsys)


@pytest.mark.parametrize("where", ["file", "under_file", "not_writable"])
def test_an_unusable_run_out_is_a_one_line_error(tmp_path, capsys, monkeypatch, where):
    plain = tmp_path / "plain"
    plain.write_text("not a directory")
    out = {"file": plain, "under_file": plain / "run", "not_writable": tmp_path / "ro"}[where]
    message = {"file": "is a file", "under_file": f"is under {plain}", "not_writable": "not writ"}
    if where == "not_writable":  # root may write anywhere: ask the check itself
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == out else real(p, m))
    assert main(["run", "--set", f"run.out={out}", "--set", "model.name_or_path=/none"]) == 2
    line = _error_line(capsys)
    assert str(out) in line and message[where] in line


# -- 9a: update totals over the whole run ----------------------------------------------------
def test_update_totals_cover_the_whole_run_after_a_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, str(out))
    stop = threading.Event()

    def hook(client, t):
        if client.id == 0 and t == 0:  # one bad upload before the interruption (from a
            # client id that is not in the run, so no client forfeits its round)
            client.connection.server.receive_update(b"not an update", 2)
        if client.id == 0 and t == 2:
            stop.set()

    with pytest.raises(RunInterrupted):
        run(cfg, on_barrier=hook, stop=stop)
    summary = run(cfg, resume=True)
    assert summary["updates_accepted"] == 2 * 4  # every client's update of every round
    assert summary["updates_rejected"] == 1


# -- 9b: round lines from any client ---------------------------------------------------------
def test_round_lines_go_on_when_client_0_is_not_heard(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    """As with a dropped Ray client: the driver hears nothing more from client 0."""
    from parablock.backends.local import run_local

    def deaf_to_0(specs, server, *, on_barrier=None, address="", **kwargs):
        def hear(client, t):
            if client.id != 0:
                on_barrier(client, t)

        return run_local(specs, server, on_barrier=hear, **kwargs)

    monkeypatch.setitem(BACKENDS._items, "deaf0", deaf_to_0)
    cfg = tiny_config(tiny_model_dir, str(tmp_path / "run"), run={"backend": "deaf0"})
    with caplog.at_level(logging.INFO, logger="parablock.run.loop"):
        run(cfg)
    lines = [m for m in caplog.messages if m.startswith(("round ", "drain:"))]
    assert [m.split(" block")[0] for m in lines[:4]] == [f"round {i}/4" for i in range(1, 5)]
    assert lines[4].startswith("drain:") and len(lines) == 5
