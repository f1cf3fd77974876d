"""Harmless loopback driver: what is written can be read back, in order."""

import errno
import threading

from hosts import DriverError, StreamDriver

IOCTL_ECHO = 0x80002000          # outbuf <- inbuf, returns len(inbuf)
IOCTL_DEVICE = 0x80002004        # outbuf <- ctx.device
IOCTL_REGISTRY = 0x80002008      # inbuf: a value name; outbuf <- repr(ctx.registry[name])
IOCTL_POWER_EVENTS = 0x8000200C  # outbuf <- "up,down,..." as they happened


class Driver(StreamDriver):
    def init(self, ctx):
        self.ctx = ctx
        self.lock = threading.Lock()
        self.queue = bytearray()
        self.power = []
        self.deinit_called = False

    def deinit(self):
        self.deinit_called = True

    def open(self, access, share):
        return {"access": access, "position": 0}

    def write(self, opened, data):
        with self.lock:
            self.queue += data
        return len(data)

    def read(self, opened, out):
        with self.lock:
            n = min(len(out), len(self.queue))
            out[:n] = self.queue[:n]
            del self.queue[:n]
        return n

    def seek(self, opened, offset, whence):
        if whence != 0 or offset < 0:
            raise DriverError(errno.EINVAL)
        opened["position"] = offset
        return offset

    def _put(self, outbuf, data):
        if len(data) > len(outbuf):
            raise DriverError(errno.ENOBUFS)
        outbuf[:len(data)] = data
        return len(data)

    def io_control(self, opened, code, inbuf, outbuf):
        if code == IOCTL_ECHO:
            return self._put(outbuf, inbuf)
        if code == IOCTL_DEVICE:
            return self._put(outbuf, self.ctx.device.encode())
        if code == IOCTL_REGISTRY:
            name = bytes(inbuf).decode()
            try:
                return self._put(outbuf, repr(self.ctx.registry[name]).encode())
            except KeyError:
                raise DriverError(errno.ENOENT) from None
        if code == IOCTL_POWER_EVENTS:
            return self._put(outbuf, ",".join(self.power).encode())
        raise DriverError(errno.ENOTTY)

    def power_up(self):
        self.power.append("up")

    def power_down(self):
        self.power.append("down")
