"""Fault injection at scale: a 30-round tiny-model federation with 100+ injected faults of every
kind (``parablock.transport.faults.KINDS``), on each backend (local, ray, and a real network: a
``parablock server`` and one ``parablock client --faults`` process per client on loopback, TLS
and tokens).

For every backend it reports the faults injected (planned from the seeded spec; each fires once),
whether the run survived (completed every round and the drain), rounds completed, updates accepted
and rejected, clients dropped, and whether the final global model is bit-for-bit the model of a
fault-free replay (local backend) in which the server only withheld the updates that the faulty
run did not aggregate (``faults.withhold``, participants read back from ``metrics.jsonl``).
A global model is counted as corrupted if it is not finite. Equality with the replay is exact
as long as no client rejoined behind: a stall (or a crash restarted after its round closed) makes
its client drop its stale delta and resynchronise, a different but legitimate trajectory that a
replay which only withholds updates cannot follow (``--kinds`` without stall checks equality).

    .venv/bin/python benchmarks/faults.py                  # 30 rounds, 8 clients, all backends
    .venv/bin/python benchmarks/faults.py --backends local # one backend
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from network import child_env, parablock_exe, start, stop, tail
from ray_overhead import tiny_model_dir

from parablock.backends.local import run_local
from parablock.config import from_dict
from parablock.model.load import model_fingerprint
from parablock.run.runner import prepare, run
from parablock.tools.report import latest_rows
from parablock.transport.faults import KINDS, parse, stall_seconds, withhold

SOURCE = "reasoning_gym:basic_arithmetic"


def config(args, model: str, out: Path, faults: str, per_client: bool = False) -> dict:
    data = {"source": SOURCE, "train_size": 16 * args.clients, "max_length": 96}
    if per_client:
        data.update(partition="per_client", client_sources=";".join([SOURCE] * args.clients))
    return {
        "model": {"name_or_path": model, "blocks": "all"},
        "data": data,
        "federation": {
            "clients": args.clients,
            "rounds": args.rounds,
            "local_steps": 1,
            "batch_size": 2,
            "lr": args.lr,
            "min_clients": 1,
            "round_timeout_s": args.round_timeout_s,
        },
        "link": {"up_mbps": float("inf"), "down_mbps": float("inf"), "latency_ms": 0.0},
        "eval": {"size": 16, "accuracy_size": 0, "batch_size": 8},
        "run": {"out": str(out), "seed": 0, "threads": 1, "faults": faults, "log_level": "warning"},
    }


def planned(spec: str, clients: int, rounds: int, seed_of) -> Counter:
    """The faults the spec injects: one per (client, round) upload it names (each fires once)."""
    got: Counter = Counter()
    for c in range(clients):
        plan = parse(spec, seed_of(c))
        for r in range(rounds):
            kind = plan.at(c, r)
            if kind is not None:
                got[kind] += 1
    return got


def participants(run_dir: Path) -> dict[int, list[int]]:
    rows = latest_rows(
        [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    )
    return {r["round"]: r["participants"] for r in rows if r.get("kind") == "round"}


def replay(cfg: dict, who: dict[int, list[int]], work: Path) -> str:
    """The fault-free run in which the server takes exactly ``who``'s updates each round."""
    cfg = json.loads(json.dumps(cfg))
    cfg["run"].update(faults="", out=str(work / "replay"))
    f = prepare(from_dict(cfg))
    ckpt = str(work / "replay" / "checkpoint")
    withhold(f.server, who)
    run_local([replace(s, checkpoint_dir=ckpt) for s in f.placements], f.server, threads=1)
    return model_fingerprint(f.model)


def in_process(args, model: str, spec: str, backend: str, work: Path) -> dict:
    cfg = config(args, model, work / "run", spec)
    cfg["run"]["backend"] = backend
    started = time.perf_counter()
    summary = run(from_dict(cfg))
    wall = time.perf_counter() - started
    who = participants(work / "run")
    final = model_fingerprint_of(work / "run" / "model")
    return {
        "backend": backend,
        "injected": planned(spec, args.clients, args.rounds, lambda c: 0),
        "summary": summary,
        "wall_s": wall,
        "finite": final[1],
        "heldout_loss": heldout_loss(work / "run" / "model"),
        "equal_replay": summary["final_model_fingerprint"] == replay(cfg, who, work),
        "rounds_done": len(who),
        "clients_equal": None,
    }


def model_fingerprint_of(path: Path) -> tuple[str, bool]:
    from parablock.model.load import load_model

    m = load_model(str(path))
    finite = all(torch.isfinite(p).all() for p in m.parameters())
    return model_fingerprint(m), bool(finite)


def network(args, model: str, spec: str, work: Path) -> dict:
    exe, env = parablock_exe(), child_env()
    creds = work / "creds"
    subprocess.run(
        [exe, "certs", str(creds), "--clients", str(args.clients)],
        check=True,
        env=env,
        capture_output=True,
    )
    cfg = config(args, model, work / "run", "", per_client=True)
    # nine processes share the cores: a round deadline that rides out a busy machine
    timeout = max(args.round_timeout_s, args.network_round_timeout_s)
    cfg["federation"]["round_timeout_s"] = timeout
    cfg["link"]["up_mbps"] = cfg["link"]["down_mbps"] = 1e9  # TOML has no inf
    path = work / "config.toml"
    path.write_text(from_dict(cfg).to_toml())
    sets = {
        "server.address": "127.0.0.1:0",
        "server.tls_cert": creds / "server.pem",
        "server.tls_key": creds / "server.key",
        "server.clients_file": creds / "clients.toml",
        "server.join_timeout_s": 300,
    }
    server_cmd = [exe, "server", "--config", str(path)]
    server_cmd += [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    procs = []
    started = time.perf_counter()
    try:
        server = start(server_cmd, work / "server.log")
        procs.append(server)
        port = None
        while port is None:
            import re

            m = re.search(r"listening on \S+ \(port (\d+),", (work / "server.log").read_text())
            if m:
                port = int(m.group(1))
            elif server.poll() is not None:
                raise RuntimeError(f"the server did not start:\n{tail(work / 'server.log')}")
            time.sleep(0.2)
        for i in range(args.clients):
            cmd = [exe, "client", "--server", f"localhost:{port}", "--ca", str(creds / "ca.pem")]
            cmd += ["--id", str(i), "--token-file", str(creds / f"client-{i}.token")]
            cmd += ["--data", SOURCE, "--model", model, "--out", str(work / f"site-{i}")]
            cmd += ["--threads", "1", "--faults", spec, "--log-level", "warning"]
            cmd += ["--reconnect-s", "5", "--stall-s", str(stall_seconds(timeout))]
            procs.append(start(cmd, work / f"client-{i}.log"))
        codes = [p.wait(timeout=args.timeout) for p in procs[1:]] + [server.wait(args.timeout)]
    finally:
        for p in reversed(procs):
            stop(p)
    wall = time.perf_counter() - started
    # A client stalled (30 s) past the end of a short run finds the server gone: after its
    # reconnect window it exits 2 saying so. That is the right end for it, not a failure.
    outlived = [
        i
        for i, code in enumerate(codes[:-1])
        if code == 2 and "cannot reach the ParaBlock server" in tail(work / f"client-{i}.log", 1)
    ]
    if codes[-1] or any(c for i, c in enumerate(codes[:-1]) if i not in outlived):
        raise RuntimeError(f"exit codes {codes}; server log:\n{tail(work / 'server.log')}")
    summary = json.loads((work / "run" / "summary.json").read_text())
    who = participants(work / "run")
    sites = [
        json.loads((work / f"site-{i}" / "summary.json").read_text())["final_model_fingerprint"]
        for i in range(args.clients)
        if i not in outlived
    ]
    cfg["run"]["out"] = str(work / "unused")
    return {
        "backend": "network",
        "injected": planned(spec, args.clients, args.rounds, lambda c: c),
        "summary": summary,
        "wall_s": wall,
        "finite": model_fingerprint_of(work / "run" / "model")[1],
        "heldout_loss": heldout_loss(work / "run" / "model"),
        "equal_replay": summary["final_model_fingerprint"] == replay(cfg, who, work),
        "rounds_done": len(who),
        "clients_equal": all(s == summary["final_model_fingerprint"] for s in sites),
        "outlived": outlived,
    }


def heldout_loss(model_dir: Path) -> float:
    """A final model's loss on one fixed held-out draw (the same items for every backend and for
    the fault-free run, whichever held-out data a run evaluated on itself)."""
    from parablock.data.examples import encode_all
    from parablock.data.sources import heldout_draw
    from parablock.evaluation.evaluate import eval_loss
    from parablock.model.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    records = heldout_draw(SOURCE, 32, 12345, "")
    data = encode_all(records, tokenizer, 96, "held-out")
    return eval_loss(load_model(str(model_dir)), data, 8, tokenizer.pad_token_id)


def clean(args, model: str, work: Path) -> float:
    """The fault-free run's final held-out loss (the same config, no faults, local backend)."""
    run(from_dict(config(args, model, work / "clean", "")))
    return heldout_loss(work / "clean" / "model")


def report(results: list[dict], rounds: int, clean_loss: float) -> None:
    print(
        "\n| backend | faults injected | survived | rounds | accepted | rejected | dropped "
        "| corrupted models | = replay | clients = server | outlived the run | held-out loss "
        "| vs fault-free | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["summary"]
        corrupted = int(not r["finite"])
        loss = r["heldout_loss"]
        print(
            f"| {r['backend']} | {sum(r['injected'].values())} | yes | {r['rounds_done']}/{rounds} "
            f"| {s['updates_accepted']} | {s['updates_rejected']} | {len(s['clients_dropped'])} "
            f"| {corrupted} | {r['equal_replay']} | {r['clients_equal']} "
            f"| {len(r.get('outlived', []))} | {loss:.4f} | {loss / clean_loss - 1:+.2%} "
            f"| {r['wall_s']:.0f} |"
        )
    print(f"fault-free run (local): held-out loss {clean_loss:.4f}")
    print("\nfaults injected by kind:")
    kinds = list(KINDS)
    print("| backend | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for r in results:
        print(f"| {r['backend']} | " + " | ".join(str(r["injected"][k]) for k in kinds) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rate", type=float, default=0.6, help="fault probability per upload")
    p.add_argument("--round-timeout-s", type=float, default=2.0)
    p.add_argument("--network-round-timeout-s", type=float, default=6.0)
    p.add_argument("--lr", type=float, default=1e-2, help="client lr (the tiny model learns)")
    p.add_argument("--backends", default="local,ray,network")
    p.add_argument("--kinds", default="", help="comma-separated fault kinds (default: all)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", default="")
    args = p.parse_args()
    # A stall takes its client out for many rounds (it outlasts the round deadline, and a round
    # of the tiny model is far shorter): it gets a quarter of the others' share, so that most
    # rounds keep a client with a clean update (a round with none fails, as min_clients says).
    kinds = args.kinds.split(",") if args.kinds else list(KINDS)
    weights = {k: 0.25 if k == "stall" else 1.0 for k in kinds}
    total = sum(weights.values())
    spec = ",".join(f"{k}~{args.rate * w / total:.5f}" for k, w in weights.items())
    root = Path(args.out or tempfile.mkdtemp(prefix="parablock-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    model = tiny_model_dir(root)
    results = []
    for backend in args.backends.split(","):
        work = root / backend
        work.mkdir()
        print(f"{backend}: {args.rounds} rounds, {args.clients} clients, faults {spec}", flush=True)
        if backend == "network":
            results.append(network(args, model, spec, work))
        else:
            results.append(in_process(args, model, spec, backend, work))
    report(results, args.rounds, clean(args, model, root))
    (root / "faults.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
