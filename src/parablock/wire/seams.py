"""The two seams between the algorithm and the transports.

``ServerConnection`` (the client's side) is all client code ever calls: ``join``, ``upload``,
``wait_aggregate``, ``download``, ``report``. Its implementations: ``transport.inprocess``'s
``InProcessConnection`` (the server object in this process, or a proxy to it such as a Ray actor
handle), ``transport.grpc_client``'s ``GrpcConnection`` (a real network, TLS and a per-client
token) and Flower's ``Mailbox``. Link emulation (``transport.link``) paces the chunks of any of
them when ``link.*`` asks for it; without it, transfers take the transport's real time.

``ServerEndpoint`` (the server's side) is all a transport ever calls on the server: bytes in and
bytes out, with the client's identity passed by the caller (a network transport takes it from the
authenticated session, never from the payload). ``core.server.Server`` implements it; the gRPC
service, the Ray backend's server actor (and its proxy) and the Flower relay drive a server
through it and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from parablock.wire.messages import BlockUpdate, BlockValue, Expected
from parablock.wire.protocol import (
    AggregateReady,
    JoinReply,
    JoinRequest,
    RoundReport,
    SecAggCall,
    SecAggReply,
)


class ServerConnection(Protocol):
    def join(self, request: JoinRequest) -> JoinReply:
        """Take part (again): the run's settings, where to start, which blocks to download."""
        ...

    def upload(self, update: BlockUpdate) -> int:
        """Send a delta; returns the bytes sent. Raises ``UpdateRejected`` with the reason."""
        ...

    def wait_aggregate(self, round: int) -> AggregateReady:
        """Block until ``round`` is aggregated (no polling loop in the caller), or (secure
        aggregation) until the server asks this client to reveal shares (``reveal``)."""
        ...

    def secagg(self, call: SecAggCall) -> SecAggReply:
        """Secure aggregation's exchange: the roster, this client's sealed shares, reveals."""
        ...

    def download(
        self, block: int, version: int, expected: Expected | None = None, base: int | None = None
    ) -> tuple[BlockValue, int]:
        """A block's global value at ``version`` and the bytes received. ``expected``: the
        layout the reply must have (or a function of its metadata); ``base``: the version of
        the block this client holds, so that a compressed aggregate may come instead."""
        ...

    def report(self, report: RoundReport) -> None:
        """What the client measured this round (the server's metrics and timeline)."""
        ...

    def close(self) -> None: ...


class ServerEndpoint(Protocol):
    clients: int  # how many clients the run has (ids 0..clients-1)
    min_clients: int  # how many a round needs after its deadline
    next_round: int  # the round open now

    def join(self, request: JoinRequest, client: int) -> JoinReply:
        """Admit ``client`` (again): the settings, its start round, the blocks it must fetch."""
        ...

    def receive_update(self, payload: bytes | Iterable[bytes], client: int) -> tuple[bool, str]:
        """An update's bytes (or its chunks): ``(accepted, reason)``; never raises for them."""
        ...

    def wait_aggregate(
        self,
        round: int,
        timeout: float | None = None,
        alive: Callable[[], bool] | None = None,
        client: int | None = None,
    ) -> AggregateReady:
        """Block until ``round`` is aggregated (``alive``: is the caller still there?), or until
        the server needs ``client`` to reveal shares (secure aggregation, after a dropout)."""
        ...

    def secagg(self, call: SecAggCall, client: int) -> SecAggReply:
        """Secure aggregation's exchange with ``client`` (``core/secure.py``); a bad call raises
        ``MessageError`` saying why."""
        ...

    def block_payload(self, block: int, version: int, base: int | None = None) -> bytes:
        """A block's value (or a compressed change from ``base``) as bytes."""
        ...

    def block_chunks(
        self, block: int, version: int, chunk_bytes: int, base: int | None = None
    ) -> Iterator[bytes]:
        """The same as chunks of at most ``chunk_bytes``."""
        ...

    def report(self, report: RoundReport, client: int) -> None:
        """What ``client`` measured (the server's metrics and timeline)."""
        ...

    def drop_client(self, client: int, reason: str) -> None:
        """Stop waiting for ``client`` (it is gone, as the transport knows)."""
        ...

    def poll_aggregate(self, round: int) -> AggregateReady | None:
        """``wait_aggregate`` without waiting: None while the round is still open."""
        ...

    def check_deadline(self) -> None:
        """Close the open round if its deadline passed (the server's own clock)."""
        ...

    def wait_done(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the last round's aggregate (a failed round raises)."""
        ...

    def dropped(self) -> set[int]:
        """The clients dropped (and not back) so far."""
        ...

    def stop(self) -> None:
        """Wake every waiting caller with ``RunStopped``."""
        ...
