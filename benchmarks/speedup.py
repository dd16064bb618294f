"""ParaBlock vs FedBCD wall time on a real LLM, with links chosen so communication ≈ computation.

1. Calibrate: a short FedBCD run with unlimited links measures T_comp (per client and round, with
   all clients computing at once, as in the real runs).
2. Pick a symmetric link bandwidth so that T_up + T_down ≈ T_comp.
3. Run FedBCD and ParaBlock on identical config, data, seeds and links; print mean round time,
   T_comp, T_comm, the measured speed-up, the ideal speed-up and their ratio.
4. Step time of training the last, a middle and the first block against a full-parameter step.

    .venv/bin/python benchmarks/speedup.py            # SmolLM2-135M, ~8 minutes on 2 cores
    .venv/bin/python benchmarks/speedup.py --quick    # tiny sizes, a smoke check
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
import time
from pathlib import Path

import torch

from parablock.config import Config, from_dict
from parablock.data.examples import Example, round_indices
from parablock.data.sources import reasoning_gym_records
from parablock.model.blocks import Block, model_blocks
from parablock.model.load import load_model, load_tokenizer
from parablock.model.train import TrainSettings, train_block
from parablock.run.runner import run


def _config(args, out: Path, algorithm: str, rounds: int, mbps: float, latency_ms: float) -> Config:
    return from_dict(
        {
            "model": {"name_or_path": args.model, "blocks": args.blocks},
            "data": {"train_size": args.train_size, "max_length": args.max_length},
            "federation": {
                "algorithm": algorithm,
                "clients": args.clients,
                "rounds": rounds,
                "local_steps": args.local_steps,
                "batch_size": args.batch_size,
            },
            "link": {"up_mbps": mbps, "down_mbps": mbps, "latency_ms": latency_ms},
            "eval": {"size": args.eval_size},
            "run": {"out": str(out), "seed": 0, "log_level": "warning"},
        }
    )


def _round_times(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["round"]: r["round_s"] for r in rows if r["kind"] == "round"}


def _steady(rt: dict[int, float]) -> float:
    """Mean round time without round 0 (ParaBlock has nothing to upload yet in round 0)."""
    return statistics.mean(v for t, v in rt.items() if t > 0)


def speedup(args, work: Path) -> dict:
    cal = run(_config(args, work / "calibrate", "fedbcd", 2, float("inf"), 0.0))
    t_comp = cal["mean_compute_s"]
    model = load_model(args.model)
    blocks = model_blocks(model)
    nbytes = (
        sum(p.numel() * 4 for n, p in model.named_parameters() if n in blocks[-1].param_names)
        + 2048
    )  # + safetensors header
    lat = args.latency_ms / 1000
    mbps = 2 * nbytes * 8 / max(t_comp - 2 * lat, 0.05) / 1e6
    print(
        f"calibration: T_comp = {t_comp:.2f}s per round -> links {mbps:.1f} Mbit/s "
        f"each way, {args.latency_ms:g} ms latency, {nbytes / 1e6:.1f} MB per block"
    )
    res = {}
    for alg in ("fedbcd", "parablock"):
        s = run(_config(args, work / alg, alg, args.rounds, mbps, args.latency_ms))
        s["steady_round_s"] = _steady(_round_times(work / alg))
        res[alg] = s
    fb, pb = res["fedbcd"], res["parablock"]
    # the ideal from the sequential run, where compute and communication do not compete
    ideal = fb["ideal_speedup"]
    measured = fb["steady_round_s"] / pb["steady_round_s"]
    wall = fb["wall_time_s"] / pb["wall_time_s"]
    c, m, r = fb["mean_compute_s"], fb["mean_comm_s"], args.rounds
    ideal_wall = (r * (c + m) + m) / (c + (r - 1) * max(c, m) + m)
    print()
    print(
        "| algorithm | mean round s (t>0) | mean round s (all) | T_comp s | T_comm s | "
        "wait s | idle s | wall s | held-out loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for alg, s in res.items():
        print(
            f"| {alg} | {s['steady_round_s']:.2f} | {s['mean_round_s']:.2f} | "
            f"{s['mean_compute_s']:.2f} | {s['mean_comm_s']:.2f} | {s['mean_wait_s']:.2f} | "
            f"{s['mean_idle_s']:.2f} | {s['wall_time_s']:.1f} | "
            f"{s['initial_eval_loss']:.4f} -> {s['final_eval_loss']:.4f} |"
        )
    print()
    print(f"measured speed-up per round (steady state): {measured:.3f}")
    print(
        f"ideal speed-up (T_comp + T_comm) / max(...): {ideal:.3f}   "
        f"(from ParaBlock's own run: {pb['ideal_speedup']:.3f})"
    )
    print(f"ratio measured / ideal: {measured / ideal:.1%}  (target >= 90%)")
    print(
        f"whole-run wall speed-up incl. round 0 and drain: {wall:.3f} "
        f"(ideal for {r} rounds: {ideal_wall:.3f}, ratio {wall / ideal_wall:.1%})"
    )
    return {
        "fedbcd": fb,
        "parablock": pb,
        "mbps": mbps,
        "measured_speedup": measured,
        "ideal_speedup": ideal,
        "ratio": measured / ideal,
        "wall_speedup": wall,
        "ideal_wall_speedup": ideal_wall,
    }


def step_times(args) -> dict:
    """Seconds per optimizer step for single blocks vs all parameters (whole machine's threads)."""
    torch.set_num_threads(os.cpu_count() or 1)
    tok = load_tokenizer(args.model)
    # fixed-length windows of real text, every token trained: exactly batch x tokens per step
    text = " ".join(
        r.prompt + " " + r.response for r in reasoning_gym_records("gsm_symbolic", 64, 1)
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    w = args.step_tokens
    data = [
        Example(tuple(ids[i : i + w]), tuple(ids[i : i + w])) for i in range(0, len(ids) - w, w)
    ]
    model = load_model(args.model)
    blocks = model_blocks(model)
    n = len(blocks)
    every = Block(-1, "all", tuple(name for name, _ in model.named_parameters()))
    cases = [
        ("last block", blocks[n - 1]),
        ("middle block", blocks[n // 2]),
        ("first block", blocks[0]),
        ("all parameters", every),
    ]
    s = TrainSettings(steps=args.step_repeats + 1, batch_size=args.step_batch, lr=1e-5)
    out = {}
    for name, block in cases:
        fresh = load_model(args.model)
        batches = round_indices(len(data), 0, s.steps, s.batch_size, seed=0)
        times = []
        first = time.perf_counter()
        for i, b in enumerate(batches):
            t = time.perf_counter()
            train_block(
                fresh, block, data, [b], TrainSettings(1, s.batch_size, s.lr), tok.pad_token_id
            )
            if i > 0:  # the first step warms up allocations
                times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) if times else time.perf_counter() - first
    full = out["all parameters"]
    print()
    print(
        f"step time, batch {args.step_batch} x {args.step_tokens} tokens, "
        f"{torch.get_num_threads()} threads (median of {args.step_repeats}):"
    )
    print("| trained | s / step | vs all parameters |")
    print("|---|---|---|")
    for name, secs in out.items():
        print(f"| {name} | {secs:.2f} | {secs / full:.0%} |")
    print(f"target: last block <= 40% of a full step -> {out['last block'] / full:.0%}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--blocks", default="top:8")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--local-steps", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--eval-size", type=int, default=8)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--step-batch", type=int, default=8)
    p.add_argument("--step-tokens", type=int, default=128)
    p.add_argument("--step-repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check of the script")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--keep", help="keep the run directories here instead of a temp dir")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.train_size, args.eval_size, args.step_repeats = 3, 16, 2, 1
        args.max_length, args.step_batch, args.step_tokens = 128, 2, 64
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="parablock-bench-"))
    try:
        result = {"speedup": speedup(args, work), "step_times": step_times(args)}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
