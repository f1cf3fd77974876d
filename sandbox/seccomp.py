"""The host's seccomp filter, built with pyseccomp from the table in ``sandbox/syscalls.py``.

Child side only: ``load`` runs inside the launcher as the very last step before the target is
called, so the filter needs to allow nothing that confinement itself does (mount, setuid, prctl).

* Architecture: only the native x86_64 ABI passes.  Any other (i386 through ``int 0x80``, x32)
  kills the process: libseccomp answers a foreign architecture with ``ACT_BADARCH``.
* Default action: ``NOTIFY``.  The call is suspended and handed to the Reflector's
  ``SyscallSupervisor`` over the listener fd this returns, which reports it and answers EPERM
  (or kills the host).  When the caller accepted ``seccomp_notify`` as optional and the kernel
  lacks user notification, the default is ``ERRNO(EPERM)`` with ``CTL_LOG``: the call is still
  denied (or, for ``on_violation="kill"``, the process killed: ``KILL_PROCESS``), and reported
  only to the kernel's audit log, not to the supervisor.
"""

from __future__ import annotations

import errno

import pyseccomp

from sandbox import syscalls


def load(allowed: list[str], notify: bool, on_violation: str = "deny",
         ioctl_ranges: list[tuple[int, int]] | None = None) -> int | None:
    """Load the filter on this (single-threaded) process; the listener fd, or None without notify.

    Without notify, ``on_violation`` is carried out by the kernel itself: "deny" answers EPERM,
    "kill" kills the process (both logged by the kernel).  Raises ``OSError`` whose filename
    names the call that failed.
    """
    if notify:
        default = pyseccomp.NOTIFY
    elif on_violation == "kill":
        default = pyseccomp.KILL_PROCESS
    else:
        default = pyseccomp.ERRNO(errno.EPERM)
    filt = pyseccomp.SyscallFilter(default)
    filt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    if not notify:
        filt.set_attr(pyseccomp.Attr.CTL_LOG, 1)
    for name in allowed:
        if name == "ioctl":  # added below, with its conditions
            continue
        try:
            filt.add_rule(pyseccomp.ALLOW, name)
        except (OSError, ValueError) as exc:
            raise OSError(getattr(exc, "errno", None) or errno.EINVAL, f"cannot allow {name!r}",
                          f"seccomp_rule_add(ALLOW, {name})") from exc
    # Threads, never processes: clone must carry CLONE_THREAD (a thread shares everything, a
    # process without exec would be a second, unsupervised host), and no CLONE_NEW* flag (a thread
    # in a namespace of its own does not share everything).
    filt.add_rule(pyseccomp.ALLOW, "clone",
                  pyseccomp.Arg(0, pyseccomp.MASKED_EQ, syscalls.CLONE_THREAD | syscalls.CLONE_NAMESPACES,
                                syscalls.CLONE_THREAD))
    # clone3 passes its flags in memory, which a filter cannot read; ENOSYS (not EPERM) makes
    # glibc fall back to clone, whose flags the rule above checks.  Not reported: it is routine.
    filt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    # ioctl is allowed except the two requests that push input into a terminal the host may have
    # inherited (stdio of `drvbox run`): TIOCSTI and TIOCLINUX.  libseccomp cannot say "not equal
    # under a mask" and takes one comparison per argument and rule, so the allowed requests are
    # written as ranges around the two.  A request with high bits set (the kernel truncates it to
    # 32 bits) passes the last range; that form of TIOCSTI is stopped by setsid() in the launcher
    # (no controlling terminal: TIOCSTI then needs CAP_SYS_ADMIN, which the host does not have).
    if ioctl_ranges is None:
        lo, hi = sorted((syscalls.TIOCSTI, syscalls.TIOCLINUX))
        filt.add_rule(pyseccomp.ALLOW, "ioctl", pyseccomp.Arg(1, pyseccomp.LT, lo))
        for request in range(lo + 1, hi):
            filt.add_rule(pyseccomp.ALLOW, "ioctl", pyseccomp.Arg(1, pyseccomp.EQ, request))
        filt.add_rule(pyseccomp.ALLOW, "ioctl", pyseccomp.Arg(1, pyseccomp.GT, hi))
    else:
        _allow_ioctls(filt, ioctl_ranges)
    filt.load()
    if not notify:
        return None
    fd = pyseccomp._libseccomp.seccomp_notify_fd(filt._filter)  # noqa: SLF001 (see NOTES.md)
    if fd < 0:
        raise OSError(-fd if fd < 0 else errno.EINVAL, "no listener fd", "seccomp_notify_fd()")
    return fd


def _allow_ioctls(filt, ranges: list[tuple[int, int]]) -> None:
    """ioctl only for the policy's request numbers (its DeviceNodes' codes) and BASE_IOCTLS.

    The kernel compares the request as 32 bits, so the rules mask the argument to 32 bits: a
    request with high bits set is the same request.  Everything else falls to the default action:
    reported to the supervisor and denied.  seccomp cannot tell which fd an ioctl is for (fds can
    be duplicated), so the list holds for every fd of the host.
    """
    wanted = [(code, code) for code in syscalls.BASE_IOCTLS] + [tuple(r) for r in ranges]
    for lo, hi in wanted:
        for value, mask in syscalls.masked_blocks(lo, hi):
            if mask == 0xFFFFFFFF and value in (syscalls.TIOCSTI, syscalls.TIOCLINUX):
                continue
            filt.add_rule(pyseccomp.ALLOW, "ioctl", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, mask, value))


def notify_available() -> bool:
    """Whether this kernel offers seccomp user notification (read from procfs, no syscall)."""
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as f:
            return "user_notif" in f.read().split()
    except OSError:
        return False
