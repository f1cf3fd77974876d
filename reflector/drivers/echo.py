"""A driver that does as little as possible, for `drvbox bench` and for tests of the request path.

IOCTLs (CE CTL_CODE(FILE_DEVICE_UNKNOWN=0x22, function, METHOD_BUFFERED, FILE_ANY_ACCESS)):

* ``IOCTL_ECHO`` (0x00220000): copies the input to the output, returns min(in, out) bytes.
* ``IOCTL_ECHO_CRASH`` (0x00220004): ends the process at once (``os._exit(70)``): in user mode it
  takes down only its host, which is what the restart benchmark measures.  Never send it to a
  kernel-mode instance.
* ``IOCTL_ECHO_SLEEP`` (0x00220008): sleeps the number of milliseconds given as a little-endian
  u32 in the input (a slow driver, for timeout tests).

``read`` fills the buffer from a block of bytes made once (up to 1 MiB; the rest of a longer
read is left as it is), as a device delivering data would: so a measured read includes the one
copy into the arena that producing the data costs.  ``write`` consumes everything.
"""

import os
import struct
import time

from hosts import StreamDriver

IOCTL_ECHO = 0x00220000
IOCTL_ECHO_CRASH = 0x00220004
IOCTL_ECHO_SLEEP = 0x00220008


_BLOCK = memoryview(bytes(range(256)) * 4096)          # 1 MiB; sliced without a copy


class Driver(StreamDriver):
    def init(self, ctx):
        self.ctx = ctx

    def open(self, access, share):
        return None

    def read(self, opened, out):
        n = min(len(out), len(_BLOCK))
        out[:n] = _BLOCK[:n]
        return len(out)

    def write(self, opened, data):
        return len(data)

    def seek(self, opened, offset, whence):
        return 0

    def io_control(self, opened, code, inbuf, outbuf):
        if code == IOCTL_ECHO:
            n = min(len(inbuf), len(outbuf))
            outbuf[:n] = inbuf[:n]
            return n
        if code == IOCTL_ECHO_CRASH:
            os._exit(70)
        if code == IOCTL_ECHO_SLEEP:
            (ms,) = struct.unpack_from("<I", inbuf)
            time.sleep(ms / 1000)
            return 0
        from hosts import DriverError
        raise DriverError(22)
