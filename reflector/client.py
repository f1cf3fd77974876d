"""``reflector.client``: how applications reach devices.

    from reflector.client import connect
    with connect() as dm:
        with dm.open("COM1:", "rw") as h:
            h.write(b"hello"); h.read(5); h.seek(0, 0)
            out = h.ioctl(0x00220004, b"\\x01\\x02", out_size=16)
        dm.devices()

Errors are ``OSError``s with the usual errno (``EACCES``, ``ENODEV``, ``ETIMEDOUT``, ``EIO``,
``ESTALE``, ``EINVAL``, ``EMSGSIZE`` or the driver's own), so they are handled like file errors.
Buffers larger than ``SHM_THRESHOLD`` go through a sealed memfd shared once with the Device
Manager instead of through the socket.  For bulk transfers without a copy on this side, read
into (and write from) a buffer that is itself shared with the Device Manager::

    with dm.shared_buffer(1 << 20) as buf:
        n = h.readinto(buf)          # the Device Manager writes straight into buf
        header = buf.view[:16]       # a memoryview of what was read
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import itertools
import json
import mmap
import os
import socket
import threading
from pathlib import Path

from reflector import clientwire as cw
from reflector.paths import check_socket_dir, default_socket, fallback_runtime_dir

__all__ = ["connect", "DeviceManager", "Handle", "SharedBuffer"]

SHM_THRESHOLD = 16 * 1024
_ACCESS = {"r": 1, "w": 2, "rw": 3, "wr": 3}
_IOCTL = cw.Op.IOCTL
_IOCTL_REQUEST = cw.REQUESTS[int(cw.Op.IOCTL)]
_REPLY, _REPLY_SIZE, _REPLY_OP = cw.REPLY, cw.REPLY.size, int(cw.Op.REPLY)


def connect(path: str | os.PathLike | None = None) -> "DeviceManager":
    """Connect to the Device Manager at ``path`` (default: $DRVBOX_SOCKET or the standard path).

    The socket's directory is checked first: one that another user may write is refused
    (``reflector.paths.UnsafeSocketDir``), since its owner could have put their own socket there."""
    path = Path(path) if path else default_socket()
    check_socket_dir(path, create=False, owner_checked=path.parent == fallback_runtime_dir())
    return DeviceManager(path)


class DeviceManager:
    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.sock.connect(str(path))
        except FileNotFoundError:
            self.sock.close()
            raise FileNotFoundError(errno.ENOENT, f"no Device Manager socket at {path}: start one with "
                                    f"`drvbox run` (or set DRVBOX_SOCKET)", str(path)) from None
        except PermissionError:
            self.sock.close()
            raise PermissionError(errno.EACCES, f"not allowed to connect to {path} (mode 0660: join its "
                                  f"group or ask its owner)", str(path)) from None
        except ConnectionRefusedError:
            self.sock.close()
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"no Device Manager answers at {path}: it is "
                                         f"starting, or it died and left its socket; start one with `drvbox run`",
                                         str(path)) from None
        except BaseException:
            self.sock.close()
            raise
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._shm: mmap.mmap | None = None
        self._shm_lock = threading.Lock()     # one bulk transfer at a time owns the shared buffer
        self._user_slots = list(range(cw.SHM_SLOTS - 1, 0, -1))   # free slots for shared_buffer()

    # -- transport ----------------------------------------------------------------------------

    def _call(self, op: cw.Op, handle: int = 0, *fields, flags: int = 0, tail: bytes = b"",
              fds: list[int] | None = None) -> tuple[int, bytes]:
        with self._lock:
            req_id = next(self._ids) & 0xFFFFFFFF
            msg = cw.encode_request(op, req_id, handle, *fields, flags=flags, tail=tail)
            if fds:
                self.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            else:
                self.sock.send(msg)
            data = self.sock.recv(cw.MAX_MESSAGE)
        return self._check_reply(data, req_id)

    def _check_reply(self, data: bytes, req_id: int) -> tuple[int, bytes]:
        """``(value, tail)`` of the reply ``data`` to request ``req_id``, or its error raised."""
        if not data:
            raise ConnectionResetError(errno.ECONNRESET, "the Device Manager closed the connection")
        got_id, status, value, rtail = cw.decode_reply(data)
        if status:
            raise OSError(status, f"{os.strerror(status)}: {rtail.decode('utf-8', 'replace')}")
        if got_id != req_id:
            raise cw.ClientProtocolError(f"reply to request {got_id}, expected {req_id}")
        return value, rtail

    def _attach(self, slot: int, size: int) -> mmap.mmap:
        """A sealed memfd of at least ``size`` bytes, mapped here and attached in ``slot``."""
        capacity = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        fd = os.memfd_create("drvbox-client", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, capacity)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            shm = mmap.mmap(fd, capacity)
            try:
                self._call(cw.Op.SHM_ATTACH, 0, capacity, flags=cw.shm_flags(slot), fds=[fd])
            except BaseException:
                shm.close()
                raise
        finally:
            os.close(fd)
        return shm

    def _shared(self, size: int) -> memoryview:
        """The library's staging buffer (slot 0), of at least ``size`` bytes."""
        if self._shm is None or len(self._shm) < size:
            shm = self._attach(0, max(size, 1 << 20))
            if self._shm is not None:
                self._shm.close()
            self._shm = shm
        return memoryview(self._shm)

    def shared_buffer(self, size: int) -> "SharedBuffer":
        """Memory of ``size`` bytes shared with the Device Manager, for :meth:`Handle.readinto`
        and :meth:`Handle.write` without a copy on this side.  A connection has one at a time
        (``clientwire.SHM_SLOTS - 1``); close it (or leave its ``with``) to get another."""
        if not 0 < size <= cw.MAX_SHARED_BYTES:
            raise ValueError(f"shared buffer of {size} bytes: expected 1..{cw.MAX_SHARED_BYTES}")
        with self._shm_lock:
            if not self._user_slots:
                raise RuntimeError("this connection's shared buffer is in use: close it first, "
                                   "or connect() again for another")
            slot = self._user_slots.pop()
        try:
            return SharedBuffer(self, slot, self._attach(slot, size), 0, size)
        except BaseException:
            self._free_slot(slot)
            raise

    def _free_slot(self, slot: int) -> None:
        with self._shm_lock:
            self._user_slots.append(slot)

    @contextlib.contextmanager
    def _lock_shm(self, size: int):
        with self._shm_lock:
            view = self._shared(size)
            try:
                yield view
            finally:
                view.release()

    # -- verbs ----------------------------------------------------------------------------------

    def open(self, name: str, mode: str = "rw", share: int = 0) -> "Handle":
        access = _ACCESS.get(mode)
        if access is None:
            raise ValueError(f"mode {mode!r}: use 'r', 'w' or 'rw'")
        handle, _ = self._call(cw.Op.OPEN, 0, access, share, tail=name.encode())
        return Handle(self, handle, name)

    def devices(self) -> dict:
        """What `drvbox ls --json` prints: {"devices": [...], "hosts": [...]}."""
        total, piece = self._call(cw.Op.LIST)
        listing = bytearray(piece)
        while len(listing) < total:
            _, piece = self._call(cw.Op.LIST, tail=cw.LIST_OFFSET.pack(len(listing)))
            if not piece:
                raise cw.ClientProtocolError(f"listing ends at {len(listing)} of its {total} bytes")
            listing += piece
        return json.loads(listing)

    def restart(self, name: str) -> None:
        self._call(cw.Op.RESTART, tail=name.encode())

    def hw(self, command: dict) -> dict:
        """A command for the simulated hardware (feed a UART, read its TX, set a GPIO pin...)."""
        _, tail = self._call(cw.Op.HW, tail=json.dumps(command).encode())
        return json.loads(tail)

    def close(self) -> None:
        self.sock.close()
        if self._shm is not None:
            self._shm.close()
            self._shm = None

    def __enter__(self) -> "DeviceManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Handle:
    """An open device.  Belongs to the connection that opened it."""

    def __init__(self, dm: DeviceManager, handle: int, name: str):
        self.dm = dm
        self.handle = handle
        self.name = name
        self.closed = False

    def read(self, size: int) -> bytes:
        if size > SHM_THRESHOLD:
            with self.dm._lock_shm(size) as view:
                n, _ = self.dm._call(cw.Op.READ, self.handle, size, 0, flags=cw.FLAG_SHM)
                return bytes(view[:n])
        _, data = self.dm._call(cw.Op.READ, self.handle, size, 0)
        return data

    def readinto(self, buffer) -> int:
        """Read into a writable buffer (bytearray, memoryview, mmap) of the size wanted; returns the
        count.  Saves the allocation of a new bytes object per read: for bulk transfers.  Into a
        :class:`SharedBuffer` the Device Manager writes directly, with no copy here at all."""
        if type(buffer) is SharedBuffer:
            n, _ = self.dm._call(cw.Op.READ, self.handle, *buffer._place(self.dm), flags=buffer._flags)
            return n
        target = memoryview(buffer).cast("B")
        size = len(target)
        if size > SHM_THRESHOLD:
            with self.dm._lock_shm(size) as view:
                n, _ = self.dm._call(cw.Op.READ, self.handle, size, 0, flags=cw.FLAG_SHM)
                target[:n] = view[:n]
                return n
        _, data = self.dm._call(cw.Op.READ, self.handle, size, 0)
        target[:len(data)] = data
        return len(data)

    def write(self, data) -> int:
        if type(data) is SharedBuffer:
            n, _ = self.dm._call(cw.Op.WRITE, self.handle, *data._place(self.dm), flags=data._flags)
            return n
        data = memoryview(data).cast("B")
        if len(data) > SHM_THRESHOLD:
            with self.dm._lock_shm(len(data)) as view:
                view[:len(data)] = data
                n, _ = self.dm._call(cw.Op.WRITE, self.handle, len(data), 0, flags=cw.FLAG_SHM)
                return n
        n, _ = self.dm._call(cw.Op.WRITE, self.handle, len(data), 0, tail=bytes(data))
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        pos, _ = self.dm._call(cw.Op.SEEK, self.handle, offset, whence)
        return pos

    def ioctl(self, code: int, inbuf: bytes = b"", out_size: int = 0) -> bytes:
        if type(inbuf) is bytes and len(inbuf) + out_size <= SHM_THRESHOLD:
            # The common small IOCTL, packed and unpacked here in one struct call each: this is
            # the path `drvbox bench` measures against the socket's own round trip.
            dm = self.dm
            with dm._lock:
                req_id = next(dm._ids) & 0xFFFFFFFF
                try:
                    msg = _IOCTL_REQUEST.pack(cw.VERSION, _IOCTL, 0, req_id, self.handle, code,
                                              len(inbuf), 0, out_size, 0) + inbuf
                except Exception as exc:        # struct.error: a code or size out of range
                    raise ValueError(f"ioctl code {code!r} or out_size {out_size!r} out of range: {exc}") from None
                dm.sock.send(msg)
                data = dm.sock.recv(cw.MAX_MESSAGE)
            if len(data) >= _REPLY_SIZE:
                version, op, _flags, got_id, status, _value = _REPLY.unpack_from(data)
                if version == cw.VERSION and op == _REPLY_OP and got_id == req_id and not status:
                    return data[_REPLY_SIZE:]
            return dm._check_reply(data, req_id)[1]
        if type(inbuf) is not bytes:              # bytes go as they are: no view, no copy
            inbuf = memoryview(inbuf).cast("B")
        if len(inbuf) + out_size > SHM_THRESHOLD:
            in_room = (len(inbuf) + 63) & ~63
            with self.dm._lock_shm(in_room + out_size) as view:
                view[:len(inbuf)] = inbuf
                n, _ = self.dm._call(cw.Op.IOCTL, self.handle, code, len(inbuf), 0, out_size, in_room,
                                     flags=cw.FLAG_SHM)
                return bytes(view[in_room:in_room + n])
        _, out = self.dm._call(_IOCTL, self.handle, code, len(inbuf), 0, out_size, 0,
                               tail=inbuf if type(inbuf) is bytes else bytes(inbuf))
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.dm._call(cw.Op.CLOSE, self.handle)

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SharedBuffer:
    """Memory shared with the Device Manager (see :meth:`DeviceManager.shared_buffer`).

    ``view`` is a writable memoryview of it; ``buf[a:b]`` is a SharedBuffer of part of it, for
    reading or writing fewer bytes.  Closing the whole buffer frees the connection's slot for
    another; views still held keep their memory readable until they go.
    """

    __slots__ = ("dm", "slot", "_mmap", "offset", "length", "_flags", "_closed", "_whole")

    def __init__(self, dm: DeviceManager, slot: int, shm: mmap.mmap, offset: int, length: int,
                 closed: list | None = None):
        self.dm, self.slot, self._mmap = dm, slot, shm
        self.offset, self.length = offset, length
        self._flags = cw.shm_flags(slot)
        self._whole = closed is None
        self._closed = [False] if closed is None else closed     # shared with every slice

    def _place(self, dm: DeviceManager) -> tuple[int, int]:
        if dm is not self.dm:
            raise ValueError("a shared buffer belongs to the connection that made it")
        if self._closed[0]:
            raise ValueError("the shared buffer is closed")
        return self.length, self.offset

    @property
    def view(self) -> memoryview:
        return memoryview(self._mmap)[self.offset:self.offset + self.length]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, part: slice) -> "SharedBuffer":
        if type(part) is not slice:
            raise TypeError("index a SharedBuffer with a slice (buf[a:b]); use buf.view for bytes")
        start, stop, step = part.indices(self.length)
        if step != 1:
            raise ValueError("a SharedBuffer slice must be contiguous")
        return SharedBuffer(self.dm, self.slot, self._mmap, self.offset + start, max(0, stop - start),
                            closed=self._closed)

    def tobytes(self) -> bytes:
        return self._mmap[self.offset:self.offset + self.length]

    def close(self) -> None:
        if self._whole and not self._closed[0]:
            self._closed[0] = True
            try:
                self._mmap.close()
            except BufferError:
                pass        # views are still held: the mapping goes with the last of them
            self.dm._free_slot(self.slot)

    def __enter__(self) -> "SharedBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
