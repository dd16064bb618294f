"""What keeps a caller from holding the networked server: counted refusals, and deadlines on the
peer.

- ``Refusals``: every refused or ended call is counted by kind and the last few are kept; the log
  gets at most one line per kind every few seconds (with how many were not logged), so a flood of
  bad calls can neither grow the server's memory nor fill its disk.
- ``Watchdog``: one thread that ends calls whose peer has gone quiet. A handler watches its call
  while it waits for the peer (the request to arrive, an upload's next chunk, a download's next
  chunk to be taken) and pauses the watch while the wait is the server's own (an aggregate that
  is not ready yet). A watch that expires cancels its call: the handler's wait ends at once and
  its worker thread and call slot are free again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

log = logging.getLogger(__name__)


class Refusals:
    """Refused and ended calls: ``len()`` counts them all, ``by_kind`` per kind, ``recent`` keeps
    the last lines; logging is rate-limited per kind."""

    def __init__(self, keep: int = 100, log_every_s: float = 10.0) -> None:
        self.by_kind: Counter[str] = Counter()
        self.recent: deque[str] = deque(maxlen=keep)
        self.log_every_s = log_every_s
        self._logged: dict[str, float] = {}  # kind -> when a line of it was last logged
        self._quiet: Counter[str] = Counter()  # kind -> lines not logged since
        self._lock = threading.Lock()

    def add(self, kind: str, line: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.by_kind[kind] += 1
            self.recent.append(line)
            last = self._logged.get(kind)
            if last is not None and now - last < self.log_every_s:
                self._quiet[kind] += 1
                return
            self._logged[kind] = now
            quiet, self._quiet[kind] = self._quiet[kind], 0
        more = f" (and {quiet} more like it not logged)" if quiet else ""
        log.warning("refused %s%s", line, more)

    def __len__(self) -> int:
        with self._lock:
            return sum(self.by_kind.values())

    def counts(self) -> dict[str, int]:
        """kind -> how many, as of now (a copy: the metrics endpoint reads it while calls add)."""
        with self._lock:
            return dict(self.by_kind)


class Watch:
    """One call's deadline on its peer; ``touch`` on progress, ``pause`` while the server itself
    is the one who is slow, ``close`` when the call ends."""

    def __init__(self, dog: Watchdog, cancel: Callable[[], None], limit_s: float) -> None:
        self._dog = dog
        self.cancel = cancel
        self.limit_s = limit_s
        self.deadline: float | None = time.monotonic() + limit_s
        self.expired = False

    def touch(self) -> None:
        with self._dog._lock:
            if not self.expired:
                self.deadline = time.monotonic() + self.limit_s

    def pause(self) -> None:
        with self._dog._lock:
            self.deadline = None

    def close(self) -> None:
        with self._dog._lock:
            self.deadline = None
            self._dog._watches.discard(self)


class Watchdog:
    """Ends the calls whose watch expired; its thread starts with the first watch."""

    def __init__(self, tick_s: float = 0.1) -> None:
        self.tick_s = tick_s
        self._watches: set[Watch] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, cancel: Callable[[], None], limit_s: float) -> Watch:
        w = Watch(self, cancel, limit_s)
        with self._lock:
            self._watches.add(w)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="call-watchdog", daemon=True)
                self._thread.start()
        return w

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self.tick_s):
            now = time.monotonic()
            with self._lock:
                due = [w for w in self._watches if w.deadline is not None and w.deadline <= now]
                for w in due:
                    w.expired, w.deadline = True, None
                    self._watches.discard(w)
            for w in due:
                try:
                    w.cancel()
                except Exception:  # a call that ended meanwhile: nothing left to cancel
                    log.debug("cancelling an expired call failed", exc_info=True)
