"""A loopback UART (``COM1:`` on the simulated platform): what is written can be read back.

Software only for now (issue 5 moves it onto a simulated 16550).  Registry values:
``BaudRate`` (dword, default 115200; must be one of ``BAUD_RATES``).

Stream interface: ``write`` queues bytes into a FIFO of ``FIFO_SIZE`` bytes (what does not fit is
not consumed: the count returned is what fitted, and the overrun is flagged); ``read`` returns up
to ``len(out)`` queued bytes, 0 if none (it never blocks).  ``seek`` is not supported.

IOCTLs (CE ``CTL_CODE(FILE_DEVICE_SERIAL_PORT=0x1B, function, METHOD_BUFFERED, FILE_ANY_ACCESS)``,
the numbers of CE's ``pegdser.h``), all integers little-endian:

==============================  ==========  ===============================  ======================
code                            value       input                            output
==============================  ==========  ===============================  ======================
``IOCTL_SERIAL_SET_BAUD_RATE``  0x001B0004  u32 baud rate                    none
``IOCTL_SERIAL_PURGE``          0x001B004C  u32 flags (ignored: all purged)  none
``IOCTL_SERIAL_GET_BAUD_RATE``  0x001B0050  none                             u32 baud rate
``IOCTL_SERIAL_GET_COMMSTATUS`` 0x001B006C  none                             ``SERIAL_DEV_STATUS``
==============================  ==========  ===============================  ======================

``SERIAL_DEV_STATUS`` is 16 bytes, ``<IIII``: ``Errors`` (``CE_OVERRUN`` 0x2 if bytes were lost
since the last status read; reading clears it), ``Flags`` (0), ``cbInQue`` (bytes waiting to be
read), ``cbOutQue`` (0: a loopback sends at once).
"""

import errno
import threading

from hosts import DriverError, StreamDriver
from hosts.ioctl import FILE_DEVICE_SERIAL_PORT, ctl_code, pack_out, unpack_in

IOCTL_SERIAL_SET_BAUD_RATE = ctl_code(FILE_DEVICE_SERIAL_PORT, 1)
IOCTL_SERIAL_PURGE = ctl_code(FILE_DEVICE_SERIAL_PORT, 19)
IOCTL_SERIAL_GET_BAUD_RATE = ctl_code(FILE_DEVICE_SERIAL_PORT, 20)
IOCTL_SERIAL_GET_COMMSTATUS = ctl_code(FILE_DEVICE_SERIAL_PORT, 27)

CE_OVERRUN = 0x2
FIFO_SIZE = 4096
DEFAULT_BAUD = 115200
BAUD_RATES = frozenset({110, 300, 600, 1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600,
                        115200, 230400, 460800, 921600})


class Driver(StreamDriver):
    def init(self, ctx):
        self.device = ctx.device
        baud = ctx.registry.get("BaudRate", DEFAULT_BAUD)
        if baud not in BAUD_RATES:
            raise DriverError(errno.EINVAL, f"{ctx.device} BaudRate {baud!r} is not a standard rate")
        self.baud = baud
        self.lock = threading.Lock()
        self.fifo = bytearray()
        self.errors = 0

    def write(self, opened, data):
        with self.lock:
            room = FIFO_SIZE - len(self.fifo)
            n = min(room, len(data))
            self.fifo += data[:n]
            if n < len(data):
                self.errors |= CE_OVERRUN
        return n

    def read(self, opened, out):
        with self.lock:
            n = min(len(out), len(self.fifo))
            out[:n] = self.fifo[:n]
            del self.fifo[:n]
        return n

    def io_control(self, opened, code, inbuf, outbuf):
        if code == IOCTL_SERIAL_SET_BAUD_RATE:
            (baud,) = unpack_in(inbuf, "<I")
            if baud not in BAUD_RATES:
                raise DriverError(errno.EINVAL, f"baud rate {baud} is not supported")
            self.baud = baud
            return 0
        if code == IOCTL_SERIAL_GET_BAUD_RATE:
            unpack_in(inbuf, "")
            return pack_out(outbuf, "<I", self.baud)
        if code == IOCTL_SERIAL_GET_COMMSTATUS:
            unpack_in(inbuf, "")
            with self.lock:
                errors, self.errors = self.errors, 0
                queued = len(self.fifo)
            return pack_out(outbuf, "<IIII", errors, 0, queued, 0)
        if code == IOCTL_SERIAL_PURGE:
            unpack_in(inbuf, "<I")
            with self.lock:
                self.fifo.clear()
            return 0
        raise DriverError(errno.ENOTTY, f"unknown IOCTL {code:#010x}")
