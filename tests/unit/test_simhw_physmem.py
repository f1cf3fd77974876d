"""The simulated DMA address space: allocation, bounds of every access, owners, sealing, fd ownership."""

import errno
import fcntl
import mmap
import os

import pytest

from reflector.simhw.errors import DmaError
from reflector.simhw.physmem import DMA_ZONE_BASE, PAGE_SIZE, PhysicalMemory


@pytest.fixture
def pm():
    p = PhysicalMemory()
    yield p
    p.close()


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


def test_alloc_is_page_aligned_rounded_and_in_the_zone(pm):
    a = pm.alloc(100, owner="h1")
    b = pm.alloc(PAGE_SIZE + 1, owner="h1")
    assert a.phys == DMA_ZONE_BASE and a.size == PAGE_SIZE
    assert b.phys == a.end and b.size == 2 * PAGE_SIZE
    assert a.phys % PAGE_SIZE == 0 and b.phys % PAGE_SIZE == 0
    assert len(a.view) == a.size


def test_memory_is_shared_between_fd_and_model_side(pm):
    r = pm.alloc(PAGE_SIZE, owner="h1")
    host = mmap.mmap(r.fd, r.size)                  # what the host maps from the fd it is passed
    host[10:15] = b"hello"
    assert pm.read(r.phys + 10, 5) == b"hello"
    pm.write(r.phys + 20, b"world")
    assert host[20:25] == b"world"
    host.close()


def test_access_within_one_allocation_allowed(pm):
    r = pm.alloc(PAGE_SIZE, owner="h1")
    pm.write(r.phys + PAGE_SIZE - 4, b"abcd")
    assert pm.read(r.phys + PAGE_SIZE - 4, 4) == b"abcd"
    v = pm.view(r.phys, PAGE_SIZE)
    assert len(v) == PAGE_SIZE
    v.release()


def test_access_one_byte_past_an_allocation_denied(pm):
    r = pm.alloc(PAGE_SIZE, owner="h1")
    pm.alloc(PAGE_SIZE, owner="h1")                 # the next allocation is right behind it
    with pytest.raises(DmaError, match="runs past the end of the allocation") as e:
        pm.read(r.phys + PAGE_SIZE - 4, 5)
    assert e.value.errno == errno.EFAULT
    with pytest.raises(DmaError, match="runs past the end"):
        pm.view(r.phys, PAGE_SIZE + 1)


def test_access_outside_any_allocation_denied(pm):
    with pytest.raises(DmaError, match="not in any DMA allocation"):
        pm.read(DMA_ZONE_BASE, 1)
    r = pm.alloc(PAGE_SIZE, owner="h1")
    with pytest.raises(DmaError, match="not in any DMA allocation"):
        pm.write(r.phys - 1, b"x")
    with pytest.raises(DmaError, match="must be non-negative"):
        pm.read(-1, 1)


def test_owner_checked_when_named(pm):
    r = pm.alloc(PAGE_SIZE, owner="h1")
    assert pm.read(r.phys, 1, owner="h1") == b"\0"
    with pytest.raises(DmaError, match="another owner") as e:
        pm.read(r.phys, 1, owner="h2")
    assert e.value.errno == errno.EACCES


def test_free_and_reuse_gives_new_memory(pm):
    r = pm.alloc(PAGE_SIZE, owner="h1")
    stale = mmap.mmap(os.dup(r.fd), r.size)         # a host that keeps its mapping after the free
    pm.free(r.phys)
    r2 = pm.alloc(PAGE_SIZE, owner="h2")
    assert r2.phys == r.phys                        # the address is reused ...
    stale[0:4] = b"evil"
    assert pm.read(r2.phys, 4) == b"\0\0\0\0"       # ... but not the memory
    stale.close()


def test_free_of_unknown_address_denied(pm):
    r = pm.alloc(2 * PAGE_SIZE, owner="h1")
    with pytest.raises(DmaError, match=f"no DMA allocation starts at {r.phys + PAGE_SIZE:#x}"):
        pm.free(r.phys + PAGE_SIZE)
    pm.free(r.phys)
    with pytest.raises(DmaError, match="no DMA allocation starts"):
        pm.free(r.phys)


def test_free_owner_frees_only_that_owner(pm):
    a1 = pm.alloc(PAGE_SIZE, owner="h1")
    b = pm.alloc(PAGE_SIZE, owner="h2")
    a2 = pm.alloc(3 * PAGE_SIZE, owner="h1")
    assert pm.held("h1") == 4 * PAGE_SIZE
    assert pm.free_owner("h1") == 4 * PAGE_SIZE
    assert pm.held("h1") == 0 and pm.held("h2") == PAGE_SIZE
    assert [r.phys for r in pm.regions()] == [b.phys]
    with pytest.raises(DmaError):
        pm.read(a1.phys, 1)
    with pytest.raises(DmaError):
        pm.read(a2.phys, 1)


def test_zone_exhaustion_is_enomem_and_gaps_are_reused():
    pm = PhysicalMemory(size=4 * PAGE_SIZE)
    try:
        a = pm.alloc(2 * PAGE_SIZE, owner=1)
        pm.alloc(2 * PAGE_SIZE, owner=1)
        with pytest.raises(DmaError, match="has no free") as e:
            pm.alloc(1, owner=1)
        assert e.value.errno == errno.ENOMEM
        pm.free(a.phys)
        assert pm.alloc(2 * PAGE_SIZE, owner=2).phys == a.phys
    finally:
        pm.close()


@pytest.mark.parametrize("size", [0, -1, 1.5, "4096"])
def test_bad_sizes_refused(pm, size):
    with pytest.raises(DmaError, match="positive number of bytes") as e:
        pm.alloc(size, owner=1)
    assert e.value.errno == errno.EINVAL


def test_alloc_needs_an_owner(pm):
    with pytest.raises(DmaError, match="needs an owner"):
        pm.alloc(10, owner=None)


def test_zone_must_be_page_aligned():
    with pytest.raises(ValueError, match="page-aligned"):
        PhysicalMemory(base=DMA_ZONE_BASE + 1)


def test_memfd_is_sealed_against_resizing(pm):
    r = pm.alloc(PAGE_SIZE, owner="h1")
    seals = fcntl.fcntl(r.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
    with pytest.raises(PermissionError):
        os.ftruncate(r.fd, 0)                       # a host cannot make the Device Manager SIGBUS
    assert os.get_inheritable(r.fd) is False


def test_no_fd_leaks_after_free_owner_and_close():
    before = open_fds()
    pm = PhysicalMemory()
    for i in range(5):
        pm.alloc(PAGE_SIZE, owner=i % 2)
    pm.free_owner(0)
    pm.close()
    assert open_fds() == before


def test_view_held_across_free_does_not_break_free(pm):
    r = pm.alloc(PAGE_SIZE, owner="h1")
    v = pm.view(r.phys, 16)
    pm.free(r.phys)                                 # the mapping lingers while the view lives
    v[0] = 1                                        # still valid memory, no longer anyone's DMA buffer
    v.release()
    pm.free_owner("nobody")                         # a later free closes the lingering mapping
    assert pm._lingering == []
