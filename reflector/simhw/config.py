"""What a simulated device is: its model, its windows, its interrupt line, its model values.

:class:`DeviceConfig` is built in code (tests) or from ``HKLM\\Platform\\Devices\\<Name>``
(``reflector.simhw.registry``).  It checks only what one device can get wrong on its own (a
window that wraps, an IRQ out of range); what devices get wrong together (overlapping windows,
a shared IRQ) is the platform's check, because only it sees them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from reflector.simhw.errors import PlatformConfigError

__all__ = ["Window", "DeviceConfig", "MEM_LIMIT", "PORT_LIMIT", "IRQ_LIMIT"]

MEM_LIMIT = 1 << 64      # physical addresses are 64-bit
PORT_LIMIT = 1 << 16     # x86 port space: 0..0xFFFF
IRQ_LIMIT = 256          # interrupt lines 0..255


@dataclass(frozen=True)
class Window:
    """``length`` bytes at ``base`` in memory or port space."""

    base: int
    length: int

    @property
    def end(self) -> int:
        return self.base + self.length

    def holds(self, addr: int, length: int) -> bool:
        return self.base <= addr and addr + length <= self.end

    def overlaps(self, other: "Window") -> bool:
        return self.base < other.end and other.base < self.end

    def __str__(self) -> str:
        return f"{self.base:#x}+{self.length:#x}"


def _check_windows(name: str, kind: str, windows: tuple, limit: int) -> tuple[Window, ...]:
    base_name, len_name = ("MemBase", "MemLen") if kind == "mem" else ("IoBase", "IoLen")
    out = []
    for w in windows:
        if not isinstance(w, Window):
            w = Window(*w)
        if type(w.base) is not int or type(w.length) is not int:
            raise PlatformConfigError(name, base_name, f"window {w!r} must be two ints")
        if w.length <= 0:
            raise PlatformConfigError(name, len_name, f"is {w.length:#x}; a window needs at least one byte")
        if w.base < 0 or w.end > limit:
            raise PlatformConfigError(name, base_name, f"window {w} runs outside 0..{limit - 1:#x}")
        out.append(w)
    return tuple(out)


@dataclass(frozen=True)
class DeviceConfig:
    """One simulated device.

    ``mem``/``io``: windows as :class:`Window` or ``(base, length)`` pairs; ``irq``: the line the
    model raises, or None for a device whose interrupts are not wired; ``values``: the
    model-specific registry values (names compare case-insensitively), e.g. ``SizeBytes``.
    ``location``: where it was written, for messages.
    """

    name: str
    model: str
    mem: tuple[Window, ...] = ()
    io: tuple[Window, ...] = ()
    irq: int | None = None
    values: Mapping[str, object] = field(default_factory=dict)
    location: object = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PlatformConfigError(repr(self.name), None, "a device needs a non-empty name")
        if not isinstance(self.model, str):
            raise PlatformConfigError(self.name, "Model", f"must be a string, not {self.model!r}")
        object.__setattr__(self, "mem", _check_windows(self.name, "mem", tuple(self.mem), MEM_LIMIT))
        object.__setattr__(self, "io", _check_windows(self.name, "io", tuple(self.io), PORT_LIMIT))
        if not self.mem and not self.io:
            raise PlatformConfigError(self.name, None, "has no MemBase/MemLen and no IoBase/IoLen, so nothing "
                                      "could reach it", fix="give it a memory or a port window")
        if self.irq is not None and (type(self.irq) is not int or not 0 <= self.irq < IRQ_LIMIT):
            raise PlatformConfigError(self.name, "Irq", f"is {self.irq!r}, outside 0..{IRQ_LIMIT - 1}")
        folded = {str(k).casefold(): v for k, v in dict(self.values).items()}
        object.__setattr__(self, "values", MappingProxyType(folded))

    def value(self, name: str, default: object = None) -> object:
        """A model-specific value by case-insensitive name, or ``default``."""
        return self.values.get(name.casefold(), default)

    def int_value(self, name: str, default: int, lo: int, hi: int) -> int:
        """A model-specific integer value in ``lo..hi`` (``default`` when absent); else raise naming it."""
        v = self.value(name, default)
        if type(v) is not int or not lo <= v <= hi:
            raise PlatformConfigError(self.name, name, f"is {v!r}; expected an integer in {lo:#x}..{hi:#x}")
        return v
