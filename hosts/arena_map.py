"""The host's mapping of its arena, with guard pages around every slot.

The Reflector cuts the arena into slots, each followed by a guard page it never lends
(``reflector/arena.py``), and writes a descriptor of that layout into the last guard page.  Here
the arena is mapped one page past a ``PROT_NONE`` reservation (so even the first slot has a guard
page before it), the descriptor is read, and every guard page is made ``PROT_NONE`` in this
mapping.  A native driver that runs off either end of a slot then faults instead of writing into
another request's buffers; the host dies of SIGSEGV and the Reflector's crash handling contains it.
Protections are per mapping: the Reflector's own mapping of the same memfd is untouched.

An arena without a descriptor (one made by hand, as unit tests do) is mapped without guards.  A
descriptor that is present but does not fit the arena is refused: the host would otherwise run
with guards in the wrong places.

Input buffers: ``read_only(addr, length)`` makes the whole pages of an input buffer read-only for
the length of one native call, so a driver writing to its input faults too.  Only whole pages can
be protected; the rest of the buffer's first and last page stays writable (the output buffer of
the same request may share that page).

Python's ``mmap`` cannot map at a chosen address, so the mapping is made with libc's ``mmap``
through ctypes and handed out as a plain ``memoryview`` (``PyMemoryView_FromMemory``); it lives as
long as the host.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass

PAGE = mmap.PAGESIZE
# Must match reflector/arena.py (DESCRIPTOR_MAGIC, DESCRIPTOR); the host does not import reflector.
_MAGIC = b"drvbox-arena-v1\0"
_DESCRIPTOR = struct.Struct("<16sQQQ")
_MAP_FAILED = ctypes.c_void_p(-1).value
# Linux's values (the same on x86_64 and arm64); Python's mmap module does not export them.
_PROT_NONE = 0
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_PyBUF_WRITE = 0x200

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_mprotect = _libc.mprotect
_mprotect.restype = ctypes.c_int
_mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.restype = ctypes.py_object
_memory_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)


class ArenaLayoutError(ValueError):
    """The arena's descriptor does not describe this arena."""


@dataclass(frozen=True)
class ArenaMapping:
    view: memoryview         # the whole arena, writable
    base: int                # its address in this process
    size: int
    stride: int              # distance between slots, guard included; 0 when unguarded
    guards: int              # guard pages made PROT_NONE (the leading one included)

    def contains(self, addr: int, length: int) -> bool:
        return self.base <= addr and addr + length <= self.base + self.size


def _fail(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def _protect(addr: int, length: int, prot: int, call: str) -> None:
    if _mprotect(addr, length, prot) != 0:
        raise _fail(call)


def layout(view: memoryview, size: int) -> tuple[int, int] | None:
    """``(stride, slots)`` from the descriptor in the arena's last page, None when there is none.
    Raises ArenaLayoutError for a descriptor that does not fit an arena of ``size`` bytes."""
    if size < PAGE or size % PAGE:
        return None
    magic, stride, slots, guard = _DESCRIPTOR.unpack_from(view, size - PAGE)
    if magic != _MAGIC:
        return None
    if guard != PAGE or stride <= guard or stride % PAGE or slots < 1 or stride * slots != size:
        raise ArenaLayoutError(f"arena descriptor (stride {stride}, {slots} slots, guard {guard}) does not fit "
                               f"an arena of {size} bytes with {PAGE}-byte pages")
    return stride, slots


def map_arena(fd: int, size: int) -> ArenaMapping:
    """Map ``size`` bytes of the arena memfd ``fd`` shared, read-write, between guard pages.
    Raises OSError (a system call failed, naming it) or ArenaLayoutError."""
    if size == 0:
        return ArenaMapping(memoryview(bytearray()), 0, 0, 0, 0)
    length = (size + PAGE - 1) // PAGE * PAGE
    # One page more than the arena, reserved PROT_NONE: the page before the arena stays so.
    reserved = _mmap(None, length + PAGE, _PROT_NONE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
    if reserved in (None, _MAP_FAILED):
        raise _fail(f"mmap(NULL, {length + PAGE}, PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS)")
    base = reserved + PAGE
    try:
        got = _mmap(base, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
        if got != base:
            raise _fail(f"mmap({base:#x}, {length}, PROT_READ|PROT_WRITE, MAP_SHARED|MAP_FIXED, {fd}, 0)")
        view = _memory_view(base, size, _PyBUF_WRITE)
        found = layout(view, size)
        if found is None:
            return ArenaMapping(view, base, size, 0, 1)
        stride, slots = found
        for i in range(slots):
            guard = base + (i + 1) * stride - PAGE
            _protect(guard, PAGE, _PROT_NONE, f"mprotect({guard:#x}, {PAGE}, PROT_NONE)")
        return ArenaMapping(view, base, size, stride, slots + 1)
    except BaseException:
        _munmap(reserved, length + PAGE)
        raise


class read_only:
    """Context manager: the whole pages inside ``[addr, addr + length)`` read-only, then
    read-write again.  Only for memory of an ``ArenaMapping`` (never Python's heap)."""

    __slots__ = ("start", "length")

    def __init__(self, addr: int, length: int):
        self.start = (addr + PAGE - 1) // PAGE * PAGE
        end = (addr + length) // PAGE * PAGE
        self.length = max(0, end - self.start)

    def __enter__(self):
        if self.length:
            _protect(self.start, self.length, mmap.PROT_READ, f"mprotect({self.start:#x}, {self.length}, PROT_READ)")
        return self

    def __exit__(self, *exc):
        if self.length and _mprotect(self.start, self.length, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
            # Pages left read-only would fault a later request in this slot (any driver's): end
            # the host now, with the reason, rather than later without one.
            err = ctypes.get_errno()
            os.write(2, f"hosts.arena_map: mprotect({self.start:#x}, {self.length}, PROT_READ|PROT_WRITE) "
                        f"failed: {os.strerror(err)}; aborting the host\n".encode())
            os.abort()
        return False
