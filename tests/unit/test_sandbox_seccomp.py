"""The host filter itself (sandbox/seccomp.py), loaded in a forked child of the test process.

Without user notification (the ``seccomp_notify``-optional fallback), so each child needs no
supervisor: a refused call returns EPERM.  The child reports errnos through its exit status or a
pipe; a signal ending it is the filter's kill.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import socket
import threading

import pytest

from sandbox import seccomp, syscalls


def _in_filtered_child(action, on_violation: str = "deny", ioctl_ranges=None) -> int:
    """Run ``action`` (returning an int) in a child under the host filter; its wait status."""
    pid = os.fork()
    if pid == 0:
        try:
            import prctl
            prctl.set_no_new_privs(1)
            seccomp.load(list(syscalls.ALLOWED), notify=False, on_violation=on_violation,
                         ioctl_ranges=ioctl_ranges)
            os._exit(action())
        except BaseException:
            os._exit(250)
    _, status = os.waitpid(pid, 0)
    return status


def _errno_of(fn) -> int:
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return 0


def _fork_inside() -> int:
    def fork():
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
    return _errno_of(fork)


def _thread_inside() -> int:
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    return 0


def _libc():
    from sandbox import libc
    return libc


def _machine_code(code: bytes) -> int:
    """Run raw x86-64 instructions (ending in ret) through ctypes; returns what rax holds."""
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    return ctypes.CFUNCTYPE(ctypes.c_long)(address)() & 0xFF


@pytest.mark.parametrize("name, action, expected", [
    ("socket is refused", lambda: _errno_of(lambda: socket.socket()), errno.EPERM),
    ("socketpair is refused", lambda: _errno_of(socket.socketpair), errno.EPERM),
    ("fork (clone without CLONE_THREAD) is refused", _fork_inside, errno.EPERM),
    ("exec is refused", lambda: _errno_of(lambda: os.execv("/bin/true", ["true"])), errno.EPERM),
    ("unshare is refused", lambda: _errno_of(lambda: _libc().unshare(0x00020000, "CLONE_NEWNS")), errno.EPERM),
    ("a thread starts (clone3 -> ENOSYS -> clone with CLONE_THREAD)", _thread_inside, 0),
    ("a pipe and a write still work", lambda: _errno_of(lambda: os.write(os.pipe()[1], b"x")), 0),
])
def test_host_filter(name, action, expected):
    status = _in_filtered_child(action)
    assert os.waitstatus_to_exitcode(status) == expected, name


def test_tiocsti_is_refused_even_though_ioctl_is_allowed():
    import fcntl
    import termios

    def tiocsti():
        return _errno_of(lambda: fcntl.ioctl(0, termios.TIOCSTI, b"x"))

    def fionread():   # an allowed ioctl on a pipe
        r, _ = os.pipe()
        return _errno_of(lambda: fcntl.ioctl(r, termios.FIONREAD, b"\0\0\0\0"))

    assert os.waitstatus_to_exitcode(_in_filtered_child(tiocsti)) == errno.EPERM
    assert os.waitstatus_to_exitcode(_in_filtered_child(fionread)) == 0


@pytest.mark.parametrize("abi, code", [
    # mov eax, 20 (getpid on i386); int 0x80; ret
    ("i386 int 0x80", b"\xb8\x14\x00\x00\x00\xcd\x80\xc3"),
    # mov eax, 0x40000027 (getpid through the x32 ABI); syscall; ret
    ("x32", b"\xb8\x27\x00\x00\x40\x0f\x05\xc3"),
])
def test_foreign_architecture_kills_the_process(abi, code):
    status = _in_filtered_child(lambda: _machine_code(code))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS, \
        f"{abi}: wait status {status:#x}, expected death by SIGSYS"


def test_native_machine_code_getpid_is_allowed():
    # The same path as above with the native ABI: proves the kill is about the ABI.
    # mov eax, 39 (getpid); syscall; ret
    status = _in_filtered_child(lambda: 0 if _machine_code(b"\xb8\x27\x00\x00\x00\x0f\x05\xc3") else 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_without_notify_kill_policy_kills_on_the_first_violation():
    status = _in_filtered_child(lambda: _errno_of(lambda: socket.socket()), on_violation="kill")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


# -- a policy's DeviceNodes ioctl list narrows ioctl to those requests -------------------------

def _ioctl_errno(request: int):
    import fcntl

    def action():
        fd = os.open("/dev/null", os.O_RDONLY)
        return _errno_of(lambda: fcntl.ioctl(fd, request, 0))
    return action


@pytest.mark.parametrize("request_, expected", [
    (0x00224000, errno.ENOTTY),     # listed: seccomp lets it through; /dev/null says it is no tty
    (0x00224007, errno.ENOTTY),     # the last of the listed range
    (0x00224008, errno.EPERM),      # one past the range: our filter refuses
    (0x00223FFF, errno.EPERM),      # one before it
    (0x5450, 0),                    # FIONCLEX, which the runtime needs, stays allowed
])
def test_listed_ioctls_pass_and_others_are_refused(request_, expected):
    status = _in_filtered_child(_ioctl_errno(request_), ioctl_ranges=[(0x00224000, 0x00224007)])
    assert os.waitstatus_to_exitcode(status) == expected


def test_without_a_list_ioctl_stays_open_but_for_tiocsti():
    status = _in_filtered_child(_ioctl_errno(0x00224008))
    assert os.waitstatus_to_exitcode(status) == errno.ENOTTY


@pytest.mark.parametrize("lo, hi", [(0, 0), (0, 0xFFFFFFFF), (0x5400, 0x54FF), (7, 9), (0x1001, 0x2FFF),
                                    (0xFFFFFFFE, 0xFFFFFFFF), (0x00220000, 0x00220FFF)])
def test_masked_blocks_cover_exactly_the_range(lo, hi):
    blocks = syscalls.masked_blocks(lo, hi)
    assert len(blocks) <= 64
    for probe in {lo, hi, lo - 1, hi + 1, (lo + hi) // 2, lo + 1, hi - 1}:
        if 0 <= probe <= 0xFFFFFFFF:
            inside = any(probe & mask == value for value, mask in blocks)
            assert inside == (lo <= probe <= hi), hex(probe)
