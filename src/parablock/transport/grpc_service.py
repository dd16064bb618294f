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

No caller can hold the server (``transport/guard.py``):

- **Authentication comes first.** An interceptor reads the ``authorization`` metadata
  (``Bearer <token>``) on gRPC's own polling thread, before any worker is taken; the clients file
  maps the token's hash to a client id, and that id, never a field of the payload, is who the
  server thinks is speaking. A call without a valid token is refused at once
  (UNAUTHENTICATED) by a handler that reads nothing, so it holds a worker for microseconds.
- **No worker waits for a peer unwatched.** Every method is served as a request stream, so the
  handler runs as soon as the call arrives and reads its request itself, under a deadline
  (``server.request_timeout_s``): a request that does not arrive, an upload whose next chunk
  does not come, a download whose next chunk is not taken within it ends the call (CANCELLED
  for the peer), logged and counted; an upload ended so is a rejected update.
- **Bounded calls.** A client holds at most ``CALLS_PER_CLIENT`` calls at once (an honest one
  holds two: its communication thread's and a report; three in full duplex); one connection
  carries at most ``STREAMS_PER_CONNECTION``; the server serves at most its workers plus a small
  queue (more are refused with RESOURCE_EXHAUSTED on the polling thread), ends TLS handshakes
  that take longer than ``HANDSHAKE_S`` and connections idle for ``IDLE_CONNECTION_S``.
- **Sizes before parsing.** Each request's size is checked against its message's bound before
  its JSON is read; malformed JSON (nested 100,000 deep included) is a counted refusal.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc

from parablock.errors import MessageError, RoundFailedError, RunStopped
from parablock.transport.auth import ClientsFile
from parablock.transport.guard import Refusals, Watch, Watchdog
from parablock.wire.messages import CHUNK_BYTES, parse_json
from parablock.wire.protocol import JoinRequest, RoundReport, SecAggCall, UploadReply
from parablock.wire.seams import ServerEndpoint

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
CALLS_PER_CLIENT = 4
STREAMS_PER_CONNECTION = 2 * CALLS_PER_CLIENT
HANDSHAKE_S = 15.0  # a TLS handshake that takes longer is ended
IDLE_CONNECTION_S = 120.0  # a connection without a call for this long is closed (clients reconnect)
QUEUE_CALLS = 32  # calls beyond the workers that may wait for one; more are refused at once
REQUEST_TIMEOUT_S = 30.0  # server.request_timeout_s: the peer's longest silence within a call
SERVER_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
    ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION),
    ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_S * 1000)),
    ("grpc.max_connection_idle_ms", int(IDLE_CONNECTION_S * 1000)),
]
SMALL_REQUEST = 4096  # {"round"} or {"block", "version", "base"}
ABORT_STOPPING = "stopping:"
ABORT_ROUND_FAILED = "round failed:"


def _raw(b: bytes) -> bytes:
    return b


@dataclass
class AuthStats:
    refused: Refusals = field(default_factory=Refusals)  # calls without a valid token, by reason
    ended: Refusals = field(default_factory=Refusals)  # calls refused or ended for what they did
    calls: dict[int, int] = field(default_factory=dict)  # client -> authenticated calls
    busy: dict[int, int] = field(default_factory=dict)  # client -> calls in progress
    bytes_in: int = 0  # the authenticated calls' request messages and upload chunks
    bytes_out: int = 0  # their replies and download chunks


class _Ended(Exception):
    """The call was ended (its peer went quiet, or sent no request); it is counted already."""


class FederationService:
    """The handlers; each runs for an authenticated client, holds one of its call slots, reads
    its request under a deadline, then calls the transport-agnostic ``Server``."""

    def __init__(
        self,
        server: ServerEndpoint,
        clients: ClientsFile,
        hold_joins: bool = False,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.server = server
        self.clients = clients
        self.stats = AuthStats()
        self.request_timeout_s = request_timeout_s
        self.watchdog = Watchdog()
        self._lock = threading.Lock()
        # With ``hold_joins`` a fresh client's join is answered only once ``started`` is set (the
        # clients the run starts with have joined), so that round 0 starts on every client
        # together and its time holds no join skew.
        self.started = threading.Event()
        if not hold_joins:
            self.started.set()
        self.start_wait_s = 3600.0
        self._methods: dict[str, tuple[Callable, Callable]] = {
            "Join": (grpc.stream_unary_rpc_method_handler, self.join),
            "Upload": (grpc.stream_unary_rpc_method_handler, self.upload),
            "WaitAggregate": (grpc.stream_unary_rpc_method_handler, self.wait_aggregate),
            "Download": (grpc.stream_stream_rpc_method_handler, self.download),
            "Report": (grpc.stream_unary_rpc_method_handler, self.report),
            "SecAgg": (grpc.stream_unary_rpc_method_handler, self.secagg),
        }

    # -- authentication (on gRPC's polling thread: no worker is taken yet) ---------------------
    def route(self, method: str, metadata) -> grpc.RpcMethodHandler | None:
        """The handler for a call of ``method`` with ``metadata``: ours bound to the client its
        token names, one that refuses at once, or None for a method this service lacks."""
        name = method.removeprefix(f"/{SERVICE}/")
        if name == method or name not in self._methods:
            return None
        token = None
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                token = value[len("Bearer ") :]
        client, reason = self.clients.identify(token)
        if client is None:
            return grpc.stream_unary_rpc_method_handler(
                functools.partial(self._deny, method=name, reason=reason),
                request_deserializer=_raw,
                response_serializer=_raw,
            )
        with self._lock:
            self.stats.calls[client] = self.stats.calls.get(client, 0) + 1
        kind, fn = self._methods[name]
        return kind(
            functools.partial(fn, client=client),
            request_deserializer=_raw,
            response_serializer=_raw,
        )

    def _deny(self, requests, context: grpc.ServicerContext, *, method: str, reason: str):
        """A call without a valid token: refused before anything of it is read."""
        self.stats.refused.add(reason, f"{method} from {context.peer()}: {reason}")
        context.abort(grpc.StatusCode.UNAUTHENTICATED, f"refused: {reason}")

    # -- one call: a slot, a watch on the peer ----------------------------------------------
    @contextmanager
    def _session(self, context: grpc.ServicerContext, method: str, client: int):
        """Hold one of the client's ``CALLS_PER_CLIENT`` slots and watch the peer."""
        with self._lock:
            busy = self.stats.busy.get(client, 0)
            if busy < CALLS_PER_CLIENT:
                self.stats.busy[client] = busy + 1
        if busy >= CALLS_PER_CLIENT:
            self.stats.ended.add(
                "busy", f"{method} from client {client}: {busy} calls already open"
            )
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"client {client} already has {busy} calls open (at most {CALLS_PER_CLIENT})",
            )
        watch = self.watchdog.watch(context.cancel, self.request_timeout_s)
        try:
            yield watch
        except _Ended:
            pass
        finally:
            watch.close()
            with self._lock:
                self.stats.busy[client] -= 1

    def _request(
        self,
        requests: Iterator[bytes],
        context: grpc.ServicerContext,
        watch: Watch,
        what: str,
        client: int,
        max_bytes: int,
    ) -> bytes:
        """The call's one request message, within the deadline and ``max_bytes``."""
        try:
            payload = next(requests)
        except (StopIteration, grpc.RpcError) as e:
            # a cancelled call's request stream ends either way
            if isinstance(e, StopIteration) and not watch.expired:
                self._refuse(context, client, what, "malformed", "expected one request message")
            raise self._ended(watch, client, what, "its request") from None
        watch.pause()
        self._count(into=len(payload))
        if len(payload) > max_bytes:
            self._refuse(
                context,
                client,
                what,
                "too large",
                f"a {what} request of {len(payload)} bytes is too large (at most {max_bytes})",
            )
        return payload

    def _ended(self, watch: Watch, client: int, what: str, awaited: str) -> _Ended:
        if watch.expired:
            self.stats.ended.add(
                "idle",
                f"{what} from client {client}: ended, {awaited} did not come within "
                f"{watch.limit_s:g}s",
            )
        return _Ended()

    def _count(self, into: int = 0, out: int = 0) -> None:
        with self._lock:
            self.stats.bytes_in += into
            self.stats.bytes_out += out

    def _sent(self, reply: bytes) -> bytes:
        self._count(out=len(reply))
        return reply

    def _refuse(self, context, client: int, what: str, kind: str, why: str) -> None:
        self.stats.ended.add(kind, f"{what} from client {client}: {why}")
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)

    def _chunks(self, requests: Iterator[bytes], watch: Watch, client: int) -> Iterator[bytes]:
        """An upload's chunks, each within the deadline after the one before."""
        while True:
            watch.touch()
            try:
                chunk = next(requests)
            except StopIteration:
                if not watch.expired:
                    watch.pause()
                    return
                self._ended(watch, client, "Upload", "its next chunk")
                raise MessageError(f"upload ended: no chunk for {watch.limit_s:g}s") from None
            except grpc.RpcError:
                self._ended(watch, client, "Upload", "its next chunk")
                raise MessageError(
                    f"upload ended: no chunk for {watch.limit_s:g}s"
                    if watch.expired
                    else "upload ended by the client"
                ) from None
            self._count(into=len(chunk))
            yield chunk

    # -- handlers ------------------------------------------------------------------------------
    def join(self, requests, context: grpc.ServicerContext, *, client: int) -> bytes:
        with self._session(context, "Join", client) as watch:
            payload = self._request(requests, context, watch, "Join", client, JoinRequest.MAX_BYTES)
            return self._join(payload, context, client)
        return b""  # ended: the peer sees CANCELLED

    def _join(self, payload: bytes, context: grpc.ServicerContext, client: int) -> bytes:
        try:
            request = JoinRequest.from_bytes(payload)
            if request.client != client:
                self.stats.ended.add(
                    "impersonation",
                    f"Join: client {client}'s token used to join as {request.client}",
                )
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"this token belongs to client {client}, not client {request.client}",
                )
            reply = self.server.join(request, client)
        except MessageError as e:
            self.stats.ended.add("join", f"Join from client {client}: {e}")
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        log.info("client %d joined from %s", client, context.peer())
        reply_bytes = self._sent(reply.to_bytes())
        if reply.start_round == 0 and not reply.keep_pending:
            waited = 0.0
            while not self.started.wait(1.0) and context.is_active():
                waited += 1.0
                if waited >= self.start_wait_s:
                    break
        return reply_bytes

    def upload(self, requests, context: grpc.ServicerContext, *, client: int) -> bytes:
        with self._session(context, "Upload", client) as watch:
            ok, reason = self.server.receive_update(self._chunks(requests, watch, client), client)
            return self._sent(UploadReply(ok, reason).to_bytes())
        return b""

    def wait_aggregate(self, requests, context: grpc.ServicerContext, *, client: int) -> bytes:
        with self._session(context, "WaitAggregate", client) as watch:
            payload = self._request(
                requests, context, watch, "WaitAggregate", client, SMALL_REQUEST
            )
            round = _field(payload, "round", context)
            try:
                ready = self.server.wait_aggregate(round, alive=context.is_active, client=client)
                return self._sent(ready.to_bytes())
            except RunStopped as e:
                context.abort(grpc.StatusCode.ABORTED, f"{ABORT_STOPPING} {e}")
            except RoundFailedError as e:
                context.abort(grpc.StatusCode.ABORTED, f"{ABORT_ROUND_FAILED} {e}")
            except MessageError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return b""

    def download(self, requests, context: grpc.ServicerContext, *, client: int) -> Iterator[bytes]:
        with self._session(context, "Download", client) as watch:
            payload = self._request(requests, context, watch, "Download", client, SMALL_REQUEST)
            block, version = _field(payload, "block", context), _field(payload, "version", context)
            base = _field(payload, "base", context, optional=True)
            try:
                chunks = self.server.block_chunks(block, version, CHUNK_BYTES, base)
            except MessageError as e:
                context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            try:
                for chunk in chunks:
                    watch.touch()  # the peer took the chunk before: a new deadline for this one
                    self._count(out=len(chunk))
                    yield chunk
            finally:
                if watch.expired:
                    self._ended(watch, client, "Download", "the taking of a chunk")

    def report(self, requests, context: grpc.ServicerContext, *, client: int) -> bytes:
        with self._session(context, "Report", client) as watch:
            payload = self._request(
                requests, context, watch, "Report", client, RoundReport.MAX_BYTES
            )
            try:
                self.server.report(RoundReport.from_bytes(payload), client)
            except MessageError as e:
                self.stats.ended.add("report", f"Report from client {client}: {e}")
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return self._sent(b"{}")
        return b""

    def secagg(self, requests, context: grpc.ServicerContext, *, client: int) -> bytes:
        """Secure aggregation's exchange (``core/unmasking.py``): strict JSON within
        ``SecAggCall.MAX_BYTES``; a refusal is counted and the client told why."""
        with self._session(context, "SecAgg", client) as watch:
            payload = self._request(
                requests, context, watch, "SecAgg", client, SecAggCall.MAX_BYTES
            )
            try:
                reply = self.server.secagg(SecAggCall.from_bytes(payload), client)
                return self._sent(reply.to_bytes())
            except RunStopped as e:
                context.abort(grpc.StatusCode.ABORTED, f"{ABORT_STOPPING} {e}")
            except MessageError as e:
                self.stats.ended.add("secagg", f"SecAgg from client {client}: {e}")
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return b""

    def interceptor(self) -> grpc.ServerInterceptor:
        return _Authenticate(self)

    def stop(self) -> None:
        self.watchdog.stop()


class _Authenticate(grpc.ServerInterceptor):
    """Runs on gRPC's polling thread for every call: routes it by its token (see ``route``)."""

    def __init__(self, service: FederationService) -> None:
        self.service = service

    def intercept_service(self, continuation, details):
        handler = self.service.route(details.method, details.invocation_metadata)
        return handler if handler is not None else continuation(details)


def _field(payload: bytes, name: str, context: grpc.ServicerContext, optional: bool = False):
    """The integer ``name`` of a JSON request (None when ``optional`` and absent)."""
    try:
        request = parse_json(payload, "request")
    except MessageError:
        request = None
    value = request.get(name) if isinstance(request, dict) else None
    if value is None and optional and isinstance(request, dict) and name not in request:
        return None
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
    grpc_server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc-worker"),
        interceptors=(service.interceptor(),),
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=workers + QUEUE_CALLS,
    )
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
