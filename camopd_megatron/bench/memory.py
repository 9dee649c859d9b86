"""Process memory readings for the benchmarks (Linux ``/proc``; peak = ``VmHWM``)."""
from __future__ import annotations


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``: now, ``VmHWM``: peak since start or reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS, so the next reading is the peak of what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
