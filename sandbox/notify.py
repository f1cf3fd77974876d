"""The supervisor side of seccomp user notification: report each refused call, answer EPERM.

One thread serves every listener fd.  It blocks in ``poll`` on the listeners and on a wake-up
pipe (no timeouts, no sleeps); ``watch``/``unwatch``/``stop`` write one byte to the pipe.

The listener fds arrive from the sandboxes over SCM_RIGHTS.  ``watch`` keeps its own duplicate,
closed by the thread when the fd is unwatched or its sandbox has ended (the kernel then reports
POLLHUP), so a number the caller closes and the kernel reuses can never be polled by mistake.

Notifications are read with the raw ``SECCOMP_IOCTL_NOTIF_*`` ioctls (stdlib ``fcntl``):
pyseccomp's ``receive_notify`` only works in the process that loaded the filter.  We never read
the target's memory (a path argument, say), which is where ``SECCOMP_IOCTL_NOTIF_ID_VALID``
would matter; a notification whose task is gone fails its answer with ENOENT, which we ignore.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import struct
import threading
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("drvbox.sandbox.notify")

# struct seccomp_notif { u64 id; u32 pid; u32 flags; struct seccomp_data { s32 nr; u32 arch;
# u64 instruction_pointer; u64 args[6]; } }  and  struct seccomp_notif_resp { u64 id; s64 val;
# s32 error; u32 flags; }   (include/uapi/linux/seccomp.h)
_NOTIF = struct.Struct("=QIIiIQ6Q")
_RESP = struct.Struct("=QqiI")
# _IOWR('!', 0, struct seccomp_notif) and _IOWR('!', 1, struct seccomp_notif_resp)
SECCOMP_IOCTL_NOTIF_RECV = 0xC0000000 | (_NOTIF.size << 16) | (ord("!") << 8) | 0
SECCOMP_IOCTL_NOTIF_SEND = 0xC0000000 | (_RESP.size << 16) | (ord("!") << 8) | 1

AUDIT_ARCH_X86_64 = 0xC000003E
_ARCH_NAMES = {AUDIT_ARCH_X86_64: "x86_64", 0x40000003: "i386"}

ACTIONS = ("deny", "kill")


@dataclass(frozen=True)
class SyscallReport:
    """A system call a sandboxed process tried outside its allowlist (refused with EPERM)."""
    pid: int                  # the caller, as seen from the supervisor's pid namespace
    nr: int
    syscall: str              # its name, or "syscall_<nr>" when libseccomp does not know it
    args: tuple[int, ...]
    arch: str


def syscall_name(arch: int, nr: int) -> str:
    try:
        import pyseccomp
        return pyseccomp.resolve_syscall(arch, nr).decode()
    except (ImportError, ValueError, OSError):
        return f"syscall_{nr}"


def decode(buf: bytes) -> tuple[int, SyscallReport]:
    """The notification's id and its report."""
    nid, pid, _flags, nr, arch, _ip, *args = _NOTIF.unpack(buf)
    report = SyscallReport(pid=pid, nr=nr, syscall=syscall_name(arch, nr), args=tuple(args),
                           arch=_ARCH_NAMES.get(arch, hex(arch)))
    return nid, report


class _Watched:
    __slots__ = ("fd", "on_report", "action", "kill")

    def __init__(self, fd: int, on_report, action: str, kill):
        self.fd, self.on_report, self.action, self.kill = fd, on_report, action, kill


class SyscallSupervisor:
    """Serves the seccomp listeners of every sandbox from one thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_caller: dict[int, _Watched] = {}   # caller's fd number -> our duplicate
        self._by_ours: dict[int, _Watched] = {}
        self._dropped: list[int] = []             # our duplicates to close on the thread
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._stopping = False
            self._thread = threading.Thread(target=self._serve, name="drvbox-seccomp-supervisor",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._stopping = True
        self._wake()
        thread.join()
        with self._lock:
            for w in self._by_ours.values():
                os.close(w.fd)
            for fd in self._dropped:
                os.close(fd)
            self._by_ours.clear()
            self._by_caller.clear()
            self._dropped.clear()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._thread = None

    # -- listeners ---------------------------------------------------------------------------
    def watch(self, notify_fd: int, on_report: Callable[[SyscallReport], None], action: str = "deny",
              kill: Callable[[], None] | None = None) -> None:
        """Serve ``notify_fd``: report each call to ``on_report``, answer EPERM, and for
        ``action="kill"`` call ``kill()`` first (the sandbox ends; the call never returns)."""
        if action not in ACTIONS:
            raise ValueError(f"SyscallSupervisor.watch: action={action!r}, expected one of {ACTIONS}")
        if action == "kill" and kill is None:
            raise ValueError("SyscallSupervisor.watch: action='kill' needs kill=")
        ours = fcntl.fcntl(notify_fd, fcntl.F_DUPFD_CLOEXEC, 3)
        with self._lock:
            if self._thread is None:
                os.close(ours)
                raise RuntimeError("SyscallSupervisor.watch before start()")
            if notify_fd in self._by_caller:
                os.close(ours)
                raise ValueError(f"SyscallSupervisor.watch: fd {notify_fd} is already watched")
            w = _Watched(ours, on_report, action, kill)
            self._by_caller[notify_fd] = w
            self._by_ours[ours] = w
        self._wake()

    def unwatch(self, notify_fd: int) -> None:
        """Stop serving ``notify_fd``.  A report already being handled completes; no new one
        starts.  The caller may close ``notify_fd`` at once (the thread polls its own duplicate)."""
        with self._lock:
            w = self._by_caller.pop(notify_fd, None)
            if w is not None and self._by_ours.pop(w.fd, None) is not None:
                self._dropped.append(w.fd)
        if w is not None:
            self._wake()

    # -- the thread --------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already awake and pending

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        registered: set[int] = set()
        while True:
            with self._lock:
                if self._stopping:
                    return
                for fd in self._dropped:
                    if fd in registered:
                        poller.unregister(fd)
                        registered.discard(fd)
                    os.close(fd)
                self._dropped.clear()
                for fd in self._by_ours.keys() - registered:
                    poller.register(fd, select.POLLIN)
                    registered.add(fd)
            for fd, events in poller.poll():
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                if events & select.POLLIN:
                    self._answer(fd)
                elif events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    # Every task using the filter has exited: nothing more will come.
                    self._retire(fd)

    def _retire(self, ours: int) -> None:
        with self._lock:
            w = self._by_ours.pop(ours, None)
            if w is None:
                return
            for caller, other in list(self._by_caller.items()):
                if other is w:
                    del self._by_caller[caller]
            self._dropped.append(ours)
        self._wake()

    def _answer(self, ours: int) -> None:
        with self._lock:
            w = self._by_ours.get(ours)
        if w is None:
            return
        buf = bytearray(_NOTIF.size)
        try:
            fcntl.ioctl(ours, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):  # the task died or was interrupted
                return
            log.error("seccomp listener %d: SECCOMP_IOCTL_NOTIF_RECV failed: %s", ours, exc)
            self._retire(ours)
            return
        nid, report = decode(bytes(buf))
        try:
            w.on_report(report)
        except Exception:  # a faulty reporter must not leave the call suspended
            log.exception("seccomp report handler failed for %s", report)
        if w.action == "kill":
            try:
                w.kill()
            except Exception:
                log.exception("seccomp kill handler failed for %s", report)
        try:
            fcntl.ioctl(ours, SECCOMP_IOCTL_NOTIF_SEND, bytearray(_RESP.pack(nid, 0, -errno.EPERM, 0)), True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the task is gone (killed, or signalled)
                log.error("seccomp listener %d: SECCOMP_IOCTL_NOTIF_SEND failed: %s", ours, exc)
