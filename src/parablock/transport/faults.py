"""Fault injection (``run.faults``), for tests and benchmarks: what goes wrong, where and when.

A spec is comma-separated items, each ``KIND@CLIENT:ROUND`` (that client's upload of that round's
delta goes wrong) or ``KIND~P`` (every client's upload of every round goes wrong that way with
probability P, drawn from ``run.seed``, the client and the round, so a replay draws the same).
A fault fires once per (client, round): a client that restarts does not crash again.

``FaultyConnection`` wraps any ``ServerConnection`` and does the damage on the client side, so the
server sees exactly what a broken or hostile client would send: it must reject every corrupted
update (the client then forfeits that round), never apply it, and the run must go on.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable

import numpy as np

from parablock.errors import (
    ClientCrash,
    ClientVanished,
    ConfigError,
    ConnectError,
    UpdateRejected,
)
from parablock.wire.messages import BlockUpdate, encode
from parablock.wire.protocol import JoinReply, JoinRequest

log = logging.getLogger(__name__)

KINDS: dict[str, str] = {
    "crash": "the client dies before its upload reaches the server; it restarts from its last "
    "checkpoint and rejoins",
    "stall": "the client stalls past the round's deadline before uploading (dropped, its late "
    "update rejected, expected again from the next round)",
    "cut": "the link is cut mid-upload: the server gets the header and half the data",
    "nan": "the delta holds a NaN",
    "shape": "one tensor has the wrong shape",
    "block": "the update names a block other than the round's",
    "stale": "the update claims an older base version of the block",
    "future": "the update claims the next round",
    "truncate": "the last bytes of the upload are missing",
    "forge": "forged metadata: another client's id and num_examples=10**12",
    "scale": "the delta multiplied by 1e6, finite: a poisoned update that passes every check of "
    "form (names, shapes, finite values, metadata)",
    "token": "an upload with a wrong token comes first (network only; refused before it is read)",
    "replay": "the upload is sent a second time (refused as a duplicate or late)",
    "vanish": "the client disappears for good before its upload (no restart; the server drops "
    "it at the round's deadline; with secure aggregation its masks are recovered from shares)",
    "vanish_after": "the client disappears for good right after its upload reached the server",
}
CORRUPT = ("cut", "nan", "shape", "block", "stale", "future", "truncate", "forge", "scale")
SCALE = 1e6  # the factor of a ``scale`` fault
_ITEM = re.compile(r"^(?P<kind>[a-z_]+)(?:@(?P<client>\d+):(?P<round>\d+)|~(?P<p>[0-9.eE+-]+))$")


class FaultPlan:
    """Which fault (if any) hits ``client``'s upload of ``round``'s delta; counts what fired."""

    def __init__(self, fixed: dict[tuple[int, int], str], rates: dict[str, float], seed: int):
        self.fixed = fixed
        self.rates = rates
        self.seed = seed
        self.fired: Counter[str] = Counter()
        self._done: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.fixed or self.rates)

    def at(self, client: int, round: int) -> str | None:
        """The planned fault (pure: the same answer every time and in every process)."""
        kind = self.fixed.get((client, round))
        if kind is not None or not self.rates:
            return kind
        u = np.random.default_rng([self.seed, 97, client, round]).random()
        for kind, p in sorted(self.rates.items()):
            if u < p:
                return kind
            u -= p
        return None

    def fire(self, client: int, round: int) -> str | None:
        """The fault to inject now: the planned one, the first time only."""
        kind = self.at(client, round)
        with self._lock:
            if kind is None or (client, round) in self._done:
                return None
            self._done.add((client, round))
            self.fired[kind] += 1
        return kind


def parse(spec: str, seed: int = 0) -> FaultPlan:
    """``run.faults`` as a plan; a bad item is a ConfigError naming it and the valid kinds."""
    fixed: dict[tuple[int, int], str] = {}
    rates: dict[str, float] = {}
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        m = _ITEM.match(item)
        kind = m and m["kind"]
        if m is None or kind not in KINDS:
            raise ConfigError(
                f"run.faults item {item!r} is not KIND@CLIENT:ROUND or KIND~P; "
                f"KIND is one of {', '.join(KINDS)}"
            )
        if m["p"] is not None:
            try:
                p = float(m["p"])
            except ValueError:
                p = -1.0
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"run.faults item {item!r}: P must be within [0, 1]")
            rates[kind] = rates.get(kind, 0.0) + p
        else:
            fixed[int(m["client"]), int(m["round"])] = kind
    if sum(rates.values()) > 1.0 + 1e-9:
        raise ConfigError(f"run.faults={spec!r}: the probabilities add up to more than 1")
    return FaultPlan(fixed, rates, seed)


def corrupt(kind: str, u: BlockUpdate, plan: list[int]) -> list[bytes]:
    """The chunks a broken or hostile client sends instead of ``u`` (``encode`` itself checks
    nothing, so these reach the server as crafted)."""
    meta, tensors = u.meta(), dict(u.tensors)
    first = sorted(tensors)[0]
    if kind == "nan":  # into a float tensor (an int8-compressed delta's scales)
        first = sorted(n for n in tensors if tensors[n].is_floating_point())[0]
        t = tensors[first].clone()
        t.view(-1)[0] = float("nan")
        tensors[first] = t
    elif kind == "shape":
        tensors[first] = tensors[first].flatten()[:-1].clone()
    elif kind == "block":
        others = sorted(set(plan) - {u.block}) or [u.block + 1]
        meta["block"] = others[0]
    elif kind == "stale":
        meta["base_version"] = u.base_version - 1
    elif kind == "future":
        meta["round"] = u.round + 1
        meta["block"] = plan[u.round + 1] if u.round + 1 < len(plan) else u.block
    elif kind == "forge":
        meta["client"] = u.client + 1
        meta["num_examples"] = 10**12
    elif kind == "scale":  # every float tensor: the delta, or an int8 delta's row scales
        tensors = {n: t * SCALE if t.is_floating_point() else t for n, t in tensors.items()}
    chunks = [bytes(c) for c in encode("BlockUpdate", meta, tensors, 1 << 16)]
    if kind == "truncate":
        chunks[-1] = chunks[-1][:-8]
    elif kind == "cut":
        chunks = chunks[: 1 + max(1, (len(chunks) - 1) // 2)]
        chunks[-1] = chunks[-1][: len(chunks[-1]) // 2]
    return chunks


class FaultyConnection:
    """A ``ServerConnection`` whose uploads go wrong where the plan says (see ``KINDS``)."""

    def __init__(self, inner, client: int, plan: FaultPlan, stall_s: float = 0.0) -> None:
        self.inner = inner
        self.client = client
        self.faults = plan
        self.stall_s = stall_s  # how long a stall lasts (past the round's deadline)
        self.plan: list[int] = []

    def join(self, request: JoinRequest) -> JoinReply:
        reply = self.inner.join(request)
        self.plan = list(reply.settings.plan)
        return reply

    def upload(self, update: BlockUpdate) -> int:
        kind = self.faults.fire(self.client, update.round)
        if kind is None:
            return self.inner.upload(update)
        log.info(
            "client %d: injecting %r into its round %d upload", self.client, kind, update.round
        )
        if kind == "crash":
            raise ClientCrash(f"client {self.client}: injected crash in round {update.round}")
        if kind in ("vanish", "vanish_after"):
            if kind == "vanish_after":
                self.inner.upload(update)
            raise ClientVanished(f"client {self.client}: vanished in round {update.round}")
        if kind == "stall":
            time.sleep(self.stall_s)
            return self.inner.upload(update)
        if kind in CORRUPT:
            return self.inner.send_chunks(corrupt(kind, update, self.plan))
        if kind == "token":
            try:
                self.inner.send_chunks(update.chunks(), token="not-the-token")
            except (ConnectError, UpdateRejected, TypeError) as e:
                log.info("client %d: a wrong token was refused: %s", self.client, e)
            return self.inner.upload(update)
        sent = self.inner.upload(update)  # replay: the same upload again
        try:
            self.inner.upload(update)
        except UpdateRejected as e:
            log.info("client %d: its replayed upload was refused: %s", self.client, e)
        return sent

    def send_chunks(self, chunks: Iterable[bytes], token: str | None = None) -> int:
        return self.inner.send_chunks(chunks, token=token)

    def wait_aggregate(self, round: int):
        return self.inner.wait_aggregate(round)

    def secagg(self, call):
        return self.inner.secagg(call)

    def download(self, block: int, version: int, expected=None, base=None):
        return self.inner.download(block, version, expected, base)

    def report(self, report) -> None:
        self.inner.report(report)

    def close(self) -> None:
        self.inner.close()


def stall_seconds(round_timeout_s: float) -> float:
    """An injected stall outlasts the round's deadline (counted from its first update)."""
    return 1.25 * round_timeout_s + 0.5


def faulty(connection, client: int, spec: str, seed: int, stall_s: float, plans: dict):
    """``connection`` wrapped per ``spec`` (unchanged when empty). ``plans`` caches one plan per
    spec in the calling process, so a fault fires once even across a client's restarts."""
    if not spec:
        return connection
    plan = plans.get((spec, seed))
    if plan is None:
        plan = plans[spec, seed] = parse(spec, seed)
    return FaultyConnection(connection, client, plan, stall_s)


def withhold(server, participants: dict[int, list[int]]) -> None:
    """Make ``server`` (in this process) refuse every update that is not in ``participants``
    (round -> clients), as if its client had sent nothing that round: the replay that a run with
    faults must equal bit for bit, if the faults only ever removed updates."""
    receive = server.receive_update

    def withheld(payload, client: int):
        u = BlockUpdate.deserialize(payload)
        if client not in participants.get(u.round, []):
            return server._reject(client, u.round, "withheld by the replay", "withheld")
        return receive(payload, client)

    server.receive_update = withheld
