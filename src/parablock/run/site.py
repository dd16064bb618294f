"""``parablock client``: one client at a data owner's site, talking to a ``parablock server``.

It loads the base model and its own data on its own machine (no training data ever crosses the
network), joins the server over gRPC (TLS and its token), takes the training settings the server
hands out, and runs the same two-thread client code as the simulator. Its directory (``--out``)
holds its checkpoints (one per barrier), its own ``metrics.jsonl`` and a ``summary.json``. After a
crash, a lost connection or Ctrl-C, the same command rejoins from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from parablock.backends.assembly import MAX_RESTARTS, Host, Placement, assemble
from parablock.backends.heap import StepTrim, return_memory, trim
from parablock.core.algorithms import run_client
from parablock.core.checkpoint import CheckpointStore, ClientState
from parablock.core.client import Client
from parablock.core.metrics import describe
from parablock.data.examples import DataStats
from parablock.data.sources import client_records
from parablock.errors import ClientRestart, ConfigError, ServerGone, Unreachable
from parablock.model.devices import train_device
from parablock.model.frozen import QUANTISED, int8_available
from parablock.model.load import model_fingerprint
from parablock.run.memory import peak_rss_mb
from parablock.transport.auth import read_token
from parablock.transport.certs import read_pem
from parablock.transport.faults import parse as parse_faults
from parablock.transport.grpc_client import GrpcConnection
from parablock.transport.link import MAX_LATENCY_MS, LinkSpec
from parablock.wire.seams import ServerConnection

log = logging.getLogger(__name__)

RETRY_S = 5.0  # between two attempts to rejoin a server that went away
STALL_S = 30.0  # an injected stall (--faults); longer than the round timeout the tests set
_PLANS: dict = {}  # the fault plan, kept across the client's restarts in this process


@dataclass(frozen=True)
class SiteOptions:
    """Everything ``parablock client`` is told on its command line."""

    server: str
    client: int
    token_file: str
    data: str
    model: str = "smollm2-135m-instruct"
    out: str = ""
    ca: str = ""
    cert: str = ""  # with key: a client certificate for mutual TLS
    key: str = ""
    insecure: bool = False
    threads: int = 0
    device: str = "cpu"  # where it trains: cpu, cuda, cuda:N (model/devices.py)
    up_mbps: float | None = None  # emulate a slower link on top of the real one
    down_mbps: float | None = None
    latency_ms: float = 0.0
    slowdown: float = 1.0  # emulate a slower device: compute takes this many times longer
    frozen_dtype: str = "fp32"  # bf16: the weights no block trains, half the memory (frozen.py)
    recompute: bool = False  # recompute each layer's activations in backward (less memory)
    return_memory: bool = False  # large allocations mapped apart, a trim after each step (heap.py)
    reconnect_s: float = 300.0  # how long to keep trying to rejoin after losing the server
    faults: str = ""  # run.faults syntax: this client's uploads go wrong on purpose (tests)
    stall_s: float = STALL_S  # how long an injected stall lasts

    def out_dir(self) -> Path:
        return Path(self.out or f"site-{self.client}")


def _links(o: SiteOptions) -> tuple[LinkSpec | None, LinkSpec | None]:
    """This process's own link emulation (a simulation's ``link.*`` for one client), checked
    against the same bounds."""
    for flag, mbps in (("--emulate-up-mbps", o.up_mbps), ("--emulate-down-mbps", o.down_mbps)):
        if mbps is not None and not mbps > 0:  # nan too
            raise ConfigError(f"{flag} must be > 0 Mbit/s or inf, got {mbps:g}")
    if not 0 <= o.latency_ms <= MAX_LATENCY_MS:
        raise ConfigError(
            f"--emulate-latency-ms must be in 0..{MAX_LATENCY_MS:g}, got {o.latency_ms:g}"
        )

    def spec(mbps: float | None) -> LinkSpec | None:
        if mbps is None and not o.latency_ms:
            return None
        return LinkSpec(mbps if mbps is not None else float("inf"), o.latency_ms)

    return spec(o.up_mbps), spec(o.down_mbps)


Connect = Callable[[LinkSpec | None, LinkSpec | None], ServerConnection]


def grpc_connect(o: SiteOptions) -> Connect:
    """Connections to a ``parablock server`` over gRPC (TLS or plain text, and the token)."""
    token = read_token(o.token_file)
    ca = read_pem(o.ca, "--ca") if o.ca else None
    cert = read_pem(o.cert, "--cert") if o.cert else None
    key = read_pem(o.key, "--key") if o.key else None
    if (cert is None) != (key is None):
        raise ConfigError("--cert and --key go together (mutual TLS)")

    def connect(up: LinkSpec | None, down: LinkSpec | None) -> ServerConnection:
        return GrpcConnection(
            o.server, token, ca=ca, cert=cert, key=key, insecure=o.insecure, up=up, down=down
        )

    return connect


def run_site(o: SiteOptions, connect: Connect | None = None) -> dict:
    """Join the server, train to the end of the run, write the site directory; returns its
    summary. A lost connection is retried (rejoining from the checkpoint) for
    ``o.reconnect_s`` seconds before it becomes an error. ``connect``: how to reach the server
    (default: gRPC to ``o.server``; a Flower worker passes its mailbox)."""
    if o.client < 0:
        raise ConfigError(f"--id must be >= 0, got {o.client}")
    if o.reconnect_s < 0:
        raise ConfigError(f"--reconnect-s must be >= 0, got {o.reconnect_s:g}")
    connect = connect or grpc_connect(o)
    client_records(o.data, 1, 0)  # a bad --data is a one-line error before anything connects
    if o.faults:
        parse_faults(o.faults)  # a bad spec: one line, before anything connects
    _links(o)  # bad emulation options likewise
    train_device(o.device, "--device")  # and a device this machine does not have
    if o.frozen_dtype in QUANTISED:
        int8_available(o.frozen_dtype)
    if not 1 <= o.slowdown < math.inf:
        raise ConfigError(f"--compute-slowdown must be a finite factor >= 1, got {o.slowdown:g}")
    o.out_dir().mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(o.threads or os.cpu_count() or 1)
    if o.return_memory:
        return_memory()
    state = {"joined": False, "lost_at": None, "crashes": 0}

    def on_joined() -> None:
        state["joined"], state["lost_at"] = True, None

    while True:
        try:
            return _session(o, connect, on_joined)
        except ClientRestart as e:  # a crash, or behind: restart from the checkpoint and rejoin
            state["crashes"] += 1
            if state["crashes"] > MAX_RESTARTS:
                raise
            log.warning("client %d: %s; restarting from its checkpoint", o.client, e)
        except (ServerGone, Unreachable) as e:
            if not state["joined"]:
                raise  # never reached the server: the address or credentials are wrong
            state["lost_at"] = state["lost_at"] or time.monotonic()
            if time.monotonic() - state["lost_at"] >= o.reconnect_s:
                raise
            log.warning("client %d: %s; rejoining in %gs", o.client, _first(e), RETRY_S)
            time.sleep(RETRY_S)


def _first(e: BaseException) -> str:
    return str(e).split(";")[0]


def placement(o: SiteOptions, state: ClientState | None) -> Placement:
    """Where this site's client runs and with what: everything but the settings, which the
    server hands out at join."""
    up, down = _links(o)
    return Placement(
        o.client,
        o.model,
        o.data,  # read here, with the run's settings: no training data crosses the network
        device=o.device,
        device_key="--device",
        threads=o.threads,
        uplink=up,
        downlink=down,
        checkpoint_dir=str(o.out_dir() / "checkpoint"),
        resume=state,
        prove_base=True,
        frozen_dtype=o.frozen_dtype,
        recompute=o.recompute,
        slowdown=o.slowdown,
        faults=o.faults,
        fault_seed=o.client,  # the server's seed is not known before the join
        stall_s=o.stall_s,
    )


def _session(o: SiteOptions, connect: Connect, on_joined) -> dict:
    """One connection to the server, from (re)joining to the end of the run."""
    out = o.out_dir()
    store = CheckpointStore(out / "checkpoint")
    state = store.latest_client(o.client)
    if state is not None:
        log.info("client %d: rejoining from its checkpoint after round %d", o.client, state.round)
    metrics = open(out / "metrics.jsonl", "a")

    def on_barrier(c: Client, t: int) -> None:
        r = c.log.rounds[-1]
        metrics.write(json.dumps(r.to_json()) + "\n")
        metrics.flush()
        log.info("client %d %s", c.id, describe(r, len(c.plan)))
        trim()  # give back what the round freed (backends/heap.py)

    stats = DataStats()
    p = placement(o, state)
    try:
        client, reply = assemble(
            p,
            connect(p.uplink, p.downlink),
            Host(
                gate=StepTrim() if o.return_memory else None,
                on_barrier=on_barrier,
                data_stats=stats,
                fault_plans=_PLANS,
            ),
        )
        if o.return_memory:
            trim()  # what loading and converting the model freed
    except BaseException:
        metrics.close()
        raise
    on_joined()
    s = reply.settings
    log.info(
        "client %d joined %s: %s, %d rounds, starting at round %d",
        o.client,
        o.server,
        s.algorithm,
        len(s.plan),
        reply.start_round,
    )
    started = time.time()
    try:
        run_client(client, reply)
    finally:
        metrics.close()
        store.flush()
    trained = {n for b in set(s.plan) for n in client.blocks[b].param_names}
    summary = {
        "client": o.client,
        "server": o.server,
        "algorithm": s.algorithm,
        "rounds": len(s.plan),
        "start_round": reply.start_round,
        "wall_time_s": time.time() - started,
        "examples": len(client.data),
        "data": {"source": o.data, **stats.to_json()},
        "bytes_up": sum(r.bytes_up for r in client.log.rounds),
        "bytes_down": sum(r.bytes_down for r in client.log.rounds),
        "final_model_fingerprint": model_fingerprint(client.model),
        # the blocks the run trains: equal to the server's even when the frozen rest is bf16
        "trained_blocks_fingerprint": model_fingerprint(client.model, trained),
        "precision": client.forward().precision if client.plan else None,
        "device": str(p.train_device()),
        "frozen_dtype": o.frozen_dtype,
        "recompute": o.recompute,
        "return_memory": o.return_memory,
        "peak_rss_mb": peak_rss_mb(),  # this process: the model, data, training (run/memory.py)
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
