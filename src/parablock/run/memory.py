"""This process's peak resident memory, reset at the start of each run.

``compare`` runs its algorithms one after another in one process, and ``getrusage``'s peak covers
the whole process life, so every run after the first would report the largest peak so far. On
Linux the kernel's high-water mark (``VmHWM``) can be reset (``/proc/self/clear_refs``), after the
memory earlier runs freed is given back; where it cannot, the process-wide peak is reported.
"""

from __future__ import annotations

import gc
import resource
from pathlib import Path

from parablock.backends.heap import trim

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _release() -> None:
    """Give memory freed by earlier runs back to the system, so the new peak starts low: the C
    allocator keeps freed heap (about 2 GB after a fedavg_full run of SmolLM2) until trimmed."""
    gc.collect()
    trim()


def reset_peak() -> bool:
    """Start a new peak at the current resident size (after giving back what earlier runs
    freed); False where the platform cannot."""
    _release()
    try:
        _CLEAR.write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """The peak resident memory in MB (2**20 bytes) since the last ``reset_peak``, or since the
    process started where that is not possible."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
