"""Hostile applications on the Device Manager's socket: too many handles, malformed frames,
shared memory that is not what it claims, other connections' handles, disconnects mid-request,
a crowd.  The Device Manager refuses each with the errno of the client contract, leaks nothing,
and keeps serving everyone else."""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import socket
import threading
import time

import pytest

from adv_kit import ATTACK, ECHO, attack
from reflector import clientwire as cw

pytestmark = [pytest.mark.needs_sandbox, pytest.mark.slow]

MAX_HANDLES_PER_CONNECTION = 256     # reflector/server.py


class Raw:
    """A client speaking the wire protocol by hand, to send what the library never would."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(str(path))
        self.sock.settimeout(30)

    def send(self, data: bytes, fds=()) -> None:
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.send(data)

    def reply(self) -> tuple[int, int, int, bytes]:
        data = self.sock.recv(cw.MAX_MESSAGE)
        assert data, "the Device Manager closed the connection"
        return cw.decode_reply(data)

    def call(self, op, handle=0, *fields, tail=b"", fds=()) -> tuple[int, int, bytes]:
        self.send(cw.encode_request(op, 7, handle, *fields, tail=tail), fds)
        _, status, value, rtail = self.reply()
        return status, value, rtail

    def close(self):
        self.sock.close()


def serves(dm) -> None:
    with dm.client() as c, c.open("OKY1:") as h:
        assert h.ioctl(ECHO, b"alive", 5) == b"alive"


def open_count(dm) -> int:
    with dm.client() as c, c.open("HOS1:") as h:
        return attack(h, "open_count")[1] - 1          # minus the handle asking


def wait_open_count(dm, expected: int, timeout: float = 20) -> None:
    """Closing after a hang-up is the session's cleanup, done after the connection ends."""
    deadline = time.monotonic() + timeout
    while (n := open_count(dm)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert n == expected, f"{n} handles still open in the driver, expected {expected}"


def test_handles_per_connection_are_capped_and_freed_with_it(hostile_dm):
    base = open_count(hostile_dm)
    with hostile_dm.client() as c:
        handles = []
        with pytest.raises(OSError) as exc:
            for _ in range(5000):
                handles.append(c.open("HOS1:"))
        assert exc.value.errno == errno.EMFILE
        assert len(handles) == MAX_HANDLES_PER_CONNECTION
        assert open_count(hostile_dm) == base + MAX_HANDLES_PER_CONNECTION
    # The connection is gone: every handle it held is closed in the driver.
    serves(hostile_dm)
    wait_open_count(hostile_dm, base)


@pytest.mark.parametrize("frame", [b"\x01", b"", b"\x01\x06", b"\xff" * 40, cw.encode_request(cw.Op.OPEN, 1, 0, 3, 0)[:-1]],
                         ids=["one-byte", "empty", "two-bytes", "garbage", "truncated-open"])
def test_malformed_frames_are_answered_einval_and_change_nothing(hostile_dm, frame):
    raw = Raw(hostile_dm.socket)
    try:
        if frame:
            raw.send(frame)
            _, status, _, _ = raw.reply()
            assert status == errno.EINVAL
        else:
            raw.sock.send(b"")        # a zero-length message reads like a hang-up
        # The same connection (if still open) or a new one still works.
        serves(hostile_dm)
    finally:
        raw.close()


def _memfd(size: int, seals: int) -> int:
    fd = os.memfd_create("adv", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_shm_attach_refuses_what_is_not_a_shrink_sealed_memfd(hostile_dm, tmp_path):
    size = 1 << 20
    plain = tmp_path / "plain"
    plain.write_bytes(b"\0" * size)
    r, w = os.pipe()
    cases = {
        "pipe": r,
        "regular-file": os.open(plain, os.O_RDWR | os.O_CLOEXEC),
        "unsealed-memfd": _memfd(size, 0),
        "grow-sealed-only": _memfd(size, fcntl.F_SEAL_GROW),
        "size-lie": _memfd(size // 2, fcntl.F_SEAL_SHRINK),
    }
    raw = Raw(hostile_dm.socket)
    try:
        for what, fd in cases.items():
            status, _, reason = raw.call(cw.Op.SHM_ATTACH, 0, size, fds=[fd])
            assert status == errno.EINVAL, (what, status, reason)
        # Two fds at once, and an fd with a request that takes none.
        status, _, _ = raw.call(cw.Op.SHM_ATTACH, 0, size, fds=[cases["pipe"], w])
        assert status == errno.EINVAL
        status, _, _ = raw.call(cw.Op.LIST, 0, fds=[w])
        assert status == errno.EINVAL
        # The allowed side: a shrink-sealed memfd of the declared size.
        good = _memfd(size, fcntl.F_SEAL_SHRINK)
        assert raw.call(cw.Op.SHM_ATTACH, 0, size, fds=[good])[0] == 0
        # ...which the client then cannot shrink under the Device Manager: the kernel's seal.
        with pytest.raises(PermissionError):
            os.ftruncate(good, 0)
        os.close(good)
    finally:
        raw.close()
        for fd in list(cases.values()) + [w]:
            os.close(fd)
    serves(hostile_dm)


def test_shm_offsets_outside_the_attached_memory_are_refused(hostile_dm):
    size = 1 << 20
    raw = Raw(hostile_dm.socket)
    fd = _memfd(size, fcntl.F_SEAL_SHRINK)
    try:
        assert raw.call(cw.Op.SHM_ATTACH, 0, size, fds=[fd])[0] == 0
        status, handle, _ = raw.call(cw.Op.OPEN, 0, 3, 0, tail=b"OKY1:")
        assert status == 0
        for off, length in ((size - 8, 16), (2 ** 64 - 8, 16), (0, size + 1)):
            raw.send(cw.encode_request(cw.Op.IOCTL, 9, handle, ECHO, length, off, 4, 0, flags=cw.FLAG_SHM))
            status = raw.reply()[1]
            assert status in (errno.EINVAL, errno.EMSGSIZE), (off, length, status)
    finally:
        raw.close()
        os.close(fd)
    serves(hostile_dm)


def test_a_handle_of_another_connection_is_ebadf(hostile_dm):
    with hostile_dm.client() as a, a.open("OKY1:") as h:
        raw = Raw(hostile_dm.socket)
        try:
            for op, fields in ((cw.Op.IOCTL, (ECHO, 1, 0, 1, 0)), (cw.Op.READ, (1, 0)), (cw.Op.CLOSE, ())):
                status, _, _ = raw.call(op, h.handle, *fields, tail=b"x" if op == cw.Op.IOCTL else b"")
                assert status == errno.EBADF, (op, status)
        finally:
            raw.close()
        # The allowed side: the owner's handle still works (the CLOSE above did not close it).
        assert h.ioctl(ECHO, b"mine", 4) == b"mine"


def test_a_client_that_hangs_up_mid_request_leaks_no_handle(hostile_dm):
    base = open_count(hostile_dm)
    raw = Raw(hostile_dm.socket)
    status, handle, _ = raw.call(cw.Op.OPEN, 0, 3, 0, tail=b"HOS1:")
    assert status == 0
    req = json.dumps({"attack": "park", "arg": 1000}).encode()
    raw.send(cw.encode_request(cw.Op.IOCTL, 8, handle, ATTACK, len(req), 0, 16, 0, tail=req))
    raw.close()                      # gone while the driver still holds the request
    serves(hostile_dm)
    hostile_dm.wait_state("HOS1:", "running")
    wait_open_count(hostile_dm, base)
    assert hostile_dm.proc.poll() is None


def test_many_concurrent_clients_are_all_served(hostile_dm):
    failures: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with hostile_dm.client() as c, c.open("OKY1:") as h:
                for j in range(20):
                    msg = f"{i}:{j}".encode()
                    assert h.ioctl(ECHO, msg, len(msg)) == msg
        except BaseException as exc:     # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[:3]
    serves(hostile_dm)
