"""Harmless: each ioctl makes one ctx.kernel call and reports the outcome in outbuf.

outbuf receives ASCII: the result on success, or ``error:<errno>:<type>`` if the call raised.
"""

from hosts import StreamDriver

READ_PORT = 0x80004000         # inbuf: port (4 bytes LE) -> read_port(port, 1)
WRITE_PORT = 0x80004004        # inbuf: port, value
MAP_AND_READ32 = 0x80004008    # inbuf: phys, length, offset -> region.read32(offset); region kept
REGION_WRITE32 = 0x8000400C    # inbuf: offset, value -> kept region.write32
REGION_VIEW_LEN = 0x80004010   # -> len(kept region.view)
UNMAP = 0x80004014
INTERRUPT_WAIT = 0x80004018    # inbuf: irq -> interrupt(irq).wait(30) then done(), close()
ALLOC_DMA = 0x8000401C         # inbuf: size -> "phys,<first byte>" after writing 0x5A to view[0]
OPEN_DEVICE = 0x80004020       # inbuf: path -> "fd" (closed again)
LOG = 0x80004024               # inbuf: message
REGION_READ_OOB = 0x80004028   # kept region.read32(length) -> IndexError


def _ints(inbuf):
    data = bytes(inbuf)
    return [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)]


class Driver(StreamDriver):
    def init(self, ctx):
        self.kernel = ctx.kernel
        self.region = None

    def _do(self, code, inbuf):
        k = self.kernel
        if code == READ_PORT:
            return k.read_port(_ints(inbuf)[0], 1)
        if code == WRITE_PORT:
            port, value = _ints(inbuf)
            k.write_port(port, value, 1)
            return "ok"
        if code == MAP_AND_READ32:
            phys, length, offset = _ints(inbuf)
            self.region = k.map_io_space(phys, length)
            return f"{self.region.mode},{self.region.read32(offset):#x}"
        if code == REGION_WRITE32:
            offset, value = _ints(inbuf)
            self.region.write32(offset, value)
            return "ok"
        if code == REGION_VIEW_LEN:
            return len(self.region.view)
        if code == UNMAP:
            self.region.close()
            return "ok"
        if code == INTERRUPT_WAIT:
            intr = k.interrupt(_ints(inbuf)[0])
            fired = intr.wait(30)
            intr.done()
            intr.close()
            return f"fired={fired}"
        if code == ALLOC_DMA:
            buf = k.alloc_dma(_ints(inbuf)[0])
            buf.view[0] = 0x5A
            phys = buf.phys
            k.free_dma(buf)
            return f"{phys:#x}"
        if code == OPEN_DEVICE:
            import os
            fd = k.open_device(bytes(inbuf).decode(), os.O_RDONLY)
            os.close(fd)
            return "fd"
        if code == LOG:
            k.log(20, bytes(inbuf).decode())
            return "ok"
        if code == REGION_READ_OOB:
            return self.region.read32(self.region.length)
        return "unknown"

    def io_control(self, opened, code, inbuf, outbuf):
        try:
            result = str(self._do(code, inbuf))
        except Exception as exc:
            result = f"error:{getattr(exc, 'errno', None)}:{type(exc).__name__}"
        data = result.encode()[:len(outbuf)]
        outbuf[:len(data)] = data
        return len(data)
