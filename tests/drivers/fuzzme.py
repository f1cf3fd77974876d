"""Hostile-by-accident driver for `drvbox fuzz`: a small, mostly correct device with three planted
bugs of the kinds a fuzzer must find, each reachable only by a particular input:

* ``IOCTL_PARSE`` trusts its input's first byte as a record count: 0xFF makes it read through a
  NULL pointer (ctypes) -- the host dies of SIGSEGV.
* ``IOCTL_WAIT`` waits for data that an empty input never brings -- it hangs until the host's
  ProcTimeout, and the watchdog kills the host.
* A write, then a seek, then a read on the same handle reads through a cursor the seek left stale
  -- the host ``os._exit(EXIT_STALE_CURSOR)``s.

Everything else answers, or fails with a proper errno -- ``IOCTL_SUM`` of no input with ETIMEDOUT,
as a driver that waited for data in vain may: the driver's own answer, which a fuzzer must not take
for a hang of its host.
"""

import ctypes
import errno
import os
import threading

from hosts import DriverError, StreamDriver

BASE = 0x00220000
IOCTL_ECHO = BASE + 0x00         # out <- in
IOCTL_SUM = BASE + 0x04          # out <- u32 sum of the input's bytes; ETIMEDOUT for no input
IOCTL_PARSE = BASE + 0x08        # planted: SIGSEGV when in[0] == 0xFF
IOCTL_WAIT = BASE + 0x0C         # planted: hangs when the input is empty
IOCTL_VERSION = BASE + 0x10      # out <- b"fuzzme/1"
EXIT_STALE_CURSOR = 7            # the exit status of the write-seek-read bug

# The registry line that lets exactly these codes through.
IOCTL_ALLOW = ('"IoctlAllow"=multi_sz:"0x00220000","0x00220004","0x00220008","0x0022000C","0x00220010"')


class Driver(StreamDriver):
    def init(self, ctx):
        self.lock = threading.Lock()
        self.store = bytearray()

    def open(self, access, share):
        return {"pos": 0, "last": []}      # per handle: position, and its last operations

    def _remember(self, opened, kind):
        opened["last"] = (opened["last"] + [kind])[-3:]

    def write(self, opened, data):
        with self.lock:
            end = opened["pos"] + len(data)
            if end > 1 << 16:
                raise DriverError(errno.ENOSPC)
            if end > len(self.store):
                self.store.extend(bytes(end - len(self.store)))
            self.store[opened["pos"]:end] = data
            opened["pos"] = end
        self._remember(opened, "write")
        return len(data)

    def seek(self, opened, offset, whence):
        base = {0: 0, 1: opened["pos"], 2: len(self.store)}.get(whence)
        if base is None or not 0 <= base + offset <= 1 << 16:
            raise DriverError(errno.EINVAL)
        opened["pos"] = base + offset
        self._remember(opened, "seek")
        return opened["pos"]

    def read(self, opened, out):
        if opened["last"][-2:] == ["write", "seek"]:
            os._exit(EXIT_STALE_CURSOR)            # planted bug 3
        with self.lock:
            data = self.store[opened["pos"]:opened["pos"] + len(out)]
        out[:len(data)] = data
        opened["pos"] += len(data)
        self._remember(opened, "read")
        return len(data)

    def io_control(self, opened, code, inbuf, outbuf):
        if code == IOCTL_ECHO:
            n = min(len(inbuf), len(outbuf))
            outbuf[:n] = inbuf[:n]
            return n
        if code == IOCTL_SUM:
            if not len(inbuf):
                raise DriverError(errno.ETIMEDOUT)     # "no data came": not a hang
            if len(outbuf) < 4:
                raise DriverError(errno.EINVAL)
            outbuf[:4] = (sum(inbuf) & 0xFFFFFFFF).to_bytes(4, "little")
            return 4
        if code == IOCTL_PARSE:
            if len(inbuf) and inbuf[0] == 0xFF:
                ctypes.string_at(0)                # planted bug 1: strlen(NULL), SIGSEGV
            return 0
        if code == IOCTL_WAIT:
            if not len(inbuf):
                threading.Event().wait()           # planted bug 2: waits forever
            return 0
        if code == IOCTL_VERSION:
            version = b"fuzzme/1"
            n = min(len(version), len(outbuf))
            outbuf[:n] = version[:n]
            return n
        raise DriverError(errno.ENOTTY)
