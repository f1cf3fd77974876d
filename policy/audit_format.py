"""The bytes of the audit log: one record, its hash, the signed statements about it.

Everything that decides what a record looks like on disk lives here, so the writer
(``policy.audit``) and the checker (``policy.audit_verify``) cannot disagree about it.

A record is one line: the canonical JSON of an object with exactly the keys of ``RECORD_KEYS``
(sorted keys, no spaces, ASCII only, no NaN), then ``\\n``.  Canonical form matters: ``hash`` is
the SHA-256 of the canonical JSON of the record *without* ``hash``, and the checker also demands
that each line is byte for byte the canonical form of what it parses to -- otherwise a one-byte
edit that JSON does not see (a space, a key order, ``\\u0041`` for ``A``) would pass.

Signed statements (Ed25519) come in two kinds, with distinct prefixes so that one can never be
replayed as the other:

* a checkpoint, written into the log as an ``audit.checkpoint`` record, signs the seq and hash
  of the record just before it;
* the head (``audit.head`` next to the log) signs the seq and hash of the last record that was
  fsync'd.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import re
from pathlib import PurePath
from typing import Any, Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

RECORD_KEYS = frozenset({"seq", "time", "event", "device", "driver", "group", "pid", "detail", "prev", "hash"})
GENESIS_PREV = "0" * 64          # the ``prev`` of seq 1: nothing came before it
FIRST_SEQ = 1

# A record longer than this is not written as is: its detail is replaced by a digest of itself
# (see ``bound_detail``), so one hostile host cannot make a line the tail reader cannot find.
MAX_RECORD_BYTES = 16 * 1024

# Events the log writes itself; callers cannot (``policy.audit.AuditLog.record`` refuses the
# prefix), so a record that claims to be one was written by the log or by someone forging it.
CHECKPOINT_EVENT = "audit.checkpoint"
RECOVERED_EVENT = "audit.recovered"
RESERVED_PREFIX = "audit."

# fsync'd and signed (in the head) before ``record`` returns: losing one of these to a power cut
# would hide an attack, and ``verify`` may therefore insist that a signature covers each of them.
URGENT_EVENTS = frozenset({"host.crashed", "driver.quarantined", "driver.failed", "policy.rejected", RECOVERED_EVENT})
URGENT_SUFFIXES = (".denied", ".violation")

EVENT_RE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")

_CHECKPOINT_DOMAIN = b"drvbox audit checkpoint v1\n"
_HEAD_DOMAIN = b"drvbox audit head v1\n"


class AuditError(Exception):
    """The log, or a record for it, is not what it must be.

    ``seq`` is the record concerned (None when there is none), ``reason`` what is wrong; the
    message names the file and line where there is one.
    """

    def __init__(self, reason: str, *, seq: int | None = None, path: PurePath | None = None,
                 line: int | None = None):
        where = f"{path}" if path is not None else "audit log"
        if line is not None:
            where += f":{line}"
        if seq is not None:
            where += f" (seq {seq})"
        super().__init__(f"{where}: {reason}")
        self.seq = seq
        self.reason = reason
        self.path = path
        self.line = line


# -- canonical JSON and the chain ---------------------------------------------------------------

def _json_default(value: Any) -> Any:
    # The few non-JSON types a caller is likely to put in a detail, turned into something a
    # reader of the log understands.  Anything else is a bug in the caller and says so.
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    raise TypeError(f"audit detail value {value!r} of type {type(value).__name__} is not JSON; "
                    f"pass str, int, float, bool, None, bytes, list or dict")


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The one serialisation of ``obj`` the log uses (no trailing newline)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False, default=_json_default).encode("ascii")


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``record`` without its ``hash`` key."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def seal(record: dict[str, Any]) -> bytes:
    """Set ``record["hash"]`` and return the record's line, newline included."""
    record["hash"] = record_hash(record)
    return canonical(record) + b"\n"


def is_urgent(event: str) -> bool:
    return event in URGENT_EVENTS or event.endswith(URGENT_SUFFIXES)


def is_hash(value: Any) -> bool:
    return isinstance(value, str) and _HEX64_RE.fullmatch(value) is not None


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_shape(record: Any) -> str | None:
    """Why ``record`` (parsed from a line) is not a well-formed record, or None if it is."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    keys = set(record)
    if keys != RECORD_KEYS:
        missing, extra = sorted(RECORD_KEYS - keys), sorted(keys - RECORD_KEYS)
        return "wrong keys:" + (f" missing {missing}" if missing else "") + (f" unexpected {extra}" if extra else "")
    if not is_int(record["seq"]) or record["seq"] < FIRST_SEQ:
        return f"seq {record['seq']!r} is not a positive integer"
    if not isinstance(record["event"], str) or not EVENT_RE.fullmatch(record["event"]):
        return f"event {record['event']!r} is not a dotted lowercase name"
    if not isinstance(record["time"], str):
        return "time is not a string"
    for key in ("device", "driver"):
        if record[key] is not None and not isinstance(record[key], str):
            return f"{key} {record[key]!r} is neither a string nor null"
    for key in ("group", "pid"):
        if record[key] is not None and not is_int(record[key]):
            return f"{key} {record[key]!r} is neither an integer nor null"
    if not isinstance(record["detail"], dict):
        return "detail is not an object"
    if not is_hash(record["prev"]) or not is_hash(record["hash"]):
        return "prev or hash is not 64 lowercase hex digits"
    return None


# -- keys and signatures ------------------------------------------------------------------------

def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """SHA-256 (hex) of the raw 32-byte public key: the same id ``policy.signing`` gives a key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def checkpoint_message(seq: int, digest: str) -> bytes:
    return _CHECKPOINT_DOMAIN + f"{seq}:{digest}".encode("ascii")


def head_message(seq: int, digest: str) -> bytes:
    return _HEAD_DOMAIN + f"{seq}:{digest}".encode("ascii")


def sign(key: Ed25519PrivateKey, message: bytes) -> dict[str, str]:
    return {"keyid": key_id(key), "sig": base64.b64encode(key.sign(message)).decode("ascii")}


def check_signature(keys: Mapping[str, Ed25519PublicKey], keyid: Any, sig: Any, message: bytes) -> str | None:
    """Why the signature does not hold, or None when it does (the key must be one of ``keys``)."""
    if not isinstance(keyid, str) or not isinstance(sig, str):
        return "keyid or sig missing"
    public = keys.get(keyid)
    if public is None:
        return f"signed by key {keyid}, which is not among the trusted keys ({', '.join(sorted(keys)) or 'none'})"
    try:
        raw = base64.b64decode(sig, validate=True)
        public.verify(raw, message)
    except (binascii.Error, ValueError):
        return "signature is not valid base64"
    except InvalidSignature:
        return f"signature by key {keyid} does not verify (forged or altered)"
    return None


def keys_by_id(public_keys: Sequence[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    return {key_id(k): k for k in public_keys}


def head_path(log_path: PurePath) -> PurePath:
    """``audit.log`` -> ``audit.head``; ``x`` -> ``x.head``."""
    return log_path.with_suffix(".head")
