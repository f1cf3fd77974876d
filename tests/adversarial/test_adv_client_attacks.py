"""Applications that attack the Device Manager through what it does for them: its audit log and
its replies.  A client that repeats a request its policy denies must not be able to grow the
audit log (and fsync it) as fast as it can ask -- the log would fill the disk, and a Device
Manager whose log cannot be written stops.  A client that sends without reading must block only
itself."""

from __future__ import annotations

import errno
import socket
import time

import pytest

from adv_kit import ECHO
from reflector import clientwire as cw

pytestmark = [pytest.mark.needs_sandbox, pytest.mark.slow]

NOT_ALLOWED = 0x00330000           # outside every IoctlAllow of the kit's registry
DENIALS = 600


def _denials(dm, device: str) -> tuple[int, int]:
    """(records, denials they account for) of IOCTL NOT_ALLOWED on ``device``."""
    records = accounted = 0
    for r in dm.audit("policy.denied"):
        detail = r["detail"]
        last = detail.get("last", detail)
        if r["device"] != device or last.get("code") != f"{NOT_ALLOWED:#010x}":
            continue
        records += 1
        accounted += detail.get("folded", 1)
    return records, accounted


def test_a_flood_of_denied_requests_is_counted_not_written_one_by_one(hostile_dm):
    with hostile_dm.client() as c, c.open("OKY1:") as h:
        for _ in range(DENIALS):
            with pytest.raises(OSError) as exc:
                h.ioctl(NOT_ALLOWED, b"", 0)
            assert exc.value.errno == errno.EACCES      # still denied, every time
        assert h.ioctl(ECHO, b"still", 5) == b"still"
    # Every denial is accounted for (the last window's count is written within a sync interval
    # or two), in far fewer records than denials.
    deadline = time.monotonic() + 20                     # a guard against a hang, not a threshold
    while (counted := _denials(hostile_dm, "OKY1:"))[1] != DENIALS and time.monotonic() < deadline:
        time.sleep(0.05)
    records, accounted = counted
    assert accounted == DENIALS, counted
    assert records <= DENIALS // 4, records
    folded = [r for r in hostile_dm.audit("policy.denied") if "folded" in r["detail"]]
    assert folded and folded[0]["detail"]["last"]["reason"], folded[:1]


def test_a_client_that_never_reads_its_replies_blocks_only_itself(hostile_dm):
    greedy = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    greedy.connect(str(hostile_dm.socket))
    greedy.setblocking(False)
    try:
        sent = 0
        try:
            while sent < 100_000:                         # until its send buffer is full
                greedy.send(cw.encode_request(cw.Op.LIST, 1, 0))
                sent += 1
        except BlockingIOError:
            pass
        assert sent < 100_000, "the socket never pushed back"
        # Its session thread is stuck sending replies nobody reads; everyone else is served.
        for _ in range(3):
            with hostile_dm.client() as c, c.open("OKY1:") as h:
                assert h.ioctl(ECHO, b"others", 6) == b"others"
                assert c.devices()["devices"]
    finally:
        greedy.close()
    with hostile_dm.client() as c, c.open("OKY1:") as h:
        assert h.ioctl(ECHO, b"after", 5) == b"after"
