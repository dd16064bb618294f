"""Giving the C allocator's free memory back to the system (glibc; elsewhere nothing happens).

A training step allocates and frees hundreds of MB of activations. glibc keeps freed heap pages
resident for reuse, per arena, and a process's threads spread over several arenas: in the
simulator, 32 client threads share up to 8 arenas per core, and each arena keeps the largest
step it ever served. ``trim`` returns the free pages at once (``malloc_trim(0)``):

- the local backend trims after every training step (``StepTrim`` around each step, inside
  the compute gate), so the memory a step freed does not stay behind in its thread's arena;
- a networked client trims at every barrier, and with ``--return-memory`` (``return_memory``)
  also serves every allocation of 256 KiB or more from its own mapping, which goes back to
  the system the moment it is freed, and trims after loading the model and after each step.
"""

from __future__ import annotations

import ctypes
import logging
from contextlib import AbstractContextManager

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 256 * 1024


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def trim() -> None:
    """Return the C allocator's free pages to the system (glibc; elsewhere nothing to do)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def return_memory() -> bool:
    """Allocations of 256 KiB and more get their own mapping, unmapped when freed (glibc's
    ``M_MMAP_THRESHOLD``, which also stops glibc raising that threshold as large blocks are
    freed); False where the allocator is not glibc's."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    log.info("return memory: allocations >= %d KiB mapped apart", MMAP_THRESHOLD_BYTES // 1024)
    return ok


class StepTrim:
    """Held around each training step: the ``inner`` gate (if any) around the step, and a trim
    before leaving it, so what the step freed is gone before the next client's step."""

    def __init__(self, inner: AbstractContextManager | None = None) -> None:
        self.inner = inner

    def __enter__(self) -> StepTrim:
        if self.inner is not None:
            self.inner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            trim()
        finally:
            if self.inner is not None:
                self.inner.__exit__(*exc)
