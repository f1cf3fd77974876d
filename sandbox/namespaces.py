"""Namespaces: which ones a host gets, and the uid/gid maps of its user namespace.

Child side: the launcher calls ``unshare(flags)`` once, for all of them; created together, the
other namespaces are owned by the new user namespace.  The pid namespace applies to the
launcher's next child, which it forks at once: that child, the host, is pid 1 of a namespace
where nothing else lives, and when it dies the kernel kills whatever it might have left.

Parent side: ``write_maps`` writes ``/proc/PID/{setgroups,uid_map,gid_map}`` for the launcher,
from outside, because only there is the right authority: a root parent can map the host's id to
an *unprivileged* outer id (the launcher, from inside, could only map its own euid -- root);
an unprivileged parent maps it to its own euid, the only id it may map.
"""

from __future__ import annotations

import os

from sandbox import libc
from sandbox.kfiles import write_control

BASE_FLAGS = (libc.CLONE_NEWPID | libc.CLONE_NEWNET | libc.CLONE_NEWIPC | libc.CLONE_NEWUTS
              | libc.CLONE_NEWCGROUP | libc.CLONE_NEWNS)
NAMES = {libc.CLONE_NEWUSER: "CLONE_NEWUSER", libc.CLONE_NEWPID: "CLONE_NEWPID",
         libc.CLONE_NEWNET: "CLONE_NEWNET", libc.CLONE_NEWIPC: "CLONE_NEWIPC",
         libc.CLONE_NEWUTS: "CLONE_NEWUTS", libc.CLONE_NEWCGROUP: "CLONE_NEWCGROUP",
         libc.CLONE_NEWNS: "CLONE_NEWNS"}
# The names /proc/PID/ns uses, for the read-back.
PROC_NS = ("user", "pid", "net", "ipc", "uts", "cgroup", "mnt")


def flags(userns: bool) -> tuple[int, str]:
    value = BASE_FLAGS | (libc.CLONE_NEWUSER if userns else 0)
    return value, "|".join(name for bit, name in NAMES.items() if value & bit)


def use_userns(requested: bool | None) -> bool:
    """None: a user namespace when we are not root (without one an unprivileged parent could
    not create the others); True: always; False: never (only root can do without)."""
    return os.geteuid() != 0 if requested is None else requested


def outer_ids(uid: int, gid: int) -> tuple[int, int]:
    """The ids outside the user namespace that the host's ``uid``/``gid`` map to."""
    if os.geteuid() == 0:
        return uid, gid
    return os.geteuid(), os.getegid()


def write_maps(pid: int, uid: int, gid: int) -> None:
    """Map the host's uid/gid for launcher ``pid``.  Raises OSError naming the file and line."""
    outer_uid, outer_gid = outer_ids(uid, gid)
    # An unprivileged parent must deny setgroups(2) before it may write gid_map.  Root keeps it
    # allowed, so that the host can clear its supplementary groups itself (sandbox/identity.py).
    if os.geteuid() != 0:
        write_control(f"/proc/{pid}/setgroups", "deny")
    write_control(f"/proc/{pid}/uid_map", f"{uid} {outer_uid} 1")
    write_control(f"/proc/{pid}/gid_map", f"{gid} {outer_gid} 1")


def can_set_groups(userns: bool) -> bool:
    return not userns or os.geteuid() == 0


