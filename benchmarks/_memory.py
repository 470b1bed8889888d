"""Peak resident memory of this process (Linux): the kernel's high-water mark VmHWM, reset to the
current RSS through /proc/self/clear_refs right before the part being measured."""

from __future__ import annotations

from pathlib import Path


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise KeyError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS; return that RSS in bytes (subtract it from the later VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_bytes("VmRSS")
