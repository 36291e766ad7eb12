"""Resident-memory readings from Linux's ``/proc/self``, shared by the training loop and ``fwdgrad bench``.

``status_kib("VmRSS")`` is the resident set now, ``status_kib("VmHWM")`` its high-water mark, which
:func:`reset_peak_rss` sets back to the current RSS (Linux ≥ 4.0). Elsewhere both answer ``None``/``False``.
"""

from __future__ import annotations


def status_kib(key: str) -> int | None:
    """The value in KiB of ``key`` (``VmRSS``, ``VmHWM``, ...) in ``/proc/self/status``, or ``None``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS by writing ``5`` to ``/proc/self/clear_refs``; ``False`` if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
