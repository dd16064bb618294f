"""link.compression: bytes, transfer time and held-out loss of none, bf16, int8 and int4 deltas.

One run per compression on identical config, data, seeds, schedule and links (the project's
default 20/50 Mbit/s links with 20 ms latency unless told otherwise). Per client and round that
communicated: bytes up and down and the seconds the upload and download took; per run: mean round
time, wall time and the held-out loss after the rounds, each against ``none``. The lossy codecs
run with error feedback on both sides (``core/compress.py``) and every client still ends
bit-equal to the server (``tests/test_compress.py`` checks that); the held-out loss is the
server's final model's.

    .venv/bin/python benchmarks/compression.py           # SmolLM2-135M, 8 rounds (~10 min, 2 cores)
    .venv/bin/python benchmarks/compression.py --tiny    # a tiny random Llama: a smoke check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parablock.config import from_dict  # noqa: E402
from parablock.run.runner import run  # noqa: E402

COMPRESSIONS = ("none", "bf16", "int8", "int4")


def _config(args, out: Path, compression: str) -> dict:
    return {
        "model": {"name_or_path": args.model, "blocks": args.blocks},
        "data": {"train_size": args.train_size, "max_length": args.max_length},
        "federation": {
            "algorithm": args.algorithm,
            "clients": args.clients,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
        },
        "link": {
            "up_mbps": args.up_mbps,
            "down_mbps": args.down_mbps,
            "latency_ms": args.latency_ms,
            "compression": compression,
        },
        "eval": {"size": args.eval_size, "accuracy_size": 0},
        "run": {"out": str(out), "seed": args.seed, "log_level": "warning"},
    }


def _per_round(run_dir: Path) -> dict[str, float]:
    """Means over the client rounds that moved a delta (round 0 uploads nothing)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    comm = [r for r in rows if r["kind"] == "client_round" and r["bytes_up"] > 0]
    mean = lambda k: sum(r[k] for r in comm) / len(comm)  # noqa: E731
    return {f"{k}_per_round": mean(k) for k in ("bytes_up", "bytes_down", "upload_s", "download_s")}


def measure(args, work: Path) -> dict[str, dict]:
    res = {}
    for c in args.compressions.split(","):
        out = work / c
        print(f"running link.compression={c} -> {out}", file=sys.stderr, flush=True)
        s = run(from_dict(_config(args, out, c)))
        res[c] = {**s, **_per_round(out)}
    return res


def table(res: dict[str, dict]) -> str:
    base = res.get("none", next(iter(res.values())))
    lines = [
        "| compression | bytes up / round | bytes down / round | upload s | download s | "
        "mean round s | wall s | held-out loss | loss vs none |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c, s in res.items():
        rel = (s["final_eval_loss"] - base["final_eval_loss"]) / base["final_eval_loss"]
        up, down = s["bytes_up_per_round"], s["bytes_down_per_round"]
        lines.append(
            f"| {c} | {up / 1e6:.3f} MB ({up / base['bytes_up_per_round']:.0%}) | "
            f"{down / 1e6:.3f} MB ({down / base['bytes_down_per_round']:.0%}) | "
            f"{s['upload_s_per_round']:.3f} | {s['download_s_per_round']:.3f} | "
            f"{s['mean_round_s']:.2f} | {s['wall_time_s']:.1f} | {s['initial_eval_loss']:.5f} -> "
            f"{s['final_eval_loss']:.5f} | {rel:+.3%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--blocks", default="top:8")
    p.add_argument("--algorithm", default="parablock", choices=("parablock", "fedbcd"))
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--eval-size", type=int, default=32)
    p.add_argument("--up-mbps", type=float, default=20.0)
    p.add_argument("--down-mbps", type=float, default=50.0)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compressions", default=",".join(COMPRESSIONS), help="comma list (first: the reference)"
    )
    p.add_argument("--out", type=Path, default=None, help="run directories (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama: a smoke check")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = args.out or Path(tempfile.mkdtemp(prefix="parablock-compression-"))
    if args.tiny:
        from ray_overhead import tiny_model_dir

        args.model, args.blocks = tiny_model_dir(work), "all"
        args.rounds, args.train_size, args.max_length, args.eval_size = 3, 32, 128, 4
        args.batch_size, args.lr = 2, 1e-3
    res = measure(args, work)
    print()
    print(
        f"{args.algorithm}, {args.clients} clients, {args.rounds} rounds, blocks {args.blocks}, "
        f"links {args.up_mbps:g}/{args.down_mbps:g} Mbit/s, {args.latency_ms:g} ms; per client "
        "and round that moved a delta:"
    )
    print(table(res))
    print()
    print("| compression | bytes up + down, whole run | held-out loss |")
    print("|---|---|---|")
    for c, s in res.items():
        total = (s["bytes_up"] + s["bytes_down"]) / 1e6
        print(
            f"| {c} | {total:.2f} MB | {s['initial_eval_loss']:.5f} -> {s['final_eval_loss']:.5f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
