"""Writing the kernel's control files (cgroup limits, /proc/PID/uid_map, ...).

Each takes exactly one write(2) of the whole value (the kernel parses per write, so a partial or
split write is a different request), and a failure names the file and the value.
"""

from __future__ import annotations

import os


def write_control(path: str | os.PathLike, value: str) -> None:
    """One ``write`` of ``value`` to ``path``; ``OSError`` whose filename is the write itself."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, f"write {str(path)!r} {value!r}") from None
