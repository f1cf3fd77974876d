"""A client that opens connections until the Device Manager runs out of file descriptors.

The Device Manager starts a thread per connection and has no cap on connections, so a client
that can reach the socket takes every fd it has.  The Device Manager's fd limit is lowered to 256
(``prlimit`` on the real process) so that the flood is quick; the mechanism is the same at any limit.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import time

import pytest

from adv_kit import ECHO, attack, hostile, reg_group, start
from reflector import clientwire as cw

pytestmark = [pytest.mark.needs_sandbox, pytest.mark.slow]

FD_LIMIT = 256
# Fds this process keeps for itself while it holds a flood: pytest's, the Device Manager's log,
# the test's own client connections and probes.
RESERVE = 64


class Flood:
    """Connections held open until the Device Manager stops accepting them.

    This process must be able to hold more connections than the Device Manager can accept: its
    soft RLIMIT_NOFILE (1024 for a login user) is raised to the hard limit while the flood is
    held, and the flood stops short of that, so the test never fails on its own EMFILE.  Every
    socket is closed and the limit restored however the flood ends."""

    def __init__(self, path):
        self.path = str(path)
        self.socks: list[socket.socket] = []
        self._saved_limit: tuple[int, int] | None = None

    def __enter__(self):
        _, hard = self._saved_limit = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            room = hard - len(os.listdir("/proc/self/fd")) - RESERVE
            if room <= FD_LIMIT:
                pytest.skip(f"this process may hold only {room} more fds (hard RLIMIT_NOFILE {hard}), "
                            f"not more than the Device Manager's {FD_LIMIT}: its flood could not exhaust it")
            self._fill(min(4 * FD_LIMIT, room))
        except BaseException:
            self.__exit__()
            raise
        return self

    def _fill(self, most: int) -> None:
        refused = 0
        while refused < 40 and len(self.socks) < most:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.socks.append(s)
            s.settimeout(1)
            try:
                s.connect(self.path)
            except OSError:
                self.socks.pop().close()
                refused += 1
                time.sleep(0.05)     # not a threshold: lets the accept loop drain the backlog

    def __exit__(self, *exc):
        while self.socks:
            self.socks.pop().close()
        if self._saved_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, self._saved_limit)
            self._saved_limit = None


def probe(path) -> int | str:
    """LIST on a fresh connection, bounded by a timeout: the reply's length or why it failed."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(3)
    try:
        s.connect(str(path))
        s.send(cw.encode_request(cw.Op.LIST, 1, 0))
        return len(s.recv(cw.MAX_MESSAGE))
    except OSError as exc:
        return repr(exc)
    finally:
        s.close()


@pytest.fixture
def flood_dm(tmp_path):
    dm = start(tmp_path, hostile("Hostile", "HOS", 1) + hostile("Steady", "OKY", 2, order=2)
               + reg_group(1, restart_limit=100) + reg_group(2))
    resource.prlimit(dm.proc.pid, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
    yield dm
    if dm.proc.poll() is None:
        dm.proc.kill()          # a flooded Device Manager may not manage a clean SIGTERM
    dm.stop()


def test_after_a_connection_flood_the_device_manager_serves_again(flood_dm):
    with Flood(flood_dm.socket) as flood:
        assert len(flood.socks) >= FD_LIMIT // 2, len(flood.socks)
    deadline = time.monotonic() + 20
    while not isinstance(answer := probe(flood_dm.socket), int) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert isinstance(answer, int), answer
    with flood_dm.client() as c, c.open("OKY1:") as h:
        assert h.ioctl(ECHO, b"back", 4) == b"back"
    assert flood_dm.proc.poll() is None


def test_a_connection_flood_does_not_starve_hosts_or_the_audit_log(flood_dm):
    with flood_dm.client() as c, c.open("HOS1:") as hos, c.open("OKY1:") as oky:
        with Flood(flood_dm.socket):
            with pytest.raises(OSError) as exc:
                attack(hos, "exit")
            assert exc.value.errno == errno.EIO
            # Secure: the crash is audited and the host restarted while the flood is held,
            # and the Device Manager never runs out of fds for its own work.
            flood_dm.wait_audit("host.restarted", group=1, timeout=10)
            assert oky.ioctl(ECHO, b"ok", 2) == b"ok"
            assert "Too many open files" not in flood_dm.log()
