"""The native-driver adapter (hosts.native) in this process, through hosts.dispatch.LoadedDriver:
the path a kernel-mode driver takes in the Device Manager.  The drivers are real shared objects
compiled from tests/native/*.c."""

from __future__ import annotations

import errno
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "native"))
import native_build  # noqa: E402

from hosts.dispatch import LoadError, LoadedDriver  # noqa: E402

pytestmark = pytest.mark.skipif(native_build.compiler() is None, reason="no C compiler (cc) to build the native test drivers")

CODE = lambda n: 0x00220000 + 4 * n  # noqa: E731
ECHO, FAIL_LASTERROR, FAIL_ERRNO, WRITE_INPUT, CONTEXT, POWER = CODE(0), CODE(6), CODE(7), CODE(8), CODE(9), CODE(10)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("native")
    return {
        "echo": native_build.build("echo.c", d / "libecho.so"),
        "naked": native_build.build("echo.c", d / "naked" / "libecho.so", "NAKED"),
        "no_deinit": native_build.build("echo.c", d / "nodeinit" / "libecho.so", "NO_DEINIT"),
        "crash": native_build.build("crash.c", d / "libcrash.so"),
    }


def load(path, prefix="ECH", flags=0, device="ECH1:"):
    log = []
    d = LoadedDriver(device, str(path), {"Prefix": prefix, "Flags": flags}, None,
                     lambda level, message: log.append(message))
    return d, log


def out(n):
    return memoryview(bytearray(n))


def ioctl(d, h, code, data=b"", out_len=64):
    buf = out(out_len)
    status, n = d.ioctl(h, code, memoryview(data), buf)
    return status, bytes(buf[:n])


@pytest.mark.parametrize("variant, flags", [("echo", 0), ("naked", 0x8)], ids=["prefixed", "naked"])
def test_stream_interface_round_trip(built, variant, flags):
    d, log = load(built[variant], flags=flags)
    status, h = d.open(0xC0000000, 3)
    assert status == 0 and h
    assert d.write(h, memoryview(b"hello world")) == (0, 11)
    assert d.seek(h, 0, 0) == (0, 0)
    buf = out(5)
    assert d.read(h, buf) == (0, 5) and bytes(buf) == b"hello"
    assert d.seek(h, -5, 2) == (0, 6)
    buf = out(100)
    status, n = d.read(h, buf)
    assert (status, bytes(buf[:n])) == (0, b"world")
    assert ioctl(d, h, ECHO, b"\x01\x02\x03", 2) == (0, b"\x01\x02")
    assert ioctl(d, h, ECHO, b"abc", 0) == (0, b"")
    assert ioctl(d, h, CONTEXT) == (0, b"ECH1:")          # Init's context: the device name
    assert d.close(h) == (0, 0)
    assert d.unload() == (0, 0)
    assert log == []


def test_errors_come_from_getlasterror_then_errno_then_eio(built):
    d, _ = load(built["echo"])
    _, h = d.open(0, 0)
    assert ioctl(d, h, FAIL_LASTERROR, struct.pack("<I", errno.ENOSPC)) == (errno.ENOSPC, b"")
    assert ioctl(d, h, FAIL_ERRNO, struct.pack("<I", errno.EROFS)) == (errno.EROFS, b"")
    assert ioctl(d, h, FAIL_LASTERROR, struct.pack("<I", 0)) == (errno.EIO, b"")      # said nothing
    assert ioctl(d, h, FAIL_LASTERROR, struct.pack("<I", 70000)) == (errno.EIO, b"")  # not an errno
    assert ioctl(d, h, 0x00330000) == (errno.ENOTTY, b"")
    assert d.seek(h, 0, 7) == (errno.EINVAL, 0)          # the driver's own refusal
    assert d.seek(h, 0, 1 << 16) == (errno.EINVAL, 0)    # does not fit a WORD: refused before the call
    assert d.seek(h, -1, 0) == (errno.EINVAL, 0)


def test_power_entries_are_called(built):
    d, _ = load(built["echo"])
    _, h = d.open(0, 0)
    assert d.power(True) == (0, 0) and d.power(True) == (0, 0) and d.power(False) == (0, 0)
    status, got = ioctl(d, h, POWER)
    assert (status, struct.unpack("<II", got)) == (0, (2, 1))


def test_kernel_mode_input_is_a_private_copy(built):
    d, _ = load(built["echo"])
    _, h = d.open(0, 0)
    data = bytearray(b"\x01keep")
    status, _ = d.ioctl(h, WRITE_INPUT, memoryview(data).toreadonly(), out(0))
    assert status == 0 and data == b"\x01keep"     # the driver flipped a byte of its copy only


def test_missing_optional_entries_answer_eopnotsupp(built):
    d, log = load(built["crash"], prefix="CRS", device="CRS1:")
    _, h = d.open(0, 0)
    assert d.read(h, out(4)) == (errno.EOPNOTSUPP, 0)
    assert d.write(h, memoryview(b"x")) == (errno.EOPNOTSUPP, 0)
    assert d.seek(h, 0, 0) == (errno.EOPNOTSUPP, 0)
    assert d.power(True) == (0, 0)                  # PowerUp/PowerDown/PreClose/PreDeinit: nothing to do
    assert d.pre_close(h) == (0, 0)
    assert ioctl(d, h, 0x00220000, b"ok", 2) == (0, b"ok")
    assert d.unload() == (0, 0)


@pytest.mark.parametrize("variant, prefix, flags, symbols", [
    ("no_deinit", "ECH", 0, "ECH_Deinit"),
    ("echo", "XYZ", 0, "XYZ_Init, XYZ_Deinit"),        # the registry's Prefix is not the one built in
    ("echo", "ECH", 0x8, "Init, Deinit"),              # naked entries asked of a prefixed build
])
def test_a_missing_required_entry_names_the_file_and_symbol(built, variant, prefix, flags, symbols):
    with pytest.raises(LoadError) as info:
        load(built[variant], prefix=prefix, flags=flags)
    assert info.value.errno == errno.ENOEXEC
    assert str(built[variant]) in info.value.message
    assert f"does not export {symbols} (required" in info.value.message


def test_a_prefix_that_cannot_name_symbols_is_refused(built):
    with pytest.raises(LoadError) as info:
        load(built["echo"], prefix="E-H")
    assert info.value.errno == errno.EINVAL and "Prefix 'E-H'" in info.value.message


def test_a_file_that_is_not_a_shared_object(tmp_path):
    bogus = tmp_path / "libbogus.so"
    bogus.write_text("not ELF\n")
    with pytest.raises(LoadError) as info:
        load(bogus)
    assert info.value.errno == errno.ENOEXEC
    assert f"cannot load native driver {bogus}" in info.value.message
