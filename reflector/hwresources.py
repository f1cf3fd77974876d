"""Who holds which piece of simulated hardware: the Reflector's resource table over the platform.

``KernelOps`` checks a driver's *policy* (may this driver touch this window at all?); this table
checks *possession* (is this handle the caller's? is this device already someone else's?) and
does the work on the platform.  Every resource is recorded under a :class:`Holder`: the owner
(the ``HostChannel`` of one host lifetime, or the ``KernelDevice`` of a kernel-mode driver) and
the driver's device name.  ``release(owner)`` gives back everything one host held.

Rules, each deny-by-default:

* **One driver per device.**  A simulated device is *claimed* by the first driver that maps one
  of its windows, touches one of its ports or hooks its IRQ, and stays claimed until that
  driver's host is gone.  Any other driver, in another host or the same one, is refused (EBUSY)
  even if its policy names the same window: two drivers programming one UART is a bug, and a
  device's DMA can be bound to one driver's memory only.  Claiming binds the device's DMA to the
  claimant (``Platform.bind_dma``), so the device reaches that driver's buffers and no others.
* **Handles are checked against their holder.**  A region, interrupt or DMA handle is usable only
  by the driver that received it, in the host that received it (EBADF otherwise): a driver that
  guesses another driver's handle numbers gets nothing.
* **Mediated accesses stay inside the region**: ``offset + width <= length`` (else EACCES, as a
  policy denial: the driver asked for no more than the region), then the platform checks the
  address against the device windows again.
* **Interrupts**: one hook per IRQ system-wide.  The eventfd is created here; the platform's
  callback signals only the IRQ's hooker.  ``done`` unmasks the line (CE's ``InterruptDone``),
  ``close`` masks it.
* **Limits**: at most ``MAX_REGIONS`` regions and ``MAX_DMA_BUFFERS`` DMA buffers per driver, so a
  hostile host cannot grow this table without bound (DmaQuota bounds the bytes; this the count).

Mapped regions and the poller: a driver writing a mapped register page changes plain memory;
the model learns of it only when the page is synced.  While any mapped region exists, a poller
thread syncs every mapped device each ``poll_interval`` seconds (``POLL_INTERVAL_S``, 1 ms), and
stops when the last mapped region goes.  So a register *write* through a mapped page takes
effect up to one interval (plus the sync itself, ~10 us) later; register *reads* see the model's
state at once, since the model rewrites its page on every change.  Mediated mode has no such
delay: each access is one round trip to the Reflector (~50-100 us) with exact side effects.

Locking: ``self._lock`` guards the tables only.  No platform call is made while holding it,
because a platform call can deliver an interrupt, whose callback (``_on_irq``) takes the lock.
The eventfd is written under the lock, so it cannot be closed (and its number reused) midway.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

from reflector.simhw.errors import SimHwError
from reflector.simhw.physmem import DmaRegion

__all__ = ["HardwareResources", "Holder", "MappedRegion", "ResourceError",
           "POLL_INTERVAL_S", "MAX_REGIONS", "MAX_DMA_BUFFERS"]

log = logging.getLogger("drvbox.hw")

POLL_INTERVAL_S = 0.001
MAX_REGIONS = 64
MAX_DMA_BUFFERS = 64
MODES = ("mapped", "mediated")


class ResourceError(Exception):
    """An operation on the hardware table that cannot be done.  ``errno`` is what the driver
    gets; ``refused`` is True when the caller asked for something that is not its own (another
    driver's device, IRQ or handle) -- the Reflector audits those as ``policy.denied``."""

    def __init__(self, code: int, reason: str, *, refused: bool = False):
        super().__init__(reason)
        self.errno = code
        self.reason = reason
        self.refused = refused


@dataclass(frozen=True, eq=False)
class Holder:
    """One driver in one host lifetime: what DMA memory is allocated to and devices bound to.
    Compared by identity: a restarted host is a new owner, so a new holder."""

    owner: object
    driver: str

    def __str__(self) -> str:
        return f"{self.driver} ({getattr(self.owner, 'name', type(self.owner).__name__)})"


class MappedRegion(NamedTuple):
    """What ``map_region`` hands back: for ``mapped`` an fd (a dup the caller owns and passes
    on) whose bytes ``offset .. offset + length`` are the window; for ``mediated`` fd is None."""

    handle: int
    mode: str
    offset: int
    fd: int | None


@dataclass
class _Region:
    holder: Holder
    model: object
    phys: int
    length: int
    mode: str


@dataclass
class _Hook:
    holder: Holder
    irq: int
    fd: int                         # our eventfd; the host holds a dup


@dataclass
class _Dma:
    holder: Holder
    region: DmaRegion


@dataclass
class _Tables:
    holders: dict = field(default_factory=dict)       # (owner, driver) -> Holder
    claims: dict = field(default_factory=dict)        # model -> Holder
    regions: dict = field(default_factory=dict)       # handle -> _Region
    hooks: dict = field(default_factory=dict)         # handle -> _Hook
    irq_hooks: dict = field(default_factory=dict)     # irq -> handle
    dma: dict = field(default_factory=dict)           # handle -> _Dma


class HardwareResources:
    """The per-owner resource table of one :class:`reflector.simhw.Platform`."""

    def __init__(self, platform, *, poll_interval: float = POLL_INTERVAL_S):
        self.platform = platform
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._t = _Tables()
        self._handles = itertools.count(1)
        self._poller: threading.Thread | None = None
        self._poll_stop: threading.Event | None = None
        self._unregister = platform.on_interrupt(self._on_irq)

    # -- holders and claims -------------------------------------------------------------------

    def _holder(self, owner, driver: str) -> Holder:
        """Called with the lock held."""
        key = (owner, driver)
        holder = self._t.holders.get(key)
        if holder is None:
            holder = self._t.holders[key] = Holder(owner, driver)
        return holder

    def _claim(self, holder: Holder, model) -> None:
        """Make ``model`` the holder's, or refuse; binds its DMA to the holder on first claim."""
        with self._lock:
            current = self._t.claims.get(model)
            if current is None:
                self._t.claims[model] = holder
            elif current is not holder:
                raise ResourceError(errno.EBUSY, f"device {model.name} is in use by {current}; "
                                    f"one driver drives a device at a time", refused=True)
            else:
                return
        self.platform.bind_dma(model.name, holder)

    def _mine(self, table: dict, handle, owner, driver: str, what: str):
        """The entry of ``handle`` if it is this driver's in this host; else refused.  Lock held."""
        entry = table.get(handle) if type(handle) is int else None
        if entry is None or entry.holder.owner is not owner or entry.holder.driver != driver:
            raise ResourceError(errno.EBADF, f"{handle!r} is not a {what} handle of {driver} in this host",
                                refused=True)
        return entry

    # -- memory windows -------------------------------------------------------------------------

    def map_region(self, owner, driver: str, phys: int, length: int, mode: str) -> MappedRegion:
        """Map ``[phys, phys + length)``, which must lie in one window of one device."""
        if mode not in MODES:
            raise ResourceError(errno.EINVAL, f"register access mode {mode!r} is not one of {MODES}")
        model, offset = self.platform.find_mem(phys, length)
        if mode == "mapped" and model.page_fd is None:
            raise ResourceError(errno.ENODEV, f"device {model.name} has no register page to map")
        with self._lock:
            holder = self._holder(owner, driver)
            if sum(1 for r in self._t.regions.values() if r.holder is holder) >= MAX_REGIONS:
                raise ResourceError(errno.EMFILE, f"{driver} holds {MAX_REGIONS} regions already; unmap some")
        self._claim(holder, model)
        fd = os.dup(model.page_fd) if mode == "mapped" else None
        with self._lock:
            handle = next(self._handles)
            self._t.regions[handle] = _Region(holder, model, phys, length, mode)
        if mode == "mapped":
            self._poll_update()
        return MappedRegion(handle, mode, offset, fd)

    def unmap_region(self, owner, driver: str, handle: int) -> None:
        with self._lock:
            region = self._mine(self._t.regions, handle, owner, driver, "region")
            del self._t.regions[handle]
        if region.mode == "mapped":
            region.model.sync()             # writes made just before unmapping still count
            self._poll_update()

    def region_address(self, owner, driver: str, handle: int, offset: int, width: int) -> int:
        """The physical address of an access to this driver's region ``handle``, or refused."""
        with self._lock:
            region = self._mine(self._t.regions, handle, owner, driver, "region")
        if width not in (1, 2, 4):
            raise ResourceError(errno.EINVAL, f"register width {width!r} is not 1, 2 or 4 bytes")
        if type(offset) is not int or offset < 0 or offset + width > region.length:
            raise ResourceError(errno.EACCES, f"register offset {offset!r} + width {width} is outside the "
                                f"region of {region.length:#x} bytes at {region.phys:#x}", refused=True)
        return region.phys + offset

    def read_register(self, owner, driver: str, handle: int, offset: int, width: int) -> int:
        """A mediated read: the handle's, inside its region, with the register's side effects."""
        return self.platform.mem_read(self.region_address(owner, driver, handle, offset, width), width)

    def write_register(self, owner, driver: str, handle: int, offset: int, width: int, value: int) -> None:
        phys = self.region_address(owner, driver, handle, offset, width)
        self.platform.mem_write(phys, value, width)

    # -- ports ----------------------------------------------------------------------------------

    def read_port(self, owner, driver: str, port: int, width: int) -> int:
        model, _ = self.platform.find_port(port, width)
        with self._lock:
            holder = self._holder(owner, driver)
        self._claim(holder, model)
        return self.platform.port_read(port, width)

    def write_port(self, owner, driver: str, port: int, value: int, width: int) -> None:
        model, _ = self.platform.find_port(port, width)
        with self._lock:
            holder = self._holder(owner, driver)
        self._claim(holder, model)
        self.platform.port_write(port, value, width)

    # -- interrupts -----------------------------------------------------------------------------

    def _model_of_irq(self, irq: int):
        for model in self.platform.devices():
            if model.config.irq == irq:
                return model
        raise ResourceError(errno.ENODEV, f"no simulated device raises IRQ {irq!r}")

    def hook_interrupt(self, owner, driver: str, irq: int) -> tuple[int, int]:
        """Hook ``irq`` for this driver: ``(handle, fd)``, fd a dup of the eventfd we signal.
        The line is unmasked (``InterruptInitialize``)."""
        model = self._model_of_irq(irq)
        with self._lock:
            holder = self._holder(owner, driver)
            taken = self._t.irq_hooks.get(irq)
            if taken is not None:
                raise ResourceError(errno.EBUSY, f"IRQ {irq} is hooked already by "
                                    f"{self._t.hooks[taken].holder}", refused=True)
        self._claim(holder, model)
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            passed = os.dup(efd)
        except BaseException:
            os.close(efd)
            raise
        with self._lock:
            if irq in self._t.irq_hooks:             # lost a race with another hooker
                os.close(efd)
                os.close(passed)
                raise ResourceError(errno.EBUSY, f"IRQ {irq} is hooked already", refused=True)
            handle = next(self._handles)
            self._t.hooks[handle] = _Hook(holder, irq, efd)
            self._t.irq_hooks[irq] = handle
        self.platform.unmask(irq)
        return handle, passed

    def _on_irq(self, irq: int) -> None:
        """The platform's callback, on whatever thread changed the device: signal the hooker."""
        with self._lock:
            handle = self._t.irq_hooks.get(irq)
            if handle is None:
                return                               # nobody hooked it: it stays masked
            try:
                os.eventfd_write(self._t.hooks[handle].fd, 1)
            except BlockingIOError:
                pass                                 # the counter is saturated: it is signalled anyway

    def interrupt_done(self, owner, driver: str, handle: int) -> None:
        """``InterruptDone``: unmask; a line still asserted is delivered again at once."""
        with self._lock:
            hook = self._mine(self._t.hooks, handle, owner, driver, "interrupt")
        self.platform.unmask(hook.irq)

    def unhook_interrupt(self, owner, driver: str, handle: int) -> None:
        with self._lock:
            hook = self._mine(self._t.hooks, handle, owner, driver, "interrupt")
            self._drop_hook(handle, hook)
        self.platform.mask(hook.irq)

    def _drop_hook(self, handle: int, hook: _Hook) -> None:
        """Lock held: after this no callback can find (and write) the eventfd."""
        del self._t.hooks[handle]
        del self._t.irq_hooks[hook.irq]
        os.close(hook.fd)

    # -- DMA ------------------------------------------------------------------------------------

    def dma_held(self, owner, driver: str) -> int:
        """Bytes of DMA memory this driver holds in this host (whole pages)."""
        with self._lock:
            holder = self._t.holders.get((owner, driver))
        return 0 if holder is None else self.platform.physmem.held(holder)

    def alloc_dma(self, owner, driver: str, size: int) -> tuple[int, DmaRegion, int]:
        """``(handle, region, fd)``: ``size`` bytes rounded up to pages; fd a dup the caller owns.
        The quota is the caller's check (``dma_held`` before)."""
        with self._lock:
            holder = self._holder(owner, driver)
            if sum(1 for d in self._t.dma.values() if d.holder is holder) >= MAX_DMA_BUFFERS:
                raise ResourceError(errno.EMFILE, f"{driver} holds {MAX_DMA_BUFFERS} DMA buffers already")
        region = self.platform.physmem.alloc(size, holder)
        try:
            fd = os.dup(region.fd)
        except BaseException:
            self.platform.physmem.free(region.phys)
            raise
        with self._lock:
            handle = next(self._handles)
            self._t.dma[handle] = _Dma(holder, region)
        return handle, region, fd

    def free_dma(self, owner, driver: str, handle: int) -> None:
        with self._lock:
            dma = self._mine(self._t.dma, handle, owner, driver, "DMA buffer")
            del self._t.dma[handle]
        self.platform.physmem.free(dma.region.phys)

    # -- the end of a host ----------------------------------------------------------------------

    def release(self, owner) -> dict:
        """Everything ``owner`` held goes back: interrupts unhooked and masked, DMA freed,
        devices unbound and unclaimed, regions forgotten.  Returns what was released."""
        with self._lock:
            holders = [h for (o, _), h in self._t.holders.items() if o is owner]
            for h in holders:
                del self._t.holders[(owner, h.driver)]
            mine = set(holders)
            hooks = [(k, v) for k, v in self._t.hooks.items() if v.holder in mine]
            for handle, hook in hooks:
                self._drop_hook(handle, hook)
            regions = [k for k, v in self._t.regions.items() if v.holder in mine]
            for k in regions:
                del self._t.regions[k]
            dma = [k for k, v in self._t.dma.items() if v.holder in mine]
            for k in dma:
                del self._t.dma[k]
            claimed = [m for m, h in self._t.claims.items() if h in mine]
            for m in claimed:
                del self._t.claims[m]
        for _, hook in hooks:
            self.platform.mask(hook.irq)
        freed = sum(self.platform.release(h) for h in holders)
        self._poll_update()
        summary = {"drivers": sorted(h.driver for h in holders), "interrupts": sorted(h.irq for _, h in hooks),
                   "regions": len(regions), "dma_buffers": len(dma), "dma_bytes": freed,
                   "devices": sorted(m.name for m in claimed)}
        if holders:
            log.info("released %s", summary)
        return summary

    def close(self) -> None:
        """Stop the poller and the interrupt callback (the Device Manager is stopping)."""
        self._unregister()
        with self._lock:
            self._t.regions.clear()
            hooks = list(self._t.hooks.items())
            for handle, hook in hooks:
                self._drop_hook(handle, hook)
        self._poll_update()

    # -- introspection (tests, `drvbox hw`) -----------------------------------------------------

    def describe(self) -> dict:
        with self._lock:
            return {
                "claims": {m.name: str(h) for m, h in self._t.claims.items()},
                "interrupts": {irq: str(self._t.hooks[k].holder) for irq, k in self._t.irq_hooks.items()},
                "regions": [{"holder": str(r.holder), "device": r.model.name, "phys": r.phys, "length": r.length,
                             "mode": r.mode} for r in self._t.regions.values()],
                "dma": [{"holder": str(d.holder), "phys": d.region.phys, "size": d.region.size}
                        for d in self._t.dma.values()],
                "polling": self._poller is not None,
            }

    # -- the poller of mapped pages -------------------------------------------------------------

    def _mapped_models(self) -> list:
        with self._lock:
            return list({id(r.model): r.model for r in self._t.regions.values() if r.mode == "mapped"}.values())

    def _poll_update(self) -> None:
        """Start the poller when a mapped region exists, stop it when none does."""
        want = bool(self._mapped_models())
        with self._lock:
            if want and self._poller is None:
                self._poll_stop = threading.Event()
                self._poller = threading.Thread(target=self._poll, args=(self._poll_stop,),
                                                name="hw-poll", daemon=True)
                self._poller.start()
                return
            if want or self._poller is None:
                return
            stop, thread = self._poll_stop, self._poller
            self._poller = self._poll_stop = None
        stop.set()
        if thread is not threading.current_thread():
            thread.join()

    def _poll(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_interval):
            for model in self._mapped_models():
                try:
                    model.sync()
                except SimHwError as exc:           # keep polling the others
                    log.warning("sync of %s failed: %s", model.name, exc)
