"""Privileged operations a driver asks for: the Reflector's closed set (DESIGN.md section 4).

Each ``KernelOp`` has exactly one handler.  An operation not in the table is denied and audited.
Each handler checks the *calling driver's* policy itself, right where the privilege is used,
even if something checked before: drivers that share a host share an address space, so a driver
can pretend to be another one of its host -- the check is still made against the driver id the
frame names, and that id must belong to the host that sent it (the channel enforces it).

Every resource handed out is recorded per host generation, so that when a host dies everything it
held (mappings, DMA buffers, interrupt registrations) is reclaimed and the next host must ask again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from typing import Callable

from hosts.wire import Frame, KernelOp
from policy import decisions

log = logging.getLogger("drvbox.kernel")


class Denied(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


Result = tuple[int, int, bytes, list]        # status, value, tail, fds to pass


class KernelOps:
    def __init__(self, dm):
        self.dm = dm
        self._lock = threading.Lock()
        self._handlers: dict[KernelOp, Callable] = {
            KernelOp.LOG: self._log,
            KernelOp.MAP_IO_SPACE: self._map_io_space,
            KernelOp.UNMAP_IO_SPACE: self._unmap,
            KernelOp.READ_REGISTER: self._read_register,
            KernelOp.WRITE_REGISTER: self._write_register,
            KernelOp.READ_PORT: self._read_port,
            KernelOp.WRITE_PORT: self._write_port,
            KernelOp.INTERRUPT: self._interrupt,
            KernelOp.INTERRUPT_DONE: self._interrupt_done,
            KernelOp.INTERRUPT_CLOSE: self._interrupt_close,
            KernelOp.ALLOC_DMA: self._alloc_dma,
            KernelOp.FREE_DMA: self._free_dma,
            KernelOp.OPEN_DEVICE: self._open_device,
        }

    # -- entry point from a host channel ----------------------------------------------------

    def host_gone(self, channel) -> None:
        """Reclaim every resource the host behind ``channel`` held."""
        resources = getattr(self.dm.platform, "resources", None)
        if resources is not None:
            resources.release(channel)

    def handle(self, group, channel, device, frame: Frame) -> Result:
        kop_raw, a0, a1, a2 = frame.fields
        try:
            kop = KernelOp(kop_raw)
        except ValueError:
            kop = None
        handler = self._handlers.get(kop) if kop is not None else None
        if device is None or handler is None:
            reason = f"unknown kernel operation {kop_raw}" if handler is None else "unknown driver"
            self._deny_audit(group, device, str(kop_raw), {"reason": reason})
            return errno.EPERM, 0, reason.encode(), []
        try:
            return handler(group, device, a0, a1, a2, frame.tail)
        except Denied as d:
            self._deny_audit(group, device, kop.name.lower(), {"args": [a0, a1, a2], "reason": d.reason})
            return d.code, 0, d.reason.encode()[:1024], []

    def _deny_audit(self, group, device, op: str, detail: dict) -> None:
        self.dm.audit.record("policy.denied", device=getattr(device, "name", None),
                             driver=getattr(getattr(device, "entry", None), "dll", None),
                             group=getattr(group, "gid", None), detail={"op": op, **detail})

    @staticmethod
    def _require(decision) -> None:
        if not decision:
            raise Denied(errno.EACCES, decision.reason)

    def _platform(self):
        if self.dm.platform is None:
            raise Denied(errno.ENODEV, "this platform has no (simulated) hardware")
        return self.dm.platform

    # -- handlers: each says why it is safe to do on a less-trusted caller's behalf -----------

    def _log(self, group, device, level, _a1, _a2, tail) -> Result:
        """Logging costs us a line of output, rate-limited by the channel; always allowed."""
        log.log(level if level in (10, 20, 30, 40, 50) else logging.INFO, "%s: %s",
                device.name, tail.decode("utf-8", "replace")[:2000])
        return 0, 0, b"", []

    def _map_io_space(self, group, device, phys, length, _a2, _tail) -> Result:
        """Only a window the policy grants; the model's register page, never host memory."""
        self._require(decisions.may_map(device.policy, phys, length))
        platform = self._platform()
        mode = device.policy.register_access
        return self._platform_call(platform, "map_region", group, device, phys, length, mode)

    def _unmap(self, group, device, handle, _a1, _a2, _tail) -> Result:
        return self._platform_call(self._platform(), "unmap_region", group, device, handle)

    def _read_register(self, group, device, handle, offset, width, _tail) -> Result:
        return self._platform_call(self._platform(), "read_register", group, device, handle, offset, width)

    def _write_register(self, group, device, handle, offset, packed, _tail) -> Result:
        return self._platform_call(self._platform(), "write_register", group, device, handle, offset,
                                   packed >> 32, packed & 0xFFFFFFFF)

    def _read_port(self, group, device, port, width, _a2, _tail) -> Result:
        """Ports inside the driver's IoBase/IoLen only, the whole access (port..port+width)."""
        self._require(decisions.may_port(device.policy, port, width, "r"))
        value = self._platform().port_read(port, width)
        return 0, value, b"", []

    def _write_port(self, group, device, port, value, width, _tail) -> Result:
        self._require(decisions.may_port(device.policy, port, width, "w"))
        self._platform().port_write(port, value, width)
        return 0, 0, b"", []

    def _interrupt(self, group, device, irq, _a1, _a2, _tail) -> Result:
        """Only the driver's own Irq/SysIntr; delivered through an eventfd only it holds."""
        self._require(decisions.may_interrupt(device.policy, irq))
        return self._platform_call(self._platform(), "hook_interrupt", group, device, irq)

    def _interrupt_done(self, group, device, handle, _a1, _a2, _tail) -> Result:
        return self._platform_call(self._platform(), "interrupt_done", group, device, handle)

    def _interrupt_close(self, group, device, handle, _a1, _a2, _tail) -> Result:
        return self._platform_call(self._platform(), "unhook_interrupt", group, device, handle)

    def _alloc_dma(self, group, device, size, _a1, _a2, _tail) -> Result:
        """Within DmaQuota, counting what the driver already holds in this host."""
        held = self._resources().dma_held(group, device)
        self._require(decisions.may_alloc_dma(device.policy, size, held))
        return self._platform_call(self._platform(), "alloc_dma", group, device, size)

    def _free_dma(self, group, device, handle, _a1, _a2, _tail) -> Result:
        return self._platform_call(self._platform(), "free_dma", group, device, handle)

    def _open_device(self, group, device, flags, _a1, _a2, tail) -> Result:
        """The Reflector opens the node itself (O_CLOEXEC|O_NOFOLLOW|O_NOCTTY) and passes the fd."""
        try:
            path = tail.decode("utf-8")
        except UnicodeDecodeError:
            raise Denied(errno.EINVAL, "device path is not UTF-8") from None
        accmode = flags & os.O_ACCMODE
        if flags & ~(os.O_ACCMODE | os.O_NONBLOCK):
            raise Denied(errno.EINVAL, f"open flags {flags:#x}: only O_RDONLY/O_WRONLY/O_RDWR and O_NONBLOCK")
        mode = "r" if accmode == os.O_RDONLY else "rw"
        self._require(decisions.may_open_device(device.policy, path, mode))
        try:
            fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY)
        except OSError as exc:
            return exc.errno or errno.EIO, 0, f"{path}: {exc.strerror}".encode(), []
        return 0, 0, b"", [fd]

    # -- the hardware side lives in the platform's resource table -----------------------------

    def _resources(self):
        platform = self._platform()
        return platform.resources if hasattr(platform, "resources") else _NoResources()

    def _platform_call(self, platform, name, *args) -> Result:
        method = getattr(getattr(platform, "resources", None), name, None)
        if method is None:
            raise Denied(errno.ENOSYS, f"{name} is not available on this platform yet")
        return method(*args)


class _NoResources:
    @staticmethod
    def dma_held(group, device) -> int:
        return 0


class InProcessKernel:
    """``ctx.kernel`` for a kernel-mode driver: the same checks, called directly."""

    def __init__(self, ops: KernelOps, device):
        self.ops = ops
        self.device = device

    def log(self, level: int, message: str) -> None:
        log.log(level if level in (10, 20, 30, 40, 50) else logging.INFO, "%s: %s", self.device.name, message)

    def _call(self, kop: KernelOp, a0=0, a1=0, a2=0, tail=b"") -> tuple[int, bytes, list]:
        from hosts.wire import Op
        frame = Frame(Op.KCALL, 0, 0, (int(kop), a0, a1, a2), tail)
        status, value, rtail, fds = self.ops.handle(None, None, self.device, frame)
        if status:
            message = rtail.decode("utf-8", "replace")
            if status in (errno.EACCES, errno.EPERM):
                raise PermissionError(status, message)
            raise OSError(status, message)
        return value, rtail, fds

    def read_port(self, port: int, width: int = 1) -> int:
        return self._call(KernelOp.READ_PORT, port, width)[0]

    def write_port(self, port: int, value: int, width: int = 1) -> None:
        self._call(KernelOp.WRITE_PORT, port, value, width)

    def open_device(self, path: str, mode: str = "r") -> int:
        flags = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}.get(mode)
        if flags is None:
            raise ValueError(f"mode {mode!r}: use 'r', 'w' or 'rw'")
        return self._call(KernelOp.OPEN_DEVICE, flags, tail=path.encode())[2][0]

    def map_io_space(self, phys: int, length: int):
        raise NotImplementedError("map_io_space for kernel-mode drivers arrives with the simulated platform")

    def interrupt(self, irq: int):
        raise NotImplementedError("interrupts for kernel-mode drivers arrive with the simulated platform")

    def alloc_dma(self, size: int):
        raise NotImplementedError("DMA for kernel-mode drivers arrives with the simulated platform")

    def free_dma(self, buf) -> None:
        raise NotImplementedError("DMA for kernel-mode drivers arrives with the simulated platform")
