"""The simulated physical address space of DMA: memfd-backed buffers at made-up physical addresses.

A driver's ``alloc_dma(size)`` ends here: :meth:`PhysicalMemory.alloc` creates a memfd, maps it
in the Device Manager, and gives it a page-aligned physical address in the DMA zone.  The
Reflector passes the fd to the host, which maps the same pages, so what the driver writes at
``buf.view`` is what a model reads at ``buf.phys`` and the other way round.

Why each choice:

* **Sealed memfds.**  The host holds the fd and could ``ftruncate`` it; a Device Manager that
  then touches its own mapping past the new end dies of SIGBUS.  ``F_SEAL_SHRINK | F_SEAL_GROW |
  F_SEAL_SEAL`` makes the size fixed for everybody before the fd ever leaves this process.
* **Every access is bounded by one allocation.**  A range that starts in one buffer and runs into
  the next, or into a gap, is refused (:class:`DmaError`, EFAULT), as an IOMMU would fault it.
* **Owners.**  Each allocation has an owner (whatever the Reflector uses: a driver or host id).
  ``free_owner`` releases everything a dead host held.  Accesses may name the owner they act for
  (a model bound to one driver); an allocation of another owner is then refused (EACCES).
* **Freed addresses are reused only with new memory.**  A host that kept a mapping of a freed
  buffer still maps the *old* memfd; it can never reach the buffer that takes the address next.
* Copies (:meth:`read`, :meth:`write`) happen under the table's lock, so a buffer cannot be
  freed in the middle of one.  :meth:`view` hands out a memoryview; whoever takes one must
  ``release()`` it, or the mapping stays alive (it is closed later, when no view holds it).
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import mmap
import os
import threading
from dataclasses import dataclass, field

from reflector.simhw.errors import DmaError

__all__ = ["PAGE_SIZE", "DMA_ZONE_BASE", "DMA_ZONE_SIZE", "DmaRegion", "PhysicalMemory"]

PAGE_SIZE = mmap.PAGESIZE
# Default DMA zone: 256 MiB at 2 GiB, above the device windows of the built-in platform
# (which sit at 0x1000_0000) and below 4 GiB so 32-bit descriptor fields can reach it.
DMA_ZONE_BASE = 0x8000_0000
DMA_ZONE_SIZE = 0x1000_0000

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def sealed_memfd(name: str, size: int) -> int:
    """A new memfd of exactly ``size`` bytes whose size nobody can change any more (close-on-exec)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def round_up(n: int, to: int = PAGE_SIZE) -> int:
    return (n + to - 1) // to * to


@dataclass(eq=False)
class DmaRegion:
    """One DMA buffer: ``phys`` .. ``phys + size`` in the simulated address space.

    ``fd`` is the memfd (owned by :class:`PhysicalMemory`: pass a duplicate, never close it);
    ``view`` is the Device Manager's own writable view of all ``size`` bytes.
    """

    phys: int
    size: int
    fd: int
    view: memoryview
    owner: object
    _map: mmap.mmap = field(repr=False)

    @property
    def end(self) -> int:
        return self.phys + self.size


class PhysicalMemory:
    """The DMA zone ``[base, base + size)``: allocation, lookup and bounded access."""

    def __init__(self, base: int = DMA_ZONE_BASE, size: int = DMA_ZONE_SIZE) -> None:
        if base % PAGE_SIZE or size % PAGE_SIZE or size <= 0 or base < 0:
            raise ValueError(f"DMA zone {base:#x}+{size:#x} must be a positive, page-aligned ({PAGE_SIZE:#x}) range")
        self.base, self.size = base, size
        self._lock = threading.Lock()
        self._starts: list[int] = []            # sorted phys of live allocations
        self._regions: dict[int, DmaRegion] = {}
        self._lingering: list[mmap.mmap] = []   # freed, but someone still held a view

    @property
    def end(self) -> int:
        return self.base + self.size

    # -- allocation -----------------------------------------------------------------------------

    def alloc(self, size: int, owner: object) -> DmaRegion:
        """Allocate ``size`` bytes (rounded up to whole pages) for ``owner``; first fit in the zone.

        Raises DmaError with EINVAL for a size that is not a positive int, ENOMEM when no gap in
        the zone is large enough.  Quotas are the Reflector's business (it asks :meth:`held`).
        """
        if type(size) is not int or size <= 0:
            raise DmaError(f"DMA allocation size {size!r} must be a positive number of bytes", errno.EINVAL)
        if owner is None:
            raise DmaError("a DMA allocation needs an owner (the driver or host it is freed with)", errno.EINVAL)
        length = round_up(size)
        with self._lock:
            phys = self._find_gap(length)
            if phys is None:
                raise DmaError(f"DMA zone {self.base:#x}..{self.end:#x} has no free {length:#x} bytes "
                               f"({self._used():#x} of {self.size:#x} in use)", errno.ENOMEM)
            fd = sealed_memfd(f"drvbox-dma-{phys:x}", length)
            try:
                m = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                os.close(fd)
                raise
            region = DmaRegion(phys, length, fd, memoryview(m), owner, m)
            bisect.insort(self._starts, phys)
            self._regions[phys] = region
            return region

    def _find_gap(self, length: int) -> int | None:
        cursor = self.base
        for start in self._starts:
            if start - cursor >= length:
                return cursor
            cursor = self._regions[start].end
        return cursor if self.end - cursor >= length else None

    def _used(self) -> int:
        return sum(r.size for r in self._regions.values())

    def free(self, phys: int) -> None:
        """Free the allocation that starts at ``phys``; anything else is an error (EFAULT)."""
        with self._lock:
            region = self._regions.get(phys)
            if region is None:
                shown = f"{phys:#x}" if type(phys) is int else repr(phys)
                raise DmaError(f"no DMA allocation starts at {shown} (free takes the phys that alloc returned)")
            self._drop(region)

    def free_owner(self, owner: object) -> int:
        """Free everything ``owner`` holds (a host died or restarted); returns the bytes freed."""
        with self._lock:
            mine = [r for r in self._regions.values() if r.owner == owner]
            for region in mine:
                self._drop(region)
            self._close_lingering()
            return sum(r.size for r in mine)

    def _drop(self, region: DmaRegion) -> None:
        del self._regions[region.phys]
        self._starts.remove(region.phys)
        region.view.release()
        os.close(region.fd)
        self._lingering.append(region._map)
        self._close_lingering()

    def _close_lingering(self) -> None:
        still = []
        for m in self._lingering:
            try:
                m.close()
            except BufferError:     # a view handed out by view() is still alive
                still.append(m)
        self._lingering = still

    def close(self) -> None:
        """Free every allocation (the Device Manager is shutting down)."""
        with self._lock:
            for region in list(self._regions.values()):
                self._drop(region)

    # -- lookup and access ----------------------------------------------------------------------

    def held(self, owner: object) -> int:
        """Bytes currently allocated to ``owner`` (for the Reflector's ``DmaQuota`` check)."""
        with self._lock:
            return sum(r.size for r in self._regions.values() if r.owner == owner)

    def regions(self, owner: object = None) -> list[DmaRegion]:
        """Live allocations in address order, all of them or those of ``owner``."""
        with self._lock:
            return [self._regions[s] for s in self._starts if owner is None or self._regions[s].owner == owner]

    def _locate(self, phys: int, length: int, owner: object) -> tuple[DmaRegion, int]:
        """The allocation holding all of ``[phys, phys + length)`` and the offset in it; else raise."""
        if type(phys) is not int or type(length) is not int or phys < 0 or length < 0:
            raise DmaError(f"DMA range {phys!r}+{length!r} must be non-negative ints", errno.EINVAL)
        i = bisect.bisect_right(self._starts, phys) - 1
        region = self._regions[self._starts[i]] if i >= 0 else None
        if region is None or not phys < region.end:
            raise DmaError(f"DMA address {phys:#x} is not in any DMA allocation")
        if phys + length > region.end:
            raise DmaError(f"DMA range {phys:#x}+{length:#x} runs past the end of the allocation "
                           f"{region.phys:#x}..{region.end:#x}")
        if owner is not None and region.owner != owner:
            raise DmaError(f"DMA range {phys:#x}+{length:#x} belongs to another owner", errno.EACCES)
        return region, phys - region.phys

    def view(self, phys: int, length: int, owner: object = None) -> memoryview:
        """A writable memoryview of ``length`` bytes at ``phys``, within one allocation (else raise).

        ``owner``: when given, the allocation must be that owner's (a model acting for a bound
        driver passes it); None is the Device Manager acting for itself.  Release the view when
        done: the memory is not unmapped while a view is alive.
        """
        with self._lock:
            region, off = self._locate(phys, length, owner)
            return region.view[off:off + length]

    def read(self, phys: int, length: int, owner: object = None) -> bytes:
        """Copy ``length`` bytes out of one allocation (see :meth:`view` for ``owner``)."""
        with self._lock:
            region, off = self._locate(phys, length, owner)
            return bytes(region.view[off:off + length])

    def write(self, phys: int, data: bytes | bytearray | memoryview, owner: object = None) -> None:
        """Copy ``data`` into one allocation (see :meth:`view` for ``owner``)."""
        data = memoryview(data).cast("B")
        with self._lock:
            region, off = self._locate(phys, len(data), owner)
            region.view[off:off + len(data)] = data
