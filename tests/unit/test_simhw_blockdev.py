"""The DMA block device: descriptor ring, doorbell, interrupt, and the bounds of every descriptor."""

import pytest

from reflector.simhw.blockdev import DESCRIPTOR, SECTOR_SIZE
from reflector.simhw.config import DeviceConfig
from reflector.simhw.errors import PlatformConfigError, RegisterAccessError
from reflector.simhw.physmem import PAGE_SIZE
from reflector.simhw.platform import Platform

BASE, IRQ, OWNER = 0x1000_0000, 14, "host2"
ID, SECTOR, CAP_LO, CAP_HI = 0x00, 0x04, 0x08, 0x0C
RING_LO, RING_HI, RING_SIZE, CONTROL = 0x10, 0x14, 0x18, 0x1C
TAIL, HEAD, STATUS, INT_STATUS, INT_ENABLE, INT_ACK, LAST_ERROR = 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34, 0x38
READ, WRITE = 1, 2
OK, BAD_OP, BAD_SECTOR, BAD_BUFFER, BAD_COUNT, BAD_RING = 0x01, 0x80, 0x81, 0x82, 0x83, 0x84
SECTORS = 64


class Rig:
    """A platform with DISK1 bound to OWNER, a ring of 8 descriptors and a 4-page buffer."""

    def __init__(self):
        self.p = Platform([DeviceConfig("DISK1", "blockdev", mem=[(BASE, 0x1000)], irq=IRQ,
                                        values={"SizeBytes": SECTORS * SECTOR_SIZE})])
        self.disk = self.p.device("DISK1")
        self.p.bind_dma("DISK1", OWNER)
        self.ring = self.p.physmem.alloc(PAGE_SIZE, OWNER)
        self.buf = self.p.physmem.alloc(4 * PAGE_SIZE, OWNER)
        self.irqs = []
        self.p.on_interrupt(self.irqs.append)
        self.p.unmask(IRQ)
        self.tail = 0
        self.w(RING_LO, self.ring.phys & 0xFFFFFFFF)
        self.w(RING_HI, self.ring.phys >> 32)
        self.w(RING_SIZE, 8)
        self.w(INT_ENABLE, 0x3)
        self.w(CONTROL, 0x1)

    def r(self, reg):
        return self.p.mem_read(BASE + reg, 4)

    def w(self, reg, value):
        self.p.mem_write(BASE + reg, value, 4)

    def put(self, op, sector, count, buffer, flags=0):
        at = (self.tail % 8) * DESCRIPTOR.size
        self.ring.view[at:at + DESCRIPTOR.size] = DESCRIPTOR.pack(op, 0, flags, count, sector, buffer, 0xC00C1E)
        self.tail += 1
        return at

    def status(self, at):
        return self.ring.view[at + 1]

    def ring_doorbell(self):
        self.w(TAIL, self.tail)


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.p.close()


def test_identity_and_capacity(rig):
    assert rig.r(ID) == 0x4B4C4244
    assert rig.r(SECTOR) == 512
    assert rig.r(CAP_LO) == SECTORS and rig.r(CAP_HI) == 0
    assert rig.r(STATUS) & 0x1


def test_write_then_read_back_through_dma(rig):
    data = bytes(range(256)) * 4                    # two sectors
    rig.buf.view[:1024] = data
    at = rig.put(WRITE, 5, 2, rig.buf.phys)
    rig.ring_doorbell()
    assert rig.status(at) == OK
    assert rig.disk.read_sectors(5, 2) == data
    assert rig.r(HEAD) == 1
    assert rig.r(INT_STATUS) & 0x1 and rig.irqs == [IRQ]
    rig.w(INT_ACK, 0x1)                             # acknowledge, then InterruptDone
    rig.p.unmask(IRQ)
    at = rig.put(READ, 5, 2, rig.buf.phys + 2 * PAGE_SIZE)
    rig.ring_doorbell()
    assert rig.status(at) == OK
    assert bytes(rig.buf.view[2 * PAGE_SIZE:2 * PAGE_SIZE + 1024]) == data
    assert rig.irqs == [IRQ, IRQ]


def test_several_descriptors_per_doorbell_and_wrapping_ring(rig):
    for round_ in range(3):                         # 3 x 5 descriptors through a ring of 8
        ats = [rig.put(WRITE, i, 1, rig.buf.phys) for i in range(5)]
        rig.ring_doorbell()
        assert [rig.status(a) for a in ats] == [OK] * 5
    assert rig.r(HEAD) == 15
    assert rig.disk.describe()["state"]["completed"] == 15


def test_interrupt_status_write_one_to_clear_drops_the_line(rig):
    rig.put(READ, 0, 1, rig.buf.phys)
    rig.ring_doorbell()
    assert rig.disk.irq_asserted()
    rig.w(INT_STATUS, 0x1)
    assert not rig.disk.irq_asserted() and rig.r(INT_STATUS) == 0


def test_no_interrupt_when_disabled(rig):
    rig.w(INT_ENABLE, 0)
    rig.put(READ, 0, 1, rig.buf.phys)
    rig.ring_doorbell()
    assert rig.r(INT_STATUS) & 0x1 and rig.irqs == []


# -- bounds: each descriptor field one step inside (allowed) and one step outside (denied) ------

def test_last_sector_allowed_one_past_denied(rig):
    ok = rig.put(READ, SECTORS - 1, 1, rig.buf.phys)
    bad = rig.put(READ, SECTORS - 1, 2, rig.buf.phys)
    rig.ring_doorbell()
    assert rig.status(ok) == OK and rig.status(bad) == BAD_SECTOR
    assert rig.r(LAST_ERROR) == BAD_SECTOR and rig.r(INT_STATUS) & 0x2


def test_buffer_ending_at_allocation_end_allowed_one_byte_past_denied(rig):
    end = rig.buf.end
    ok = rig.put(READ, 0, 1, end - SECTOR_SIZE)
    bad = rig.put(READ, 0, 1, end - SECTOR_SIZE + 1)
    rig.ring_doorbell()
    assert rig.status(ok) == OK and rig.status(bad) == BAD_BUFFER


def test_buffer_spanning_two_allocations_denied(rig):
    nxt = rig.p.physmem.alloc(PAGE_SIZE, OWNER)
    assert nxt.phys == rig.buf.end                  # contiguous in the simulated address space
    at = rig.put(WRITE, 0, 2, nxt.phys - SECTOR_SIZE)
    rig.ring_doorbell()
    assert rig.status(at) == BAD_BUFFER


def test_buffer_of_another_owner_denied(rig):
    other = rig.p.physmem.alloc(PAGE_SIZE, "host1")
    other.view[:4] = b"priv"
    at = rig.put(WRITE, 0, 1, other.phys)
    rig.ring_doorbell()
    assert rig.status(at) == BAD_BUFFER
    assert rig.disk.read_sectors(0, 1)[:4] == b"\0\0\0\0"


def test_buffer_in_no_allocation_denied(rig):
    at = rig.put(READ, 0, 1, 0x1234_5000)
    rig.ring_doorbell()
    assert rig.status(at) == BAD_BUFFER


@pytest.mark.parametrize("op,flags,count,want", [(3, 0, 1, BAD_OP), (0, 0, 1, BAD_OP), (READ, 1, 1, BAD_OP),
                                                 (READ, 0, 0, BAD_COUNT), (READ, 0, SECTORS + 1, BAD_COUNT)])
def test_malformed_descriptors_denied(rig, op, flags, count, want):
    at = rig.put(op, 0, count, rig.buf.phys, flags=flags)
    rig.ring_doorbell()
    assert rig.status(at) == want


def test_a_bad_descriptor_does_not_stop_the_next(rig):
    bad = rig.put(READ, SECTORS, 1, rig.buf.phys)
    ok = rig.put(READ, 0, 1, rig.buf.phys)
    rig.ring_doorbell()
    assert (rig.status(bad), rig.status(ok)) == (BAD_SECTOR, OK)


def test_ring_outside_its_allocation_stops_processing(rig):
    rig.w(RING_SIZE, PAGE_SIZE // DESCRIPTOR.size + 1)  # one descriptor past the ring's page
    rig.put(READ, 0, 1, rig.buf.phys)
    rig.ring_doorbell()
    assert rig.r(STATUS) & 0x2 and rig.r(LAST_ERROR) == BAD_RING and rig.r(HEAD) == 0
    rig.w(CONTROL, 0x3)                             # reset clears the error
    assert rig.r(STATUS) == 0x1 and rig.r(HEAD) == 0 and rig.r(TAIL) == 0


def test_ring_filling_its_whole_allocation_allowed(rig):
    rig.w(RING_SIZE, PAGE_SIZE // DESCRIPTOR.size)
    rig.put(READ, 0, 1, rig.buf.phys)
    rig.ring_doorbell()
    assert rig.r(STATUS) == 0x1 and rig.r(HEAD) == 1


def test_tail_further_ahead_than_the_ring_denied(rig):
    rig.w(TAIL, 9)                                  # 9 pending in a ring of 8
    assert rig.r(LAST_ERROR) == BAD_RING and rig.r(HEAD) == 0


def test_unbound_device_reaches_no_memory(rig):
    rig.p.unbind_dma("DISK1")
    rig.put(READ, 0, 1, rig.buf.phys)
    rig.ring_doorbell()
    assert rig.r(LAST_ERROR) == BAD_RING and rig.r(HEAD) == 0


def test_release_of_the_owner_frees_buffers_and_unbinds(rig):
    assert rig.p.release(OWNER) == 5 * PAGE_SIZE
    assert rig.disk.dma_owner is None and rig.p.physmem.held(OWNER) == 0


def test_disabled_device_processes_on_enable(rig):
    rig.w(CONTROL, 0)
    at = rig.put(READ, 0, 1, rig.buf.phys)
    rig.ring_doorbell()
    assert rig.r(HEAD) == 0
    rig.w(CONTROL, 1)
    assert rig.status(at) == OK and rig.r(HEAD) == 1


def test_descriptor_is_read_once(rig, monkeypatch):
    """The model checks and uses one copy: rewriting the ring after the read changes nothing."""
    at = rig.put(WRITE, 0, 1, rig.buf.phys)
    real_read = rig.p.physmem.read
    calls = []

    def read_then_tamper(phys, length, owner=None):
        out = real_read(phys, length, owner)
        if length == DESCRIPTOR.size:
            calls.append(phys)
            rig.ring.view[at:at + DESCRIPTOR.size] = DESCRIPTOR.pack(WRITE, 0, 0, 1, SECTORS + 100, 0, 0)
        return out
    monkeypatch.setattr(rig.p.physmem, "read", read_then_tamper)
    rig.ring_doorbell()
    assert calls == [rig.ring.phys + at] and rig.status(at) == OK


def test_registers_are_32_bit(rig):
    with pytest.raises(RegisterAccessError, match="32-bit registers"):
        rig.p.mem_read(BASE + ID, 1)
    with pytest.raises(RegisterAccessError, match="multiple of 4"):
        rig.disk.read(2, 4)


def test_size_must_be_whole_sectors():
    with pytest.raises(PlatformConfigError, match='device D "SizeBytes": is 1000, not a multiple of 512'):
        Platform([DeviceConfig("D", "ramdisk", mem=[(BASE, 0x1000)], values={"sizebytes": 1000})])
