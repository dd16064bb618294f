"""ParaBlock on Flower: speed-up over FedBCD under Flower, and Flower's per-round overhead.

A local Flower deployment (``parablock.flower.local``: one SuperLink, one SuperNode and one
``parablock flower-worker`` per client, insecure loopback) runs the app ``parablock flower new``
writes, for ParaBlock and for FedBCD, on SmolLM2-135M (embedded) with each worker's links
emulated (``--emulate-*``) so that communication ≈ computation. Calibration as in network.py: a
short local FedBCD run on unlimited links measures T_comp (the slowest client's compute per
round) and the block payload, and the symmetric bandwidth makes upload + download ≈ T_comp. The
same config then runs as ``parablock server`` + ``parablock client`` processes on the same links
(network.py's ``run_network``), for the overhead of Flower's messaging over ParaBlock's own gRPC.

Reported, per transport: mean and steady (t > 0) round time, compute and communication per round
(communication = upload + wait + download as the clients measure it, so under Flower it includes
Flower's messaging: the SuperNode's 3 s idle poll and a fresh ClientApp process per message);
ParaBlock's speed-up over FedBCD (steady rounds) against two ideals: (a) from the FedBCD run's
own T_comp and T_comm, the standard one (T_comp + T_comm) / max(T_comp, T_comm), and (b) from the
emulated links alone, i.e. as if Flower's messaging cost nothing; the achieved share of the gain
(speed-up - 1) / (ideal - 1) (target >= 80% of (a)). Flower's per-round overhead is its steady
round time minus the gRPC transport's, per algorithm. Every process is stopped by PID.

    .venv/bin/python benchmarks/flower.py            # SmolLM2-135M, 6 rounds (~20 min, 2 cores)
    .venv/bin/python benchmarks/flower.py --quick    # a tiny random Llama (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from network import SOURCES, base_config, calibrate, parablock_exe, run_network, run_to_end
from ray_overhead import steady_round_s, tiny_model_dir, with_

from parablock.flower.local import LocalDeployment, Site
from parablock.model.load import EMBEDDED

ALGORITHMS = ("parablock", "fedbcd")


def run_flower(base: dict, alg: str, link: dict, args, model: str, out: Path) -> dict:
    out.mkdir(parents=True)
    cfg = out / "config-in.toml"
    cfg.write_text(with_(base, federation={"algorithm": alg}, run={"out": ""}).to_toml())
    app = out / "app"
    run_to_end(
        [parablock_exe(), "flower", "new", str(app), "--config", str(cfg)], out / "new.log", 120
    )
    emulate = (
        "--emulate-up-mbps",
        repr(link["up_mbps"]),
        "--emulate-down-mbps",
        repr(link["down_mbps"]),
        "--emulate-latency-ms",
        repr(link["latency_ms"]),
    )
    sites = [
        Site(i, src, out / f"site-{i}", emulate) for i, src in enumerate(args.sources.split(";"))
    ]
    started = time.perf_counter()
    with LocalDeployment(out / "flower", model, sites) as d:
        done = d.submit(app, f'parablock-set="run.out={out / "run"}"', timeout=args.timeout)
        if done.returncode != 0 or not (out / "run" / "summary.json").exists():
            raise RuntimeError(f"flwr run failed:\n{done.stdout[-3000:]}\n{d.logs()}")
        codes = d.wait_workers(120)
        if codes != [0] * len(sites):
            raise RuntimeError(f"workers ended with {codes}:\n{d.logs()}")
    s = json.loads((out / "run" / "summary.json").read_text())
    s["process_s"] = time.perf_counter() - started
    s["steady_round_s"] = steady_round_s(s["run_dir"])
    s["client_fingerprints"] = [
        json.loads((x.out / "summary.json").read_text())["final_model_fingerprint"] for x in sites
    ]
    return s


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a tiny random Llama")
    p.add_argument("--rounds", type=int, default=None, help="default 6 (quick: 3)")
    p.add_argument("--blocks", default=None, help="model.blocks (default top:8; quick: all)")
    p.add_argument("--sources", default=SOURCES, help="one data source per client, ';'-separated")
    p.add_argument("--train-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument(
        "--local-steps",
        type=int,
        default=None,
        help="default 8 (quick: 1): rounds long against Flower's few seconds per message",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default 4 (quick: 2)")
    p.add_argument("--eval-size", type=int, default=4)
    p.add_argument("--eval-source", default="reasoning_gym:basic_arithmetic")
    p.add_argument("--latency-ms", type=float, default=5.0)
    p.add_argument("--mbps", type=float, default=0.0, help="skip calibration: this bandwidth")
    p.add_argument(
        "--flower-overhead-s",
        type=float,
        default=None,
        help="Flower's messaging per round, left out of the links' budget (default 6, measured "
        "with --quick: the SuperNode's 3 s idle poll and a ClientApp process per message; "
        "quick: 0)",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per federated run")
    p.add_argument("--skip-network", action="store_true", help="only the Flower runs")
    p.add_argument("--out", default="bench-out/flower", help="where flower.json goes")
    p.add_argument("--keep", default="", help="keep run directories here (default: a temp dir)")
    args = p.parse_args()
    q = args.quick
    args.rounds = args.rounds or (3 if q else 6)
    args.blocks = args.blocks or ("all" if q else "top:8")
    args.local_steps = args.local_steps or (1 if q else 8)
    args.batch_size = args.batch_size or (2 if q else 4)
    if args.flower_overhead_s is None:
        args.flower_overhead_s = 0.0 if q else 6.0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None:
        raise SystemExit("Flower is not installed here: pip install 'parablock[flower]'")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="parablock-flower-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(args), "loadavg_start": os.getloadavg()}
    try:
        model = tiny_model_dir(work) if q else EMBEDDED
        base = base_config(args, model)
        if args.mbps:
            mbps, t_comp, payload = args.mbps, float("nan"), 0
        else:
            mbps, t_comp, payload = calibrate(base, args, work)
            # under Flower, communication is the links plus its messaging (--flower-overhead-s
            # a round): the links get what is left of T_comp, so that comm ≈ compute there
            left = t_comp - args.flower_overhead_s
            if left < 0.25 * t_comp:
                raise SystemExit(
                    f"T_comp={t_comp:.2f}s leaves too little for the links after Flower's "
                    f"{args.flower_overhead_s:g}s: raise --local-steps"
                )
            mbps *= t_comp / left
        link = {"up_mbps": mbps, "down_mbps": mbps, "latency_ms": args.latency_ms}
        base["link"] = link
        print(
            f"model {model}, {args.rounds} rounds x {args.local_steps} steps; T_comp "
            f"{t_comp:.2f}s, block {payload / 1e6:.2f} MB -> links {mbps:.1f} Mbit/s, "
            f"{args.latency_ms:g} ms",
            flush=True,
        )
        results["calibration"] = {"t_comp_s": t_comp, "payload_bytes": payload, "link": link}
        runs: dict[str, dict] = {}
        results["runs"] = runs
        creds = work / "creds"
        if not args.skip_network:
            clients = str(base["federation"]["clients"])
            run_to_end(
                [parablock_exe(), "certs", str(creds), "--clients", clients], work / "c.log", 60
            )
        for transport in ("flower",) + (() if args.skip_network else ("network",)):
            for alg in ALGORITHMS:
                where = work / f"{transport}-{alg}"
                if transport == "flower":
                    s = run_flower(base, alg, link, args, model, where)
                else:
                    s = run_network(base, alg, link, args, model, creds, where)
                runs[f"{transport}/{alg}"] = s
                print(
                    f"  {transport:7} {alg:9}: mean round {s['mean_round_s']:.2f}s, steady "
                    f"{s['steady_round_s']:.2f}s, compute {s['mean_compute_s']:.2f}s, comm "
                    f"{s['mean_comm_s']:.2f}s (process {s['process_s']:.0f}s)",
                    flush=True,
                )
        report(results, payload, link)
    finally:
        results["loadavg_end"] = os.getloadavg()
        (out / "flower.json").write_text(json.dumps(results, indent=2, default=str))
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"\nresults: {out / 'flower.json'}")
    return 0


def report(results: dict, payload: int, link: dict) -> None:
    runs = results["runs"]
    transports = sorted({k.split("/")[0] for k in runs})
    print(
        "\n| transport | algorithm | mean round s | steady round s | compute s | comm s | "
        "wait s | idle s | wall s | fingerprints equal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t in transports:
        for alg in ALGORITHMS:
            s = runs[f"{t}/{alg}"]
            fps = {s["final_model_fingerprint"], *s["client_fingerprints"]}
            print(
                f"| {t} | {alg} | {s['mean_round_s']:.2f} | {s['steady_round_s']:.2f} | "
                f"{s['mean_compute_s']:.2f} | {s['mean_comm_s']:.2f} | {s['mean_wait_s']:.2f} | "
                f"{s['mean_idle_s']:.2f} | {s['wall_time_s']:.1f} | "
                f"{'yes' if len(fps) == 1 else 'no'} |"
            )
    per_transfer = link["latency_ms"] / 1000 + payload * 8 / (link["up_mbps"] * 1e6)
    speed = {}
    for t in transports:
        fb, pb = runs[f"{t}/fedbcd"], runs[f"{t}/parablock"]
        c, m = fb["mean_compute_s"], fb["mean_comm_s"]
        measured = fb["steady_round_s"] / pb["steady_round_s"]
        ideal = (c + m) / max(c, m)
        links_only = (c + 2 * per_transfer) / max(c, 2 * per_transfer)
        share = (measured - 1) / (ideal - 1) if ideal > 1 else float("nan")
        share_links = (measured - 1) / (links_only - 1) if links_only > 1 else float("nan")
        speed[t] = dict(
            measured=measured,
            ideal=ideal,
            share=share,
            ideal_links=links_only,
            share_links=share_links,
            t_comp_s=c,
            t_comm_s=m,
        )
        print(
            f"{t}: ParaBlock over FedBCD {measured:.3f}x (steady rounds); ideal (a) {ideal:.3f}x "
            f"from FedBCD's T_comp {c:.2f}s and T_comm {m:.2f}s -> {100 * share:.0f}% of the gain "
            f"(target >= 80%); ideal (b) {links_only:.3f}x from the links alone "
            f"({2 * per_transfer:.2f}s a round) -> {100 * share_links:.0f}%"
        )
    results["speedup"] = speed
    if "network" in transports:
        over = {}
        for alg in ALGORITHMS:
            f, n = runs[f"flower/{alg}"]["steady_round_s"], runs[f"network/{alg}"]["steady_round_s"]
            over[alg] = {"flower_s": f, "network_s": n, "overhead_s": f - n}
            print(f"Flower's overhead per round, {alg}: {f:.2f}s vs {n:.2f}s = {f - n:+.2f}s")
        results["overhead"] = over


if __name__ == "__main__":
    sys.exit(main())
