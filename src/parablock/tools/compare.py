"""``parablock compare``: the same federation run once per algorithm, side by side.

Every algorithm gets the identical config (data, partition, seeds, schedule, links); only
``federation.algorithm`` and ``run.out`` (``<out>/<algorithm>``) differ. The table
(``compare.md``, ``compare.json``) is built from each run's own ``summary.json`` and evaluations,
and the plots (``report.py``) from the run directories, so ``parablock report`` can rebuild them
later. Beside time and bytes, each row says when the run first reached the target held-out loss
(``--target-loss``, by default the worst of the runs' final losses: every run reaches it), the
bytes per round, and the peak memory per client.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from parablock.config import Config, ConfigError, _read_toml
from parablock.core.algorithms import ALGORITHMS
from parablock.run.runner import RunDirError, run
from parablock.tools.report import (
    RunData,
    default_target,
    eval_series,
    load_run,
    per_round_bytes,
    report,
    time_to_target,
)

# each algorithm's role here is its entry's (core/algorithms.py)
BASELINE = next(a for a in ALGORITHMS.names() if ALGORITHMS.get(a).compare == "baseline")
DEFAULT_ALGORITHMS = tuple(  # the default ones first, then the baseline
    sorted(
        (a for a in ALGORITHMS.names() if ALGORITHMS.get(a).compare in ("default", "baseline")),
        key=lambda a: ALGORITHMS.get(a).compare != "default",
    )
)

# (column key, header, format)
COLUMNS = (
    ("algorithm", "algorithm", "{}"),
    ("wall_time_s", "wall time (s)", "{:.2f}"),
    ("mean_round_s", "mean round (s)", "{:.3f}"),
    ("mean_compute_s", "compute/round (s)", "{:.3f}"),
    ("mean_comm_s", "comm/round (s)", "{:.3f}"),
    ("mean_steps", "steps/round", "{:.2f}"),
    ("speedup", f"speed-up vs {BASELINE} (round)", "{:.3f}"),
    ("speedup_wall", f"speed-up vs {BASELINE} (wall)", "{:.3f}"),
    ("ideal_speedup", "ideal speed-up", "{:.3f}"),
    ("final_eval_loss", "final held-out loss", "{:.4f}"),
    ("final_eval_accuracy", "final held-out accuracy", "{:.4f}"),
    ("final_eval_accuracy_ci", "accuracy 95% CI", "{0[0]:.3f}-{0[1]:.3f}"),
    ("final_lm_eval", "final lm-eval (eval.tasks)", "{}"),
    ("time_to_target_s", "time to target (s)", "{:.2f}"),
    ("rounds_to_target", "rounds to target", "{}"),
    ("bytes_per_round", "bytes/round", "{:,.0f}"),
    ("bytes_up", "bytes up", "{:,}"),
    ("bytes_down", "bytes down", "{:,}"),
    ("peak_rss_mb_per_client", "peak MB/client", "{:,.0f}"),
)


def parse_algorithms(text: str) -> list[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    valid = ALGORITHMS.names()
    bad = [a for a in names if a not in valid]
    if bad or not names:
        raise ConfigError(f"--algorithms={text!r}: unknown {bad}; valid: {', '.join(valid)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--algorithms={text!r} names an algorithm twice")
    return names


def compare_dir(cfg: Config) -> Path:
    out = Path(cfg.run.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "compare.json").exists():
        raise RunDirError(f"run.out={str(out)!r} already holds a finished comparison")
    out.mkdir(parents=True, exist_ok=True)
    return out


def table_rows(
    summaries: dict[str, dict],
    runs: dict[str, RunData] | None = None,
    target: float | None = None,
) -> list[dict]:
    """One row per run from its summary (and, given its run data, its time to ``target`` and
    bytes per round); speed-ups are against the baseline run when present."""
    base = summaries.get(BASELINE)
    rows = []
    for alg, s in summaries.items():
        row = {key: s.get(key) for key, _, _ in COLUMNS}
        row["algorithm"] = alg
        row["final_lm_eval"] = lm_eval_text(s.get("final_lm_eval"))
        row["run_dir"] = s.get("run_dir")
        row["speedup"] = _ratio(base, s, "mean_round_s")
        row["speedup_wall"] = _ratio(base, s, "wall_time_s")
        if row["speedup"] is not None and s.get("ideal_speedup"):
            row["speedup_over_ideal"] = row["speedup"] / s["ideal_speedup"]
        run_data = (runs or {}).get(alg)
        if run_data is not None:
            up, down = per_round_bytes(run_data)
            row["bytes_per_round"] = up + down
            reached = time_to_target(run_data, target) if target is not None else None
            row["time_to_target_s"] = reached.time_s if reached else None
            row["rounds_to_target"] = reached.rounds if reached else None
            row["reached_target"] = reached is not None
        rows.append(row)
    return rows


def lm_eval_text(results: dict | None) -> str | None:
    """eval.tasks' headline scores in one cell, e.g. 'gsm8k 0.031, syllogism_choice 0.297'."""
    if not results:
        return None
    return ", ".join(
        f"{key} {'-' if r.get('score') is None else format(r['score'], '.3f')}"
        for key, r in results.items()
    )


def eval_notes(runs: dict[str, RunData]) -> list[str]:
    """What limits the time to target: runs evaluated only before and after training."""
    coarse = [alg for alg, r in runs.items() if 0 < len(eval_series(r).losses) <= 2]
    if not coarse:
        return []
    return [
        f"{', '.join(coarse)}: held-out loss known only before and after training "
        "(eval.every=0), so time to target is the time of the last aggregate (or 0 when the base "
        "model is already there); set eval.every=1 for the curve"
    ]


def eval_every_given(config: str | Path | None, overrides: Sequence[str]) -> bool:
    """Whether the user set eval.every (in --set or the config file): compare defaults it to 1."""
    if any(item.split("=", 1)[0].strip() == "eval.every" for item in overrides):
        return True
    if config is None:
        return False
    section = _read_toml(Path(config)).get("eval", {})
    return isinstance(section, dict) and "every" in section


def _ratio(base: dict | None, s: dict, key: str) -> float | None:
    if base is None or not s.get(key):
        return None
    return base[key] / s[key]


def markdown(rows: list[dict], notes: Sequence[str] = (), target: dict | None = None) -> str:
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = [
        "| " + " | ".join(h for _, h, _ in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            ok = v is not None and not (isinstance(v, float) and math.isnan(v))
            cells.append(fmt.format(v) if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    text += (
        f"\nspeed-up = {BASELINE}'s mean round time (or wall time) / this run's; ideal speed-up = "
        "(compute + comm) / max(compute, comm) from the run's own means.\n"
    )
    if target is not None and target.get("loss") is not None:
        text += (
            f"\ntime to target = wall time at the first evaluation with held-out loss <= "
            f"{target['loss']:.4f} ({target['source']}); bytes/round = up + down, all clients.\n"
        )
    if any(r.get("peak_rss_mb_per_client") is not None for r in rows):
        text += (
            "\npeak MB/client = the process's peak resident memory during the run / clients "
            "(local backend; each run's peak starts after the memory earlier runs freed is "
            "given back).\n"
        )
    for n in notes:
        text += f"\nnote: {n}\n"
    return text


def _run_of(cfg: Config, out: Path, alg: str) -> dict:
    """The run section of one algorithm's run: its own directory (and, with a
    ``run.tensorboard_dir`` given, its own folder in it: TensorBoard shows one run per folder)."""
    changes = {"out": str(out / alg)}
    if cfg.run.tensorboard_dir:
        changes["tensorboard_dir"] = str(Path(cfg.run.tensorboard_dir) / alg)
    return changes


def compare(
    cfg: Config,
    algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
    *,
    hooks: Callable[[Config], object] | None = None,
    target_loss: float | None = None,
) -> dict:
    """Run each algorithm on ``cfg``; write the table and plots into ``cfg.run.out``.

    ``hooks(sub_cfg)`` may return a progress display (a context manager with ``barrier`` and
    ``phase`` methods) for each run. ``target_loss``: the held-out loss for time to target
    (default: the worst of the runs' final losses).
    """
    if target_loss is not None and not (math.isfinite(target_loss) and target_loss > 0):
        raise ConfigError(f"--target-loss={target_loss} must be a positive number")
    out = compare_dir(cfg)
    # Every run's config is checked before the first one starts: a combination that one
    # algorithm refuses fails now, not after the others have trained.
    subs = {
        alg: cfg.replace(federation={"algorithm": alg}, run=_run_of(cfg, out, alg))
        for alg in algorithms
    }
    summaries: dict[str, dict] = {}
    for alg, sub in subs.items():
        display = hooks(sub) if hooks is not None else None
        if display is None:
            summaries[alg] = run(sub)
        else:
            with display:
                summaries[alg] = run(sub, on_barrier=display.barrier, on_phase=display.phase)
    # The table is built from the files, so it is exactly what `report` and readers see.
    summaries = {alg: json.loads((out / alg / "summary.json").read_text()) for alg in summaries}
    runs = {alg: load_run(out / alg) for alg in summaries}
    default = default_target(list(runs.values()))
    target = {
        "loss": target_loss if target_loss is not None else default,
        "source": "given (--target-loss)"
        if target_loss is not None
        else "the worst of the methods' final losses",
    }
    rows = table_rows(summaries, runs, target["loss"])
    plots, notes = report(out, target["loss"])
    notes = eval_notes(runs) + notes
    missed = [r["algorithm"] for r in rows if r.get("reached_target") is False]
    if missed:
        notes.append(f"not reaching the target loss: {', '.join(missed)}")
    result = {
        "algorithms": list(algorithms),
        "baseline": BASELINE if BASELINE in summaries else None,
        "target": target,
        "rows": rows,
        "plots": [str(p) for p in plots],
        "notes": notes,
        "compare_dir": str(out),
    }
    (out / "compare.md").write_text(markdown(rows, notes, target))
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
