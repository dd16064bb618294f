"""More overlap for ParaBlock: extra local steps while the link is busy, and full duplex.

ParaBlock's round t trains block b_t on the computation thread while the communication thread moves
round t-1's delta (upload, wait for the aggregate, download). Two options squeeze out what is left:

- ``federation.local_steps_max`` (``ElasticBatches``): when communication takes longer than
  ``local_steps`` steps, the computation thread would sit idle at the barrier. Instead it keeps
  taking steps on its block, at least ``local_steps`` and at most ``local_steps_max``, for as long
  as the communication that the next upload has to wait for is still running, and the update
  carries the examples it really used. The batches come from one seeded stream per round
  (``data.examples.round_batches``): the first ``local_steps`` are exactly the usual ones.
- ``federation.duplex`` (``DuplexLink``): the upload of round t's delta starts as soon as it
  exists (right after compute t, once round t-1's aggregate exists: the server takes updates for
  the open round only), on its own thread, while the download of round t-1's aggregate may still
  be running on another. The computation thread still waits at the barrier for round t-1's
  aggregate and applies the correction before it trains round t+1, so the staleness stays one
  round and the invariant stays exact; the same updates reach the same rounds, only sooner.

Round time, steady state, with T_up, T_agg, T_down per round (``tools/estimate.py``):
half duplex max(T_comp, T_up + T_agg + T_down); full duplex max(T_comp, T_up + T_agg, T_down,
(T_comp + T_up + T_agg + T_down) / 2). The last term is the one-round staleness itself: compute
t -> upload t -> aggregate t -> download t must fit in the two rounds before compute t+2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parablock.core.metrics import RoundRecord
    from parablock.wire.messages import BlockUpdate, BlockValue
    from parablock.wire.protocol import AggregateReady


class ElasticBatches:
    """A round's batches for a computation thread that keeps stepping while its link is busy.

    Read once: the first ``least`` batches always, then one more before each further step as long
    as ``busy()`` holds and fewer than ``most`` were taken. ``taken`` counts what was read.
    """

    def __init__(
        self, stream: Iterator[list[int]], least: int, most: int, busy: Callable[[], bool]
    ) -> None:
        self.stream = stream
        self.least = least
        self.most = most
        self.busy = busy
        self.taken = 0

    def __iter__(self) -> Iterator[list[int]]:
        while self.taken < self.most and (self.taken < self.least or self.busy()):
            self.taken += 1
            yield next(self.stream)


@dataclass
class InFlight:
    """One delta on its way: ``sent`` holds once it is uploaded and its round's aggregate exists
    (the uplink is free for the next delta); ``fetched`` holds the downloaded aggregate."""

    sent: Future = field(default_factory=Future)
    fetched: Future = field(default_factory=Future)

    def busy(self) -> bool:
        """True while the next delta could not start up yet."""
        return not self.sent.done()

    def result(self) -> BlockValue:
        return self.fetched.result()


class DuplexLink:
    """Full duplex for one client: an upload thread and a download thread.

    ``send(update, record)`` queues, on the upload thread, uploading ``update`` and waiting for its
    round's aggregate (``upload_and_wait``); the download of that aggregate (``download``) then
    queues on the download thread, so the next delta's upload can run while it downloads. Both
    threads keep their order, so deltas go up and aggregates come down round after round. Once a
    step fails, the deltas queued behind it are not sent (as a half-duplex client, which stops at
    the barrier where the failure shows, would never have sent them).
    """

    def __init__(
        self,
        client: int,
        upload_and_wait: Callable[[BlockUpdate, RoundRecord], AggregateReady],
        download: Callable[[AggregateReady, RoundRecord], BlockValue],
    ) -> None:
        self._upload_and_wait = upload_and_wait
        self._download = download
        self._up = ThreadPoolExecutor(1, thread_name_prefix=f"client{client}-up")
        self._down = ThreadPoolExecutor(1, thread_name_prefix=f"client{client}-down")
        self._failed: BaseException | None = None

    def send(self, update: BlockUpdate, record: RoundRecord) -> InFlight:
        flight = InFlight()
        self._up.submit(self._send, update, record, flight)
        return flight

    def _send(self, update: BlockUpdate, record: RoundRecord, flight: InFlight) -> None:
        try:
            if self._failed is not None:
                raise self._failed
            ready = self._upload_and_wait(update, record)
        except BaseException as e:
            self._fail(e, flight)
            return
        flight.sent.set_result(ready)
        self._down.submit(self._fetch, ready, record, flight)

    def _fetch(self, ready: AggregateReady, record: RoundRecord, flight: InFlight) -> None:
        try:
            flight.fetched.set_result(self._download(ready, record))
        except BaseException as e:
            self._fail(e, flight)

    def _fail(self, e: BaseException, flight: InFlight) -> None:
        self._failed = self._failed or e
        for f in (flight.sent, flight.fetched):
            if not f.done():
                f.set_exception(e)

    def close(self) -> None:
        """Finish what is running; what is only queued is dropped (the client is leaving)."""
        self._up.shutdown(wait=True, cancel_futures=True)
        self._down.shutdown(wait=True, cancel_futures=True)
