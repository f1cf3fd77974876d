"""The client protocol's parser: anything a client sends is either a Request or a ClientProtocolError."""

import struct

import pytest
from hypothesis import given, strategies as st

from reflector import clientwire as cw


@given(st.binary(max_size=200))
def test_decode_request_rejects_garbage_with_its_own_error(data):
    try:
        req = cw.decode_request(data)
    except cw.ClientProtocolError:
        return
    assert isinstance(req.op, cw.Op)


@given(st.sampled_from([op for op in cw.Op if op != cw.Op.REPLY]), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1), st.binary(max_size=64))
def test_round_trip(op, req_id, handle, tail):
    layout = cw.REQUESTS[op]
    nfields = len(layout.unpack(bytes(layout.size))) - 5
    fields = tuple(range(nfields))
    req = cw.decode_request(cw.encode_request(op, req_id, handle, *fields, tail=tail))
    assert (req.op, req.req_id, req.handle, req.fields, req.tail) == (op, req_id, handle, fields, tail)


def test_unknown_version_is_named():
    msg = bytearray(cw.encode_request(cw.Op.LIST, 1, 0))
    msg[0] = 9
    with pytest.raises(cw.ClientProtocolError, match="version 9"):
        cw.decode_request(bytes(msg))


def test_unknown_flags_are_refused():
    with pytest.raises(cw.ClientProtocolError, match="unknown flags 0x4"):
        cw.decode_request(cw.encode_request(cw.Op.CLOSE, 1, 1, flags=4))


def test_shared_memory_slot_travels_in_the_flags_and_is_bounded():
    for slot in range(cw.SHM_SLOTS):
        req = cw.decode_request(cw.encode_request(cw.Op.READ, 1, 2, 10, 0, flags=cw.shm_flags(slot)))
        assert req.flags & cw.FLAG_SHM and cw.shm_slot(req.flags) == slot
    with pytest.raises(cw.ClientProtocolError, match="slots 0..1"):
        cw.decode_request(cw.encode_request(cw.Op.READ, 1, 2, 10, 0, flags=cw.shm_flags(cw.SHM_SLOTS)))


def test_short_body_is_refused():
    msg = cw.encode_request(cw.Op.IOCTL, 1, 1, 1, 2, 3, 4, 5)[:-3]
    with pytest.raises(cw.ClientProtocolError, match="IOCTL request"):
        cw.decode_request(msg)


def test_reply_round_trip():
    assert cw.decode_reply(cw.encode_reply(7, 13, -1, b"why")) == (7, 13, -1, b"why")
    with pytest.raises(cw.ClientProtocolError):
        cw.decode_reply(struct.pack("<BB", 1, 64))
