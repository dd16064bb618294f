"""What the Ray backend costs: ParaBlock's speed-up over FedBCD on Ray, and Ray's per-round overhead.

1. Calibrate: a short local FedBCD run with unlimited links measures the compute time per round
   T_comp, and the block size gives the payload; the link bandwidth (up = down) is then chosen so
   that upload + download ≈ T_comp, where ParaBlock's ideal speed-up is close to 2.
2. Four runs with identical data, seeds, schedule and links: {ray, local} x {parablock, fedbcd},
   repeated ``--repeats`` times with the order of the backends alternated (ray first, then local
   first, ...), so that a drift in the machine's speed does not land on one backend. The Ray
   instance is up during the local runs too: its idle daemons cost both backends the same.
3. Prints the steady-state round time of each run (rounds 1.. : round 0 has nothing to
   communicate), the measured ParaBlock speed-up over FedBCD on Ray against the ideal
   (T_comp + T_comm) / max(T_comp, T_comm) from the Ray FedBCD runs' own phase times (target
   >= 90%), and the Ray backend's per-round overhead over the local one, per repeat and over all
   repeats (target <= 5% of the round time). Round times vary by several percent from run to run
   on a busy machine: run it on a quiet one.

    python benchmarks/ray_overhead.py            # SmolLM2-135M, 2 clients (minutes)
    python benchmarks/ray_overhead.py --quick    # a tiny random Llama (about a minute)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import ray
import torch

from parablock.backends.ray import ray_init
from parablock.config import Config, from_dict
from parablock.model.blocks import block_nbytes, model_blocks, select_blocks
from parablock.model.load import EMBEDDED, load_model, load_tokenizer
from parablock.run.runner import run


def tiny_model_dir(root: Path) -> str:
    """A 2-layer random Llama with the embedded model's tokenizer (fast to build and train)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(EMBEDDED)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
    )
    path = root / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def base_config(args, model: str, out: Path) -> dict:
    threads = max(1, (os.cpu_count() or 1) // args.clients)
    quick = args.quick
    return {
        "model": {"name_or_path": model, "blocks": "all" if quick else f"top:{args.blocks}"},
        "data": {"train_size": 32 if quick else 128, "max_length": 128 if quick else 256},
        "federation": {
            "clients": args.clients,
            "rounds": args.rounds,
            "local_steps": 1 if quick else 2,
            "batch_size": 2 if quick else 4,
        },
        "eval": {"size": 4 if quick else 16, "accuracy_size": 0},  # loss only: round times matter
        "run": {"out": str(out), "threads": threads, "client_cpus": float(threads)},
    }


def with_(base: dict, **sections) -> Config:
    data = json.loads(json.dumps(base))
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return from_dict(data)


def steady_round_s(run_dir: str) -> float:
    """Mean wall time of rounds 1..T-1 (round 0 has no communication in either algorithm)."""
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    secs = [r["round_s"] for r in rows if r["kind"] == "round" and r["round"] >= 1]
    return sum(secs) / len(secs)


def choose_mbps(base: dict, args, out: Path) -> tuple[float, float, int]:
    """Measure T_comp with a local FedBCD run on unlimited links; pick mbps so comm ≈ T_comp."""
    cfg = with_(
        base,
        federation={"algorithm": "fedbcd", "rounds": min(args.rounds, 3)},
        link={"up_mbps": float("inf"), "down_mbps": float("inf"), "latency_ms": 0.0},
        run={"out": str(out / "calibrate"), "backend": "local"},
    )
    t_comp = run(cfg)["mean_compute_s"]
    model = load_model(cfg.model.name_or_path)
    blocks = model_blocks(model)
    nbytes = block_nbytes(model, blocks[select_blocks(blocks, cfg.model.blocks)[-1]])
    wire = t_comp - 2 * args.latency_ms / 1000  # upload + download, each with its latency
    if wire <= 0:
        raise SystemExit(f"T_comp={t_comp:.3f}s is below twice the latency; lower --latency-ms")
    return 2 * nbytes * 8 / wire / 1e6, t_comp, nbytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny random Llama, a few rounds")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None, help="default 8 (quick: 4)")
    p.add_argument("--blocks", type=int, default=8, help="top decoder layers that train")
    p.add_argument("--latency-ms", type=float, default=5.0)
    p.add_argument("--mbps", type=float, default=0.0, help="skip calibration: use this bandwidth")
    p.add_argument("--repeats", type=int, default=2, help="runs of each of the four (default 2)")
    p.add_argument("--out", default="", help="run directories (default: a temporary directory)")
    args = p.parse_args()
    args.rounds = args.rounds or (4 if args.quick else 8)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("parablock.backends.ray").setLevel(logging.INFO)  # clients' memory use

    out = Path(args.out or tempfile.mkdtemp(prefix="ray-overhead-"))
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model_dir(out) if args.quick else EMBEDDED
    base = base_config(args, model, out)
    if args.mbps:
        mbps, t_comp, nbytes = args.mbps, float("nan"), 0
    else:
        mbps, t_comp, nbytes = choose_mbps(base, args, out)
    print(
        f"model {model}, {args.clients} clients, {args.rounds} rounds; calibration: "
        f"T_comp {t_comp:.3f}s, block {nbytes / 1e6:.2f} MB -> links {mbps:.1f} Mbit/s up and "
        f"down, {args.latency_ms:g} ms"
    )
    link = {"up_mbps": mbps, "down_mbps": mbps, "latency_ms": args.latency_ms}

    cpus = base["run"]["client_cpus"] * args.clients
    ray_init(num_cpus=max(os.cpu_count() or 1, int(cpus)))
    results: dict[tuple[int, str, str], dict] = {}
    try:
        for r in range(args.repeats):
            for backend in ("ray", "local") if r % 2 == 0 else ("local", "ray"):
                for alg in ("parablock", "fedbcd"):
                    cfg = with_(
                        base,
                        federation={"algorithm": alg},
                        link=link,
                        run={"out": str(out / f"{backend}-{alg}-{r}"), "backend": backend},
                    )
                    s = run(cfg)
                    s["steady_round_s"] = steady_round_s(s["run_dir"])
                    results[r, backend, alg] = s
    finally:
        ray.shutdown()
    report(results, args.repeats)
    print(f"run directories: {out}")


def report(results: dict[tuple[int, str, str], dict], repeats: int) -> None:
    print(
        f"\n{'repeat':6} {'backend':8} {'algorithm':10} {'round_s':>8} {'compute_s':>9} "
        f"{'comm_s':>7} {'idle_s':>7} {'eval loss':>9}"
    )
    for (r, backend, alg), s in sorted(results.items()):
        print(
            f"{r:<6} {backend:8} {alg:10} {s['steady_round_s']:8.3f} {s['mean_compute_s']:9.3f} "
            f"{s['mean_comm_s']:7.3f} {s['mean_idle_s']:7.3f} {s['final_eval_loss']:9.4f}"
        )

    def mean(backend: str, alg: str, key: str = "steady_round_s") -> float:
        return sum(results[r, backend, alg][key] for r in range(repeats)) / repeats

    measured = mean("ray", "fedbcd") / mean("ray", "parablock")
    t_comp, t_comm = mean("ray", "fedbcd", "mean_compute_s"), mean("ray", "fedbcd", "mean_comm_s")
    ideal = (t_comp + t_comm) / max(t_comp, t_comm)
    print(
        f"\nParaBlock over FedBCD on Ray: measured {measured:.3f}x, ideal {ideal:.3f}x "
        f"(from the Ray FedBCD runs' T_comp {t_comp:.3f}s and T_comm {t_comm:.3f}s) -> "
        f"{100 * measured / ideal:.1f}% of ideal (target >= 90%)"
    )
    for alg in ("parablock", "fedbcd"):
        each = []
        for r in range(repeats):
            ray_s, loc = results[r, "ray", alg]["steady_round_s"], results[r, "local", alg]
            each.append(100 * (ray_s - loc["steady_round_s"]) / loc["steady_round_s"])
        ray_s, loc = mean("ray", alg), mean("local", alg)
        print(
            f"Ray overhead per round, {alg}: {ray_s - loc:+.3f}s on {loc:.3f}s "
            f"({100 * (ray_s - loc) / loc:+.1f}%, target <= 5%; per repeat: "
            + ", ".join(f"{x:+.1f}%" for x in each)
            + ")"
        )


if __name__ == "__main__":
    main()
