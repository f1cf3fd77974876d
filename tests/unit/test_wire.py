"""hosts.wire: decode never fails with anything but ProtocolError, and encode/decode round-trip."""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from hosts.wire import (HEADER_SIZE, MAX_FRAME, MAX_TAIL, PROTOCOL_VERSION, STRUCTS, Frame, Op,
                        ProtocolError, _BODIES, decode, encode)

_RANGES = {"B": (0, 2**8 - 1), "H": (0, 2**16 - 1), "I": (0, 2**32 - 1), "Q": (0, 2**64 - 1),
           "i": (-2**31, 2**31 - 1), "q": (-2**63, 2**63 - 1)}
# Small random tails, and tails at the limit (built, not drawn byte by byte: drawing 60 KiB is slow).
tails = st.binary(max_size=256) | st.builds(lambda n, b: b * n, st.integers(MAX_TAIL - 2, MAX_TAIL),
                                            st.sampled_from([b"\x00", b"\xff", b"t"]))


def _decode_or_protocol_error(data):
    try:
        frame = decode(data)
    except ProtocolError as exc:
        assert exc.reason and str(exc) == exc.reason
        return None
    assert isinstance(frame, Frame)
    assert len(data) == STRUCTS[frame.op].size + len(frame.tail)
    return frame


@st.composite
def frames(draw):
    op = draw(st.sampled_from(list(Op)))
    fields = tuple(draw(st.integers(*_RANGES[c])) for c in _BODIES[op])
    req_id = draw(st.integers(0, 2**32 - 1))
    driver_id = draw(st.integers(0, 2**32 - 1))
    return op, req_id, driver_id, fields, draw(tails)


@settings(max_examples=400)
@given(st.binary(max_size=MAX_FRAME + 16))
def test_decode_random_bytes_only_protocol_error(data):
    _decode_or_protocol_error(data)


@settings(max_examples=400)
@given(op=st.integers(0, 255), version=st.sampled_from([PROTOCOL_VERSION, 0, 2, 255]),
       reserved=st.sampled_from([0, 0, 1, 0xFFFF]), tail_len=st.integers(0, 2**32 - 1),
       rest=st.binary(max_size=200))
def test_decode_plausible_headers_only_protocol_error(op, version, reserved, tail_len, rest):
    data = struct.pack("<BBHIII", version, op, reserved, 1, 2, tail_len) + rest
    frame = _decode_or_protocol_error(data)
    if frame is not None:
        assert version == PROTOCOL_VERSION and reserved == 0 and frame.op == op


@settings(max_examples=300)
@given(frames())
def test_round_trip(frame):
    op, req_id, driver_id, fields, tail = frame
    data = encode(op, req_id, driver_id, *fields, tail=tail)
    assert len(data) <= MAX_FRAME
    assert decode(data) == Frame(op, req_id, driver_id, fields, tail)
    assert decode(memoryview(data)) == Frame(op, req_id, driver_id, fields, tail)


@settings(max_examples=300)
@given(frames(), st.data())
def test_mutated_frames_only_protocol_error(frame, data):
    op, req_id, driver_id, fields, tail = frame
    raw = bytearray(encode(op, req_id, driver_id, *fields, tail=tail))
    mutation = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if mutation == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    elif mutation == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=16))
    _decode_or_protocol_error(bytes(raw))


@pytest.mark.parametrize("data, words", [
    (b"", "shorter than the 16-byte header"),
    (struct.pack("<BBHIII", 9, Op.OPEN, 0, 0, 0, 0), "protocol version 9"),
    (struct.pack("<BBHIII", PROTOCOL_VERSION, Op.OPEN, 4, 0, 0, 0), "reserved header field is 0x4"),
    (struct.pack("<BBHIII", PROTOCOL_VERSION, 200, 0, 0, 0, 0), "unknown operation 200"),
    (struct.pack("<BBHIII", PROTOCOL_VERSION, Op.LOAD, 0, 0, 0, MAX_TAIL + 1), "exceeds the limit"),
    (struct.pack("<BBHIII", PROTOCOL_VERSION, Op.OPEN, 0, 0, 0, 0), "OPEN frame is 16 bytes, expected 24"),
    (encode(Op.LOAD, 1, 1, tail=b"abc")[:-1], "LOAD frame is 18 bytes, expected 16 + tail 3"),
    (encode(Op.CLOSE, 1, 1, 5) + b"x", "CLOSE frame is 21 bytes"),
])
def test_decode_refusals_say_why(data, words):
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert words in info.value.reason


@pytest.mark.parametrize("args, tail", [
    ((Op.OPEN, 1, 1, -1, 0), b""),
    ((Op.OPEN, 1, 1, 2**32, 0), b""),
    ((Op.OPEN, 1, 1, 1), b""),          # one field missing
    ((Op.REPLY, -1, 0, 0, 0), b""),
    ((Op.LOG, 0, 0, 20), b"x" * (MAX_TAIL + 1)),
])
def test_encode_refuses_what_does_not_fit(args, tail):
    with pytest.raises(ProtocolError):
        encode(*args, tail=tail)
