"""The protocol between applications and the Device Manager, on its Unix socket.

``SOCK_SEQPACKET``, so each request and each reply is one message.  Fixed-size struct frames,
one per operation, followed by an optional tail (inline data up to ``MAX_INLINE`` bytes, a device
name, a JSON document for the few control verbs that are not on the hot path).

Large buffers do not travel through the socket: a client shares a sealed memfd once
(``SHM_ATTACH``, the fd passed with SCM_RIGHTS) and then names offsets in it; the Device Manager
copies input from it once into the host's arena and output once back.  A connection may attach
``SHM_SLOTS`` of them, each in its own slot, named in a request's flags (``shm_flags``): slot 0
is the client library's staging buffer, the others are buffers an application reads into and
writes from directly (``DeviceManager.shared_buffer``), so bulk data is not copied again there.

Request header ``<BBHII``: version, op, flags, req_id, handle.  Reply ``<BBHIiq``: version,
op (= REPLY), flags, req_id, status (0 or errno), value.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

VERSION = 1
MAX_INLINE = 60 * 1024
MAX_MESSAGE = 64 * 1024 + 64

FLAG_SHM = 1          # buffers are in the attached shared memory, at the offsets given
SHM_SLOTS = 2         # shared memories per connection (each costs the Device Manager an fd)
MAX_SHARED_BYTES = 256 * 1024 * 1024     # what one connection may share, all slots together
_SLOT_SHIFT = 4
_SLOT_MASK = 0xF << _SLOT_SHIFT
_KNOWN_FLAGS = FLAG_SHM | _SLOT_MASK


def shm_flags(slot: int) -> int:
    """The flags of a request whose buffers are in shared-memory slot ``slot``."""
    return FLAG_SHM | slot << _SLOT_SHIFT


def shm_slot(flags: int) -> int:
    """The shared-memory slot a request's flags name (SHM_ATTACH: the slot it fills)."""
    return (flags & _SLOT_MASK) >> _SLOT_SHIFT


class Op(enum.IntEnum):
    OPEN = 1          # access, share; tail: device name -> value: handle
    CLOSE = 2
    READ = 3          # length, shm_off -> value: bytes; tail: data unless FLAG_SHM
    WRITE = 4         # length, shm_off; tail: data unless FLAG_SHM -> value: bytes written
    SEEK = 5          # offset, whence -> value: position
    IOCTL = 6         # code, in_len, in_off, out_len, out_off; tail: input unless FLAG_SHM
    LIST = 7          # tail: nothing, or <Q offset to go on -> value: its length; tail: JSON of `drvbox ls` from there
    RESTART = 8       # tail: device name
    SHM_ATTACH = 9    # size; SCM_RIGHTS: a memfd sealed against shrinking; the slot in flags
    HW = 10           # tail: JSON command for the simulated hardware -> tail: JSON answer
    REPLY = 64


# A listing longer than one reply comes in pieces: the first LIST (no tail) takes a snapshot and
# answers with its length and first piece, each further LIST names the offset to go on from.
LIST_OFFSET = struct.Struct("<Q")

_HEADER = "<BBHII"
BODIES = {
    Op.OPEN: "II",
    Op.CLOSE: "",
    Op.READ: "IQ",
    Op.WRITE: "IQ",
    Op.SEEK: "qI",
    Op.IOCTL: "IIQIQ",
    Op.LIST: "",
    Op.RESTART: "",
    Op.SHM_ATTACH: "Q",
    Op.HW: "",
}
REQUESTS = {int(op): struct.Struct(_HEADER + body) for op, body in BODIES.items()}
REPLY = struct.Struct("<BBHIiq")
_HEAD = struct.Struct(_HEADER)
_HEAD_SIZE = _HEAD.size


class ClientProtocolError(Exception):
    """A malformed message from a client (answered with EINVAL) or from the server."""


class Request(NamedTuple):
    op: Op
    flags: int
    req_id: int
    handle: int
    fields: tuple
    tail: bytes


# Per operation number: the Op (cheaper than Op(value)) and its layout, in one lookup.
_DECODERS: dict[int, tuple[Op, struct.Struct]] = {int(op): (op, REQUESTS[int(op)]) for op in BODIES}
_new = tuple.__new__


def encode_request(op: Op, req_id: int, handle: int, *fields, flags: int = 0, tail: bytes = b"") -> bytes:
    if len(tail) > MAX_INLINE:
        raise ClientProtocolError(f"inline data of {len(tail)} bytes exceeds {MAX_INLINE}")
    return REQUESTS[op].pack(VERSION, op, flags, req_id, handle, *fields) + tail


def decode_request(buf: bytes) -> Request:
    n = len(buf)
    if n < _HEAD_SIZE:
        raise ClientProtocolError(f"request of {n} bytes is shorter than its header")
    if buf[0] != VERSION:
        raise ClientProtocolError(f"client protocol version {buf[0]}, this Device Manager speaks {VERSION}")
    known = _DECODERS.get(buf[1])
    if known is None:
        raise ClientProtocolError(f"unknown operation {buf[1]}")
    op, layout = known
    values = layout.unpack_from(buf) if n >= layout.size else None
    flags = buf[2] | buf[3] << 8
    if flags & ~_KNOWN_FLAGS:
        raise ClientProtocolError(f"unknown flags {flags:#x}")
    if flags & _SLOT_MASK and shm_slot(flags) >= SHM_SLOTS:
        raise ClientProtocolError(f"shared-memory slot {shm_slot(flags)}: a connection has slots 0..{SHM_SLOTS - 1}")
    if values is None:
        raise ClientProtocolError(f"{op.name} request of {n} bytes, expected at least {layout.size}")
    if n - layout.size > MAX_INLINE:
        raise ClientProtocolError("inline data too large")
    # tuple.__new__ rather than Request(...): the NamedTuple's own __new__ is a Python function.
    return _new(Request, (op, flags, values[3], values[4], values[5:], bytes(buf[layout.size:])))


_REPLY_OP = int(Op.REPLY)


def encode_reply(req_id: int, status: int, value: int = 0, tail=b"") -> bytes:
    """``tail``: bytes or any buffer (a view of the output, sent without copying it first)."""
    return REPLY.pack(VERSION, _REPLY_OP, 0, req_id, status, value) + tail


def decode_reply(buf: bytes) -> tuple[int, int, int, bytes]:
    if len(buf) < REPLY.size:
        raise ClientProtocolError(f"reply of {len(buf)} bytes is shorter than its header")
    version, op, _flags, req_id, status, value = REPLY.unpack_from(buf)
    if version != VERSION or op != Op.REPLY:
        raise ClientProtocolError(f"not a reply (version {version}, op {op})")
    return req_id, status, value, bytes(buf[REPLY.size:])
