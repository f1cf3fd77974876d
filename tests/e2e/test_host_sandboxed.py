"""End-to-end: hosts.main confined by the real sandbox, with real drivers in it.

The test plays the Reflector over the socketpair and the memfd arena, as in
tests/unit/test_host_main.py, but the host is started by ``sandbox.spawn``: it imports before
seccomp and serves after, so every request here proves the host needs nothing the allowlist and
the mount view do not give it.  A hostile driver written at test time (not a file of this
repository) tries what a driver must not do; each attempt fails inside the driver with our
layer's errno, is reported by name where seccomp refused it, and the host serves on.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import socket
import struct
import textwrap
from pathlib import Path

import pytest

import reflector.drivers
from hosts.exits import HostExit
from hosts.wire import MAX_FRAME, KernelOp, Op, decode, encode
from sandbox.spec import SandboxSpec, spawn

pytestmark = [pytest.mark.needs_seccomp_notify, pytest.mark.usefixtures("require_namespaces")]

TEST_DRIVERS = Path(__file__).resolve().parent.parent / "drivers"
SAMPLES = Path(reflector.drivers.__file__).resolve().parent
ARENA_SIZE = 1 << 16
HANG_GUARD = 120.0  # only against a hang, never a measurement


class SandboxedHost:
    def __init__(self, modules, supervisor=None):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        arena_fd = os.memfd_create("e2e-arena", os.MFD_CLOEXEC)
        os.ftruncate(arena_fd, ARENA_SIZE)
        self.arena = mmap.mmap(arena_fd, ARENA_SIZE)
        spec = SandboxSpec(name="host e2e", readonly_paths=tuple(sorted({str(m) for m in modules})),
                           optional=frozenset({"cgroup"}))
        try:
            self.box = spawn(spec, "hosts.main:run", {"arena_size": ARENA_SIZE}, [theirs.fileno(), arena_fd])
        finally:
            theirs.close()
            os.close(arena_fd)
        self.reports = []
        self.supervisor = supervisor
        if supervisor is not None and self.box.notify_fd is not None:
            supervisor.watch(self.box.notify_fd, self.reports.append, "deny")
        self.sock.settimeout(HANG_GUARD)
        self.logs = []
        self.kernel = None
        self.next_id = 1
        ready = self.recv()
        # The host is the first process of its own pid namespace.
        assert ready.op == Op.READY and ready.fields == (1,)

    def recv(self):
        data = self.sock.recv(MAX_FRAME)
        assert data, "the host closed the channel"
        return decode(data)

    def call(self, op, driver_id, *fields, tail=b""):
        req_id, self.next_id = self.next_id, self.next_id + 1
        self.sock.send(encode(op, req_id, driver_id, *fields, tail=tail))
        while True:
            frame = self.recv()
            if frame.op == Op.LOG:
                self.logs.append(frame.tail.decode())
            elif frame.op == Op.KCALL:
                status, value, rtail, fds = self.kernel(frame)
                data = encode(Op.KREPLY, frame.req_id, frame.driver_id, status, value, tail=rtail)
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
                self.sock.sendmsg([data], ancillary)
            else:
                assert frame.op == Op.REPLY and frame.req_id == req_id, frame
                return frame.fields

    def load(self, driver_id, module, name="TST1:", registry=None):
        spec = {"name": name, "key": f"HKLM\\Drivers\\BuiltIn\\{name}", "module": str(module),
                "registry": registry or {}}
        return self.call(Op.LOAD, driver_id, tail=json.dumps(spec).encode())

    def ioctl(self, driver_id, open_id, code, inp=b"", out_len=64):
        self.arena[0:len(inp)] = inp
        status, n = self.call(Op.IOCTL, driver_id, open_id, code, 0, len(inp), 4096, out_len)
        return status, self.arena[4096:4096 + n] if status == 0 else b""

    def finish(self):
        try:
            self.sock.send(encode(Op.SHUTDOWN, 0, 0))
            return self.box.wait(timeout=HANG_GUARD)
        finally:
            if self.supervisor is not None and self.box.notify_fd is not None:
                self.supervisor.unwatch(self.box.notify_fd)
            self.box.close()
            self.sock.close()


@pytest.fixture
def start(supervisor):
    started = []

    def make(*modules):
        host = SandboxedHost(modules, supervisor)
        started.append(host)
        return host
    yield make
    for host in started:
        if host.box.poll() is None:
            host.box.kill()
            host.box.wait(timeout=HANG_GUARD)
        host.box.close()
        host.sock.close()


def test_confined_host_serves_the_stream_interface(start):
    echo = TEST_DRIVERS / "echo.py"
    host = start(echo)
    assert host.load(1, echo, registry={"Greeting": {"type": "sz", "data": "hi"}}) == (0, 0)
    status, h = host.call(Op.OPEN, 1, 3, 0)
    assert status == 0
    host.arena[100:105] = b"hello"
    assert host.call(Op.WRITE, 1, h, 100, 5) == (0, 5)
    assert host.call(Op.READ, 1, h, 2000, 64) == (0, 5)
    assert host.arena[2000:2005] == b"hello"
    assert host.ioctl(1, h, 0x80002008, b"greeting") == (0, b"'hi'")
    assert host.call(Op.CLOSE, 1, h) == (0, 0)
    status = host.finish()
    assert (status.code, status.signal) == (HostExit.OK, None)
    assert host.reports == [], f"the host needed a refused system call: {host.reports}"


def test_package_and_plain_drivers_in_one_confined_host(start):
    package, plain, echo = TEST_DRIVERS / "pkgdriver", TEST_DRIVERS / "plain.py", TEST_DRIVERS / "echo.py"
    host = start(package, plain, echo)
    assert host.load(1, package, "PKG1:") == (0, 0)
    assert host.load(2, plain, "PLN1:") == (0, 0)
    assert host.load(3, echo, "ECH1:") == (0, 0)
    handles = [host.call(Op.OPEN, i, 3, 0)[1] for i in (1, 2, 3)]
    assert host.call(Op.READ, 1, handles[0], 0, 64) == (0, 14)
    assert host.arena[0:14] == b"from a package"
    assert host.call(Op.READ, 2, handles[1], 0, 64) == (0, 2)
    assert host.ioctl(3, handles[2], 0x80002004) == (0, b"ECH1:")
    assert host.finish().code == HostExit.OK
    assert host.reports == []


HOSTILE = '''
"""A driver that turns hostile: each ioctl tries one escape and reports the errno it got."""
import errno, os, socket, subprocess, threading

from hosts import StreamDriver

def attempt(fn, inbuf):
    try:
        fn(inbuf)
    except OSError as exc:
        return exc.errno
    return 0

def write_next_to_me():
    with open(os.path.join(os.path.dirname(__file__), "planted.py"), "w") as f:
        f.write("x")

def write_tmp():
    with open("/tmp/scratch", "w") as f:
        f.write("x")

def start_thread():
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()

ATTEMPTS = {
    1: lambda _: socket.socket(socket.AF_INET, socket.SOCK_STREAM),
    2: lambda _: os.fork(),
    3: lambda _: os.execv("/bin/true", ["true"]),
    4: lambda _: write_next_to_me(),
    5: lambda _: write_tmp(),
    6: lambda _: start_thread(),
    7: lambda inbuf: os.kill(int.from_bytes(inbuf, "little"), 0),   # a pid outside, given by the test
}

class Driver(StreamDriver):
    def io_control(self, opened, code, inbuf, outbuf):
        outbuf[0] = attempt(ATTEMPTS[code], bytes(inbuf))
        return 1
'''


@pytest.mark.parametrize("code, expected, syscall", [
    (1, errno.EPERM, "socket"),          # no network: seccomp, reported
    (2, errno.EPERM, "clone"),           # no new processes
    (3, errno.EPERM, "execve"),          # no exec
    (4, errno.EROFS, None),              # the driver's own directory is read-only
    (5, 0, None),                        # its private /tmp is writable
    (6, 0, None),                        # threads are allowed
    (7, errno.ESRCH, None),              # processes outside its pid namespace are not there
])
def test_hostile_driver_from_outside_the_repository_is_contained(start, tmp_path, code, expected, syscall):
    drivers = tmp_path / "third-party"
    drivers.mkdir()
    (drivers / "hostile.py").write_text(textwrap.dedent(HOSTILE))
    host = start(drivers)
    assert host.load(1, drivers / "hostile.py") == (0, 0)
    _, h = host.call(Op.OPEN, 1, 0, 0)
    outside = os.getpid().to_bytes(4, "little")  # this test's own pid: alive, but not in there
    assert host.ioctl(1, h, code, outside, out_len=1) == (0, bytes([expected]))
    if syscall is not None:
        assert syscall in {r.syscall for r in host.reports}, host.reports
    else:
        assert host.reports == []
    # the host goes on serving after the attempt
    assert host.ioctl(1, h, 6, out_len=1) == (0, b"\x00")
    assert not (drivers / "planted.py").exists()
    assert host.finish().code == HostExit.OK


def test_kernel_calls_and_passed_fds_work_confined(start):
    kernel_user = TEST_DRIVERS / "kernel_user.py"
    host = start(kernel_user)
    windows = []

    def reflector(frame):
        kop, a0, a1, _ = frame.fields
        if kop == KernelOp.MAP_IO_SPACE:
            fd = os.memfd_create("window", os.MFD_CLOEXEC)
            os.ftruncate(fd, a1)
            os.pwrite(fd, (0xFEEDF00D).to_bytes(4, "little"), 0)
            windows.append(fd)
            return 0, 9, b'{"mode": "mapped"}', [fd]
        if kop == KernelOp.READ_PORT:
            return errno.EACCES, 0, b"port outside IoBase/IoLen", []
        return 0, 0, b"", []
    host.kernel = reflector
    try:
        assert host.load(1, kernel_user) == (0, 0)
        _, h = host.call(Op.OPEN, 1, 0, 0)
        ints = struct.pack("<III", 0x48000000, 4096, 0)
        assert host.ioctl(1, h, 0x80004008, ints) == (0, b"mapped,0xfeedf00d")
        assert host.ioctl(1, h, 0x8000400C, struct.pack("<II", 4, 0xABCD)) == (0, b"ok")
        assert os.pread(windows[0], 4, 4) == (0xABCD).to_bytes(4, "little")  # written through the mapping
        assert host.ioctl(1, h, 0x80004000, struct.pack("<I", 0x60)) == (0, b"error:13:PermissionError")
        assert host.finish().code == HostExit.OK
        assert host.reports == []
    finally:
        for fd in windows:
            os.close(fd)
