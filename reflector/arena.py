"""The shared-memory arena of one host, and its slots.

One memfd per host, mapped shared by the Reflector and the host.  It is cut into fixed-size
slots; a request borrows one slot for its lifetime, the Reflector copies the caller's input into
it once, and the host hands the driver views over exactly the bytes the request names.

The memfd is sealed against shrinking and growing before the host ever sees it, so a hostile
host cannot ``ftruncate`` it under the Reflector (which would turn the Reflector's next access
into SIGBUS).  What the host writes into a slot is only ever read back by the Reflector within
the bounds the Reflector chose itself.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
from dataclasses import dataclass

PAGE = mmap.PAGESIZE
GUARD = PAGE        # the page that ends every slot

# The descriptor at the start of the arena's last page (the last slot's guard), read by the host:
# magic, then slot stride (guard included), slot count and guard bytes, little-endian u64s.
# hosts/arena_map.py parses it; keep the two in step.
DESCRIPTOR_MAGIC = b"drvbox-arena-v1\0"
DESCRIPTOR = struct.Struct("<16sQQQ")


def _round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Slot:
    index: int
    offset: int
    size: int


class Arena:
    """A sealed memfd of ``slots`` slots; each offers at least the ``slot_size`` bytes asked for
    (``Slot.size``, rounded up to pages) and is followed by its guard page.  ``self.slot_size`` is
    the distance from one slot to the next: usable bytes plus the guard."""

    @staticmethod
    def footprint(slot_size: int, slots: int) -> int:
        """The bytes an arena of ``slots`` slots of ``slot_size`` maps (what ``size`` will be)."""
        return (_round_up(slot_size) + GUARD) * slots

    def __init__(self, name: str, slot_size: int, slots: int):
        if slots < 1 or slot_size < 1:
            raise ValueError(f"arena {name!r}: need at least one slot of at least one byte")
        usable = _round_up(slot_size)
        self.slot_size = usable + GUARD
        self.slots = slots
        self.size = self.footprint(slot_size, slots)
        self.fd = os.memfd_create(f"drvbox-arena-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            DESCRIPTOR.pack_into(self.map, self.size - GUARD, DESCRIPTOR_MAGIC, self.slot_size, slots, GUARD)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self.map)
        # Slots are made once; the free ones are a stack guarded by a bare lock.  A request takes
        # one and gives it back with one lock round each; the Condition is used only when the
        # stack is empty and someone has to wait (and release notifies only then).
        self._slots = tuple(Slot(i, i * self.slot_size, usable) for i in range(slots))
        self._free = list(reversed(self._slots))
        self._lock = threading.Lock()
        self._available = threading.Condition(self._lock)
        self._waiting = 0
        self._closed = False

    def acquire(self, timeout: float | None) -> Slot | None:
        """Borrow a free slot, waiting up to ``timeout`` seconds; None when none came free."""
        with self._lock:
            if self._closed:
                return None
            if self._free:
                return self._free.pop()
            self._waiting += 1
            try:
                came = self._available.wait_for(lambda: self._free or self._closed, timeout)
            finally:
                self._waiting -= 1
            if not came or self._closed:
                return None
            return self._free.pop()

    def release(self, slot: Slot) -> None:
        with self._lock:
            self._free.append(slot)
            if self._waiting:
                self._available.notify()

    def close(self) -> None:
        with self._available:
            self._closed = True
            self._available.notify_all()
        self.view.release()
        try:
            self.map.close()
        except BufferError:      # a view is still held by a request being torn down; the GC will unmap
            pass
        os.close(self.fd)
