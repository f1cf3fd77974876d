"""SyscallSupervisor and SyscallReport: decoding, the watch contract, and a real listener.

The real-listener tests load a seccomp filter in a forked child of this test process (a
single-threaded child: loading a filter needs no threads elsewhere) and pass its listener fd
back over a socketpair, exactly as the launcher does.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading

import pytest

from sandbox import notify
from sandbox.notify import SyscallReport, SyscallSupervisor


def test_ioctl_numbers_match_the_kernel_headers():
    assert notify.SECCOMP_IOCTL_NOTIF_RECV == 0xC0502100
    assert notify.SECCOMP_IOCTL_NOTIF_SEND == 0xC0182101


def test_decode_a_notification():
    buf = struct.pack("=QIIiIQ6Q", 77, 4242, 0, 41, notify.AUDIT_ARCH_X86_64, 0x1234, 2, 1, 0, 0, 0, 0)
    nid, report = notify.decode(buf)
    assert nid == 77
    assert report == SyscallReport(pid=4242, nr=41, syscall="socket", args=(2, 1, 0, 0, 0, 0), arch="x86_64")


def test_unknown_syscall_number_gets_a_placeholder_name():
    assert notify.syscall_name(notify.AUDIT_ARCH_X86_64, 100000) == "syscall_100000"


def test_watch_contract(supervisor):
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="action='explode'"):
            supervisor.watch(r, print, "explode")
        with pytest.raises(ValueError, match="needs kill="):
            supervisor.watch(r, print, "kill")
        supervisor.unwatch(r)                 # unknown fd: nothing to do
        supervisor.watch(r, print)
        with pytest.raises(ValueError, match="already watched"):
            supervisor.watch(r, print)
        supervisor.unwatch(r)
    finally:
        os.close(r)
        os.close(w)


def test_watch_before_start_is_refused():
    sup = SyscallSupervisor()
    r, w = os.pipe()
    try:
        with pytest.raises(RuntimeError, match="before start"):
            sup.watch(r, print)
    finally:
        os.close(r)
        os.close(w)
    sup.stop()              # stop without start: nothing to do


def test_start_stop_leave_no_fds(open_fds):
    before = open_fds()
    sup = SyscallSupervisor()
    sup.start()
    sup.start()             # idempotent
    r, w = os.pipe()
    sup.watch(r, print)
    sup.stop()
    os.close(r)
    os.close(w)
    assert open_fds() == before


def _child_with_filter(sock: socket.socket, calls: str) -> int:
    """Fork a child that loads a NOTIFY-by-default filter allowing almost everything, sends the
    listener, closes it, then tries ``calls``; exits with the errno socket() got."""
    pid = os.fork()
    if pid:
        return pid
    try:
        import pyseccomp
        import prctl
        prctl.set_no_new_privs(1)
        f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        f.add_rule(pyseccomp.NOTIFY, "socket")
        f.load()
        fd = pyseccomp._libseccomp.seccomp_notify_fd(f._filter)
        socket.send_fds(sock, [b"l"], [fd])
        os.close(fd)
        os.read(sock.fileno(), 1)       # wait until the supervisor watches
        code = 0
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
        except OSError as exc:
            code = exc.errno
        os._exit(code)
    except BaseException:
        os._exit(99)


@pytest.mark.needs_seccomp_notify
@pytest.mark.parametrize("action", ["deny", "kill"])
def test_real_listener_is_reported_and_answered(action, open_fds):
    before = open_fds()
    supervisor = SyscallSupervisor()
    supervisor.start()
    a, b = socket.socketpair()
    pid = _child_with_filter(b, "socket")
    _, fds, _, _ = socket.recv_fds(a, 1, 1)
    listener = fds[0]
    reports: list[SyscallReport] = []
    seen = threading.Event()
    killed = []

    def on_report(r: SyscallReport) -> None:
        reports.append(r)
        seen.set()

    def kill() -> None:
        killed.append(True)
        os.kill(pid, 9)

    supervisor.watch(listener, on_report, action, kill=kill if action == "kill" else None)
    a.send(b"g")
    _, status = os.waitpid(pid, 0)
    assert reports and reports[0].syscall == "socket" and reports[0].pid == pid
    assert reports[0].args[0] == socket.AF_INET and reports[0].args[1] & 0xF == socket.SOCK_DGRAM
    if action == "deny":
        assert os.waitstatus_to_exitcode(status) == errno.EPERM
    else:
        assert killed and os.waitstatus_to_exitcode(status) == -9
    supervisor.unwatch(listener)
    os.close(listener)
    a.close()
    b.close()
    supervisor.stop()
    assert open_fds() == before


@pytest.mark.needs_seccomp_notify
def test_a_failing_reporter_still_answers(supervisor):
    a, b = socket.socketpair()
    pid = _child_with_filter(b, "socket")
    _, fds, _, _ = socket.recv_fds(a, 1, 1)

    def broken(_report):
        raise RuntimeError("reporter bug")

    supervisor.watch(fds[0], broken)
    a.send(b"g")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == errno.EPERM     # answered, not left hanging
    supervisor.unwatch(fds[0])
    os.close(fds[0])
    a.close()
    b.close()
