"""Differential privacy on SmolLM2-135M: held-out loss and accuracy against epsilon, and what a
private step costs.

Record mode (DP-SGD on the trained block), 2 sites, at epsilon = inf (the non-private reference,
same data, batch and rounds), and at each of ``--epsilons`` (delta 1e-5, the noise multiplier
calibrated by ``privacy.target_epsilon``); then client mode with ``--client-clients`` clients at
epsilon 8. Per run: the held-out loss before and after (and its share of the non-private
improvement kept), accuracy, epsilon reached, the noise multiplier, mean step time and peak memory.

    .venv/bin/python benchmarks/privacy.py                      # SmolLM2 (long: see --help)
    .venv/bin/python benchmarks/privacy.py --tiny               # a tiny random Llama: a smoke check
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


def config(args, out: Path, privacy: dict, clients: int, **federation) -> dict:
    return {
        "model": {"name_or_path": args.model, "blocks": args.blocks},
        "data": {
            "source": args.source,
            "train_size": args.records * clients,
            "max_length": args.max_length,
        },
        "federation": {
            "clients": clients,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "batch_size": args.batch,
            "lr": args.lr,
            **federation,
        },
        "link": {"up_mbps": 1e9, "down_mbps": 1e9, "latency_ms": 0.0},
        "eval": {"size": args.eval_size, "accuracy_size": args.accuracy_size, "batch_size": 8},
        "privacy": privacy,
        "train": {"loss_chunk": 128},
        "run": {"out": str(out), "log_level": "warning", "checkpoint": False},
    }


def row(name: str, s: dict, reference: dict | None) -> dict:
    gain = s["initial_eval_loss"] - s["final_eval_loss"]
    ref = reference["initial_eval_loss"] - reference["final_eval_loss"] if reference else None
    return {
        "run": name,
        "epsilon": s.get("privacy_epsilon", float("inf")),
        "noise_multiplier": s.get("privacy_noise_multiplier"),
        "initial_loss": s["initial_eval_loss"],
        "final_loss": s["final_eval_loss"],
        "kept": gain / ref if ref else 1.0,
        "accuracy": (s["initial_eval_accuracy"], s["final_eval_accuracy"]),
        "compute_s_per_round": s["mean_compute_s"],
        "peak_rss_mb": s["peak_rss_mb"],
        "wall_s": s["wall_time_s"],
    }


def step_cost(args) -> None:
    """One block's training step, private against not, on the same examples: seconds per step
    (median of 3 after a warm-up) and the process's peak memory growth."""
    import statistics
    import time

    from parablock.data.examples import encode_all, round_indices
    from parablock.data.sources import client_records
    from parablock.model.blocks import model_blocks
    from parablock.model.load import load_model, load_tokenizer
    from parablock.model.train import DPStep, TrainSettings, train_block
    from parablock.run.memory import peak_rss_mb, reset_peak

    model, tok = load_model(args.model), load_tokenizer(args.model)
    data = encode_all(
        client_records(args.source, args.batch * 4, 0), tok, args.max_length, "step", None
    )
    block = model_blocks(model)[-1]
    settings = TrainSettings(1, args.batch, args.lr, precision="auto", loss_chunk=128)
    print(f"\none step of the top block, batch {args.batch}, length <= {args.max_length}")
    print("| step | s/step | peak MB |")
    print("|---|---|---|")
    for name, dp in [
        ("non-private", None),
        (f"DP-SGD, physical {args.physical}", DPStep(args.clip, 1.0, args.batch, args.physical, 0)),
        (f"DP-SGD, physical {args.batch}", DPStep(args.clip, 1.0, args.batch, args.batch, 0)),
    ]:
        times = []
        reset_peak()
        for k in range(4):
            idx = round_indices(len(data), k, 1, args.batch, 0)
            started = time.perf_counter()
            train_block(model, block, data, idx, settings, tok.pad_token_id, dp=dp)
            times.append(time.perf_counter() - started)
        print(f"| {name} | {statistics.median(times[1:]):.2f} | {peak_rss_mb():,.0f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--source", default="reasoning_gym:gsm_symbolic")
    p.add_argument("--records", type=int, default=1024, help="training records per site")
    p.add_argument("--batch", type=int, default=64, help="expected (Poisson) batch per step")
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--blocks", default="top:4")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--clip", type=float, default=1.0, help="record mode: per-example clip")
    p.add_argument("--epsilons", default="8,3,1")
    p.add_argument("--client-clients", type=int, default=8)
    p.add_argument("--client-clip", type=float, default=0.05)
    p.add_argument("--client-records", type=int, default=128, help="client mode: per client")
    p.add_argument("--client-batch", type=int, default=8, help="client mode: batch per step")
    p.add_argument("--modes", default="record,client")
    p.add_argument("--eval-size", type=int, default=64)
    p.add_argument("--accuracy-size", type=int, default=0)
    p.add_argument("--physical", type=int, default=8, help="record mode: examples per pass")
    p.add_argument("--step-only", action="store_true", help="only time one step, DP or not")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).parent))
        from ray_overhead import tiny_model_dir

        args.model = tiny_model_dir(Path(tempfile.mkdtemp(prefix="parablock-dp-")))
        args.blocks, args.records, args.batch, args.rounds = "all", 64, 8, 3
        args.max_length, args.eval_size, args.client_clients = 96, 16, 4
        args.client_records, args.client_batch = 32, 4
    logging.basicConfig(level=logging.WARNING)
    if args.step_only:
        step_cost(args)
        return 0
    root = Path(args.out or tempfile.mkdtemp(prefix="parablock-privacy-"))
    rows = []
    modes = args.modes.split(",")
    if "record" in modes:
        reference = run(from_dict(config(args, root / "none", {"mode": "none"}, 2)))
        rows.append(row("record, non-private", reference, None))
        for eps in (float(e) for e in args.epsilons.split(",") if e):
            priv = {"mode": "record", "target_epsilon": eps, "clip_norm": args.clip}
            s = run(from_dict(config(args, root / f"record-{eps:g}", priv, 2)))
            rows.append(row(f"record, epsilon {eps:g}", s, reference))
    if "client" in modes:  # many clients with little data each: their own records and batch
        n = args.client_clients
        args.records, args.batch = args.client_records, args.client_batch
        client_ref = run(
            from_dict(config(args, root / "client-none", {"mode": "none"}, n, aggregator="mean"))
        )
        rows.append(row(f"{n} clients, non-private", client_ref, None))
        priv = {"mode": "client", "target_epsilon": 8.0, "clip_norm": args.client_clip}
        s = run(from_dict(config(args, root / "client-8", priv, n, aggregator="mean")))
        rows.append(row(f"{n} clients, client-level epsilon 8", s, client_ref))
    print(
        f"\n{args.model}: {args.records} records per site, expected batch {args.batch}, "
        f"{args.local_steps} local steps, {args.rounds} rounds, blocks {args.blocks}, delta 1e-5"
    )
    print(
        "| run | epsilon | sigma | held-out loss | improvement kept | accuracy | compute s/round "
        "| peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        sigma = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3g}"
        acc = r["accuracy"]
        acc_text = "-" if acc[0] is None else f"{acc[0]:.3f} -> {acc[1]:.3f}"
        print(
            f"| {r['run']} | {r['epsilon']:.3g} | {sigma} | {r['initial_loss']:.4f} -> "
            f"{r['final_loss']:.4f} | {r['kept']:.0%} | {acc_text} | "
            f"{r['compute_s_per_round']:.2f} | {r['peak_rss_mb']:,.0f} |"
        )
    (root / "privacy.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
