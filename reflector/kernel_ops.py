"""Privileged operations a driver asks for: the Reflector's closed set (DESIGN.md section 4).

Each ``KernelOp`` has exactly one handler.  An operation not in the table is denied and audited.
Each handler checks the *calling driver's* policy itself, right where the privilege is used,
even if something checked before: drivers that share a host share an address space, so a driver
can pretend to be another one of its host -- the check is still made against the driver id the
frame names, and that id must belong to the host that sent it (the channel enforces it).

After the policy, possession: ``reflector.hwresources.HardwareResources`` (the platform's
``resources``) records every resource handed out under its owner -- the ``HostChannel`` of one
host lifetime, or the ``KernelDevice`` of a kernel-mode driver -- refuses another driver's
handles and devices, and gives everything back in ``host_gone``, so a restarted host must ask
again.

Errors become KREPLY statuses: a policy denial EACCES, a refusal of what is someone else's
(EBUSY, EBADF, EFAULT outside a region) its errno -- both audited ``policy.denied`` with the
operation and its arguments -- and a platform error (``SimHwError``) its ``errno``, not audited
(the request was allowed; the hardware could not do it, e.g. a register width the device does
not decode).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from typing import Callable

from hosts.channel import KernelAnswer
from hosts.kernel_proxy import KernelProxy
from hosts.wire import Frame, KernelOp, Op
from policy import decisions
from reflector.hwresources import HardwareResources, ResourceError
from reflector.simhw.errors import SimHwError
from reflector.simhw.physmem import round_up

log = logging.getLogger("drvbox.kernel")


class Denied(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


Result = tuple[int, int, bytes, list]        # status, value, tail, fds to pass


def attach_resources(platform) -> HardwareResources:
    """Give ``platform`` its resource table (``platform.resources``); the Device Manager calls
    this once, right after building the platform."""
    platform.resources = HardwareResources(platform)
    return platform.resources


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

    def host_gone(self, channel) -> dict:
        """Reclaim every resource the host behind ``channel`` held; returns what was released."""
        platform = self.dm.platform
        resources = getattr(platform, "resources", None) if platform is not None else None
        if resources is None:
            return {}
        return resources.release(channel)

    def handle(self, group, channel, device, frame: Frame) -> Result:
        """One KCALL.  ``channel`` owns what is handed out (a kernel-mode driver passes its device)."""
        kop_raw, a0, a1, a2 = frame.fields
        try:
            kop = KernelOp(kop_raw)
        except ValueError:
            kop = None
        handler = self._handlers.get(kop) if kop is not None else None
        if device is None or handler is None or channel is None:
            reason = f"unknown kernel operation {kop_raw}" if handler is None else "unknown driver or owner"
            self._deny_audit(group, device, str(kop_raw), {"reason": reason})
            return errno.EPERM, 0, reason.encode(), []
        op = kop.name.lower()
        try:
            return handler(channel, device, a0, a1, a2, frame.tail)
        except Denied as d:
            self._deny_audit(group, device, op, {"args": [a0, a1, a2], "reason": d.reason})
            return d.code, 0, d.reason.encode()[:1024], []
        except ResourceError as e:
            if e.refused:
                self._deny_audit(group, device, op, {"args": [a0, a1, a2], "reason": e.reason})
            return e.errno, 0, e.reason.encode()[:1024], []
        except SimHwError as e:
            return e.errno, 0, str(e).encode()[:1024], []

    def _deny_audit(self, group, device, op: str, detail: dict) -> None:
        entry = getattr(device, "entry", None)
        gid = getattr(group, "gid", None) if group is not None else getattr(entry, "group", None)
        self.dm.audit.record("policy.denied", device=getattr(device, "name", None),
                             driver=getattr(entry, "dll", None), group=gid, detail={"op": op, **detail})

    @staticmethod
    def _require(decision) -> None:
        if not decision:
            raise Denied(errno.EACCES, decision.reason)

    def _hw(self) -> HardwareResources:
        platform = self.dm.platform
        resources = getattr(platform, "resources", None) if platform is not None else None
        if resources is None:
            raise Denied(errno.ENODEV, "this platform has no (simulated) hardware")
        return resources

    # -- handlers: each says why it is safe to do on a less-trusted caller's behalf -----------

    def _log(self, owner, device, level, _a1, _a2, tail) -> Result:
        """Logging costs us a line of output, rate-limited by the channel; always allowed."""
        log.log(level if level in (10, 20, 30, 40, 50) else logging.INFO, "%s: %s",
                device.name, tail.decode("utf-8", "replace")[:2000])
        return 0, 0, b"", []

    def _map_io_space(self, owner, device, phys, length, _a2, _tail) -> Result:
        """Only a window the policy grants, within one device's window; what the host gets is
        the model's register page (never our memory), or nothing at all in mediated mode."""
        self._require(decisions.may_map(device.policy, phys, length))
        mode = device.policy.register_access
        region = self._hw().map_region(owner, device.name, phys, length, mode)
        info = {"mode": region.mode} if region.fd is None else {"mode": region.mode, "offset": region.offset}
        return 0, region.handle, json.dumps(info).encode(), [] if region.fd is None else [region.fd]

    def _unmap(self, owner, device, handle, _a1, _a2, _tail) -> Result:
        """Only the caller's own handle; forgetting a mapping gives nothing away."""
        self._hw().unmap_region(owner, device.name, handle)
        return 0, 0, b"", []

    def _read_register(self, owner, device, handle, offset, width, _tail) -> Result:
        """The caller's own region, the access inside it and inside the policy's window again."""
        resources = self._hw()
        phys = resources.region_address(owner, device.name, handle, offset, width)
        self._require(decisions.may_map(device.policy, phys, width, "r"))
        return 0, resources.read_register(owner, device.name, handle, offset, width), b"", []

    def _write_register(self, owner, device, handle, offset, packed, _tail) -> Result:
        width, value = packed >> 32, packed & 0xFFFFFFFF
        resources = self._hw()
        phys = resources.region_address(owner, device.name, handle, offset, width)
        self._require(decisions.may_map(device.policy, phys, width, "rw"))
        resources.write_register(owner, device.name, handle, offset, width, value)
        return 0, 0, b"", []

    def _read_port(self, owner, device, port, width, _a2, _tail) -> Result:
        """Ports inside the driver's IoBase/IoLen only, the whole access (port..port+width), on a
        device no other driver has claimed."""
        self._require(decisions.may_port(device.policy, port, width, "r"))
        return 0, self._hw().read_port(owner, device.name, port, width), b"", []

    def _write_port(self, owner, device, port, value, width, _tail) -> Result:
        self._require(decisions.may_port(device.policy, port, width, "w"))
        self._hw().write_port(owner, device.name, port, value, width)
        return 0, 0, b"", []

    def _interrupt(self, owner, device, irq, _a1, _a2, _tail) -> Result:
        """Only the driver's own Irq/SysIntr, hooked by nobody else; delivered through an eventfd
        only this host holds."""
        self._require(decisions.may_interrupt(device.policy, irq))
        handle, fd = self._hw().hook_interrupt(owner, device.name, irq)
        return 0, handle, b"", [fd]

    def _interrupt_done(self, owner, device, handle, _a1, _a2, _tail) -> Result:
        """Unmasking the caller's own line: the worst it can do is be interrupted again."""
        self._hw().interrupt_done(owner, device.name, handle)
        return 0, 0, b"", []

    def _interrupt_close(self, owner, device, handle, _a1, _a2, _tail) -> Result:
        self._hw().unhook_interrupt(owner, device.name, handle)
        return 0, 0, b"", []

    def _alloc_dma(self, owner, device, size, _a1, _a2, _tail) -> Result:
        """Within DmaQuota, counting whole pages and what the driver already holds in this host;
        the memory is a fresh sealed memfd, so nothing of ours or of another driver is in it."""
        resources = self._hw()
        held = resources.dma_held(owner, device.name)
        pages = round_up(size) if type(size) is int and size > 0 else size
        self._require(decisions.may_alloc_dma(device.policy, pages, held))
        handle, region, fd = resources.alloc_dma(owner, device.name, size)
        return 0, handle, json.dumps({"phys": region.phys}).encode(), [fd]

    def _free_dma(self, owner, device, handle, _a1, _a2, _tail) -> Result:
        self._hw().free_dma(owner, device.name, handle)
        return 0, 0, b"", []

    def _open_device(self, owner, device, flags, _a1, _a2, tail) -> Result:
        """The Reflector opens the node itself (O_CLOEXEC|O_NOFOLLOW|O_NOCTTY, never waiting) and passes the fd."""
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
            # Always opened O_NONBLOCK: this runs on the host's reader thread, and an open that
            # waits (a FIFO without a peer, a serial line without carrier) would stop it serving
            # the host -- the driver asked the open, it must not choose that we hang in it.  The
            # mode the driver asked for is set on the fd afterwards.
            fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY)
        except OSError as exc:
            return exc.errno or errno.EIO, 0, f"{path}: {exc.strerror}".encode(), []
        if not flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
        return 0, 0, b"", [fd]


class _DirectChannel:
    """The transport of a kernel-mode driver's ``ctx.kernel``: the KCALL frame goes straight to
    ``KernelOps.handle`` in this process.  The fds of the answer are the driver's to keep or
    close, exactly as those a host receives over SCM_RIGHTS."""

    def __init__(self, ops: KernelOps, device):
        self._ops = ops
        self._device = device

    def kcall(self, driver_id: int, kop: KernelOp, a0: int = 0, a1: int = 0, a2: int = 0,
              tail: bytes = b"") -> KernelAnswer:
        frame = Frame(Op.KCALL, 0, driver_id, (int(kop), a0, a1, a2), bytes(tail))
        status, value, rtail, fds = self._ops.handle(None, self._device, self._device, frame)
        return KernelAnswer(status, value, rtail, list(fds))


class InProcessKernel(KernelProxy):
    """``ctx.kernel`` for a kernel-mode driver: the host's ``KernelProxy`` (same Region,
    Interrupt and DmaBuffer classes, same checks in ``KernelOps``) over a direct transport, so
    one driver module runs unchanged in both modes.  The owner of its resources is the device."""

    def __init__(self, ops: KernelOps, device):
        super().__init__(_DirectChannel(ops, device), 0)
        self.ops = ops
        self.device = device
