"""One running host: its sandbox, its channel, its arena and the requests in flight on it.

Everything the host sends is hostile.  The reader thread is the only code that parses it; it
checks every reply against the request it answers (the request id must be in flight, the driver
id must be the one the request went to, every count must lie inside the slot the Reflector chose)
and kills the host at the first violation.  A dead host is noticed at once: its end of the
socketpair closes, and the reader sees end-of-file (no polling).

Lanes: a driver request (open, close, read, write, seek, IOCTL, ...) normally goes over a *lane*,
a socketpair of its own handed to the host once (``Op.LANE``), one request at a time.  The thread
that sends the request reads the reply from the lane itself, so the common request costs no
hand-over to the reader thread (on two cores, ~10 us of a ~150 us round trip).  That thread then
parses hostile input too, with the same checks (``_check_reply``); anything wrong kills the host
as on the channel, and a lane that saw anything but its one good reply is closed, never reused.
Up to ``MAX_LANES`` requests run on lanes at once; more, and the rest take the channel.
"""

from __future__ import annotations

import array
import errno
import itertools
import logging
import os
import socket
import struct
import threading
import time
from typing import Callable

from hosts import wire
from hosts.wire import KernelOp, Op, ProtocolError

log = logging.getLogger("drvbox.host")

# A host may send at most this many frames per second on average (burst: one second's worth).
# Legitimate traffic is one reply per request plus the driver's kernel calls and logs.
FRAME_RATE_LIMIT = 20000
LOG_RATE_LIMIT = 200          # LOG frames per second; more is a flood
MAX_FDS_PER_FRAME = 4         # we read this many so that we can close what a host smuggles in
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * array.array("i").itemsize)
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)     # a plain int: enum flag arithmetic is slow
_MAX_FRAME_PLUS = wire.MAX_FRAME + 1    # one byte more than a frame may have: MSG_TRUNC tells
READY_TIMEOUT_S = 10.0
EXIT_GRACE_S = 2.0            # how long a host that closed its channel has to finish exiting
MAX_LANES = 8                 # per host: each costs an fd here and one in the host (64 at most there)
# A send that waits this long for room is to a host that has stopped reading its channel (its
# replies to kernel calls pile up there): the host is killed for it.  Without a bound, the send
# -- the reader's, answering a kernel call, or anyone's under the send lock -- waited for ever, and
# with it every later send to that host, the Device Manager's stop included.
SEND_TIMEOUT_S = 5.0
LANE_RETRY_S = 1.0            # after a host refused a lane (no fd left), ask again no sooner than this
_monotonic = time.monotonic
_REPLY, _KCALL, _LOG = Op.REPLY, Op.KCALL, Op.LOG


class HostGone(Exception):
    """The host died or was killed while a request was in flight."""


class _Done:
    """A one-shot signal from the reader to the one thread waiting for a reply.

    A bare lock, taken at birth and released once: the cheapest hand-over between two Python
    threads (an Event costs a Condition and a second lock on every request).
    """

    __slots__ = ("_lock", "_set")

    def __init__(self):
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        if not self._set:
            self._set = True
            self._lock.release()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None) -> bool:
        return self._lock.acquire(True, -1 if timeout is None else timeout)


class _Pending:
    """One request in flight: what its reply may say, and where the reader puts it."""

    __slots__ = ("op", "driver_id", "max_value", "done", "status", "value")

    def __init__(self, op: Op, driver_id: int, max_value: int):
        self.op = op
        self.driver_id = driver_id
        self.max_value = max_value      # the largest count this request may report
        self.done = _Done()
        self.status = errno.EIO
        self.value = 0


class _Lane:
    """One lane: our end of its socketpair, and the receive timeout set on it (SO_RCVTIMEO, so
    a blocking recv times out in the kernel, without a poll before it)."""

    __slots__ = ("sock", "timeout", "driver_id")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.timeout: float | None = None
        self.driver_id = 0              # whose request it carries now (blame, if the host dies)

    def set_timeout(self, timeout: float | None) -> None:
        if timeout != self.timeout:
            seconds = 0.0 if timeout is None else max(timeout, 0.001)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                 struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))
            self.timeout = timeout


class _TokenBucket:
    __slots__ = ("rate", "tokens", "stamp")

    def __init__(self, rate: float):
        self.rate = rate
        self.tokens = rate
        self.stamp = _monotonic()

    def take(self) -> bool:
        now = _monotonic()
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.rate:
            tokens = self.rate
        self.stamp = now
        if tokens < 1:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1
        return True


class HostChannel:
    """Speaks the wire protocol to one host process; created by a HostGroup for each start.

    ``on_kernel_call(channel, frame, fds_out) -> (status, value, tail, fds)`` performs a
    driver's privileged operation; ``on_violation(kind, detail)`` audits; ``on_exit(channel)``
    is called once, from the reader thread, after the host has gone.
    """

    def __init__(self, name: str, sandboxed, sock: socket.socket, arena, *,
                 on_kernel_call: Callable, on_violation: Callable[[str, dict], None],
                 on_log: Callable[[int, int, str], None], on_exit: Callable[["HostChannel"], None],
                 known_drivers: Callable[[], set], on_dead: Callable[["HostChannel"], None] = lambda c: None):
        self.name = name
        self.sandboxed = sandboxed
        self.sock = sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(SEND_TIMEOUT_S), int(SEND_TIMEOUT_S % 1 * 1e6)))
        self.arena = arena
        self.inner_pid: int | None = None
        self.started = time.monotonic()
        self._on_kernel_call = on_kernel_call
        self._on_violation = on_violation
        self._on_log = on_log
        self._on_exit = on_exit
        self._on_dead = on_dead
        self._known_drivers = known_drivers
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._alive = True
        self._killed_for: str | None = None
        self._killed = False
        self.blamed_drivers: set[int] = set()
        self._blamed_before_death: set[int] = set()   # drivers whose request we gave up on
        self.adopted = False          # set by the group once the host serves; before that, a death is a failed start
        self._frames = _TokenBucket(FRAME_RATE_LIMIT)
        self._logs = _TokenBucket(LOG_RATE_LIMIT)
        self._idle_lanes: list[_Lane] = []     # a stack: the most recently used lane first
        self._lanes_made = 0
        self._no_lanes_until = 0.0             # the host had no fd for one: ask again after this
        self._busy_lanes: set[_Lane] = set()   # lanes carrying a request now
        self._dead = threading.Event()         # set once the group has heard of the death
        self._reader = threading.Thread(target=self._read_loop, name=f"host-{name}", daemon=True)

    # -- start-up -------------------------------------------------------------------------

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Read the host's READY frame, then start the reader thread."""
        self.sock.settimeout(timeout)
        try:
            data, fds = self._recv()
        except (socket.timeout, OSError) as exc:
            raise HostGone(f"{self.name}: no READY within {timeout:.0f}s ({exc})") from None
        finally:
            self.sock.settimeout(None)
        if data is None:
            raise HostGone(f"{self.name}: the host exited before it was ready")
        frame = wire.decode(data)
        if frame.op != Op.READY or fds:
            raise ProtocolError(f"expected READY, got {frame.op.name}")
        self.inner_pid = frame.fields[0]
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self._alive

    def join(self, timeout: float | None = None) -> None:
        """Wait until the reader has seen the host go and finished with it."""
        if self._reader.ident is not None:
            self._reader.join(timeout)

    def abandon(self) -> None:
        """Kill a host whose reader never started (start-up failed) and release what we hold."""
        if self._reader.ident is not None:
            self.kill()                    # the reader cleans up; on_exit sees adopted=False
            return
        self._alive = False
        self.sandboxed.kill()
        self.sandboxed.wait(timeout=5)
        self.sandboxed.close()
        self.sock.close()
        self.arena.close()

    # -- requests -------------------------------------------------------------------------

    def call(self, op: Op, driver_id: int, fields: tuple, *, max_value: int, timeout: float | None,
             tail: bytes = b"") -> tuple[int, int]:
        """Send one request and wait for its reply: ``(status, value)``.

        Raises ``TimeoutError`` when the host does not answer in ``timeout`` seconds (the caller
        audits and kills), ``HostGone`` when the host dies first.
        """
        if op in wire.LANE_OPS:
            lane = self._take_lane(timeout)
            if lane is not None:
                return self._lane_call(lane, op, driver_id, fields, max_value, timeout)
        return self._channel_call(op, driver_id, fields, max_value, timeout, tail)

    def _channel_call(self, op: Op, driver_id: int, fields: tuple, max_value: int, timeout: float | None,
                      tail: bytes = b"", fds: list[int] | None = None) -> tuple[int, int]:
        req_id = next(self._ids) & 0xFFFFFFFF
        pending = _Pending(op, driver_id, max_value)
        lock = self._lock
        with lock:
            if not self._alive:
                raise HostGone(self.name)
            self._pending[req_id] = pending
        try:
            try:
                frame = wire.encode(op, req_id, driver_id, *fields, tail=tail) if tail else \
                    wire.encode(op, req_id, driver_id, *fields)
                self._send(frame, fds)
            except OSError:
                # The host was killed (its socket shut down) and the reader has not yet noticed:
                # the same as dying with the request in flight.
                raise HostGone(self.name) from None
            if not pending.done.wait(timeout):
                raise TimeoutError(f"{self.name}: {op.name} to driver {driver_id} took longer than {timeout}s")
        finally:
            with lock:
                self._pending.pop(req_id, None)
        if pending.status == -1:
            raise HostGone(self.name)
        return pending.status, pending.value

    # -- lanes ----------------------------------------------------------------------------

    def lanes(self) -> dict:
        """How many lanes this host has, busy now, and whether it refused one lately."""
        with self._lock:
            return {"made": self._lanes_made, "busy": len(self._busy_lanes), "refused": self._refusing_lanes()}

    def _refusing_lanes(self) -> bool:
        """With the lock held: the host refused a lane less than LANE_RETRY_S ago."""
        return _monotonic() < self._no_lanes_until

    def _take_lane(self, timeout: float | None) -> _Lane | None:
        """An idle lane, a new one, or None (all busy and no more allowed: use the channel)."""
        with self._lock:
            if not self._alive:
                return None                  # the channel path reports the death
            if self._idle_lanes:
                lane = self._idle_lanes.pop()
                self._busy_lanes.add(lane)
                return lane
            if self._lanes_made >= MAX_LANES or self._refusing_lanes():
                return None
            self._lanes_made += 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            status, _ = self._channel_call(Op.LANE, 0, (), 0, timeout, fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            with self._lock:
                self._lanes_made -= 1
            raise
        finally:
            theirs.close()
        if status:
            # EMFILE: the host's fd table is full (its drivers hold the rest).  Correct, only slower.
            log.info("%s: the host refused a lane (%s); its requests take the channel", self.name,
                     errno.errorcode.get(status, status))
            ours.close()
            with self._lock:
                self._lanes_made -= 1
                self._no_lanes_until = _monotonic() + LANE_RETRY_S
            return None
        lane = _Lane(ours)
        with self._lock:
            self._busy_lanes.add(lane)
        return lane

    def _lane_call(self, lane: _Lane, op: Op, driver_id: int, fields: tuple, max_value: int,
                   timeout: float | None) -> tuple[int, int]:
        req_id = next(self._ids) & 0xFFFFFFFF
        lane.driver_id = driver_id                  # so that a crash now blames this driver too
        good = False
        try:
            sock = lane.sock
            try:
                lane.set_timeout(timeout)
                sock.send(wire.encode(op, req_id, driver_id, *fields))
                data = sock.recv(_MAX_FRAME_PLUS)
            except BlockingIOError:                 # SO_RCVTIMEO ran out
                raise TimeoutError(f"{self.name}: {op.name} to driver {driver_id} took longer than {timeout}s") from None
            except OSError:
                data = b""
            if not data:
                self._lane_lost()
            try:
                if len(data) > wire.MAX_FRAME:
                    raise ProtocolError(f"frame longer than {wire.MAX_FRAME} bytes on a lane")
                frame = wire.decode(data)
                if frame[0] is not _REPLY:
                    raise ProtocolError(f"a host may not send {frame.op.name} on a lane")
                if frame.req_id != req_id:
                    raise ProtocolError(f"reply on a lane to request {frame.req_id}, expected {req_id}")
                status, value = _check_reply(frame, op, driver_id, max_value)
            except ProtocolError as exc:
                self._violation("protocol.violation", {"reason": exc.reason})
                raise HostGone(self.name) from None
            except _BufferViolation as exc:
                self._violation("buffer.violation", exc.detail)
                raise HostGone(self.name) from None
            good = True
            return status, value
        finally:
            with self._lock:
                self._busy_lanes.discard(lane)
                if good and self._alive:
                    self._idle_lanes.append(lane)
                    lane = None
            if lane is not None:
                lane.sock.close()

    def _lane_lost(self) -> None:
        """A lane ended mid-request.  When the host died, its channel ends too: wait until the
        reader has told the group (so that nobody who hears of the failure finds the group still
        running), then report the death.  A host that closed only the lane broke the protocol."""
        if not self._dead.wait(EXIT_GRACE_S):
            self._violation("protocol.violation", {"reason": "the host closed a lane"})
            self._dead.wait(EXIT_GRACE_S)
        raise HostGone(self.name)

    def send_oneway(self, op: Op, driver_id: int = 0, *fields: int) -> None:
        try:
            self._send(wire.encode(op, 0, driver_id, *fields))
        except OSError:
            pass

    def _send(self, frame: bytes, fds: list[int] | None = None) -> None:
        """Send one frame; OSError if it cannot be, after killing a host that left no room for
        SEND_TIMEOUT_S (SO_SNDTIMEO: the send fails with EAGAIN)."""
        with self._send_lock:
            try:
                if fds:
                    self.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    self.sock.send(frame)
            except BlockingIOError:
                self._violation("protocol.violation",
                                {"reason": f"the host has not read its channel for {SEND_TIMEOUT_S:g} s"})
                raise

    # -- the reader: everything from the host is parsed here --------------------------------

    def _recv(self) -> tuple[bytes | None, list[int]]:
        data, ancdata, msg_flags, _ = self.sock.recvmsg(_MAX_FRAME_PLUS, _CMSG_SPACE)
        return self._recv_rest(data, ancdata, msg_flags)

    def _read_loop(self) -> None:
        recvmsg, frames, decode, dispatch = self.sock.recvmsg, self._frames, wire.decode, self._dispatch
        try:
            while True:
                try:
                    # Inline for the common frame (data, no ancillary data); _recv for the rest.
                    data, ancdata, msg_flags, _ = recvmsg(_MAX_FRAME_PLUS, _CMSG_SPACE)
                    if ancdata or msg_flags & _TRUNCATED or not data:
                        data, fds = self._recv_rest(data, ancdata, msg_flags)
                    else:
                        fds = None
                except ProtocolError as exc:
                    self._violation("protocol.violation", {"reason": exc.reason})
                    return
                except OSError:
                    return
                if data is None:
                    return
                if fds:
                    for fd in fds:
                        os.close(fd)
                    self._violation("protocol.violation", {"reason": f"host sent {len(fds)} file descriptor(s)"})
                    return
                if not frames.take():
                    self._violation("protocol.violation", {"reason": "frame flood"})
                    return
                try:
                    frame = decode(data)
                    if frame[0] is _REPLY:
                        self._complete(frame)
                    else:
                        dispatch(frame)
                except ProtocolError as exc:
                    self._violation("protocol.violation", {"reason": exc.reason})
                    return
                except _BufferViolation as exc:
                    self._violation("buffer.violation", exc.detail)
                    return
                except OSError:         # a KREPLY _send could not deliver: it killed the host
                    return
        finally:
            self._gone()

    def _recv_rest(self, data: bytes, ancdata, msg_flags: int) -> tuple[bytes | None, list[int]]:
        """One received message: its data and the fds that came with it (closed, and
        ProtocolError, if either was truncated); ``(None, [])`` at end-of-file."""
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % array.array("i").itemsize
                fds.extend(array.array("i", payload[:usable]))
        if msg_flags & _TRUNCATED:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("frame or its ancillary data larger than the protocol allows")
        if not data and not fds:
            return None, []
        return data, fds

    def _dispatch(self, frame: wire.Frame) -> None:
        if frame.op == Op.REPLY:
            self._complete(frame)
        elif frame.op == Op.KCALL:
            if frame.driver_id not in self._known_drivers():
                raise ProtocolError(f"kernel call for driver id {frame.driver_id}, which this host does not hold")
            # ctx.kernel.log lands in the same log as LOG frames: the same limit, whichever way it comes.
            if frame.fields[0] == KernelOp.LOG and not self._logs.take():
                raise ProtocolError("log flood (ctx.kernel.log)")
            status, value, tail, fds = self._on_kernel_call(self, frame)
            try:
                self._send(wire.encode(Op.KREPLY, frame.req_id, frame.driver_id, status, value, tail=tail), fds)
            finally:
                for fd in fds or ():
                    os.close(fd)
        elif frame.op == Op.LOG:
            if not self._logs.take():
                raise ProtocolError("log flood")
            if frame.driver_id not in self._known_drivers() and frame.driver_id != 0:
                raise ProtocolError(f"log for driver id {frame.driver_id}, which this host does not hold")
            self._on_log(frame.driver_id, frame.fields[0], frame.tail.decode("utf-8", "replace"))
        else:
            raise ProtocolError(f"a host may not send {frame.op.name}")

    def _complete(self, frame: wire.Frame) -> None:
        with self._lock:
            pending = self._pending.get(frame.req_id)
        if pending is None:
            raise ProtocolError(f"reply to request {frame.req_id}, which is not in flight")
        try:
            pending.status, pending.value = _check_reply(frame, pending.op, pending.driver_id, pending.max_value)
        except _BufferViolation:
            pending.status, pending.value = errno.EIO, 0
            raise
        finally:
            pending.done.set()

    # -- the end ----------------------------------------------------------------------------

    def _violation(self, kind: str, detail: dict) -> None:
        self._killed_for = kind
        try:
            self._on_violation(kind, detail)
        finally:
            self.kill()

    def blame(self, driver_id: int) -> None:
        """Name a driver whose request timed out, before killing the host for it: that request
        is no longer pending when the host dies, and the death is still its doing."""
        self._blamed_before_death.add(driver_id)

    def kill(self) -> None:
        """Kill the host; the reader thread notices and cleans up."""
        self._killed = True
        try:
            self.sandboxed.kill()
        finally:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _gone(self) -> None:
        with self._lock:
            self._alive = False
            pending = list(self._pending.values())
            on_lanes = {lane.driver_id for lane in self._busy_lanes}
            idle_lanes, self._idle_lanes = self._idle_lanes, []
        for lane in idle_lanes:
            lane.sock.close()
        # Drivers with requests in flight when the host went down: a pooled driver that is
        # always among them is the one crashing its host (see HostGroup).
        self.blamed_drivers = {p.driver_id for p in pending} | on_lanes | self._blamed_before_death
        # The group learns first, so that nobody who hears of the failure finds it "running".
        try:
            self._on_dead(self)
        finally:
            self._dead.set()
        for p in pending:
            if not p.done.is_set():
                p.status = -1
                p.done.set()
        if not self._killed:
            # It went by itself: let it finish dying, so that the status we report (a signal, an
            # exit code) is its own and not our SIGKILL.  A host that only closed its channel is
            # killed after this grace.
            try:
                self.sandboxed.wait(timeout=EXIT_GRACE_S)
            except TimeoutError:
                pass
        self.sandboxed.kill()
        try:
            self._on_exit(self)
        finally:
            self.sock.close()

    @property
    def killed_for(self) -> str | None:
        return self._killed_for



def _check_reply(frame: wire.Frame, op: Op, driver_id: int, max_value: int) -> tuple[int, int]:
    """``(status, value)`` of a REPLY to a request ``op`` sent to ``driver_id``, or the rule it
    breaks (ProtocolError; _BufferViolation for a count beyond what the request allowed)."""
    status, value = frame.fields
    if frame.driver_id != driver_id:
        raise ProtocolError(f"reply to request {frame.req_id} names driver {frame.driver_id}, "
                            f"the request went to driver {driver_id}")
    if frame.tail:
        raise ProtocolError("a REPLY carries no tail")
    if not 0 <= status < 4096:
        raise ProtocolError(f"reply status {status} is not an errno")
    if status:
        return status, 0
    if not 0 <= value <= max_value:
        raise _BufferViolation({"op": op.name, "driver_id": frame.driver_id, "claimed": value, "limit": max_value})
    return 0, value


class _BufferViolation(Exception):
    def __init__(self, detail: dict):
        super().__init__(detail)
        self.detail = detail
