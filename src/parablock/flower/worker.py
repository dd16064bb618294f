"""``parablock flower-worker``: the persistent ParaBlock client beside a Flower SuperNode.

Flower starts a fresh ClientApp process for every message, so nothing that lives in a ClientApp
survives a round. The worker does: it holds the model copy, this site's own data and the
computation thread, and runs the same client code as ``parablock client`` (checkpoints, metrics
and summary in ``--out``). Its server connection is a ``Mailbox``; the ClientApp hands each
Flower message to it over a local gRPC stream (``--listen``, a Unix socket in ``--out`` by
default, readable by this user only) and returns what the client has to say.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc

from parablock.errors import ConfigError, MessageError
from parablock.flower.bundle import Bundle
from parablock.flower.mailbox import Mailbox
from parablock.run.site import SiteOptions, run_site

log = logging.getLogger(__name__)

SERVICE = "parablock.v1.Worker"
METHOD = f"/{SERVICE}/HandOver"
MAX_MESSAGE = 1 << 30  # a frame is one payload: a whole block
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]
FINISH_S = 120.0  # after its last round, how long the worker waits to hand its final report over


def _raw(b: bytes) -> bytes:
    return b


class MailboxConnection:
    """One session's connection: the worker's mailbox, which outlives the session (a client
    that restarts from its checkpoint rejoins through the same mailbox)."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox

    def __getattr__(self, name):
        return getattr(self.mailbox, name)

    def close(self) -> None:
        pass


class WorkerService:
    def __init__(self, mailbox: Mailbox, timeout_s: float) -> None:
        self.mailbox = mailbox
        self.timeout_s = timeout_s
        self._lock = threading.Lock()  # one hand-over at a time
        self.handovers = 0

    def hand_over(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            inbound = Bundle.from_frames(list(frames))
        except MessageError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        with self._lock:
            out = self.mailbox.exchange(inbound, self.timeout_s)
            self.handovers += 1
        yield from out.frames()

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self.hand_over, request_deserializer=_raw, response_serializer=_raw
        )
        return grpc.method_handlers_generic_handler(SERVICE, {"HandOver": method})


def default_listen(o: SiteOptions) -> str:
    return f"unix:{(o.out_dir() / 'worker.sock').resolve()}"


def run_worker(o: SiteOptions, listen: str = "", handover_timeout_s: float = 3600.0) -> dict:
    """Serve hand-overs on ``listen`` and run the client to the end of the run."""
    if not handover_timeout_s > 0:
        raise ConfigError(f"--handover-timeout-s must be > 0, got {handover_timeout_s:g}")
    o = replace(o, server=o.server or "flower")
    out = o.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)  # the socket inside is this user's only
    listen = listen or default_listen(o)
    mailbox = Mailbox(silence_s=max(handover_timeout_s, o.reconnect_s))
    service = WorkerService(mailbox, handover_timeout_s)
    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=OPTIONS)
    server.add_generic_rpc_handlers((service.handler(),))
    try:
        port = server.add_insecure_port(listen)  # local only: a Unix socket or 127.0.0.1
    except RuntimeError as e:
        raise ConfigError(f"--listen {listen}: {e}") from None
    if port == 0:
        raise ConfigError(f"--listen {listen}: cannot listen there")
    server.start()
    log.info("flower worker for client %d listening on %s", o.client, listen)
    try:
        summary = run_site(o, lambda up, down: _connection(mailbox, up, down))
    finally:
        mailbox.close()
        _wait_finished(mailbox)
        server.stop(grace=2.0).wait()
    return summary


def _connection(mailbox: Mailbox, up, down) -> MailboxConnection:
    mailbox.uplink.spec, mailbox.downlink.spec = up, down  # this site's emulated links
    return MailboxConnection(mailbox)


def _wait_finished(mailbox: Mailbox) -> None:
    """Until the final report has been handed over (or ``FINISH_S``)."""
    import time

    deadline = time.monotonic() + FINISH_S
    while not mailbox.finished and time.monotonic() < deadline:
        time.sleep(0.1)
