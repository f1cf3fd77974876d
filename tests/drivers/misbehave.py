"""Hostile driver: each ioctl code misbehaves in one way.  Each must fail only that request."""

import errno

from hosts import DriverError, StreamDriver

RAISE_DRIVER_ERROR = 1     # DriverError(ENOSPC): fails with ENOSPC
RAISE_VALUE_ERROR = 2      # fails with EIO, logged
WRITE_PAST_END = 3         # writes len(outbuf) + 1 bytes: raises inside the driver -> EIO
COUNT_TOO_LARGE = 4        # returns len(outbuf) + 1 -> EIO
COUNT_STR = 5              # returns "3" -> EIO
COUNT_FLOAT = 6            # returns 3.0 -> EIO
COUNT_BOOL = 7             # returns True -> EIO
RAISE_SYSTEM_EXIT = 8      # SystemExit must not end the worker thread -> EIO
WRITE_INPUT = 9            # inbuf[0] = 0: input is read-only -> EIO
BAD_ERRNO = 10             # DriverError(0) and DriverError("x") -> EIO
COUNT_NEGATIVE = 11        # returns -1 -> EIO
KEEP_VIEW = 12             # keeps outbuf; USE_KEPT_VIEW then writes through it
USE_KEPT_VIEW = 13
RAISE_KEYBOARD_INTERRUPT = 14
COUNT_NONE = 15            # returns None -> EIO
GOOD = 16                  # returns len(outbuf) after filling it with 0x55


class Driver(StreamDriver):
    def init(self, ctx):
        self.kept = None

    def read(self, opened, out):
        out[len(out)] = 1  # one past the end, always
        return len(out)

    def write(self, opened, data):
        return len(data) + 1

    def seek(self, opened, offset, whence):
        return -5

    def io_control(self, opened, code, inbuf, outbuf):
        if code == RAISE_DRIVER_ERROR:
            raise DriverError(errno.ENOSPC)
        if code == RAISE_VALUE_ERROR:
            raise ValueError("driver bug")
        if code == WRITE_PAST_END:
            outbuf[:len(outbuf) + 1] = b"\xff" * (len(outbuf) + 1)
            return len(outbuf)
        if code == COUNT_TOO_LARGE:
            return len(outbuf) + 1
        if code == COUNT_STR:
            return "3"
        if code == COUNT_FLOAT:
            return 3.0
        if code == COUNT_BOOL:
            return True
        if code == RAISE_SYSTEM_EXIT:
            raise SystemExit(3)
        if code == WRITE_INPUT:
            inbuf[0] = 0
            return 0
        if code == BAD_ERRNO:
            raise DriverError(int(bytes(inbuf) or b"0") if bytes(inbuf).isdigit() else "x")
        if code == COUNT_NEGATIVE:
            return -1
        if code == KEEP_VIEW:
            self.kept = outbuf
            return 0
        if code == USE_KEPT_VIEW:
            self.kept[0] = 0xAA
            return 0
        if code == RAISE_KEYBOARD_INTERRUPT:
            raise KeyboardInterrupt
        if code == COUNT_NONE:
            return None
        if code == GOOD:
            outbuf[:] = b"\x55" * len(outbuf)
            return len(outbuf)
        raise DriverError(errno.ENOTTY)
