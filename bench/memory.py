"""Resident-memory probes for one process (Linux /proc).

torch's CPU tensors live in malloc'd memory, which tracemalloc cannot see, so the benchmark reads
the kernel's counters: VmRSS (now) and VmHWM (the high-water mark, which writing "5" to
/proc/self/clear_refs resets to the current RSS). Before each measured iteration the harness
collects garbage and returns freed heap pages to the kernel (malloc_trim), so memory one side
freed is not silently reused by the other without showing up as new resident pages.
"""

from __future__ import annotations

import ctypes
import gc
import resource

try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: trimming is skipped
    _libc = None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def release_free_memory() -> None:
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


def process_peak_mb() -> float:
    """Peak RSS since the process started (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
