"""``parablock status RUN_DIR``: where a run stands, read from its files only, during the run and
after it; and the short table ``run``, ``server`` and ``compare`` end with.

A run writes ``metrics.jsonl`` round by round (``run/runfiles.py``) and holds ``lock`` while it
runs, so the files say: the rounds committed, each client's last round and train loss, the round
times (hence the time left), the rejected updates and dropped clients, the held-out evaluations,
and whether it is running (the lock is held), finished (``summary.json``) or stopped (neither:
interrupted or killed; ``checkpoint/`` says from where it resumes). Nothing here writes to the run
directory or waits on the run: a half-written last line is skipped.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import time
import tomllib
from pathlib import Path

from parablock.errors import ReportError
from parablock.evaluation.interval import accuracy_text
from parablock.tools.report import latest_rows

RECENT_ROUNDS = 5  # the time left is the rounds left times the mean of the last few rounds
BLOCK_FILE = re.compile(r"block(\d+)\.v(-?\d+)\.st$")


def _rows(path: Path) -> list[dict]:
    """The JSON-object lines of a file being appended to (a line that does not parse, as a
    half-written last one, is skipped)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return latest_rows(rows)


def _holder(lock: Path) -> int | None:
    """The pid of the run holding ``lock`` (0 when held but unnamed); None when nobody holds it."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _checkpoint_round(directory: Path) -> int | None:
    """The latest round whose global block the checkpoint holds (None: no checkpoint)."""
    try:
        names = [p.name for p in directory.iterdir()]
    except OSError:
        return None
    versions = [int(m.group(2)) for n in names if (m := BLOCK_FILE.match(n))]
    return max(versions, default=None)


def status(path: str | Path) -> dict:
    """Where the run in ``path`` stands (see the module); a dict for ``--json`` and the text."""
    p = Path(path)
    if not (p / "config.toml").is_file():
        raise ReportError(f"{p} is not a run directory (no config.toml)")
    try:
        config = tomllib.loads((p / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ReportError(f"{p / 'config.toml'}: not readable TOML ({e})") from None
    fed, run_cfg = config.get("federation", {}), config.get("run", {})
    summary = None
    if (p / "summary.json").is_file():
        try:
            summary = json.loads((p / "summary.json").read_text())
        except (OSError, ValueError):
            summary = None  # being written: the run is finishing
    holder = _holder(p / "lock")
    state = "finished" if summary else "running" if holder is not None else "stopped"
    rows = _rows(p / "metrics.jsonl")
    client_rows = [r for r in rows if r.get("kind") == "client_round"]
    trained = [r for r in client_rows if not r.get("drain")]
    round_rows = sorted((r for r in rows if r.get("kind") == "round"), key=lambda r: r["round"])
    evals = sorted((r for r in rows if r.get("kind") == "eval"), key=lambda r: r["round"])
    rounds = int(fed.get("rounds", 0))
    done = max((r["round"] + 1 for r in trained), default=0)
    recent = [r["round_s"] for r in round_rows[-RECENT_ROUNDS:] if r.get("round_s") is not None]
    mean_round = sum(recent) / len(recent) if recent else None
    left = None
    if state == "finished" or done >= rounds:
        left = 0.0
    elif mean_round is not None:
        left = (rounds - done) * mean_round
    clients: dict[int, dict] = {}
    for r in sorted(client_rows, key=lambda r: (r["round"], r.get("drain", False))):
        c = clients.setdefault(r["client"], {"bytes_up": 0, "bytes_down": 0})
        c["bytes_up"] += int(r.get("bytes_up") or 0)
        c["bytes_down"] += int(r.get("bytes_down") or 0)
        if not r.get("drain"):
            c["round"] = r["round"] + 1
            c["train_loss"] = _number(r.get("train_loss"))
            if r.get("epsilon") is not None:
                c["epsilon"] = r["epsilon"]
        else:
            c["drained"] = True
    starts = [r["start"] for r in client_rows if r.get("start")]
    ends = [r["end"] for r in client_rows if r.get("end")]
    dropped = round_rows[-1].get("clients_dropped", []) if round_rows else []
    rejected = sum(int(r.get("updates_rejected") or 0) for r in round_rows)
    accepted = sum(len(r.get("participants") or ()) for r in round_rows)
    epsilon = next((r["epsilon"] for r in reversed(round_rows) if "epsilon" in r), None)
    if epsilon is None:
        epsilon = max((c["epsilon"] for c in clients.values() if "epsilon" in c), default=None)
    if summary:
        dropped = summary.get("clients_dropped", dropped)
        rejected = summary.get("updates_rejected", rejected)
        accepted = summary.get("updates_accepted", accepted)
        epsilon = summary.get("privacy_epsilon", epsilon)
    checkpoint = _checkpoint_round(p / "checkpoint")
    out = {
        "run_dir": str(p),
        "state": state,
        "pid": holder or None,
        "algorithm": fed.get("algorithm"),
        "backend": summary.get("backend") if summary else _backend(p, run_cfg),
        "clients": int(fed.get("clients", 0)),
        "rounds": rounds,
        "rounds_done": done,
        "drained": any(c.get("drained") for c in clients.values()),
        "mean_round_s": mean_round,
        "time_left_s": left,
        "elapsed_s": (max(ends) - min(starts)) if starts and ends else None,
        "last_activity_s": (time.time() - max(ends)) if ends else None,
        "clients_seen": {str(c): v for c, v in sorted(clients.items())},
        "clients_dropped": dropped,
        "updates_accepted": accepted,
        "updates_rejected": rejected,
        "epsilon": epsilon,
        "evals": [
            {
                "round": e["round"],
                "loss": e.get("eval_loss"),
                "accuracy": e.get("eval_accuracy"),
                "accuracy_ci": e.get("eval_accuracy_ci"),
            }
            for e in evals
        ],
        "model": _model(p, state, checkpoint),
        "checkpoint_round": None if checkpoint is None else checkpoint + 1,
        "tensorboard_dir": _tensorboard(p, run_cfg, summary),
    }
    if summary:
        out["wall_time_s"] = summary.get("wall_time_s")
    return out


def _backend(p: Path, run_cfg: dict) -> str | None:
    """A running run's backend: a served run (networked clients) writes no partition.json."""
    return run_cfg.get("backend") if (p / "partition.json").is_file() else "remote"


def _number(x) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def _model(p: Path, state: str, checkpoint: int | None) -> str:
    if state == "finished" and (p / "model").is_dir():
        adapter = " (adapter alone: model-adapter/)" if (p / "model-adapter").is_dir() else ""
        return f"{p / 'model'}{adapter}"
    held = "" if checkpoint is None else f"; {p / 'checkpoint'} holds the blocks after round "
    held += "" if checkpoint is None else str(checkpoint + 1)
    if state == "stopped":
        how = "resume to finish it" if checkpoint is not None else "no checkpoint to resume from"
        return f"not written (the run stopped: {how}){held}"
    return f"written at the end to {p / 'model'}{held}"


def _tensorboard(p: Path, run_cfg: dict, summary: dict | None) -> str | None:
    if summary and summary.get("tensorboard_dir"):
        return summary["tensorboard_dir"]
    if not run_cfg.get("tensorboard"):
        return None
    return run_cfg.get("tensorboard_dir") or str(p / "tb")


def clock(seconds: float | None) -> str:
    """h:mm:ss or m:ss, and seconds with a tenth under a minute."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{max(0.0, seconds):.1f}s"
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def megabytes(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def format_status(s: dict) -> str:
    """``status`` as a few aligned lines."""
    who = f" (pid {s['pid']})" if s["state"] == "running" and s["pid"] else ""
    on = f" on {s['backend']}" if s["backend"] else ""
    head = f"{s['run_dir']}: {s['state']}{who}; {s['algorithm']}{on}, {s['clients']} clients"
    mean = s["mean_round_s"]
    rnd = f"{s['rounds_done']} of {s['rounds']} done" + (", drained" if s["drained"] else "")
    if mean is not None:
        rnd += f"; mean round {mean:.2f}s"
    if s["state"] == "running":
        rnd += f"; time left about {clock(s['time_left_s'])}"
    elapsed = f"{clock(s.get('wall_time_s', s['elapsed_s']))}"
    if s["state"] != "finished" and s["last_activity_s"] is not None:
        elapsed += f" (last round ended {clock(s['last_activity_s'])} ago)"
    seen = []
    for c, v in s["clients_seen"].items():
        loss = v.get("train_loss")
        text = f"{c}: round {v.get('round', 0)}"
        text += f", train loss {loss:.4f}" if loss is not None else ""
        seen.append(text)
    dropped = s["clients_dropped"]
    clients = " | ".join(seen) or "none reported yet"
    clients += f"; dropped: {', '.join(map(str, sorted(set(dropped))))}" if dropped else ""
    lines = [
        head,
        ("round", rnd),
        ("elapsed", elapsed),
        ("clients", clients),
        ("held-out", _evals(s["evals"], s["state"])),
        ("updates", f"{s['updates_accepted']} accepted, {s['updates_rejected']} rejected"),
    ]
    if s["epsilon"] is not None:
        lines.append(("privacy", f"epsilon {s['epsilon']:.4g}"))
    lines.append(("model", s["model"]))
    if s["tensorboard_dir"]:
        lines.append(("tensorboard", f"tensorboard --logdir {s['tensorboard_dir']}"))
    return _lines(lines)


def _evals(evals: list[dict], state: str) -> str:
    if not evals:
        return "no evaluation yet" if state != "finished" else "none (no held-out data)"
    first, last = evals[0], evals[-1]
    text = f"loss {first['loss']:.4f}" + (" (base model)" if first["round"] == -1 else "")
    if last is not first:
        text += f" -> {last['loss']:.4f} after round {last['round'] + 1}"
    if last.get("accuracy") is not None:
        text += f"; accuracy {accuracy_text(last['accuracy'], last.get('accuracy_ci'))}"
    if state != "finished":
        text += "; the rounds are evaluated after training"
    return text


def _lines(items: list) -> str:
    head, rows = items[0], items[1:]
    width = max(len(k) for k, _ in rows)
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows]) + "\n"


def summary_table(summaries: dict[str, dict], title: str) -> str:
    """The short table a finished ``run``, ``server`` or ``compare`` prints: what ran, how long,
    the final quality, the bytes, where the files are; one column per run."""
    cols = list(summaries.values())

    def row(label: str, fn) -> tuple[str, list[str]]:
        return label, [fn(s) for s in cols]

    rows = [
        row("ran", lambda s: f"{s['algorithm']} on {s['backend']}, {s['clients']} clients"),
        row("rounds", lambda s: f"{s['rounds']}, mean {s['mean_round_s']:.2f}s"),
        row("wall time", lambda s: clock(s["wall_time_s"])),
        row("held-out loss", lambda s: _change(s, "eval_loss", "{:.4f}")),
    ]
    if any(s.get("final_eval_accuracy") is not None for s in cols):
        rows.append(row("accuracy", _accuracy_change))
    for task in dict.fromkeys(t for s in cols for t in s.get("final_lm_eval") or {}):
        rows.append(row(task, lambda s, task=task: _lm_eval_change(s, task)))  # eval.tasks
    rows += [
        row(
            "bytes up/down", lambda s: f"{megabytes(s['bytes_up'])} / {megabytes(s['bytes_down'])}"
        ),
        row("updates", lambda s: _updates(s)),
    ]
    if any(s.get("privacy_mode", "none") != "none" for s in cols):
        rows.append(row("epsilon", lambda s: _epsilon(s)))
    rows.append(row("files", lambda s: s["run_dir"]))
    if any(s.get("tensorboard_dir") for s in cols):
        rows.append(row("tensorboard", lambda s: s.get("tensorboard_dir") or "-"))
    if len(cols) > 1:
        rows.insert(0, ("", list(summaries)))
    width = max(len(k) for k, _ in rows)
    widths = [max(len(r[1][i]) for r in rows) for i in range(len(cols))]
    lines = [title]
    for label, cells in rows:
        text = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        lines.append(f"  {label:<{width}}  {text}")
    return "\n".join(lines) + "\n"


def _change(s: dict, key: str, fmt: str) -> str:
    a, b = s.get(f"initial_{key}"), s.get(f"final_{key}")
    if b is None:
        return "-"
    return (fmt.format(a) + " -> " if a is not None else "") + fmt.format(b)


def _lm_eval_change(s: dict, task: str) -> str:
    """One eval.tasks task's headline score, before -> after training."""
    a, b = (
        (s.get(k) or {}).get(task, {}).get("score") for k in ("initial_lm_eval", "final_lm_eval")
    )
    if b is None:
        return "-"
    return (f"{a:.3f} -> " if a is not None else "") + f"{b:.3f}"


def _accuracy_change(s: dict) -> str:
    """'0.000 (95% CI 0.000-0.057) -> 0.250 (95% CI 0.160-0.369)'."""
    a, b = s.get("initial_eval_accuracy"), s.get("final_eval_accuracy")
    if b is None:
        return "-"
    after = accuracy_text(b, s.get("final_eval_accuracy_ci"))
    return (
        after if a is None else f"{accuracy_text(a, s.get('initial_eval_accuracy_ci'))} -> {after}"
    )


def _updates(s: dict) -> str:
    text = f"{s['updates_accepted']} accepted, {s['updates_rejected']} rejected"
    dropped = s.get("clients_dropped") or []
    return text + (f", {len(set(dropped))} client(s) dropped" if dropped else "")


def _epsilon(s: dict) -> str:
    if s.get("privacy_mode", "none") == "none":
        return "-"
    return f"{s.get('privacy_epsilon', 0.0):.4g} (delta {s.get('privacy_delta')})"
