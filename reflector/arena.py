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
import threading
from dataclasses import dataclass

PAGE = mmap.PAGESIZE


def _round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Slot:
    index: int
    offset: int
    size: int


class Arena:
    """A sealed memfd of ``slots`` slots of ``slot_size`` bytes each (rounded up to pages)."""

    def __init__(self, name: str, slot_size: int, slots: int):
        if slots < 1 or slot_size < 1:
            raise ValueError(f"arena {name!r}: need at least one slot of at least one byte")
        self.slot_size = _round_up(slot_size)
        self.slots = slots
        self.size = self.slot_size * slots
        self.fd = os.memfd_create(f"drvbox-arena-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self.map)
        self._free = list(range(slots - 1, -1, -1))
        self._available = threading.Condition(threading.Lock())
        self._closed = False

    def acquire(self, timeout: float | None) -> Slot | None:
        """Borrow a free slot, waiting up to ``timeout`` seconds; None when none came free."""
        with self._available:
            if not self._free and not self._available.wait_for(lambda: self._free or self._closed, timeout):
                return None
            if self._closed:
                return None
            index = self._free.pop()
        return Slot(index, index * self.slot_size, self.slot_size)

    def release(self, slot: Slot) -> None:
        with self._available:
            self._free.append(slot.index)
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
