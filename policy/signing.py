"""Ed25519 keys, canonical JSON and signed envelopes (DESIGN.md section 3).

An envelope is ``{"payload": base64(canonical JSON), "signatures": [{"keyid", "sig"}, ...]}``.
What is signed is not the bare payload but ``CONTEXT + payload``, so that a signature made for a
drvbox policy can never be replayed as a signature over anything else made with the same key
(an audit checkpoint, say).

Verification raises :class:`SignatureError` and never returns False; what it returns is the
payload document, and only then.  The input is called ``unverified_envelope`` until then.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from policy.errors import KeyFileError, PolicyError, SignatureError

__all__ = ["CONTEXT", "generate_key", "load_private_key", "load_public_key", "key_id", "canonical_json",
           "sign", "TrustStore", "verify_envelope", "decode_payload", "envelope_key_ids"]

# Domain separation: the bytes actually signed are CONTEXT + canonical payload.
CONTEXT = b"drvbox.policy.v1\n"

_KEY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")
_KEYID = re.compile(r"[0-9a-f]{64}\Z")


# ---------------------------------------------------------------------------------------------
# keys

def generate_key(name: str, out_dir: Path) -> tuple[Path, Path]:
    """Create ``out_dir/NAME.key`` (PKCS#8 PEM, mode 0600) and ``out_dir/NAME.pub`` (PEM).

    The private key file is created with ``O_EXCL`` and mode 0600 in the same ``open``, so it is
    never, even for an instant, readable by anyone else; an existing file is never overwritten.
    """
    if not isinstance(name, str) or not _KEY_NAME.match(name):
        raise KeyFileError(f"key name {name!r} is not usable as a file name: use letters, digits, "
                           "'_', '.', '-' (not starting with '.' or '-'), at most 64 characters")
    out_dir = Path(out_dir)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for p in (key_path, pub_path):
        if os.path.lexists(p):
            raise KeyFileError(f"{p} already exists; refusing to overwrite a key "
                               "(fix: choose another NAME or --out DIR, or remove the old pair)")
    private = Ed25519PrivateKey.generate()
    key_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    pub_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(key_path, key_pem, 0o600)
    try:
        _write_new(pub_path, pub_pem, 0o644)
    except BaseException:
        os.unlink(key_path)     # no half pair left behind
        raise
    return key_path, pub_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def load_private_key(path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key, refusing a file that group or others may read or write."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file (fix: create one with `drvbox keys new NAME`)") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot open the key file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)        # the file we opened, not whatever the name points to now
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(f"{path}: private key is accessible by group or others "
                               f"(mode {stat.S_IMODE(st.st_mode):04o}); fix: chmod 600 {path}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
    finally:
        os.close(fd)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc}); "
                           "fix: use a key made by `drvbox keys new`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}, not an Ed25519 key; drvbox signs with Ed25519 only")
    return key


def load_public_key(path) -> Ed25519PublicKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the public key: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def key_id(public_key) -> str:
    """SHA-256 (hex) of the raw 32-byte public key; a private key is taken by its public half."""
    if isinstance(public_key, Ed25519PrivateKey):
        public_key = public_key.public_key()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------------------------------------
# canonical JSON

def _check_canonicalisable(obj, where: str = "$") -> None:
    # Floats have no single canonical text; bool is fine (json writes true/false).
    if isinstance(obj, float):
        raise PolicyError(f"{where}: floats are not allowed in a signed document (value {obj!r}); use an integer")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise PolicyError(f"{where}: object key {k!r} is not a string")
            _check_canonicalisable(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_canonicalisable(v, f"{where}[{i}]")
    elif not (obj is None or isinstance(obj, (str, int))):
        raise PolicyError(f"{where}: a {type(obj).__name__} cannot be written as JSON")


def canonical_json(doc) -> bytes:
    """The one byte string for ``doc``: sorted keys, no blanks, UTF-8, no floats."""
    _check_canonicalisable(doc)
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PolicyError(f"document holds a string that is not valid Unicode ({exc.reason})") from None


def _strict_pairs(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


def _no_float(text):
    raise ValueError(f"float {text} not allowed")


def _no_constant(text):
    raise ValueError(f"{text} not allowed")


def decode_payload(unverified_envelope) -> tuple[bytes, dict]:
    """Structural decoding of an envelope's payload, without any trust: (payload bytes, document).

    Raises SignatureError("malformed") unless the payload is base64 of canonical JSON of an object.
    Used to find which driver an envelope claims to be for before verifying it; nothing read
    here may be acted on until :func:`verify_envelope` has returned it.
    """
    if not isinstance(unverified_envelope, dict):
        raise SignatureError("malformed", "an envelope is a JSON object with 'payload' and 'signatures'")
    extra = set(unverified_envelope) - {"payload", "signatures"}
    if extra:
        raise SignatureError("malformed", f"unexpected envelope field(s) {sorted(extra)}")
    b64 = unverified_envelope.get("payload")
    if not isinstance(b64, str):
        raise SignatureError("malformed", "'payload' is missing or not a string")
    try:
        payload = base64.b64decode(b64.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise SignatureError("malformed", "'payload' is not valid base64") from None
    try:
        doc = json.loads(payload.decode("utf-8"), object_pairs_hook=_strict_pairs,
                         parse_float=_no_float, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SignatureError("malformed", f"payload is not JSON as drvbox writes it: {exc}") from None
    except RecursionError:
        raise SignatureError("malformed", "payload is nested too deeply") from None
    if not isinstance(doc, dict):
        raise SignatureError("malformed", "payload is not a JSON object")
    if canonical_json(doc) != payload:
        # One document, one byte string: otherwise two envelopes could carry "the same" policy
        # with different signed bytes, and a parser difference could be exploited.
        raise SignatureError("malformed", "payload is not in canonical form (sorted keys, no blanks, UTF-8)")
    return payload, doc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sign(document: dict, key: Ed25519PrivateKey, envelope: dict | None = None) -> dict:
    """Sign ``document``; with ``envelope``, add (or replace) this key's signature in it.

    The envelope must carry exactly ``document``; a new envelope dict is returned.
    """
    payload = canonical_json(document)
    signatures: list[dict] = []
    if envelope is not None:
        existing, _ = decode_payload(envelope)
        if existing != payload:
            raise PolicyError("the envelope carries a different document than the one being signed")
        sigs = envelope.get("signatures")
        if not isinstance(sigs, list):
            raise SignatureError("malformed", "'signatures' is not a list")
        signatures = [dict(s) for s in sigs if isinstance(s, dict)]
    kid = key_id(key)
    signatures = [s for s in signatures if s.get("keyid") != kid]
    signatures.append({"keyid": kid, "sig": _b64(key.sign(CONTEXT + payload))})
    return {"payload": _b64(payload), "signatures": signatures}


def envelope_key_ids(unverified_envelope) -> list[str]:
    """The key ids an envelope claims to be signed by (unverified; for display)."""
    sigs = unverified_envelope.get("signatures") if isinstance(unverified_envelope, dict) else None
    if not isinstance(sigs, list):
        return []
    return [s["keyid"] for s in sigs if isinstance(s, dict) and isinstance(s.get("keyid"), str)]


# ---------------------------------------------------------------------------------------------
# trust store and verification

class TrustStore:
    """The public keys the Device Manager trusts: every ``*.pub`` (PEM) in one directory."""

    def __init__(self, keys: dict[str, Ed25519PublicKey], files: dict[str, Path] | None = None) -> None:
        self.keys = dict(keys)
        self.files = dict(files or {})

    @classmethod
    def load(cls, directory) -> "TrustStore":
        directory = Path(directory)
        if not directory.is_dir():
            raise KeyFileError(f"{directory}: trust store directory not found "
                               "(fix: create it and copy the signers' NAME.pub files into it)")
        keys, files = {}, {}
        for path in sorted(directory.glob("*.pub")):
            pub = load_public_key(path)
            kid = key_id(pub)
            keys[kid], files[kid] = pub, path
        return cls(keys, files)


def verify_envelope(unverified_envelope: dict, trust: TrustStore) -> dict:
    """Return the payload document if the envelope is signed by a trusted key; raise otherwise.

    Rules: at least one signature by a key in ``trust``; every signature by a trusted key must
    verify (a trusted key's signature that fails means tampering, even if another one holds);
    signatures by keys we do not know are ignored (someone else's co-signature).
    """
    payload, doc = decode_payload(unverified_envelope)
    sigs = unverified_envelope.get("signatures")
    if not isinstance(sigs, list):
        raise SignatureError("malformed", "'signatures' is missing or not a list")
    if not sigs:
        raise SignatureError("unsigned", "the envelope carries no signature (fix: drvbox policy sign --key KEY FILE)")
    trusted_ok = []
    for i, s in enumerate(sigs):
        if not isinstance(s, dict) or set(s) != {"keyid", "sig"}:
            raise SignatureError("malformed", f"signatures[{i}] must be an object with exactly 'keyid' and 'sig'")
        kid, sig64 = s["keyid"], s["sig"]
        if not isinstance(kid, str) or not _KEYID.match(kid):
            raise SignatureError("malformed", f"signatures[{i}].keyid is not 64 lowercase hex digits")
        if not isinstance(sig64, str):
            raise SignatureError("malformed", f"signatures[{i}].sig is not a string")
        try:
            sig = base64.b64decode(sig64.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise SignatureError("malformed", f"signatures[{i}].sig is not valid base64") from None
        if len(sig) != 64:
            raise SignatureError("malformed", f"signatures[{i}].sig is {len(sig)} bytes, an Ed25519 signature is 64")
        pub = trust.keys.get(kid)
        if pub is None:
            continue
        try:
            pub.verify(sig, CONTEXT + payload)
        except InvalidSignature:
            raise SignatureError("bad-signature", f"signature by trusted key {kid[:16]}... does not match "
                                 "the payload (the policy or the signature was changed after signing)") from None
        trusted_ok.append(kid)
    if not trusted_ok:
        ids = ", ".join(k[:16] + "..." for k in envelope_key_ids(unverified_envelope))
        raise SignatureError("unknown-key", f"signed only by key(s) not in the trust store: {ids} "
                             "(fix: add the signer's NAME.pub to the trust directory, or re-sign)")
    return doc
