"""Policy tampering: a signed policy edited afterwards, one driver's policy under another's name,
a rolled-back serial across a restart, an extra key in the trust store, a module swapped after
its policy was accepted.  Each tampered driver answers ENODEV with a ``policy.rejected`` record;
the untouched one next to it runs (the allowed side)."""

from __future__ import annotations

import base64
import errno
import json
import shutil

import pytest

from adv_kit import ECHO, attack, hostile, reg_group, write_hostile
from dm_harness import DeviceManagerProcess
from policy import signing

pytestmark = [pytest.mark.needs_sandbox, pytest.mark.slow]

REGISTRY = hostile("Hostile", "HOS", 1) + hostile("Steady", "OKY", 2, order=2) + reg_group(1) + reg_group(2)


@pytest.fixture
def dms(tmp_path):
    made = []

    def make(**kw) -> DeviceManagerProcess:
        dm = DeviceManagerProcess(tmp_path, REGISTRY, driver_dirs=[write_hostile(tmp_path / "untrusted-drivers")], **kw)
        made.append(dm)
        return dm
    yield make
    for dm in made:
        dm.stop()


def envelope(dm, name: str) -> dict:
    return json.loads((dm.policies / f"{name}.json").read_text())


def document(env: dict) -> dict:
    return signing.decode_payload(env)[1]


def write(dm, name: str, env: dict) -> None:
    (dm.policies / f"{name}.json").write_text(json.dumps(env))


def signing_key(dm):
    return signing.load_private_key(dm.tmp / "keys" / "test.key")


def assert_only_hos1_rejected(dm, reason: str | None = None) -> list[dict]:
    with dm.client() as c:
        states = {d["name"]: d["state"] for d in c.devices()["devices"]}
        assert states == {"HOS1:": "rejected", "OKY1:": "running"}, states
        with pytest.raises(OSError) as exc:
            c.open("HOS1:")
        assert exc.value.errno == errno.ENODEV
        with c.open("OKY1:") as h:
            assert h.ioctl(ECHO, b"ok", 2) == b"ok"
    recs = dm.wait_audit("policy.rejected", device="HOS1:")
    if reason is not None:
        assert any(r["detail"].get("reason") == reason or reason in json.dumps(r["detail"]) for r in recs), recs
    return recs


def test_a_policy_edited_after_signing_is_rejected(dms):
    dm = dms()
    env = envelope(dm, "Hostile")
    doc = document(env)
    doc["resources"]["device_nodes"] = [{"path": "/etc/shadow", "mode": "r", "ioctls": None}]
    doc["io"]["max_io_size"] = 1 << 30
    env["payload"] = base64.b64encode(signing.canonical_json(doc)).decode()     # old signature kept
    write(dm, "Hostile", env)
    dm.start()
    assert_only_hos1_rejected(dm, "bad-signature")


def test_a_validly_signed_policy_for_another_key_is_rejected(dms):
    dm = dms()
    shutil.copyfile(dm.policies / "Steady.json", dm.policies / "Hostile.json")
    dm.start()
    assert_only_hos1_rejected(dm)


def _resign(dm, name: str, serial: int) -> None:
    doc = document(envelope(dm, name))
    doc["serial"] = serial
    write(dm, name, signing.sign(doc, signing_key(dm)))


def test_an_older_serial_after_a_newer_one_was_accepted_is_rejected(dms):
    dm = dms()
    serial = document(envelope(dm, "Hostile"))["serial"]
    _resign(dm, "Hostile", serial + 10)
    dm.start()
    with dm.client() as c, c.open("HOS1:") as h:             # the allowed side: the newer one
        assert h.ioctl(ECHO, b"new", 3) == b"new"
    assert dm.stop() == 0
    _resign(dm, "Hostile", serial + 5)                       # validly signed, but older
    dm.start()
    assert_only_hos1_rejected(dm, "rolled-back")


def test_an_extra_key_in_the_trust_store_changes_nothing(dms):
    dm = dms()
    attacker, _ = signing.generate_key("attacker", dm.tmp / "attacker")
    shutil.copyfile(dm.tmp / "attacker" / "attacker.pub", dm.trust / "attacker.pub")
    dm.start()
    with dm.client() as c:
        states = {d["name"]: d["state"] for d in c.devices()["devices"]}
    assert states == {"HOS1:": "running", "OKY1:": "running"}
    assert not dm.audit("policy.rejected")


def test_a_policy_signed_by_an_untrusted_key_is_rejected(dms):
    dm = dms()
    signing.generate_key("attacker", dm.tmp / "attacker")
    rogue = signing.load_private_key(dm.tmp / "attacker" / "attacker.key")
    write(dm, "Hostile", signing.sign(document(envelope(dm, "Hostile")), rogue))
    dm.start()
    assert_only_hos1_rejected(dm, "unknown-key")


def test_a_module_swapped_after_acceptance_is_not_run_on_restart(dms):
    dm = dms()
    dm.start()
    module = dm.driver_dirs[0] / "hostile.py"
    swapped = module.read_text().replace("def a_whoami(ctx, arg):",
                                         "def a_swapped(ctx, arg):\n    return 0, 0xBAD\n\n\ndef a_whoami(ctx, arg):")
    module.write_text(swapped)
    with dm.client() as c, c.open("HOS1:") as h:
        with pytest.raises(OSError):
            attack(h, "exit")
    dm.wait_audit("host.crashed", group=1)
    # Secure: the restart refuses the module (ENODEV, or not running), or runs the signed code.
    try:
        dm.wait_state("HOS1:", "running", timeout=10)
        with dm.client() as c, c.open("HOS1:") as h:
            result = attack(h, "swapped")
    except (OSError, AssertionError, KeyError):
        return
    assert result != (0, 0xBAD), "the swapped module ran under the original module's signed policy"
