"""The worker's side: a ``ServerConnection`` whose calls travel in Flower messages.

Under Flower the server speaks first: each message the ServerApp sends a node is handed to the
node's worker (``exchange``), which answers with what its client has to say. ``Mailbox`` turns
that into the calls client code makes: a call puts its request in the outbox and waits for the
answer with the same key; an answer that came ahead of its request (the ServerApp sends the
round's aggregate with the upload's answer) is kept until asked for. ``exchange`` returns once
the client is blocked on the server (a request waits in the outbox) or has finished, so that one
message each way carries a round while the computation thread trains the next block.

When a message to the node fails, the server loses this client's session and, once the node
answers again, sends ``rejoin``: every request it has not answered is void (its caller gets
``ServerGone``, and ``run_site`` joins again from the checkpoint, as a networked client does after
a lost connection), except a join, which starts a session and goes out (again) in the reply.
"""

from __future__ import annotations

import threading
import time

from parablock.errors import (
    ConnectError,
    MessageError,
    RoundFailedError,
    RunStopped,
    ServerGone,
    UpdateRejected,
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
    Key,
)
from parablock.transport.link import Link, LinkSpec
from parablock.wire.messages import BlockUpdate, BlockValue, Expected, expecting
from parablock.wire.protocol import AggregateReady, JoinReply, JoinRequest, RoundReport, UploadReply

# the errors a server-side answer may carry, by name: the same a gRPC connection raises
ERRORS: dict[str, type[Exception]] = {
    "RunStopped": RunStopped,
    "RoundFailedError": RoundFailedError,
    "MessageError": MessageError,
    "ConnectError": ConnectError,
}


class Mailbox:
    def __init__(
        self, up: LinkSpec | None = None, down: LinkSpec | None = None, silence_s: float = 3600.0
    ) -> None:
        self.uplink, self.downlink = Link(up), Link(down)
        self.silence_s = silence_s  # no message from the server for this long: it is gone
        self._cond = threading.Condition()
        self._out = Bundle()
        self._answers: dict[Key, tuple[Item, bytes | None]] = {}
        self._waiting = 0  # callers blocked on an answer
        self._session = 0  # how many sessions the server has lost (``rejoin``)
        self._joining: tuple[Item, bytes | None] | None = None  # the join waiting on its answer
        self._closed = False
        self._heard = time.monotonic()

    # -- ServerConnection ----------------------------------------------------------------------
    def join(self, request: JoinRequest) -> JoinReply:
        _, payload = self._ask(Item(JOIN), request.to_bytes())
        return JoinReply.from_bytes(payload or b"")

    def upload(self, update: BlockUpdate) -> int:
        data = self.uplink.transmit(update.serialize())
        _, payload = self._ask(Item(UPLOAD, round=update.round, base=update.base_version), data)
        reply = UploadReply.from_bytes(payload or b"")
        if not reply.accepted:
            raise UpdateRejected(reply.reason)
        return len(data)

    def wait_aggregate(self, round: int) -> AggregateReady:
        item, _ = self._ask(Item(WAIT, round=round))
        return AggregateReady(item.block, item.version)

    def download(
        self, block: int, version: int, expected: Expected | None = None, base: int | None = None
    ) -> tuple[BlockValue, int]:
        _, payload = self._ask(Item(DOWNLOAD, block=block, version=version, base=base))
        received = self.downlink.transmit(payload or b"")
        return BlockValue.from_chunks([received], expecting(expected)), len(received)

    def report(self, report: RoundReport) -> None:
        with self._cond:
            self._out.add(Item(REPORT), report.to_bytes())
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            if not self._closed:
                self._out.add(Item(DONE))
            self._closed = True
            self._cond.notify_all()

    def _ask(self, request: Item, payload: bytes | None = None) -> tuple[Item, bytes | None]:
        key = request.key()
        with self._cond:
            if key not in self._answers:
                self._out.add(request, payload)
                session = self._session
                if request.kind == JOIN:
                    self._joining = (request, payload)
                self._waiting += 1
                self._cond.notify_all()
                try:
                    while key not in self._answers:
                        if self._closed:
                            raise RunStopped("the worker is stopping")
                        if self._session != session and request.kind != JOIN:
                            raise ServerGone(
                                "the Flower server lost this client's session (a message failed)"
                            )
                        if time.monotonic() - self._heard > self.silence_s:
                            raise ServerGone(
                                f"no message from the Flower server for {self.silence_s:g}s"
                            )
                        self._cond.wait(timeout=1.0)
                finally:
                    self._waiting -= 1
                    if request.kind == JOIN:
                        self._joining = None
            item, data = self._answers.pop(key)
        if item.error:
            raise ERRORS.get(item.error, ServerGone)(_text(data))
        return item, data

    # -- the hand-over ---------------------------------------------------------------------------
    def exchange(self, inbound: Bundle, timeout: float) -> Bundle:
        """Take the server's answers; return what the client sends, once it waits on the server
        (a request is in the outbox) or has finished, or after ``timeout`` (maybe nothing)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._heard = time.monotonic()
            if any(i.kind == REJOIN for i in inbound.items):
                self._forget(answered=any(i.kind == JOIN for i in inbound.items))
            for item in inbound.items:
                if item.kind == REJOIN:
                    continue
                self._answers[item.key()] = (
                    item,
                    inbound.payload(item) if item.payload >= 0 else None,
                )
            self._cond.notify_all()
            while not self._blocked():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(timeout=min(left, 1.0))
            out, self._out = self._out, Bundle()
            self._heard = time.monotonic()
            return out

    def _forget(self, answered: bool) -> None:
        """With the lock held: the server lost this client's session. Its answers and requests
        are void (their callers raise ``ServerGone``); reports and ``done`` still go out, and so
        does a join waiting on its answer, unless this message ``answered`` it (a join starts
        the next session: a restarted worker's first join may meet the ``rejoin`` meant for the
        process it replaces)."""
        self._session += 1
        self._answers.clear()
        kept = Bundle()
        for item in self._out.items:
            if item.kind in (REPORT, DONE):
                kept.add(item, self._out.payload(item) if item.payload >= 0 else None)
        if self._joining is not None and not answered:
            kept.add(*self._joining)
        self._out = kept
        self._cond.notify_all()

    def _blocked(self) -> bool:
        asks = any(i.kind not in (REPORT, DONE) for i in self._out.items)
        return self._closed or (self._waiting > 0 and asks)

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._closed and not self._out.items


def _text(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", "replace")[:2000]
