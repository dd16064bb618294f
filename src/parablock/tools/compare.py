"""``parablock compare``: the same federation run once per algorithm, side by side.

Every algorithm gets the identical config (data, partition, seeds, schedule, links); only
``federation.algorithm`` and ``run.out`` (``<out>/<algorithm>``) differ. The table
(``compare.md``, ``compare.json``) is built from each run's own ``summary.json``, and the plots
(``report.py``) from the run directories, so ``parablock report`` can rebuild them later.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from parablock.config import Config, ConfigError
from parablock.core.algorithms import ALGORITHMS
from parablock.runner import RunDirError, run
from parablock.tools.report import report

BASELINE = "fedbcd"
DEFAULT_ALGORITHMS = ("parablock", "fedbcd")

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
    ("bytes_up", "bytes up", "{:,}"),
    ("bytes_down", "bytes down", "{:,}"),
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


def table_rows(summaries: dict[str, dict]) -> list[dict]:
    """One row per run from its summary; speed-ups are against the baseline run when present."""
    base = summaries.get(BASELINE)
    rows = []
    for alg, s in summaries.items():
        row = {key: s.get(key) for key, _, _ in COLUMNS}
        row["algorithm"] = alg
        row["run_dir"] = s.get("run_dir")
        row["speedup"] = _ratio(base, s, "mean_round_s")
        row["speedup_wall"] = _ratio(base, s, "wall_time_s")
        if row["speedup"] is not None and s.get("ideal_speedup"):
            row["speedup_over_ideal"] = row["speedup"] / s["ideal_speedup"]
        rows.append(row)
    return rows


def _ratio(base: dict | None, s: dict, key: str) -> float | None:
    if base is None or not s.get(key):
        return None
    return base[key] / s[key]


def markdown(rows: list[dict], notes: Sequence[str] = ()) -> str:
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
    for n in notes:
        text += f"\nnote: {n}\n"
    return text


def compare(
    cfg: Config,
    algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
    *,
    hooks: Callable[[Config], object] | None = None,
) -> dict:
    """Run each algorithm on ``cfg``; write the table and plots into ``cfg.run.out``.

    ``hooks(sub_cfg)`` may return a progress display (a context manager with ``barrier`` and
    ``phase`` methods) for each run.
    """
    out = compare_dir(cfg)
    # Every run's config is checked before the first one starts: a combination that one
    # algorithm refuses fails now, not after the others have trained.
    subs = {
        alg: cfg.replace(federation={"algorithm": alg}, run={"out": str(out / alg)})
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
    rows = table_rows(summaries)
    plots, notes = report(out)
    result = {
        "algorithms": list(algorithms),
        "baseline": BASELINE if BASELINE in summaries else None,
        "rows": rows,
        "plots": [str(p) for p in plots],
        "notes": notes,
        "compare_dir": str(out),
    }
    (out / "compare.md").write_text(markdown(rows, notes))
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
