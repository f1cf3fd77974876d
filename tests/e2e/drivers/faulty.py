"""A driver that misbehaves on request, for end-to-end tests of containment.

It is also a plain, correct loopback device: what is written can be read back, with seek.
Each IOCTL below makes it fail in one real way; the tests check that only its host pays.
"""

import ctypes
import errno
import os
import struct
import sys
import threading
import time

from hosts import DriverError, StreamDriver

BASE = 0x00220000
IOCTL_ECHO = BASE + 0x00          # copy in to out
IOCTL_SEGV = BASE + 0x04          # dereference NULL through ctypes: SIGSEGV
IOCTL_EXIT = BASE + 0x08          # os._exit(3)
IOCTL_LOOP = BASE + 0x0C          # spin forever (the watchdog must kill the host)
IOCTL_BOMB = BASE + 0x10          # allocate memory until something gives
IOCTL_SLEEP = BASE + 0x14         # sleep u32 milliseconds
IOCTL_RAISE = BASE + 0x18         # DriverError(u32 errno)
IOCTL_FORGE_REPLY = BASE + 0x1C   # hostile: claim more bytes than the request's buffer holds
IOCTL_FORGE_ID = BASE + 0x20      # hostile: answer a request that is not in flight
IOCTL_SEND_FD = BASE + 0x24       # hostile: pass a file descriptor to the Reflector
IOCTL_FLOOD = BASE + 0x28         # hostile: flood the channel with log frames
IOCTL_GARBAGE = BASE + 0x2C       # hostile: send bytes that are no frame at all
IOCTL_SYSCALL = BASE + 0x30       # try socket(): seccomp must refuse and report it
IOCTL_SYSCALL_FLOOD = BASE + 0x34  # hostile: denied system calls in a loop
IOCTL_DENIED = 0x00330000         # not in any test policy's IoctlAllow


def _channel_fd() -> int:
    """The host's channel: the one SOCK_SEQPACKET socket among its fds."""
    import stat
    for fd in range(3, 256):
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                return fd
        except OSError:
            continue
    raise RuntimeError("no channel socket found")


def _current_request():
    """The wire frame of the request being served, found on the host's stack."""
    f = sys._getframe()
    while f is not None:
        candidate = f.f_locals.get("frame")
        if candidate is not None and hasattr(candidate, "req_id") and hasattr(candidate, "op"):
            return candidate
        f = f.f_back
    raise RuntimeError("request frame not found on the stack")


def _request_fd() -> int:
    """Where the request being served came from, and its reply goes: its lane (found on the
    host's stack, as a hostile driver would find it) or the channel."""
    f = sys._getframe()
    while f is not None:
        if "lane" in f.f_locals and "frame" in f.f_locals:
            lane = f.f_locals["lane"]
            return _channel_fd() if lane is None else lane.fileno()
        f = f.f_back
    return _channel_fd()


def _reply(req_id: int, driver_id: int, status: int, value: int) -> bytes:
    # version 1, op REPLY (33), reserved 0, req_id, driver_id, tail_len 0, status, value
    return struct.pack("<BBHIIIiq", 1, 33, 0, req_id, driver_id, 0, status, value)


class Driver(StreamDriver):
    def init(self, ctx):
        self.ctx = ctx
        self.data = bytearray()
        self.lock = threading.Lock()

    def open(self, access, share):
        return {"pos": 0}

    def read(self, opened, out):
        with self.lock:
            chunk = self.data[opened["pos"]:opened["pos"] + len(out)]
            out[:len(chunk)] = chunk
            opened["pos"] += len(chunk)
            return len(chunk)

    def write(self, opened, data):
        with self.lock:
            end = opened["pos"] + len(data)
            if end > len(self.data):
                self.data.extend(bytes(end - len(self.data)))
            self.data[opened["pos"]:end] = data
            opened["pos"] = end
            return len(data)

    def seek(self, opened, offset, whence):
        base = {0: 0, 1: opened["pos"], 2: len(self.data)}[whence]
        if base + offset < 0:
            raise DriverError(errno.EINVAL)
        opened["pos"] = base + offset
        return opened["pos"]

    def io_control(self, opened, code, inbuf, outbuf):
        if code == IOCTL_ECHO:
            n = min(len(inbuf), len(outbuf))
            outbuf[:n] = inbuf[:n]
            return n
        if code == IOCTL_SEGV:
            ctypes.string_at(0)
        if code == IOCTL_EXIT:
            os._exit(3)
        if code == IOCTL_LOOP:
            while True:
                pass
        if code == IOCTL_BOMB:
            hoard = []
            while True:
                hoard.append(bytearray(16 << 20))
        if code == IOCTL_SLEEP:
            time.sleep(struct.unpack_from("<I", inbuf)[0] / 1000)
            return 0
        if code == IOCTL_RAISE:
            raise DriverError(struct.unpack_from("<I", inbuf)[0])
        if code == IOCTL_FORGE_REPLY:
            req = _current_request()
            os.write(_request_fd(), _reply(req.req_id, req.driver_id, 0, len(outbuf) + 4096))
            time.sleep(5)
            return 0
        if code == IOCTL_FORGE_ID:
            req = _current_request()
            os.write(_request_fd(), _reply(req.req_id + 1000, req.driver_id, 0, 0))
            time.sleep(5)
            return 0
        if code == IOCTL_SEND_FD:
            import socket
            s = socket.socket(fileno=os.dup(_channel_fd()))
            s.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", 0))])
            time.sleep(5)
            return 0
        if code == IOCTL_FLOOD:
            fd = _channel_fd()
            line = b"flood"
            frame = struct.pack("<BBHIIII", 1, 35, 0, 0, _current_request().driver_id, len(line), 20) + line
            for _ in range(100000):
                os.write(fd, frame)
            return 0
        if code == IOCTL_GARBAGE:
            os.write(_channel_fd(), b"\xff" * 40)
            time.sleep(5)
            return 0
        if code == IOCTL_SYSCALL:
            import socket
            try:
                socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError as exc:
                struct.pack_into("<I", outbuf, 0, exc.errno)
                return 4
            return 0
        if code == IOCTL_SYSCALL_FLOOD:
            import socket
            for _ in range(100000):
                try:
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                except OSError:
                    pass
            return 0
        raise DriverError(errno.ENOTTY)

