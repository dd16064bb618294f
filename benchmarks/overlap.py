"""ParaBlock's extra overlap on links slower than compute: local_steps_max and full duplex.

1. Calibrate: a short FedBCD run on unlimited links measures T_comp (per client and round).
2. Pick symmetric links so that T_up + T_down ~ ``--comm-ratio`` x T_comp (default 2: the
   computation thread of half-duplex ParaBlock sits idle about half of every round).
3. Run ParaBlock four times on the identical config, data, seeds and links: half or full duplex
   (``federation.duplex``), with or without extra steps while the link is busy
   (``federation.local_steps_max``), evaluating the held-out loss after every round (replayed
   after training with each aggregate's wall-clock time, so evaluation never slows a round).
4. Print mean round time (rounds >= 1) against the steady-state model's prediction, steps per
   round, wall time, the held-out loss against wall time, and the wall time each run needs to
   reach the loss the plain run ends with. ``overlap.json`` and ``loss_vs_time.png`` go to --out.

    .venv/bin/python benchmarks/overlap.py          # SmolLM2-135M, ~15 minutes on 2 cores
    .venv/bin/python benchmarks/overlap.py --tiny   # a tiny random Llama: a smoke check
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

from parablock.config import Config, from_dict
from parablock.model.blocks import model_blocks, select_blocks
from parablock.model.load import EMBEDDED, load_model
from parablock.run.runner import run

VARIANTS = {  # name -> (duplex, extra steps)
    "half": (False, False),
    "half+steps": (False, True),
    "duplex": (True, False),
    "duplex+steps": (True, True),
}


def _steady_model(duplex: bool, comp: float, one_way: float) -> float:
    """The steady-state round (no local_steps_max): half duplex max(T_comp, T_up + T_down);
    full duplex max(T_comp, T_up, T_down, (T_comp + T_up + T_down) / 2) (aggregation ~ 0)."""
    if not duplex:
        return max(comp, 2 * one_way)
    return max(comp, one_way, (comp + 2 * one_way) / 2)


def _config(args, model: str, out: Path, rounds: int, link: dict, fed: dict) -> Config:
    return from_dict(
        {
            "model": {"name_or_path": model, "blocks": args.blocks},
            "data": {"train_size": args.train_size, "max_length": args.max_length},
            "federation": {
                "clients": args.clients,
                "rounds": rounds,
                "local_steps": args.local_steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                **fed,
            },
            "link": link,
            "eval": {"size": args.eval_size, "accuracy_size": 0, "every": 1},
            "run": {"out": str(out), "seed": 0, "log_level": "warning"},
        }
    )


def _rows(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _steady(run_dir: Path) -> float:
    """Mean round time without round 0 (nothing to upload yet)."""
    return statistics.mean(r["round_s"] for r in _rows(run_dir, "round") if r["round"] >= 1)


def _block_bytes(model: str, blocks: str) -> tuple[dict[int, float], list[int]]:
    m = load_model(model)
    all_blocks = model_blocks(m)
    selected = select_blocks(all_blocks, blocks)
    params = dict(m.named_parameters())
    sizes = {b: 4.0 * sum(params[n].numel() for n in all_blocks[b].param_names) for b in selected}
    return sizes, selected


def _time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first wall time at which the held-out loss is at or below ``target``."""
    return next((t for t, loss in curve if loss <= target + 1e-12), None)


def main(args) -> dict:
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.out or tempfile.mkdtemp(prefix="overlap-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from ray_overhead import tiny_model_dir

        model = tiny_model_dir(work)
    else:
        model = args.model
    unlimited = {"up_mbps": float("inf"), "down_mbps": float("inf"), "latency_ms": 0.0}
    cal = run(_config(args, model, work / "calibrate", 2, unlimited, {"algorithm": "fedbcd"}))
    t_comp = cal["mean_compute_s"]
    sizes, _ = _block_bytes(model, args.blocks)
    nbytes = statistics.mean(sizes.values()) + 2048  # + the message header
    lat = args.latency_ms / 1000
    # T_up + T_down = 2 (lat + 8 B / mbps) = comm_ratio x T_comp, the same speed both ways
    mbps = 2 * 8 * nbytes / max(args.comm_ratio * t_comp - 2 * lat, 1e-3) / 1e6
    link = {"up_mbps": mbps, "down_mbps": mbps, "latency_ms": args.latency_ms}
    most = args.local_steps_max or 4 * args.local_steps
    print(
        f"calibration: T_comp {t_comp:.3f} s per round ({args.local_steps} steps) -> links "
        f"{mbps:.2f} Mbit/s each way, {args.latency_ms:g} ms, {nbytes / 1e6:.2f} MB per block: "
        f"T_up + T_down ~ {args.comm_ratio:g} x T_comp; local_steps_max {most}"
    )
    results = {}
    for name, (duplex, steps) in VARIANTS.items():
        fed = {"duplex": duplex, "local_steps_max": most if steps else 0}
        cfg = _config(args, model, work / name, args.rounds, link, fed)
        s = run(cfg)
        evals = sorted((r["time_s"], r["eval_loss"]) for r in _rows(work / name, "eval"))
        predicted = _steady_model(duplex, t_comp, lat + 8 * nbytes / (mbps * 1e6))
        results[name] = {
            "duplex": duplex,
            "local_steps_max": fed["local_steps_max"],
            "steady_round_s": _steady(work / name),
            "predicted_round_s": predicted,
            "wall_time_s": s["wall_time_s"],
            "mean_steps": s["mean_steps"],
            "mean_compute_s": s["mean_compute_s"],
            "mean_idle_s": s["mean_idle_s"],
            "initial_eval_loss": s["initial_eval_loss"],
            "final_eval_loss": s["final_eval_loss"],
            "loss_vs_time": evals,
            "fingerprint": s["final_model_fingerprint"],
        }
    target = results["half"]["final_eval_loss"]
    for r in results.values():
        r["time_to_half_final_loss_s"] = _time_to(r["loss_vs_time"], target)
    _print(results, target)
    _plot(results, work / "loss_vs_time.png")
    out = {"t_comp_s": t_comp, "mbps": mbps, "link": link, "variants": results}
    (work / "overlap.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwritten: {work / 'overlap.json'}, {work / 'loss_vs_time.png'}")
    return out


def _print(results: dict, target: float) -> None:
    print()
    print(
        "| run | round s (t>=1) | predicted s | steps/round | idle s | wall s | held-out loss | "
        f"time to {target:.4f} s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        reach = r["time_to_half_final_loss_s"]
        print(
            f"| {name} | {r['steady_round_s']:.3f} | {r['predicted_round_s']:.3f} | "
            f"{r['mean_steps']:.2f} | {r['mean_idle_s']:.3f} | {r['wall_time_s']:.1f} | "
            f"{r['initial_eval_loss']:.4f} -> {r['final_eval_loss']:.4f} | "
            f"{'-' if reach is None else f'{reach:.1f}'} |"
        )
    h, d = results["half"], results["duplex"]
    print(
        f"\nfull duplex: round {d['steady_round_s']:.3f} s vs half duplex "
        f"{h['steady_round_s']:.3f} s ({h['steady_round_s'] / d['steady_round_s']:.2f}x); "
        f"same final model: {'yes' if d['fingerprint'] == h['fingerprint'] else 'NO'}"
    )
    print("held-out loss against wall time (s: loss):")
    for name, r in results.items():
        pts = ", ".join(f"{t:.1f}: {loss:.4f}" for t, loss in r["loss_vs_time"])
        print(f"  {name:13} {pts}")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        t, loss = zip(*r["loss_vs_time"], strict=True) if r["loss_vs_time"] else ((), ())
        ax.plot(t, loss, marker="o", label=f"{name} ({r['mean_steps']:.1f} steps/round)")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("held-out loss")
    ax.set_title("ParaBlock on links slower than compute")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama, a few rounds")
    p.add_argument("--model", default=EMBEDDED, help="model.name_or_path (default: SmolLM2)")
    p.add_argument("--out", default="", help="work directory (default: a temporary one)")
    p.add_argument("--rounds", type=int, default=None, help="default 12 (tiny: 4)")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--blocks", default=None, help="model.blocks (default top:8; tiny: all)")
    p.add_argument("--local-steps", type=int, default=None, help="default 2 (tiny: 1)")
    p.add_argument("--local-steps-max", type=int, default=0, help="default 4 x local steps")
    p.add_argument("--batch-size", type=int, default=None, help="default 4 (tiny: 2)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--train-size", type=int, default=None, help="default 256 (tiny: 32)")
    p.add_argument("--max-length", type=int, default=None, help="default 256 (tiny: 96)")
    p.add_argument("--eval-size", type=int, default=None, help="default 32 (tiny: 4)")
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument(
        "--comm-ratio", type=float, default=2.0, help="(T_up + T_down) / T_comp, default 2"
    )
    args = p.parse_args(argv)
    t = args.tiny
    defaults = {
        "rounds": (12, 4),
        "blocks": ("top:8", "all"),
        "local_steps": (2, 1),
        "batch_size": (4, 2),
        "train_size": (256, 32),
        "max_length": (256, 96),
        "eval_size": (32, 4),
    }
    for key, (full, tiny) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if t else full)
    if t and args.latency_ms == 20.0:
        args.latency_ms = 2.0
    return args


if __name__ == "__main__":
    main(parse())
