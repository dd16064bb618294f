"""How a client reaches the server: the seam every transport implements.

``ServerConnection`` is all client code ever calls: ``join``, ``upload``, ``wait_aggregate``,
``download``, ``report``. Its implementations: ``inprocess.InProcessConnection`` (the server object
in this process, or a proxy to it such as a Ray actor handle) and ``grpc_client.GrpcConnection``
(a real network, TLS and a per-client token). Link emulation (``link.Link``) paces the chunks of
either one when ``link.*`` asks for it; without it, transfers take the transport's real time.
"""

from __future__ import annotations

from typing import Protocol

from parablock.core.messages import BlockUpdate, BlockValue, Expected
from parablock.core.protocol import AggregateReady, JoinReply, JoinRequest, RoundReport


class ServerConnection(Protocol):
    def join(self, request: JoinRequest) -> JoinReply:
        """Take part (again): the run's settings, where to start, which blocks to download."""
        ...

    def upload(self, update: BlockUpdate) -> int:
        """Send a delta; returns the bytes sent. Raises ``UpdateRejected`` with the reason."""
        ...

    def wait_aggregate(self, round: int) -> AggregateReady:
        """Block until ``round`` is aggregated (no polling loop in the caller)."""
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
