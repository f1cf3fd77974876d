"""The few system calls Python 3.11's ``os`` lacks, through ctypes, each raising ``OSError``.

Only the launcher (inside the sandbox) uses these.  Each wrapper raises an ``OSError`` whose
``filename`` is the exact call, so a failed step can name it.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# x86_64 system-call numbers of calls glibc 2.36 wraps under other names or not at all.
# Other architectures are refused before we get here (see sandbox/seccomp.py).
_SYS_PIVOT_ROOT = 155
_SYS_MOUNT_SETATTR = 442

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECUREBITS = 28
PR_GET_SECUREBITS = 27


def _check(result: int, call: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), call)
    return result


def unshare(flags: int, names: str) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({names})")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None,
          call: str) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), call)


def umount2(target: str, flags: int, call: str) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), call)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT), new_root.encode(), put_old.encode()),
           f"pivot_root({new_root!r}, {put_old!r})")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(path: str, recursive: bool, attr_set: int, call: str) -> None:
    """Add mount attributes to ``path`` (and every mount below it when ``recursive``).

    mount_setattr(2) rather than ``mount(MS_REMOUNT|MS_BIND)``: it is recursive in one call, and
    inside a user namespace it leaves the locked flags of inherited mounts alone instead of
    failing with EPERM when a remount does not repeat them exactly.
    """
    attr = _MountAttr(attr_set, 0, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    _check(_libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(-100), path.encode(),
                         ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
           call)


def prctl(option: int, arg2: int, call: str) -> int:
    return _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0),
                              ctypes.c_ulong(0), ctypes.c_ulong(0)), call)


def set_fs_ids(uid: int, gid: int) -> None:
    """setfsgid/setfsuid, checked: they return the previous id and set no errno."""
    _libc.setfsgid(ctypes.c_uint(gid))
    _libc.setfsuid(ctypes.c_uint(uid))
    if _libc.setfsgid(ctypes.c_uint(-1 & 0xFFFFFFFF)) != gid or _libc.setfsuid(ctypes.c_uint(-1 & 0xFFFFFFFF)) != uid:
        raise OSError(1, "not permitted", f"setfsuid({uid})/setfsgid({gid})")


def sethostname(name: str) -> None:
    data = name.encode()
    _check(_libc.sethostname(data, ctypes.c_size_t(len(data))), f"sethostname({name!r})")
