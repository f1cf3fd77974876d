"""Zero-copy bulk transfers: an application reads into and writes from memory it shares with the
Device Manager (``DeviceManager.shared_buffer``), in both driver modes, and the slot that names
that memory in the protocol is checked like every other client input."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dm_harness import DeviceManagerProcess, reg_driver, reg_group
from reflector import clientwire as cw

TESTS = Path(__file__).resolve().parent.parent
BIG = '"MaxIoSize"=dword:00100000'
SIZE = 300_000          # above the library's inline threshold, and not a whole number of pages


def _registry(user: bool) -> str:
    reg = reg_driver("Loop", "LPB", "echo.dll", user=user, group=1 if user else None, extra=BIG)
    return reg + (reg_group(1) if user else "")


@pytest.fixture(params=[pytest.param(False, id="kernel"),
                        pytest.param(True, id="user", marks=pytest.mark.needs_sandbox)])
def dm(request, tmp_path):
    dm = DeviceManagerProcess(tmp_path, _registry(request.param), driver_dirs=(TESTS / "drivers",)).start()
    yield dm
    assert dm.stop() == 0


def test_write_from_and_read_into_a_shared_buffer(dm):
    data = os.urandom(SIZE)
    with dm.client() as c, c.open("LPB1:") as h, c.shared_buffer(SIZE) as buf:
        buf.view[:] = data
        assert h.write(buf) == SIZE
        buf.view[:] = bytes(SIZE)               # so that what is read back cannot be left over
        assert h.readinto(buf[:1000]) == 1000   # a slice reads fewer bytes, at the slice's place
        assert buf.view[:1000] == data[:1000] and buf.view[1000:2000] == bytes(1000)
        assert h.readinto(buf[1000:]) == SIZE - 1000
        assert buf.tobytes() == data
        for host in c.devices()["hosts"]:       # user mode: requests went over a lane, now idle
            assert host["lanes"]["made"] >= 1 and host["lanes"]["busy"] == 0, host


def test_one_shared_buffer_per_connection_and_only_its_own(dm):
    with dm.client() as c, dm.client() as other, c.open("LPB1:") as h:
        buf = c.shared_buffer(4096)
        with pytest.raises(RuntimeError, match="in use"):
            c.shared_buffer(4096)
        with other.open("LPB1:") as oh, pytest.raises(ValueError, match="connection that made it"):
            oh.readinto(buf)
        buf.close()
        with pytest.raises(ValueError, match="closed"):
            h.readinto(buf)
        with c.shared_buffer(8192) as again:     # the slot is free again, and works
            again.view[:5] = b"still"
            assert h.write(again[:5]) == 5
            kept = again.view[:5]                # a view held past the buffer's end ...
        assert h.read(5) == b"still"
        assert bytes(kept) == b"still"           # ... stays readable, and the slot is free
        with c.shared_buffer(4096):
            pass


def test_a_slot_outside_the_protocol_or_never_attached_is_einval(dm):
    with dm.client() as c, c.open("LPB1:") as h:
        with pytest.raises(OSError) as exc:      # slot 1 names no memory yet on this connection
            c._call(cw.Op.READ, h.handle, 4096, 0, flags=cw.shm_flags(1))
        assert exc.value.errno == errno.EINVAL and "slot 1" in exc.value.strerror
        with pytest.raises(OSError) as exc:      # there is no slot 2
            c._call(cw.Op.READ, h.handle, 4096, 0, flags=cw.shm_flags(cw.SHM_SLOTS))
        assert exc.value.errno == errno.EINVAL and "slot" in exc.value.strerror
        with c.shared_buffer(4096) as buf:       # and an attached slot is bounded by its size
            with pytest.raises(OSError) as exc:
                c._call(cw.Op.READ, h.handle, 4096, 1, flags=cw.shm_flags(buf.slot))
            assert exc.value.errno == errno.EINVAL and "outside" in exc.value.strerror
