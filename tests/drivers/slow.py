"""Harmless but slow: read blocks until IOCTL_RELEASE (on any handle) lets it go.

A blocked read has written b"wait" into its buffer first (so a test that shares the arena sees
that the read is inside the driver), and writes b"slow" over it once released.

The safety timeout only keeps a broken test from hanging forever; tests never rely on it.
"""

import errno
import threading

from hosts import DriverError, StreamDriver

IOCTL_RELEASE = 0x80003000
IOCTL_WAITING = 0x80003004  # outbuf[0] <- 1 once a read is blocked


class Driver(StreamDriver):
    def init(self, ctx):
        self.release = threading.Event()
        self.waiting = threading.Event()

    def read(self, opened, out):
        out[:4] = b"wait"
        self.waiting.set()
        if not self.release.wait(60):
            raise DriverError(errno.ETIMEDOUT)
        out[:4] = b"slow"
        return 4

    def io_control(self, opened, code, inbuf, outbuf):
        if code == IOCTL_RELEASE:
            self.release.set()
            return 0
        if code == IOCTL_WAITING:
            outbuf[0] = 1 if self.waiting.is_set() else 0
            return 1
        raise DriverError(errno.ENOTTY)
