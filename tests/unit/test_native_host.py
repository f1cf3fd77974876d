"""Guard pages and read-only input, in a real host process (unconfined: ``python -m hosts.main``)
over a real arena (``reflector.arena.Arena``, whose layout the host learns from the arena itself).
This test plays the Reflector and places the buffers itself, so it can put them exactly against a
guard page; each fault has a harmless twin one step away that must not fault, so a pass proves the
guard page -- not something else -- stopped the write."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "native"))
import native_build  # noqa: E402

from hosts.wire import MAX_FRAME, Op, decode, encode  # noqa: E402
from reflector.arena import GUARD, Arena  # noqa: E402

pytestmark = pytest.mark.skipif(native_build.compiler() is None, reason="no C compiler (cc) to build the native test drivers")

GUARD_S = 60     # seconds: only against a hang
CODE = lambda n: 0x00220000 + 4 * n  # noqa: E731
ECHO, PAST_END, BEFORE_START, RUNAWAY, WRITE_INPUT = (CODE(n) for n in range(5))
SLOT = 3 * GUARD


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("native")
    return {"overrun": native_build.build("overrun.c", d / "liboverrun.so"),
            "echo": native_build.build("echo.c", d / "libecho.so")}


class NativeHost:
    def __init__(self, module: Path, prefix: str):
        self.arena = Arena("test", SLOT, 3)
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hosts.main", "--channel-fd", str(child.fileno()),
             "--arena-fd", str(self.arena.fd), "--arena-size", str(self.arena.size)],
            pass_fds=[child.fileno(), self.arena.fd])
        child.close()
        self.sock.settimeout(GUARD_S)
        self.next_id = 1
        assert decode(self.sock.recv(MAX_FRAME)).op == Op.READY
        spec = {"name": f"{prefix}1:", "module": str(module),
                "registry": {"Prefix": {"type": "sz", "data": prefix}, "Flags": {"type": "dword", "data": 0x10}}}
        assert self.call(Op.LOAD, tail=json.dumps(spec).encode()) == (0, 0)
        status, self.open_id = self.call(Op.OPEN, 0, 0)
        assert status == 0

    def call(self, op, *fields, tail=b""):
        req, self.next_id = self.next_id, self.next_id + 1
        self.sock.send(encode(op, req, 1, *fields, tail=tail))
        while True:
            data = self.sock.recv(MAX_FRAME)
            if not data:
                return None            # the host is gone
            frame = decode(data)
            if frame.op == Op.REPLY and frame.req_id == req:
                return frame.fields

    def ioctl(self, code, in_off, in_len, out_off, out_len):
        return self.call(Op.IOCTL, self.open_id, code, in_off, in_len, out_off, out_len)

    def died_of(self):
        return self.proc.wait(GUARD_S)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
        self.arena.close()


@pytest.fixture
def host(built):
    hosts = []

    def start(name="overrun", prefix="OVR"):
        hosts.append(NativeHost(built[name], prefix))
        return hosts[-1]
    yield start
    for h in hosts:
        h.close()


def slot(h, i):
    return h.arena._slots[i]


def test_the_arena_is_slots_each_ended_by_a_guard_page():
    arena = Arena("layout", SLOT, 2)
    try:
        a, b = arena._slots
        assert a.size == SLOT and b.offset == a.offset + a.size + GUARD
        assert arena.size == Arena.footprint(SLOT, 2) == 2 * (SLOT + GUARD)
    finally:
        arena.close()


@pytest.mark.parametrize("index", [0, 1, 2])
def test_one_byte_past_a_slot_faults(host, index):
    h = host()
    s = slot(h, index)
    assert h.ioctl(PAST_END, s.offset, 0, s.offset, s.size - 1) == (0, 0)      # the last byte: fine
    assert h.ioctl(PAST_END, s.offset, 0, s.offset, s.size) is None            # the guard: fault
    assert h.died_of() == -signal.SIGSEGV


@pytest.mark.parametrize("index", [0, 1])
def test_one_byte_before_a_slot_faults(host, index):
    h = host()
    s = slot(h, index)
    assert h.ioctl(BEFORE_START, s.offset, 0, s.offset + 1, 8) == (0, 0)       # still in the slot
    assert h.ioctl(BEFORE_START, s.offset, 0, s.offset, 8) is None             # slot 0: the leading guard
    assert h.died_of() == -signal.SIGSEGV


def test_a_runaway_write_stops_at_the_guard_and_leaves_the_next_slot_alone(host):
    h = host()
    a, b = slot(h, 0), slot(h, 1)
    h.arena.view[b.offset:b.offset + 8] = b"neighbor"
    assert h.ioctl(RUNAWAY, a.offset, 0, a.offset, 16) is None
    assert h.died_of() == -signal.SIGSEGV
    assert bytes(h.arena.view[b.offset:b.offset + 8]) == b"neighbor"
    assert bytes(h.arena.view[a.offset + a.size - 1:a.offset + a.size]) == b"\xaa"   # it ran to the end


def test_whole_pages_of_the_input_are_read_only(host):
    h = host()
    s = slot(h, 0)
    # 16 bytes of input share their page with the output: that page cannot be protected.
    assert h.ioctl(WRITE_INPUT, s.offset, 16, s.offset + 64, 8) == (0, 0)
    assert h.ioctl(WRITE_INPUT, s.offset, GUARD, s.offset + GUARD, 8) is None
    assert h.died_of() == -signal.SIGSEGV


def test_input_pages_are_writable_again_after_the_call(host):
    h = host("echo", "ECH")
    s = slot(h, 1)
    h.arena.view[s.offset:s.offset + 2 * GUARD] = b"\x5a" * (2 * GUARD)
    assert h.call(Op.WRITE, h.open_id, s.offset, 2 * GUARD) == (0, 2 * GUARD)   # input read-only meanwhile
    assert h.call(Op.SEEK, h.open_id, 0, 0) == (0, 0)
    h.arena.view[s.offset:s.offset + 2 * GUARD] = bytes(2 * GUARD)
    assert h.call(Op.READ, h.open_id, s.offset, 2 * GUARD) == (0, 2 * GUARD)    # the driver writes there now
    assert bytes(h.arena.view[s.offset:s.offset + 2 * GUARD]) == b"\x5a" * (2 * GUARD)
    assert h.proc.poll() is None
