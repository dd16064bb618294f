"""The GPU check: step time per block in bf16, peak GPU memory, and ParaBlock against FedBCD over
emulated links where communication matches computation, on one GPU in a few minutes.

Per model (SmolLM2-135M, ``arch:llama-3.2-1b`` and, where one GPU and the host hold two clients,
``arch:llama-3-8b``; ``arch:`` models have random weights: their loss means nothing, their times
and memory do):

1. **Step**: one client's model on the device, frozen weights in bf16 (``model.frozen_dtype``),
   the forward under bf16 autocast; K AdamW steps of batch B x S on the top and the lowest
   trained block, timed after a warm-up; the peak GPU memory of that (``max_memory_allocated``).
2. **Rounds**: ``federation.clients`` clients on the device (``run.client_devices``), the server
   on the CPU, links emulated at the speed where uploading and downloading one fp32 block takes
   as long as a round's compute (``16 x block bytes / T_comp`` bit/s each way), ParaBlock and
   FedBCD on identical data and seeds: their mean round times, the speed-up against the ideal
   one the run reports, the peak GPU memory of the run.

A model whose memory plan (``model/devices.py``: weights, trained blocks, optimizer; plus a margin
for activations) does not fit the free GPU memory, or whose fp32 copies (one per client and the
server's, while loading) do not fit the host's, is skipped with the reason.

    .venv/bin/python benchmarks/gpu.py                          # on cuda
    .venv/bin/python benchmarks/gpu.py --device cpu --tiny      # arch:tiny-llama: a smoke check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from parablock.config import from_dict  # noqa: E402
from parablock.data.examples import Example  # noqa: E402
from parablock.model.blocks import model_blocks, select_blocks  # noqa: E402
from parablock.model.devices import memory_plan, train_device  # noqa: E402
from parablock.model.frozen import hold_frozen  # noqa: E402
from parablock.model.load import build_meta_model, load_model  # noqa: E402
from parablock.model.train import TrainSettings, train_block  # noqa: E402
from parablock.run.runner import run  # noqa: E402

MODELS = ("smollm2-135m-instruct", "arch:llama-3.2-1b", "arch:llama-3-8b")
ACTIVATION_MARGIN = 1.5  # the plan covers weights and optimizer; activations come on top


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _host_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def fits(name: str, args, device: torch.device) -> str:
    """Why ``name`` cannot run here ("" when it can)."""
    params = sum(p.numel() for p in build_meta_model(name).parameters())
    host_need = (args.clients + 1) * 4 * params  # every client's fp32 load and the server's
    if host_need > 0.85 * _host_available():
        return f"host memory: needs ~{host_need / 2**30:.0f} GB for {args.clients + 1} fp32 copies"
    if device.type == "cuda":
        plan = memory_plan(name, args.blocks, args.frozen_dtype)
        need = args.clients * plan["total"] * ACTIVATION_MARGIN
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.9 * free:
            return f"GPU memory: {args.clients} clients need ~{need / 2**30:.0f} GB, {free / 2**30:.0f} GB free"
    return ""


def step_time(name: str, args, device: torch.device) -> dict:
    """Seconds of K steps on the top and the lowest trained block, one client, on ``device``."""
    model = load_model(name)
    blocks = model_blocks(model)
    selected = select_blocks(blocks, args.blocks)
    trained = {n for b in selected for n in blocks[b].param_names}
    hold_frozen(model, name, trained, args.frozen_dtype)
    model = model.to(device)
    gen = torch.Generator().manual_seed(0)
    vocab = min(model.config.vocab_size, 49152)  # the tokenizer's ids
    data = []
    for _ in range(args.batch_size):
        ids = tuple(torch.randint(0, vocab, (args.seq_len,), generator=gen).tolist())
        data.append(Example(ids, ids))
    batches = [list(range(args.batch_size))] * args.local_steps
    settings = TrainSettings(args.local_steps, args.batch_size, 1e-4, precision=args.precision)
    _reset_peak(device)
    times = {}
    for b in (selected[-1], selected[0]):
        train_block(model, blocks[b], data, batches[:1], settings, 0)  # warm-up
        _sync(device)
        start = time.perf_counter()
        train_block(model, blocks[b], data, batches, settings, 0)
        _sync(device)
        times[b] = time.perf_counter() - start
    params = dict(model.named_parameters())
    block_bytes = sum(params[n].numel() * 4 for n in blocks[selected[-1]].param_names)
    peak = _peak_gb(device)
    del model, params
    return {
        "block_mb": block_bytes / 2**20,
        "step_s": {f"block {b}": t / args.local_steps for b, t in times.items()},
        "compute_s": sum(times.values()) / len(times),
        "step_peak_gb": peak,
        "block_bytes": block_bytes,
    }


def rounds(name: str, args, device: torch.device, mbps: float, work: Path) -> dict:
    """ParaBlock and FedBCD on identical runs; mean round times and the run's peak GPU memory."""
    out = {}
    for algorithm in ("fedbcd", "parablock"):
        cfg = {
            "model": {
                "name_or_path": name,
                "blocks": args.blocks,
                "frozen_dtype": args.frozen_dtype,
            },
            "data": {"train_size": args.train_size, "max_length": args.seq_len},
            "federation": {
                "algorithm": algorithm,
                "clients": args.clients,
                "rounds": args.rounds,
                "local_steps": args.local_steps,
                "batch_size": args.batch_size,
                "lr": 1e-4,
            },
            "train": {"precision": args.precision},
            "link": {"up_mbps": mbps, "down_mbps": mbps, "latency_ms": 0.0},
            "eval": {"size": 1, "accuracy_size": 0, "batch_size": 1},
            "run": {
                "out": str(work / name.replace(":", "-") / algorithm),
                "client_devices": str(device),
                "log_level": "warning",
                "checkpoint": False,
            },
        }
        _reset_peak(device)
        s = run(from_dict(cfg))
        out[algorithm] = {
            "mean_round_s": s["mean_round_s"],
            "mean_compute_s": s["mean_compute_s"],
            "mean_comm_s": s["mean_comm_s"],
            "ideal_speedup": s["ideal_speedup"],
            "peak_gb": _peak_gb(device),
            "peak_rss_mb": s["peak_rss_mb"],
        }
    return out


def measure(args) -> list[dict]:
    device = train_device(args.device, "--device")
    work = args.out or Path(tempfile.mkdtemp(prefix="parablock-gpu-"))
    rows = []
    for name in args.models.split(","):
        why = fits(name, args, device)
        if why:
            print(f"{name}: skipped ({why})", file=sys.stderr, flush=True)
            rows.append({"model": name, "skipped": why})
            continue
        print(f"{name}: step time on {device}", file=sys.stderr, flush=True)
        row = {"model": name, **step_time(name, args, device)}
        # links where uploading and downloading one fp32 block takes a round's compute
        mbps = 16 * row["block_bytes"] / row["compute_s"] / 1e6
        print(f"{name}: rounds over {mbps:.0f} Mbit/s links", file=sys.stderr, flush=True)
        row.update(link_mbps=mbps, **rounds(name, args, device, mbps, work))
        row["speedup"] = row["fedbcd"]["mean_round_s"] / row["parablock"]["mean_round_s"]
        rows.append(row)
    return rows


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} GB"


def table(rows: list[dict], args) -> str:
    lines = [
        f"{args.clients} clients on {args.device}, blocks {args.blocks}, K={args.local_steps}, "
        f"batch {args.batch_size}x{args.seq_len}, precision {args.precision}, frozen "
        f"{args.frozen_dtype}, {args.rounds} rounds",
        "",
        "| model | block | step s (top / lowest block) | peak GPU, 1 client | link Mbit/s | "
        "FedBCD round s | ParaBlock round s | speed-up | ideal | peak GPU, run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | skipped: {r['skipped']} |||||||||")
            continue
        steps = " / ".join(f"{t:.3f}" for t in r["step_s"].values())
        pb, fb = r["parablock"], r["fedbcd"]
        peaks = [x for x in (pb["peak_gb"], fb["peak_gb"]) if x is not None]
        lines.append(
            f"| {r['model']} | {r['block_mb']:.1f} MB | {steps} | {_gb(r['step_peak_gb'])} | "
            f"{r['link_mbps']:.0f} | {fb['mean_round_s']:.2f} | {pb['mean_round_s']:.2f} | "
            f"{r['speedup']:.2f}x | {pb['ideal_speedup']:.2f}x | "
            f"{_gb(max(peaks) if peaks else None)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    p.add_argument(
        "--models",
        default="",
        help=f"comma list of model.name_or_path (default: {','.join(MODELS)})",
    )
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--blocks", default="top:4")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--train-size", type=int, default=128)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32", "auto"))
    p.add_argument("--frozen-dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--out", type=Path, default=None, help="run directories (default: temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument(
        "--tiny", action="store_true", help="arch:tiny-llama, small shapes: a smoke check"
    )
    args = p.parse_args(argv)
    args.models = args.models or ("" if args.tiny else ",".join(MODELS))
    logging.basicConfig(level=logging.WARNING)
    if args.tiny:
        args.models, args.rounds, args.local_steps = args.models or "arch:tiny-llama", 2, 1
        args.batch_size, args.seq_len, args.train_size, args.blocks = 2, 256, 16, "top:2"
    if args.device == "cpu" and args.precision == "bf16":
        args.precision = "auto"  # bf16 where this CPU does it fast, else fp32
        args.frozen_dtype = "fp32" if not _cpu_bf16() else args.frozen_dtype
    rows = measure(args)
    print()
    print(table(rows, args))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0


def _cpu_bf16() -> bool:
    from parablock.model.forward import bf16_is_fast

    return bf16_is_fast(torch.device("cpu"))


if __name__ == "__main__":
    sys.exit(main())
