"""policy.acceptance: each way a signed policy is refused, with its own reason, and what is accepted."""

from __future__ import annotations

import base64
import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policy.acceptance import accept
from policy.derive import derive
from policy.document import Policy
from policy.drivers import find_drivers
from policy.errors import StateError
from policy.hive import Hive, Value
from policy.signing import generate_key, load_private_key, sign

DATA = Path(__file__).parents[1] / "data" / "policy"
KEY = r"HKEY_LOCAL_MACHINE\Drivers\BuiltIn\Serial"
NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)


class World:
    """A registry, a driver directory, a signing key, a trust store and a state dir in tmp_path."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.drivers = tmp / "drivers"
        shutil.copytree(DATA / "drivers", self.drivers)
        self.hive = Hive()
        for v in (Value("Dll", "sz", "serial.dll"), Value("Prefix", "sz", "COM"), Value("Index", "dword", 1),
                  Value("Flags", "dword", 0x10), Value("IoctlAllow", "multi_sz", ("0x1",))):
            self.hive.set_value(KEY, v)
        self.hive.set_value(r"HKLM\Drivers\BuiltIn\GPIO", Value("Dll", "sz", "gpio.dll"))    # kernel mode
        key_path, pub = generate_key("rel", tmp / "keys")
        self.key = load_private_key(key_path)
        self.trust = tmp / "trust"
        self.trust.mkdir()
        shutil.copy(pub, self.trust)
        self.policies = tmp / "policies"
        self.policies.mkdir()
        self.state = tmp / "state"

    def document(self, serial: int = 100, **kw) -> dict:
        [d] = [d for d in derive(self.hive, [self.drivers], serial=serial, now=NOW, **kw) if d.entry.mode == "user"]
        return d.document

    def write(self, obj, name: str = "serial.json") -> Path:
        p = self.policies / name
        p.write_text(json.dumps(obj))
        return p

    def signed(self, doc=None, name: str = "serial.json", key=None) -> dict:
        env = sign(doc if doc is not None else self.document(), key or self.key)
        self.write(env, name)
        return env

    def accept(self, now: datetime = NOW):
        return accept(self.hive, find_drivers(self.hive), self.policies, self.trust, self.state, [self.drivers], now=now)

    def reason(self, now: datetime = NOW) -> str:
        result = self.accept(now)
        assert KEY not in result.accepted
        return result.rejected[KEY].reason


@pytest.fixture
def w(tmp_path) -> World:
    return World(tmp_path)


def test_good_policy_is_accepted_as_a_policy(w):
    w.signed()
    result = w.accept()
    assert list(result.accepted) == [KEY] and not result.rejected
    p = result.accepted[KEY]
    assert isinstance(p, Policy) and p.device == "COM1:" and p.serial == 100 and p.mode == "user"
    state = json.loads((w.state / "serials.json").read_text())
    assert state["keys"][KEY.casefold()]["serial"] == 100


def test_kernel_mode_drivers_need_no_signed_policy(w):
    w.signed()
    result = w.accept()
    assert not any("GPIO" in k for k in list(result.accepted) + list(result.rejected))


def test_key_path_matches_case_insensitively(w):
    doc = w.document()
    doc["driver"]["key"] = KEY.upper()
    w.signed(doc)
    # the registry key still hashes alike; only the spelling of the path differs
    assert KEY in w.accept().accepted


def test_missing(w):
    assert w.reason() == "missing"


def test_missing_mentions_unreadable_files(w):
    (w.policies / "junk.json").write_text("{not json")
    result = w.accept()
    assert result.rejected[KEY].reason == "missing" and "junk.json" in result.rejected[KEY].detail
    assert result.unmatched and result.unmatched[0][0].endswith("junk.json")


def test_missing_policies_directory(w):
    shutil.rmtree(w.policies)
    result = w.accept()
    assert result.rejected[KEY].reason == "missing" and "does not exist" in result.rejected[KEY].detail


def test_unsigned_bare_document(w):
    w.write(w.document())
    assert w.reason() == "unsigned"


def test_unsigned_empty_signature_list(w):
    env = sign(w.document(), w.key)
    env["signatures"] = []
    w.write(env)
    assert w.reason() == "unsigned"


def test_malformed_envelope(w):
    env = w.signed()
    env["signatures"][0]["sig"] = "short"
    w.write(env)
    assert w.reason() == "malformed"


def test_flipped_payload_bit_is_bad_signature(w):
    env = w.signed()
    payload = bytearray(base64.b64decode(env["payload"]))
    i = payload.index(b'"serial":100') + len('"serial":')
    payload[i] ^= 0x02                                   # '1' -> '3': serial 300, still canonical
    env["payload"] = base64.b64encode(bytes(payload)).decode()
    w.write(env)
    assert w.reason() == "bad-signature"


def test_flipped_signature_bit_is_bad_signature(w):
    env = w.signed()
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[0] ^= 1
    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    w.write(env)
    assert w.reason() == "bad-signature"


def test_swapped_payloads_are_bad_signature(w):
    a = sign(w.document(serial=100), w.key)
    b = sign(w.document(serial=200), w.key)
    a["payload"] = b["payload"]
    w.write(a)
    assert w.reason() == "bad-signature"


def test_resigned_with_untrusted_key_is_unknown_key(w):
    w.signed(key=Ed25519PrivateKey.generate())
    assert w.reason() == "unknown-key"


def test_schema_invalid_even_when_properly_signed(w):
    doc = w.document()
    doc["resources"]["dma_quota"] = -1
    w.signed(doc)
    assert w.reason() == "schema-invalid"


def test_schema_invalid_overlapping_windows_even_when_signed(w):
    doc = w.document()
    doc["resources"]["memory"] = [{"base": 0, "length": 16, "access": "rw"}, {"base": 8, "length": 16, "access": "rw"}]
    w.signed(doc)
    assert w.reason() == "schema-invalid"


def test_expired(w):
    w.signed(w.document(expires=NOW + timedelta(days=1)))
    assert KEY in w.accept(NOW + timedelta(hours=23)).accepted
    assert w.reason(NOW + timedelta(days=1)) == "expired"


def test_mode_mismatch(w):
    doc = w.document()
    doc["driver"]["mode"], doc["host"] = "kernel", None
    w.signed(doc)
    assert w.reason() == "mode-mismatch"


def test_registry_changed(w):
    w.signed()
    w.hive.set_value(KEY, Value("MemBase", "dword", 0x1000))
    w.hive.set_value(KEY, Value("MemLen", "dword", 0x1000))
    assert w.reason() == "registry-mismatch"


def test_registry_widened_ioctl_allow_is_registry_mismatch(w):
    w.signed()
    w.hive.set_value(KEY, Value("IoctlAllow", "multi_sz", ("0x1", "0x2")))
    assert w.reason() == "registry-mismatch"


def test_module_changed(w):
    w.signed()
    (w.drivers / "serial.py").write_text("class Driver:\n    evil = True\n")
    result = w.accept()
    assert result.rejected[KEY].reason == "module-mismatch" and "changed" in result.rejected[KEY].detail


def test_module_gone(w):
    w.signed()
    (w.drivers / "serial.py").unlink()
    assert w.reason() == "module-mismatch"


def test_module_not_pinned(w):
    doc = w.document()
    doc["driver"]["module"] = {"path": None, "kind": None, "sha256": None}
    w.signed(doc)
    assert w.reason() == "module-mismatch"


def test_rolled_back_serial(w):
    w.signed(w.document(serial=200))
    assert KEY in w.accept().accepted
    w.signed(w.document(serial=150))
    result = w.accept()
    assert result.rejected[KEY].reason == "rolled-back" and "150 is below 200" in result.rejected[KEY].detail


def test_same_serial_same_payload_is_a_restart_but_different_payload_is_rolled_back(w):
    w.signed(w.document(serial=200))
    assert KEY in w.accept().accepted
    assert KEY in w.accept().accepted                    # the Device Manager restarted
    doc = w.document(serial=200)
    doc["io"]["max_io_size"] = 1 << 30
    w.signed(doc)
    assert w.reason() == "rolled-back"


def test_higher_serial_is_accepted_and_recorded(w):
    w.signed(w.document(serial=200))
    w.accept()
    w.signed(w.document(serial=300))
    assert w.accept().accepted[KEY].serial == 300
    w.signed(w.document(serial=250))
    assert w.reason() == "rolled-back"


def test_highest_verified_of_several_files_wins(w):
    w.signed(w.document(serial=100), "a.json")
    w.signed(w.document(serial=300), "b.json")
    w.signed(w.document(serial=400), "c.json", key=Ed25519PrivateKey.generate())    # not trusted
    assert w.accept().accepted[KEY].serial == 300


def test_rejection_reported_is_the_one_that_got_furthest(w):
    w.write(w.document(), "a.json")                     # unsigned
    w.signed(w.document(expires=NOW + timedelta(seconds=1)), "b.json")
    assert w.reason(NOW + timedelta(days=1)) == "expired"


def test_corrupt_state_fails_closed(w):
    w.state.mkdir()
    (w.state / "serials.json").write_text("{")
    w.signed()
    with pytest.raises(StateError, match="corrupt anti-rollback state"):
        w.accept()


def test_state_write_leaves_no_temporary_files(w):
    w.signed()
    w.accept()
    assert [p.name for p in w.state.iterdir()] == ["serials.json"]
