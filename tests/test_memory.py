"""Peak memory is per run: compare runs several algorithms in one process."""

from __future__ import annotations

import pytest

from parablock.run.memory import peak_rss_mb, reset_peak


def test_peak_memory_starts_again_at_each_reset():
    if not reset_peak():
        pytest.skip("this platform cannot reset the peak resident size")
    base = peak_rss_mb()
    block = bytearray(200 << 20)
    block[::4096] = b"\x01" * len(block[::4096])  # touch every page: it becomes resident
    high = peak_rss_mb()
    assert high > base + 150
    del block  # a large allocation goes back to the system at once
    assert reset_peak()
    assert peak_rss_mb() < high - 150  # the earlier peak no longer counts
