"""The server's side under Flower: ParaBlock's ``Server`` driven through Flower's ``Grid``.

Each Flower node (SuperNode) is one client, through a ``NodeSession``: a message to the node
carries answers (``bundle.py``), its reply the client's requests. A request the server can answer
at once is answered in the next message; a ``wait`` for a round is held until the round is
aggregated, and so is the answer to an accepted upload, which then goes out with the round's
``wait`` and ``download`` answers: one message each way per round, while the client's worker
already trains the next block. Joins of a fresh run are held until every client has joined, so
round 0 starts together (as with ``parablock server``).

Who a node is: the first join from a Flower node binds the client id it claims to that node id
for the run (a node id Flower authenticates when node authentication is on); a later join from
the node must claim the same id, and no other node may take it, not even while the node is lost.

Losing a node: a Flower error in place of a reply (the node vanished, the ClientApp or its worker
failed, the message timed out) or a malformed reply loses the node's session and drops its
client, with ``federation.min_clients`` deciding whether the run goes on. The node is not given
up: while it is listed, it is sent ``rejoin`` (at growing intervals, ``PROBE_S`` to
``PROBE_MAX_S``, while those fail too), which voids what its worker still waits for. Nothing but
a join (and reports) is taken from it until it joins again, as a networked client does after a
crash or a lost connection: its worker, restarted from its checkpoint or still running, sends a
fresh join, the server catches it up on every block that moved and expects it again from the
round it is given.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from parablock.errors import (
    ConnectError,
    MessageError,
    RoundFailedError,
    RunStopped,
)
from parablock.flower.bundle import (
    DONE,
    DOWNLOAD,
    JOIN,
    REJOIN,
    REPORT,
    UPLOAD,
    WAIT,
    Bundle,
    Item,
)
from parablock.wire.protocol import JoinRequest, RoundReport, UploadReply
from parablock.wire.seams import ServerEndpoint

log = logging.getLogger(__name__)

FINISH_GRACE_S = 30.0  # after the last aggregate, how long clients have to send final reports
POLL_S = 0.02  # how often the ServerApp looks for replies
PROBE_S = 0.5  # a lost node is sent ``rejoin`` after this, doubling while its messages fail
PROBE_MAX_S = 5.0  # ... up to this


class Wire(Protocol):
    """The part of Flower's Grid the relay uses (``server_app.FlowerWire`` wraps the Grid)."""

    def nodes(self) -> list[int]: ...

    def send(self, node: int, frames: list[bytes], round: int) -> str: ...

    def replies(self, ids: list[str]) -> list[tuple[str, list[bytes] | None, str]]:
        """(message id, frames, "") per reply in; (id, None, Flower's error) for a failure."""
        ...


@dataclass
class NodeSession:
    node: int
    server: ServerEndpoint
    lossy: bool  # link.compression is lossy: a download is asked with the client's base
    client: int | None = None
    out: Bundle = field(default_factory=Bundle)
    held: list[Item] = field(default_factory=list)  # answered once their round is aggregated
    hold_join: bool = False  # a fresh join waits until the run starts
    acks: dict[int, bytes] = field(default_factory=dict)  # round -> its held upload answer
    in_flight: str | None = None
    finished: bool = False
    lost: bool = False  # a message failed: only a join (or reports) is taken until it rejoins
    failures: int = 0  # messages failed in a row: they space the ``rejoin`` probes
    probe_at: float = 0.0  # when a lost node may be sent ``rejoin`` next
    messages: int = 0

    # -- the node's requests ---------------------------------------------------------------------
    def handle(self, bundle: Bundle, claims: dict[int, int]) -> None:
        for item in bundle.items:
            if self.lost and item.kind not in (JOIN, REPORT, DONE):
                # a request of the session the server lost: the worker's mailbox voids it
                log.debug("node %d: %s ignored until it rejoins", self.node, item.kind)
                continue
            try:
                self._handle(item, bundle, claims)
            except (MessageError, ConnectError, RoundFailedError, RunStopped) as e:
                if item.kind in (REPORT, DONE, REJOIN):
                    log.warning("node %d: %s refused: %s", self.node, item.kind, e)
                else:
                    self.out.add(_error(item, e), str(e).encode())

    def _handle(self, item: Item, bundle: Bundle, claims: dict[int, int]) -> None:
        if item.kind == JOIN:
            request = JoinRequest.from_bytes(bundle.payload(item))
            self._bind(request.client, claims)
            reply = self.server.join(request, self.client)
            self._fresh()
            log.info("client %d joined from Flower node %d", self.client, self.node)
            self.out.add(item, reply.to_bytes())
            for b, v in sorted(reply.stale.items()):  # the downloads it will ask for next
                self.out.add(Item(DOWNLOAD, block=b, version=v), self.server.block_payload(b, v))
            self.hold_join = reply.start_round == 0 and not reply.keep_pending
            return
        if item.kind == REJOIN:
            raise ConnectError("rejoin is the server's to send")
        if self.client is None:
            raise ConnectError(f"node {self.node} must join before it sends {item.kind}")
        if item.kind == UPLOAD:
            ok, reason = self.server.receive_update(bundle.payload(item), self.client)
            answer = UploadReply(ok, reason).to_bytes()
            if not ok:
                self.out.add(Item(UPLOAD, round=item.round), answer)
                return
            # held with the round's aggregate: the client asks for these next
            self.held.append(Item(UPLOAD, round=item.round))
            self.acks[item.round] = answer
            self.held.append(Item(WAIT, round=item.round))
            base = item.base if self.lossy else None
            self.held.append(Item(DOWNLOAD, round=item.round, base=base))
        elif item.kind == WAIT:
            self.held.append(Item(WAIT, round=item.round))
        elif item.kind == DOWNLOAD:
            payload = self.server.block_payload(item.block, item.version, item.base)
            self.out.add(item, payload)
        elif item.kind == REPORT:
            self.server.report(RoundReport.from_bytes(bundle.payload(item)), self.client)
        elif item.kind == DONE:
            self.finished = True

    def _bind(self, claimed: int, claims: dict[int, int]) -> None:
        if self.client is not None and claimed != self.client:
            raise ConnectError(f"Flower node {self.node} is client {self.client}, not {claimed}")
        owner = claims.get(claimed)
        if owner is not None and owner != self.node:
            raise ConnectError(f"client {claimed} is already Flower node {owner}")
        if not 0 <= claimed < self.server.clients:
            raise ConnectError(
                f"client {claimed} is not one of this run's 0..{self.server.clients - 1}"
            )
        claims[claimed] = self.node
        self.client = claimed

    def _fresh(self) -> None:
        """A join starts a new session: nothing held for the last one is owed any more (its
        caller is gone: a worker joins again only once its last session has ended)."""
        self.held, self.acks = [], {}
        self.lost, self.failures = False, 0

    # -- losing the node and asking it back ------------------------------------------------------
    def lose(self, error: str) -> None:
        """A message failed: the session is lost and the client dropped until the node joins
        again (the node stays bound to its client: no other node may take it meanwhile)."""
        first = not self.lost
        self.lost = True
        self.failures += 1
        self.probe_at = time.monotonic() + self._backoff()
        self.out, self.held, self.acks, self.hold_join = Bundle(), [], {}, False
        if not first:  # its ``rejoin`` failed too: the worker is not back yet
            log.debug("Flower node %d (client %s) still fails: %s", self.node, self.client, error)
            return
        if self.client is not None:
            self.server.drop_client(self.client, f"Flower node {self.node}: {error}")
        log.warning(
            "Flower node %d (client %s) failed: %s; it is asked to rejoin",
            self.node,
            self.client,
            error,
        )

    def _backoff(self) -> float:
        return min(PROBE_MAX_S, PROBE_S * 2 ** min(self.failures - 1, 16))

    def _probe(self) -> bool:
        """A lost node gets ``rejoin`` once its interval has passed, with nothing else but the
        refusal of a join it sent meanwhile (a different base model, another node's client id):
        its worker stops there with that error instead of asking again and again."""
        now = time.monotonic()
        if now < self.probe_at:
            return False
        self.probe_at = now + self._backoff()  # a reply without a join waits as long
        self.out.add(Item(REJOIN))
        return True

    # -- what goes out next ----------------------------------------------------------------------
    def ready(self, started: bool) -> bool:
        """Settle what is held; True when a message may go (nothing held is still open, or a
        lost node is due its ``rejoin``)."""
        if self.in_flight is not None or self.finished:
            return False
        if self.lost:
            return self._probe()
        if self.hold_join and not started:
            return False
        self.hold_join = False
        still = []
        for item in self.held:
            if not self._settle(item):
                still.append(item)
        self.held = still
        return not self.held

    def _settle(self, item: Item) -> bool:
        """Answer a held item if its round is settled (or failed); False while it is open."""
        try:
            ready = self.server.poll_aggregate(item.round)
        except (RoundFailedError, RunStopped, MessageError) as e:
            if item.kind != DOWNLOAD:  # the client asks nothing more after a failed wait
                self.out.add(_error(Item(item.kind, round=item.round), e), str(e).encode())
            self.acks.pop(item.round, None)
            return True
        if ready is None:
            return False
        if item.kind == UPLOAD:
            self.out.add(Item(UPLOAD, round=item.round), self.acks.pop(item.round))
        elif item.kind == WAIT:
            self.out.add(Item(WAIT, round=item.round, block=ready.block, version=ready.version))
        else:
            key = Item(DOWNLOAD, block=ready.block, version=ready.version, base=item.base)
            self.out.add(key, self.server.block_payload(ready.block, ready.version, item.base))
        return True

    def take(self) -> list[bytes]:
        out, self.out = self.out, Bundle()
        self.messages += 1
        return out.frames()


def _error(item: Item, e: Exception) -> Item:
    name = type(e).__name__ if type(e).__name__ in _ERROR_NAMES else "ConnectError"
    return Item(item.kind, item.round, item.block, item.version, item.base, error=name)


_ERROR_NAMES = ("RunStopped", "RoundFailedError", "MessageError", "ConnectError")


def relay(
    server: ServerEndpoint,
    wire: Wire,
    *,
    lossy: bool,
    join_timeout_s: float,
    stop: threading.Event,
    on_message: Callable[[int, int], None] | None = None,
) -> dict[int, NodeSession]:
    """Serve the run through ``wire`` until it ends; returns the node sessions."""
    sessions: dict[int, NodeSession] = {}
    claims: dict[int, int] = {}  # client -> node
    started = False
    opened = time.monotonic()
    done_at: float | None = None
    while not stop.is_set():
        online = wire.nodes()
        for node in online:
            if node not in sessions:
                sessions[node] = NodeSession(node, server, lossy)
        flying = {s.in_flight: s for s in sessions.values() if s.in_flight is not None}
        for mid, frames, error in wire.replies(list(flying)) if flying else []:
            s = flying[mid]
            s.in_flight = None
            if frames is None:
                s.lose(error)
                continue
            try:
                s.handle(Bundle.from_frames(frames), claims)
            except MessageError as e:
                log.warning("node %d sent a malformed bundle: %s", s.node, e)
                s.lose(f"malformed bundle: {e}")
        if not started:
            started = _started(server, claims, opened, join_timeout_s)
        for s in sessions.values():
            if s.lost and s.node not in online:  # Flower no longer lists it: nothing to ask
                continue
            if s.ready(started):
                round = server.next_round
                s.in_flight = wire.send(s.node, s.take(), round)
                if on_message is not None:
                    on_message(s.node, round)
        server.check_deadline()
        if server.wait_done(timeout=0):
            done_at = done_at or time.monotonic()
            gone = server.dropped()  # e.g. a node that vanished: its error comes only at TTL
            live = [
                s
                for s in sessions.values()
                if s.client is not None and not s.lost and s.client not in gone
            ]
            if all(s.finished for s in live) or time.monotonic() - done_at > FINISH_GRACE_S:
                break
        time.sleep(POLL_S)
    return sessions


def _started(server: ServerEndpoint, claims: dict[int, int], opened: float, timeout: float) -> bool:
    if len(claims) >= server.clients:
        log.info("all %d clients joined", server.clients)
        return True
    if time.monotonic() - opened < timeout:
        return False
    if len(claims) >= server.min_clients and claims:
        for c in sorted(set(range(server.clients)) - set(claims)):
            server.drop_client(c, f"did not join within {timeout:g}s")
        return True
    raise RoundFailedError(
        f"only {len(claims)} of {server.clients} clients joined within "
        f"server.join_timeout_s={timeout:g}s; federation.min_clients needs {server.min_clients}"
    )
