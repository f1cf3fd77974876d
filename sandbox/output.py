"""What a host writes to its stdout and stderr, read by the Device Manager and logged -- safely.

A host's stdout and stderr are one pipe of ours, never the Device Manager's own fds: what runs in
the sandbox is hostile, and bytes written straight to our terminal or log could forge log lines
(a newline and "drvbox: ..."), drive the terminal (ESC sequences) or flood it.  Here every host
line becomes one log line of ``drvbox.host`` at WARNING:

  * prefixed with the sandbox's name, so no host line passes for one of ours;
  * control characters (C0, DEL, C1; ESC with them) and bytes that are not UTF-8 written as \\xNN,
    so one host line is one log line and nothing reaches a terminal as a command;
  * cut at MAX_LINE characters (a line without a newline is cut there too: we never buffer more);
  * at most LINES_PER_S lines and BYTES_PER_S bytes a second (token buckets); past that, lines
    are counted and dropped, and one "... N lines from NAME dropped" line says so, at most once
    a second and once more at the end.

The reader never stops reading, even while it drops: a host writing to a pipe nobody drains
would block for ever.  It ends when every writer has closed the pipe (the host and its launcher
have ended), and closes the read end then, so nothing leaks across restarts.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Callable

log = logging.getLogger("drvbox.host")

MAX_LINE = 2000           # characters of one logged line, before escaping
LINES_PER_S = 50          # sustained; a burst of as many is allowed
BYTES_PER_S = 16 * 1024   # sustained; a burst of as many is allowed
SUMMARY_EVERY_S = 1.0     # at most one "dropped" line this often while a flood lasts
_READ_SIZE = 64 * 1024

# C0 (all of it: a tab or CR is as much a terminal command as ESC), DEL and C1.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


def escape_controls(text: str) -> str:
    """``text`` with its control characters as \\xNN: one line, nothing a terminal obeys."""
    return text.translate(_CONTROLS)


def printable(raw: bytes) -> str:
    """``raw`` as one line of text: control characters and non-UTF-8 bytes as \\xNN."""
    return escape_controls(raw.decode("utf-8", "backslashreplace"))


class _Bucket:
    def __init__(self, rate: float, now: float):
        self.rate = rate
        self.tokens = rate
        self.stamp = now

    def refill(self, now: float) -> None:
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now


class HostOutput:
    """Bytes in (``feed``), log lines out: the line splitting, cutting, escaping and rate bound,
    without the thread, so that it can be tested by itself.  ``clock`` is time.monotonic."""

    def __init__(self, name: str, *, lines_per_s: float = LINES_PER_S, bytes_per_s: float = BYTES_PER_S,
                 max_line: int = MAX_LINE, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.max_line = max_line
        self._clock = clock
        now = clock()
        self._lines = _Bucket(lines_per_s, now)
        self._bytes = _Bucket(bytes_per_s, now)
        self._partial = bytearray()
        self._cut = False           # the current line was already cut: drop the rest up to \n
        self.dropped = 0            # lines dropped since the last summary
        self.dropped_total = 0
        self._summary_at = now

    def feed(self, data: bytes) -> list[str]:
        out: list[str] = []
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end]
            start = len(data) if end < 0 else end + 1
            if not self._cut:
                room = self.max_line - len(self._partial)
                self._partial += piece[:room]
                if len(piece) > room:
                    # Cut here and emit now: a line without end must not grow our memory.
                    self._emit(bytes(self._partial), True, out)
                    self._partial.clear()
                    self._cut = True
            if end >= 0:
                if not self._cut:
                    self._emit(bytes(self._partial), False, out)
                self._partial.clear()
                self._cut = False
        self._maybe_summary(out, final=False)
        return out

    def close(self) -> list[str]:
        """The pipe's end: the last line without a newline, and what was dropped."""
        out: list[str] = []
        if self._partial and not self._cut:
            self._emit(bytes(self._partial), False, out)
        self._partial.clear()
        self._maybe_summary(out, final=True)
        return out

    def tick(self) -> list[str]:
        """Called when the host has been quiet a while: the summary of a flood that has ended."""
        out: list[str] = []
        self._maybe_summary(out, final=False)
        return out

    def _emit(self, raw: bytes, cut: bool, out: list[str]) -> None:
        now = self._clock()
        self._lines.refill(now)
        self._bytes.refill(now)
        if self._lines.tokens < 1 or self._bytes.tokens < len(raw):
            self.dropped += 1
            self.dropped_total += 1
            return
        self._lines.tokens -= 1
        self._bytes.tokens -= len(raw)
        text = printable(raw)
        out.append(f"{self.name}: {text}" + (" [line cut]" if cut else ""))

    def _maybe_summary(self, out: list[str], final: bool) -> None:
        if not self.dropped:
            return
        now = self._clock()
        if final or now - self._summary_at >= SUMMARY_EVERY_S:
            out.append(f"... {self.dropped} lines from {self.name} dropped (more than {self._lines.rate:g} "
                       f"lines or {self._bytes.rate:g} bytes a second)")
            self.dropped = 0
            self._summary_at = now


def pipe() -> tuple[int, int]:
    """(read end, write end), both O_CLOEXEC: the write end reaches the launcher only as its
    stdout and stderr (Popen dup2s it there), and no other child of ours inherits either."""
    return os.pipe2(os.O_CLOEXEC)


def start_reader(name: str, read_fd: int) -> threading.Thread:
    """Log what comes on ``read_fd`` until EOF, then close it.  Owns ``read_fd`` from now on."""
    thread = threading.Thread(target=_read, args=(name, read_fd), name=f"drvbox-host-output {name}", daemon=True)
    try:
        thread.start()
    except BaseException:
        os.close(read_fd)
        raise
    return thread


def _read(name: str, read_fd: int) -> None:
    lines = HostOutput(name)
    try:
        poller = select.poll()
        poller.register(read_fd, select.POLLIN)
        while True:
            # While lines are pending summary, wake up even if the host falls silent, so the
            # "dropped" line comes when the flood ends, not at the next line or at the host's end.
            if lines.dropped and not poller.poll(int(SUMMARY_EVERY_S * 1000)):
                for line in lines.tick():
                    log.warning("%s", line)
                continue
            try:
                data = os.read(read_fd, _READ_SIZE)
            except InterruptedError:
                continue
            except OSError as exc:
                log.warning("%s: reading its output failed (%s); the rest is not logged", name, exc)
                break
            if not data:
                break
            for line in lines.feed(data):
                log.warning("%s", line)
        for line in lines.close():
            log.warning("%s", line)
    finally:
        os.close(read_fd)
