"""policy.signing: keys, canonical JSON, envelopes, and each way an envelope fails to verify."""

from __future__ import annotations

import base64
import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policy.errors import KeyFileError, PolicyError, SignatureError
from policy.signing import (CONTEXT, TrustStore, canonical_json, decode_payload, generate_key, key_id,
                            load_private_key, sign, verify_envelope)

DOC = {"serial": 7, "name": "Grüße", "list": [3, 1, 2], "nested": {"b": True, "a": None}}


@pytest.fixture
def keys(tmp_path):
    key_path, pub_path = generate_key("rel", tmp_path / "keys")
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "rel.pub").write_bytes(pub_path.read_bytes())
    return load_private_key(key_path), TrustStore.load(trust)


def _reason(envelope, trust) -> str:
    with pytest.raises(SignatureError) as info:
        verify_envelope(envelope, trust)
    return info.value.reason


# --- keys ------------------------------------------------------------------------------------

def test_generate_key_private_file_is_0600_and_public_is_pem(tmp_path):
    key_path, pub_path = generate_key("k", tmp_path)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert pub_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert key_id(load_private_key(key_path)) == key_id(serialization.load_pem_public_key(pub_path.read_bytes()))


def test_generate_key_private_file_is_0600_even_with_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        key_path, _ = generate_key("k", tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600


def test_generate_key_refuses_to_overwrite(tmp_path):
    generate_key("k", tmp_path)
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key("k", tmp_path)


def test_generate_key_refuses_path_like_names(tmp_path):
    for bad in ("../x", "a/b", "", ".hidden", "-x"):
        with pytest.raises(KeyFileError, match="not usable as a file name"):
            generate_key(bad, tmp_path)


def test_load_private_key_refuses_group_readable_file_and_says_chmod(tmp_path):
    key_path, _ = generate_key("k", tmp_path)
    os.chmod(key_path, 0o640)
    with pytest.raises(KeyFileError, match=r"chmod 600 .*k\.key"):
        load_private_key(key_path)


def test_load_private_key_refuses_non_ed25519_and_missing(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    other = ec.generate_private_key(ec.SECP256R1())
    p = tmp_path / "ec.key"
    p.write_bytes(other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    os.chmod(p, 0o600)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        load_private_key(p)
    with pytest.raises(KeyFileError, match="drvbox keys new"):
        load_private_key(tmp_path / "absent.key")


def test_key_id_is_sha256_of_raw_public_key():
    k = Ed25519PrivateKey.generate()
    raw = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(k.public_key()) == hashlib.sha256(raw).hexdigest() == key_id(k)


# --- canonical JSON --------------------------------------------------------------------------

def test_canonical_json_is_sorted_compact_utf8():
    assert canonical_json(DOC) == ('{"list":[3,1,2],"name":"Grüße","nested":{"a":null,"b":true},"serial":7}').encode()


def test_canonical_json_refuses_floats():
    with pytest.raises(PolicyError, match=r"\$\.a\[0\].*floats"):
        canonical_json({"a": [1.5]})


# --- envelopes -------------------------------------------------------------------------------

def test_sign_then_verify_returns_the_document(keys):
    key, trust = keys
    env = sign(DOC, key)
    assert set(env) == {"payload", "signatures"}
    assert env["signatures"][0]["keyid"] == key_id(key)
    assert verify_envelope(env, trust) == DOC


def test_signature_is_over_context_and_payload(keys):
    key, _ = keys
    env = sign(DOC, key)
    sig = base64.b64decode(env["signatures"][0]["sig"])
    key.public_key().verify(sig, CONTEXT + canonical_json(DOC))    # raises if not


def test_envelope_matches_its_schema(keys):
    from jsonschema import Draft202012Validator
    import schemas
    env = sign(DOC, keys[0])
    Draft202012Validator(schemas.load("signed-policy.schema.json")).validate(env)


def test_second_signature_is_added_and_both_verify(keys, tmp_path):
    key, _ = keys
    other_key_path, other_pub = generate_key("other", tmp_path / "k2")
    other = load_private_key(other_key_path)
    env = sign(DOC, other, sign(DOC, key))
    assert {s["keyid"] for s in env["signatures"]} == {key_id(key), key_id(other)}
    (tmp_path / "trust" / "other.pub").write_bytes(other_pub.read_bytes())
    both = TrustStore.load(tmp_path / "trust")
    assert len(both.keys) == 2
    assert verify_envelope(env, both) == DOC


def test_signing_again_with_the_same_key_replaces_its_signature(keys):
    key, trust = keys
    env = sign(DOC, key, sign(DOC, key))
    assert len(env["signatures"]) == 1


def test_sign_refuses_an_envelope_carrying_another_document(keys):
    key, _ = keys
    with pytest.raises(PolicyError, match="different document"):
        sign({"serial": 8}, key, sign(DOC, key))


def test_untrusted_cosignature_is_ignored_when_a_trusted_one_holds(keys):
    key, trust = keys
    stranger = Ed25519PrivateKey.generate()
    assert verify_envelope(sign(DOC, stranger, sign(DOC, key)), trust) == DOC


# --- each failure, its own reason ------------------------------------------------------------

def test_flipped_payload_bit_is_bad_signature(keys):
    key, trust = keys
    env = sign(DOC, key)
    payload = bytearray(base64.b64decode(env["payload"]))
    i = payload.index(b"7")
    payload[i] ^= 0x01                     # '7' -> '6': still canonical JSON, different serial
    env["payload"] = base64.b64encode(bytes(payload)).decode()
    assert decode_payload(env)[1]["serial"] == 6
    assert _reason(env, trust) == "bad-signature"


def test_flipped_signature_bit_is_bad_signature(keys):
    key, trust = keys
    env = sign(DOC, key)
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[10] ^= 0x80
    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    assert _reason(env, trust) == "bad-signature"


def test_swapped_payloads_between_envelopes_are_bad_signature(keys):
    key, trust = keys
    a, b = sign(DOC, key), sign({**DOC, "serial": 8}, key)
    a["payload"], b["payload"] = b["payload"], a["payload"]
    assert _reason(a, trust) == "bad-signature"
    assert _reason(b, trust) == "bad-signature"


def test_bad_signature_from_a_trusted_key_fails_even_beside_a_good_one(keys, tmp_path):
    key, trust = keys
    env = sign(DOC, key)
    forged = dict(env["signatures"][0])
    forged["sig"] = base64.b64encode(bytes(64)).decode()
    env["signatures"].append(forged)
    assert _reason(env, trust) == "bad-signature"


def test_resigned_with_untrusted_key_is_unknown_key(keys):
    _, trust = keys
    env = sign(DOC, Ed25519PrivateKey.generate())
    assert _reason(env, trust) == "unknown-key"


def test_no_signatures_is_unsigned(keys):
    key, trust = keys
    env = sign(DOC, key)
    env["signatures"] = []
    assert _reason(env, trust) == "unsigned"


@pytest.mark.parametrize("mangle", [
    lambda e: e.pop("payload"),
    lambda e: e.update(payload="not base64!"),
    lambda e: e.update(payload=base64.b64encode(b"[1,2]").decode()),
    lambda e: e.update(payload=base64.b64encode(b'{"a": 1}').decode()),           # not canonical
    lambda e: e.update(payload=base64.b64encode(b'{"a":1,"a":2}').decode()),      # duplicate key
    lambda e: e.update(payload=base64.b64encode(b'{"a":1.5}').decode()),          # float
    lambda e: e.update(extra=1),
    lambda e: e.update(signatures="x"),
    lambda e: e["signatures"][0].update(sig="AAAA"),
    lambda e: e["signatures"][0].update(keyid="XYZ"),
    lambda e: e["signatures"][0].update(sig=5),
    lambda e: e["signatures"].append("x"),
])
def test_malformed_envelopes_are_malformed(keys, mangle):
    key, trust = keys
    env = sign(DOC, key)
    mangle(env)
    assert _reason(env, trust) == "malformed"


def test_non_dict_envelope_is_malformed(keys):
    assert _reason([1], keys[1]) == "malformed"


def test_trust_store_missing_directory_says_how_to_fix(tmp_path):
    with pytest.raises(KeyFileError, match="trust store directory not found"):
        TrustStore.load(tmp_path / "nope")


def test_trust_store_refuses_non_key_file(tmp_path):
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(KeyFileError, match=r"junk\.pub: not a PEM public key"):
        TrustStore.load(tmp_path)


# --- property: any JSON document (no floats) survives sign -> verify unchanged ---------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)

_PROP_KEY = Ed25519PrivateKey.generate()
_PROP_TRUST = TrustStore({key_id(_PROP_KEY): _PROP_KEY.public_key()})


@settings(max_examples=60)
@given(st.dictionaries(st.text(max_size=8), _json, max_size=5))
def test_sign_verify_roundtrip_property(doc):
    try:
        canonical_json(doc)
    except PolicyError:            # lone surrogates cannot be UTF-8
        return
    assert verify_envelope(sign(doc, _PROP_KEY), _PROP_TRUST) == doc


def test_deeply_nested_payload_is_malformed_not_a_crash(keys):
    _, trust = keys
    deep = b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
    env = {"payload": base64.b64encode(deep).decode(), "signatures": []}
    assert _reason(env, trust) == "malformed"


def test_key_files_leave_no_open_descriptors_on_success_or_failure(tmp_path):
    before = sorted(os.listdir("/proc/self/fd"))
    key_path, _ = generate_key("k", tmp_path)
    load_private_key(key_path)
    with pytest.raises(KeyFileError):
        generate_key("k", tmp_path)
    os.chmod(key_path, 0o644)
    with pytest.raises(KeyFileError):
        load_private_key(key_path)
    assert sorted(os.listdir("/proc/self/fd")) == before
