"""IOCTL codes the CE way, the two buffer helpers every ``io_control`` needs, and a checked read
of a dword from the driver's registry key.

``ctl_code`` is CE's ``CTL_CODE`` macro (winioctl.h)::

    (device_type << 16) | (access << 14) | (function << 2) | method

Device types below 0x8000 and functions below 0x800 are Microsoft's; a driver's own codes use
0x8000.. and 0x800.. (``FILE_DEVICE_VENDOR``, ``FUNCTION_VENDOR``).
"""

from __future__ import annotations

import errno
import struct

from hosts.api import DriverError

METHOD_BUFFERED = 0
METHOD_IN_DIRECT = 1
METHOD_OUT_DIRECT = 2
METHOD_NEITHER = 3

FILE_ANY_ACCESS = 0
FILE_READ_ACCESS = 1
FILE_WRITE_ACCESS = 2

FILE_DEVICE_DISK = 0x07
FILE_DEVICE_SERIAL_PORT = 0x1B
FILE_DEVICE_UNKNOWN = 0x22
FILE_DEVICE_VENDOR = 0x8000
FUNCTION_VENDOR = 0x800


def ctl_code(device_type: int, function: int, method: int = METHOD_BUFFERED,
             access: int = FILE_ANY_ACCESS) -> int:
    if not (0 <= device_type <= 0xFFFF and 0 <= function <= 0xFFF and 0 <= method <= 3 and 0 <= access <= 3):
        raise ValueError(f"CTL_CODE({device_type:#x}, {function:#x}, {method}, {access}) out of range")
    return (device_type << 16) | (access << 14) | (function << 2) | method


def unpack_in(inbuf: memoryview, fmt: str) -> tuple:
    """The input as ``struct`` format ``fmt``; an input of any other size fails with EINVAL."""
    layout = struct.Struct(fmt)
    if len(inbuf) != layout.size:
        raise DriverError(errno.EINVAL, f"input is {len(inbuf)} bytes, expected {layout.size}")
    return layout.unpack(inbuf)


def pack_out(outbuf: memoryview, fmt: str, *values) -> int:
    """Write ``values`` at the start of the output; fails with ENOBUFS if it is too small.
    Returns the number of bytes written (what ``io_control`` returns)."""
    layout = struct.Struct(fmt)
    if len(outbuf) < layout.size:
        raise DriverError(errno.ENOBUFS, f"output is {len(outbuf)} bytes, {layout.size} needed")
    layout.pack_into(outbuf, 0, *values)
    return layout.size


def registry_dword(ctx, name: str, default: int | None = None) -> int:
    """The dword ``name`` of the driver's registry key (for ``init``), or ``default``; anything else fails the
    driver's init with EINVAL and a message saying what to write."""
    value = ctx.registry.get(name, default)
    if type(value) is not int:
        raise DriverError(errno.EINVAL, f"{ctx.device}: registry value {name} is {value!r}; "
                                        f"expected a dword (e.g. \"{name}\"=dword:...)")
    return value
