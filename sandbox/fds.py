"""File descriptors: the host keeps exactly the ones it was given, renumbered from 3.

Child side.  Everything else it inherited (the launcher's own pipes, anything a careless parent
left inheritable) is closed before the target is imported.
"""

from __future__ import annotations

import fcntl
import os


def _open_fds() -> list[int]:
    return sorted(int(name) for name in os.listdir("/proc/self/fd"))


def keep_only(wanted: list[int], extra: list[int]) -> list[int]:
    """Renumber ``wanted + extra`` to 3, 4, ...; close every other fd but 0-2.  The new numbers."""
    keep = list(wanted) + list(extra)
    base = max(_open_fds() + keep + [2]) + 1
    # First copy each to above everything, so no dup2 below overwrites one not yet moved.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for fd in keep]
    for fd in _open_fds():
        if fd > 2 and fd not in high:
            try:
                os.close(fd)
            except OSError:
                pass   # the fd of the listing itself, already closed
    final = []
    for i, fd in enumerate(high):
        target = 3 + i
        os.dup2(fd, target, inheritable=False)
        os.close(fd)
        final.append(target)
    return final
