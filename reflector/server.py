"""The Device Manager's face to applications: a Unix socket, one thread per connection.

Callers are identified by ``SO_PEERCRED`` when they connect.  Handles belong to the connection
that opened them and are closed when it goes away.  Every client message is parsed by
``clientwire.decode_request``; a malformed one is answered ``EINVAL`` and changes nothing.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import logging
import mmap
import os
import resource
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from policy import decisions
from reflector import clientwire as cw
from reflector import paths

log = logging.getLogger("drvbox.server")

MAX_HANDLES_PER_CONNECTION = 256
# Connections cost a thread and up to 1 + SHM_SLOTS fds (the socket, a mapping per slot).  The Device
# Manager's own work -- hosts' channels, arenas, pidfds, listeners, the audit log -- must never
# find its fds taken by clients: they get what the fd limit leaves after this reserve, halved,
# and never more than MAX_CONNECTIONS.  A uid other than root and the owner gets half of that.
MAX_CONNECTIONS = 512
FD_RESERVE = 128
REFUSALS_AUDITED_PER_S = 1          # a flood of refused connections is one record a second, with a count
MAX_SHM_BYTES = cw.MAX_SHARED_BYTES
_CMSG = socket.CMSG_SPACE(4 * array.array("i").itemsize)
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)     # a plain int: enum flag arithmetic is slow
_NO_FDS: list[int] = []        # never appended to: shared by every message that carries none


class SocketBusy(Exception):
    """The socket's path cannot be taken: another Device Manager has it, or something that is not
    a dead Device Manager's socket is there.  The message names the path and the way out."""


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]


# Linux 4.13's SO_PEERGROUPS (not in Python's socket module): the supplementary groups of the
# peer as they were when it called connect(), as SO_PEERCRED's uid and gid are.
SO_PEERGROUPS = 59
# CPython's getsockopt takes at most 1024 bytes: 256 groups.
_PEERGROUPS_BYTES = 1024


def _peer(sock: socket.socket) -> Caller:
    """Who is at the other end, as of its connect(): pid, uid, gid and supplementary groups.

    Never read from /proc/<pid>: by the time we look, that pid may be another process (the
    caller exited and the pid was reused) whose groups would then open devices for the caller.
    A caller in more groups than we can read is judged by its primary group alone -- AllowGroups
    may refuse it, never grant it more."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    groups: tuple[int, ...] = (gid,)
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _PEERGROUPS_BYTES)
    except OSError as exc:
        log.warning("client pid %d uid %d: its supplementary groups cannot be read (%s); only its "
                    "primary group %d counts for AllowGroups", pid, uid, exc.strerror or exc, gid)
    else:
        groups = tuple(sorted({gid, *struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4])}))
    return Caller(pid, uid, gid, groups)


class Server:
    def __init__(self, dm, path: Path):
        self.dm = dm
        self.path = Path(path)
        self.sock: socket.socket | None = None
        self._threads: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()
        self._uids: dict[socket.socket, int] = {}
        self._refusals = 0
        self._refusal_stamp = float("-inf")
        self._lock = threading.Lock()
        self._stopping = False
        self._lock_fd: int | None = None
        self._bound_ino: int | None = None

    def claim(self) -> None:
        """Take the socket's path for this Device Manager, before anything else starts.

        A lock file next to the socket (``<socket>.lock``, ``flock``) makes the check and the
        bind one step for two Device Managers starting at once; it goes with the process, so a
        Device Manager that was killed leaves nothing that stops the next one.  Under the lock, a
        socket nobody answers on is a dead Device Manager's and is removed; anything else at the
        path -- a live socket, a file, a symlink -- is refused and left as it is.  Bound here,
        listening only in :meth:`start`: a client that comes early is refused, never queued."""
        paths.check_socket_dir(self.path, create=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SocketBusy(f"{lock_path}: cannot open the socket's lock file ({exc.strerror}); remove it "
                             f"if it is not a regular file, or choose another path with --socket") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise SocketBusy(f"{self.path}: another Device Manager is starting or serving on this socket "
                             f"(it holds {lock_path.name}); stop it, or choose another path with --socket") from None
        try:
            self._remove_stale()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            old = os.umask(0o117)                # mode 0660 from birth, not chmod'ed after
            try:
                sock.bind(str(self.path))
            except OSError as exc:
                sock.close()
                raise SocketBusy(f"{self.path}: cannot bind the socket ({exc.strerror or exc}); choose "
                                 f"another path with --socket") from None
            finally:
                os.umask(old)
        except BaseException:
            os.close(lock_fd)
            raise
        self._lock_fd = lock_fd
        self._bound_ino = os.lstat(self.path).st_ino
        self.sock = sock

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else "not a socket"
            raise SocketBusy(f"{self.path} exists and is {kind}; drvbox removes only a dead Device Manager's "
                             f"socket there.  Move it away, or choose another path with --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.path)                 # stale: nobody listens (a Device Manager that died)
            return
        except OSError as exc:
            raise SocketBusy(f"{self.path}: cannot tell whether a Device Manager serves this socket "
                             f"(connect: {exc.strerror}); remove it if none does, or choose another path "
                             f"with --socket") from None
        finally:
            probe.close()
        raise SocketBusy(f"{self.path}: another Device Manager is serving this socket; stop it, or "
                         f"choose another path with --socket")

    def start(self) -> None:
        """Listen and accept on the socket :meth:`claim` bound (claimed here if it was not)."""
        if self.sock is None:
            self.claim()
        self.sock.listen(64)
        t = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        t.start()

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError as exc:
                if self._stopping:
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(0.05)         # out of fds: do not spin; connections wait in the backlog
                continue
            caller, refusal = self._admit(conn)
            if refusal:
                conn.close()
                self._refused(refusal)
                continue
            t = threading.Thread(target=self._serve, args=(conn, caller), name="client", daemon=True)
            with self._lock:
                self._conns.add(conn)
                self._uids[conn] = caller.uid
                self._threads.add(t)
            t.start()

    def connection_limit(self) -> int:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)   # read each time: it can be lowered under us
        return max(1, min(MAX_CONNECTIONS, (soft - FD_RESERVE) // (1 + cw.SHM_SLOTS)))

    def _admit(self, conn: socket.socket) -> tuple["Caller | None", str | None]:
        """The caller of a new connection, and why it is refused (None: admitted)."""
        limit = self.connection_limit()
        try:
            caller = _peer(conn)
        except OSError:
            return None, "peer credentials unreadable"
        with self._lock:
            total = len(self._conns)
            mine = sum(1 for uid in self._uids.values() if uid == caller.uid)
        if total >= limit:
            return caller, f"{total} connections open, the limit is {limit}"
        if caller.uid not in (0, self.dm.owner_uid) and mine >= limit // 2:
            return caller, f"uid {caller.uid} holds {mine} connections, the per-user limit is {limit // 2}"
        return caller, None

    def _refused(self, why: str) -> None:
        """Audit refused connections: the first at once, then a count at most once a second."""
        now = time.monotonic()
        self._refusals += 1
        if now - self._refusal_stamp >= 1 / REFUSALS_AUDITED_PER_S:
            self._refusal_stamp = now
            count, self._refusals = self._refusals, 0
            log.warning("refused %d client connection(s): %s", count, why)
            try:
                self.dm.audit.record("client.denied", detail={"reason": why, "connections_refused": count})
            except Exception as exc:       # the audit log's trouble is not the accept loop's end
                log.error("audit of refused connections failed: %s", exc)

    def stop(self) -> None:
        self._stopping = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        # Only the socket this server bound: never a path it failed to claim (another Device
        # Manager's live socket), nor one that was replaced since.
        if self._bound_ino is not None:
            try:
                if os.lstat(self.path).st_ino == self._bound_ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._bound_ino = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)              # the lock file stays: removing it would race a successor
            self._lock_fd = None

    def _serve(self, conn: socket.socket, caller: "Caller") -> None:
        session = _Session(self.dm, conn, caller)
        try:
            session.run()
        finally:
            session.close()
            with self._lock:
                self._conns.discard(conn)
                self._uids.pop(conn, None)
                self._threads.discard(threading.current_thread())
            conn.close()


class _Session:
    """One client connection: its caller, its handles, its shared memory."""

    def __init__(self, dm, conn: socket.socket, caller: Caller):
        self.dm = dm
        self.conn = conn
        self.caller = caller
        self.handles: dict[int, tuple] = {}
        self.next_handle = 1
        # Per slot (clientwire.shm_flags): the client's attached memory and a view of it, or None.
        self.shm: list[mmap.mmap | None] = [None] * cw.SHM_SLOTS
        self.shm_view: list[memoryview | None] = [None] * cw.SHM_SLOTS
        self.listing: bytes | None = None        # the last LIST's snapshot, served in pieces

    def run(self) -> None:
        conn, handlers, encode_reply = self.conn, self._HANDLERS, cw.encode_reply
        while True:
            try:
                data, anc, flags, _ = conn.recvmsg(cw.MAX_MESSAGE, _CMSG)
            except OSError:
                return
            fds = _fds(anc) if anc else _NO_FDS
            if not data and not fds:
                return
            try:
                if flags & _TRUNCATED:
                    raise cw.ClientProtocolError("message larger than the protocol allows")
                req = cw.decode_request(data)
            except cw.ClientProtocolError as exc:
                _close_all(fds)
                self._send(encode_reply(0, errno.EINVAL, 0, str(exc).encode()[:512]))
                continue
            try:
                if fds and req.op != cw.Op.SHM_ATTACH:
                    raise OSError(errno.EINVAL, "file descriptors are accepted only with SHM_ATTACH")
                # The closed set of operations: one handler each, anything else refused.
                handler = handlers.get(req.op)
                if handler is None:
                    raise OSError(errno.EINVAL, f"operation {req.op.name} is not a client request")
                value, tail = handler(self, req, fds)     # mmap keeps its own duplicate of an attached fd
                reply = encode_reply(req.req_id, 0, value, tail)
            except OSError as exc:
                code = exc.errno if isinstance(exc.errno, int) and 0 < exc.errno < 4096 else errno.EIO
                reply = encode_reply(req.req_id, code, 0, (exc.strerror or str(exc)).encode()[:512])
            except Exception as exc:       # a bug of ours must not take the connection's peers down
                log.exception("request %s failed", req.op.name)
                reply = encode_reply(req.req_id, errno.EIO, 0, f"internal error: {exc}".encode()[:512])
            finally:
                if fds:
                    _close_all(fds)
            try:
                conn.send(reply)
            except OSError:
                return

    def _send(self, reply: bytes) -> bool:
        try:
            self.conn.send(reply)
            return True
        except OSError:
            return False

    # -- operations: one handler each, (session, request, fds) -> (value, reply tail) ---------

    def _op_open(self, req: cw.Request, fds) -> tuple[int, bytes]:
        return self._open(req), b""

    def _op_list(self, req: cw.Request, fds) -> tuple[int, bytes]:
        # One snapshot per listing, served in pieces of MAX_INLINE: a listing of many devices
        # does not fit one message, and pieces of different snapshots would not make one JSON.
        if not req.tail:
            self.listing = json.dumps(self.dm.describe()).encode()
            offset = 0
        elif len(req.tail) == cw.LIST_OFFSET.size and self.listing is not None:
            (offset,) = cw.LIST_OFFSET.unpack(req.tail)
            if offset > len(self.listing):
                raise OSError(errno.EINVAL, f"listing offset {offset} is past its end ({len(self.listing)})")
        else:
            raise OSError(errno.EINVAL, "LIST takes no tail, or an 8-byte offset into the listing it started")
        return len(self.listing), self.listing[offset:offset + cw.MAX_INLINE]

    def _op_restart(self, req: cw.Request, fds) -> tuple[int, bytes]:
        self._require_owner("restart")
        self.dm.restart(_name(req.tail))
        return 0, b""

    def _op_shm_attach(self, req: cw.Request, fds) -> tuple[int, bytes]:
        self._attach(cw.shm_slot(req.flags), req.fields[0], fds)
        return 0, b""

    def _op_hw(self, req: cw.Request, fds) -> tuple[int, bytes]:
        self._require_owner("hw")
        return 0, json.dumps(self.dm.hw_command(_json(req.tail))).encode()

    def _op_close(self, req: cw.Request, fds) -> tuple[int, bytes]:
        device, ref = self._lookup(req.handle)
        del self.handles[req.handle]
        device.close(ref)
        return 0, b""

    def _op_seek(self, req: cw.Request, fds) -> tuple[int, bytes]:
        device, ref = self._lookup(req.handle)
        offset, whence = req.fields
        if whence not in (0, 1, 2):
            raise OSError(errno.EINVAL, f"whence {whence} is not SEEK_SET, SEEK_CUR or SEEK_END")
        return device.seek(ref, offset, whence), b""

    def _op_read(self, req: cw.Request, fds) -> tuple[int, bytes]:
        device, ref = self._lookup(req.handle)
        length, off = req.fields
        out, inline = self._buffer(req, off, length)
        n = device.read(ref, out)
        return n, out[:n] if inline else b""         # a view: encode_reply copies it once, into the reply

    def _op_write(self, req: cw.Request, fds) -> tuple[int, bytes]:
        device, ref = self._lookup(req.handle)
        length, off = req.fields
        data = self._input(req, off, length)
        return device.write(ref, data), b""

    def _op_ioctl(self, req: cw.Request, fds) -> tuple[int, bytes]:
        entry = self.handles.get(req.handle)
        if entry is None:
            return self._lookup(req.handle)          # raises EBADF
        device, ref = entry
        code, in_len, in_off, out_len, out_off = req.fields
        if req.flags or out_len > cw.MAX_INLINE or len(req.tail) != in_len:
            data = self._input(req, in_off, in_len)
            out, inline = self._buffer(req, out_off, out_len)
        else:                                        # the common small IOCTL, inline both ways
            data, out, inline = memoryview(req.tail), memoryview(bytearray(out_len)), True
        n = device.ioctl(ref, code, data, out)
        return n, out[:n] if inline else b""

    _HANDLERS = {
        cw.Op.OPEN: _op_open,
        cw.Op.LIST: _op_list,
        cw.Op.RESTART: _op_restart,
        cw.Op.SHM_ATTACH: _op_shm_attach,
        cw.Op.HW: _op_hw,
        cw.Op.CLOSE: _op_close,
        cw.Op.SEEK: _op_seek,
        cw.Op.READ: _op_read,
        cw.Op.WRITE: _op_write,
        cw.Op.IOCTL: _op_ioctl,
    }

    def _open(self, req: cw.Request) -> int:
        access, share = req.fields
        name = _name(req.tail)
        device = self.dm.device(name)
        if device is None:
            raise OSError(errno.ENODEV, f"no device {name!r}; `drvbox ls` lists them")
        if device.policy is None:
            why = getattr(device, "reason", None) or "rejected"
            raise OSError(errno.ENODEV, f"{name} is not loaded ({why}); `drvbox audit show --device {name}` says why")
        verdict = decisions.may_open(device.policy, self.caller.uid, self.caller.groups, self.dm.owner_uid)
        if not verdict:
            self.dm.audit.record("client.denied", device=name, driver=device.entry.dll, group=device.entry.group,
                                 pid=self.caller.pid,
                                 detail={"uid": self.caller.uid, "gid": self.caller.gid, "reason": verdict.reason})
            raise OSError(errno.EACCES, verdict.reason)
        if len(self.handles) >= MAX_HANDLES_PER_CONNECTION:
            raise OSError(errno.EMFILE, f"a connection may hold at most {MAX_HANDLES_PER_CONNECTION} handles")
        ref = device.open(access, share)
        handle = self.next_handle
        self.next_handle += 1
        self.handles[handle] = (device, ref)
        return handle

    def _lookup(self, handle: int):
        entry = self.handles.get(handle)
        if entry is None:
            raise OSError(errno.EBADF, f"handle {handle} is not open on this connection")
        return entry

    def _require_owner(self, what: str) -> None:
        if self.caller.uid not in (0, self.dm.owner_uid):
            self.dm.audit.record("client.denied", pid=self.caller.pid,
                                 detail={"uid": self.caller.uid, "op": what, "reason": "root or the daemon's owner only"})
            raise OSError(errno.EACCES, f"only root or the Device Manager's owner may {what}")

    def _attach(self, slot: int, size: int, fds: list[int]) -> None:
        if len(fds) != 1:
            raise OSError(errno.EINVAL, f"SHM_ATTACH takes exactly one fd, got {len(fds)}")
        fd = fds[0]
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size or not 0 < size <= MAX_SHM_BYTES:
            raise OSError(errno.EINVAL, f"shared memory must be a memfd of the declared size (1..{MAX_SHM_BYTES} bytes)")
        others = sum(len(m) for i, m in enumerate(self.shm) if m is not None and i != slot)
        if others + size > MAX_SHM_BYTES:
            raise OSError(errno.EINVAL, f"{others + size} bytes of shared memory on one connection exceed "
                                        f"{MAX_SHM_BYTES}; detach (close) a shared buffer first")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            raise OSError(errno.EINVAL, "shared memory must be a memfd (created with MFD_ALLOW_SEALING)") from None
        if not seals & fcntl.F_SEAL_SHRINK:
            # Without the seal a client could shrink the file under us and turn our next access into SIGBUS.
            raise OSError(errno.EINVAL, "shared memory must be sealed with F_SEAL_SHRINK")
        shm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._release_shm(slot)
        self.shm[slot], self.shm_view[slot] = shm, memoryview(shm)

    def _buffer(self, req: cw.Request, off: int, length: int) -> tuple[memoryview, bool]:
        if req.flags & cw.FLAG_SHM:
            return self._shm_slice(req.flags, off, length), False
        if length > cw.MAX_INLINE:
            raise OSError(errno.EINVAL, f"{length} bytes inline exceed {cw.MAX_INLINE}; attach shared memory")
        return memoryview(bytearray(length)), True

    def _input(self, req: cw.Request, off: int, length: int) -> memoryview:
        if req.flags & cw.FLAG_SHM:
            return self._shm_slice(req.flags, off, length)
        if len(req.tail) != length:
            raise OSError(errno.EINVAL, f"declared {length} bytes of input, sent {len(req.tail)}")
        return memoryview(req.tail)

    def _shm_slice(self, flags: int, off: int, length: int) -> memoryview:
        slot = cw.shm_slot(flags)
        view = self.shm_view[slot]
        if view is None:
            raise OSError(errno.EINVAL, f"no shared memory attached in slot {slot}")
        if off + length > len(view):
            raise OSError(errno.EINVAL, f"bytes {off}..{off + length} lie outside the shared memory of slot {slot}")
        return view[off:off + length]

    def _release_shm(self, slot: int | None = None) -> None:
        for i in range(cw.SHM_SLOTS) if slot is None else (slot,):
            view, shm = self.shm_view[i], self.shm[i]
            self.shm[i] = self.shm_view[i] = None
            if view is not None:
                view.release()
                try:
                    shm.close()
                except BufferError:
                    pass

    def close(self) -> None:
        for device, ref in list(self.handles.values()):
            try:
                device.close(ref)
            except OSError:
                pass
        self.handles.clear()
        self._release_shm()


def _fds(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % array.array("i").itemsize
            fds.extend(array.array("i", payload[:usable]))
    return fds


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _name(tail: bytes) -> str:
    try:
        name = tail.decode("utf-8")
    except UnicodeDecodeError:
        raise OSError(errno.EINVAL, "device name is not UTF-8") from None
    if not 1 <= len(name) <= 64 or not name.isprintable():
        raise OSError(errno.EINVAL, f"{name!r} is not a device name (like COM1:)")
    return name


def _json(tail: bytes):
    try:
        return json.loads(tail)
    except ValueError as exc:
        raise OSError(errno.EINVAL, f"malformed JSON: {exc}") from None
