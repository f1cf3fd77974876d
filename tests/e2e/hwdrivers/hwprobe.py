"""A test driver that performs one ctx.kernel operation per IOCTL and reports what happened.

Every IOCTL takes ``<QQQQ`` (four arguments) and answers ``<iQQ``: the errno the operation raised
in the driver (0 if it worked), a value and a second value.  So the test sees, from outside, the
exact errno a driver gets -- ``PermissionError`` is EACCES, a refusal EBUSY -- without the
request itself failing.  Regions, interrupts and DMA buffers are kept in numbered lists.
"""

import errno
import os
import struct

from hosts import DriverError, StreamDriver
from hosts.ioctl import FILE_DEVICE_UNKNOWN, ctl_code
from hosts.wire import KernelOp

ARGS = struct.Struct("<QQQQ")
ANSWER = struct.Struct("<iQQ")


def code(n):
    return ctl_code(FILE_DEVICE_UNKNOWN, n)


MAP, REG_READ, REG_WRITE, PORT_READ, PORT_WRITE = code(0), code(1), code(2), code(3), code(4)
HOOK, WAIT, DONE, CLOSE_IRQ, ALLOC, FREE, EXIT, RAW, VIEW_WRITE = (code(n) for n in range(5, 14))


class Driver(StreamDriver):
    def init(self, ctx):
        self.kernel = ctx.kernel
        self.regions, self.interrupts, self.buffers = [], [], []

    def io_control(self, opened, code_, inbuf, outbuf):
        if len(inbuf) != ARGS.size or len(outbuf) < ANSWER.size:
            raise DriverError(errno.EINVAL, "in: <QQQQ, out: <iQQ")
        a, b, c, d = ARGS.unpack(inbuf)
        try:
            value, extra = self._do(code_, a, b, c, d)
            status = 0
        except OSError as exc:          # PermissionError included: it is the point of the test
            status, value, extra = exc.errno or errno.EIO, 0, 0
        ANSWER.pack_into(outbuf, 0, status, value, extra)
        return ANSWER.size

    def _do(self, op, a, b, c, d):
        k = self.kernel
        if op == MAP:
            region = k.map_io_space(a, b)
            self.regions.append(region)
            return len(self.regions) - 1, 1 if region.mode == "mapped" else 0
        if op == REG_READ:
            return k.read_register(self.regions[a], b, c), 0
        if op == REG_WRITE:
            k.write_register(self.regions[a], b, d, c)
            return 0, 0
        if op == VIEW_WRITE:            # a plain memory write into a mapped page
            self.regions[a].view[b:b + c] = d.to_bytes(c, "little")
            return 0, 0
        if op == PORT_READ:
            return k.read_port(a, b), 0
        if op == PORT_WRITE:
            k.write_port(a, b, c)
            return 0, 0
        if op == HOOK:
            self.interrupts.append(k.interrupt(a))
            return len(self.interrupts) - 1, 0
        if op == WAIT:
            return int(self.interrupts[a].wait(b / 1000)), 0
        if op == DONE:
            self.interrupts[a].done()
            return 0, 0
        if op == CLOSE_IRQ:
            self.interrupts[a].close()
            return 0, 0
        if op == ALLOC:
            buf = k.alloc_dma(a)
            self.buffers.append(buf)
            buf.view[:1] = b"!"           # the memory is really ours to write
            return len(self.buffers) - 1, buf.phys
        if op == FREE:
            k.free_dma(self.buffers[a])
            return 0, 0
        if op == RAW:                   # a forged KCALL, past the proxy's own checks
            answer = k._call(KernelOp(a), b, c, d)
            for fd in answer.fds:
                os.close(fd)
            return answer.value, 0
        if op == EXIT:
            os._exit(a)
        raise DriverError(errno.ENOTTY, f"unknown IOCTL {op:#x}")
