"""The simulated platform: models attached at their addresses, one DMA zone, the interrupt lines.

The Reflector reaches hardware only through this object, and only after its own policy check:
``find_mem`` / ``mem_read`` / ``mem_write`` for memory windows, ``port_read`` / ``port_write``
for port windows, ``mask`` / ``unmask`` and ``on_interrupt`` for interrupts, ``physmem`` for
DMA, ``bind_dma`` to say which owner's DMA memory a device may reach, and ``release`` when a
host dies.  The platform checks addresses again on its own (every access must lie within one
window of one device), because a policy bug should not become an access to the wrong device.

Attaching refuses, with both devices named: overlapping memory windows, overlapping port
windows, a memory window inside the DMA zone, two devices on one IRQ, two devices of one name.
The set of devices is fixed once built, so lookups take no lock; each model has its own lock.
"""

from __future__ import annotations

import threading
from typing import Callable

from reflector.simhw.blockdev import BlockDevice
from reflector.simhw.config import DeviceConfig, Window
from reflector.simhw.errors import AddressError, PlatformConfigError, SimHwError
from reflector.simhw.gpio import GpioBank
from reflector.simhw.interrupts import InterruptLines
from reflector.simhw.model import DeviceModel
from reflector.simhw.physmem import PhysicalMemory
from reflector.simhw.registry import configs_from_hive, dma_zone_from_hive
from reflector.simhw.uart16550 import Uart16550

__all__ = ["MODELS", "Platform"]

# The closed set of models, by the registry's Model value.  Anything else is refused.
MODELS: dict[str, type[DeviceModel]] = {
    "uart16550": Uart16550,
    "blockdev": BlockDevice,
    "ramdisk": BlockDevice,
    "gpio": GpioBank,
}


def _window_names(kind: str) -> tuple[str, str]:
    return ("MemBase", "MemLen") if kind == "mem" else ("IoBase", "IoLen")


def _show(kind: str, w: Window) -> str:
    b, n = _window_names(kind)
    return f"{b} {w.base:#x} {n} {w.length:#x}"


class Platform:
    """Devices at fixed addresses.  ``physmem`` defaults to a new :class:`PhysicalMemory`."""

    def __init__(self, devices: list[DeviceConfig], physmem: PhysicalMemory | None = None) -> None:
        self.physmem = physmem if physmem is not None else PhysicalMemory()
        self._check_layout(devices)
        self._models: dict[str, DeviceModel] = {}
        self._mem: list[tuple[Window, DeviceModel]] = []
        self._io: list[tuple[Window, DeviceModel]] = []
        try:
            for config in devices:
                cls = MODELS.get(config.model)
                if cls is None:
                    raise PlatformConfigError(config.name, "Model", f"is {config.model!r}, which is no simulated model",
                                              location=config.location, fix="use one of " + ", ".join(sorted(MODELS)))
                model = cls(config, self.physmem)
                self._models[config.name.casefold()] = model
                self._mem += [(w, model) for w in config.mem]
                self._io += [(w, model) for w in config.io]
        except BaseException:
            for model in self._models.values():
                model.close()
            raise
        self._lines = InterruptLines({m.config.irq: m for m in self._models.values() if m.config.irq is not None})
        for model in self._models.values():
            model._line_listener = self._lines.line_changed

    @classmethod
    def from_registry(cls, hive, physmem: PhysicalMemory | None = None) -> "Platform":
        """The devices under ``HKLM\\Platform\\Devices`` of ``hive`` (an empty platform if none).

        Without ``physmem``, the DMA zone is ``DmaBase``/``DmaSize`` of ``HKLM\\Platform`` if given,
        else the default one."""
        configs = configs_from_hive(hive)
        if physmem is None:
            zone = dma_zone_from_hive(hive)
            if zone is not None:
                try:
                    physmem = PhysicalMemory(*zone)
                except ValueError as e:
                    raise PlatformConfigError("(platform)", "DmaBase", str(e)) from None
        return cls(configs, physmem)

    def _check_layout(self, devices: list[DeviceConfig]) -> None:
        names: dict[str, DeviceConfig] = {}
        irqs: dict[int, DeviceConfig] = {}
        windows: list[tuple[str, Window, DeviceConfig]] = []
        zone = Window(self.physmem.base, self.physmem.size)
        for d in devices:
            if not isinstance(d, DeviceConfig):
                raise TypeError(f"Platform takes DeviceConfig objects, not {type(d).__name__}")
            other = names.get(d.name.casefold())
            if other is not None:
                raise PlatformConfigError(d.name, None, f"is defined twice (also as {other.name})", location=d.location)
            names[d.name.casefold()] = d
            if d.irq is not None:
                other = irqs.get(d.irq)
                if other is not None:
                    raise PlatformConfigError(d.name, "Irq", f"{d.irq} is already the line of device {other.name}; "
                                              "simulated IRQs are not shared", location=d.location,
                                              fix="give each device its own Irq")
                irqs[d.irq] = d
            for kind, ws in (("mem", d.mem), ("io", d.io)):
                for w in ws:
                    for okind, ow, od in windows:
                        if okind == kind and w.overlaps(ow):
                            other_name = "itself" if od is d else f"device {od.name}"
                            raise PlatformConfigError(
                                d.name, _window_names(kind)[0],
                                f"window {_show(kind, w)} overlaps {other_name} {_show(kind, ow)}",
                                location=d.location, fix="move one of them under HKLM\\Platform\\Devices")
                    if kind == "mem" and w.overlaps(zone):
                        raise PlatformConfigError(
                            d.name, "MemBase", f"window {_show(kind, w)} overlaps the DMA zone "
                            f"{zone.base:#x}..{zone.end:#x}", location=d.location,
                            fix="move the device below the DMA zone")
                    windows.append((kind, w, d))

    # -- devices --------------------------------------------------------------------------------

    def device(self, name: str) -> DeviceModel:
        """The model of device ``name`` (case-insensitive); LookupError lists the names there are."""
        model = self._models.get(str(name).casefold())
        if model is None:
            known = ", ".join(m.name for m in self._models.values()) or "none"
            raise LookupError(f"no simulated device {name!r} (devices: {known})")
        return model

    def devices(self) -> list[DeviceModel]:
        return list(self._models.values())

    def describe(self) -> list[dict]:
        """Every device, its windows, IRQ state and model state (for ``drvbox hw``)."""
        out = []
        for model in self._models.values():
            d = model.describe()
            irq = model.config.irq
            d["masked"] = self._lines.is_masked(irq) if irq is not None else None
            d["delivered"] = self._lines.delivered.get(irq, 0) if irq is not None else 0
            d["dma_owner"] = None if model.dma_owner is None else str(model.dma_owner)
            out.append(d)
        return out

    # -- memory and port windows ----------------------------------------------------------------

    def find_mem(self, phys: int, length: int) -> tuple[DeviceModel, int]:
        """The model whose memory window holds all of ``[phys, phys + length)``, and the offset in it."""
        return self._find(self._mem, "memory", phys, length)

    def find_port(self, port: int, length: int) -> tuple[DeviceModel, int]:
        """The model whose port window holds all of ``[port, port + length)``, and the offset in it."""
        return self._find(self._io, "port", port, length)

    @staticmethod
    def _find(windows: list[tuple[Window, DeviceModel]], what: str, addr: int, length: int) -> tuple[DeviceModel, int]:
        if type(addr) is not int or type(length) is not int or addr < 0 or length <= 0:
            raise AddressError(f"{what} range {addr!r}+{length!r} must be a non-negative address and a positive length")
        for window, model in windows:
            if window.holds(addr, length):
                return model, addr - window.base
        raise AddressError(f"{what} range {addr:#x}+{length:#x} is not within one window of a simulated device")

    def mem_read(self, phys: int, width: int) -> int:
        model, offset = self.find_mem(phys, width)
        return model.read(offset, width)

    def mem_write(self, phys: int, value: int, width: int) -> None:
        model, offset = self.find_mem(phys, width)
        model.write(offset, value, width)

    def port_read(self, port: int, width: int) -> int:
        model, offset = self.find_port(port, width)
        return model.read(offset, width)

    def port_write(self, port: int, value: int, width: int) -> None:
        model, offset = self.find_port(port, width)
        model.write(offset, value, width)

    def sync(self, name: str | None = None) -> int:
        """Fold in writes to mapped register pages (one device, or all); returns the writes seen."""
        models = [self.device(name)] if name is not None else self.devices()
        return sum(m.sync() for m in models if m.page_fd is not None)

    def poll(self, stop: threading.Event, interval: float) -> None:
        """Sync every mapped page each ``interval`` seconds until ``stop`` is set (run it in a thread)."""
        while not stop.wait(interval):
            self.sync()

    # -- interrupts -----------------------------------------------------------------------------

    def on_interrupt(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """``callback(irq)`` on each delivered interrupt; returns an unregister function."""
        return self._lines.on_interrupt(callback)

    def mask(self, irq: int) -> None:
        self._lines.mask(irq)

    def unmask(self, irq: int) -> None:
        """Enable ``irq`` (``InterruptInitialize``) or re-enable it (``InterruptDone``)."""
        self._lines.unmask(irq)

    def is_masked(self, irq: int) -> bool:
        return self._lines.is_masked(irq)

    # -- DMA ------------------------------------------------------------------------------------

    def bind_dma(self, name: str, owner: object) -> None:
        """Let device ``name`` reach the DMA memory of ``owner`` (and only that), like an IOMMU
        domain.  An unbound device reaches no memory at all."""
        if owner is None:
            raise SimHwError(f"bind_dma({name!r}, None): use unbind_dma to take a device's DMA away")
        model = self.device(name)
        with model._lock:
            model.dma_owner = owner

    def unbind_dma(self, name: str) -> None:
        model = self.device(name)
        with model._lock:
            model.dma_owner = None

    def release(self, owner: object) -> int:
        """A host died or restarted: free its DMA buffers and unbind the devices bound to it.
        Returns the bytes freed.  Interrupt lines are the Reflector's to mask (it knows which
        registrations the host had)."""
        for model in self._models.values():
            with model._lock:
                if model.dma_owner == owner:
                    model.dma_owner = None
        return self.physmem.free_owner(owner)

    def close(self) -> None:
        for model in self._models.values():
            model.close()
        self.physmem.close()
