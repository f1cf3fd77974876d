"""A bank of 32 GPIO pins with edge interrupts (``Model`` ``gpio``).

Registers (32-bit, little-endian, one bit per pin, offsets from ``MemBase``):

====== ============ == ==================================================================
offset name         rw meaning
====== ============ == ==================================================================
0x00   DIR          rw 1 = output, 0 = input (the reset state: all inputs)
0x04   OUT          rw the output latch (drives the pins that are outputs)
0x08   LEVEL        r  the level of each pin: OUT for outputs, the outside level for inputs
0x0C   RISE_EN      rw latch an interrupt on a 0 -> 1 edge of LEVEL
0x10   FALL_EN      rw latch an interrupt on a 1 -> 0 edge of LEVEL
0x14   INT_STATUS   rw latched edges; write 1 to clear
0x18   INT_CLEAR    w  write 1 to clear INT_STATUS bits; reads 0 (for mapped mode)
0x1C   OUT_SET      w  write 1 to set OUT bits; reads 0
0x20   OUT_CLEAR    w  write 1 to clear OUT bits; reads 0
====== ============ == ==================================================================

The interrupt line is asserted while INT_STATUS is not 0.  Edges are detected on LEVEL, whatever
makes it change: the outside (``set_input``), the driver driving an output, or a pin changing
direction; an edge is latched only if enabled at the moment it happens.

Mapped mode works fully through INT_CLEAR, OUT_SET and OUT_CLEAR, which read 0 so that every
non-zero write is seen at the next sync; INT_STATUS's own write-1-to-clear cannot be seen there
when the driver writes back the value it just read.
"""

from __future__ import annotations

from reflector.simhw.config import DeviceConfig
from reflector.simhw.model import DeviceModel
from reflector.simhw.physmem import PhysicalMemory

__all__ = ["GpioBank", "PINS"]

PINS = 32
_ALL = (1 << PINS) - 1
REG_DIR, REG_OUT, REG_LEVEL, REG_RISE_EN, REG_FALL_EN = 0x00, 0x04, 0x08, 0x0C, 0x10
REG_INT_STATUS, REG_INT_CLEAR, REG_OUT_SET, REG_OUT_CLEAR = 0x14, 0x18, 0x1C, 0x20


class GpioBank(DeviceModel):
    MODEL = "gpio"
    REG_WIDTH = 4
    REG_SPAN = 0x24
    MAPPED_LIMITS = ("writing back to INT_STATUS the value it shows is invisible: clear through INT_CLEAR; "
                     "a write to OUT that a sync folds in after another register's write is applied in "
                     "address order.")

    def __init__(self, config: DeviceConfig, physmem: PhysicalMemory) -> None:
        super().__init__(config, physmem)
        self._dir = self._out = self._inputs = 0
        self._rise = self._fall = self._status = 0
        self._level = 0
        with self._op():
            pass

    # -- outside the driver ---------------------------------------------------------------------

    def set_input(self, pin: int, level: bool | int) -> None:
        """Drive input ``pin`` from outside (a button, a sensor).  Ignored on a pin set as output,
        as a real pad's input buffer would show the driven level instead."""
        self._check_pin(pin)
        with self._op():
            bit = 1 << pin
            self._inputs = (self._inputs | bit) if level else (self._inputs & ~bit)
            self._update_level()

    def level(self, pin: int) -> int:
        """The level of ``pin`` now (an output's driven value, or an input's outside level)."""
        self._check_pin(pin)
        with self._lock:
            return self._level >> pin & 1

    def outputs(self) -> int:
        """Bit mask of the pins driven high by the driver (outputs whose latch is 1)."""
        with self._lock:
            return self._out & self._dir

    def _check_pin(self, pin: int) -> None:
        if type(pin) is not int or not 0 <= pin < PINS:
            raise ValueError(f"{self.name}: pin {pin!r} is not one of 0..{PINS - 1}")

    # -- internals ------------------------------------------------------------------------------

    def _update_level(self) -> None:
        new = (self._out & self._dir) | (self._inputs & ~self._dir & _ALL)
        rising, falling = new & ~self._level, self._level & ~new
        self._status |= (rising & self._rise) | (falling & self._fall)
        self._level = new

    def _registers(self) -> list[int]:
        # DIR, OUT, LEVEL, RISE_EN, FALL_EN, INT_STATUS, then INT_CLEAR, OUT_SET, OUT_CLEAR read 0.
        return [self._dir, self._out, self._level, self._rise, self._fall, self._status, 0, 0, 0]

    def _peek_reg(self, offset: int) -> int:
        return self._registers()[offset // 4]

    def _read_reg(self, offset: int) -> int:
        return self._peek_reg(offset)

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == REG_DIR:
            self._dir = value
        elif offset == REG_OUT:
            self._out = value
        elif offset == REG_RISE_EN:
            self._rise = value
        elif offset == REG_FALL_EN:
            self._fall = value
        elif offset in (REG_INT_STATUS, REG_INT_CLEAR):
            self._status &= ~value
        elif offset == REG_OUT_SET:
            self._out |= value
        elif offset == REG_OUT_CLEAR:
            self._out &= ~value
        self._update_level()

    def _line(self) -> bool:
        return self._status != 0

    def _state(self) -> dict:
        return {"dir": self._dir, "out": self._out, "level": self._level, "inputs": self._inputs,
                "rise_en": self._rise, "fall_en": self._fall, "int_status": self._status}
