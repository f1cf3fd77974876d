"""The host program as a real, unconfined subprocess, driven over a socketpair and a memfd arena:
this test plays the Reflector (including its answers to KCALLs), which is the other end of the
protocol, not a mock of the kernel."""

import errno
import json
import mmap
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hosts.exits import HostExit
from hosts.wire import MAX_FRAME, KernelOp, Op, decode, encode

DRIVERS = Path(__file__).resolve().parent.parent / "drivers"
ARENA_SIZE = 1 << 16
GUARD = 60  # seconds: only against a hang, never a measurement


def eventually(predicate):
    """Poll until ``predicate()`` holds; the guard only turns a hang into a failure."""
    deadline = time.monotonic() + GUARD
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


def _ints(*values):
    return b"".join(v.to_bytes(4, "little") for v in values)


class Host:
    """One host subprocess and the Reflector's end of its channel and arena."""

    def __init__(self, arena_size=ARENA_SIZE):
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        arena_fd = os.memfd_create("test-arena", os.MFD_CLOEXEC)
        os.ftruncate(arena_fd, max(arena_size, 1))
        self.arena = mmap.mmap(arena_fd, max(arena_size, 1))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hosts.main", "--channel-fd", str(child.fileno()),
             "--arena-fd", str(arena_fd), "--arena-size", str(arena_size)],
            pass_fds=[child.fileno(), arena_fd])
        child.close()
        os.close(arena_fd)
        self.sock.settimeout(GUARD)
        self.next_id = 1
        self.logs = []
        self.kcalls = []
        self.replies = {}
        self.kernel = None  # callable(frame, tail) -> (status, value, tail, fds)
        self.lanes = []     # our ends of the lanes handed to the host
        ready = self.recv()
        assert ready.op == Op.READY and ready.fields == (self.proc.pid,)

    def send(self, op, driver_id, *fields, tail=b"", req_id=None, fds=()):
        if req_id is None:
            req_id, self.next_id = self.next_id, self.next_id + 1
        data = encode(op, req_id, driver_id, *fields, tail=tail)
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        else:
            self.sock.send(data)
        return req_id

    def recv(self):
        data = self.sock.recv(MAX_FRAME)
        assert data, "host closed the channel"
        return decode(data)

    def pump(self):
        """Receive one frame; LOGs and KCALLs are handled here, REPLYs are stored."""
        frame = self.recv()
        if frame.op == Op.LOG:
            self.logs.append((frame.driver_id, frame.fields[0], frame.tail.decode()))
        elif frame.op == Op.KCALL:
            self.kcalls.append(frame)
            status, value, tail, fds = self.kernel(frame)
            self.send(Op.KREPLY, frame.driver_id, status, value, tail=tail, req_id=frame.req_id, fds=fds)
        else:
            assert frame.op == Op.REPLY, frame
            self.replies[frame.req_id] = frame
        return frame

    def reply(self, req_id):
        while req_id not in self.replies:
            self.pump()
        frame = self.replies.pop(req_id)
        return frame.fields

    def call(self, op, driver_id, *fields, tail=b""):
        return self.reply(self.send(op, driver_id, *fields, tail=tail))

    def load(self, driver_id, module, name="TST1:", registry=None, **extra):
        spec = {"name": name, "key": f"HKLM\\Drivers\\BuiltIn\\{name}", "module": str(DRIVERS / module),
                "registry": registry or {}, **extra}
        return self.call(Op.LOAD, driver_id, tail=json.dumps(spec).encode())

    def ioctl(self, driver_id, open_id, code, inp=b"", out_len=64, in_off=0, out_off=4096):
        self.arena[in_off:in_off + len(inp)] = inp
        status, n = self.call(Op.IOCTL, driver_id, open_id, code, in_off, len(inp), out_off, out_len)
        return status, self.arena[out_off:out_off + n] if status == 0 else b""

    def fd_count(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def wait(self):
        try:
            return self.proc.wait(GUARD)
        finally:
            self.close()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
        for lane in self.lanes:
            lane.close()


@pytest.fixture
def host():
    h = Host()
    yield h
    h.close()


def test_stream_round_trip_through_the_arena(host):
    assert host.load(1, "echo.py", registry={"Greeting": {"type": "sz", "data": "hi"}}) == (0, 0)
    status, h = host.call(Op.OPEN, 1, 3, 0)
    assert status == 0 and h > 0
    host.arena[100:105] = b"hello"
    assert host.call(Op.WRITE, 1, h, 100, 5) == (0, 5)
    assert host.call(Op.READ, 1, h, 2000, 64) == (0, 5)
    assert host.arena[2000:2005] == b"hello"
    assert host.ioctl(1, h, 0x80002000, b"ping") == (0, b"ping")
    assert host.ioctl(1, h, 0x80002004) == (0, b"TST1:")
    assert host.ioctl(1, h, 0x80002008, b"GREETING") == (0, b"'hi'")
    assert host.call(Op.SEEK, 1, h, 42, 0) == (0, 42)
    assert host.call(Op.SEEK, 1, h, -1, 0) == (errno.EINVAL, 0)
    assert host.call(Op.POWER, 1, 0) == (0, 0)
    assert host.call(Op.POWER, 1, 1) == (0, 0)
    assert host.ioctl(1, h, 0x8000200C) == (0, b"down,up")
    assert host.call(Op.PRE_CLOSE, 1, h) == (0, 0)
    assert host.call(Op.CLOSE, 1, h) == (0, 0)
    assert host.call(Op.READ, 1, h, 0, 1) == (errno.EBADF, 0)
    assert host.call(Op.UNLOAD, 1) == (0, 0)
    assert host.call(Op.OPEN, 1, 0, 0) == (errno.ENODEV, 0)
    assert host.logs == []
    host.send(Op.SHUTDOWN, 0)
    assert host.wait() == HostExit.OK


def test_requests_outside_the_arena_are_einval(host):
    assert host.load(1, "echo.py") == (0, 0)
    _, h = host.call(Op.OPEN, 1, 0, 0)
    assert host.call(Op.READ, 1, h, ARENA_SIZE - 4, 5) == (errno.EINVAL, 0)
    assert host.call(Op.WRITE, 1, h, 2**64 - 1, 1) == (errno.EINVAL, 0)
    assert host.call(Op.IOCTL, 1, h, 0x80002000, 0, ARENA_SIZE + 1, 0, 1) == (errno.EINVAL, 0)
    assert host.call(Op.IOCTL, 1, h, 0x80002000, 0, 1, ARENA_SIZE, 1) == (errno.EINVAL, 0)
    # input and output must not overlap (the driver could change what was checked)
    assert host.call(Op.IOCTL, 1, h, 0x80002000, 0, 8, 4, 8) == (errno.EINVAL, 0)
    assert host.call(Op.IOCTL, 1, h, 0x80002000, 8, 8, 0, 9) == (errno.EINVAL, 0)
    assert host.call(Op.IOCTL, 1, h, 0x80002000, 8, 8, 0, 8) == (0, 8)
    assert host.call(Op.IOCTL, 1, h, 0x80002000, 8, 0, 8, 8) == (0, 0)
    # exactly up to the end is fine
    assert host.call(Op.READ, 1, h, ARENA_SIZE - 4, 4) == (0, 0)


def test_unknown_driver_is_enodev(host):
    assert host.call(Op.OPEN, 7, 0, 0) == (errno.ENODEV, 0)
    assert host.call(Op.UNLOAD, 7) == (errno.ENODEV, 0)


def test_output_view_is_exactly_as_long_as_asked(host):
    assert host.load(1, "misbehave.py") == (0, 0)
    _, h = host.call(Op.OPEN, 1, 0, 0)
    host.arena[4096:4096 + 9] = b"\x00" * 8 + b"G"
    assert host.ioctl(1, h, 3, out_len=8) == (errno.EIO, b"")      # writes one byte too many
    assert host.call(Op.READ, 1, h, 4096, 8) == (errno.EIO, 0)       # writes out[len(out)]
    assert host.arena[4096 + 8] == ord("G")
    assert host.ioctl(1, h, 9, b"in") == (errno.EIO, b"")            # input is read-only
    assert host.arena[0:2] == b"in"
    assert host.ioctl(1, h, 4, out_len=8) == (errno.EIO, b"")        # count past the view
    messages = [m for _, _, m in host.logs]
    assert any("IndexError" in m for m in messages)
    assert any("TypeError" in m and "read-only" in m for m in messages)
    assert any("returned 9; expected an int from 0 to 8" in m for m in messages)
    assert all(driver == 1 for driver, _, _ in host.logs)


def test_driver_exceptions_never_end_the_host_or_its_workers(host):
    assert host.load(1, "misbehave.py", threads=2) == (0, 0)
    _, h = host.call(Op.OPEN, 1, 0, 0)
    for _ in range(6):  # more than the pool has threads: none of them was lost
        assert host.ioctl(1, h, 8) == (errno.EIO, b"")   # SystemExit
        assert host.ioctl(1, h, 14) == (errno.EIO, b"")  # KeyboardInterrupt
    assert host.ioctl(1, h, 1) == (errno.ENOSPC, b"")
    assert host.ioctl(1, h, 16, out_len=3) == (0, b"\x55\x55\x55")
    assert host.proc.poll() is None


def test_slow_driver_does_not_hold_up_another(host):
    assert host.load(1, "slow.py", name="SLW1:") == (0, 0)
    assert host.load(2, "echo.py", name="ECH1:") == (0, 0)
    _, slow = host.call(Op.OPEN, 1, 0, 0)
    _, fast = host.call(Op.OPEN, 2, 0, 0)
    blocked = host.send(Op.READ, 1, slow, 8192, 16)
    # Wait until the slow read is really inside the driver (asked through another worker).
    eventually(lambda: host.ioctl(1, slow, 0x80003004, out_len=1, out_off=100) == (0, b"\x01"))
    for i in range(5):
        assert host.ioctl(2, fast, 0x80002000, b"fast%d" % i) == (0, b"fast%d" % i)
    assert blocked not in host.replies  # still held by the slow driver
    assert host.ioctl(1, slow, 0x80003000) == (0, b"")  # release it
    assert host.reply(blocked) == (0, 4)
    assert host.arena[8192:8196] == b"slow"


def test_load_failures_are_replied_and_logged(host):
    assert host.load(1, "init_fails.py") == (errno.ENXIO, 0)
    assert host.load(2, "no_driver.py") == (errno.ENOEXEC, 0)
    assert host.load(3, "missing.py") == (errno.ENOENT, 0)
    assert host.call(Op.LOAD, 4, tail=b"{not json") == (errno.EINVAL, 0)
    assert host.call(Op.LOAD, 5, tail=json.dumps({"name": "X:", "module": "relative.py"}).encode()) == (errno.EINVAL, 0)
    bad_registry = {"A": {"type": "dword", "data": "x"}}
    assert host.load(6, "echo.py", registry=bad_registry) == (errno.EINVAL, 0)
    assert host.load(7, "echo.py", threads=0) == (errno.EINVAL, 0)
    messages = [m for _, _, m in host.logs]
    assert any("init failed with ENXIO" in m for m in messages)
    assert any("defines no class Driver" in m for m in messages)
    assert any("absolute module path" in m for m in messages)
    assert any("registry value 'A'" in m for m in messages)
    # a failed LOAD leaves the id free, and the host serves on
    assert host.call(Op.OPEN, 1, 0, 0) == (errno.ENODEV, 0)
    assert host.load(1, "echo.py") == (0, 0)
    assert host.load(1, "echo.py") == (errno.EEXIST, 0)


def test_eof_ends_the_host_with_zero(host):
    assert host.load(1, "echo.py") == (0, 0)
    host.sock.shutdown(socket.SHUT_RDWR)
    assert host.wait() == HostExit.OK


def test_shutdown_unloads_and_exits_zero(host):
    assert host.load(1, "echo.py") == (0, 0)
    assert host.load(2, "plain.py") == (0, 0)
    host.send(Op.SHUTDOWN, 0)
    assert host.wait() == HostExit.OK


def test_shutdown_without_drivers(host):
    host.send(Op.SHUTDOWN, 0)
    assert host.wait() == HostExit.OK


@pytest.mark.parametrize("data", [
    b"garbage",
    b"",  # empty SEQPACKET message: indistinguishable from EOF, must still end the host (with 0)
    encode(Op.OPEN, 1, 1, 0, 0)[:-1],
    encode(Op.OPEN, 1, 1, 0, 0) + b"x",
    bytes([9]) + encode(Op.OPEN, 1, 1, 0, 0)[1:],
    encode(Op.REPLY, 1, 1, 0, 0),  # an op only hosts send
    encode(Op.KREPLY, 99, 1, 0, 0),  # answers no KCALL
])
def test_malformed_frames_end_the_host_with_its_status(host, data):
    host.sock.send(data)
    expected = HostExit.OK if data == b"" else HostExit.BAD_FRAME
    assert host.wait() == expected


def test_malformed_frame_is_explained_in_a_log_line():
    h = Host()
    try:
        h.sock.send(b"\x01\x03\x00\x00")
        frame = h.recv()
        assert frame.op == Op.LOG and "protocol violation" in frame.tail.decode()
        assert "shorter than the 16-byte header" in frame.tail.decode()
        assert h.wait() == HostExit.BAD_FRAME
    finally:
        h.close()


def test_fds_on_a_request_frame_are_refused(host):
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        host.send(Op.OPEN, 1, 0, 0, fds=[fd])
    finally:
        os.close(fd)
    assert host.wait() == HostExit.UNEXPECTED_FDS


def test_oversized_frame_is_refused(host):
    host.sock.send(b"\x01" * (MAX_FRAME + 1))
    assert host.wait() == HostExit.BAD_FRAME


def test_bad_arguments_exit_with_their_status():
    proc = subprocess.run([sys.executable, "-m", "hosts.main", "--channel-fd", "0", "--arena-fd", "1",
                           "--arena-size", "-1"], capture_output=True, timeout=GUARD)
    assert proc.returncode == HostExit.BAD_ARGS
    assert b"arena_size -1" in proc.stderr


# -- ctx.kernel through the host: the test answers the KCALLs as the Reflector would ------------------

class FakeReflector:
    """Answers KCALLs: ports, mapped/mediated regions, interrupts, DMA, device nodes, log."""

    def __init__(self, mode="mapped"):
        self.mode = mode
        self.registers = {}
        self.ports = {0x3F8: 0x41}
        self.opened_fds = []

    def __call__(self, frame):
        kop, a0, a1, a2 = frame.fields
        kop = KernelOp(kop)
        if kop == KernelOp.READ_PORT:
            if a0 not in self.ports:
                return errno.EACCES, 0, b"port %#x is not in IoBase/IoLen" % a0, []
            return 0, self.ports[a0], b"", []
        if kop == KernelOp.WRITE_PORT:
            self.ports[a0] = a1
            return 0, 0, b"", []
        if kop == KernelOp.MAP_IO_SPACE:
            if self.mode == "mediated":
                return 0, 7, b'{"mode": "mediated"}', []
            fd = os.memfd_create("window")
            os.ftruncate(fd, a1)
            os.pwrite(fd, (0xDEADBEEF).to_bytes(4, "little"), 4)
            self.opened_fds.append(fd)
            return 0, 7, b'{"mode": "mapped"}', [fd]
        if kop == KernelOp.READ_REGISTER:
            return 0, self.registers.get(a1, 0x1234), b"", []
        if kop == KernelOp.WRITE_REGISTER:
            self.registers[a1] = a2 & 0xFFFFFFFF
            return 0, 0, b"", []
        if kop == KernelOp.INTERRUPT:
            fd = os.eventfd(1)  # already signalled
            self.opened_fds.append(fd)
            return 0, 3, b"", [fd]
        if kop == KernelOp.ALLOC_DMA:
            fd = os.memfd_create("dma")
            os.ftruncate(fd, a0)
            self.opened_fds.append(fd)
            self.dma_fd = fd
            return 0, 5, b'{"phys": 268435456}', [fd]
        if kop == KernelOp.OPEN_DEVICE:
            path = frame.tail.decode()
            if path != "/dev/null":
                return errno.EACCES, 0, b"not in DeviceNodes", []
            fd = os.open(path, a0 | os.O_CLOEXEC)
            self.opened_fds.append(fd)
            return 0, 0, b"", [fd]
        if kop in (KernelOp.UNMAP_IO_SPACE, KernelOp.INTERRUPT_DONE, KernelOp.INTERRUPT_CLOSE,
                   KernelOp.FREE_DMA, KernelOp.LOG):
            return 0, 0, b"", []
        return errno.ENOSYS, 0, b"", []

    def close(self):
        for fd in self.opened_fds:
            os.close(fd)


@pytest.fixture
def kernel_host(host):
    reflector = FakeReflector()
    host.kernel = reflector
    assert host.load(1, "kernel_user.py") == (0, 0)
    _, h = host.call(Op.OPEN, 1, 0, 0)
    yield host, h, reflector
    reflector.close()


def test_kernel_ports_allowed_and_denied(kernel_host):
    host, h, _ = kernel_host
    assert host.ioctl(1, h, 0x80004000, _ints(0x3F8)) == (0, b"65")
    assert host.ioctl(1, h, 0x80004000, _ints(0x60)) == (0, b"error:13:PermissionError")
    assert host.ioctl(1, h, 0x80004004, _ints(0x60, 0x99)) == (0, b"ok")
    assert host.ioctl(1, h, 0x80004000, _ints(0x60)) == (0, b"153")
    port_calls = [f for f in host.kcalls if f.fields[0] == KernelOp.READ_PORT]
    assert port_calls[0].driver_id == 1 and port_calls[0].fields[1:3] == (0x3F8, 1)


def test_kernel_mapped_region(kernel_host):
    host, h, _ = kernel_host
    assert host.ioctl(1, h, 0x80004008, _ints(0x48000000, 4096, 4)) == (0, b"mapped,0xdeadbeef")
    assert host.ioctl(1, h, 0x8000400C, _ints(8, 0xCAFE)) == (0, b"ok")
    assert host.ioctl(1, h, 0x80004010) == (0, b"4096")
    assert host.ioctl(1, h, 0x80004028) == (0, b"error:None:IndexError")
    assert host.ioctl(1, h, 0x80004014) == (0, b"ok")
    kops = [KernelOp(f.fields[0]) for f in host.kcalls]
    assert kops == [KernelOp.MAP_IO_SPACE, KernelOp.UNMAP_IO_SPACE]  # register access never left the host


def test_kernel_mediated_region(kernel_host):
    host, h, reflector = kernel_host
    reflector.mode = "mediated"
    assert host.ioctl(1, h, 0x80004008, _ints(0x48000000, 4096, 4)) == (0, b"mediated,0x1234")
    assert host.ioctl(1, h, 0x8000400C, _ints(8, 0xCAFE)) == (0, b"ok")
    assert reflector.registers == {8: 0xCAFE}
    write = [f for f in host.kcalls if f.fields[0] == KernelOp.WRITE_REGISTER][0]
    assert write.fields[1:] == (7, 8, (4 << 32) | 0xCAFE)
    assert host.ioctl(1, h, 0x80004010) == (0, b"error:13:PermissionError")  # no view when mediated
    assert host.ioctl(1, h, 0x80004028) == (0, b"error:None:IndexError")     # checked before any KCALL
    assert [KernelOp(f.fields[0]) for f in host.kcalls].count(KernelOp.READ_REGISTER) == 1


def test_kernel_interrupt_dma_device_and_log_own_their_fds(kernel_host):
    host, h, reflector = kernel_host
    before = host.fd_count()
    assert host.ioctl(1, h, 0x80004018, _ints(5)) == (0, b"fired=True")
    assert host.ioctl(1, h, 0x8000401C, _ints(8192)) == (0, b"0x10000000")
    assert os.pread(reflector.dma_fd, 1, 0) == b"\x5a"  # the driver wrote through the shared view
    assert host.ioctl(1, h, 0x80004020, b"/dev/null") == (0, b"fd")
    assert host.ioctl(1, h, 0x80004020, b"/etc/shadow") == (0, b"error:13:PermissionError")
    assert host.ioctl(1, h, 0x80004024, b"hello from the driver") == (0, b"ok")
    assert host.fd_count() == before  # every fd passed in was closed again
    kops = [KernelOp(f.fields[0]) for f in host.kcalls]
    assert kops == [KernelOp.INTERRUPT, KernelOp.INTERRUPT_DONE, KernelOp.INTERRUPT_CLOSE,
                    KernelOp.ALLOC_DMA, KernelOp.FREE_DMA, KernelOp.OPEN_DEVICE, KernelOp.OPEN_DEVICE,
                    KernelOp.LOG]
    log_call = host.kcalls[-1]
    assert log_call.fields[1] == 20 and log_call.tail == b"hello from the driver"


def test_kernel_reply_with_unexpected_extra_fds_closes_them(kernel_host):
    host, h, reflector = kernel_host
    extra = os.open("/dev/null", os.O_RDONLY)

    def port_with_fd(frame):
        return 0, 1, b"", [extra]
    host.kernel = port_with_fd
    before = host.fd_count()
    try:
        assert host.ioctl(1, h, 0x80004000, _ints(0x3F8)) == (0, b"1")
    finally:
        os.close(extra)
    assert host.fd_count() == before


@pytest.mark.parametrize("answer, expected", [
    ((0, 7, b'{"mode": "mapped"}', []), b"error:71:OSError"),        # mapped, but no fd passed
    ((0, 7, b"not json", []), b"error:71:OSError"),
    ((0, 7, b'["mapped"]', []), b"error:71:OSError"),
    ((0, 7, b'{"mode": "teleport"}', []), b"error:71:OSError"),
    ((0, 7, b'{"mode": "mapped", "offset": -1}', []), b"error:71:OSError"),
    ((errno.ENODEV, 0, b"this platform has no hardware", []), b"error:19:OSError"),
    ((errno.EPERM, 0, b"", []), b"error:1:PermissionError"),
])
def test_kernel_malformed_or_failed_answers_raise_in_the_driver(kernel_host, answer, expected):
    host, h, _ = kernel_host
    host.kernel = lambda frame: answer
    assert host.ioctl(1, h, 0x80004008, _ints(0x48000000, 4096, 0)) == (0, expected)
    assert host.proc.poll() is None


def test_kernel_failed_answer_closes_the_fds_it_carried(kernel_host):
    host, h, _ = kernel_host
    extra = os.open("/dev/null", os.O_RDONLY)
    host.kernel = lambda frame: (errno.EACCES, 0, b"denied", [extra])
    before = host.fd_count()
    try:
        assert host.ioctl(1, h, 0x80004018, _ints(5)) == (0, b"error:13:PermissionError")
    finally:
        os.close(extra)
    assert host.fd_count() == before


def test_kernel_calls_from_two_drivers_are_routed_to_each(host):
    calls = []

    def answer(frame):
        calls.append(frame.driver_id)
        return 0, 100 + frame.driver_id, b"", []
    host.kernel = answer
    assert host.load(1, "kernel_user.py", name="K1:") == (0, 0)
    assert host.load(2, "kernel_user.py", name="K2:") == (0, 0)
    _, h1 = host.call(Op.OPEN, 1, 0, 0)
    _, h2 = host.call(Op.OPEN, 2, 0, 0)
    assert host.ioctl(1, h1, 0x80004000, _ints(1)) == (0, b"101")
    assert host.ioctl(2, h2, 0x80004000, _ints(1)) == (0, b"102")
    assert calls == [1, 2]


def test_threads_are_a_fixed_pool_per_driver_not_one_per_request(host):
    def threads():
        return len(os.listdir(f"/proc/{host.proc.pid}/task"))
    eventually(lambda: threads() == 2)  # the main thread and the crew's first, before any LOAD
    assert host.load(1, "echo.py", threads=3) == (0, 0)
    assert host.load(2, "echo.py", threads=2) == (0, 0)
    assert threads() == 2 + 3 + 2
    _, h = host.call(Op.OPEN, 1, 0, 0)
    pending = [host.send(Op.IOCTL, 1, h, 0x80002000, 0, 4, 4096, 4) for _ in range(50)]
    for req_id in pending:
        assert host.reply(req_id) == (0, 4)
    assert threads() == 2 + 3 + 2
    assert host.call(Op.UNLOAD, 2) == (0, 0)
    eventually(lambda: threads() == 2 + 3)  # the unloaded driver's threads end after its UNLOAD


# -- the crew: whichever thread receives, every frame reaches the right driver -------------------

def test_a_driver_with_one_thread_gets_its_kernel_replies(host):
    """Its quota of one runs the request on the thread that received it, which then waits in a
    KCALL: the crew's spare thread, never in driver code, must be the one to receive the KREPLY."""
    host.kernel = lambda frame: (0, 77, b"", [])
    assert host.load(1, "kernel_user.py", threads=1) == (0, 0)
    _, h = host.call(Op.OPEN, 1, 0, 0)
    for _ in range(5):
        assert host.ioctl(1, h, 0x80004000, _ints(1)) == (0, b"77")


def test_requests_alternate_between_drivers_of_one_and_many_threads(host):
    assert host.load(1, "echo.py", name="ECH1:", threads=1) == (0, 0)
    assert host.load(2, "echo.py", name="ECH2:", threads=3) == (0, 0)
    _, h1 = host.call(Op.OPEN, 1, 0, 0)
    _, h2 = host.call(Op.OPEN, 2, 0, 0)
    for i in range(20):
        driver, handle = (1, h1) if i % 3 else (2, h2)
        assert host.ioctl(driver, handle, 0x80002000, b"n%02d" % i) == (0, b"n%02d" % i)
    # Many in flight at once, for both, more than either pool has threads.
    pending = [(host.send(Op.IOCTL, d, h, 0x80002000, 0, 4, 4096, 4)) for d, h in [(1, h1), (2, h2)] * 10]
    for req_id in pending:
        assert host.reply(req_id) == (0, 4)


def test_unloaded_driver_leaves_the_others_served(host):
    """Whether or not a thread of the unloaded driver was the one receiving, the others go on."""
    assert host.load(1, "echo.py", name="ECH1:", threads=2) == (0, 0)
    assert host.load(2, "echo.py", name="ECH2:", threads=2) == (0, 0)
    _, h1 = host.call(Op.OPEN, 1, 0, 0)
    _, h2 = host.call(Op.OPEN, 2, 0, 0)
    assert host.ioctl(2, h2, 0x80002000, b"two") == (0, b"two")  # a thread of 2 may lead now
    assert host.call(Op.UNLOAD, 2) == (0, 0)
    assert host.ioctl(2, h2, 0x80002000, b"gone") == (errno.ENODEV, b"")
    assert host.ioctl(1, h1, 0x80002000, b"one") == (0, b"one")
    assert host.call(Op.UNLOAD, 1) == (0, 0)
    eventually(lambda: len(os.listdir(f"/proc/{host.proc.pid}/task")) == 2)  # main and the first crew thread
    assert host.ioctl(1, h1, 0x80002000, b"x") == (errno.ENODEV, b"")


@pytest.mark.parametrize("threads", [1, 4])
def test_shutdown_right_after_requests_exits_zero(host, threads):
    """SHUTDOWN is received by whichever thread leads, possibly one of the driver being unloaded."""
    assert host.load(1, "echo.py", threads=threads) == (0, 0)
    _, h = host.call(Op.OPEN, 1, 0, 0)
    assert host.ioctl(1, h, 0x80002000, b"abc") == (0, b"abc")
    host.send(Op.SHUTDOWN, 0)
    assert host.wait() == HostExit.OK


def test_malformed_frame_ends_the_host_whichever_thread_receives(host):
    assert host.load(1, "echo.py", threads=2) == (0, 0)
    _, h = host.call(Op.OPEN, 1, 0, 0)
    assert host.ioctl(1, h, 0x80002000, b"abc") == (0, b"abc")
    host.sock.send(b"\x01" * 5)
    assert host.wait() == HostExit.BAD_FRAME


def test_eof_ends_the_host_whichever_thread_receives(host):
    assert host.load(1, "echo.py", threads=2) == (0, 0)
    _, h = host.call(Op.OPEN, 1, 0, 0)
    assert host.ioctl(1, h, 0x80002000, b"abc") == (0, b"abc")
    host.sock.shutdown(socket.SHUT_WR)
    assert host.wait() == HostExit.OK


# -- lanes: sockets of their own for driver requests, answered where they came from -------------

def _lane(host):
    """Hand the host one lane; returns our end (the host's reply to LANE is the status)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        status = host.reply(host.send(Op.LANE, 0, fds=[theirs.fileno()]))
    finally:
        theirs.close()
    ours.settimeout(GUARD)
    host.lanes.append(ours)
    return ours, status


def _on_lane(lane, op, driver_id, *fields, req_id=7):
    lane.send(encode(op, req_id, driver_id, *fields))
    frame = decode(lane.recv(MAX_FRAME))
    assert frame.op == Op.REPLY and frame.req_id == req_id and frame.driver_id == driver_id
    return frame.fields


def test_requests_on_a_lane_are_answered_on_that_lane(host):
    assert host.load(1, "echo.py") == (0, 0)
    lane, status = _lane(host)
    assert status == (0, 0)
    status, h = _on_lane(lane, Op.OPEN, 1, 0, 0)
    assert status == 0
    host.arena[0:5] = b"lanes"
    assert _on_lane(lane, Op.IOCTL, 1, h, 0x80002000, 0, 5, 4096, 16) == (0, 5)
    assert host.arena[4096:4101] == b"lanes"
    # The channel still serves too, and a closed lane is forgotten without harm.
    lane.close()
    assert host.ioctl(1, h, 0x80002000, b"chan") == (0, b"chan")
    host.send(Op.SHUTDOWN, 0)
    assert host.wait() == HostExit.OK


def test_slow_driver_on_one_lane_does_not_hold_up_another_lane(host):
    assert host.load(1, "slow.py", name="SLW1:") == (0, 0)
    assert host.load(2, "echo.py", name="ECH1:") == (0, 0)
    _, slow = host.call(Op.OPEN, 1, 0, 0)
    _, fast = host.call(Op.OPEN, 2, 0, 0)
    (first, _), (second, _) = _lane(host), _lane(host)
    first.send(encode(Op.READ, 1, 1, slow, 8192, 16))
    eventually(lambda: host.ioctl(1, slow, 0x80003004, out_len=1, out_off=100) == (0, b"\x01"))
    for i in range(3):
        host.arena[0:1] = b"%d" % i
        assert _on_lane(second, Op.IOCTL, 2, fast, 0x80002000, 0, 1, 4096, 16, req_id=10 + i) == (0, 1)
    assert host.ioctl(1, slow, 0x80003000) == (0, b"")      # release the slow read
    assert decode(first.recv(MAX_FRAME)).fields == (0, 4)


@pytest.mark.parametrize("op", [Op.LOAD, Op.UNLOAD, Op.SHUTDOWN, Op.KREPLY])
def test_what_belongs_on_the_channel_ends_the_host_when_it_comes_on_a_lane(host, op):
    lane, _ = _lane(host)
    lane.send(encode(op, 1, 1, *([0, 0] if op == Op.KREPLY else [])))
    assert host.wait() == HostExit.BAD_FRAME


def test_a_lane_needs_exactly_one_fd_and_there_are_at_most_max_lanes(host):
    from hosts.main import MAX_LANES
    kept = [_lane(host) for _ in range(MAX_LANES)]
    assert all(status == (0, 0) for _, status in kept)
    _, status = _lane(host)
    assert status == (errno.EMFILE, 0)
    host.send(Op.LANE, 0)                 # no fd at all
    assert host.wait() == HostExit.UNEXPECTED_FDS


def test_a_driver_at_its_quota_waits_and_the_others_are_served(host):
    """Quota 1, its one request held in the driver: a second request for it waits in its
    backlog, while another driver's requests go on, and no thread is started for it."""
    assert host.load(1, "slow.py", name="SLW1:", threads=1) == (0, 0)
    assert host.load(2, "echo.py", name="ECH1:") == (0, 0)
    _, slow = host.call(Op.OPEN, 1, 0, 0)
    _, fast = host.call(Op.OPEN, 2, 0, 0)
    held = host.send(Op.READ, 1, slow, 8192, 16)
    eventually(lambda: host.arena[8192:8196] == b"wait")       # inside the driver now
    queued = host.send(Op.READ, 1, slow, 12288, 16)
    for i in range(3):
        assert host.ioctl(2, fast, 0x80002000, b"ok%d" % i) == (0, b"ok%d" % i)
    # The second read never entered the driver (it would have written b"wait"): SLW1:'s one
    # thread is held, so here nothing can release it -- a driver that waits on its own next
    # request needs a quota above one.  The fixture kills the host.
    assert host.arena[12288:12292] != b"wait"
    assert held not in host.replies and queued not in host.replies
    assert len(os.listdir(f"/proc/{host.proc.pid}/task")) == 2 + 1 + 4
