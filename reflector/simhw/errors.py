"""The errors of the simulated hardware, each carrying the errno the Reflector hands a driver.

A model or the platform raises one of these when an access cannot be done as asked.  The
Reflector turns ``errno`` into the driver's ``OSError``; the message names the device, the
register or address, and what would have been valid, so a driver author can fix the call.
"""

from __future__ import annotations

import errno as _errno

__all__ = ["SimHwError", "PlatformConfigError", "AddressError", "RegisterAccessError", "DmaError"]


class SimHwError(Exception):
    """Base of every error this package raises on purpose."""

    errno = _errno.EIO


class PlatformConfigError(SimHwError):
    """A simulated device description that cannot be attached without guessing.

    ``device`` names the device (its key name under ``HKLM\\Platform\\Devices``), ``value`` the
    registry value at fault (or None), ``location`` the ``file:line:col`` that wrote it when known.
    """

    errno = _errno.EINVAL

    def __init__(self, device: str, value: str | None, problem: str, *, location: object = None,
                 fix: str | None = None) -> None:
        self.device, self.value, self.problem, self.location, self.fix = device, value, problem, location, fix
        where = f"{location}: " if location else ""
        what = f"device {device}" + (f' "{value}"' if value is not None else "")
        super().__init__(f"{where}{what}: {problem}" + (f" (fix: {fix})" if fix else ""))


class AddressError(SimHwError):
    """A physical address or port range that no device window (or DMA allocation) holds whole."""

    errno = _errno.EFAULT


class RegisterAccessError(SimHwError):
    """A register access of a width or alignment the device does not decode."""

    errno = _errno.EINVAL


class DmaError(SimHwError):
    """A DMA allocation that cannot be made or an access outside what the device may reach.

    ``errno`` is ENOMEM when the DMA zone is exhausted, EFAULT for a bad address, EINVAL for a
    bad size, EACCES for a device that reaches memory of an owner it is not bound to.
    """

    def __init__(self, message: str, errno: int = _errno.EFAULT) -> None:
        super().__init__(message)
        self.errno = errno
