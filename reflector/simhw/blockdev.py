"""A block device that moves sectors by DMA through a descriptor ring (``Model`` ``blockdev`` or ``ramdisk``).

Registers (32-bit, little-endian, offsets from ``MemBase``):

====== ============== == =============================================================
offset name           rw meaning
====== ============== == =============================================================
0x00   ID             r  0x4B4C4244 ("DBLK")
0x04   SECTOR_SIZE    r  512
0x08   CAPACITY_LO    r  size in sectors, low 32 bits
0x0C   CAPACITY_HI    r  high 32 bits
0x10   RING_BASE_LO   rw physical address of descriptor 0 (a DMA buffer), low 32 bits
0x14   RING_BASE_HI   rw high 32 bits
0x18   RING_SIZE      rw number of descriptors in the ring, 1..1024
0x1C   CONTROL        rw bit 0 ENABLE; bit 1 RESET (self-clearing: HEAD = TAIL = 0, errors cleared)
0x20   TAIL           rw the doorbell: the driver writes the free-running index one past the
                         last descriptor it filled; the model processes descriptors HEAD..TAIL-1
0x24   HEAD           r  free-running index of the next descriptor the model will process
0x28   STATUS         r  bit 0 ENABLED, bit 1 RING_ERROR (processing stopped; RESET clears)
0x2C   INT_STATUS     rw bit 0 DONE (descriptors completed), bit 1 ERROR; write 1 to clear
0x30   INT_ENABLE     rw same bits; the line is asserted while INT_STATUS & INT_ENABLE
0x34   INT_ACK        w  write 1 to clear INT_STATUS bits; reads 0 (for mapped mode, see below)
0x38   LAST_ERROR     r  the last error code (descriptor status codes below), 0 if none
====== ============== == =============================================================

A descriptor is 32 bytes, little-endian; descriptor ``i`` is at ``RING_BASE + (i % RING_SIZE) * 32``:

====== ==== ========= =========================================================
offset size field     meaning
====== ==== ========= =========================================================
0      1    op        1 READ (disk -> buffer), 2 WRITE (buffer -> disk)
1      1    status    written by the model: 1 OK, or an error code (0x80 and up)
2      2    flags     must be 0
4      4    count     sectors, >= 1
8      8    sector    first sector
16     8    buffer    physical address of the data buffer: count * 512 bytes
24     8    cookie    the driver's, left alone
====== ==== ========= =========================================================

Error codes: 0x80 BAD_OP (op or flags), 0x81 BAD_SECTOR (sector range not on the disk),
0x82 BAD_BUFFER (buffer not within one DMA allocation this device may reach), 0x83 BAD_COUNT,
0x84 BAD_RING (the ring itself is not within one such allocation, or RING_SIZE is 0 or too big,
or TAIL - HEAD exceeds RING_SIZE; reported in LAST_ERROR only, since there is no descriptor to
mark).

Why it is safe to run on a hostile driver's say-so: each descriptor is copied out of shared
memory once and only the copy is checked and used (the driver may rewrite the ring meanwhile);
the buffer must lie inside one DMA allocation of the owner the Reflector bound to this device
(``Platform.bind_dma``; unbound, the device reaches no memory at all), and the sector range
inside the disk; one doorbell processes at most RING_SIZE descriptors.

Mapped mode works fully: the ring registers come before CONTROL and TAIL in address order, so a
whole set-up written between two syncs is folded in in a working order; TAIL is free-running,
so each doorbell changes it; and INT_ACK reads 0, so any acknowledgement is a change the model
sees at the next sync.  Only INT_STATUS's own
write-1-to-clear is lost there when the driver writes back the value it just read.
"""

from __future__ import annotations

import struct

from reflector.simhw.config import DeviceConfig
from reflector.simhw.errors import DmaError, PlatformConfigError
from reflector.simhw.model import DeviceModel
from reflector.simhw.physmem import PhysicalMemory

__all__ = ["BlockDevice", "DESCRIPTOR", "SECTOR_SIZE"]

ID_VALUE = 0x4B4C4244
SECTOR_SIZE = 512
MAX_RING = 1024
MAX_SIZE = 1 << 30             # the backing store lives in the Device Manager's memory

REG_ID, REG_SECTOR_SIZE, REG_CAP_LO, REG_CAP_HI = 0x00, 0x04, 0x08, 0x0C
REG_RING_LO, REG_RING_HI, REG_RING_SIZE, REG_CONTROL = 0x10, 0x14, 0x18, 0x1C
REG_TAIL, REG_HEAD, REG_STATUS, REG_INT_STATUS = 0x20, 0x24, 0x28, 0x2C
REG_INT_ENABLE, REG_INT_ACK, REG_LAST_ERROR = 0x30, 0x34, 0x38

CONTROL_ENABLE, CONTROL_RESET = 0x1, 0x2
STATUS_ENABLED, STATUS_RING_ERROR = 0x1, 0x2
INT_DONE, INT_ERROR = 0x1, 0x2

OP_READ, OP_WRITE = 1, 2
ST_OK, BAD_OP, BAD_SECTOR, BAD_BUFFER, BAD_COUNT, BAD_RING = 0x01, 0x80, 0x81, 0x82, 0x83, 0x84

DESCRIPTOR = struct.Struct("<BBHIQQQ")      # op, status, flags, count, sector, buffer, cookie
assert DESCRIPTOR.size == 32
_U32 = 0xFFFF_FFFF


class BlockDevice(DeviceModel):
    MODEL = "blockdev"
    REG_WIDTH = 4
    REG_SPAN = 0x3C
    MAPPED_LIMITS = ("reads have no side effects (none of this model's reads have any); writing back to "
                     "INT_STATUS the value it shows is invisible: acknowledge through INT_ACK.")

    def __init__(self, config: DeviceConfig, physmem: PhysicalMemory) -> None:
        size = config.int_value("SizeBytes", 1 << 20, SECTOR_SIZE, MAX_SIZE)
        if size % SECTOR_SIZE:
            raise PlatformConfigError(config.name, "SizeBytes", f"is {size}, not a multiple of {SECTOR_SIZE}",
                                      fix=f"use {size // SECTOR_SIZE * SECTOR_SIZE or SECTOR_SIZE}")
        super().__init__(config, physmem)
        self.store = bytearray(size)
        self.sectors = size // SECTOR_SIZE
        self._ring_base = self._ring_size = self._control = 0
        self._tail = self._head = 0
        self._ring_error = False
        self._int_status = self._int_enable = self._last_error = 0
        self.completed = 0                   # descriptors processed, for describe()
        with self._op():
            pass

    # -- outside the driver ---------------------------------------------------------------------

    def read_sectors(self, sector: int, count: int) -> bytes:
        """The disk's contents, for tests and ``drvbox hw``."""
        with self._lock:
            self._check_range(sector, count)
            return bytes(self.store[sector * SECTOR_SIZE:(sector + count) * SECTOR_SIZE])

    def write_sectors(self, sector: int, data: bytes) -> None:
        if len(data) % SECTOR_SIZE:
            raise ValueError(f"{self.name}: {len(data)} bytes is not a whole number of {SECTOR_SIZE}-byte sectors")
        with self._lock:
            self._check_range(sector, len(data) // SECTOR_SIZE)
            self.store[sector * SECTOR_SIZE:sector * SECTOR_SIZE + len(data)] = data

    def _check_range(self, sector: int, count: int) -> None:
        if not (0 <= sector and 0 < count and sector + count <= self.sectors):
            raise ValueError(f"{self.name}: sectors {sector}+{count} are not on a disk of {self.sectors} sectors")

    # -- the ring -------------------------------------------------------------------------------

    def _fail_ring(self, code: int) -> None:
        self._ring_error = True
        self._last_error = code
        self._int_status |= INT_ERROR

    def _process(self) -> None:
        """Run descriptors HEAD..TAIL-1 (free-running indexes), each checked on its own copy."""
        if not self._control & CONTROL_ENABLE or self._ring_error:
            return
        pending = (self._tail - self._head) & _U32
        if pending == 0:
            return
        if not 1 <= self._ring_size <= MAX_RING or pending > self._ring_size:
            return self._fail_ring(BAD_RING)
        if self.dma_owner is None:
            return self._fail_ring(BAD_RING)        # no driver bound: this device reaches no memory
        ring_bytes = self._ring_size * DESCRIPTOR.size
        try:
            self.physmem.read(self._ring_base, ring_bytes, owner=self.dma_owner)
        except DmaError:
            return self._fail_ring(BAD_RING)
        done = 0
        while self._head != self._tail:
            at = self._ring_base + (self._head % self._ring_size) * DESCRIPTOR.size
            try:
                raw = self.physmem.read(at, DESCRIPTOR.size, owner=self.dma_owner)
            except DmaError:                        # the ring was freed under us
                return self._fail_ring(BAD_RING)
            status = self._run(raw)
            try:
                self.physmem.write(at + 1, bytes([status]), owner=self.dma_owner)
            except DmaError:
                return self._fail_ring(BAD_RING)
            if status != ST_OK:
                self._last_error = status
                self._int_status |= INT_ERROR
            self._head = (self._head + 1) & _U32
            done += 1
        self.completed += done
        self._int_status |= INT_DONE

    def _run(self, raw: bytes) -> int:
        """Carry out one descriptor (already copied out of shared memory); returns its status."""
        op, _status, flags, count, sector, buffer, _cookie = DESCRIPTOR.unpack(raw)
        if op not in (OP_READ, OP_WRITE) or flags:
            return BAD_OP
        if count == 0 or count > self.sectors:
            return BAD_COUNT
        if sector >= self.sectors or sector + count > self.sectors:
            return BAD_SECTOR
        start, length = sector * SECTOR_SIZE, count * SECTOR_SIZE
        try:
            if op == OP_READ:
                self.physmem.write(buffer, memoryview(self.store)[start:start + length], owner=self.dma_owner)
            else:
                self.store[start:start + length] = self.physmem.read(buffer, length, owner=self.dma_owner)
        except DmaError:
            return BAD_BUFFER
        return ST_OK

    # -- registers ------------------------------------------------------------------------------

    def _registers(self) -> list[int]:
        return [
            ID_VALUE, SECTOR_SIZE, self.sectors & _U32, self.sectors >> 32,
            self._ring_base & _U32, self._ring_base >> 32, self._ring_size, self._control & CONTROL_ENABLE,
            self._tail, self._head,
            (STATUS_ENABLED if self._control & CONTROL_ENABLE else 0) | (STATUS_RING_ERROR if self._ring_error else 0),
            self._int_status, self._int_enable, 0, self._last_error,
        ]

    def _peek_reg(self, offset: int) -> int:
        return self._registers()[offset // 4]          # the order above is the register map's

    def _read_reg(self, offset: int) -> int:
        return self._peek_reg(offset)

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == REG_RING_LO:
            self._ring_base = (self._ring_base & ~_U32) | value
        elif offset == REG_RING_HI:
            self._ring_base = (self._ring_base & _U32) | value << 32
        elif offset == REG_RING_SIZE:
            self._ring_size = value
        elif offset == REG_CONTROL:
            if value & CONTROL_RESET:
                self._head = self._tail = 0
                self._ring_error = False
                self._int_status = self._last_error = 0
            self._control = value & CONTROL_ENABLE
            self._process()
        elif offset == REG_TAIL:
            self._tail = value
            self._process()
        elif offset in (REG_INT_STATUS, REG_INT_ACK):
            self._int_status &= ~value
        elif offset == REG_INT_ENABLE:
            self._int_enable = value & (INT_DONE | INT_ERROR)
        # ID, SECTOR_SIZE, CAPACITY, HEAD, STATUS, LAST_ERROR: read-only, writes ignored.

    def _line(self) -> bool:
        return bool(self._int_status & self._int_enable)

    def _state(self) -> dict:
        return {
            "size_bytes": len(self.store), "sectors": self.sectors, "ring_base": self._ring_base,
            "ring_size": self._ring_size, "head": self._head, "tail": self._tail,
            "enabled": bool(self._control & CONTROL_ENABLE), "ring_error": self._ring_error,
            "int_status": self._int_status, "last_error": self._last_error, "completed": self.completed,
            "dma_bound": self.dma_owner is not None,
        }
