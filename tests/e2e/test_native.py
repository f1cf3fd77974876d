"""End-to-end: native drivers (shared objects compiled from tests/native/*.c) under a real Device
Manager, in kernel mode (in its own process) and in user mode (a sandboxed host: seccomp, the
mount view, no capabilities), with the real client.

The same .so passes the same tests in both modes; in a host, a driver writing past its buffer
hits a guard page and the host dies of SIGSEGV, audited and restarted, while another host keeps
answering; a missing required entry fails the load with the .so and the symbol named.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import sys
from pathlib import Path

import pytest

from dm_harness import DeviceManagerProcess, Hammer, check_loopback_stream, reg_driver, reg_group

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "native"))
import native_build  # noqa: E402

pytestmark = [pytest.mark.needs_sandbox, pytest.mark.slow,
              pytest.mark.skipif(native_build.compiler() is None,
                                 reason="no C compiler (cc) to build the native test drivers")]

CODE = lambda n: 0x00220000 + 4 * n  # noqa: E731
ECHO, FAIL_LASTERROR, FAIL_ERRNO, WRITE_INPUT, CONTEXT = CODE(0), CODE(6), CODE(7), CODE(8), CODE(9)
OVR_RUNAWAY = CODE(3)
CRS_NULL = CODE(1)
ALLOW = '"IoctlAllow"=multi_sz:"0x00220000-0x002200FF"\n"MaxIoSize"=dword:10000'
KERNEL, USER, NAKED = 0x0, 0x10, 0x8


def native_key(name: str, prefix: str, dll: str, flags: int, group: int | None = 1, order: int = 1) -> str:
    return (f"[HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\{name}]\n\"Dll\"=\"{dll}\"\n\"Prefix\"=\"{prefix}\"\n"
            f"\"Index\"=dword:1\n\"Order\"=dword:{order}\n\"Flags\"=dword:{flags:x}\n"
            + (f"\"UserProcGroup\"=dword:{group}\n" if group is not None else "") + ALLOW + "\n\n")


@pytest.fixture
def drivers(tmp_path):
    """A driver directory with every test driver built: libecho.so, libnaked.so (echo.c with
    unprefixed entries), libnodeinit.so (echo.c without ECH_Deinit), liboverrun.so, libcrash.so."""
    d = tmp_path / "drivers"
    native_build.build("echo.c", d / "libecho.so")
    native_build.build("echo.c", d / "libnaked.so", "NAKED")
    native_build.build("echo.c", d / "libnodeinit.so", "NO_DEINIT")
    native_build.build("overrun.c", d / "liboverrun.so")
    native_build.build("crash.c", d / "libcrash.so")
    return d


@pytest.fixture
def start_dm(tmp_path, drivers):
    running = []

    def start(registry: str, **kw) -> DeviceManagerProcess:
        dm = DeviceManagerProcess(tmp_path, registry, driver_dirs=(drivers,), **kw).start()
        running.append(dm)
        return dm
    yield start
    for dm in running:
        dm.stop()


@pytest.mark.parametrize("flags", [KERNEL, USER, USER | NAKED], ids=["kernel", "user", "user-naked"])
def test_the_same_so_passes_the_same_tests_in_both_modes(start_dm, flags):
    dll = "naked.dll" if flags & NAKED else "echo.dll"
    dm = start_dm(native_key("Echo", "ECH", dll, flags) + reg_group(1))
    with dm.client() as c:
        info = {d["name"]: d for d in c.devices()["devices"]}
        assert info["ECH1:"]["mode"] == ("user" if flags & USER else "kernel")
        assert info["ECH1:"]["state"] == "running", dm.log()
        with c.open("ECH1:") as h:
            check_loopback_stream(h)
            assert h.ioctl(CONTEXT, b"", out_size=64) == b"ECH1:"
            big = os.urandom(9000)            # an IOCTL's buffers through the arena in user mode
            assert h.ioctl(ECHO, big, out_size=9000) == big
            for code, err in ((FAIL_LASTERROR, errno.ENOSPC), (FAIL_ERRNO, errno.EROFS)):
                with pytest.raises(OSError) as exc:
                    h.ioctl(code, struct.pack("<I", err), 0)
                assert exc.value.errno == err


@pytest.mark.parametrize("dll, prefix, code, inp", [
    ("overrun.dll", "OVR", OVR_RUNAWAY, b""),             # runs off its output into the guard page
    ("crash.dll", "CRS", CRS_NULL, b""),                  # NULL dereference
    ("echo.dll", "ECH", WRITE_INPUT, b"\x00" * 8192),     # writes its (whole-page) input
], ids=["overrun", "null", "input"])
def test_a_native_fault_kills_only_its_host(start_dm, dll, prefix, code, inp):
    # The neighbour is the naked build, so that its name (ECO1:) differs from every bad one's.
    registry = (native_key("Bad", prefix, dll, USER, group=1)
                + native_key("Echo", "ECO", "naked.dll", USER | NAKED, group=2, order=2)
                + reg_group(1, timeout_ms=3000) + reg_group(2))
    dm = start_dm(registry)
    with Hammer(dm, "ECO1:"):
        with dm.client() as c, c.open(f"{prefix}1:") as h:
            with pytest.raises(OSError) as exc:
                h.ioctl(code, inp, 16)
            assert exc.value.errno == errno.EIO
        crashed = dm.wait_audit("host.crashed", group=1)
        assert crashed[0]["detail"]["signal"] == signal.SIGSEGV, crashed
        dm.wait_audit("host.restarted", group=1)
        dm.wait_state(f"{prefix}1:", "running")
        with dm.client() as c, c.open(f"{prefix}1:") as h:
            assert h.ioctl(ECHO, b"back", 4) == b"back"
    assert all(r["group"] == 1 for r in dm.audit("host.crashed"))


def test_a_missing_required_entry_is_a_load_error_naming_the_so_and_symbol(start_dm):
    registry = (native_key("Broken", "ECH", "nodeinit.dll", USER, group=1) + reg_group(1, restart_limit=1)
                + native_key("Echo", "ECO", "naked.dll", USER | NAKED, group=2, order=2) + reg_group(2))
    dm = start_dm(registry)
    dm.wait_state("ECH1:", "quarantined")
    log = dm.log()
    assert "libnodeinit.so does not export ECH_Deinit (required" in log, log
    with dm.client() as c:
        with pytest.raises(OSError) as exc:
            c.open("ECH1:")
        assert exc.value.errno == errno.ENODEV
        with c.open("ECO1:") as h:             # the other host loaded its driver all the same
            assert h.ioctl(ECHO, b"fine", 4) == b"fine"


def test_the_policy_pins_the_so_itself(tmp_path, drivers):
    """A .so replaced after its policy was signed is refused (module-mismatch): the hash covers the
    shared object, as it covers a Python module."""
    dm = DeviceManagerProcess(tmp_path, native_key("Echo", "ECH", "echo.dll", USER) + reg_group(1),
                              driver_dirs=(drivers,))
    native_build.build("echo.c", drivers / "libecho.so", "NO_DEINIT")      # different code, same name
    try:
        dm.start()
        dm.wait_state("ECH1:", "rejected")
        rejected = dm.wait_audit("policy.rejected", device="ECH1:")
        assert rejected[0]["detail"]["reason"] == "module-mismatch", rejected
    finally:
        dm.stop()
