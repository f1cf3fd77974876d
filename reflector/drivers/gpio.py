"""A GPIO bank driver (``GIO1:`` on the simulated platform): 32 pins, edge interrupts.

The driver maps the bank's registers (``reflector/simhw/gpio.py``) with ``map_io_space`` and
hooks its IRQ.  It works in ``mapped`` mode (the built-in platform's choice: register reads are
memory reads, no round trip) and in ``mediated`` mode alike.  In mapped mode the device sees a
write at the Reflector's next poll of the page (about a millisecond), so after each change the
driver waits until the device has taken it -- a *fence*: it writes a register that reads 0 (the
``OUT_SET``/``OUT_CLEAR``/``INT_CLEAR`` registers) and waits until it reads 0 again -- so an
IOCTL returns only when the pins are as asked.  In mediated mode that wait ends at once.

Each pin is an input or an output (all inputs at reset).  An output pin reads back what was last
set on it; an input pin reads the level the outside world drives (``drvbox hw gpio-set``).
Setting or clearing an input pin changes its output latch only, which takes effect when the pin
becomes an output.

Registry values (of the driver key): ``MemBase`` (dword, required), ``Irq`` (dword; without it
``IOCTL_GPIO_WAIT_EDGES`` fails with ``ENOTSUP``), ``Directions`` (dword, initial direction mask,
1 = output, default 0), ``MaxWaitMs`` (dword, the longest ``IOCTL_GPIO_WAIT_EDGES`` waits, default
``MAX_WAIT_MS``).  Keep ``MaxWaitMs`` well below the group's ``ProcTimeout``: a request that outlives
it gets the host killed, and with it every driver the host holds.

Stream interface: ``read`` of at least 4 bytes returns the pin levels as ``<I``; nothing else.

IOCTLs (``CTL_CODE(FILE_DEVICE_VENDOR=0x8000, 0x800 + n, METHOD_BUFFERED, FILE_ANY_ACCESS)``),
little-endian; bit *n* of each mask is pin *n*:

=============================  ==========  ===========================  ==================
code                           value       input                        output
=============================  ==========  ===========================  ==================
``IOCTL_GPIO_SET_PINS``        0x80002000  ``<I`` pins to drive high    none
``IOCTL_GPIO_CLEAR_PINS``      0x80002004  ``<I`` pins to drive low     none
``IOCTL_GPIO_READ_PINS``       0x80002008  none                         ``<I`` pin levels
``IOCTL_GPIO_SET_DIRECTION``   0x8000200C  ``<II`` mask, directions     none
``IOCTL_GPIO_GET_DIRECTION``   0x80002010  none                         ``<I`` 1 = output
``IOCTL_GPIO_WAIT_EDGES``      0x80002014  ``<III`` rising, falling,    ``<I`` pins whose
                                           timeout in ms                edge came (0: timeout)
=============================  ==========  ===========================  ==================

``IOCTL_GPIO_SET_DIRECTION`` changes only the pins in ``mask``, each to its bit in ``directions``.
``IOCTL_GPIO_WAIT_EDGES`` enables edge detection for the given pins (rising on the first mask,
falling on the second), forgets edges latched before, and waits on the interrupt up to the
timeout (cut to ``MaxWaitMs``; a caller wanting longer asks again) for one of them.  One waiter at
a time: a second one fails at once with ``EBUSY`` rather than queue behind the first, since waits
queued one after another would add up past the host's timeout.
"""

import errno
import threading
import time

from hosts import DriverError, StreamDriver
from hosts.ioctl import (FILE_DEVICE_VENDOR, FUNCTION_VENDOR, ctl_code, pack_out, registry_dword,
                         unpack_in)

IOCTL_GPIO_SET_PINS = ctl_code(FILE_DEVICE_VENDOR, FUNCTION_VENDOR + 0)
IOCTL_GPIO_CLEAR_PINS = ctl_code(FILE_DEVICE_VENDOR, FUNCTION_VENDOR + 1)
IOCTL_GPIO_READ_PINS = ctl_code(FILE_DEVICE_VENDOR, FUNCTION_VENDOR + 2)
IOCTL_GPIO_SET_DIRECTION = ctl_code(FILE_DEVICE_VENDOR, FUNCTION_VENDOR + 3)
IOCTL_GPIO_GET_DIRECTION = ctl_code(FILE_DEVICE_VENDOR, FUNCTION_VENDOR + 4)
IOCTL_GPIO_WAIT_EDGES = ctl_code(FILE_DEVICE_VENDOR, FUNCTION_VENDOR + 5)

PINS = 32
ALL = (1 << PINS) - 1
MAX_WAIT_MS = 1_000          # default of MaxWaitMs; a client's wait must never reach ProcTimeout
FENCE_TIMEOUT_S = 2.0

# Registers (reflector/simhw/gpio.py).
DIR, OUT, LEVEL, RISE_EN, FALL_EN = 0x00, 0x04, 0x08, 0x0C, 0x10
INT_STATUS, INT_CLEAR, OUT_SET, OUT_CLEAR = 0x14, 0x18, 0x1C, 0x20
REG_SPAN = 0x24


class Driver(StreamDriver):
    def init(self, ctx):
        if ctx.kernel is None:
            raise DriverError(errno.ENODEV, f"{ctx.device}: no ctx.kernel, so no hardware to drive")
        self.device = ctx.device
        self.lock = threading.Lock()
        self.waiting = threading.Lock()
        self.regs = ctx.kernel.map_io_space(registry_dword(ctx, "MemBase"), REG_SPAN)
        irq = ctx.registry.get("Irq")
        self.intr = ctx.kernel.interrupt(registry_dword(ctx, "Irq")) if irq is not None else None
        self.max_wait_ms = registry_dword(ctx, "MaxWaitMs", MAX_WAIT_MS)
        with self.lock:
            self._write(DIR, registry_dword(ctx, "Directions", 0) & ALL)

    def deinit(self):
        if self.intr is not None:
            self.intr.close()
        self.regs.close()

    # -- the bank -----------------------------------------------------------------------------

    def _settle(self, reg):
        """Wait until the self-clearing register ``reg`` reads 0: the device has taken the write."""
        deadline = time.monotonic() + FENCE_TIMEOUT_S
        while self.regs.read32(reg):
            if time.monotonic() > deadline:
                raise DriverError(errno.ETIMEDOUT, f"{self.device}: the GPIO bank did not take a write "
                                                   f"to register {reg:#x} within {FENCE_TIMEOUT_S}s")
            time.sleep(0.0002)

    def _strobe(self, reg, mask):
        """Write a self-clearing register (OUT_SET, OUT_CLEAR, INT_CLEAR) and wait for it."""
        if mask:
            self.regs.write32(reg, mask)
            self._settle(reg)

    def _write(self, reg, value):
        """Write an ordinary register, then fence with a write that changes nothing: clearing
        output bits that are already clear (or setting all, when all are set)."""
        self.regs.write32(reg, value)
        out = self.regs.read32(OUT)
        if out != ALL:
            self._strobe(OUT_CLEAR, ~out & ALL)
        else:
            self._strobe(OUT_SET, ALL)

    # -- the stream interface -----------------------------------------------------------------

    def read(self, opened, out):
        return pack_out(out, "<I", self.regs.read32(LEVEL))

    def io_control(self, opened, code, inbuf, outbuf):
        if code == IOCTL_GPIO_SET_PINS:
            (mask,) = unpack_in(inbuf, "<I")
            with self.lock:
                self._strobe(OUT_SET, mask)
            return 0
        if code == IOCTL_GPIO_CLEAR_PINS:
            (mask,) = unpack_in(inbuf, "<I")
            with self.lock:
                self._strobe(OUT_CLEAR, mask)
            return 0
        if code == IOCTL_GPIO_READ_PINS:
            unpack_in(inbuf, "")
            return pack_out(outbuf, "<I", self.regs.read32(LEVEL))
        if code == IOCTL_GPIO_SET_DIRECTION:
            mask, directions = unpack_in(inbuf, "<II")
            with self.lock:
                current = self.regs.read32(DIR)
                self._write(DIR, (current & ~mask & ALL) | (directions & mask))
            return 0
        if code == IOCTL_GPIO_GET_DIRECTION:
            unpack_in(inbuf, "")
            return pack_out(outbuf, "<I", self.regs.read32(DIR))
        if code == IOCTL_GPIO_WAIT_EDGES:
            rising, falling, timeout_ms = unpack_in(inbuf, "<III")
            if len(outbuf) < 4:
                raise DriverError(errno.ENOBUFS, "IOCTL_GPIO_WAIT_EDGES answers 4 bytes")
            return pack_out(outbuf, "<I", self._wait_edges(rising, falling, min(timeout_ms, self.max_wait_ms) / 1000))
        raise DriverError(errno.ENOTTY, f"unknown IOCTL {code:#010x}")

    def _wait_edges(self, rising, falling, timeout):
        if self.intr is None:
            raise DriverError(errno.ENOTSUP, f"{self.device}: no Irq in the registry, so no edge interrupts")
        wanted = rising | falling
        if not self.waiting.acquire(blocking=False):
            raise DriverError(errno.EBUSY, f"{self.device}: another client is waiting for edges")
        try:
            with self.lock:
                self._write(RISE_EN, rising)
                self._write(FALL_EN, falling)
                self._strobe(INT_CLEAR, ALL)              # edges from before the wait do not count
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                fired = self.intr.wait(max(remaining, 0))
                with self.lock:
                    latched = self.regs.read32(INT_STATUS)
                    self._strobe(INT_CLEAR, latched)       # the line drops before InterruptDone
                if fired:
                    self.intr.done()
                if latched & wanted or remaining <= 0:
                    return latched & wanted
        finally:
            self.waiting.release()
