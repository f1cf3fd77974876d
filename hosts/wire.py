"""The wire protocol between the Reflector and a host.

Both ends import this module, so it imports nothing but ``struct`` and ``enum``: it runs next to
untrusted drivers.  The channel is a ``SOCK_SEQPACKET`` socketpair, so the kernel keeps message
boundaries and one ``recvmsg`` returns one whole frame or nothing.

Every frame is one fixed-size struct per operation (a 16-byte header, then the operation's
body), optionally followed by a *tail* of exactly ``tail_len`` bytes (a module path, a log line,
the JSON of a LOAD).  Bulk data never travels here: it lives in the shared-memory arena and the
frames carry offsets and lengths into it.

Header, little-endian::

    u8  version      PROTOCOL_VERSION
    u8  op           an Op
    u16 reserved     must be 0
    u32 req_id       chosen by the sender of a request, echoed in its reply
    u32 driver_id    which driver of the host (assigned by the Reflector at LOAD)
    u32 tail_len     bytes after the body

``decode`` is the only parser.  Anything it does not like -- short frame, unknown version or
operation, reserved bits set, a tail longer or shorter than declared, a tail over the limit --
raises ``ProtocolError`` with a reason, never ``struct.error`` or ``IndexError``.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

PROTOCOL_VERSION = 1
MAX_TAIL = 60 * 1024
HEADER = "<BBHIII"
HEADER_SIZE = struct.calcsize(HEADER)
MAX_FRAME = HEADER_SIZE + 64 + MAX_TAIL


class ProtocolError(Exception):
    """A frame that does not follow this protocol.  ``reason`` says which rule it broke."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Op(enum.IntEnum):
    # Reflector -> host: requests, each answered by one REPLY with the same req_id.
    LOAD = 1          # tail: JSON {"name", "key", "module", "registry"}; reply value 0
    UNLOAD = 2        # pre_deinit + deinit of one driver
    OPEN = 3          # access, share -> reply value: open_id
    CLOSE = 4         # open_id
    READ = 5          # open_id, out_off, out_len -> reply value: bytes produced
    WRITE = 6         # open_id, in_off, in_len -> reply value: bytes consumed
    SEEK = 7          # open_id, offset, whence -> reply value: new position
    IOCTL = 8         # open_id, code, in_off, in_len, out_off, out_len -> bytes returned
    PRE_CLOSE = 9     # open_id
    POWER = 10        # state: 0 power_down, 1 power_up
    SHUTDOWN = 11     # no body: deinit every driver and exit 0
    KREPLY = 12       # answer to a KCALL: status, value; tail and SCM_RIGHTS fds per KernelOp
    LANE = 13         # SCM_RIGHTS: one SOCK_SEQPACKET socket on which driver requests come, each
                      # answered there; reply (here) 0, or EMFILE when the host has no fd for it

    # Host -> Reflector.
    READY = 32        # once, after confinement: pid inside the host's pid namespace
    REPLY = 33        # status (0 or an errno), value
    KCALL = 34        # kop, a0, a1, a2; tail per KernelOp.  Answered by KREPLY.
    LOG = 35          # level; tail: the message (UTF-8)


class KernelOp(enum.IntEnum):
    """The closed set of privileged operations a driver may ask the Reflector for (ctx.kernel)."""

    MAP_IO_SPACE = 1     # a0 phys, a1 length -> value: region handle; tail JSON {"mode"}; fd if mapped
    UNMAP_IO_SPACE = 2   # a0 region handle
    READ_REGISTER = 3    # a0 region handle, a1 offset, a2 width -> value
    WRITE_REGISTER = 4   # a0 region handle, a1 offset, a2 (width << 32 | value)
    READ_PORT = 5        # a0 port, a1 width -> value
    WRITE_PORT = 6       # a0 port, a1 value, a2 width
    INTERRUPT = 7        # a0 irq -> value: handle; fd: an eventfd the Reflector signals
    INTERRUPT_DONE = 8   # a0 interrupt handle
    INTERRUPT_CLOSE = 9  # a0 interrupt handle
    ALLOC_DMA = 10       # a0 size -> value: buffer handle; tail JSON {"phys"}; fd: memfd
    FREE_DMA = 11        # a0 buffer handle
    OPEN_DEVICE = 12     # a0 mode (os.O_* flags); tail: path -> fd
    LOG = 13             # a0 level; tail: message


# What may travel on a lane (Op.LANE): the drivers' own calls, nothing that loads, unloads or ends.
LANE_OPS = frozenset({Op.OPEN, Op.CLOSE, Op.READ, Op.WRITE, Op.SEEK, Op.IOCTL, Op.PRE_CLOSE, Op.POWER})

# One struct per operation: header then body, packed and unpacked in one call.
_BODIES: dict[Op, str] = {
    Op.LOAD: "",
    Op.UNLOAD: "",
    Op.OPEN: "II",
    Op.CLOSE: "I",
    Op.READ: "IQI",
    Op.WRITE: "IQI",
    Op.SEEK: "IqI",
    Op.IOCTL: "IIQIQI",
    Op.PRE_CLOSE: "I",
    Op.POWER: "I",
    Op.SHUTDOWN: "",
    Op.KREPLY: "iq",
    Op.LANE: "",
    Op.READY: "I",
    Op.REPLY: "iq",
    Op.KCALL: "HQQQ",
    Op.LOG: "I",
}
STRUCTS: dict[int, struct.Struct] = {int(op): struct.Struct(HEADER + body) for op, body in _BODIES.items()}
_HEADER = struct.Struct(HEADER)
# Enum construction by value costs microseconds on a path measured in tens of them: look it up.
_OPS: dict[int, Op] = {int(op): op for op in Op}


# Per operation number: the Op, its struct and its size, in one lookup.
_DECODERS: dict[int, tuple[Op, struct.Struct, int]] = {
    code: (_OPS[code], layout, layout.size) for code, layout in STRUCTS.items()}
_new = tuple.__new__


class Frame(NamedTuple):
    op: Op
    req_id: int
    driver_id: int
    fields: tuple
    tail: bytes


def encode(op: Op, req_id: int, driver_id: int, *fields: int, tail: bytes = b"") -> bytes:
    """Pack one frame.  Raises ``ProtocolError`` for values that do not fit their fields."""
    if len(tail) > MAX_TAIL:
        raise ProtocolError(f"tail of {len(tail)} bytes exceeds the limit of {MAX_TAIL}")
    try:
        head = STRUCTS[op].pack(PROTOCOL_VERSION, op, 0, req_id, driver_id, len(tail), *fields)
    except struct.error as exc:
        raise ProtocolError(f"cannot encode {Op(op).name}: {exc}") from None
    return head + tail if tail else head


def decode(buf: bytes | memoryview) -> Frame:
    """Parse one frame received from the other side; everything is checked before use."""
    n = len(buf)
    if n < HEADER_SIZE:
        raise ProtocolError(f"frame of {n} bytes is shorter than the {HEADER_SIZE}-byte header")
    version, op, reserved, req_id, driver_id, tail_len = _HEADER.unpack_from(buf, 0)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version}, expected {PROTOCOL_VERSION}")
    if reserved:
        raise ProtocolError(f"reserved header field is {reserved:#x}, must be 0")
    known = _DECODERS.get(op)
    if known is None:
        raise ProtocolError(f"unknown operation {op}")
    if tail_len > MAX_TAIL:
        raise ProtocolError(f"declared tail of {tail_len} bytes exceeds the limit of {MAX_TAIL}")
    member, layout, size = known
    if n != size + tail_len:
        raise ProtocolError(f"{member.name} frame is {n} bytes, expected {size} + tail {tail_len}")
    # tuple.__new__ rather than Frame(...), whose __new__ is a Python function: one per frame.
    return _new(Frame, (member, req_id, driver_id, layout.unpack_from(buf, 0)[6:],
                        bytes(buf[size:]) if tail_len else b""))
