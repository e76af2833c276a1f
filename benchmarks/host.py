"""What a benchmark records about the machine it ran on, beside its numbers."""

from pathlib import Path


def loadavg() -> str:
    """/proc/loadavg as read (1, 5 and 15 minutes, runnable/total tasks): a timing taken under load is not one."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"
