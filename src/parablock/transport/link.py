"""An emulated network link: bandwidth and latency that cost real wall time.

A transfer of n bytes takes about ``latency + 8 n / bandwidth``. The bytes are copied across in
chunks, each released no earlier than the bandwidth allows (pacing against a deadline, so sleep
jitter does not accumulate); the receiver gets a new buffer, never the sender's.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MAX_LATENCY_MS = 60_000.0  # a minute each way: longer is a typo, not a link


@dataclass(frozen=True)
class LinkSpec:
    mbps: float  # math.inf = unlimited
    latency_ms: float = 0.0
    chunk_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        if not self.mbps > 0:
            raise ValueError(f"link bandwidth must be > 0 Mbit/s or inf, got {self.mbps}")
        if self.latency_ms < 0 or self.chunk_bytes < 1:
            raise ValueError("link latency must be >= 0 and chunk size >= 1")

    def seconds(self, nbytes: int) -> float:
        """The ideal time to move ``nbytes`` over this link."""
        wire = 0.0 if math.isinf(self.mbps) else nbytes * 8 / (self.mbps * 1e6)
        return self.latency_ms / 1000 + wire


class Link:
    """One direction of one client's connection. Transfers on the same link are serialised.

    ``pace`` wraps any stream of chunks (in-process bytes or a gRPC stream), so emulation can sit
    on top of a real transport: each chunk is released no earlier than the bandwidth allows.
    """

    def __init__(self, spec: LinkSpec | None) -> None:
        self.spec = spec  # None: no emulation, the transport's own speed
        self._busy = threading.Lock()
        self.bytes_sent = 0

    def pace(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Yield ``chunks`` as the link would deliver them (one transfer at a time)."""
        with self._busy:
            spec = self.spec
            if spec is None:
                for c in chunks:
                    self.bytes_sent += len(c)
                    yield c
                return
            rate = math.inf if math.isinf(spec.mbps) else spec.mbps * 1e6 / 8  # bytes/s
            first_byte = time.perf_counter() + spec.latency_ms / 1000
            _sleep_until(first_byte)
            sent = 0
            for c in chunks:
                for pos in range(0, max(len(c), 1), spec.chunk_bytes):
                    end = min(pos + spec.chunk_bytes, len(c))
                    if not math.isinf(rate):
                        _sleep_until(first_byte + (sent + end) / rate)
                sent += len(c)
                self.bytes_sent += len(c)
                yield c

    def transmit(self, payload: bytes) -> bytes:
        """Move ``payload`` across; returns the receiver's copy once the last byte has arrived."""
        out = bytearray()  # the receiver's own buffer, never the sender's
        step = 1 << 20
        for chunk in self.pace(payload[i : i + step] for i in range(0, len(payload), step)):
            out += chunk
        return bytes(out)


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
