"""The host program: one process, the drivers of one process group, one channel to the Reflector.

``sandbox.spawn(..., target="hosts.main:run")`` imports this module *before* seccomp is loaded and
calls ``run(fds, arg)`` *after*.  So every module the host will ever need is imported here, at the
top, even where this file does not use it itself: after confinement, importing one may need a
system call the allowlist does not have.  Unconfined (unit tests, debugging)::

    python -m hosts.main --channel-fd N --arena-fd M --arena-size S

Every idle thread receives (``hosts.pool``: one crew waiting together on epoll, each frame
waking one thread).  The thread decodes the frame, checks its arena offsets, and runs the call
itself within the driver's quota of threads, then sends the REPLY; KREPLYs are routed to the
thread waiting in its KCALL (the crew always keeps a thread free to receive).  The Reflector is
trusted, so a frame it should never send ends the host with a ``HostExit`` status instead of
being guessed at.

Lanes: besides the channel, the Reflector may hand the host sockets (``Op.LANE``) on which it
sends driver requests, one at a time per lane, and reads each REPLY itself: the thread that sent
a request then receives its answer without a hand-over to the Reflector's reader thread.  The
crew waits on the channel and every lane at once; a request from a lane is answered on that
lane.  Everything else -- LOAD, UNLOAD, SHUTDOWN, KCALL/KREPLY, LOG -- stays on the channel.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading

# Loaded now for later: driver import machinery and what ctx.kernel needs (see module docstring).
import importlib.machinery  # noqa: F401
import importlib.util  # noqa: F401
import select  # noqa: F401

from hosts import arena_map, ioctl, kernel_proxy, native, pool, registry_view  # noqa: F401 (ioctl: for drivers)
from hosts.api import ERROR
from hosts.channel import Channel
from hosts.dispatch import LoadedDriver, LoadError, describe
from hosts.exits import HostExit
from hosts.wire import LANE_OPS, MAX_FRAME, Frame, Op, ProtocolError, decode, encode

# KREPLY carries at most one fd today; room for a few more so that a miscounting sender is seen
# (MSG_CTRUNC) rather than silently cut.
MAX_FDS = 4
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS * 4)
# Plain ints: enum flag arithmetic costs microseconds per frame.
_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_CTRUNC = int(socket.MSG_CTRUNC)
_TRUNC = int(socket.MSG_TRUNC)
_HOST_SENT_OPS = frozenset({Op.READY, Op.REPLY, Op.KCALL, Op.LOG})
# Looking a member up on its Enum class costs more than comparing it: once, here.
_LOAD, _UNLOAD, _SHUTDOWN, _KREPLY, _REPLY, _LANE = Op.LOAD, Op.UNLOAD, Op.SHUTDOWN, Op.KREPLY, Op.REPLY, Op.LANE
# The Reflector opens a few lanes per host (see reflector.hostchannel.MAX_LANES); this bounds
# what the fd table can lose to them whatever it sends.
MAX_LANES = 16
_DONTWAIT = int(socket.MSG_DONTWAIT)
_ONESHOT_IN = select.EPOLLIN | select.EPOLLONESHOT
# Zeros to clear an output buffer with (grown to the largest asked for; bytes(n) is calloc'd, so
# its pages are the kernel's zero page until written, which it never is).
_zeros = memoryview(bytes(65536))


def _clear(view: memoryview) -> None:
    """Zero a driver's output buffer before its call.  The arena slot still holds what the
    request before left there -- perhaps another caller's data -- and a driver that reports more
    output than it wrote (*actual, Read's count) would hand that to this caller.  In kernel mode
    the output is a fresh (zeroed) buffer or the caller's own; a host must not do worse."""
    global _zeros
    n = len(view)
    if n > len(_zeros):
        _zeros = memoryview(bytes(n))
    view[:] = _zeros[:n]


# Stack of each thread started in the host (workers, and threads drivers start): glibc's default
# is 8 MiB of address space per thread, which under the host's RLIMIT_AS would let a few pools
# use up the limit; 1 MiB is ample for Python, whose calls between Python functions do not
# recurse on the C stack.
THREAD_STACK = 1 << 20


def _fds_of(ancillary: list) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(int.from_bytes(data[i:i + 4], sys.byteorder, signed=True) for i in range(0, usable, 4))
    return fds


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _Slot:
    """One driver of this host: its quota of the crew, and the LoadedDriver once LOAD has run."""

    __slots__ = ("driver_id", "name", "pool", "loaded", "ready")

    def __init__(self, driver_id: int, name: str, workers: pool.Quota):
        self.driver_id = driver_id
        self.name = name
        self.pool = workers
        self.loaded: LoadedDriver | None = None
        # Set when LOAD has finished either way: a request or unload that another worker of the
        # pool picks up meanwhile waits for it instead of finding no driver.
        self.ready = threading.Event()


class Host:
    def __init__(self, sock: socket.socket, arena: memoryview):
        self.sock = sock
        self.channel = Channel(sock)
        self.channel_fd = sock.fileno()
        self.lanes: dict[int, socket.socket] = {}     # fd -> lane (under _lock)
        self.poller = select.epoll()                   # the channel, every lane, the crew's control
        self.poller.register(self.channel_fd, _ONESHOT_IN)
        self.arena = arena
        self.arena_size = len(arena)
        self.slots: dict[int, _Slot] = {}
        self.shutting_down = False
        self._unloads_left = 0
        self._lock = threading.Lock()
        self.crew = pool.Crew(self._receive, self.poller)

    # -- receiving: every idle thread of the crew (see hosts.pool) --------------------------------

    def serve(self) -> int:
        self.channel.send(Op.READY, 0, 0, os.getpid())
        status = self.crew.serve()
        return HostExit.OK if status is None else status

    def _receive(self):
        """Wait for one frame, on the channel or a lane, and handle it: ``(quota, job)`` for a
        driver call to run, None when nothing is left to run, ``pool.CONTROL`` when the crew's
        control fd woke us, or an exit status (the channel ended, or a frame broke the rules)."""
        try:
            fd = self.poller.poll(-1, 1)[0][0]
        except OSError as exc:
            self.channel.log(ERROR, f"host: epoll_wait failed: {exc}")
            return HostExit.CHANNEL_ERROR
        if fd == self.crew.control:
            return pool.CONTROL
        got = self._from_channel() if fd == self.channel_fd else self._from_lane(fd)
        if type(got) is tuple:
            return self._request(*got)
        return got

    def _from_lane(self, fd: int):
        """``(frame, lane)``, None (nothing to serve: the lane closed or had nothing), or an exit
        status for a frame that has no business on a lane."""
        lane = self.lanes.get(fd)       # one dict read, atomic: changes are made under _lock
        if lane is None:
            return None
        try:
            data = lane.recv(MAX_FRAME, _DONTWAIT)
        except BlockingIOError:
            data = None
        except OSError:
            data = b""
        if data == b"":        # the Reflector closed the lane (or it failed): forget it
            with self._lock:
                self.lanes.pop(fd, None)
                self.poller.unregister(fd)
            lane.close()
            return None
        self.poller.modify(fd, _ONESHOT_IN)      # the next frame on it may wake another thread
        if data is None:
            return None
        try:
            frame = decode(data)
        except ProtocolError as exc:
            return self._violation(HostExit.BAD_FRAME, f"on a lane: {exc.reason}")
        if frame.op not in LANE_OPS:
            return self._violation(HostExit.BAD_FRAME, f"{frame.op.name} came on a lane; it belongs on the channel")
        return frame, lane

    def _from_channel(self):
        """``(frame, None)``, None (a KREPLY or LANE was handled), or an exit status."""
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(MAX_FRAME, _ANCILLARY, _CLOEXEC | _DONTWAIT)
        except BlockingIOError:
            self.poller.modify(self.channel_fd, _ONESHOT_IN)
            return None
        except OSError as exc:
            self.channel.log(ERROR, f"host: recvmsg on the channel failed: {exc}")
            return HostExit.CHANNEL_ERROR
        fds = _fds_of(ancillary) if ancillary else []
        if not data and not fds:
            return HostExit.OK  # EOF: the Reflector closed its end (or SHUTDOWN finished)
        self.poller.modify(self.channel_fd, _ONESHOT_IN)
        if flags & _CTRUNC:
            _close(fds)
            if self._lane_refused(data):
                return None
            return self._violation(HostExit.UNEXPECTED_FDS, "more file descriptors than a frame may carry")
        if flags & _TRUNC:
            _close(fds)
            return self._violation(HostExit.BAD_FRAME, f"frame longer than {MAX_FRAME} bytes")
        try:
            frame = decode(data)
        except ProtocolError as exc:
            _close(fds)
            return self._violation(HostExit.BAD_FRAME, exc.reason)
        if frame.op == _LANE:
            return self._add_lane(frame, fds)
        if fds and frame.op != _KREPLY:
            _close(fds)
            return self._violation(HostExit.UNEXPECTED_FDS,
                                   f"{len(fds)} file descriptor(s) on a {frame.op.name} frame")
        if frame.op in _HOST_SENT_OPS:
            return self._violation(HostExit.BAD_FRAME, f"{frame.op.name} is sent by hosts, not to them")
        if frame.op == _KREPLY:
            status, value = frame.fields
            if not self.channel.deliver(frame.req_id, status, value, frame.tail, fds):
                return self._violation(HostExit.BAD_FRAME, f"KREPLY {frame.req_id} answers no KCALL")
            return None
        return frame, None

    def _add_lane(self, frame: Frame, fds: list[int]):
        if len(fds) != 1:
            _close(fds)
            return self._violation(HostExit.UNEXPECTED_FDS, f"LANE with {len(fds)} file descriptors, not one")
        if self.shutting_down or len(self.lanes) >= MAX_LANES:       # a racy count errs by one at most
            _close(fds)
            return self._reply(frame, errno.EMFILE)
        lane = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fds[0])
        with self._lock:
            self.lanes[lane.fileno()] = lane
            try:
                self.poller.register(lane.fileno(), _ONESHOT_IN)
            except OSError:
                del self.lanes[lane.fileno()]
                lane.close()
                return self._reply(frame, errno.EINVAL)     # not something epoll can wait on
        return self._reply(frame, 0)

    def _lane_refused(self, data: bytes) -> bool:
        """A LANE whose fd the kernel could not install (our fd table is full): refused with
        EMFILE, and the host goes on (True).  False for any other frame."""
        try:
            frame = decode(data)
        except ProtocolError:
            return False
        if frame.op != _LANE:
            return False
        self.channel.log(ERROR, "host: no file descriptor left for a lane; the Reflector keeps using the channel")
        self._reply(frame, errno.EMFILE)
        return True

    def _violation(self, status: HostExit, reason: str) -> int:
        self.channel.log(ERROR, f"host: protocol violation, exiting with {int(status)} ({status.name}): {reason}")
        return status

    def _reply(self, frame: Frame, status: int, value: int = 0, lane: socket.socket | None = None) -> None:
        try:
            if lane is None:
                self.channel.send(_REPLY, frame.req_id, frame.driver_id, status, value)
            else:
                lane.send(encode(_REPLY, frame.req_id, frame.driver_id, status, value))
        except OSError:
            pass  # the Reflector is gone (the reader sees EOF and ends the host), or closed the lane

    # -- requests -------------------------------------------------------------------------------

    def _request(self, frame: Frame, lane: socket.socket | None):
        """Handle what is quick here; for a driver's call return ``(quota, job)`` for the crew
        to run.  None: handled (replied).  The reply goes back where the request came from:
        ``lane``, or the channel when None."""
        op = frame.op
        if op == _LOAD:
            return self._load(frame)
        if op == _SHUTDOWN:
            return self._shutdown()
        slot = self.slots.get(frame.driver_id)
        if slot is None:
            return self._reply(frame, errno.ENODEV, 0, lane)
        if op == _UNLOAD:
            del self.slots[frame.driver_id]  # later requests for it fail at once with ENODEV
            return slot.pool, lambda: self._unload(slot, frame)
        prepared = self._call_for(frame)
        if prepared is None:
            return self._reply(frame, errno.EINVAL, 0, lane)
        call, views = prepared
        return slot.pool, lambda: self._run(slot, frame, call, views, lane)

    def _view(self, off: int, length: int, writable: bool) -> memoryview | None:
        """A view of exactly ``length`` arena bytes at ``off``, or None if it does not fit."""
        if off + length > self.arena_size:
            return None
        view = self.arena[off:off + length]
        return view if writable else view.toreadonly()

    def _call_for(self, frame: Frame):
        """``(call, views)`` for one request: the LoadedDriver call, and the arena views it was
        given (released after it).  The views are made and checked here, on the reader, so that a
        request outside the arena is refused before it is queued.  None: refuse with EINVAL (an
        operation not in ``_CALLS`` included)."""
        prepare = self._CALLS.get(frame.op)
        return None if prepare is None else prepare(self, frame.fields)

    # One per driver operation: fields -> (call, views), or None to refuse with EINVAL.
    def _open_call(self, f):
        return (lambda d: d.open(f[0], f[1])), ()

    def _close_call(self, f):
        return (lambda d: d.close(f[0])), ()

    def _pre_close_call(self, f):
        return (lambda d: d.pre_close(f[0])), ()

    def _power_call(self, f):
        return (lambda d: d.power(bool(f[0]))), ()

    def _seek_call(self, f):
        return (lambda d: d.seek(f[0], f[1], f[2])), ()

    def _read_call(self, f):
        out = self._view(f[1], f[2], writable=True)
        return None if out is None else ((lambda d: d.read(f[0], out)), (out,))

    def _write_call(self, f):
        data = self._view(f[1], f[2], writable=False)
        return None if data is None else ((lambda d: d.write(f[0], data)), (data,))

    def _ioctl_call(self, f):
        in_off, in_len, out_off, out_len = f[2:]
        # Overlapping buffers would let the driver change its input while reading it, after
        # the Reflector checked it; the Reflector never allocates them so.
        if in_len and out_len and in_off < out_off + out_len and out_off < in_off + in_len:
            return None
        inbuf = self._view(in_off, in_len, writable=False)
        outbuf = self._view(out_off, out_len, writable=True)
        if inbuf is None or outbuf is None:
            return None
        return (lambda d: d.ioctl(f[0], f[1], inbuf, outbuf)), (inbuf, outbuf)

    _CALLS = {
        Op.OPEN: _open_call,
        Op.CLOSE: _close_call,
        Op.PRE_CLOSE: _pre_close_call,
        Op.POWER: _power_call,
        Op.SEEK: _seek_call,
        Op.READ: _read_call,
        Op.WRITE: _write_call,
        Op.IOCTL: _ioctl_call,
    }

    def _run(self, slot: _Slot, frame: Frame, call, views: tuple, lane: socket.socket | None) -> None:
        if not slot.ready.is_set():      # the flag is a plain attribute; wait() takes a Condition
            slot.ready.wait()
        loaded = slot.loaded
        if loaded is None:
            status, value = errno.ENODEV, 0
        else:
            for view in views:
                if not view.readonly:
                    _clear(view)
            status, value = call(loaded)
        for view in views:
            # A driver that kept the view finds it released; one that kept a slice of it keeps
            # that slice (BufferError never arises for slices, but is not worth ending over).
            try:
                view.release()
            except BufferError:
                pass
        self._reply(frame, status, value, lane)

    def _load(self, frame: Frame) -> None:
        if self.shutting_down:
            return self._reply(frame, errno.ESHUTDOWN)
        if frame.driver_id in self.slots:
            self.channel.log(ERROR, f"host: LOAD of driver {frame.driver_id}, which is loaded already")
            return self._reply(frame, errno.EEXIST)
        try:
            spec = json.loads(frame.tail.decode("utf-8"))
            if not isinstance(spec, dict):
                raise ValueError("LOAD tail is not a JSON object")
            name, module = spec["name"], spec["module"]
            if not isinstance(name, str) or not isinstance(module, str) or not os.path.isabs(module):
                raise ValueError(f"LOAD needs a string name and an absolute module path, got {name!r}, {module!r}")
            registry = registry_view.from_wire(spec.get("registry", {}))
            threads = spec.get("threads", pool.DEFAULT_THREADS)
            if type(threads) is not int:
                raise ValueError(f"LOAD threads {threads!r} is not an int")
            workers = self.crew.add(f"drv{frame.driver_id}", threads)
        except (ValueError, KeyError, UnicodeDecodeError) as exc:
            self.channel.log(ERROR, f"host: malformed LOAD for driver {frame.driver_id}: {exc!r}")
            return self._reply(frame, errno.EINVAL)
        except RuntimeError as exc:  # threads could not be started: the host's limits
            self.channel.log(ERROR, f"host: no worker threads for driver {frame.driver_id}: {exc}")
            return self._reply(frame, errno.EAGAIN)
        slot = _Slot(frame.driver_id, name, workers)
        self.slots[frame.driver_id] = slot
        # init(ctx) runs within the driver's quota, like its calls (its KCALLs' KREPLYs are
        # received by the other threads of the crew).
        return workers, lambda: self._finish_load(slot, frame, module, registry)

    def _finish_load(self, slot: _Slot, frame: Frame, module: str, registry) -> None:
        driver_id = slot.driver_id
        try:
            slot.loaded = LoadedDriver(slot.name, module, registry,
                                       kernel_proxy.KernelProxy(self.channel, driver_id),
                                       lambda level, message: self.channel.log(level, message, driver_id))
            failure = None
        except LoadError as exc:
            failure = (exc.errno, exc.message)
        except BaseException as exc:  # LoadedDriver should turn everything into LoadError
            failure = (errno.EIO, f"{slot.name}: loading failed: {describe(exc)}")
        finally:
            slot.ready.set()
        if failure is None:
            return self._reply(frame, 0)
        status, message = failure
        self.channel.log(ERROR, message, driver_id)
        with self._lock:
            if self.slots.get(driver_id) is slot:
                del self.slots[driver_id]
        self.crew.stop(slot.pool)
        self._reply(frame, status)

    def _unload(self, slot: _Slot, frame: Frame | None) -> None:
        status = 0
        slot.ready.wait()
        if slot.loaded is not None:
            status, _ = slot.loaded.unload()
        self.crew.stop(slot.pool)
        if frame is not None:
            self._reply(frame, status)

    def _shutdown(self) -> None:
        """Unload every driver on its own pool (after what is queued there), then end the reader
        by shutting down our receiving side, which it sees as EOF.  No REPLY: the exit status 0
        is the answer."""
        if self.shutting_down:
            return
        self.shutting_down = True
        slots = list(self.slots.values())
        self.slots.clear()
        if not slots:
            return self._end_reader()
        self._unloads_left = len(slots)
        for slot in slots:
            self.crew.submit(slot.pool, lambda slot=slot: self._shutdown_one(slot))

    def _shutdown_one(self, slot: _Slot) -> None:
        try:
            self._unload(slot, None)
        finally:
            with self._lock:
                self._unloads_left -= 1
                last = self._unloads_left == 0
            if last:
                self._end_reader()

    def _end_reader(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass


def run(fds: list[int], arg: dict) -> int:
    """Serve the Reflector on ``fds[0]`` (SOCK_SEQPACKET) with the arena ``fds[1]`` of
    ``arg["arena_size"]`` bytes; return a ``HostExit`` status."""
    sys.dont_write_bytecode = True  # the driver's directory is read-only, and caches are not trusted
    threading.stack_size(THREAD_STACK)
    try:
        channel_fd, arena_fd = fds
        arena_size = arg["arena_size"]
        if type(arena_size) is not int or arena_size < 0:
            raise ValueError(f"arena_size {arena_size!r}")
    except (ValueError, TypeError, KeyError) as exc:
        print(f"hosts.main: bad arguments: {exc!r}; expected fds [channel, arena] and "
              f"arg {{'arena_size': N}}", file=sys.stderr)
        return HostExit.BAD_ARGS
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, channel_fd)
    try:
        mapping = arena_map.map_arena(arena_fd, arena_size)
    except (OSError, ValueError) as exc:
        Channel(sock).log(ERROR, f"host: cannot map the arena (fd {arena_fd}, {arena_size} bytes): {exc}")
        return HostExit.ARENA
    finally:
        os.close(arena_fd)  # the mapping (which holds its own reference to the memfd) is all the host needs
    # Native drivers' input buffers are made read-only only inside this mapping (hosts.native).
    native.use_arena(mapping)
    try:
        return Host(sock, mapping.view).serve()
    except OSError as exc:
        print(f"hosts.main: channel failed: {exc}", file=sys.stderr)
        return HostExit.CHANNEL_ERROR


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hosts.main",
                                     description="Run a driver host unconfined (tests, debugging).")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--arena-fd", type=int, required=True)
    parser.add_argument("--arena-size", type=int, required=True)
    args = parser.parse_args(argv)
    return run([args.channel_fd, args.arena_fd], {"arena_size": args.arena_size})


if __name__ == "__main__":
    code = _main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Worker threads may still sit in driver code; the host ends now regardless of them.
    os._exit(code)
