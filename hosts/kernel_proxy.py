"""``ctx.kernel`` inside a host: each privileged operation is a KCALL to the Reflector.

The Reflector checks every call against the driver's signed policy and either does it (and
passes back a handle, and for some operations an fd over SCM_RIGHTS) or refuses it.  A refusal
raises ``PermissionError`` (EACCES/EPERM) or ``OSError`` with the Reflector's reason, in the
driver, where it can be handled like any failed system call.

Widths of registers and ports are in **bytes**: 1, 2 or 4.

Region modes (the KREPLY tail of MAP_IO_SPACE is JSON ``{"mode": "mapped"|"mediated"}``,
optionally with ``"offset"``, the window's start within the passed fd):

* ``mapped``: the Reflector passes an fd whose mapping is the window; ``Region.view`` is a
  memoryview of exactly ``length`` bytes over it, and read/write go through that view.
* ``mediated``: no fd; every ``read8/16/32``/``write8/16/32`` is a READ_REGISTER/WRITE_REGISTER
  KCALL the Reflector checks, and ``view`` raises ``PermissionError``.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import select

from hosts.channel import Channel, KernelAnswer, clip_message
from hosts.wire import KernelOp

_WIDTHS = (1, 2, 4)


def _check_width(width: int) -> None:
    if width not in _WIDTHS:
        raise ValueError(f"width {width!r} is not one of {_WIDTHS} (bytes)")


def _check_value(value: int, width: int) -> None:
    if type(value) is not int or not 0 <= value < 1 << (8 * width):
        raise ValueError(f"value {value!r} does not fit in {width} byte(s)")


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _one_fd(kop: KernelOp, answer: KernelAnswer) -> int:
    """The single fd an operation expects; extra fds are closed, a missing one is an error."""
    if not answer.fds:
        raise OSError(errno.EPROTO, f"{kop.name}: the Reflector passed no file descriptor")
    _close_all(answer.fds[1:])
    return answer.fds[0]


def _json_tail(kop: KernelOp, answer: KernelAnswer) -> dict:
    try:
        info = json.loads(answer.tail.decode("utf-8"))
    except ValueError:
        info = None
    if not isinstance(info, dict):
        _close_all(answer.fds)
        raise OSError(errno.EPROTO, f"{kop.name}: reply tail is not a JSON object: {answer.tail[:80]!r}")
    return info


class Region:
    """A window of device memory from ``map_io_space``; offsets are relative to its start."""

    def __init__(self, kernel: "KernelProxy", handle: int, phys: int, length: int,
                 mapping: mmap.mmap | None, offset: int = 0):
        self._kernel = kernel
        self.handle = handle
        self.phys = phys
        self.length = length
        self.mode = "mapped" if mapping is not None else "mediated"
        self._mmap = mapping
        self._view = memoryview(mapping)[offset:offset + length] if mapping is not None else None
        self.closed = False

    @property
    def view(self) -> memoryview:
        if self.closed:
            raise ValueError(f"region at {self.phys:#x} is unmapped")
        if self._view is None:
            raise PermissionError(errno.EACCES, f"region at {self.phys:#x} is mediated (policy "
                                  f"RegisterAccess): no direct view; use read8/16/32 and write8/16/32")
        return self._view

    def _bounds(self, offset: int, width: int) -> None:
        if self.closed:
            raise ValueError(f"region at {self.phys:#x} is unmapped")
        if type(offset) is not int or offset < 0 or offset + width > self.length:
            raise IndexError(f"offset {offset!r} + {width} is outside the region of {self.length} bytes "
                             f"at {self.phys:#x}")

    def _read(self, offset: int, width: int) -> int:
        self._bounds(offset, width)
        if self._view is not None:
            return int.from_bytes(self._view[offset:offset + width], "little")
        return self._kernel._call(KernelOp.READ_REGISTER, self.handle, offset, width).value

    def _write(self, offset: int, value: int, width: int) -> None:
        self._bounds(offset, width)
        _check_value(value, width)
        if self._view is not None:
            self._view[offset:offset + width] = value.to_bytes(width, "little")
        else:
            self._kernel._call(KernelOp.WRITE_REGISTER, self.handle, offset, (width << 32) | value)

    def read8(self, offset: int) -> int:
        return self._read(offset, 1)

    def read16(self, offset: int) -> int:
        return self._read(offset, 2)

    def read32(self, offset: int) -> int:
        return self._read(offset, 4)

    def write8(self, offset: int, value: int) -> None:
        self._write(offset, value, 1)

    def write16(self, offset: int, value: int) -> None:
        self._write(offset, value, 2)

    def write32(self, offset: int, value: int) -> None:
        self._write(offset, value, 4)

    def _release(self) -> None:
        self.closed = True
        if self._view is not None:
            self._view.release()
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # the driver still holds a slice of the view; the mapping lives until it goes

    def close(self) -> None:
        self._kernel.unmap_io_space(self)


class Interrupt:
    """An interrupt the Reflector forwards by signalling an eventfd."""

    def __init__(self, kernel: "KernelProxy", handle: int, irq: int, fd: int):
        self._kernel = kernel
        self.handle = handle
        self.irq = irq
        self.fd = fd

    def wait(self, timeout: float | None = None) -> bool:
        """True when the interrupt fired (and consumes it), False after ``timeout`` seconds."""
        if self.fd < 0:
            raise ValueError(f"interrupt {self.irq} is closed")
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            return False  # another thread consumed it first
        return True

    def done(self) -> None:
        """Tell the Reflector this interrupt was handled and may fire again."""
        self._kernel._call(KernelOp.INTERRUPT_DONE, self.handle)

    def close(self) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            self._kernel._call(KernelOp.INTERRUPT_CLOSE, self.handle)
        finally:
            os.close(fd)


class DmaBuffer:
    """Memory the Reflector allocated for DMA: ``phys`` is the device's address of it."""

    def __init__(self, handle: int, phys: int, size: int, fd: int, mapping: mmap.mmap):
        self.handle = handle
        self.phys = phys
        self.size = size
        self._fd = fd
        self._mmap = mapping
        self.view = memoryview(mapping)[:size]

    def _release(self) -> None:
        self.view.release()
        try:
            self._mmap.close()
        except BufferError:
            pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class KernelProxy:
    """The ``ctx.kernel`` of one driver in a host; ``driver_id`` goes into every KCALL."""

    def __init__(self, channel: Channel, driver_id: int):
        self._channel = channel
        self.driver_id = driver_id

    def _call(self, kop: KernelOp, a0: int = 0, a1: int = 0, a2: int = 0, tail: bytes = b"") -> KernelAnswer:
        answer = self._channel.kcall(self.driver_id, kop, a0, a1, a2, tail)
        if answer.status:
            _close_all(answer.fds)
            reason = answer.tail.decode("utf-8", "replace") or os.strerror(answer.status)
            if answer.status in (errno.EACCES, errno.EPERM):
                raise PermissionError(answer.status, f"{kop.name} denied: {reason}")
            raise OSError(answer.status, f"{kop.name} failed: {reason}")
        return answer

    def _no_fds(self, kop: KernelOp, a0: int = 0, a1: int = 0, a2: int = 0, tail: bytes = b"") -> KernelAnswer:
        answer = self._call(kop, a0, a1, a2, tail)
        _close_all(answer.fds)  # none expected; never leak what arrives anyway
        return answer

    def map_io_space(self, phys: int, length: int) -> Region:
        if length <= 0:
            raise ValueError(f"length {length} must be positive")
        answer = self._call(KernelOp.MAP_IO_SPACE, phys, length)
        info = _json_tail(KernelOp.MAP_IO_SPACE, answer)
        mode = info.get("mode")
        if mode == "mediated":
            _close_all(answer.fds)
            return Region(self, answer.value, phys, length, None)
        if mode != "mapped":
            _close_all(answer.fds)
            raise OSError(errno.EPROTO, f"MAP_IO_SPACE: unknown mode {mode!r}")
        offset = info.get("offset", 0)
        if type(offset) is not int or offset < 0:
            _close_all(answer.fds)
            raise OSError(errno.EPROTO, f"MAP_IO_SPACE: bad offset {offset!r}")
        fd = _one_fd(KernelOp.MAP_IO_SPACE, answer)
        try:
            mapping = mmap.mmap(fd, offset + length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)  # the mapping keeps the memory; the fd is not needed any more
        return Region(self, answer.value, phys, length, mapping, offset)

    def unmap_io_space(self, region: Region) -> None:
        if region.closed:
            return
        region._release()
        self._no_fds(KernelOp.UNMAP_IO_SPACE, region.handle)

    def read_register(self, region: Region, offset: int, width: int = 4) -> int:
        _check_width(width)
        return region._read(offset, width)

    def write_register(self, region: Region, offset: int, value: int, width: int = 4) -> None:
        _check_width(width)
        region._write(offset, value, width)

    def read_port(self, port: int, width: int = 1) -> int:
        _check_width(width)
        return self._no_fds(KernelOp.READ_PORT, port, width).value

    def write_port(self, port: int, value: int, width: int = 1) -> None:
        _check_width(width)
        _check_value(value, width)
        self._no_fds(KernelOp.WRITE_PORT, port, value, width)

    def interrupt(self, irq: int) -> Interrupt:
        answer = self._call(KernelOp.INTERRUPT, irq)
        return Interrupt(self, answer.value, irq, _one_fd(KernelOp.INTERRUPT, answer))

    def alloc_dma(self, size: int) -> DmaBuffer:
        if size <= 0:
            raise ValueError(f"DMA size {size} must be positive")
        answer = self._call(KernelOp.ALLOC_DMA, size)
        phys = _json_tail(KernelOp.ALLOC_DMA, answer).get("phys")
        if type(phys) is not int or phys < 0:
            _close_all(answer.fds)
            raise OSError(errno.EPROTO, f"ALLOC_DMA: bad phys {phys!r}")
        fd = _one_fd(KernelOp.ALLOC_DMA, answer)
        try:
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return DmaBuffer(answer.value, phys, size, fd, mapping)

    def free_dma(self, buf: DmaBuffer) -> None:
        buf._release()
        self._no_fds(KernelOp.FREE_DMA, buf.handle)

    def open_device(self, path: str, mode: int) -> int:
        """An fd for ``path`` opened by the Reflector with ``mode`` (``os.O_*`` flags) if the
        policy's DeviceNodes allow it.  The driver owns the fd and closes it."""
        answer = self._call(KernelOp.OPEN_DEVICE, mode, tail=os.fsencode(path))
        return _one_fd(KernelOp.OPEN_DEVICE, answer)

    def log(self, level: int, message: str) -> None:
        self._no_fds(KernelOp.LOG, level, tail=clip_message(str(message)))
