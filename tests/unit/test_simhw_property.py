"""Properties under arbitrary driver behaviour: any register traffic keeps the page honest, and no
descriptor, however hostile, makes the block device touch memory it was not given."""

import mmap
import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from reflector.simhw.blockdev import DESCRIPTOR
from reflector.simhw.config import DeviceConfig
from reflector.simhw.physmem import PAGE_SIZE
from reflector.simhw.platform import Platform

DEVICES = [
    DeviceConfig("UART1", "uart16550", io=[(0x3F8, 8)], mem=[(0x1000_2000, 0x1000)], irq=4),
    DeviceConfig("DISK1", "blockdev", mem=[(0x1000_0000, 0x1000)], irq=14, values={"SizeBytes": 16 * 512}),
    DeviceConfig("GPIO1", "gpio", mem=[(0x1000_1000, 0x1000)], irq=9),
]

access = st.tuples(
    st.sampled_from(["read", "write", "page", "sync", "outside"]),
    st.sampled_from(["UART1", "DISK1", "GPIO1"]),
    st.integers(0, 0x3F),
    st.integers(0, 0xFFFF_FFFF),
)


def page_of(model):
    fd = os.dup(model.page_fd)
    try:
        return mmap.mmap(fd, model.page_size)
    finally:
        os.close(fd)


@settings(max_examples=150, deadline=None)
@given(st.lists(access, max_size=60))
def test_any_register_traffic_keeps_the_page_equal_to_what_reads_would_see(steps):
    p = Platform(DEVICES)
    delivered = []
    p.on_interrupt(delivered.append)
    for irq in (4, 9, 14):
        p.unmask(irq)
    pages = {m.name: page_of(m) for m in p.devices()}
    try:
        for kind, name, offset, value in steps:
            model = p.device(name)
            w = model.REG_WIDTH
            off = offset // w * w
            v = value & ((1 << 8 * w) - 1)
            if kind == "read":
                model.read(off, w)
            elif kind == "write":
                model.write(off, v, w)
            elif kind == "page":
                pages[name][off:off + w] = v.to_bytes(w, "little")
                continue                     # not folded in yet: the invariant holds after a sync
            elif kind == "sync":
                p.sync()
            else:
                if name == "UART1":
                    model.feed(bytes([v & 0xFF]) * (offset % 20), flow_control=bool(offset & 1))
                elif name == "GPIO1":
                    model.set_input(offset % 32, v & 1)
                else:
                    model.write_sectors(offset % 16, bytes([v & 0xFF]) * 512)
            p.sync()
            for m in p.devices():
                with m._lock:
                    regs = [m._peek_reg(o) for o in range(0, m.REG_SPAN, m.REG_WIDTH)]
                fmt = "<" + {1: "B", 4: "I"}[m.REG_WIDTH] * len(regs)
                assert pages[m.name][:m.REG_SPAN] == struct.pack(fmt, *regs), m.name
                assert pages[m.name][m.REG_SPAN:] == bytes(m.page_size - m.REG_SPAN)
        assert all(irq in (4, 9, 14) for irq in delivered)
    finally:
        for page in pages.values():
            page.close()
        p.close()


descriptor = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF_FFFF),
                       st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 64 - 1))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(descriptor, st.tuples(st.sampled_from([1, 2]), st.just(0), st.just(0), st.integers(0, 20),
                                                  st.integers(0, 20), st.integers(-2, 2 * PAGE_SIZE + 2),
                                                  st.just(0))), min_size=1, max_size=8),
       st.integers(0, 0xFFFF_FFFF), st.integers(0, 12))
def test_no_descriptor_reaches_memory_of_another_owner(descs, tail, ring_size):
    p = Platform(DEVICES)
    try:
        pm = p.physmem
        victim_before = pm.alloc(PAGE_SIZE, "victim")
        ring = pm.alloc(PAGE_SIZE, "disk-owner")
        buf = pm.alloc(2 * PAGE_SIZE, "disk-owner")
        victim_after = pm.alloc(PAGE_SIZE, "victim")
        for r in (victim_before, victim_after):
            r.view[:] = b"\x5A" * r.size
        p.bind_dma("DISK1", "disk-owner")
        for i, (op, status, flags, count, sector, buffer, cookie) in enumerate(descs):
            if -2 <= buffer <= 2 * PAGE_SIZE + 2:       # the second strategy: near the real buffer
                buffer = buf.phys + buffer
            buffer %= 2 ** 64
            ring.view[i * 32:(i + 1) * 32] = DESCRIPTOR.pack(op, status, flags, count, sector, buffer, cookie)
        base = 0x1000_0000
        p.mem_write(base + 0x10, ring.phys & 0xFFFF_FFFF, 4)
        p.mem_write(base + 0x14, ring.phys >> 32, 4)
        p.mem_write(base + 0x18, ring_size, 4)
        p.mem_write(base + 0x1C, 1, 4)
        p.mem_write(base + 0x20, tail if tail % 3 else len(descs), 4)
        for r in (victim_before, victim_after):
            assert bytes(r.view) == b"\x5A" * r.size
        head = p.mem_read(base + 0x24, 4)
        assert head in (0, p.mem_read(base + 0x20, 4))  # all processed, or none (ring refused)
    finally:
        p.close()
