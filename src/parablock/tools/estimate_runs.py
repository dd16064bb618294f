"""``parablock estimate --from-run``: a finished run's measured round times against what the
timing model predicts from the same run's inputs."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from parablock.core.algorithms import ALGORITHMS
from parablock.core.schedule import make_plan
from parablock.errors import EstimateError  # noqa: F401
from parablock.tools.estimate import DTYPES, RoundInputs, mean_round_s, model_sizes, modelled

log = logging.getLogger(__name__)


def from_run(path: str | Path) -> list[dict]:
    """Predict each run's mean round time from its measured compute, aggregation and links."""
    from parablock.config import load as load_config
    from parablock.tools.report import find_runs

    out = []
    for run in find_runs(path):
        if run.summary["algorithm"] not in modelled():  # e.g. fedit_lora: its own blocks
            log.warning(
                "%s: no timing model for %s yet; skipped", run.path, run.summary["algorithm"]
            )
            continue
        cfg = load_config(run.path / "config.toml")
        model_dir = run.path / "model"
        if (model_dir / "config.json").is_file():  # the run's own architecture, weights unread
            cfg = cfg.replace(model={"name_or_path": str(model_dir)})
        alg = run.summary["algorithm"]
        sizes = model_sizes(cfg, alg)
        block_bytes = {i: n * DTYPES["float32"] for i, n in sizes.block_params.items()}
        plan = run.summary.get("plan") or make_plan(
            cfg.federation.schedule, sorted(block_bytes), cfg.federation.rounds, cfg.run.seed
        )
        aggs = [float(r.get("aggregate_s", 0.0)) for r in run.rounds]
        agg = sum(aggs) / len(aggs) if aggs else 0.0
        compute = float(run.summary["mean_compute_s"])
        x = RoundInputs(plan, block_bytes, compute, cfg, agg)
        # the algorithms over the same blocks and compute time as this run's
        whole = ALGORITHMS.get(alg).whole_model
        same = [a for a in modelled() if ALGORITHMS.get(a).whole_model == whole]
        predicted = {a: mean_round_s(a, x) for a in same}
        measured = float(run.summary["mean_round_s"])
        ups = [r["bytes_up"] for r in run.client_rounds if r.get("bytes_up")]
        out.append(
            {
                "run_dir": str(run.path),
                "algorithm": alg,
                "compute_s": compute,
                "aggregate_s": agg,
                "predicted_block_bytes": sum(block_bytes[b] for b in plan) / len(plan),
                "measured_upload_bytes": sum(ups) / len(ups) if ups else None,
                "predicted_mean_round_s": predicted[alg],
                "measured_mean_round_s": measured,
                "error": predicted[alg] / measured - 1 if measured > 0 else math.nan,
                "predicted_by_algorithm": predicted,
            }
        )
    return out


def format_from_run(rows: list[dict]) -> str:
    lines = ["run                              algorithm  T_comp s  predicted s  measured s  error"]
    for r in rows:
        lines.append(
            f"{r['run_dir'][-32:]:32} {r['algorithm']:10} {r['compute_s']:8.3f} "
            f"{r['predicted_mean_round_s']:12.3f} {r['measured_mean_round_s']:11.3f} "
            f"{r['error'] * 100:+6.1f}%"
        )
    for r in rows:
        if r["measured_upload_bytes"]:
            lines.append(
                f"{r['algorithm']}: block bytes from parameter counts {r['predicted_block_bytes']:,.0f}"
                f", measured upload payload {r['measured_upload_bytes']:,.0f} (+ message header)"
            )
    ok = all(abs(r["error"]) <= 0.15 for r in rows)
    lines.append(
        f"all predictions within 15% of the measured mean round time: {'yes' if ok else 'no'}"
    )
    return "\n".join(lines)
