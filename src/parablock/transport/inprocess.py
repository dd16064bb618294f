"""The client's connection to the server: messages become bytes and cross emulated links.

``Connection`` is what client code calls (upload, wait_aggregate, download); it does not know where
the server lives. The ``ServerEndpoint`` behind it is the in-process ``Server`` itself for the local
backend, or a proxy to a remote one (e.g. a Ray actor) for other backends.
"""

from __future__ import annotations

from typing import Protocol

from parablock.core.messages import BlockUpdate, BlockValue, MessageError
from parablock.errors import UpdateRejected  # noqa: F401
from parablock.transport.link import Link, LinkSpec


class ServerEndpoint(Protocol):
    def join(self, client: int, versions: dict[int, int]) -> tuple[list[int], list[bytes]]: ...

    def receive_update(self, payload: bytes) -> tuple[bool, str]: ...

    def wait_aggregate(self, round: int, timeout: float | None = None) -> bytes: ...


class Connection:
    def __init__(self, server: ServerEndpoint, up: LinkSpec, down: LinkSpec) -> None:
        self.server = server
        self.uplink = Link(up)
        self.downlink = Link(down)

    def join(
        self, client: int, versions: dict[int, int]
    ) -> tuple[list[int], list[BlockValue], int]:
        """Returns the round plan, the blocks to catch up on, and the bytes downloaded."""
        plan, payloads = self.server.join(client, versions)
        values, nbytes = [], 0
        for p in payloads:
            received = self.downlink.transmit(p)
            nbytes += len(received)
            values.append(BlockValue.deserialize(received))
        return plan, values, nbytes

    def upload(self, update: BlockUpdate) -> int:
        """Send the update across the uplink; returns the bytes sent."""
        received = self.uplink.transmit(update.serialize())
        ok, reason = self.server.receive_update(received)
        if not ok:
            raise UpdateRejected(reason)
        return len(received)

    def wait_aggregate(self, round: int) -> bytes:
        """Wait until the server has aggregated ``round``; its payload has not crossed yet."""
        return self.server.wait_aggregate(round)

    def download(self, payload: bytes) -> BlockValue:
        received = self.downlink.transmit(payload)
        value = BlockValue.deserialize(received)
        if len(received) != len(payload):
            raise MessageError("download truncated")
        return value
