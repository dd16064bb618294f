"""This process's peak resident memory, reset at the start of each run.

``compare`` runs its algorithms one after another in one process, and ``getrusage``'s peak covers
the whole process life, so every run after the first would report the largest peak so far. On
Linux the kernel's high-water mark (``VmHWM``) can be reset (``/proc/self/clear_refs``); where it
cannot, the process-wide peak is reported and ``peak_is_per_run`` says so.
"""

from __future__ import annotations

import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")
_reset_ok = False


def reset_peak() -> bool:
    """Start a new peak at the current resident size; False where the platform cannot."""
    global _reset_ok
    try:
        _CLEAR.write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
        _reset_ok = True
    except OSError:
        _reset_ok = False
    return _reset_ok


def peak_is_per_run() -> bool:
    return _reset_ok


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
