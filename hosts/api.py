"""The driver-facing API: the stream interface of DESIGN.md section 4 and its one error type.

A driver module defines a class ``Driver`` with the methods of ``StreamDriver``; subclassing it is
optional, it only supplies defaults.  Lifecycle and power methods default to doing nothing;
the I/O methods default to failing with ``EOPNOTSUPP``, because an I/O call that silently does
nothing (a read of 0 bytes, a write that consumes nothing) makes callers loop or misbehave.
"""

from __future__ import annotations

import errno as _errno

# Log levels, the numbers of Python's ``logging`` so the Reflector can hand them straight on.
DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40

# Largest errno a driver may report; anything outside 1..MAX_ERRNO is turned into EIO.
MAX_ERRNO = 4095


class DriverError(Exception):
    """Raised by a driver to fail the current request with ``errno`` (e.g. ``errno.EINVAL``).

    Any other exception fails the request with ``EIO`` and is logged.
    """

    def __init__(self, errno: int, message: str | None = None):
        super().__init__(errno, message or _errno.errorcode.get(errno, f"errno {errno}"))
        self.errno = errno
        self.message = message


class DriverContext:
    """What ``Driver.init(ctx)`` receives.

    ``registry``: read-only, case-insensitive mapping of the driver key's values (int for a dword,
    str, tuple of str for a multi_sz, bytes for binary); ``kernel``: the only way to hardware (in a
    host, a ``hosts.kernel_proxy.KernelProxy``); ``device``: the device name, e.g. ``"COM1:"``.
    """

    __slots__ = ("registry", "kernel", "device")

    def __init__(self, registry, kernel, device: str):
        self.registry = registry
        self.kernel = kernel
        self.device = device

    def __repr__(self) -> str:
        return f"DriverContext(device={self.device!r})"


def _unsupported(what: str):
    raise DriverError(_errno.EOPNOTSUPP, f"{what} is not implemented by this driver")


class StreamDriver:
    """Defaults for the CE stream interface.  Override what the device supports."""

    def init(self, ctx: DriverContext) -> None:
        self.ctx = ctx

    def deinit(self) -> None:
        pass

    def open(self, access: int, share: int) -> object:
        return None

    def close(self, opened: object) -> None:
        pass

    def read(self, opened: object, out: memoryview) -> int:
        _unsupported("read")

    def write(self, opened: object, data: memoryview) -> int:
        _unsupported("write")

    def seek(self, opened: object, offset: int, whence: int) -> int:
        _unsupported("seek")

    def io_control(self, opened: object, code: int, inbuf: memoryview, outbuf: memoryview) -> int:
        _unsupported(f"io_control {code:#010x}")

    def power_up(self) -> None:
        pass

    def power_down(self) -> None:
        pass

    def pre_close(self, opened: object) -> None:
        pass

    def pre_deinit(self) -> None:
        pass
