"""Emulated links: a transfer costs latency + 8n/bandwidth of real time, in paced chunks."""

from __future__ import annotations

import math
import time

import pytest

from parablock.transport.link import Link, LinkSpec


def test_transfer_takes_latency_plus_wire_time():
    spec = LinkSpec(mbps=8.0, latency_ms=30.0, chunk_bytes=8192)  # 1 MB/s
    payload = bytes(range(256)) * 400  # 102400 bytes -> 0.1024 s on the wire
    start = time.perf_counter()
    got = Link(spec).transmit(payload)
    took = time.perf_counter() - start
    assert got == payload and got is not payload
    assert spec.seconds(len(payload)) == pytest.approx(0.1324)
    assert 0.13 <= took < 0.5


def test_unlimited_bandwidth_costs_only_latency():
    spec = LinkSpec(mbps=math.inf, latency_ms=0.0)
    assert spec.seconds(10**9) == 0.0
    start = time.perf_counter()
    Link(spec).transmit(b"x" * 10_000_000)
    assert time.perf_counter() - start < 0.5


def test_bad_link_specs_are_refused():
    with pytest.raises(ValueError, match="bandwidth"):
        LinkSpec(mbps=0.0)
