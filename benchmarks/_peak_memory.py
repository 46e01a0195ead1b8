"""Peak resident memory of this process, for the benchmark scripts (Linux ``/proc``).

Writing 5 to ``/proc/self/clear_refs`` resets the high-water mark ``VmHWM``; reading
``/proc/self/status`` gives ``VmHWM`` and ``VmRSS`` in KiB.
"""

from __future__ import annotations


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current resident size; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field (e.g. ``"VmHWM"``) in KiB, or None if unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
