"""What secure aggregation adds (``privacy.secure_aggregation``), in two tables.

1. Per block, with n clients: a client's encode + mask seconds (one ChaCha20 stream per other
   client), the server's sum + decode seconds, the server's recovery after one dropout (Shamir
   reconstruction from t shares, then the dangling streams of every contributor), the bytes of one
   update (masked uint64 against fp32), the upload a round adds over the unmasked run, and the
   one-time setup bytes per client. A SmolLM2-135M decoder layer (3,540,096 coordinates) with 2, 4
   and 8 clients, and the tests' tiny model's layer with 32.
2. ParaBlock against FedBCD with secure aggregation off and on, on an emulated link whose
   bandwidth makes an fp32 upload + download take about a round's compute: does the overlap still
   hide the larger masked upload? (Off = the same client-level clipping and mean, no encoding.)

    .venv/bin/python benchmarks/secagg.py                # SmolLM2-135M; ~15 minutes on 2 cores
    .venv/bin/python benchmarks/secagg.py --quick        # tiny sizes: a smoke check
    .venv/bin/python benchmarks/secagg.py --skip-speedup # table 1 only
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

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from parablock.config import Config, from_dict
from parablock.core import secagg, shamir
from parablock.model.blocks import model_blocks
from parablock.model.load import load_model
from parablock.run.runner import run
from parablock.wire.messages import BlockUpdate
from parablock.wire.protocol import SecAggCall, SecAggReply

SESSION = b"benchmark-secagg"
SMOLLM2_LAYER = {  # SmolLM2-135M's decoder layer: 3,540,096 coordinates
    "self_attn.q_proj.weight": (576, 576),
    "self_attn.k_proj.weight": (192, 576),
    "self_attn.v_proj.weight": (192, 576),
    "self_attn.o_proj.weight": (576, 576),
    "mlp.gate_proj.weight": (1536, 576),
    "mlp.up_proj.weight": (1536, 576),
    "mlp.down_proj.weight": (576, 1536),
    "input_layernorm.weight": (576,),
    "post_attention_layernorm.weight": (576,),
}
TINY_LAYER = {  # the tests' tiny Llama (hidden 64, intermediate 128)
    "self_attn.q_proj.weight": (64, 64),
    "self_attn.k_proj.weight": (64, 64),
    "self_attn.v_proj.weight": (64, 64),
    "self_attn.o_proj.weight": (64, 64),
    "mlp.gate_proj.weight": (128, 64),
    "mlp.up_proj.weight": (128, 64),
    "mlp.down_proj.weight": (64, 128),
    "input_layernorm.weight": (64,),
    "post_attention_layernorm.weight": (64,),
}


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def block_costs(shapes: dict, n: int, repeats: int, scale_bits: int = 32) -> dict:
    """One block, n clients: what masking, summing and one dropout's recovery cost."""
    layout = secagg.layout_of(shapes)
    coords = sum(int(np.prod(s)) for _, s in layout)
    enc = secagg.Encoding(1.0, scale_bits)
    enc.check(n, "privacy.secagg_scale_bits")
    keys = [X25519PrivateKey.generate() for _ in range(n)]
    pub = [secagg.public_bytes(k) for k in keys]
    pair = secagg.all_mask_keys(keys, SESSION)
    g = torch.Generator().manual_seed(0)
    delta = {name: torch.randn(s, generator=g) * 1e-4 for name, s in layout}

    def client():
        return secagg.mask(enc.encode(delta, layout), 0, pair[0], 7, 3)

    client_s = _best(client, repeats)
    masked = [secagg.mask(enc.encode(delta, layout), u, pair[u], 7, 3) for u in range(n)]

    def server(updates):
        total = updates[0].copy()
        for m in updates[1:]:
            total += m
        return total

    server_s = _best(lambda: enc.decode(server(masked), n, layout), repeats)
    # one dropout (client 0 before its upload): t shares rebuild its key, then the dangling
    # streams of every contributor are removed
    t = n // 2 + 1
    secret = int.from_bytes(secagg.private_bytes(keys[0]), "big")
    shares = shamir.split(secret, n, t)

    def recover():
        key = X25519PrivateKey.from_private_bytes(
            shamir.combine(shares[1 : 1 + t], t).to_bytes(32, "big")
        )
        survivors = list(range(1, n))
        ks = {
            s: secagg.pair_key(key, pub[s], SESSION, 0, s, secagg.MASK_PURPOSE) for s in survivors
        }
        total = server(masked[1:])
        total -= secagg.dangling(survivors, 0, ks, 7, 3, coords)
        return enc.decode(total, n - 1, layout)

    # with n = 2 (t = 2) one survivor cannot rebuild a key: such a round fails instead
    recover_s = _best(recover, repeats) if n - 1 >= t else None
    fp32 = len(BlockUpdate(0, 7, 3, 6, 16, 0.0, delta).serialize())
    wire = len(BlockUpdate(0, 7, 3, 6, 16, 0.0, secagg.as_wire(masked[0], layout)).serialize())
    roster = SecAggReply(SESSION.hex(), {c: p.hex() for c, p in enumerate(pub)})
    sealed = {
        v: secagg.seal(bytes(32), shamir.to_bytes(shares[v]), SESSION, 0, v).hex()
        for v in range(1, n)
    }
    setup = len(roster.to_bytes()) + len(SecAggCall("shares", sealed=sealed).to_bytes())
    return {
        "clients": n,
        "coords": coords,
        "client_mask_s": client_s,
        "server_sum_s": server_s,
        "recover_one_s": recover_s,
        "update_mb": wire / 1e6,
        "fp32_mb": fp32 / 1e6,
        "added_upload_mb_per_round": n * (wire - fp32) / 1e6,
        "setup_kb_per_client": setup / 1e3,
    }


def _s(seconds: float | None) -> str:
    return "n/a (t = n)" if seconds is None else f"{seconds:.3f}"


def print_costs(rows: list[dict]) -> None:
    print(
        "| block | clients | client encode+mask s | server sum+decode s | one-dropout recovery "
        "s | update MB (fp32 -> uint64) | added upload MB/round | setup kB/client |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} ({r['coords']:,}) | {r['clients']} | {r['client_mask_s']:.3f} | "
            f"{r['server_sum_s']:.3f} | {_s(r['recover_one_s'])} | {r['fp32_mb']:.1f} -> "
            f"{r['update_mb']:.1f} | {r['added_upload_mb_per_round']:.1f} | "
            f"{r['setup_kb_per_client']:.1f} |"
        )


# -- ParaBlock vs FedBCD with secure aggregation off and on ---------------------------------------
def _config(args, out: Path, algorithm: str, mbps: float, secure: bool, rounds: int) -> Config:
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
                "aggregator": "mean",
                "update_bound": False,
            },
            "privacy": {
                "mode": "client",
                "clip_norm": 1.0,
                "noise_multiplier": 0.0,
                "secure_aggregation": secure,
            },
            "link": {"up_mbps": mbps, "down_mbps": mbps, "latency_ms": args.latency_ms},
            "eval": {"size": args.eval_size, "accuracy_size": 0},
            "run": {"out": str(out), "seed": 0, "log_level": "warning", "checkpoint": False},
        }
    )


def _steady(run_dir: Path) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(r["round_s"] for r in rows if r["kind"] == "round" and r["round"] > 0)


def speedups(args, work: Path) -> list[dict]:
    cal = run(_config(args, work / "calibrate", "fedbcd", float("inf"), False, 2))
    t_comp = cal["mean_compute_s"]
    model = load_model(args.model)
    block = model_blocks(model)[-1]
    nbytes = sum(p.numel() * 4 for n, p in model.named_parameters() if n in block.param_names)
    lat = args.latency_ms / 1000
    mbps = 2 * nbytes * 8 / max(t_comp - 2 * lat, 0.05) / 1e6
    print(f"\ncalibration: T_comp = {t_comp:.2f}s -> links of {mbps:.1f} Mbit/s each way")
    rows = []
    for secure in (False, True):
        res = {}
        for alg in ("fedbcd", "parablock"):
            out = work / f"{alg}-{int(secure)}"
            s = run(_config(args, out, alg, mbps, secure, args.rounds))
            s["steady_round_s"] = _steady(out)
            res[alg] = s
        fb, pb = res["fedbcd"], res["parablock"]
        rows.append(
            {
                "secure": secure,
                "fedbcd_round_s": fb["steady_round_s"],
                "parablock_round_s": pb["steady_round_s"],
                "t_comp": fb["mean_compute_s"],
                "t_comm": fb["mean_comm_s"],
                "bytes_up": pb["bytes_up"],
                "speedup": fb["steady_round_s"] / pb["steady_round_s"],
                "ideal": fb["ideal_speedup"],
            }
        )
    print(
        "\n| secure aggregation | FedBCD round s | ParaBlock round s | T_comp s | T_comm s | "
        "bytes up (MB) | speed-up | ideal | measured / ideal |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {'on' if r['secure'] else 'off'} | {r['fedbcd_round_s']:.2f} | "
            f"{r['parablock_round_s']:.2f} | {r['t_comp']:.2f} | {r['t_comm']:.2f} | "
            f"{r['bytes_up'] / 1e6:.1f} | {r['speedup']:.3f} | {r['ideal']:.3f} | "
            f"{r['speedup'] / r['ideal']:.1%} |"
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--blocks", default="top:4")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--local-steps", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-size", type=int, default=128)
    p.add_argument("--eval-size", type=int, default=4)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-speedup", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    big = [2, 4, 8] if not args.quick else [2]
    rows = [{"name": "SmolLM2 layer", **block_costs(SMOLLM2_LAYER, n, args.repeats)} for n in big]
    rows.append({"name": "tiny layer", **block_costs(TINY_LAYER, 32, args.repeats)})
    print_costs(rows)
    result = {"blocks": rows}
    if not args.skip_speedup:
        if args.quick:
            args.rounds, args.train_size, args.max_length = 3, 16, 128
        work = Path(tempfile.mkdtemp(prefix="parablock-secagg-"))
        try:
            result["speedup"] = speedups(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
