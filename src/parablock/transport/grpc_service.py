"""The server side of the network protocol: ParaBlock's ``Server`` behind gRPC.

Service ``parablock.v1.Federation``; every request and reply is bytes, framed by gRPC (no protobuf
code generation: control messages are the strict JSON of ``core.protocol``, blocks the chunked
safetensors stream of ``core.messages``):

- ``Join`` (unary): ``JoinRequest`` -> ``JoinReply`` (settings, start round, blocks to download);
- ``Upload`` (client stream of chunks): a ``BlockUpdate`` -> ``UploadReply``, decoded straight
  into tensors of the block's known shapes, so memory stays bounded by one block plus one chunk;
- ``WaitAggregate`` (unary, held open until the round is aggregated): ``{"round"}`` ->
  ``AggregateReady``;
- ``Download`` (server stream of chunks): ``{"block", "version"}`` and, optionally, ``"base"``
  (the version the client holds, so a compressed aggregate can come instead) -> a ``BlockValue``;
- ``Report`` (unary): ``RoundReport`` -> ``{}``.

Every call is authenticated before anything of its payload is read: the ``authorization``
metadata carries ``Bearer <token>``, the clients file maps the token's hash to a client id, and
that id, never a field of the payload, is who the server thinks is speaking. A client may hold at
most ``CALLS_PER_CLIENT`` calls at once (an honest one holds two: its communication thread's and a
report; three in full duplex, where an upload or wait and a download run together), so one token
cannot tie up the server's worker threads.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc

from parablock.core.messages import CHUNK_BYTES
from parablock.core.protocol import JoinRequest, RoundReport, UploadReply
from parablock.core.server import Server
from parablock.errors import MessageError, RoundFailedError, RunStopped
from parablock.transport.auth import ClientsFile

log = logging.getLogger(__name__)

SERVICE = "parablock.v1.Federation"
MAX_MESSAGE = 8 << 20  # chunks are 1 MiB; control messages are small
# gRPC's own liveness: a peer that stops answering pings is noticed within about 30 s.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 15_000),
    ("grpc.keepalive_timeout_ms", 15_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
]
CALLS_PER_CLIENT = 4
ABORT_STOPPING = "stopping:"
ABORT_ROUND_FAILED = "round failed:"


def _raw(b: bytes) -> bytes:
    return b


@dataclass
class AuthStats:
    refused: list[str] = field(default_factory=list)  # one line per refused call
    calls: dict[int, int] = field(default_factory=dict)  # client -> authenticated calls
    busy: dict[int, int] = field(default_factory=dict)  # client -> calls in progress


class FederationService:
    """The handlers; each authenticates, then calls the transport-agnostic ``Server``."""

    def __init__(self, server: Server, clients: ClientsFile, hold_joins: bool = False) -> None:
        self.server = server
        self.clients = clients
        self.stats = AuthStats()
        self._lock = threading.Lock()
        # With ``hold_joins`` a fresh client's join is answered only once ``started`` is set (the
        # clients the run starts with have joined), so that round 0 starts on every client
        # together and its time holds no join skew.
        self.started = threading.Event()
        if not hold_joins:
            self.started.set()
        self.start_wait_s = 3600.0

    # -- authentication ------------------------------------------------------------------------
    def _client(self, context: grpc.ServicerContext, method: str) -> int:
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                token = value[len("Bearer ") :]
        client, reason = self.clients.identify(token)
        if client is None:
            line = f"{method} from {context.peer()}: {reason}"
            with self._lock:
                self.stats.refused.append(line)
            log.warning("refused %s", line)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"refused: {reason}")
        with self._lock:
            self.stats.calls[client] = self.stats.calls.get(client, 0) + 1
        return client

    @contextmanager
    def _session(self, context: grpc.ServicerContext, method: str):
        """Authenticate the call and hold one of the client's ``CALLS_PER_CLIENT`` slots."""
        client = self._client(context, method)
        with self._lock:
            busy = self.stats.busy.get(client, 0)
            if busy < CALLS_PER_CLIENT:
                self.stats.busy[client] = busy + 1
        if busy >= CALLS_PER_CLIENT:
            log.warning("refused %s from client %d: %d calls already open", method, client, busy)
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"client {client} already has {busy} calls open (at most {CALLS_PER_CLIENT})",
            )
        try:
            yield client
        finally:
            with self._lock:
                self.stats.busy[client] -= 1

    # -- handlers ------------------------------------------------------------------------------
    def join(self, payload: bytes, context: grpc.ServicerContext) -> bytes:
        with self._session(context, "Join") as client:
            return self._join(payload, context, client)

    def _join(self, payload: bytes, context: grpc.ServicerContext, client: int) -> bytes:
        try:
            request = JoinRequest.from_bytes(payload)
            if request.client != client:
                log.warning(
                    "refused Join: client %d's token used to join as %d", client, request.client
                )
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"this token belongs to client {client}, not client {request.client}",
                )
            reply = self.server.join(request, client)
        except MessageError as e:
            log.warning("refused Join from client %d: %s", client, e)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        log.info("client %d joined from %s", client, context.peer())
        if reply.start_round == 0 and not reply.keep_pending:
            self.started.wait(self.start_wait_s)
        return reply.to_bytes()

    def upload(self, chunks: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        with self._session(context, "Upload") as client:
            ok, reason = self.server.receive_update(chunks, client)
        return UploadReply(ok, reason).to_bytes()

    def wait_aggregate(self, payload: bytes, context: grpc.ServicerContext) -> bytes:
        with self._session(context, "WaitAggregate"):
            round = _field(payload, "round", context)
            try:
                return self.server.wait_aggregate(round).to_bytes()
            except RunStopped as e:
                context.abort(grpc.StatusCode.ABORTED, f"{ABORT_STOPPING} {e}")
            except RoundFailedError as e:
                context.abort(grpc.StatusCode.ABORTED, f"{ABORT_ROUND_FAILED} {e}")
            except MessageError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def download(self, payload: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._session(context, "Download"):
            block, version = _field(payload, "block", context), _field(payload, "version", context)
            base = _field(payload, "base", context, optional=True)
            try:
                chunks = self.server.block_chunks(block, version, CHUNK_BYTES, base)
            except MessageError as e:
                context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            yield from chunks

    def report(self, payload: bytes, context: grpc.ServicerContext) -> bytes:
        with self._session(context, "Report") as client:
            try:
                self.server.report(RoundReport.from_bytes(payload), client)
            except MessageError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return b"{}"

    def handler(self) -> grpc.GenericRpcHandler:
        def h(kind: Callable, fn: Callable):
            return kind(fn, request_deserializer=_raw, response_serializer=_raw)

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Join": h(grpc.unary_unary_rpc_method_handler, self.join),
                "Upload": h(grpc.stream_unary_rpc_method_handler, self.upload),
                "WaitAggregate": h(grpc.unary_unary_rpc_method_handler, self.wait_aggregate),
                "Download": h(grpc.unary_stream_rpc_method_handler, self.download),
                "Report": h(grpc.unary_unary_rpc_method_handler, self.report),
            },
        )


def _field(payload: bytes, name: str, context: grpc.ServicerContext, optional: bool = False):
    """The integer ``name`` of a JSON request (None when ``optional`` and absent)."""
    try:
        request = json.loads(payload)
        value = request[name]
    except KeyError:
        if optional and isinstance(request, dict):
            return None
        value = None
    except (ValueError, TypeError):
        value = None
    if type(value) is not int:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected {{{name!r}: integer}}")
    return value


def start(
    service: FederationService,
    address: str,
    credentials: grpc.ServerCredentials | None,
    workers: int,
) -> tuple[grpc.Server, int]:
    """Serve on ``address`` (``host:port``; port 0 picks a free one); returns (server, port).

    ``credentials`` None means plain text (only with ``server.insecure``)."""
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=workers), options=SERVER_OPTIONS)
    grpc_server.add_generic_rpc_handlers((service.handler(),))
    try:
        if credentials is None:
            port = grpc_server.add_insecure_port(address)
        else:
            port = grpc_server.add_secure_port(address, credentials)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {address}: {e}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address} (in use, or not an address of this machine)")
    grpc_server.start()
    return grpc_server, port
