"""The host channel is hostile: forged replies, kernel calls in another driver's name, frames
larger than any the Reflector reads, floods.  Each is refused by the Reflector, audited, and ends
only the attacker's host."""

from __future__ import annotations

import errno
import json
import os
import threading
import time

import pytest

from adv_kit import Hammer, attack
from hostile_source import ATTACK, ECHO

pytestmark = [pytest.mark.needs_sandbox, pytest.mark.slow]


# -- two drivers in one host: the README's promise, both sides ------------------------------------

def test_a_driver_is_held_to_its_own_policy(hostile_dm):
    with hostile_dm.client() as c, c.open("TWA1:") as a, c.open("TWB1:") as b:
        _, id_a = attack(a, "whoami")
        _, id_b = attack(b, "whoami")
        assert id_a != id_b
        # TWA1:'s policy has no DeviceNodes: refused by the Reflector, audited under TWA1:.
        assert attack(a, "open_dev_as", id_a) == (errno.EACCES, 0)
        denied = hostile_dm.wait_audit("policy.denied", device="TWA1:")
        assert denied[-1]["detail"]["op"] == "open_device"
        # The allowed side: TWB1:'s policy grants /dev/null.
        err, fd = attack(b, "open_dev_as", id_b)
        assert err == 0 and fd >= 3


def test_a_driver_claiming_its_neighbours_id_gets_the_neighbours_rights(hostile_dm):
    """What the README says plainly: drivers that share a host share an address space, so one
    can act as the other, and the Reflector applies the *claimed* driver's policy.  This test
    pins that documented limit down, so a change to it is noticed."""
    with hostile_dm.client() as c, c.open("TWA1:") as a, c.open("TWB1:") as b:
        _, id_b = attack(b, "whoami")
        err, fd = attack(a, "open_dev_as", id_b)
        assert err == 0 and fd >= 3
    from dm_harness import ROOT
    assert "different process groups" in (ROOT / "README.md").read_text(), "the README no longer says it"


def test_a_driver_id_not_in_the_host_is_a_protocol_violation(hostile_dm):
    with Hammer(hostile_dm), hostile_dm.client() as c, c.open("TWA1:") as a:
        with pytest.raises(OSError) as exc:
            attack(a, "open_dev_as", 0x7FFF_0000)
        assert exc.value.errno == errno.EIO
        recs = hostile_dm.wait_audit("protocol.violation", group=3)
        assert any("does not hold" in r["detail"]["reason"] for r in recs), recs
        hostile_dm.wait_audit("host.crashed", group=3)
    hostile_dm.wait_state("TWA1:", "running")
    hostile_dm.wait_state("TWB1:", "running")


# -- forged replies ----------------------------------------------------------------------------------

def test_a_forged_reply_for_another_request_of_the_same_host(hostile_dm):
    """A host can answer any request *it* is serving (they are all its own); the forgery lands
    on the parked request, and the genuine reply that follows is for a request no longer in
    flight: a protocol violation that ends the host.  Nothing reaches another host."""
    hostile_dm.wait_state("HOS1:", "running")
    victim: list = []

    def park():
        with hostile_dm.client() as c, c.open("HOS1:") as h:
            try:
                victim.append(attack(h, "park", 1500))
            except OSError as exc:
                victim.append(exc)

    with Hammer(hostile_dm):
        t = threading.Thread(target=park)
        t.start()
        time.sleep(0.3)       # not a threshold: only gives the park request time to be in flight
        with hostile_dm.client() as c, c.open("HOS1:") as h:
            try:
                attack(h, "forge_parked")
            except OSError:
                pass          # the host may die before answering the forger itself
        t.join(20)
        recs = hostile_dm.wait_audit("protocol.violation", group=1)
        assert any("not in flight" in r["detail"]["reason"] for r in recs), recs
    assert len(victim) == 1
    if isinstance(victim[0], OSError):
        # The forged reply was not yet read, or the host died first: the victim got EIO.
        assert victim[0].errno in (errno.ENOTRECOVERABLE, errno.EIO), victim
    hostile_dm.wait_state("HOS1:", "running")


# -- lanes: one request at a time, one reply each -----------------------------------------------------

def test_a_frame_left_on_a_lane_is_a_violation_for_its_next_user(hostile_dm):
    hostile_dm.wait_state("HOS1:", "running")
    with Hammer(hostile_dm), hostile_dm.client() as c, c.open("HOS1:") as h:
        # Answered by the forgery (a host may answer its own request as it likes) ...
        assert h.ioctl(ATTACK, json.dumps({"attack": "lane_extra_reply"}).encode(), 16) == b""
        # ... and the frames it left on the lane (a second forgery, then the genuine reply) are
        # read by the next requests on that lane, in order.  The first few may still get their
        # own answers, when another thread of the host served them before the attack had
        # written its second frame; the first to read a stale frame fails, and kills the host.
        outcomes = []
        for _ in range(20):
            try:
                outcomes.append(h.ioctl(ECHO, b"x", 1))
            except OSError as exc:
                outcomes.append(exc.errno)
                break
        assert outcomes[-1] == errno.EIO, outcomes
        recs = hostile_dm.wait_audit("protocol.violation", group=1)
        assert any("on a lane" in r["detail"]["reason"] for r in recs), recs
        hostile_dm.wait_audit("host.crashed", group=1)
    hostile_dm.wait_state("HOS1:", "running")


def test_a_host_closing_its_lane_is_a_violation(hostile_dm):
    hostile_dm.wait_state("HOS1:", "running")
    before = len(hostile_dm.audit("protocol.violation"))
    with Hammer(hostile_dm), hostile_dm.client() as c, c.open("HOS1:") as h:
        with pytest.raises(OSError) as exc:
            attack(h, "lane_close")
        assert exc.value.errno == errno.EIO
        recs = hostile_dm.wait_audit("protocol.violation", count=before + 1)[before:]
        assert any("closed a lane" in r["detail"]["reason"] for r in recs), recs
    hostile_dm.wait_state("HOS1:", "running")
    with hostile_dm.client() as c, c.open("HOS1:") as h:
        assert h.ioctl(ECHO, b"back", 4) == b"back"


# -- frames the Reflector must not read ------------------------------------------------------------

@pytest.mark.parametrize("name", ["huge_tail", "lying_tail"])
def test_malformed_frames_end_the_host(hostile_dm, name):
    hostile_dm.wait_state("HOS1:", "running")
    before = len(hostile_dm.audit("protocol.violation"))
    with Hammer(hostile_dm), hostile_dm.client() as c, c.open("HOS1:") as h:
        try:
            result = attack(h, name, 100_000)
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
            result = None
        deadline = time.monotonic() + 20
        while len(hostile_dm.audit("protocol.violation")) <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        recs = hostile_dm.audit("protocol.violation")[before:]
        assert recs, f"{name}: no protocol.violation (attack answered {result})"
        assert all(r["group"] == 1 for r in recs), recs
    hostile_dm.wait_state("HOS1:", "running")
    assert os.path.exists(hostile_dm.socket)


def test_raw_kcall_flood_ends_the_host(hostile_dm):
    """KCALL frames written straight to the channel, never waiting: the Reflector answers the
    first, and the host's own runtime ends the host on a KREPLY it did not ask for (exit 81,
    BAD_FRAME), or the Reflector's frame limit ends it (protocol.violation).  Either way the
    flood stops with the host, and other hosts go on."""
    hostile_dm.wait_state("HOS1:", "running")
    before = len(hostile_dm.audit("host.crashed"))
    with Hammer(hostile_dm), hostile_dm.client() as c, c.open("HOS1:") as h:
        with pytest.raises(OSError) as exc:
            attack(h, "kcall_flood", 100_000)
        assert exc.value.errno == errno.EIO
        deadline = time.monotonic() + 20
        while len(hostile_dm.audit("host.crashed")) <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        crashed = hostile_dm.audit("host.crashed")[before:]
        assert crashed and crashed[0]["group"] == 1, crashed
        detail = crashed[0]["detail"]
        assert detail["exit_code"] == 81 or detail["killed_for"] == "protocol.violation", detail
    hostile_dm.wait_state("HOS1:", "running")


LOG_RATE_LIMIT = 200      # reflector/hostchannel.py: LOG frames per second before it is a flood


def test_kernel_log_flood_is_limited_like_log_frames(hostile_dm):
    hostile_dm.wait_state("HOS1:", "running")
    lines_before = hostile_dm.log().count("kflood-")
    with hostile_dm.client() as c, c.open("HOS1:") as h:
        try:
            err, sent = attack(h, "kernel_log_flood", 5000)
        except OSError as exc:
            assert exc.errno == errno.EIO      # the host was ended for flooding: secure
            err, sent = None, None
    time.sleep(0.5)     # not a threshold: lets the DM's log catch up before we count
    logged = hostile_dm.log().count("kflood-") - lines_before
    # Secure: the flood is refused (an errno in the driver, or the host ended) or at most about
    # a burst's worth of lines reaches the log.
    assert err != 0 or logged <= 2 * LOG_RATE_LIMIT, f"{logged} lines logged of {sent} sent"
