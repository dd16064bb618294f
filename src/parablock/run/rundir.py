"""The run directory: where a run may write, who holds it, and what a resume may change.

A run holds ``lock`` (flock) from start to end, so a second run into the same directory fails at
once instead of overwriting it; a fresh run never writes into an interrupted run's checkpoints; a
resume runs with the interrupted run's own ``config.toml`` and may change only what paces, places
or logs the run (``RESUME_FREE``) and ``federation.rounds`` (the finished rounds keep their
blocks, and no run-long cosine was laid over them); what it changes is recorded there. Every
other key, ``federation.optimizer_state`` and ``federation.lr_schedule_scope`` among them,
changes what the run computes and is refused.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from parablock.config import Config
from parablock.config import load as load_config
from parablock.core.checkpoint import read_run_info
from parablock.core.schedule import make_plan
from parablock.errors import ConfigError, RunDirError

log = logging.getLogger(__name__)


def run_dir(cfg: Config, resume: bool = False) -> Path:
    """``run.out``, made if need be; a path that cannot be a writable directory is a one-line
    RunDirError instead of a traceback from deep inside the run. What the directory holds is
    checked once the run holds its lock (``check_run_dir``); a finished run, which no other run
    can change, already here."""
    out = Path(cfg.run.out or f"runs/{cfg.federation.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_finished(out)
    if resume and not (out / "checkpoint" / "run.json").is_file():
        raise RunDirError(f"{out} holds no checkpoint to resume from")
    _make_dir(out)
    return out


def _check_finished(out: Path) -> None:
    if (out / "summary.json").exists():
        raise RunDirError(f"run.out={str(out)!r} already holds a finished run; choose another")


def check_run_dir(out: Path, resume: bool) -> None:
    """What a run may do in ``out``: never overwrite a finished run; a fresh run never writes
    into an interrupted run's checkpoints (a resume would then rebuild a model from both runs'
    files); a resume needs a readable checkpoint."""
    _check_finished(out)
    ckpt = out / "checkpoint"
    if resume:
        if not (ckpt / "run.json").is_file():
            raise RunDirError(f"{out} holds no checkpoint to resume from")
        read_run_info(ckpt)  # a corrupt run.json: one line naming it, before anything loads
    elif ckpt.is_dir() and any(ckpt.iterdir()):
        raise RunDirError(
            f"{out} holds the checkpoints of an interrupted run ({ckpt}); continue it with "
            f"--resume {out}, or choose another run.out"
        )


def _make_dir(out: Path) -> None:
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == out else f"is under {p}, which is a file"
                raise RunDirError(f"run.out={str(out)!r} {where}; choose a directory for run.out")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(
            f"run.out={str(out)!r} cannot be created ({e.strerror}); choose another run.out"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise RunDirError(f"run.out={str(out)!r} is not writable; choose another run.out")


@contextmanager
def locked(out: Path):
    """Hold ``out/lock`` for the whole run. flock, not a marker file: the kernel releases it
    when the process ends however it ends, so a killed run never leaves a stale lock behind."""
    path = out / "lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise RunDirError(
            f"{path} cannot be created ({e.strerror}); choose another run.out"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise RunDirError(
                f"{out} is in use by another run{who}; wait for it to end or choose another run.out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# What a resume may change: these pace, place or log the run (or say how often to evaluate
# it), never what it computes. Every other key is refused (a new key too, until listed here);
# federation.rounds has its own rule (``check_rounds``).
# eval.tasks and eval.tasks_size are refused too: the base model was scored with them at the
# run's start (lm_eval.json), and the final scores must measure the same thing.
RESUME_FREE = (
    "run.log_level",
    "run.threads",
    "run.compute_slots",
    "run.share_blocks",
    "run.backend",
    "run.ray_address",
    "run.client_cpus",
    "run.client_gpus",
    "run.checkpoint",
    "run.tensorboard",
    "run.tensorboard_dir",
    "eval.every",
    "eval.batch_size",
    "federation.round_timeout_s",
    "federation.compute_slowdown",
    "federation.duplex",  # when transfers run, never what is trained
    "link.",
    "server.",
)
RESUME_FIXED = ("link.compression",)  # under "link.", but it changes what is computed
RESUME_IGNORED = ("run.out",)  # the run directory itself, however the resume spells it


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in cfg.to_dict().items() for k, v in values.items()}


def config_changes(saved: Config, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """``section.key -> (saved value, new value)`` for every key that differs."""
    old, new = _flat(saved), _flat(cfg)
    return {
        k: (old.get(k), v) for k, v in new.items() if k not in RESUME_IGNORED and old.get(k) != v
    }


def _free(key: str) -> bool:
    if key in RESUME_FIXED:
        return False
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUME_FREE)


def resumed_config(cfg: Config, out: Path) -> Config:
    """The interrupted run's own config (``out/config.toml``); refuses a resume whose ``cfg``
    changes how the run trains, since the checkpoint was computed with the saved settings and
    the result would be neither run."""
    path = out / "config.toml"
    if not path.is_file():
        raise RunDirError(f"{out} holds no config.toml; it is not a run directory to resume")
    saved = load_config(path)
    bad = {
        k: v
        for k, v in config_changes(saved, cfg).items()
        if not _free(k) and k != "federation.rounds"
    }
    if bad:
        what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in bad.items())
        raise ConfigError(
            f"--resume {out} cannot change how the run trains: {what} (the run's settings are "
            f"in {path}); drop them, or start a new run with another run.out"
        )
    return saved


def check_rounds(saved: Config, cfg: Config, selected: list[int], done: int, out: Path) -> None:
    """federation.rounds may change on resume (extend a run, or end it sooner) as long as the
    rounds the checkpoint has finished keep their blocks; fewer rounds than that cannot be."""
    old_n, new_n = saved.federation.rounds, cfg.federation.rounds
    if new_n == old_n:
        return
    if new_n < done:
        raise ConfigError(
            f"federation.rounds={new_n}: the checkpoint in {out} has already finished {done} "
            f"round(s); resume with federation.rounds >= {done} (the run has {old_n})"
        )
    fed, seed = cfg.federation, cfg.run.seed
    if fed.lr_schedule_scope == "run" and fed.lr_schedule == "cosine":
        raise ConfigError(
            f"federation.rounds={new_n}: with federation.lr_schedule_scope=run the cosine spans "
            f"all {old_n} rounds, so the {done} finished round(s) were trained for that length; "
            f"keep federation.rounds={old_n}"
        )
    if (
        make_plan(fed.schedule, selected, old_n, seed)[:done]
        != make_plan(fed.schedule, selected, new_n, seed)[:done]
    ):
        raise ConfigError(
            f"federation.rounds={new_n} changes the blocks of the {done} round(s) the checkpoint "
            f"in {out} has finished (federation.schedule={fed.schedule!r}); keep "
            f"federation.rounds={old_n}"
        )


def record_config(saved: Config, cfg: Config, out: Path) -> None:
    """Write the accepted changes into config.toml (atomically: it is the run's record)."""
    changes = config_changes(saved, cfg)
    if not changes:
        return
    path = out / "config.toml"
    for key, (old, new) in changes.items():
        log.warning("resume: %s changed from %r to %r (recorded in %s)", key, old, new, path)
    tmp = path.with_name(".config.toml.tmp")
    tmp.write_text(cfg.replace(run={"out": saved.run.out}).to_toml())
    os.replace(tmp, path)
