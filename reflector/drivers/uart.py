"""A 16550 UART driver (``COM1:`` on the simulated platform), through its port window and IRQ.

The driver reaches the chip only through ``ctx.kernel``: ``read_port``/``write_port`` on the
8 registers at ``IoBase`` (each a checked call, so every side effect is exact: reading RBR pops
the receive FIFO) and ``interrupt(Irq)`` for received data.  It runs unchanged in a sandboxed
host or in the Device Manager.

Registry values (of the driver key): ``IoBase`` (dword, required), ``Irq`` (dword, required),
``BaudRate`` (dword, default 115200; one of ``BAUD_RATES``), ``Loopback`` (dword, default 1).

**Loopback** (``Loopback`` = 1, the built-in platform's choice): MCR bit 4 loops the transmitter
into the receiver inside the chip, so what an application writes it reads back
(``drvbox write COM1: hello; drvbox read COM1: 5`` gives ``hello``), and the serial line is
disconnected.  **Line** (``Loopback`` = 0): written bytes leave on the line (``drvbox hw
uart-take-tx``), and bytes arriving on it (``drvbox hw uart-feed``) are read.

Receiving: an interrupt service thread waits on the IRQ, drains RBR while LSR.DR into a receive
buffer of ``FIFO_SIZE`` bytes, and calls ``done()`` (CE's ``InterruptDone``).  When the buffer is
full the driver stops taking bytes from the chip (IER's receive interrupt off) until ``read``
makes room, so with the line's flow control nothing is lost.  ``read`` also drains what the chip
holds, so it returns at once what has arrived; it never blocks (0 if nothing).

Writing: bytes go to THR one by one (the simulated line is infinitely fast: THRE is always set).
In loopback the receive buffer is the only place they can go: ``write`` consumes at most the room
left in it, flags ``CE_OVERRUN`` for the rest and returns the count it took.

**A real serial device** (``DevicePath``, e.g. a pseudo-terminal ``/dev/pts/3`` or ``/dev/ttyS0``,
which the policy's ``DeviceNodes`` must list with ``:rw``): instead of the simulated chip, the
driver asks the Reflector to open the node (``open_device``) and reads and writes the fd it is
passed (non-blocking: ``read`` returns what has arrived, ``write`` what the device took).  No port
window or IRQ is needed then, and the line settings are the device's own (the baud rate IOCTLs
only record the rate: setting it would be a terminal ioctl, which the host's seccomp lets through
only when ``DeviceNodes`` names it).

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
read), ``cbOutQue`` (0: the line sends at once).  The baud rate programs the chip's divisor latch.
"""

import errno
import os
import threading

from hosts import DriverError, StreamDriver
from hosts.ioctl import FILE_DEVICE_SERIAL_PORT, ctl_code, pack_out, registry_dword, unpack_in

IOCTL_SERIAL_SET_BAUD_RATE = ctl_code(FILE_DEVICE_SERIAL_PORT, 1)
IOCTL_SERIAL_PURGE = ctl_code(FILE_DEVICE_SERIAL_PORT, 19)
IOCTL_SERIAL_GET_BAUD_RATE = ctl_code(FILE_DEVICE_SERIAL_PORT, 20)
IOCTL_SERIAL_GET_COMMSTATUS = ctl_code(FILE_DEVICE_SERIAL_PORT, 27)

CE_OVERRUN = 0x2
FIFO_SIZE = 4096
DEFAULT_BAUD = 115200
BAUD_RATES = frozenset({110, 300, 600, 1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600,
                        115200, 230400, 460800, 921600})
CLOCK = 115200                          # 1.8432 MHz / 16: divisor = CLOCK // baud
HW_FIFO = 16                            # the 16550's receive FIFO

# 16550 registers (offsets from IoBase) and bits.
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR = 3, 4, 5, 6
IER_RDA, IER_RLS = 0x01, 0x04
IIR_NONE, IIR_SOURCE = 0x01, 0x0E
IIR_RLS, IIR_MS = 0x06, 0x00
FCR_ENABLE_CLEAR = 0x07                 # FIFOs on, both cleared, trigger at 1 byte
LCR_8N1, LCR_DLAB = 0x03, 0x80
MCR_DTR, MCR_RTS, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x08, 0x10
LSR_DR, LSR_OE = 0x01, 0x02
IST_POLL_S = 0.2                        # how often the interrupt thread looks for deinit


class Driver(StreamDriver):
    def init(self, ctx):
        if ctx.kernel is None:
            raise DriverError(errno.ENODEV, f"{ctx.device}: no ctx.kernel, so no hardware to drive")
        self.device = ctx.device
        self.kernel = ctx.kernel
        path = ctx.registry.get("DevicePath")
        if path is not None:
            return self._init_device(ctx, path)
        self.fd = None
        self.base = registry_dword(ctx, "IoBase")
        irq = registry_dword(ctx, "Irq")
        baud = registry_dword(ctx, "BaudRate", DEFAULT_BAUD)
        if baud not in BAUD_RATES:
            raise DriverError(errno.EINVAL, f"{ctx.device} BaudRate {baud!r} is not a standard rate")
        self.loopback = bool(registry_dword(ctx, "Loopback", 1))
        self.lock = threading.Lock()
        self.rx = bytearray()
        self.errors = 0
        self.paused = False
        with self.lock:
            self._program(baud)
        self.intr = self.kernel.interrupt(irq)
        self.stopping = threading.Event()
        self.ist = threading.Thread(target=self._ist, name=f"{ctx.device}-ist", daemon=True)
        self.ist.start()

    def _init_device(self, ctx, path):
        if not isinstance(path, str):
            raise DriverError(errno.EINVAL, f"{ctx.device}: DevicePath is {path!r}; expected a string")
        baud = registry_dword(ctx, "BaudRate", DEFAULT_BAUD)
        if baud not in BAUD_RATES:
            raise DriverError(errno.EINVAL, f"{ctx.device} BaudRate {baud!r} is not a standard rate")
        self.baud = baud
        self.lock = threading.Lock()
        self.errors = 0
        self.fd = self.kernel.open_device(path, os.O_RDWR | os.O_NONBLOCK)

    def deinit(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            return
        self.stopping.set()
        self.ist.join(4 * IST_POLL_S)
        self.intr.close()
        with self.lock:
            self._out(IER, 0)

    # -- the chip ---------------------------------------------------------------------------

    def _in(self, reg):
        return self.kernel.read_port(self.base + reg, 1)

    def _out(self, reg, value):
        self.kernel.write_port(self.base + reg, value, 1)

    def _program(self, baud):
        """8N1 at ``baud``, FIFOs on, loopback as configured, receive interrupts on (lock held)."""
        self._set_baud(baud)
        self._out(FCR, FCR_ENABLE_CLEAR)
        self._out(MCR, MCR_DTR | MCR_RTS | MCR_OUT2 | (MCR_LOOP if self.loopback else 0))
        self._out(IER, IER_RDA | IER_RLS)

    def _set_baud(self, baud):
        divisor = CLOCK // baud
        self._out(LCR, LCR_8N1 | LCR_DLAB)
        self._out(DLL, divisor & 0xFF)
        self._out(DLM, divisor >> 8)
        self._out(LCR, LCR_8N1)
        self.baud = baud

    def _drain(self):
        """Move what the chip has received into ``rx`` while there is room (lock held)."""
        while True:
            lsr = self._in(LSR)
            if lsr & LSR_OE:
                self.errors |= CE_OVERRUN
            if not lsr & LSR_DR:
                return
            if len(self.rx) >= FIFO_SIZE:
                if not self.paused:             # leave it in the chip: the line's flow control holds the rest
                    self.paused = True
                    self._out(IER, IER_RLS)
                return
            self.rx.append(self._in(RBR))

    def _resume(self):
        if self.paused and len(self.rx) < FIFO_SIZE:
            self.paused = False
            self._out(IER, IER_RDA | IER_RLS)

    def _ist(self):
        """The interrupt service thread: CE's IST, WaitForSingleObject then InterruptDone."""
        while not self.stopping.is_set():
            if not self.intr.wait(IST_POLL_S):
                continue
            with self.lock:
                for _ in range(64):             # every pending source, highest priority first
                    iir = self._in(IIR)
                    if iir & IIR_NONE:
                        break
                    source = iir & IIR_SOURCE
                    if source == IIR_RLS:
                        if self._in(LSR) & LSR_OE:
                            self.errors |= CE_OVERRUN
                    elif source == IIR_MS:
                        self._in(MSR)
                    elif self.paused:
                        break
                    else:                       # received data or receive timeout (THRE: reading IIR cleared it)
                        self._drain()
            self.intr.done()

    # -- the stream interface -----------------------------------------------------------------

    def write(self, opened, data):
        if self.fd is not None:
            try:
                return os.write(self.fd, data)
            except BlockingIOError:
                return 0
        with self.lock:
            n = min(len(data), FIFO_SIZE - len(self.rx)) if self.loopback else len(data)
            for i in range(n):
                self._out(THR, data[i])
                if self.loopback and (i + 1) % HW_FIFO == 0:
                    self._drain()               # keep the chip's 16-byte FIFO from overrunning
            if self.loopback:
                self._drain()
            if n < len(data):
                self.errors |= CE_OVERRUN
        return n

    def read(self, opened, out):
        if self.fd is not None:
            try:
                return os.readv(self.fd, [out])
            except BlockingIOError:
                return 0
        with self.lock:
            self._drain()
            n = min(len(out), len(self.rx))
            out[:n] = self.rx[:n]
            del self.rx[:n]
            self._resume()
            self._drain()                       # what waited in the chip while the buffer was full
        return n

    def io_control(self, opened, code, inbuf, outbuf):
        if code == IOCTL_SERIAL_SET_BAUD_RATE:
            (baud,) = unpack_in(inbuf, "<I")
            if baud not in BAUD_RATES:
                raise DriverError(errno.EINVAL, f"baud rate {baud} is not supported")
            with self.lock:
                if self.fd is None:
                    self._set_baud(baud)
                self.baud = baud
            return 0
        if code == IOCTL_SERIAL_GET_BAUD_RATE:
            unpack_in(inbuf, "")
            return pack_out(outbuf, "<I", self.baud)
        if code == IOCTL_SERIAL_GET_COMMSTATUS:
            unpack_in(inbuf, "")
            with self.lock:
                if self.fd is None:
                    self._drain()
                errors, self.errors = self.errors, 0
                queued = len(self.rx) if self.fd is None else 0
            return pack_out(outbuf, "<IIII", errors, 0, queued, 0)
        if code == IOCTL_SERIAL_PURGE:
            unpack_in(inbuf, "<I")
            if self.fd is not None:
                return 0                        # tcflush would be a terminal ioctl: see DevicePath
            with self.lock:
                self.rx.clear()
                self._out(FCR, FCR_ENABLE_CLEAR)
                self._resume()
            return 0
        raise DriverError(errno.ENOTTY, f"unknown IOCTL {code:#010x}")
