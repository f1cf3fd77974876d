"""A RAM disk (``DSK1:`` on the simulated platform): seekable byte storage, 512-byte sectors.

Registry values: ``SizeBytes`` (dword, default 1 MiB): a positive multiple of ``SECTOR_SIZE``, at
most ``MAX_SIZE``.  The contents start zeroed and live as long as the driver.

Stream interface: each open handle has its own position, starting at 0.  ``read`` returns up to
``len(out)`` bytes from the position (0 at the end); ``write`` stores up to ``len(data)`` bytes at
the position, fewer if the end of the disk comes first, and fails with ``ENOSPC`` only when not one
byte fits; both advance the position.  Access is by byte: the sector size is what the geometry
reports, not an alignment rule.  ``seek(offset, whence)`` with ``whence`` 0 (start), 1 (current)
or 2 (end) returns the new position; a position before 0 or past the end fails with ``EINVAL``.

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
import threading

from hosts import DriverError, StreamDriver
from hosts.ioctl import FILE_DEVICE_DISK, FILE_READ_ACCESS, ctl_code, pack_out, unpack_in

IOCTL_DISK_GET_GEOMETRY = ctl_code(FILE_DEVICE_DISK, 0)
IOCTL_DISK_GET_LENGTH_INFO = ctl_code(FILE_DEVICE_DISK, 0x17, access=FILE_READ_ACCESS)

SECTOR_SIZE = 512
DEFAULT_SIZE = 1 << 20
MAX_SIZE = 64 << 20
FIXED_MEDIA = 12


class _Handle:
    __slots__ = ("position",)

    def __init__(self):
        self.position = 0


class Driver(StreamDriver):
    def init(self, ctx):
        size = ctx.registry.get("SizeBytes", DEFAULT_SIZE)
        if type(size) is not int or not 0 < size <= MAX_SIZE or size % SECTOR_SIZE:
            raise DriverError(errno.EINVAL, f"{ctx.device} SizeBytes {size!r}: expected a positive "
                                            f"multiple of {SECTOR_SIZE} up to {MAX_SIZE}")
        self.size = size
        self.data = bytearray(size)
        self.lock = threading.Lock()

    def open(self, access, share):
        return _Handle()

    def read(self, opened, out):
        with self.lock:
            start = opened.position
            n = max(0, min(len(out), self.size - start))
            out[:n] = self.data[start:start + n]
            opened.position = start + n
        return n

    def write(self, opened, data):
        with self.lock:
            start = opened.position
            n = max(0, min(len(data), self.size - start))
            if n == 0 and len(data):
                raise DriverError(errno.ENOSPC, f"position {start} is the end of the disk")
            self.data[start:start + n] = data[:n]
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
