"""A bank of 32 GPIO pins (``GIO1:`` on the simulated platform).

Software only for now (issue 5 moves it onto simulated hardware).  Each pin is an input or an
output (all inputs at start).  An output pin reads back what was last set on it; an input pin
reads the level the outside world drives, which here is the registry value ``InputLevels``
(dword bit mask, default 0).  Setting or clearing an input pin changes its output latch only,
which takes effect when the pin becomes an output.

Registry values: ``InputLevels`` (dword, default 0), ``Directions`` (dword, initial direction
mask, 1 = output, default 0).

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
=============================  ==========  ===========================  ==================

``IOCTL_GPIO_SET_DIRECTION`` changes only the pins in ``mask``, each to its bit in ``directions``.
"""

import errno
import threading

from hosts import DriverError, StreamDriver
from hosts.ioctl import FILE_DEVICE_VENDOR, FUNCTION_VENDOR, ctl_code, pack_out, unpack_in

IOCTL_GPIO_SET_PINS = ctl_code(FILE_DEVICE_VENDOR, FUNCTION_VENDOR + 0)
IOCTL_GPIO_CLEAR_PINS = ctl_code(FILE_DEVICE_VENDOR, FUNCTION_VENDOR + 1)
IOCTL_GPIO_READ_PINS = ctl_code(FILE_DEVICE_VENDOR, FUNCTION_VENDOR + 2)
IOCTL_GPIO_SET_DIRECTION = ctl_code(FILE_DEVICE_VENDOR, FUNCTION_VENDOR + 3)
IOCTL_GPIO_GET_DIRECTION = ctl_code(FILE_DEVICE_VENDOR, FUNCTION_VENDOR + 4)

PINS = 32
ALL = (1 << PINS) - 1


class Driver(StreamDriver):
    def init(self, ctx):
        self.inputs = ctx.registry.get("InputLevels", 0) & ALL
        self.directions = ctx.registry.get("Directions", 0) & ALL
        self.latch = 0
        self.lock = threading.Lock()

    def levels(self) -> int:
        with self.lock:
            return (self.latch & self.directions) | (self.inputs & ~self.directions & ALL)

    def read(self, opened, out):
        return pack_out(out, "<I", self.levels())

    def io_control(self, opened, code, inbuf, outbuf):
        if code == IOCTL_GPIO_SET_PINS:
            (mask,) = unpack_in(inbuf, "<I")
            with self.lock:
                self.latch |= mask
            return 0
        if code == IOCTL_GPIO_CLEAR_PINS:
            (mask,) = unpack_in(inbuf, "<I")
            with self.lock:
                self.latch &= ~mask & ALL
            return 0
        if code == IOCTL_GPIO_READ_PINS:
            unpack_in(inbuf, "")
            return pack_out(outbuf, "<I", self.levels())
        if code == IOCTL_GPIO_SET_DIRECTION:
            mask, directions = unpack_in(inbuf, "<II")
            with self.lock:
                self.directions = (self.directions & ~mask & ALL) | (directions & mask)
            return 0
        if code == IOCTL_GPIO_GET_DIRECTION:
            unpack_in(inbuf, "")
            return pack_out(outbuf, "<I", self.directions)
        raise DriverError(errno.ENOTTY, f"unknown IOCTL {code:#010x}")
