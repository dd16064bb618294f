"""The in-process connection: a ``ServerEndpoint`` (``wire/seams.py``) in this process, the
server itself or a proxy with the same methods (the Ray backend's server actor). Blocks still
cross as bytes (never shared tensors), through emulated links when ``link.*`` is set, so the
local simulator moves exactly what a network would.
"""

from __future__ import annotations

from collections.abc import Iterable

from parablock.errors import ConnectError, UpdateRejected
from parablock.transport.link import Link, LinkSpec
from parablock.wire.messages import BlockUpdate, BlockValue, Expected, expecting
from parablock.wire.protocol import (
    AggregateReady,
    JoinReply,
    JoinRequest,
    RoundReport,
    SecAggCall,
    SecAggReply,
)
from parablock.wire.seams import ServerEndpoint


class InProcessConnection:
    def __init__(
        self,
        server: ServerEndpoint,
        client: int,
        up: LinkSpec | None = None,
        down: LinkSpec | None = None,
    ) -> None:
        self.server = server
        self.client = client
        self.uplink = Link(up)
        self.downlink = Link(down)

    def join(self, request: JoinRequest) -> JoinReply:
        return self.server.join(request, self.client)

    def upload(self, update: BlockUpdate) -> int:
        return self.send_chunks([update.serialize()])

    def send_chunks(self, chunks: Iterable[bytes], token: str | None = None) -> int:
        """Send an update's bytes as they are (fault injection sends crafted ones)."""
        if token is not None:
            raise ConnectError("an in-process connection carries no token")
        received = self.uplink.transmit(b"".join(chunks))
        ok, reason = self.server.receive_update(received, self.client)
        if not ok:
            raise UpdateRejected(reason)
        return len(received)

    def wait_aggregate(self, round: int) -> AggregateReady:
        return self.server.wait_aggregate(round, client=self.client)

    def secagg(self, call: SecAggCall) -> SecAggReply:
        return self.server.secagg(call, self.client)

    def download(
        self, block: int, version: int, expected: Expected | None = None, base: int | None = None
    ) -> tuple[BlockValue, int]:
        received = self.downlink.transmit(self.server.block_payload(block, version, base))
        value = BlockValue.from_chunks([received], expecting(expected))
        return value, len(received)

    def report(self, report: RoundReport) -> None:
        self.server.report(report, self.client)

    def close(self) -> None:
        pass
