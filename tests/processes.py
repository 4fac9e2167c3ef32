"""Process helpers for tests that stop launchers and check their workers are gone (Linux /proc)."""

from __future__ import annotations

import os


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while read
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a container's init may never reap it)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is `pid`."""
    found = [(int(e), _stat(int(e))) for e in os.listdir("/proc") if e.isdigit()]
    return [child for child, stat in found if stat and stat[1] == pid and stat[0] != "Z"]
