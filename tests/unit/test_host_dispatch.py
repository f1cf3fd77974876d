"""LoadedDriver (hosts.dispatch), the loader and the registry view, in process, against the
test drivers of tests/drivers: harmless ones work, every misbehaviour fails only its request."""

import errno
import mmap
from pathlib import Path

import pytest

from hosts import DriverError, StreamDriver
from hosts.api import ERROR
from hosts.dispatch import MAX_OPEN, LoadedDriver, LoadError, describe
from hosts.ioctl import ctl_code, pack_out, unpack_in
from hosts.loader import load_module
from hosts.registry_view import RegistryView, from_wire

DRIVERS = Path(__file__).resolve().parent.parent / "drivers"


class Log(list):
    def __call__(self, level, message):
        self.append((level, message))


def load(name, registry=None, device="TST1:"):
    log = Log()
    driver = LoadedDriver(device, str(DRIVERS / name), registry or {}, kernel=None, log=log)
    return driver, log


def buf(n):
    return memoryview(bytearray(n))


# -- the harmless echo driver ---------------------------------------------------------------------

def test_echo_round_trip():
    d, log = load("echo.py")
    status, h = d.open(3, 0)
    assert status == 0 and h > 0
    assert d.write(h, memoryview(b"hello")) == (0, 5)
    out = buf(16)
    assert d.read(h, out) == (0, 5)
    assert bytes(out[:5]) == b"hello"
    assert d.seek(h, 7, 0) == (0, 7)
    out = buf(8)
    assert d.ioctl(h, 0x80002000, memoryview(b"abc"), out) == (0, 3)
    assert bytes(out[:3]) == b"abc"
    assert d.close(h) == (0, 0)
    assert log == []


def test_echo_sees_device_and_case_insensitive_registry():
    d, _ = load("echo.py", {"BaudRate": 9600}, device="COM7:")
    _, h = d.open(0, 0)
    out = buf(16)
    status, n = d.ioctl(h, 0x80002004, memoryview(b""), out)
    assert (status, bytes(out[:n])) == (0, b"COM7:")
    status, n = d.ioctl(h, 0x80002008, memoryview(b"baudrate"), out)
    assert (status, bytes(out[:n])) == (0, b"9600")
    assert d.ioctl(h, 0x80002008, memoryview(b"Missing"), out) == (errno.ENOENT, 0)


def test_power_and_unload():
    d, log = load("echo.py")
    assert d.power(True) == (0, 0)
    assert d.power(False) == (0, 0)
    assert d.driver.power == ["up", "down"]
    _, h = d.open(0, 0)
    assert d.pre_close(h) == (0, 0)
    assert d.unload() == (0, 0)
    assert d.driver.deinit_called
    assert d.read(h, buf(4)) == (errno.EBADF, 0)
    assert d.open(0, 0) == (errno.ENODEV, 0)
    assert d.power(True) == (errno.ENODEV, 0)
    assert d.unload() == (0, 0)  # twice is harmless


def test_driver_gets_readonly_input_even_from_writable_buffer():
    d, log = load("misbehave.py")
    _, h = d.open(0, 0)
    writable = bytearray(b"\x01\x02")
    assert d.ioctl(h, 9, memoryview(writable), buf(4)) == (errno.EIO, 0)
    assert writable == b"\x01\x02"
    assert "TypeError" in log[-1][1]


# -- handles ------------------------------------------------------------------------------------

def test_unknown_open_id_is_ebadf_for_every_call():
    d, _ = load("echo.py")
    for call in (lambda: d.close(99), lambda: d.read(99, buf(1)), lambda: d.write(99, memoryview(b"x")),
                 lambda: d.seek(99, 0, 0), lambda: d.ioctl(99, 0x80002000, memoryview(b""), buf(1)),
                 lambda: d.pre_close(99)):
        assert call() == (errno.EBADF, 0)


def test_closed_handle_is_gone_and_ids_are_distinct():
    d, _ = load("echo.py")
    ids = {d.open(0, 0)[1] for _ in range(10)}
    assert len(ids) == 10 and 0 not in ids
    h = ids.pop()
    assert d.close(h) == (0, 0)
    assert d.close(h) == (errno.EBADF, 0)


def test_open_handles_are_limited():
    d, _ = load("plain.py")
    for _ in range(MAX_OPEN):
        assert d.open(0, 0)[0] == 0
    assert d.open(0, 0) == (errno.EMFILE, 0)


# -- hostile behaviour: each fails its request only -----------------------------------------------

@pytest.mark.parametrize("code, expected, logged", [
    (1, errno.ENOSPC, None),
    (2, errno.EIO, "ValueError: driver bug"),
    (3, errno.EIO, "ValueError"),           # slice assignment past the end of the view
    (4, errno.EIO, "returned 9"),
    (5, errno.EIO, "returned '3'"),
    (6, errno.EIO, "returned 3.0"),
    (7, errno.EIO, "returned True"),
    (8, errno.EIO, "SystemExit"),
    (9, errno.EIO, "TypeError"),
    (10, errno.EIO, "DriverError with errno 'x'"),
    (11, errno.EIO, "returned -1"),
    (14, errno.EIO, "KeyboardInterrupt"),
    (15, errno.EIO, "returned None"),
])
def test_misbehaving_ioctl_fails_that_request_only(code, expected, logged):
    d, log = load("misbehave.py")
    _, h = d.open(0, 0)
    out = buf(8)
    assert d.ioctl(h, code, memoryview(b"in"), out) == (expected, 0)
    if logged is None:
        assert log == []
    else:
        assert log and log[-1][0] == ERROR and logged in log[-1][1]
        assert "TST1:" in log[-1][1]
    # ... and the driver goes on serving
    assert d.ioctl(h, 16, memoryview(b""), out) == (0, 8)
    assert bytes(out) == b"\x55" * 8


def test_driver_error_with_out_of_range_errno_is_eio():
    d, log = load("misbehave.py")
    _, h = d.open(0, 0)
    assert d.ioctl(h, 10, memoryview(b"0"), buf(1)) == (errno.EIO, 0)
    assert d.ioctl(h, 10, memoryview(b"99999"), buf(1)) == (errno.EIO, 0)
    assert d.ioctl(h, 10, memoryview(b"22"), buf(1)) == (errno.EINVAL, 0)


def test_write_past_end_of_out_never_touches_memory_beyond_it():
    d, log = load("misbehave.py")
    _, h = d.open(0, 0)
    backing = bytearray(b"\x00" * 8 + b"GUARD")
    assert d.read(h, memoryview(backing)[:8]) == (errno.EIO, 0)
    assert d.ioctl(h, 3, memoryview(b""), memoryview(backing)[:8]) == (errno.EIO, 0)
    assert backing[8:] == b"GUARD"
    assert "IndexError" in log[0][1] and "misbehave.py" in log[0][1]


def test_bogus_write_and_seek_results_are_eio():
    d, log = load("misbehave.py")
    _, h = d.open(0, 0)
    assert d.write(h, memoryview(b"abc")) == (errno.EIO, 0)
    assert d.seek(h, 0, 0) == (errno.EIO, 0)
    assert "write returned 4; expected an int from 0 to 3" in log[0][1]


def test_kept_view_from_mmap_is_unusable_once_released():
    # What the host does after each request: release the views; a driver that kept one fails.
    d, log = load("misbehave.py")
    _, h = d.open(0, 0)
    arena = mmap.mmap(-1, 4096)
    out = memoryview(arena)[0:16]
    assert d.ioctl(h, 12, memoryview(b""), out) == (0, 0)
    out.release()
    assert d.ioctl(h, 13, memoryview(b""), buf(1)) == (errno.EIO, 0)
    assert arena[0] == 0
    assert "released" in log[-1][1]


def test_missing_methods_fall_back_to_defaults():
    d, log = load("plain.py")
    _, h = d.open(0, 0)
    out = buf(4)
    assert d.read(h, out) == (0, 2)
    assert d.write(h, memoryview(b"x")) == (errno.EOPNOTSUPP, 0)
    assert d.ioctl(h, 1, memoryview(b""), out) == (errno.EOPNOTSUPP, 0)
    assert d.power(True) == (0, 0)
    assert d.close(h) == (0, 0)
    assert d.unload() == (0, 0)
    assert log == []


def test_package_driver_with_relative_import():
    d, _ = load("pkgdriver")
    _, h = d.open(0, 0)
    out = buf(32)
    status, n = d.read(h, out)
    assert (status, bytes(out[:n])) == (0, b"from a package")


# -- load failures ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, code, words", [
    ("no_driver.py", errno.ENOEXEC, "defines no class Driver"),
    ("import_fails.py", errno.ENOEXEC, "RuntimeError: this driver module cannot be imported"),
    ("init_fails.py", errno.ENXIO, "init failed with ENXIO"),
    ("ctor_fails.py", errno.EIO, "ZeroDivisionError: constructor"),
    ("missing.py", errno.ENOENT, "missing.py does not exist"),
    ("libnative.so", errno.ENOENT, "native driver"),
])
def test_load_failures_name_the_module_and_reason(name, code, words):
    with pytest.raises(LoadError) as info:
        load(name)
    assert info.value.errno == code
    assert words in info.value.message


def test_loader_refuses_other_files_and_taken_names(tmp_path):
    other = tmp_path / "driver.txt"
    other.write_text("x")
    with pytest.raises(ImportError, match="not a .py module"):
        load_module(str(other), "drvbox_test_txt")
    module = load_module(str(DRIVERS / "plain.py"), "drvbox_test_taken")
    assert module.Driver
    with pytest.raises(ImportError, match="already taken"):
        load_module(str(DRIVERS / "plain.py"), "drvbox_test_taken")


def test_loader_writes_no_bytecode(tmp_path):
    (tmp_path / "d.py").write_text("class Driver: pass\n")
    load_module(str(tmp_path / "d.py"), "drvbox_test_nobytecode")
    assert not (tmp_path / "__pycache__").exists()


def test_failed_import_leaves_no_module_behind():
    import sys
    with pytest.raises(RuntimeError):
        load_module(str(DRIVERS / "import_fails.py"), "drvbox_test_failed")
    assert "drvbox_test_failed" not in sys.modules


def test_describe_names_the_innermost_frame():
    def inner():
        raise KeyError("k")
    try:
        inner()
    except KeyError as exc:
        text = describe(exc)
    assert text.startswith("KeyError: 'k' (at ") and "in inner)" in text


# -- the registry view --------------------------------------------------------------------------

def test_registry_from_wire_types():
    view = from_wire({
        "Irq": {"type": "dword", "data": 5},
        "Prefix": {"type": "sz", "data": "COM"},
        "IoctlAllow": {"type": "multi_sz", "data": ["0x1", "0x2"]},
        "Mac": {"type": "binary", "data": "0a0b"},
        "Big": {"type": "qword", "data": 1 << 40},
        "Resources": {"type": "hex(8)", "data": "ff00"},
    })
    assert view["irq"] == 5 and view["IRQ"] == 5
    assert view["prefix"] == "COM"
    assert view["ioctlallow"] == ("0x1", "0x2")
    assert view["mac"] == b"\x0a\x0b"
    assert view["big"] == 1 << 40
    assert view["resources"] == b"\xff\x00"
    assert sorted(view) == ["Big", "IoctlAllow", "Irq", "Mac", "Prefix", "Resources"]
    assert "IRQ" in view and "nope" not in view and 5 not in view


def test_registry_view_is_read_only():
    view = from_wire({"Irq": {"type": "dword", "data": 5}})
    with pytest.raises(TypeError):
        view["Irq"] = 6
    with pytest.raises(AttributeError):
        view.other = 1


@pytest.mark.parametrize("values, words", [
    ({"A": {"type": "dword", "data": -1}}, "unsigned 32-bit"),
    ({"A": {"type": "dword", "data": 1 << 32}}, "unsigned 32-bit"),
    ({"A": {"type": "dword", "data": True}}, "unsigned 32-bit"),
    ({"A": {"type": "sz", "data": 1}}, "not a string"),
    ({"A": {"type": "multi_sz", "data": "x"}}, "not a list of strings"),
    ({"A": {"type": "binary", "data": "zz"}}, "not valid hex"),
    ({"A": {"type": "link", "data": ""}}, "unknown type 'link'"),
    ({"A": {"type": "hex(zz)", "data": ""}}, "unknown type 'hex(zz)'"),
    ({"A": {"type": "sz"}}, "expected {'type'"),
    ({"A": 5}, "expected {'type'"),
    ({"A": {"type": "sz", "data": "1"}, "a": {"type": "sz", "data": "2"}}, "given twice"),
])
def test_registry_from_wire_refuses(values, words):
    with pytest.raises(ValueError) as info:
        from_wire(values)
    assert words in str(info.value)
    assert "'A'" in str(info.value) or "'a'" in str(info.value)


def test_registry_from_wire_needs_an_object():
    with pytest.raises(ValueError, match="must be an object"):
        from_wire([1])


def test_registry_view_plain_mapping_is_wrapped():
    d, _ = load("echo.py", {"Mixed": 1})
    assert isinstance(d.ctx.registry, RegistryView)
    assert d.ctx.registry["MIXED"] == 1


# -- the public API ---------------------------------------------------------------------------

def test_stream_driver_defaults():
    s = StreamDriver()
    assert s.open(0, 0) is None
    for call in (lambda: s.read(None, buf(1)), lambda: s.write(None, memoryview(b"")),
                 lambda: s.seek(None, 0, 0), lambda: s.io_control(None, 1, memoryview(b""), buf(1))):
        with pytest.raises(DriverError) as info:
            call()
        assert info.value.errno == errno.EOPNOTSUPP


def test_driver_error_carries_errno():
    exc = DriverError(errno.EBUSY)
    assert exc.errno == errno.EBUSY and "EBUSY" in str(exc)


# -- hosts.ioctl ----------------------------------------------------------------------------------

def test_ctl_code_matches_ce():
    assert ctl_code(0x1B, 1) == 0x001B0004            # IOCTL_SERIAL_SET_BAUD_RATE
    assert ctl_code(0x07, 0) == 0x00070000            # IOCTL_DISK_GET_GEOMETRY
    assert ctl_code(0x07, 0x17, 0, 1) == 0x0007405C   # IOCTL_DISK_GET_LENGTH_INFO
    with pytest.raises(ValueError):
        ctl_code(0x10000, 0)
    with pytest.raises(ValueError):
        ctl_code(0x22, 0x1000)


def test_buffer_helpers_accept_exact_input_and_room_enough():
    assert unpack_in(memoryview(b"\x01\x00\x00\x00"), "<I") == (1,)
    out = bytearray(6)
    assert pack_out(memoryview(out), "<I", 0xAABBCCDD) == 4
    assert out == b"\xdd\xcc\xbb\xaa\x00\x00"


def test_buffer_helpers_refuse_wrong_sizes():
    with pytest.raises(DriverError) as info:
        unpack_in(memoryview(b"abc"), "<I")
    assert info.value.errno == errno.EINVAL
    with pytest.raises(DriverError) as info:
        pack_out(memoryview(bytearray(3)), "<I", 1)
    assert info.value.errno == errno.ENOBUFS


def test_init_failure_carries_the_drivers_message(tmp_path):
    (tmp_path / "d.py").write_text(
        "import errno\nfrom hosts import DriverError\n"
        "class Driver:\n    def init(self, ctx):\n        raise DriverError(errno.EINVAL, 'IoBase missing')\n")
    with pytest.raises(LoadError) as info:
        LoadedDriver("X1:", str(tmp_path / "d.py"), {}, None, Log())
    assert info.value.errno == errno.EINVAL
    assert info.value.message == "X1: init failed with EINVAL: IoBase missing"
