"""What every simulated device has in common: a locked register file reachable two ways.

**Mediated** (and port I/O): :meth:`DeviceModel.read` / :meth:`DeviceModel.write`, each one
access with exactly the side effects the real register has (a read of the 16550's RBR pops
the receive FIFO, a write of a doorbell starts DMA).  This is what ``RegisterAccess=mediated``
and ``read_port``/``write_port`` use.

**Mapped**: a page (a sealed memfd, ``page_fd`` of ``page_size`` bytes) that the Reflector maps
into the host.  The model keeps the page showing what each register would read now; the
driver's register reads are plain memory reads.  The model learns of the driver's writes only
when someone calls :meth:`DeviceModel.sync` (the Reflector does, when the host tells it it wrote,
and on a poll): ``sync`` compares the page with what the model last put there, and each
register whose bytes differ is taken as one write of the value now in the page.  That is honest
about what shared memory can tell, and it has limits every model's ``MAPPED_LIMITS`` restates:

* reads have **no side effects** (nothing is popped or cleared by reading);
* a write of the value the register **already shows** is invisible (so write-1-to-clear bits a
  driver just read cannot be cleared through the page: models give such registers a separate
  "clear" register that reads as 0);
* several writes to one register between two syncs are seen as **one, the last**; writes to
  different registers are applied in **address order**, not program order;
* a driver write that lands while ``sync`` runs is kept for the next sync, unless the model
  changes that same register in that same sync: then it can be lost.

Models with registers designed for this (a free-running doorbell index, registers that read 0
and act on the bits written) work fully in mapped mode; the rest need ``mediated``.

Every entry point takes the model's lock, first folds in pending page writes (so the page
and the mediated path see one order of events), acts, and rewrites the page; the platform is
told the interrupt line may have changed only after the lock is released, so an interrupt
callback may call straight back into the model.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from contextlib import contextmanager
from typing import Callable, ClassVar, Iterator

from reflector.simhw.config import DeviceConfig
from reflector.simhw.errors import RegisterAccessError
from reflector.simhw.physmem import PhysicalMemory, round_up, sealed_memfd

__all__ = ["DeviceModel"]


class DeviceModel:
    """Base of the models.  Subclasses define the class constants and the ``_*_reg`` hooks."""

    MODEL: ClassVar[str]            # the registry's Model value
    REG_WIDTH: ClassVar[int]        # bytes per register; every access must be this wide and aligned
    REG_SPAN: ClassVar[int]         # bytes of decoded registers from offset 0; beyond reads 0
    MAPPED_LIMITS: ClassVar[str]    # what mapped mode cannot do for this model, for `drvbox hw`

    def __init__(self, config: DeviceConfig, physmem: PhysicalMemory) -> None:
        self.config = config
        self.name = config.name
        self.physmem = physmem
        self.dma_owner: object = None                   # set by Platform.bind_dma; None: no DMA
        self._lock = threading.RLock()
        self._line_listener: Callable[[DeviceModel], None] | None = None
        self._page: mmap.mmap | None = None
        self.page_fd: int | None = None
        self.page_size = 0
        if config.mem:
            self.page_size = round_up(max([self.REG_SPAN] + [w.length for w in config.mem]))
            self.page_fd = sealed_memfd(f"drvbox-regs-{config.name}", self.page_size)
            self._page = mmap.mmap(self.page_fd, self.page_size, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
        self._published = bytes(self.REG_SPAN)
        self._seen = self._published             # the page as the last absorb read it
        self._tail_zeros = bytes(self.page_size - self.REG_SPAN) if self._page is not None else b""
        self._image_format = "<" + {1: "B", 2: "H", 4: "I"}[self.REG_WIDTH] * (self.REG_SPAN // self.REG_WIDTH)

    # -- the hooks a model implements (called with the lock held) -------------------------------

    def _read_reg(self, offset: int) -> int:
        """The value of the register at ``offset``, with the read's side effects."""
        raise NotImplementedError

    def _peek_reg(self, offset: int) -> int:
        """The value a read would return now, without side effects (what the page shows)."""
        raise NotImplementedError

    def _write_reg(self, offset: int, value: int) -> None:
        raise NotImplementedError

    def _line(self) -> bool:
        """Whether the interrupt line is asserted now."""
        raise NotImplementedError

    def _state(self) -> dict:
        """Model-specific state for :meth:`describe`."""
        return {}

    # -- entry points ---------------------------------------------------------------------------

    @contextmanager
    def _op(self) -> Iterator[None]:
        with self._lock:
            self._absorb()
            yield
            self._publish()
        listener = self._line_listener
        if listener is not None:
            listener(self)

    def _check_access(self, offset: int, width: int) -> None:
        if width != self.REG_WIDTH:
            raise RegisterAccessError(f"{self.name} ({self.MODEL}) has {8 * self.REG_WIDTH}-bit registers: "
                                      f"access offset {offset:#x} with width {self.REG_WIDTH}, not {width!r}")
        if type(offset) is not int or offset < 0 or offset % self.REG_WIDTH:
            raise RegisterAccessError(f"{self.name} ({self.MODEL}): register offset {offset!r} must be a "
                                      f"non-negative multiple of {self.REG_WIDTH}")

    def read(self, offset: int, width: int) -> int:
        """One register read with its side effects (mediated mode and port I/O).  Widths in bytes."""
        self._check_access(offset, width)
        with self._op():
            return self._read_reg(offset) if offset < self.REG_SPAN else 0

    def write(self, offset: int, value: int, width: int) -> None:
        """One register write with its side effects.  Writes beyond the register file are ignored."""
        self._check_access(offset, width)
        if type(value) is not int or not 0 <= value < 1 << (8 * width):
            raise RegisterAccessError(f"{self.name}: value {value!r} does not fit in {width} byte(s)")
        with self._op():
            if offset < self.REG_SPAN:
                self._write_reg(offset, value)

    def sync(self) -> int:
        """Fold in the driver's writes to the mapped page and refresh it; returns the writes seen."""
        with self._op():
            return self._last_absorbed

    def irq_asserted(self) -> bool:
        with self._lock:
            return self._line()

    def describe(self) -> dict:
        c = self.config
        with self._lock:
            state = self._state()
        return {
            "name": self.name, "model": self.MODEL,
            "mem": [[w.base, w.length] for w in c.mem], "io": [[w.base, w.length] for w in c.io],
            "irq": c.irq, "asserted": self.irq_asserted(), "register_width": self.REG_WIDTH,
            "mapped_limits": self.MAPPED_LIMITS, "state": state,
        }

    def close(self) -> None:
        """Unmap and close the register page (the platform is going away)."""
        with self._lock:
            if self._page is not None:
                try:
                    self._page.close()
                except BufferError:
                    pass        # a test still holds a view of it; the mapping goes with that view
                self._page = None
            if self.page_fd is not None:
                os.close(self.page_fd)
                self.page_fd = None

    # -- the mapped page ------------------------------------------------------------------------

    _last_absorbed = 0

    def _registers(self) -> list[int]:
        """Every register's value as a read would see it now, from offset 0 (models may override
        this with one pass over their state; it is on the path of every access)."""
        return [self._peek_reg(off) for off in range(0, self.REG_SPAN, self.REG_WIDTH)]

    def _image(self) -> bytes:
        return struct.pack(self._image_format, *self._registers())

    def _absorb(self) -> None:
        """Apply, in address order, each register whose page bytes differ from what we published."""
        self._last_absorbed = 0
        if self._page is None:
            return
        span, w = self.REG_SPAN, self.REG_WIDTH
        current = self._page[:span]
        self._seen = current
        if current != self._published:
            for off in range(0, span, w):
                now = current[off:off + w]
                if now != self._published[off:off + w]:
                    self._write_reg(off, int.from_bytes(now, "little"))
                    self._last_absorbed += 1
        # Bytes beyond the register file decode to nothing: put the zeros back.
        if self._page[span:] != self._tail_zeros:
            self._page[span:] = self._tail_zeros

    def _publish(self) -> None:
        """Make the page show the registers as a read would see them now; touch only what differs.

        "Differs" is judged against the page as :meth:`_absorb` saw it, not as it is now: a
        driver write that landed in between, to a register the model did not change, is left in
        the page (and taken by the next absorb) instead of being overwritten with the old value.
        """
        if self._page is None:
            return
        image = self._image()
        seen = self._seen
        if seen != image:
            w = self.REG_WIDTH
            for off in range(0, self.REG_SPAN, w):
                if seen[off:off + w] != image[off:off + w]:
                    self._page[off:off + w] = image[off:off + w]
        self._published = image
