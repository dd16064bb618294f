"""The client side of the network protocol: ``ServerConnection`` over gRPC (see grpc_service.py).

TLS whenever a CA is given (and a client certificate for mutual TLS); plain text only when asked
for explicitly. Every call carries the client's token. Blocks go up and come down as streams of
chunks, paced by emulated links when those are set, so the bytes really cross the socket while the
computation thread trains.

gRPC failures become one-line errors that say what to check: ``ConnectError`` (exit code 2) for
what the user can fix (address, certificate, token, model, version), ``ServerGone`` (exit code 1)
when a running server goes away, and the server's own verdicts (``RoundFailedError``,
``RunStopped``) as themselves.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import grpc

from parablock.errors import (
    ConnectError,
    MessageError,
    RoundFailedError,
    RunStopped,
    ServerGone,
    Unreachable,
    UpdateRejected,
)
from parablock.transport.grpc_service import (
    ABORT_ROUND_FAILED,
    ABORT_STOPPING,
    CHANNEL_OPTIONS,
    SERVICE,
)
from parablock.transport.link import Link, LinkSpec
from parablock.wire.messages import BlockUpdate, BlockValue, Expected, expecting
from parablock.wire.protocol import (
    AggregateReady,
    JoinReply,
    JoinRequest,
    RoundReport,
    SecAggCall,
    SecAggReply,
    UploadReply,
)

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 60.0


def _raw(b: bytes) -> bytes:
    return b


class GrpcConnection:
    def __init__(
        self,
        address: str,
        token: str,
        *,
        ca: bytes | None = None,
        cert: bytes | None = None,
        key: bytes | None = None,
        insecure: bool = False,
        up: LinkSpec | None = None,
        down: LinkSpec | None = None,
    ) -> None:
        if ca is None and not insecure:
            raise ConnectError("no CA certificate given (--ca FILE); plain text needs --insecure")
        self.address = address
        self._metadata = (("authorization", f"Bearer {token}"),)
        if insecure:
            self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            creds = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert
            )
            self.channel = grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
        self.tls = not insecure
        self.uplink = Link(up)
        self.downlink = Link(down)

        def method(kind, name):
            return kind(f"/{SERVICE}/{name}", request_serializer=_raw, response_deserializer=_raw)

        self._join = method(self.channel.unary_unary, "Join")
        self._upload = method(self.channel.stream_unary, "Upload")
        self._wait = method(self.channel.unary_unary, "WaitAggregate")
        self._download = method(self.channel.unary_stream, "Download")
        self._report = method(self.channel.unary_unary, "Report")
        self._secagg = method(self.channel.unary_unary, "SecAgg")

    # -- the seam ------------------------------------------------------------------------------
    def join(self, request: JoinRequest) -> JoinReply:
        payload = self._call(self._join, request.to_bytes(), "join", timeout=JOIN_TIMEOUT_S)
        reply = JoinReply.from_bytes(payload)
        if reply.protocol != request.protocol:
            raise ConnectError(
                f"protocol mismatch: this client speaks version {request.protocol}, the server "
                f"{reply.protocol}; install the same ParaBlock version on both"
            )
        return reply

    def upload(self, update: BlockUpdate) -> int:
        return self.send_chunks(update.chunks())

    def send_chunks(self, chunks: Iterable[bytes], token: str | None = None) -> int:
        """Stream an update's chunks as they are (fault injection sends crafted ones, or a
        wrong ``token``)."""
        sent = 0

        def counted():
            nonlocal sent
            for chunk in self.uplink.pace(chunks):
                sent += len(chunk)
                yield chunk

        metadata = None if token is None else (("authorization", f"Bearer {token}"),)
        reply = UploadReply.from_bytes(
            self._call(self._upload, counted(), "upload", metadata=metadata)
        )
        if not reply.accepted:
            raise UpdateRejected(reply.reason)
        return sent

    def wait_aggregate(self, round: int) -> AggregateReady:
        payload = json.dumps({"round": round}).encode()
        return AggregateReady.from_bytes(self._call(self._wait, payload, "wait for the aggregate"))

    def download(
        self, block: int, version: int, expected: Expected | None = None, base: int | None = None
    ) -> tuple[BlockValue, int]:
        received = 0
        ask = {"block": block, "version": version}
        if base is not None:
            ask["base"] = base
        request = json.dumps(ask).encode()

        def counted():
            nonlocal received
            try:
                for chunk in self.downlink.pace(self._download(request, metadata=self._metadata)):
                    received += len(chunk)
                    yield chunk
            except grpc.RpcError as e:
                raise self._error(e, "download") from None

        value = BlockValue.from_chunks(counted(), expecting(expected))
        if (value.block, value.version) != (block, version):
            raise MessageError(
                f"asked for block {block} v{version}, got {value.block} v{value.version}"
            )
        return value, received

    def report(self, report: RoundReport) -> None:
        self._call(self._report, report.to_bytes(), "report")

    def secagg(self, call: SecAggCall) -> SecAggReply:
        what = f"secure aggregation's {call.kind}"
        return SecAggReply.from_bytes(self._call(self._secagg, call.to_bytes(), what))

    def close(self) -> None:
        self.channel.close()

    # -- errors --------------------------------------------------------------------------------
    def _call(
        self, method, request, what: str, timeout: float | None = None, metadata=None
    ) -> bytes:
        try:
            return method(request, metadata=metadata or self._metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise self._error(e, what) from None

    def _error(self, e: grpc.RpcError, what: str) -> Exception:
        code, details = e.code(), (e.details() or "").strip()
        if what == "join" and code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ):
            check = (
                "that it uses TLS with a certificate signed by --ca for this host name"
                if self.tls
                else "that it was started with server.insecure=true (or give --ca)"
            )
            return Unreachable(
                f"cannot reach the ParaBlock server at {self.address} ({details or code.name}): "
                f"check the address and port, that the server is running and reachable, and {check}"
            )
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return ConnectError(
                f"the server at {self.address} {details or 'refused the token'}: check "
                "--token-file (and that the server's clients file holds its hash)"
            )
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return ConnectError(f"the server at {self.address} refused this client: {details}")
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return ConnectError(f"the server at {self.address} refused to {what}: {details}")
        if code == grpc.StatusCode.ABORTED and details.startswith(ABORT_STOPPING):
            return RunStopped(details)
        if code == grpc.StatusCode.ABORTED and details.startswith(ABORT_ROUND_FAILED):
            return RoundFailedError(details.removeprefix(ABORT_ROUND_FAILED).strip())
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            return MessageError(f"{what}: the server says {details}")
        return ServerGone(
            f"lost the ParaBlock server at {self.address} during {what} ({code.name}: "
            f"{details or 'no details'}); the client's checkpoint is kept: run the same "
            "command again to rejoin"
        )
