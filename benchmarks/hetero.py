"""One slow client: what a 4x slower uplink on one of three clients does to FedBCD's and
ParaBlock's round time, and ``federation.min_clients`` with a round deadline as the remedy.

1. Calibrate: a short FedBCD run on unlimited links measures T_comp (per client and round, all
   clients computing at once); links are then chosen so that T_up + T_down ≈ T_comp (up = down =
   M Mbit/s), where ParaBlock hides the whole link.
2. For each algorithm, three runs on identical config, data and seeds:
   - ``equal``: every client on M Mbit/s up and down;
   - ``slow``: client 2's uplink at M/4 (``link.up_mbps = "M,M,M/4"``); every round waits for it;
   - ``remedy``: the same links with ``federation.min_clients=2`` and a ``round_timeout_s`` that
     ends between the fast clients' uploads and the slow one's, so rounds close without it (a
     late update is refused ``[behind]``; its client restarts from its checkpoint and rejoins at
     the open round).
3. Prints, per run: the steady-state round time as the fast client 0 lives it (its mean round
   for rounds >= 1; round 0 has nothing to send), the same per run from ``parablock estimate``'s
   model (the slowest client's round, or the deadline's for the remedy), wall time, how many of
   the slow client's updates got into an aggregate, and the held-out loss.

    .venv/bin/python benchmarks/hetero.py            # SmolLM2-135M, 3 clients (a quarter hour)
    .venv/bin/python benchmarks/hetero.py --tiny     # a tiny random Llama: a smoke check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from ray_overhead import tiny_model_dir

from parablock.config import Config, from_dict
from parablock.model.blocks import block_nbytes, model_blocks, select_blocks
from parablock.model.load import EMBEDDED, load_model
from parablock.run.runner import run
from parablock.tools.estimate import EstimateSettings, estimate

SLOW = 2  # the client with the slow uplink
FACTOR = 4.0  # how much slower its uplink is


def config(args, model: str, out: Path, algorithm: str, rounds: int, **sections) -> Config:
    base = {
        "model": {"name_or_path": model, "blocks": args.blocks},
        "data": {
            "source": args.source,
            "train_size": args.train_size,
            "max_length": args.max_length,
        },
        "federation": {
            "algorithm": algorithm,
            "clients": 3,
            "rounds": rounds,
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
        },
        "link": {"up_mbps": "inf", "down_mbps": "inf", "latency_ms": 0.0},
        "eval": {"size": args.eval_size, "accuracy_size": 0},
        "run": {"out": str(out), "seed": 0, "log_level": "warning"},
    }
    for name, values in sections.items():
        base[name] = {**base[name], **values}
    return from_dict(base)


def calibrate(args, model: str, work: Path) -> tuple[float, int]:
    """T_comp of a FedBCD round on unlimited links, and the bytes of the top selected block."""
    s = run(config(args, model, work / "calibrate", "fedbcd", 2))
    m = load_model(model)
    blocks = model_blocks(m)
    return s["mean_compute_s"], block_nbytes(m, blocks[select_blocks(blocks, args.blocks)[-1]])


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def measure(run_dir: Path, summary: dict, rounds: int) -> dict:
    rows = _rows(run_dir)
    mine = [r for r in rows if r["kind"] == "client_round" and r["client"] == 0]
    steady = [r["round_s"] for r in mine if r["round"] >= 1 and not r.get("drain")]
    agg = [r for r in rows if r["kind"] == "round"]
    return {
        "round_s": statistics.mean(steady),
        "wall_s": summary["wall_time_s"],
        "slow_updates_in": sum(SLOW in r["participants"] for r in agg),
        "rounds": rounds,
        "final_eval_loss": summary["final_eval_loss"],
        "initial_eval_loss": summary["initial_eval_loss"],
    }


def predicted(cfg: Config, t_comp: float, algorithm: str) -> str:
    """The estimate tool's mean round for this config, over the slowest client's links (it does
    not model a round closed at the deadline without that client)."""
    r = estimate(cfg, EstimateSettings(compute_s=t_comp))
    return f"{r['mean_round_s'][algorithm]:.2f}" if algorithm in r.get("mean_round_s", {}) else "-"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--blocks", default="top:8")
    p.add_argument("--source", default="reasoning_gym:gsm_symbolic")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-size", type=int, default=192)
    p.add_argument("--eval-size", type=int, default=8)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument(
        "--timeout-s",
        type=float,
        default=0.0,
        help="round_timeout_s of the remedy (default: half the gap between a fast and the slow "
        "upload)",
    )
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama: a smoke check")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--keep", help="keep the run directories here instead of a temp dir")
    args = p.parse_args()
    if args.tiny:
        args.rounds, args.train_size, args.eval_size, args.max_length = 4, 24, 2, 96
        args.blocks, args.local_steps, args.batch_size, args.latency_ms = "all", 1, 2, 5.0
        args.source = "reasoning_gym:basic_arithmetic"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.ERROR)  # a late client's restart is expected here
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="parablock-hetero-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = bench(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


def bench(args, work: Path) -> dict:
    model = tiny_model_dir(work) if args.tiny else args.model
    t_comp, nbytes = calibrate(args, model, work)
    lat = args.latency_ms / 1000
    mbps = 2 * nbytes * 8 / max(t_comp - 2 * lat, 0.05) / 1e6
    up_fast = lat + nbytes * 8 / (mbps * 1e6)
    up_slow = lat + nbytes * 8 / (mbps / FACTOR * 1e6)
    timeout = args.timeout_s or (up_slow - up_fast) / 2
    print(
        f"model {model}, 3 clients, {args.rounds} rounds; calibration: T_comp {t_comp:.2f}s, "
        f"block {nbytes / 1e6:.2f} MB -> links {mbps:.1f} Mbit/s up and down, "
        f"{args.latency_ms:g} ms; client {SLOW}'s uplink {mbps / FACTOR:.1f} Mbit/s "
        f"(T_up {up_slow:.2f}s against {up_fast:.2f}s); remedy: federation.min_clients=2, "
        f"round_timeout_s={timeout:.2f}"
    )
    slow_up = ",".join(repr(v) for v in (mbps, mbps, mbps / FACTOR))
    cases = {
        "equal": {"link": {"up_mbps": mbps}},
        "slow": {"link": {"up_mbps": slow_up}},
        "remedy": {
            "link": {"up_mbps": slow_up},
            "federation": {"min_clients": 2, "round_timeout_s": timeout},
        },
    }
    results: dict[str, dict[str, dict]] = {}
    for alg in ("fedbcd", "parablock"):
        for case, sections in cases.items():
            link = {"down_mbps": mbps, "latency_ms": args.latency_ms, **sections["link"]}
            fed = sections.get("federation", {})
            out = work / f"{alg}-{case}"
            cfg = config(args, model, out, alg, args.rounds, link=link, federation=fed)
            m = measure(out, run(cfg), args.rounds)
            m["predicted_round_s"] = predicted(cfg, t_comp, alg)
            results.setdefault(alg, {})[case] = m
    report(results)
    return {
        "t_comp_s": t_comp,
        "block_bytes": nbytes,
        "mbps": mbps,
        "timeout_s": timeout,
        **results,
    }


def report(results: dict[str, dict[str, dict]]) -> None:
    print()
    print(
        "| algorithm | links | round s (client 0, t>=1) | predicted s | vs equal | wall s | "
        f"client {SLOW}'s updates in | held-out loss |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for alg, cases in results.items():
        base = cases["equal"]["round_s"]
        for case, m in cases.items():
            print(
                f"| {alg} | {case} | {m['round_s']:.2f} | {m['predicted_round_s']} | "
                f"{m['round_s'] / base:.2f}x | {m['wall_s']:.1f} | "
                f"{m['slow_updates_in']}/{m['rounds']} | "
                f"{m['initial_eval_loss']:.4f} -> {m['final_eval_loss']:.4f} |"
            )
    print()
    for case in ("equal", "slow", "remedy"):
        fb, pb = results["fedbcd"][case]["round_s"], results["parablock"][case]["round_s"]
        print(f"ParaBlock over FedBCD, {case}: {fb / pb:.2f}x per round")


if __name__ == "__main__":
    sys.exit(main())
