"""A hostile driver tries to exhaust what its host shares with the machine.

Each attack is contained in its own host (the limit that stopped it is named by the errno it got,
or by the host's end in the audit log) while OKY1:, in another host, keeps answering (Hammer).
"""

from __future__ import annotations

import errno
import threading
import time

import pytest

from adv_kit import Hammer, attack
from hostile_source import ECHO

pytestmark = [pytest.mark.needs_sandbox, pytest.mark.slow]

MAX_THREADS = 32       # the registry default (ProcGroup MaxThreads)
MAX_OPEN_FILES = 64    # the registry default (ProcGroup MaxOpenFiles)


def still_serves(dm) -> None:
    dm.wait_state("HOS1:", "running")
    with dm.client() as c, c.open("HOS1:") as h:
        assert attack(h, "write_tmp") == (0, 0)


def test_thread_bomb_stops_at_the_hosts_thread_limit(hostile_dm):
    with Hammer(hostile_dm), hostile_dm.client() as c, c.open("HOS1:") as h:
        err, started = attack(h, "threads", 1000)
        assert err == errno.EAGAIN, errno.errorcode.get(err, err)
        assert 0 < started < MAX_THREADS, started
        # Threads are what a host is made of: after the bomb, it can start them again.
        assert attack(h, "threads", 4) == (0, 4)
    still_serves(hostile_dm)


def test_fd_exhaustion_stops_at_rlimit_nofile(hostile_dm):
    with Hammer(hostile_dm), hostile_dm.client() as c, c.open("HOS1:") as h:
        err, opened = attack(h, "fds", 10_000)
        assert err == errno.EMFILE, errno.errorcode.get(err, err)
        assert 0 < opened < MAX_OPEN_FILES, opened
        assert attack(h, "fds", 4) == (0, 8)
    still_serves(hostile_dm)


def test_a_host_without_fds_for_a_lane_is_served_over_its_channel(hostile_dm):
    """Lanes cost the host an fd each.  With its fd table full, the host refuses a new lane
    (EMFILE) instead of dying, and the Reflector sends that request over the channel."""
    hostile_dm.wait_state("HOS1:", "running")
    crashes = len(hostile_dm.audit("host.crashed"))
    held: list = []
    with hostile_dm.client() as c, c.open("HOS1:") as h:
        holder = threading.Thread(target=lambda: held.append(attack(h, "fds_hold", 1200)))
        holder.start()
        time.sleep(0.3)      # not a threshold: gives the holder time to take the fds (HOS1: times out at 2 s)
        # Another connection while the holder's lane is busy: it needs a new lane, and gets none.
        with hostile_dm.client() as c2, c2.open("HOS1:") as h2:
            assert h2.ioctl(ECHO, b"over the channel", 16) == b"over the channel"
        holder.join(30)
    assert held and held[0][0] == errno.EMFILE, held
    assert "refused a lane" in hostile_dm.log()
    assert len(hostile_dm.audit("host.crashed")) == crashes
    still_serves(hostile_dm)


def test_tmp_fill_stops_at_the_tmpfs_size_or_rlimit_fsize(hostile_dm):
    with Hammer(hostile_dm), hostile_dm.client() as c, c.open("HOS1:") as h:
        err, written = attack(h, "fill_tmp", 4 << 30)
        assert err in (errno.ENOSPC, errno.EFBIG), errno.errorcode.get(err, err)
        assert written < 1 << 30, written
    still_serves(hostile_dm)


@pytest.mark.needs_cgroup     # MemoryLimit as the cgroup counts it; RLIMIT_AS alone lets more through
def test_memory_bomb_is_contained_in_its_host(hostile_dm):
    # MemoryLimit 50 MiB: RLIMIT_AS turns it into MemoryError in the driver, or the cgroup's OOM
    # killer ends the host.  Either way only HOS1:'s host pays.
    with Hammer(hostile_dm), hostile_dm.client() as c, c.open("HOS1:") as h:
        try:
            err, chunks = attack(h, "memory")
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
            crashed = hostile_dm.wait_audit("host.crashed", group=1)
            assert crashed[-1]["detail"]["signal"] == 9, crashed
        else:
            assert err == errno.ENOMEM
            assert chunks * 16 < 50 + 16, f"{chunks} chunks of 16 MiB under a 50 MiB limit"
    still_serves(hostile_dm)


def test_cpu_spin_is_ended_by_the_watchdog(hostile_dm):
    with Hammer(hostile_dm), hostile_dm.client() as c, c.open("HOS1:") as h:
        with pytest.raises(OSError) as exc:
            attack(h, "spin")
        assert exc.value.errno == errno.ETIMEDOUT
        hostile_dm.wait_audit("host.timeout", group=1)
    still_serves(hostile_dm)
