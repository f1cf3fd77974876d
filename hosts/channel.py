"""The host's end of the channel: sending frames, and matching KREPLYs to waiting KCALLs.

Several worker threads send at once; each ``send`` is one ``SOCK_SEQPACKET`` message, which the
kernel delivers whole and unmixed, so no lock is needed around sending.  Only the thread that
leads (see hosts.pool) receives; it hands each KREPLY (and the fds that came with it) to the
KCALL waiting for it.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from typing import NamedTuple

from hosts.wire import MAX_TAIL, KernelOp, Op, encode


class KernelAnswer(NamedTuple):
    status: int
    value: int
    tail: bytes
    fds: list[int]


class _Pending:
    """One KCALL waiting.  ``done`` is a bare lock, taken at birth and released once by the
    receiver: the cheapest hand-over between two Python threads (an Event costs a Condition and
    a second lock), and there is exactly one waiter."""

    __slots__ = ("done", "answer")

    def __init__(self):
        self.done = threading.Lock()
        self.done.acquire()
        self.answer: KernelAnswer | None = None


def clip_message(message: str) -> bytes:
    """UTF-8 of ``message``, cut to what one frame's tail can carry, never mid-character."""
    data = message.encode("utf-8", "replace")
    if len(data) <= MAX_TAIL:
        return data
    return data[:MAX_TAIL].decode("utf-8", "ignore").encode("utf-8")


class Channel:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)

    def send(self, op: Op, req_id: int, driver_id: int, *fields: int, tail: bytes = b"") -> None:
        self.sock.send(encode(op, req_id, driver_id, *fields, tail=tail))

    def log(self, level: int, message: str, driver_id: int = 0) -> None:
        """Best effort: a log line that cannot be sent (the Reflector is gone) is dropped, since
        the reader is about to see EOF and end the host anyway."""
        try:
            self.send(Op.LOG, 0, driver_id, level, tail=clip_message(message))
        except OSError:
            pass

    def kcall(self, driver_id: int, kop: KernelOp, a0: int = 0, a1: int = 0, a2: int = 0,
              tail: bytes = b"") -> KernelAnswer:
        """Send one KCALL and block until the reader delivers its KREPLY.

        No timeout: the Reflector is trusted to answer, and if it goes away the reader sees EOF
        and the whole host ends.  The caller owns the fds of the answer.
        """
        pending = _Pending()
        with self._lock:
            call_id = next(self._ids) & 0xFFFFFFFF
            self._pending[call_id] = pending
        try:
            self.send(Op.KCALL, call_id, driver_id, int(kop), a0, a1, a2, tail=tail)
        except BaseException:
            with self._lock:
                self._pending.pop(call_id, None)
            raise
        pending.done.acquire()
        return pending.answer

    def deliver(self, req_id: int, status: int, value: int, tail: bytes, fds: list[int]) -> bool:
        """Called by the reader for each KREPLY; False if no KCALL waits for ``req_id`` (the fds
        are then closed here)."""
        with self._lock:
            pending = self._pending.pop(req_id, None)
        if pending is None:
            for fd in fds:
                os.close(fd)
            return False
        pending.answer = KernelAnswer(status, value, tail, fds)
        pending.done.release()
        return True
