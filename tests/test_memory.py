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


def test_a_step_trim_gives_freed_heap_back_and_holds_its_inner_gate(monkeypatch):
    from parablock.backends import heap

    calls = []
    monkeypatch.setattr(heap, "trim", lambda: calls.append("trim"))

    class Inner:
        def __enter__(self):
            calls.append("enter")

        def __exit__(self, *exc):
            calls.append("exit")

    with heap.StepTrim(Inner()):
        calls.append("step")
    with heap.StepTrim():
        calls.append("step")
    assert calls == ["enter", "step", "trim", "exit", "step", "trim"]


def test_return_memory_maps_large_allocations_apart_and_is_a_no_op_without_glibc(monkeypatch):
    from parablock.backends import heap

    calls = []

    class Libc:  # glibc's two calls, recorded (the test process's own heap is left alone)
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("malloc_trim", pad))

    monkeypatch.setattr(heap, "_libc", Libc)
    assert heap.return_memory() is True
    heap.trim()
    assert calls == [("mallopt", -3, 256 * 1024), ("malloc_trim", 0)]
    monkeypatch.setattr(heap, "_libc", lambda: None)
    heap.trim()
    assert heap.return_memory() is False
