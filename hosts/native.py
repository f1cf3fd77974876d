"""Native drivers: a shared object exporting the CE stream interface, presented as a ``Driver``.

DESIGN.md section 4: a native driver exports ``PREFIX_Init``, ``PREFIX_Open``, ... with the CE
signatures, ``DWORD`` being ``uint32_t``; ``PREFIX`` is the registry ``Prefix`` of its key, or
nothing (``Init``, ``Open``, ...) when its ``Flags`` has ``DEVFLAGS_NAKEDENTRIES`` (0x8).  It is
loaded with ctypes (``dlopen`` with ``RTLD_NOW``: an unresolved symbol fails the load, not a later
call) and wrapped in ``NativeDriver``, which has the methods of ``hosts.StreamDriver``, so that
``hosts.dispatch.LoadedDriver`` -- in a host and in the Device Manager's kernel mode alike -- runs
it like any Python driver.  docs/native-drivers.md is the driver writer's side of this file.

Entries (``_ENTRIES``).  Required: ``Init`` and ``Deinit``; ``Open`` and ``Close`` as soon as the
driver has either of them or any I/O entry (``Read``, ``Write``, ``Seek``, ``IOControl``).  A
missing I/O entry (``Open`` included) fails the call with ``EOPNOTSUPP``, as a Python driver's
default does; a missing ``PreClose``, ``PreDeinit``, ``PowerUp`` or ``PowerDown`` does nothing.

Failures: ``Init``/``Open`` returning 0, ``Read``/``Write``/``Seek`` returning ``(DWORD)-1``, a
``BOOL`` entry returning ``FALSE``.  Which errno: the driver's ``PREFIX_GetLastError()`` if it
exports one (called at once, on the same thread), else the C ``errno`` the call left (cleared to 0
before it) when there is none or it answers 0; either only if within 1..4095; otherwise ``EIO``.

Buffers: the driver gets pointers straight into the caller's buffers -- in a host, the arena
slot the Reflector filled (no copy), between guard pages (``hosts.arena_map``), with the whole
pages of its input made read-only for the call.  A zero-length buffer is passed as NULL.  In the
Device Manager (kernel mode) there is no arena: the input is copied once into a private buffer
so that a driver writing to it (it is ``const``) cannot change Python's immutable objects; the
output is the caller's buffer.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re

from hosts import arena_map
from hosts.api import MAX_ERRNO, DriverError

DEVFLAGS_NAKEDENTRIES = 0x8      # policy/drivers.py; the host does not import policy
_FAILED = 0xFFFFFFFF             # (DWORD)-1
_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}\Z")

DWORD = ctypes.c_uint32
BOOL = ctypes.c_int              # Win32 BOOL is an int
WORD = ctypes.c_uint16
_P = ctypes.c_void_p

# entry -> (result type, argument types); CE's signatures with DWORD = uint32_t.
_ENTRIES: dict[str, tuple[object, tuple]] = {
    "Init": (DWORD, (ctypes.c_char_p, _P)),                 # (LPCSTR context, LPCVOID bus)
    "Deinit": (BOOL, (DWORD,)),                             # (device context)
    "Open": (DWORD, (DWORD, DWORD, DWORD)),                 # (device context, access, share)
    "Close": (BOOL, (DWORD,)),                              # (open context)
    "Read": (DWORD, (DWORD, _P, DWORD)),                    # (open, buffer, count)
    "Write": (DWORD, (DWORD, _P, DWORD)),                   # (open, const buffer, count)
    "Seek": (DWORD, (DWORD, ctypes.c_long, WORD)),          # (open, amount, FILE_BEGIN/CURRENT/END)
    "IOControl": (BOOL, (DWORD, DWORD, _P, DWORD, _P, DWORD, ctypes.POINTER(DWORD))),
    "PreClose": (BOOL, (DWORD,)),                           # (open context)
    "PreDeinit": (BOOL, (DWORD,)),                          # (device context)
    "PowerUp": (None, (DWORD,)),                            # (device context)
    "PowerDown": (None, (DWORD,)),                          # (device context)
    "GetLastError": (DWORD, ()),                            # drvbox's: the errno of the last failure
}
_ALWAYS = ("Init", "Deinit")
_IO = ("Read", "Write", "Seek", "IOControl")

# The host's arena (set by hosts.main); None in the Device Manager.
_arena: arena_map.ArenaMapping | None = None


def use_arena(mapping: arena_map.ArenaMapping) -> None:
    """Called once by the host: buffers inside ``mapping`` are the arena's, and its guarded
    pages may be made read-only for a call."""
    global _arena
    _arena = mapping if mapping.stride else None


class NativeLoadError(Exception):
    """The shared object cannot be used as a driver; ``errno`` is what the LOAD returns."""

    def __init__(self, errno_: int, message: str):
        super().__init__(message)
        self.errno = errno_
        self.message = message


# -- buffers: the address of a memoryview's bytes, read-only ones included ----------------------

class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", _P), ("obj", _P), ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", _P), ("strides", _P), ("suboffsets", _P), ("internal", _P)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = (ctypes.POINTER(_PyBuffer),)
_release_buffer.restype = None
_PyBUF_SIMPLE = 0


class _Pinned:
    """The address of ``view``'s bytes for the length of a call (NULL when it is empty), held by
    a buffer export so the memory cannot go away meanwhile.  ``input=True``: the driver must not
    write it -- read-only pages in the arena, a private copy elsewhere."""

    __slots__ = ("view", "input", "buffer", "held", "guard", "copy", "address")

    def __init__(self, view: memoryview, input: bool):
        self.view, self.input = view, input
        self.buffer = _PyBuffer()
        self.held = False
        self.guard = self.copy = None
        self.address = None

    def __enter__(self) -> int | None:
        if not len(self.view):
            return None
        _get_buffer(self.view, ctypes.byref(self.buffer), _PyBUF_SIMPLE)
        self.held = True
        address = self.buffer.buf
        if self.input:
            if _arena is not None and _arena.contains(address, len(self.view)):
                self.guard = arena_map.read_only(address, len(self.view))
                self.guard.__enter__()
            else:
                self.copy = ctypes.create_string_buffer(bytes(self.view), len(self.view))
                address = ctypes.addressof(self.copy)
        return address

    def __exit__(self, *exc):
        if self.guard is not None:
            self.guard.__exit__(*exc)
        if self.held:
            _release_buffer(ctypes.byref(self.buffer))
        return False


# -- the driver ----------------------------------------------------------------------------------

# How each entry says it failed.
def _zero(result) -> bool:          # Init, Open: a context of 0
    return result == 0


def _false(result) -> bool:         # BOOL entries: FALSE
    return not result


def _minus_one(result) -> bool:     # Read, Write, Seek: (DWORD)-1
    return result == _FAILED


def _never(result) -> bool:         # PowerUp, PowerDown: void
    return False


def is_native(path: str) -> bool:
    """Whether the resolved module ``path`` is a shared object (policy/modules.py: libx.so, x.so)."""
    return path.endswith(".so")


def entry_names(registry, path: str, device: str) -> tuple[str, bool]:
    """``(prefix, naked)``: the symbols are ``prefix + "_" + entry``, or the entry alone when
    naked.  Raises NativeLoadError when the registry gives no usable Prefix."""
    flags = registry.get("Flags", 0)
    naked = type(flags) is int and bool(flags & DEVFLAGS_NAKEDENTRIES)
    if naked:
        return "", True
    prefix = registry.get("Prefix")
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise NativeLoadError(errno.EINVAL, f"{device} native driver {path}: registry Prefix {prefix!r} cannot prefix C "
                                            f"symbols (PREFIX_Init needs letters, digits and '_'); set Prefix, or "
                                            f"Flags |= 0x8 (DEVFLAGS_NAKEDENTRIES) for unprefixed entries")
    return prefix, False


def load(path: str, registry, device: str) -> "NativeDriver":
    """Open the shared object at ``path`` and bind its entries for the device; raises
    NativeLoadError naming the file and, for a missing entry, the symbol."""
    if not os.path.isfile(path):
        raise NativeLoadError(errno.ENOENT, f"{device} native driver {path} does not exist")
    prefix, naked = entry_names(registry, path, device)
    try:
        # ctypes opens with RTLD_NOW: a symbol the object cannot resolve fails here, not mid-call.
        library = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL, use_errno=True)
    except OSError as exc:
        raise NativeLoadError(errno.ENOEXEC, f"{device} cannot load native driver {path}: {exc}") from None
    entries = {}
    for name, (restype, argtypes) in _ENTRIES.items():
        symbol = name if naked else f"{prefix}_{name}"
        try:
            function = getattr(library, symbol)
        except AttributeError:
            continue
        function.restype, function.argtypes = restype, argtypes
        entries[name] = function
    required = list(_ALWAYS)
    if any(name in entries for name in ("Open", "Close") + _IO):
        required += ["Open", "Close"]
    missing = [name for name in required if name not in entries]
    if missing:
        how = ("Flags has DEVFLAGS_NAKEDENTRIES (0x8), so the names are unprefixed" if naked
               else f"the names are the registry Prefix {prefix!r}, '_' and the entry")
        symbols = ", ".join(name if naked else f"{prefix}_{name}" for name in missing)
        raise NativeLoadError(errno.ENOEXEC, f"{device} native driver {path} does not export {symbols} "
                                             f"(required; {how}; see what it exports with nm -D {path})")
    return NativeDriver(path, entries, device)


class NativeDriver:
    """The stream interface of ``hosts.StreamDriver`` over a shared object's entries.  Calls may
    come from several threads at once, as in CE: the driver must be reentrant."""

    def __init__(self, path: str, entries: dict, device: str):
        self.path = path
        self.device = device
        self._entries = entries
        self._last_error = entries.get("GetLastError")
        self._context: object = None      # Init's argument, alive as long as the driver
        self._dev = 0                     # what Init returned

    def __repr__(self) -> str:
        return f"NativeDriver({self.path!r}, device={self.device!r})"

    def _error(self, entry: str) -> DriverError:
        code = self._last_error() if self._last_error is not None else 0
        if not 1 <= code <= MAX_ERRNO:
            code = ctypes.get_errno()
            if not 1 <= code <= MAX_ERRNO:
                code = errno.EIO
        return DriverError(code, f"{self.device} {entry} failed ({errno.errorcode.get(code, code)})")

    def _call(self, entry: str, failed, *args):
        """Call ``entry``; when ``failed(result)``, raise its errno at once (before anything else
        can change errno, e.g. giving an input's pages back)."""
        ctypes.set_errno(0)
        result = self._entries[entry](*args)
        if failed(result):
            raise self._error(entry)
        return result

    def _unsupported(self, entry: str):
        return DriverError(errno.EOPNOTSUPP, f"native driver {self.path} exports no {entry} entry")

    # -- lifecycle -------------------------------------------------------------------------------

    def init(self, ctx) -> None:
        # CE passes the registry path of the driver's Active key; drvbox has no registry API for
        # native code, so the context is the device name ("COM1:"), UTF-8, valid until Deinit.
        self._context = ctypes.create_string_buffer(ctx.device.encode("utf-8"))
        self._dev = self._call("Init", _zero, self._context, None)

    def deinit(self) -> None:
        self._call("Deinit", _false, self._dev)

    def pre_deinit(self) -> None:
        if "PreDeinit" in self._entries:
            self._call("PreDeinit", _false, self._dev)

    def power_up(self) -> None:
        if "PowerUp" in self._entries:
            self._call("PowerUp", _never, self._dev)

    def power_down(self) -> None:
        if "PowerDown" in self._entries:
            self._call("PowerDown", _never, self._dev)

    # -- opens -----------------------------------------------------------------------------------

    def open(self, access: int, share: int) -> int:
        if "Open" not in self._entries:
            raise self._unsupported("Open")
        return self._call("Open", _zero, self._dev, access & 0xFFFFFFFF, share & 0xFFFFFFFF)

    def close(self, opened: int) -> None:
        if "Close" in self._entries:
            self._call("Close", _false, opened)

    def pre_close(self, opened: int) -> None:
        if "PreClose" in self._entries:
            self._call("PreClose", _false, opened)

    # -- I/O: counts are checked against the buffer by LoadedDriver ------------------------------

    def read(self, opened: int, out: memoryview) -> int:
        if "Read" not in self._entries:
            raise self._unsupported("Read")
        with _Pinned(out, input=False) as address:
            return self._call("Read", _minus_one, opened, address, len(out))

    def write(self, opened: int, data: memoryview) -> int:
        if "Write" not in self._entries:
            raise self._unsupported("Write")
        with _Pinned(data, input=True) as address:
            return self._call("Write", _minus_one, opened, address, len(data))

    def seek(self, opened: int, offset: int, whence: int) -> int:
        if "Seek" not in self._entries:
            raise self._unsupported("Seek")
        if not 0 <= whence <= 0xFFFF or not -(1 << 63) <= offset < (1 << 63):
            raise DriverError(errno.EINVAL, f"seek({offset}, {whence}) does not fit Seek(long, WORD)")
        return self._call("Seek", _minus_one, opened, offset, whence)

    def io_control(self, opened: int, code: int, inbuf: memoryview, outbuf: memoryview) -> int:
        if "IOControl" not in self._entries:
            raise self._unsupported("IOControl")
        actual = DWORD(0)
        with _Pinned(inbuf, input=True) as in_address, _Pinned(outbuf, input=False) as out_address:
            self._call("IOControl", _false, opened, code & 0xFFFFFFFF, in_address, len(inbuf),
                       out_address, len(outbuf), ctypes.byref(actual))
        return actual.value
