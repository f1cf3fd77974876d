"""One loaded driver and the stream-interface calls on it, each turned into ``(errno, value)``.

Shared by the host process and by the Device Manager's kernel mode (in process), so that a
driver behaves the same in both.  Nothing here raises: a driver that raises ``DriverError``
fails the call with its errno, anything else it raises (``BaseException`` included: a
``SystemExit`` in a worker thread would otherwise silently end that thread) fails the call with
``EIO`` and one log line; a count that is not an ``int`` within the buffer fails it with ``EIO``.

Buffers: input views are made read-only here (whatever the caller passed), output views are
passed as they are and must be exactly as long as the request asked, so that a driver writing
past the end gets an exception inside the driver, not a write into someone else's memory.
"""

from __future__ import annotations

import errno
import itertools
import threading
from collections.abc import Callable, Mapping

from hosts import native
from hosts.api import ERROR, MAX_ERRNO, WARNING, DriverContext, DriverError, StreamDriver
from hosts.loader import load_module
from hosts.registry_view import RegistryView

# Open handles one driver may hold at once; more fail with EMFILE instead of growing without end.
MAX_OPEN = 1024
# Largest value a REPLY can carry (its ``value`` is a signed 64-bit field).
_MAX_VALUE = (1 << 63) - 1
_METHODS = ("init", "deinit", "open", "close", "read", "write", "seek", "io_control",
            "power_up", "power_down", "pre_close", "pre_deinit")
_module_serial = itertools.count(1)
_MISSING = object()      # a handle table's "no such open_id" (a driver's open may return None)


class LoadError(Exception):
    """The driver could not be loaded or its ``init`` failed; ``errno`` is what the LOAD returns."""

    def __init__(self, errno_: int, message: str):
        super().__init__(message)
        self.errno = errno_
        self.message = message


def describe(exc: BaseException) -> str:
    """One line: exception type, message, and where the innermost frame raised it.

    Walks ``__traceback__`` by hand instead of importing ``traceback`` (and with it ``linecache``
    and ``tokenize``) into every host.
    """
    where = ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        code = tb.tb_frame.f_code
        where = f" (at {code.co_filename}:{tb.tb_lineno} in {code.co_name})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}{where}" if text else f"{type(exc).__name__}{where}"


def _driver_errno(exc: DriverError) -> int:
    code = exc.errno
    if type(code) is int and 1 <= code <= MAX_ERRNO:
        return code
    return 0


def _unique_name(device: str) -> str:
    safe = "".join(c if c.isalnum() else "_" for c in device)
    return f"drvbox_driver_{safe}_{next(_module_serial)}"


class LoadedDriver:
    """A driver module, its ``Driver`` instance after ``init(ctx)``, and its open handles.

    ``registry`` is a mapping of Python values (see ``hosts.registry_view``); ``log(level,
    message)`` receives every failure of the driver.  The constructor raises ``LoadError``;
    every other method returns ``(0, value)`` on success and ``(errno, 0)`` on failure.
    Calls may come from several threads at once (a CE driver is reentrant); the handle table
    is locked, the driver's own state is the driver's business.
    """

    def __init__(self, device: str, module_path: str, registry: Mapping[str, object], kernel,
                 log: Callable[[int, str], None]):
        self.device = device
        self.module_path = module_path
        self._log = log
        self._lock = threading.Lock()
        self._handles: dict[int, object] = {}
        self._next_id = 1
        self._unloaded = False
        if not isinstance(registry, RegistryView):
            registry = RegistryView(registry)
        instance = self._native(module_path, registry) if native.is_native(module_path) \
            else self._python(module_path)
        # Methods the class lacks fall back to StreamDriver's defaults, bound to a plain
        # StreamDriver so that a default never sees the driver's own attributes.
        defaults = StreamDriver()
        self._calls: dict[str, Callable] = {}
        for name in _METHODS:
            method = getattr(instance, name, None)
            self._calls[name] = method if callable(method) else getattr(defaults, name)
        self.driver = instance
        # The three calls on the I/O path, bound once (no lookup by name per request).
        self._read, self._write, self._io_control = self._calls["read"], self._calls["write"], self._calls["io_control"]
        self.ctx = DriverContext(registry, kernel, device)
        try:
            self._calls["init"](self.ctx)
        except DriverError as exc:
            code = _driver_errno(exc) or errno.EIO
            detail = f": {exc.message}" if exc.message else ""
            raise LoadError(code, f"{device} init failed with {errno.errorcode.get(code, code)}{detail}") from None
        except BaseException as exc:
            raise LoadError(errno.EIO, f"{device} init raised {describe(exc)}") from None

    def _python(self, module_path: str) -> object:
        """A Python driver module's ``Driver()``."""
        device = self.device
        try:
            module = load_module(module_path, _unique_name(device))
        except FileNotFoundError as exc:
            raise LoadError(errno.ENOENT, f"{device} cannot load {module_path}: {exc}") from None
        except BaseException as exc:
            raise LoadError(errno.ENOEXEC, f"{device} module {module_path} failed to import: "
                                           f"{describe(exc)}") from None
        cls = getattr(module, "Driver", None)
        if not isinstance(cls, type):
            raise LoadError(errno.ENOEXEC, f"{device} module {module_path} defines no class Driver "
                                           f"(a driver module must define class Driver)")
        try:
            return cls()
        except BaseException as exc:
            raise LoadError(errno.EIO, f"{device} Driver() raised {describe(exc)}") from None

    def _native(self, module_path: str, registry: RegistryView) -> object:
        """A shared object's entries as a Driver (hosts.native); its entry names depend on the
        registry (Prefix, Flags), so they are bound here, before init."""
        try:
            return native.load(module_path, registry, self.device)
        except native.NativeLoadError as exc:
            raise LoadError(exc.errno, exc.message) from None

    # -- the one place driver code is called --------------------------------------------------

    def _call(self, name: str, *args) -> tuple[int, object]:
        return self._invoke(name, self._calls[name], *args)

    def _invoke(self, name: str, method: Callable, *args) -> tuple[int, object]:
        try:
            return 0, method(*args)
        except DriverError as exc:
            code = _driver_errno(exc)
            if code:
                return code, 0
            self._log(ERROR, f"{self.device} {name} raised DriverError with errno {exc.errno!r}, "
                             f"not an int in 1..{MAX_ERRNO}; failing with EIO")
            return errno.EIO, 0
        except BaseException as exc:
            self._log(ERROR, f"{self.device} {name} raised {describe(exc)}")
            return errno.EIO, 0

    def _count(self, name: str, status: int, result: object, limit: int) -> tuple[int, int]:
        """A driver's byte count, refused unless it is an int within 0..limit."""
        if status:
            return status, 0
        if type(result) is not int or not 0 <= result <= limit:
            self._log(ERROR, f"{self.device} {name} returned {result!r}; expected an int "
                             f"from 0 to {limit}; failing with EIO")
            return errno.EIO, 0
        return 0, result

    def _opened(self, open_id: int) -> tuple[bool, object]:
        # No lock: one dict lookup is atomic, and a close or unload racing with this call is
        # ordered before or after it either way, as it would be by the lock.
        if self._unloaded:
            return False, None
        opened = self._handles.get(open_id, _MISSING)
        if opened is _MISSING:
            return False, None
        return True, opened

    # -- the stream interface -----------------------------------------------------------------

    def open(self, access: int, share: int) -> tuple[int, int]:
        """``value``: the open_id, a small int this object assigns (never 0)."""
        with self._lock:
            if self._unloaded:
                return errno.ENODEV, 0
            if len(self._handles) >= MAX_OPEN:
                return errno.EMFILE, 0
        status, opened = self._call("open", access, share)
        if status:
            return status, 0
        with self._lock:
            if self._unloaded:
                return errno.ENODEV, 0
            open_id = self._next_id
            while open_id in self._handles or open_id == 0:
                open_id = (open_id + 1) & 0xFFFFFFFF
            self._next_id = (open_id + 1) & 0xFFFFFFFF
            self._handles[open_id] = opened
        return 0, open_id

    def close(self, open_id: int) -> tuple[int, int]:
        """The handle is gone afterwards even if the driver's ``close`` fails."""
        with self._lock:
            if self._unloaded or open_id not in self._handles:
                return errno.EBADF, 0
            opened = self._handles.pop(open_id)
        status, _ = self._call("close", opened)
        return status, 0

    def read(self, open_id: int, out: memoryview) -> tuple[int, int]:
        ok, opened = self._opened(open_id)
        if not ok:
            return errno.EBADF, 0
        status, result = self._invoke("read", self._read, opened, out)
        if not status and type(result) is int and 0 <= result <= len(out):
            return 0, result
        return self._count("read", status, result, len(out))

    def write(self, open_id: int, data: memoryview) -> tuple[int, int]:
        ok, opened = self._opened(open_id)
        if not ok:
            return errno.EBADF, 0
        data = data if data.readonly else data.toreadonly()
        status, result = self._invoke("write", self._write, opened, data)
        if not status and type(result) is int and 0 <= result <= len(data):
            return 0, result
        return self._count("write", status, result, len(data))

    def seek(self, open_id: int, offset: int, whence: int) -> tuple[int, int]:
        ok, opened = self._opened(open_id)
        if not ok:
            return errno.EBADF, 0
        status, result = self._call("seek", opened, offset, whence)
        return self._count("seek", status, result, _MAX_VALUE)

    def ioctl(self, open_id: int, code: int, inbuf: memoryview, outbuf: memoryview) -> tuple[int, int]:
        ok, opened = self._opened(open_id)
        if not ok:
            return errno.EBADF, 0
        inbuf = inbuf if inbuf.readonly else inbuf.toreadonly()
        status, result = self._invoke("io_control", self._io_control, opened, code, inbuf, outbuf)
        # The good count checked here; _count (and its message, with the code) only for the rest.
        if not status and type(result) is int and 0 <= result <= len(outbuf):
            return 0, result
        return self._count(f"io_control {code:#010x}", status, result, len(outbuf))

    def pre_close(self, open_id: int) -> tuple[int, int]:
        ok, opened = self._opened(open_id)
        if not ok:
            return errno.EBADF, 0
        status, _ = self._call("pre_close", opened)
        return status, 0

    def power(self, up: bool) -> tuple[int, int]:
        if self._unloaded:
            return errno.ENODEV, 0
        status, _ = self._call("power_up" if up else "power_down")
        return status, 0

    def unload(self) -> tuple[int, int]:
        """``pre_deinit`` then ``deinit`` (even if ``pre_deinit`` failed); afterwards every call
        fails with ``EBADF``/``ENODEV``.  A second unload is a no-op."""
        with self._lock:
            if self._unloaded:
                return 0, 0
            self._unloaded = True
            self._handles.clear()
        first, _ = self._call("pre_deinit")
        second, _ = self._call("deinit")
        if first or second:
            self._log(WARNING, f"{self.device} unloaded, but pre_deinit/deinit failed")
        return first or second, 0
