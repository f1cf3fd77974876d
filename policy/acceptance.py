"""Which user-mode drivers may load: their signed policies, checked against what is here now.

:func:`accept` is what the Device Manager calls at start-up.  For every user-mode driver entry it
finds the policy files that name the driver's registry key, and accepts one only if, in this order:

1. the file is an envelope (``malformed`` otherwise; a bare document is ``unsigned``);
2. it is signed by a key in the trust store (``unsigned``, ``unknown-key``, ``bad-signature``);
3. the payload is a valid policy (``schema-invalid``);
4. it has not expired (``expired``);
5. its mode is the entry's mode (``mode-mismatch``);
6. the registry key hashes as it did when the policy was derived (``registry-mismatch``);
7. the module on the search path hashes as the policy pins it (``module-mismatch``);
8. its serial is not below the highest one accepted before for that key, kept in
   ``<state dir>/serials.json``; the same serial is fine only with the same payload (a restart of
   the Device Manager), otherwise ``rolled-back``.

Kernel-mode entries need no signed policy: the Device Manager derives theirs itself and makes
them with ``Policy.trusted``.  Nothing here trusts a file's content before step 2; before then
it is only used to find which driver the file claims to be for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from policy.fileio import write_atomic
from policy.document import Policy, parse_datetime, validate_document
from policy.drivers import DriverEntry
from policy.errors import ModuleNotFound, PolicyError, PolicyInvalid, SignatureError, StateError
from policy.modules import module_digest, resolve_module
from policy.signing import TrustStore, decode_payload, verify_envelope

__all__ = ["Rejection", "Acceptance", "Rejected", "accept", "check_signed", "check_here", "REASONS", "MAX_POLICY_FILE"]

REASONS = ("missing", "malformed", "unsigned", "unknown-key", "bad-signature", "schema-invalid", "expired",
           "mode-mismatch", "registry-mismatch", "module-mismatch", "rolled-back")
MAX_POLICY_FILE = 4 << 20
STATE_FILE = "serials.json"


@dataclass(frozen=True)
class Rejection:
    key_path: str
    reason: str          # one of REASONS
    detail: str          # for the operator and the audit log


@dataclass
class Acceptance:
    accepted: dict[str, Policy]
    rejected: dict[str, Rejection]
    unmatched: list[tuple[str, str]] = field(default_factory=list)   # (file, why it names no driver)


class Rejected(PolicyError):
    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


# --- one file --------------------------------------------------------------------------------

def read_unverified(path: Path) -> object:
    """A policy file's JSON, size-limited; raises Rejected("malformed")."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_POLICY_FILE + 1)
    except OSError as exc:
        raise Rejected("malformed", f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_POLICY_FILE:
        raise Rejected("malformed", f"{path}: larger than {MAX_POLICY_FILE} bytes")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Rejected("malformed", f"{path}: not JSON: {exc}") from None
    except RecursionError:
        raise Rejected("malformed", f"{path}: JSON nested too deeply") from None


def claimed_key(unverified: object) -> str | None:
    """The registry key a file says it is for: from a bare document or an envelope's payload.
    Unverified: only for matching files to drivers."""
    doc = unverified
    if isinstance(unverified, dict) and "payload" in unverified:
        try:
            _, doc = decode_payload(unverified)
        except SignatureError:
            return None
    drv = doc.get("driver") if isinstance(doc, dict) else None
    key = drv.get("key") if isinstance(drv, dict) else None
    return key if isinstance(key, str) else None


def check_signed(unverified: object, trust: TrustStore, now: datetime | None = None) -> dict:
    """Steps 1-4 of the module docstring: the verified, schema-valid, unexpired document.  Raises Rejected."""
    if isinstance(unverified, dict) and "payload" not in unverified and "driver" in unverified:
        raise Rejected("unsigned", "a bare policy document, not a signed envelope (fix: drvbox policy sign --key KEY FILE)")
    try:
        doc = verify_envelope(unverified, trust)
    except SignatureError as exc:
        raise Rejected(exc.reason, exc.detail) from None
    try:
        validate_document(doc)
    except PolicyInvalid as exc:
        raise Rejected("schema-invalid", str(exc)) from None
    now = now or datetime.now(timezone.utc)
    if "expires" in doc and parse_datetime(doc["expires"]) <= now:
        raise Rejected("expired", f"expired at {doc['expires']} (fix: derive and sign it again)")
    return doc


def check_here(doc: dict, hive, entry: DriverEntry, search_path: Sequence[Path]) -> None:
    """Steps 5-7: the policy describes the driver as it is now."""
    drv = doc["driver"]
    if drv["mode"] != entry.mode:
        raise Rejected("mode-mismatch", f"policy is for a {drv['mode']}-mode driver, the registry now says {entry.mode} mode")
    key = hive.key(entry.key_path)
    digest = key.digest() if key is not None else None
    if drv["registry_sha256"] != digest:
        raise Rejected("registry-mismatch", f"registry key changed since the policy was derived "
                       f"(policy {drv['registry_sha256'][:16]}..., now {(digest or 'absent')[:16]}...); derive and sign again")
    if drv["module"]["sha256"] is None:
        raise Rejected("module-mismatch", "policy pins no module hash (the module was not found when it was derived)")
    try:
        ref = resolve_module(entry.dll, search_path)
        now_digest = module_digest(ref)
    except (ModuleNotFound, PolicyError, OSError) as exc:
        raise Rejected("module-mismatch", f"module not loadable now: {exc}") from None
    if now_digest != drv["module"]["sha256"]:
        raise Rejected("module-mismatch", f"{ref.path} changed since the policy was derived "
                       f"(policy {drv['module']['sha256'][:16]}..., now {now_digest[:16]}...)")


# --- anti-rollback state ---------------------------------------------------------------------

def _load_state(state_dir: Path) -> dict:
    path = Path(state_dir) / STATE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StateError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        state = json.loads(data)
        keys = state["keys"]
        assert state.get("version") == 1 and isinstance(keys, dict)
        for v in keys.values():
            assert type(v["serial"]) is int and isinstance(v["payload_sha256"], str)
    except (ValueError, KeyError, TypeError, AssertionError):
        # Fail closed: without it we cannot tell a rollback.  Deleting it is the operator's call.
        raise StateError(f"{path}: corrupt anti-rollback state; fix: restore it from a backup, or remove it "
                         "knowing that older signed policies then become acceptable again") from None
    return keys


def _save_state(state_dir: Path, keys: dict) -> None:
    state_dir = Path(state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / STATE_FILE
    data = json.dumps({"version": 1, "keys": keys}, sort_keys=True, indent=1).encode()
    try:
        write_atomic(path, data, 0o600)
    except OSError as exc:
        raise StateError(f"{path}: cannot write the anti-rollback state: {exc.strerror}") from None


def _payload_sha256(doc: dict) -> str:
    from policy.signing import canonical_json
    return hashlib.sha256(canonical_json(doc)).hexdigest()


def _check_serial(doc: dict, seen: dict | None) -> None:
    if seen is None:
        return
    if doc["serial"] < seen["serial"]:
        raise Rejected("rolled-back", f"serial {doc['serial']} is below {seen['serial']}, already accepted for this driver")
    if doc["serial"] == seen["serial"] and _payload_sha256(doc) != seen["payload_sha256"]:
        raise Rejected("rolled-back", f"serial {doc['serial']} was already accepted with different content; "
                       "a changed policy needs a higher serial")


# --- all of it -------------------------------------------------------------------------------

_RANK = {r: i for i, r in enumerate(REASONS)}


def accept(hive, entries: Sequence[DriverEntry], policies_dir: Path, trust_dir: Path, state_dir: Path,
           search_path: Sequence[Path], now: datetime | None = None) -> Acceptance:
    """See the module docstring.  Raises KeyFileError for an unusable trust store and StateError for
    an unreadable anti-rollback state: both are the Device Manager's configuration, not one driver's."""
    now = now or datetime.now(timezone.utc)
    trust = TrustStore.load(trust_dir)
    state = _load_state(state_dir)
    policies_dir = Path(policies_dir)
    files: dict[str, list[tuple[Path, object]]] = {}
    unmatched: list[tuple[str, str]] = []
    for path in sorted(policies_dir.glob("*.json")) if policies_dir.is_dir() else []:
        try:
            unverified = read_unverified(path)
        except Rejected as exc:
            unmatched.append((str(path), exc.detail))
            continue
        key = claimed_key(unverified)
        if key is None:
            unmatched.append((str(path), "names no driver key (not a policy, or a malformed envelope)"))
            continue
        files.setdefault(key.casefold(), []).append((path, unverified))

    result = Acceptance({}, {}, unmatched)
    changed = False
    for entry in entries:
        if entry.mode != "user":
            continue
        candidates = files.get(entry.key_path.casefold(), [])
        if not candidates:
            why = (f"no policy file in {policies_dir} names {entry.key_path}" if policies_dir.is_dir()
                   else f"policies directory {policies_dir} does not exist")
            if unmatched:
                why += f"; unreadable files there: {', '.join(f for f, _ in unmatched)}"
            result.rejected[entry.key_path] = Rejection(entry.key_path, "missing", why)
            continue
        best: tuple[dict, Path] | None = None
        worst: tuple[int, Rejection] | None = None
        seen = state.get(entry.key_path.casefold())
        for path, unverified in candidates:
            try:
                doc = check_signed(unverified, trust, now)
                check_here(doc, hive, entry, search_path)
                _check_serial(doc, seen)
            except Rejected as exc:
                rank = _RANK[exc.reason]
                if worst is None or rank > worst[0]:      # report the one that got furthest
                    worst = (rank, Rejection(entry.key_path, exc.reason, f"{path}: {exc.detail}"))
                continue
            if best is None or doc["serial"] > best[0]["serial"]:
                best = (doc, path)
        if best is None:
            result.rejected[entry.key_path] = worst[1]
            continue
        doc = best[0]
        result.accepted[entry.key_path] = Policy._from_verified(doc)
        record = {"serial": doc["serial"], "payload_sha256": _payload_sha256(doc)}
        if seen != record:
            state[entry.key_path.casefold()] = record
            changed = True
    if changed:
        _save_state(state_dir, state)
    return result
