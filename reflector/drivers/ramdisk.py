"""A block device driver (``DSK1:`` on the simulated platform): seekable storage moved by DMA.

The driver maps the device's registers (``map_io_space``: ``mapped`` or ``mediated`` as the
policy's ``RegisterAccess`` says; it works the same either way), allocates two DMA buffers (a
page of descriptors and a ``BOUNCE_SIZE`` bounce buffer), hooks the device's IRQ, and moves
every transfer through the descriptor ring of ``reflector/simhw/blockdev.py``: it writes one
descriptor pointing at the bounce buffer, rings the doorbell (``TAIL``), waits for the
completion interrupt, acknowledges it (``INT_ACK``) and calls ``done()``.  The disk's size is
what the device reports (``CAPACITY``), its sector size 512.

Registry values (of the driver key): ``MemBase`` (dword, required), ``Irq`` (dword, required);
its ``DmaQuota`` must cover ``DMA_NEEDED`` bytes.

Stream interface: each open handle has its own position, starting at 0.  ``read`` returns up to
``len(out)`` bytes from the position (0 at the end); ``write`` stores up to ``len(data)`` bytes at
the position, fewer if the end of the disk comes first, and fails with ``ENOSPC`` only when not one
byte fits; both advance the position.  Access is by byte: partial sectors are read, patched and
written back.  ``seek(offset, whence)`` with ``whence`` 0 (start), 1 (current) or 2 (end) returns
the new position; a position before 0 or past the end fails with ``EINVAL``.  A descriptor the
device fails, or a device that does not answer within ``TIMEOUT_S``, fails the request with
``EIO`` / ``ETIMEDOUT``.

In mapped mode a register write reaches the device at the Reflector's next poll of the page
(about a millisecond), so each transfer costs about that much more than in mediated mode.

IOCTLs (CE ``CTL_CODE(FILE_DEVICE_DISK=0x07, function, METHOD_BUFFERED, FILE_ANY_ACCESS)``,
numbered as in ``winioctl.h``), little-endian, no input:

============================  ==========  ====================================================
code                          value       output
============================  ==========  ====================================================
``IOCTL_DISK_GET_GEOMETRY``   0x00070000  ``DISK_GEOMETRY``, 24 bytes ``<qIIII``: Cylinders
                                          (= sectors), MediaType (12, ``FixedMedia``),
                                          TracksPerCylinder (1), SectorsPerTrack (1),
                                          BytesPerSector (512)
``IOCTL_DISK_GET_LENGTH_INFO`` 0x0007405C  ``<q`` the size in bytes
============================  ==========  ====================================================
"""

import errno
import struct
import threading
import time

from hosts import DriverError, StreamDriver
from hosts.ioctl import FILE_DEVICE_DISK, FILE_READ_ACCESS, ctl_code, pack_out, registry_dword, unpack_in

IOCTL_DISK_GET_GEOMETRY = ctl_code(FILE_DEVICE_DISK, 0)
IOCTL_DISK_GET_LENGTH_INFO = ctl_code(FILE_DEVICE_DISK, 0x17, access=FILE_READ_ACCESS)

SECTOR_SIZE = 512
FIXED_MEDIA = 12
PAGE = 4096
BOUNCE_SIZE = 64 * 1024
DMA_NEEDED = PAGE + BOUNCE_SIZE
TIMEOUT_S = 5.0

# Device registers (reflector/simhw/blockdev.py) and bits.
REG_ID, REG_SECTOR_SIZE, REG_CAP_LO, REG_CAP_HI = 0x00, 0x04, 0x08, 0x0C
REG_RING_LO, REG_RING_HI, REG_RING_SIZE, REG_CONTROL = 0x10, 0x14, 0x18, 0x1C
REG_TAIL, REG_HEAD, REG_STATUS, REG_INT_STATUS = 0x20, 0x24, 0x28, 0x2C
REG_INT_ENABLE, REG_INT_ACK, REG_LAST_ERROR = 0x30, 0x34, 0x38
REG_SPAN = 0x3C
DEVICE_ID = 0x4B4C4244
CONTROL_ENABLE, CONTROL_RESET = 0x1, 0x2
STATUS_RING_ERROR = 0x2
INT_DONE, INT_ERROR = 0x1, 0x2
OP_READ, OP_WRITE = 1, 2
ST_OK = 0x01
DESCRIPTOR = struct.Struct("<BBHIQQQ")      # op, status, flags, count, sector, buffer, cookie
RING_SIZE = PAGE // DESCRIPTOR.size
U32 = 0xFFFFFFFF


class _Handle:
    __slots__ = ("position",)

    def __init__(self):
        self.position = 0


class Driver(StreamDriver):
    def init(self, ctx):
        if ctx.kernel is None:
            raise DriverError(errno.ENODEV, f"{ctx.device}: no ctx.kernel, so no hardware to drive")
        self.device = ctx.device
        kernel = ctx.kernel
        base, irq = registry_dword(ctx, "MemBase"), registry_dword(ctx, "Irq")
        self.lock = threading.Lock()
        self.regs = kernel.map_io_space(base, REG_SPAN)
        if self.regs.read32(REG_ID) != DEVICE_ID or self.regs.read32(REG_SECTOR_SIZE) != SECTOR_SIZE:
            raise DriverError(errno.ENODEV, f"{ctx.device}: no block device at MemBase {base:#x} "
                                            f"(ID {self.regs.read32(REG_ID):#x})")
        self.size = (self.regs.read32(REG_CAP_HI) << 32 | self.regs.read32(REG_CAP_LO)) * SECTOR_SIZE
        self.ring = kernel.alloc_dma(PAGE)
        self.bounce = kernel.alloc_dma(BOUNCE_SIZE)
        self.intr = kernel.interrupt(irq)
        r = self.regs
        r.write32(REG_RING_LO, self.ring.phys & U32)
        r.write32(REG_RING_HI, self.ring.phys >> 32)
        r.write32(REG_RING_SIZE, RING_SIZE)
        r.write32(REG_INT_ENABLE, INT_DONE | INT_ERROR)
        r.write32(REG_CONTROL, CONTROL_ENABLE | CONTROL_RESET)
        # CONTROL reads back ENABLE alone once the device took the reset (at once when mediated,
        # at the next poll when mapped).
        self._until(lambda: r.read32(REG_CONTROL) == CONTROL_ENABLE and r.read32(REG_TAIL) == 0, "reset")
        self.tail = 0

    def deinit(self):
        self.regs.write32(REG_CONTROL, 0)
        self.intr.close()

    # -- the device -------------------------------------------------------------------------

    def _until(self, condition, what):
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            if time.monotonic() > deadline:
                raise DriverError(errno.ETIMEDOUT, f"{self.device}: the device did not complete {what}")
            time.sleep(0.0002)

    def _transfer(self, op, sector, count):
        """One descriptor: ``count`` sectors between the disk and the bounce buffer (lock held)."""
        r = self.regs
        slot = self.tail % RING_SIZE * DESCRIPTOR.size
        DESCRIPTOR.pack_into(self.ring.view, slot, op, 0, 0, count, sector, self.bounce.phys, self.tail)
        self.tail = (self.tail + 1) & U32
        r.write32(REG_TAIL, self.tail)                          # the doorbell
        deadline = time.monotonic() + TIMEOUT_S
        while r.read32(REG_HEAD) != self.tail:
            if r.read32(REG_STATUS) & STATUS_RING_ERROR:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DriverError(errno.ETIMEDOUT, f"{self.device}: descriptor {self.tail - 1} did not complete "
                                                   f"within {TIMEOUT_S}s")
            if self.intr.wait(min(remaining, 0.05)):
                self._acknowledge()
        if self.intr.wait(0):           # mediated: the completion interrupt came during the doorbell
            self._acknowledge()
        status = self.ring.view[slot + 1]
        if status != ST_OK:
            error = r.read32(REG_LAST_ERROR)
            r.write32(REG_CONTROL, CONTROL_ENABLE | CONTROL_RESET)   # a ring error stops the device
            self._until(lambda: r.read32(REG_TAIL) == 0 and not r.read32(REG_STATUS) & STATUS_RING_ERROR,
                        "reset after an error")
            self.tail = 0
            raise DriverError(errno.EIO, f"{self.device}: sectors {sector}+{count}: descriptor status {status:#x}, "
                                         f"device error {error:#x}")

    def _acknowledge(self):
        """The interrupt fired: clear what the device reports, then InterruptDone (unmask)."""
        pending = self.regs.read32(REG_INT_STATUS)
        if pending:
            self.regs.write32(REG_INT_ACK, pending)
        self.intr.done()

    def _io(self, start, length, out=None, data=None):
        """Move ``length`` bytes at byte ``start`` into ``out`` or from ``data`` (lock held)."""
        done = 0
        while done < length:
            pos = start + done
            first = pos // SECTOR_SIZE
            offset = pos - first * SECTOR_SIZE
            n = min(length - done, BOUNCE_SIZE - offset)
            count = (offset + n + SECTOR_SIZE - 1) // SECTOR_SIZE
            view = self.bounce.view
            if out is not None:
                self._transfer(OP_READ, first, count)
                out[done:done + n] = view[offset:offset + n]
            else:
                if offset or n % SECTOR_SIZE:                    # a partial sector: read, patch, write
                    self._transfer(OP_READ, first, count)
                view[offset:offset + n] = data[done:done + n]
                self._transfer(OP_WRITE, first, count)
            done += n

    # -- the stream interface -----------------------------------------------------------------

    def open(self, access, share):
        return _Handle()

    def read(self, opened, out):
        with self.lock:
            start = opened.position
            n = max(0, min(len(out), self.size - start))
            self._io(start, n, out=out)
            opened.position = start + n
        return n

    def write(self, opened, data):
        with self.lock:
            start = opened.position
            n = max(0, min(len(data), self.size - start))
            if n == 0 and len(data):
                raise DriverError(errno.ENOSPC, f"position {start} is the end of the disk")
            self._io(start, n, data=data)
            opened.position = start + n
        return n

    def seek(self, opened, offset, whence):
        bases = {0: 0, 1: opened.position, 2: self.size}
        if whence not in bases:
            raise DriverError(errno.EINVAL, f"whence {whence} is not 0, 1 or 2")
        position = bases[whence] + offset
        if not 0 <= position <= self.size:
            raise DriverError(errno.EINVAL, f"position {position} is outside 0..{self.size}")
        opened.position = position
        return position

    def io_control(self, opened, code, inbuf, outbuf):
        if code == IOCTL_DISK_GET_GEOMETRY:
            unpack_in(inbuf, "")
            return pack_out(outbuf, "<qIIII", self.size // SECTOR_SIZE, FIXED_MEDIA, 1, 1, SECTOR_SIZE)
        if code == IOCTL_DISK_GET_LENGTH_INFO:
            unpack_in(inbuf, "")
            return pack_out(outbuf, "<q", self.size)
        raise DriverError(errno.ENOTTY, f"unknown IOCTL {code:#010x}")
