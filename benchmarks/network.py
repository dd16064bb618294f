"""ParaBlock over a real network: speed-up, overhead over the simulator, raw block throughput.

1. Speed-up on the network path: a ``parablock server`` and one ``parablock client`` process per
   client on loopback (TLS, tokens from ``parablock certs``), each client with ``--threads 1``,
   its own data (``data.partition=per_client``) and emulated links chosen so that communication
   ≈ computation. Calibration as in ray_overhead.py: a short local FedBCD run on unlimited links
   measures T_comp (here: the slowest client's compute per round, since the slowest client sets
   the round time) and the block payload; the symmetric bandwidth then makes
   upload + download ≈ T_comp. Reports, for ParaBlock and FedBCD, the mean round time, compute
   and communication, the measured speed-up (FedBCD / ParaBlock mean round time), the ideal
   speed-up (T_comp + T_comm) / max(T_comp, T_comm) from the networked FedBCD run's own phase
   times (where compute and communication do not overlap) and the achieved share of the gain
   (speed-up - 1) / (ideal - 1) (target >= 90%).
2. Overhead of the network path over the local backend: the same config with ``parablock run``
   (local backend, same client sources, the same link emulation through ``link.*``,
   ``run.threads=1``) for both algorithms: mean_round_s network / local - 1 (target <= 5%), and
   whether the final model fingerprints of the local and networked runs are equal. Over
   ``--repeats`` the order alternates (network first, then local first, ...).
3. Raw block throughput over loopback, no emulation: a block of float32 tensors (14 MB, about
   one SmolLM2-135M decoder layer, and 400 MB) uploaded through a minimal gRPC service that
   decodes it with ``BlockUpdate.from_chunks`` (the server's code path: ``core.messages.decode``
   into tensors, checksum, finiteness), in plain text and in TLS (``make_trial_credentials``),
   against a plain TCP socket copy of the same bytes (``sendall`` into ``recv_into`` of a
   preallocated bytearray). Each receiver is a fresh subprocess that reports its peak RSS
   (VmHWM, reset after start-up and, for gRPC, after a 1 MB warm-up upload) above its RSS at
   that point, relative to the block size. The codec alone (encode, decode, in one process, no
   socket) is timed too: it bounds what gRPC can reach.

Every process is started with subprocess.Popen and stopped by its PID (terminate, wait, kill).
Results are printed as tables and written to ``--out``/network.json.

    .venv/bin/python benchmarks/network.py            # SmolLM2-135M, 8 rounds (~20 min, 2 cores)
    .venv/bin/python benchmarks/network.py --quick    # a tiny random Llama, small blocks (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from ray_overhead import steady_round_s, tiny_model_dir, with_

from parablock.model.load import EMBEDDED
from parablock.wire.messages import BlockUpdate

ALGORITHMS = ("parablock", "fedbcd")
SOURCES = "reasoning_gym:gsm_symbolic;reasoning_gym:quantum_lock"  # ~200 tokens per item each
LISTENING = re.compile(r"listening on \S+ \(port (\d+),")


# -- processes ---------------------------------------------------------------------------------


def parablock_exe() -> str:
    """The ``parablock`` script of this interpreter's environment."""
    here = Path(sys.executable).parent / "parablock"
    found = str(here) if here.exists() else shutil.which("parablock")
    if not found:
        raise SystemExit("the parablock command is not installed next to this Python")
    return found


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def stop(p: subprocess.Popen | None) -> None:
    """End one process we started, by its PID: terminate, wait, then kill."""
    if p is None or p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=15)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env()
        )


def run_to_end(cmd: list[str], log: Path, timeout: float) -> None:
    p = start(cmd, log)
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{cmd[1]} ran past {timeout:g}s; log {log}:\n{tail(log)}") from None
    finally:
        stop(p)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} exited with {rc}; log {log}:\n{tail(log)}")


def children_cpu() -> float:
    """CPU seconds of every reaped child so far (runs go one at a time: deltas are per run)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def process_cpu(pid: int) -> float | None:
    """CPU seconds of a running process, from /proc (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# -- federated runs ----------------------------------------------------------------------------


def base_config(args, model: str) -> dict:
    return {
        "model": {"name_or_path": model, "blocks": args.blocks},
        "data": {
            "partition": "per_client",
            "client_sources": args.sources,
            "train_size": args.train_size,
            "max_length": args.max_length,
        },
        "federation": {
            "clients": len(args.sources.split(";")),
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
        },
        # loss only: round times matter. eval.source is set because a server without one fails
        # (runner._serving encodes an empty held-out list, which raises DataError)
        "eval": {"source": args.eval_source, "size": args.eval_size, "accuracy_size": 0},
        "run": {"seed": 0, "threads": 1, "backend": "local"},
    }


def write_config(base: dict, path: Path, **sections) -> Path:
    path.write_text(with_(base, **sections).to_toml())
    return path


def run_local(base: dict, alg: str, link: dict, rounds: int, out: Path, timeout: float) -> dict:
    """``parablock run`` (local backend) in its own process; returns its summary."""
    out.mkdir(parents=True)
    cfg = write_config(
        base,
        out / "config-in.toml",
        federation={"algorithm": alg, "rounds": rounds},
        link=link,
        run={"out": str(out / "run")},
    )
    cmd = [parablock_exe(), "run", "--config", str(cfg), "--quiet"]
    started, cpu = time.perf_counter(), children_cpu()
    run_to_end(cmd, out / "run.log", timeout)
    s = json.loads((out / "run" / "summary.json").read_text())
    s["process_s"] = time.perf_counter() - started
    s["cpu_s"] = children_cpu() - cpu
    s["steady_round_s"] = steady_round_s(s["run_dir"])
    return s


def run_network(base: dict, alg: str, link: dict, args, model: str, creds: Path, out: Path) -> dict:
    """A ``parablock server`` and one ``parablock client`` per client source on loopback."""
    out.mkdir(parents=True)
    cfg = write_config(base, out / "config-in.toml", federation={"algorithm": alg})
    exe = parablock_exe()
    server_cmd = [
        exe,
        "server",
        "--config",
        str(cfg),
        "--set",
        f"run.out={out / 'run'}",
        "--set",
        "server.address=127.0.0.1:0",
        "--set",
        f"server.tls_cert={creds / 'server.pem'}",
        "--set",
        f"server.tls_key={creds / 'server.key'}",
        "--set",
        f"server.clients_file={creds / 'clients.toml'}",
        "--set",
        "server.join_timeout_s=300",
    ]
    sources = args.sources.split(";")
    procs: list[subprocess.Popen] = []
    started, cpu = time.perf_counter(), children_cpu()
    deadline = started + args.timeout
    names = ["server"] + [f"client-{i}" for i in range(len(sources))]
    seen: dict[str, float] = {}  # the last CPU time sampled of each process
    try:
        server = start(server_cmd, out / "server.log")
        procs.append(server)
        port = None
        while port is None:
            m = LISTENING.search((out / "server.log").read_text(errors="replace"))
            if m:
                port = int(m.group(1))
            elif server.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"the server did not start; log:\n{tail(out / 'server.log')}")
            else:
                time.sleep(0.2)
        for i, src in enumerate(sources):
            cmd = [
                exe,
                "client",
                "--server",
                f"localhost:{port}",
                "--ca",
                str(creds / "ca.pem"),
                "--id",
                str(i),
                "--token-file",
                str(creds / f"client-{i}.token"),
                "--data",
                src,
                "--model",
                model,
                "--out",
                str(out / f"site-{i}"),
                "--threads",
                "1",
                "--emulate-up-mbps",
                repr(link["up_mbps"]),
                "--emulate-down-mbps",
                repr(link["down_mbps"]),
                "--emulate-latency-ms",
                repr(link["latency_ms"]),
                "--log-level",
                "warning",
            ]
            procs.append(start(cmd, out / f"client-{i}.log"))
        while server.poll() is None:
            for name, p in zip(names, procs, strict=True):
                seen[name] = process_cpu(p.pid) or seen.get(name, 0.0)
            for i, p in enumerate(procs[1:]):
                if p.poll() not in (None, 0):
                    raise RuntimeError(
                        f"client {i} exited with {p.returncode}; log:\n"
                        f"{tail(out / f'client-{i}.log')}"
                    )
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the networked run took longer than {args.timeout:g}s")
            time.sleep(0.5)
        if server.returncode != 0:
            raise RuntimeError(
                f"the server exited with {server.returncode}; log:\n{tail(out / 'server.log')}"
            )
        for i, p in enumerate(procs[1:]):
            if p.wait(timeout=60) != 0:
                raise RuntimeError(
                    f"client {i} exited with {p.returncode}; log:\n{tail(out / f'client-{i}.log')}"
                )
    finally:
        for p in reversed(procs):
            stop(p)
    s = json.loads((out / "run" / "summary.json").read_text())
    s["process_s"] = time.perf_counter() - started
    s["cpu_s"] = children_cpu() - cpu
    s["cpu_s_sampled"] = seen  # each process's CPU at its last 0.5 s sample before it ended
    s["steady_round_s"] = steady_round_s(s["run_dir"])
    s["client_fingerprints"] = [
        json.loads((out / f"site-{i}" / "summary.json").read_text())["final_model_fingerprint"]
        for i in range(len(sources))
    ]
    return s


def calibrate(base: dict, args, work: Path) -> tuple[float, float, int]:
    """A short local FedBCD run on unlimited links: T_comp (mean over rounds of the slowest
    client's compute) and the block payload; returns (mbps, T_comp, payload bytes)."""
    rounds = min(args.rounds, 3)
    link = {"up_mbps": float("inf"), "down_mbps": float("inf"), "latency_ms": 0.0}
    s = run_local(base, "fedbcd", link, rounds, work / "calibrate", args.timeout)
    rows = [json.loads(x) for x in open(Path(s["run_dir"]) / "metrics.jsonl")]
    slowest: dict[int, float] = {}
    for r in rows:
        if r["kind"] == "client_round" and not r["drain"]:
            slowest[r["round"]] = max(slowest.get(r["round"], 0.0), r["compute_s"])
    steady = [v for t, v in slowest.items() if t >= 1] or list(slowest.values())
    t_comp = statistics.mean(steady)
    payload = s["bytes_up"] // (s["clients"] * rounds)  # FedBCD uploads every round
    wire = t_comp - 2 * args.latency_ms / 1000  # upload + download, each with its latency
    if wire < 0.25 * t_comp:
        raise SystemExit(f"T_comp={t_comp:.3f}s is too short for the latency; lower --latency-ms")
    return 2 * payload * 8 / wire / 1e6, t_comp, payload


def federation(args, work: Path, results: dict) -> None:
    model = tiny_model_dir(work) if args.quick else EMBEDDED
    base = base_config(args, model)
    if args.mbps:
        mbps, t_comp, payload = args.mbps, float("nan"), 0
    else:
        mbps, t_comp, payload = calibrate(base, args, work)
    link = {"up_mbps": mbps, "down_mbps": mbps, "latency_ms": args.latency_ms}
    what = (
        f"calibration: T_comp {t_comp:.3f}s (slowest client), block payload "
        f"{payload / 1e6:.2f} MB -> links"
        if payload
        else "calibration skipped (--mbps): links"
    )
    print(
        f"model {model}, blocks {args.blocks}, {args.rounds} rounds, clients {args.sources}; "
        f"{what} {mbps:.1f} Mbit/s up and down, {args.latency_ms:g} ms",
        flush=True,
    )
    results["calibration"] = {"t_comp_s": t_comp, "payload_bytes": payload, "link": link}
    base["link"] = link
    creds = work / "creds"
    run_to_end(
        [parablock_exe(), "certs", str(creds), "--clients", str(base["federation"]["clients"])],
        work / "certs.log",
        120,
    )
    runs: dict[str, dict] = {}
    results["runs"] = runs
    for r in range(args.repeats):
        for backend in ("network", "local") if r % 2 == 0 else ("local", "network"):
            for alg in ALGORITHMS:
                where = work / f"{backend}-{alg}-{r}"
                t = time.perf_counter()
                if backend == "network":
                    s = run_network(base, alg, link, args, model, creds, where)
                else:
                    s = run_local(base, alg, link, args.rounds, where, args.timeout)
                s["loadavg_after"] = os.getloadavg()
                runs[f"{r}/{backend}/{alg}"] = s
                print(
                    f"  repeat {r} {backend:7} {alg:9}: mean round {s['mean_round_s']:.3f}s, "
                    f"steady {s['steady_round_s']:.3f}s (process {time.perf_counter() - t:.0f}s, "
                    f"load average after {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
    fb = runs["0/network/fedbcd"]
    payload = payload or fb["bytes_up"] // (fb["clients"] * fb["rounds"])  # one upload per round
    report_federation(results, args.repeats, payload, link)


def report_federation(results: dict, repeats: int, payload: int, link: dict) -> None:
    runs = results["runs"]

    def mean(backend: str, alg: str, key: str) -> float:
        return statistics.mean(runs[f"{r}/{backend}/{alg}"][key] for r in range(repeats))

    per_transfer = link["latency_ms"] / 1000 + payload * 8 / (link["up_mbps"] * 1e6)
    print(f"\n1. network path (parablock server + clients, TLS, loopback), mean of {repeats}:")
    print(
        "| backend | algorithm | mean round s | steady round s (t>0) | compute s | comm s "
        "| comm / emulated | wait s | idle s | rounds wall s | CPU s, all processes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for backend in ("network", "local"):
        for alg in ALGORITHMS:
            comm = mean(backend, alg, "mean_comm_s")
            print(
                f"| {backend} | {alg} | {mean(backend, alg, 'mean_round_s'):.3f} | "
                f"{mean(backend, alg, 'steady_round_s'):.3f} | "
                f"{mean(backend, alg, 'mean_compute_s'):.3f} | {comm:.3f} | "
                f"{comm / (2 * per_transfer):.3f} | "
                f"{mean(backend, alg, 'mean_wait_s'):.3f} | "
                f"{mean(backend, alg, 'mean_idle_s'):.3f} | "
                f"{mean(backend, alg, 'wall_time_s'):.1f} | {mean(backend, alg, 'cpu_s'):.0f} |"
            )
    for alg in ALGORITHMS:
        split = runs[f"0/network/{alg}"].get("cpu_s_sampled", {})
        print(
            f"network {alg}, CPU s per process (repeat 0, sampled): "
            + ", ".join(f"{k} {v:.0f}" for k, v in split.items())
        )
    speed: dict[str, dict] = {}
    for backend in ("network", "local"):
        c, m = mean(backend, "fedbcd", "mean_compute_s"), mean(backend, "fedbcd", "mean_comm_s")
        ideal = (c + m) / max(c, m)
        measured = mean(backend, "fedbcd", "mean_round_s") / mean(
            backend, "parablock", "mean_round_s"
        )
        steady = mean(backend, "fedbcd", "steady_round_s") / mean(
            backend, "parablock", "steady_round_s"
        )
        gain = ideal - 1 if ideal > 1 else float("nan")
        speed[backend] = {
            "measured_steady": steady,
            "measured_all_rounds": measured,
            "ideal": ideal,
            "share_steady": (steady - 1) / gain,
            "share_all_rounds": (measured - 1) / gain,
            "t_comp_s": c,
            "t_comm_s": m,
        }
        print(
            f"ParaBlock over FedBCD, {backend}: measured {steady:.3f}x on steady rounds (t>0), "
            f"{measured:.3f}x on all rounds; ideal {ideal:.3f}x from the FedBCD run's T_comp "
            f"{c:.3f}s and T_comm {m:.3f}s -> achieved share of the gain (speed-up - 1) / "
            f"(ideal - 1): {100 * (steady - 1) / gain:.1f}% steady, "
            f"{100 * (measured - 1) / gain:.1f}% all rounds"
            + ("  (target >= 90%)" if backend == "network" else "")
        )
    print(
        "(FedBCD's round 0 is compute only, its first upload is booked to round 1 and the last "
        "one to the drain, which round times leave out; so with T rounds and T_comp = T_comm the "
        "all-rounds ratio tends to (2T - 1) / T, not 2: the steady ratio is the one to compare "
        "with the ideal)"
    )
    results["speedup"] = speed

    print("\n2. network path over the local backend (same config, links, data, seeds):")
    print(
        "| algorithm | local round s | network round s | overhead | per repeat | "
        "steady (t>0) local s | steady network s | steady overhead | fingerprints equal |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    overhead: dict[str, dict] = {}
    for alg in ALGORITHMS:
        loc, net = mean("local", alg, "mean_round_s"), mean("network", alg, "mean_round_s")
        each, equal = [], []
        for r in range(repeats):
            lo, ne = runs[f"{r}/local/{alg}"], runs[f"{r}/network/{alg}"]
            each.append(ne["mean_round_s"] / lo["mean_round_s"] - 1)
            fps = {lo["final_model_fingerprint"], ne["final_model_fingerprint"]}
            equal.append(len(fps | set(ne["client_fingerprints"])) == 1)
        sloc, snet = mean("local", alg, "steady_round_s"), mean("network", alg, "steady_round_s")
        overhead[alg] = {
            "local_round_s": loc,
            "network_round_s": net,
            "overhead": net / loc - 1,
            "per_repeat": each,
            "local_steady_round_s": sloc,
            "network_steady_round_s": snet,
            "steady_overhead": snet / sloc - 1,
            "fingerprints_equal": equal,
        }
        print(
            f"| {alg} | {loc:.3f} | {net:.3f} | {100 * (net / loc - 1):+.1f}% | "
            + ", ".join(f"{100 * x:+.1f}%" for x in each)
            + f" | {sloc:.3f} | {snet:.3f} | {100 * (snet / sloc - 1):+.1f}% | "
            f"{'yes' if all(equal) else 'no'} ({sum(equal)}/{len(equal)}) |"
        )
    print(
        "target: overhead <= 5% of the round time. Networked clients start round 0 as soon as "
        "each has joined, so the network's round 0 also holds the clients' start-up skew; the "
        "steady columns leave round 0 out."
    )
    results["overhead"] = overhead


# -- raw block throughput ----------------------------------------------------------------------


def make_update(nbytes: int) -> BlockUpdate:
    """A block update of float32 tensors of ``nbytes`` in all (4 MiB tensors and a remainder)."""
    g = torch.Generator().manual_seed(0)
    left, tensors, i = nbytes // 4, {}, 0
    while left:
        n = min(left, 1 << 20)
        tensors[f"layer.{i:04d}.weight"] = torch.randn(n, generator=g)
        left, i = left - n, i + 1
    return BlockUpdate(0, 0, 0, -1, 1, 0.0, tensors)


def _raw(b: bytes) -> bytes:
    return b


def memory(key: str) -> int:
    """This process's VmRSS (now) or VmHWM (peak since the last reset) in bytes; ru_maxrss where
    /proc is missing."""
    try:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def reset_peak() -> int:
    """Reset the peak RSS (imports and start-up had their own transient peaks); returns the
    current RSS, the baseline for the peak of what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the baseline is the start-up peak, and the extra may read low
    return memory("VmRSS")


def receiver(mode: str, nbytes: int, creds: str, transfers: int) -> None:
    """The receiving side (a fresh process): prints its port, then one JSON line per transfer."""
    done, lock = threading.Semaphore(0), threading.Lock()

    def emit(i: int, took: float) -> None:
        with lock:
            print(json.dumps({"transfer": i, "recv_s": took, "peak": memory("VmHWM")}), flush=True)

    if mode == "socket":
        srv = socket.create_server(("127.0.0.1", 0))
        print(json.dumps({"port": srv.getsockname()[1], "base": reset_peak()}), flush=True)
        buf = bytearray(nbytes)  # preallocated once; its pages are counted as they are written
        view = memoryview(buf)
        for i in range(transfers):
            conn, _ = srv.accept()
            with conn:
                got, t = 0, None
                while got < nbytes:
                    n = conn.recv_into(view[got:])
                    if not n:
                        raise SystemExit("the sender closed early")
                    t = t or time.perf_counter()
                    got += n
                conn.sendall(b"k")
                emit(i, time.perf_counter() - t)
        return

    import grpc

    from parablock.transport.grpc_service import SERVER_OPTIONS, SERVICE

    count = [-1]  # transfer -1 is the sender's small warm-up

    def upload(chunks, context) -> bytes:
        t = time.perf_counter()
        update = BlockUpdate.from_chunks(chunks)  # decode, checksum, finiteness, as the server
        size = sum(v.numel() * v.element_size() for v in update.tensors.values())
        del update
        with lock:
            i, count[0] = count[0], count[0] + 1
        if i < 0:  # connection, HTTP/2 and thread pool are up: the baseline from here
            print(json.dumps({"warmup": True, "base": reset_peak()}), flush=True)
        else:
            emit(i, time.perf_counter() - t)
        done.release()
        return json.dumps({"bytes": size}).encode()

    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
    handler = grpc.stream_unary_rpc_method_handler(
        upload, request_deserializer=_raw, response_serializer=_raw
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Upload": handler}),)
    )
    if mode == "grpc-tls":
        d = Path(creds)
        pair = ((d / "server.key").read_bytes(), (d / "server.pem").read_bytes())
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([pair]))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"port": port}), flush=True)
    for _ in range(transfers + 1):
        done.acquire()
    server.stop(grace=1.0).wait()


def send(mode: str, port: int, update: BlockUpdate, payload: bytes, creds: Path, n: int):
    """``n`` timed transfers to a receiver; yields seconds per transfer (sender's view: from the
    first byte to the receiver's answer, which comes after it decoded everything)."""
    if mode == "socket":
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port)) as s:
                t = time.perf_counter()
                s.sendall(payload)
                if s.recv(1) != b"k":
                    raise RuntimeError("the socket receiver did not answer")
                yield time.perf_counter() - t
        return
    import grpc

    from parablock.transport.grpc_service import CHANNEL_OPTIONS, SERVICE

    if mode == "grpc-tls":
        creds_ = grpc.ssl_channel_credentials(root_certificates=(creds / "ca.pem").read_bytes())
        channel = grpc.secure_channel(f"localhost:{port}", creds_, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    try:
        grpc.channel_ready_future(channel).result(timeout=30)  # connected (and TLS handshake)
        call = channel.stream_unary(
            f"/{SERVICE}/Upload", request_serializer=_raw, response_deserializer=json.loads
        )
        call(make_update(1 << 20).chunks())  # warm-up: the receiver's baseline comes after it
        size = sum(v.numel() * v.element_size() for v in update.tensors.values())
        for _ in range(n):
            t = time.perf_counter()
            reply = call(update.chunks())  # the client's code path: encode, 1 MiB chunks
            yield time.perf_counter() - t
            if reply["bytes"] != size:
                raise RuntimeError(f"the gRPC receiver got {reply['bytes']} of {size} bytes")
    finally:
        channel.close()


def throughput(args, work: Path, results: dict) -> None:
    from parablock.transport.certs import make_trial_credentials

    creds = work / "tput-creds"
    make_trial_credentials(creds, 1)
    rows = []
    for mb in args.sizes_mb:
        update = make_update(int(mb * 1e6))
        # the codec alone: what encode and decode cost without any socket
        t = time.perf_counter()
        chunks = list(update.chunks())
        enc = time.perf_counter() - t
        t = time.perf_counter()
        BlockUpdate.from_chunks(chunks)
        dec = time.perf_counter() - t
        payload = b"".join(chunks)
        del chunks
        nbytes = len(payload)
        rows.append(
            {
                "size_mb": nbytes / 1e6,
                "path": "codec only (encode + decode)",
                "mb_s": nbytes / 1e6 / (enc + dec),
                "first_mb_s": float("nan"),
                "encode_mb_s": nbytes / 1e6 / enc,
                "decode_mb_s": nbytes / 1e6 / dec,
            }
        )
        for mode in ("socket", "grpc", "grpc-tls"):
            cmd = [
                sys.executable,
                __file__,
                "--receiver",
                mode,
                "--receiver-bytes",
                str(nbytes),
                "--receiver-creds",
                str(creds),
                "--transfers",
                str(args.transfers),
            ]
            p = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=child_env()
            )
            try:
                hello = json.loads(p.stdout.readline() or "null")
                if not hello:
                    raise RuntimeError(f"the {mode} receiver did not start (exit {p.wait()})")
                secs = list(send(mode, hello["port"], update, payload, creds, args.transfers))
                if mode != "socket":  # gRPC: the baseline is taken after a 1 MB warm-up
                    hello.update(json.loads(p.stdout.readline()))
                lines = [json.loads(p.stdout.readline()) for _ in range(args.transfers)]
                p.wait(timeout=60)
            finally:
                stop(p)
            extra = max(x["peak"] for x in lines) - hello["base"]
            rows.append(
                {
                    "size_mb": nbytes / 1e6,
                    "path": {"socket": "plain TCP socket", "grpc": "gRPC plain text"}.get(
                        mode, "gRPC TLS"
                    ),
                    "mb_s": nbytes / 1e6 / statistics.median(secs),
                    "first_mb_s": nbytes / 1e6 / secs[0],
                    "seconds": secs,
                    "receiver_s": [x["recv_s"] for x in lines],
                    "peak_extra_rss_mb": extra / 1e6,
                    "peak_extra_rss_x": extra / nbytes,
                }
            )
            print(f"  {nbytes / 1e6:.0f} MB {mode}: {rows[-1]['mb_s']:.0f} MB/s", flush=True)
        del update, payload
    results["throughput"] = rows
    print(
        f"\n3. one block uploaded over loopback, no emulation (median of {args.transfers}; "
        "receiver in a fresh process):"
    )
    print("| block MB | path | MB/s | first MB/s | receiver peak extra RSS MB | x block |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "peak_extra_rss_mb" in r:
            rss = f"{r['peak_extra_rss_mb']:.0f} | {r['peak_extra_rss_x']:.2f}"
            first = f"{r['first_mb_s']:.0f}"
        else:
            rss = "- | -"
            first = f"(encode {r['encode_mb_s']:.0f}, decode {r['decode_mb_s']:.0f})"
        print(f"| {r['size_mb']:.0f} | {r['path']} | {r['mb_s']:.0f} | {first} | {rss} |")


# -- main --------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a tiny random Llama, small blocks")
    p.add_argument("--rounds", type=int, default=None, help="default 8 (quick: 3)")
    p.add_argument("--blocks", default=None, help="model.blocks (default top:8; quick: all)")
    p.add_argument(
        "--sources",
        default=SOURCES,
        help=f"one data source per client, ';'-separated (default {SOURCES!r})",
    )
    p.add_argument("--train-size", type=int, default=None, help="per client (default 64)")
    p.add_argument("--max-length", type=int, default=None, help="default 256")
    p.add_argument("--local-steps", type=int, default=None, help="default 2 (quick: 1)")
    p.add_argument("--batch-size", type=int, default=None, help="default 4 (quick: 2)")
    p.add_argument("--eval-size", type=int, default=4, help="held-out examples (loss only)")
    p.add_argument(
        "--eval-source",
        default="reasoning_gym:basic_arithmetic",
        help="eval.source of both backends (a task no client trains on)",
    )
    p.add_argument("--latency-ms", type=float, default=None, help="default 5 (quick: 1)")
    p.add_argument("--mbps", type=float, default=0.0, help="skip calibration: use this bandwidth")
    p.add_argument("--repeats", type=int, default=1, help="runs of each of the four (default 1)")
    p.add_argument(
        "--sizes-mb", default=None, help="block sizes for part 3 (default 14,400; quick: 14,64)"
    )
    p.add_argument("--transfers", type=int, default=3, help="timed uploads per size and path")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per federated run")
    p.add_argument("--skip-federation", action="store_true", help="only part 3")
    p.add_argument("--skip-throughput", action="store_true", help="only parts 1 and 2")
    p.add_argument("--out", default="bench-out/network", help="where network.json goes")
    p.add_argument("--keep", default="", help="keep run directories here (default: a temp dir)")
    p.add_argument("--receiver", default="", help=argparse.SUPPRESS)
    p.add_argument("--receiver-bytes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--receiver-creds", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.receiver:
        receiver(args.receiver, args.receiver_bytes, args.receiver_creds, args.transfers)
        return 0
    q = args.quick
    args.rounds = args.rounds or (3 if q else 8)
    args.blocks = args.blocks or ("all" if q else "top:8")
    args.train_size = args.train_size or (16 if q else 64)
    args.max_length = args.max_length or 256
    args.local_steps = args.local_steps or (1 if q else 2)
    args.batch_size = args.batch_size or (2 if q else 4)
    args.latency_ms = args.latency_ms if args.latency_ms is not None else (1.0 if q else 5.0)
    args.sizes_mb = [float(x) for x in (args.sizes_mb or ("14,64" if q else "14,400")).split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="parablock-network-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": {k: v for k, v in vars(args).items() if not k.startswith("recei")}}
    results["loadavg_start"] = os.getloadavg()
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    try:
        if not args.skip_federation:
            federation(args, work, results)
            (out / "network.json").write_text(json.dumps(results, indent=2, default=str))
        if not args.skip_throughput:
            throughput(args, work, results)
    finally:
        results["loadavg_end"] = os.getloadavg()
        (out / "network.json").write_text(json.dumps(results, indent=2, default=str))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nresults: {out / 'network.json'}" + (f"; run directories: {work}" if args.keep else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
