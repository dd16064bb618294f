"""Checkpoints and resume: an interrupted run resumed ends exactly like an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import slow_run_sets, tiny_config
from parablock.core.checkpoint import CheckpointError, CheckpointStore
from parablock.run.runner import RunInterrupted, run


def _model(out: Path) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _metrics(out: Path) -> list[tuple]:
    rows = _rows(out)
    keys = ("client", "round", "block", "train_loss", "examples", "bytes_up", "bytes_down", "drain")
    return sorted(tuple(r[k] for k in keys) for r in rows if r["kind"] == "client_round")


def _interrupt(cfg, after_round: int) -> None:
    stop = threading.Event()

    def hook(client, t):
        if client.id == 0 and t == after_round:
            stop.set()

    with pytest.raises(RunInterrupted, match="resume with: parablock run --resume"):
        run(cfg, on_barrier=hook, stop=stop)


@pytest.mark.parametrize(
    "algorithm,compression,blocks",
    [
        ("parablock", "none", "all"),
        ("fedbcd", "none", "all"),
        ("parablock", "int8", "all"),
        ("fedit_lora", "none", "all"),
        ("fedavg_full", "none", "all"),
        # the bottom layers never train: the prefix cache holds their output, and the resumed
        # run must compute exactly what the cut run had cached
        ("parablock", "none", "top:2"),
    ],
)
def test_resume_ends_exactly_like_an_uninterrupted_run(
    tiny_model_dir, tmp_path, algorithm, compression, blocks
):
    fed = {"algorithm": algorithm, "rounds": 6}
    ev = {"every": 1, "accuracy_size": 0}
    link = {"compression": compression}  # int8: residuals and bases must be checkpointed too
    kw = {"federation": fed, "eval": ev, "link": link, "model": {"blocks": blocks}}
    full = run(tiny_config(tiny_model_dir, str(tmp_path / "full"), **kw))
    cfg = tiny_config(tiny_model_dir, str(tmp_path / "cut"), **kw)
    _interrupt(cfg, after_round=2)
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = run(cfg, resume=True)
    a, b = _model(tmp_path / "full"), _model(tmp_path / "cut")
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "cut")
    assert resumed["final_eval_loss"] == full["final_eval_loss"]
    assert resumed["initial_eval_loss"] == full["initial_eval_loss"]
    # evaluations after the resume point replay from the checkpoint's global model
    evals = {
        name: {r["round"]: r["eval_loss"] for r in _rows(tmp_path / name) if r["kind"] == "eval"}
        for name in ("full", "cut")
    }
    assert set(evals["full"]) == set(range(-1, 6))
    assert {-1, 3, 4, 5} <= set(evals["cut"])
    assert all(evals["cut"][t] == evals["full"][t] for t in evals["cut"])


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_good_one(
    tiny_model_dir, tmp_path, caplog
):
    full = run(tiny_config(tiny_model_dir, str(tmp_path / "full")))
    cfg = tiny_config(tiny_model_dir, str(tmp_path / "cut"))
    _interrupt(cfg, after_round=2)
    ckpt = tmp_path / "cut" / "checkpoint"
    newest = max(ckpt.glob("client0.r*.st"), key=lambda p: int(p.name.split(".r")[1][:-3]))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated, as by a crash mid-write
    resumed = run(cfg, resume=True)
    assert f"checkpoint file {newest} is unusable" in caplog.text
    assert resumed["final_eval_loss"] == full["final_eval_loss"]
    a, b = _model(tmp_path / "full"), _model(tmp_path / "cut")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_no_usable_checkpoint_is_a_clear_error(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, str(tmp_path / "cut"))
    _interrupt(cfg, after_round=1)
    ckpt = tmp_path / "cut" / "checkpoint"
    for p in ckpt.glob("client1.r*.st"):
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no round for which every client"):
        CheckpointStore(ckpt).load(2, [0, 1, 2, 3])


def _past_round(ckpt, r: int) -> bool:
    return any(int(p.name.split(".r")[1][:-3]) >= r for p in ckpt.glob("client1.r*.st"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_signal_then_cli_resume_finishes(tiny_model_dir, tmp_path, sig):
    """SIGTERM saves and exits cleanly (130); SIGKILL loses at most the round in progress."""
    out = tmp_path / "run"
    sets = slow_run_sets(tiny_model_dir, out)
    args = [sys.executable, "-m", "parablock.cli", "run"] + [x for s in sets for x in ("--set", s)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    # any round >= 2: older client checkpoints are pruned, so a slow poll can miss "r2" itself
    while not _past_round(out / "checkpoint", 2) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be signalled"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 130, err
        assert "resume with: parablock run --resume" in err and "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    done = subprocess.run(
        [sys.executable, "-m", "parablock.cli", "run", "--resume", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = {r["round"] for r in rows if r["kind"] == "client_round" and not r["drain"]}
    assert rounds == set(range(30))
    assert json.loads((out / "summary.json").read_text())["rounds"] == 30


def test_resume_without_checkpoint_exits_2(tmp_path, capsys):
    from parablock.cli import main

    (tmp_path / "config.toml").write_text("[federation]\nrounds = 2\n")
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "holds no checkpoint to resume from" in capsys.readouterr().err
