"""The peak memory of one training step, measured from the kernel's resident-set high-water mark."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Callable

from fwdgrad._procmem import reset_peak_rss, status_kib

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def peak_memory_probe() -> Callable[[], int | None] | None:
    """Start measuring the peak resident memory of what runs next; call the result to get the growth in
    bytes. Linux only (``None`` elsewhere, or when ``/proc/self/clear_refs`` is not writable).

    How: collect garbage and return freed heap to the OS (``malloc_trim``), read the resident set size,
    reset the kernel's high-water mark (write ``5`` to ``/proc/self/clear_refs``), run, then read the
    high-water mark ``VmHWM``. The difference is the extra resident memory the step needed at its peak:
    activations, tangents, gradients and optimizer temporaries, whoever allocated them (torch, BLAS).
    """
    if _LIBC is None:
        return None
    gc.collect()
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    before = status_kib("VmRSS")
    if not reset_peak_rss() or before is None:
        return None

    def stop() -> int | None:
        peak = status_kib("VmHWM")
        return None if peak is None else max(0, peak - before) * 1024

    return stop
