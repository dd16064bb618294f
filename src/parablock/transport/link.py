"""An emulated network link: bandwidth and latency that cost real wall time.

A transfer of n bytes takes about ``latency + 8 n / bandwidth``. The bytes are copied across in
chunks, each released no earlier than the bandwidth allows (pacing against a deadline, so sleep
jitter does not accumulate); the receiver gets a new buffer, never the sender's.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


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
    """One direction of one client's connection. Transfers on the same link are serialised."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self._busy = threading.Lock()
        self.bytes_sent = 0

    def transmit(self, payload: bytes) -> bytes:
        """Move ``payload`` across; returns the receiver's copy once the last byte has arrived."""
        with self._busy:
            spec = self.spec
            start = time.perf_counter()
            out = bytearray(len(payload))
            view = memoryview(payload)
            rate = math.inf if math.isinf(spec.mbps) else spec.mbps * 1e6 / 8  # bytes/s
            first_byte = start + spec.latency_ms / 1000
            _sleep_until(first_byte)
            for pos in range(0, len(payload), spec.chunk_bytes):
                end = min(pos + spec.chunk_bytes, len(payload))
                if not math.isinf(rate):
                    _sleep_until(first_byte + end / rate)
                out[pos:end] = view[pos:end]
            self.bytes_sent += len(payload)
            return bytes(out)


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
