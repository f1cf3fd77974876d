"""A hostile NATIVE driver (tests/native/hostile.c) attacks its host and, through it, the Device
Manager: raw system calls, the i386 ABI, its arena's guard pages and layout descriptor, counts
beyond its buffers, writes after it returned, its own SIGSEGV handler, the host's channel, and a
constructor that runs at dlopen.

Each attack runs in a real sandboxed host of a real Device Manager.  What must hold: whatever the
driver does, it reaches nothing outside its own host -- the Device Manager returns only bytes it
bounded itself, another host keeps answering (``Hammer``), and a host the attack ends is audited
and restarted.  Where the attack is refused, the audit record names the layer.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import sys
import time
from pathlib import Path

import pytest

from adv_kit import DeviceManagerProcess, Hammer, reg_group

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "native"))
import native_build  # noqa: E402

pytestmark = [pytest.mark.needs_sandbox, pytest.mark.slow,
              pytest.mark.skipif(native_build.compiler() is None,
                                 reason="no C compiler (cc) to build the native test drivers")]

SENTINEL = 0xD7B0C5E1
CODE = lambda n: 0x00220000 + 4 * n  # noqa: E731
ECHO, SYSCALL, UNGUARD, ACTUAL, LATE_WRITER, SURVIVE, CLOSE_FDS, INT80, CTOR, WEDGE = (CODE(n) for n in range(10))
ALLOW = '"IoctlAllow"=multi_sz:"0x00220000-0x002200FF"\n"MaxIoSize"=dword:10000'
USER, NAKED = 0x10, 0x8
GROUP = 1
# x86_64 numbers; the attack passes them to syscall(2) as they are.
NR = {"socket": 41, "kexec_load": 246, "process_vm_writev": 311, "bpf": 321, "io_uring_setup": 425,
      "userfaultfd": 323, "ptrace": 101, "getpid": 39}
X32_BIT = 0x40000000


def native_key(name: str, prefix: str, dll: str, flags: int, group: int, order: int) -> str:
    return (f"[HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\{name}]\n\"Dll\"=\"{dll}\"\n\"Prefix\"=\"{prefix}\"\n"
            f"\"Index\"=dword:1\n\"Order\"=dword:{order}\n\"Flags\"=dword:{flags:x}\n"
            f"\"UserProcGroup\"=dword:{group}\n{ALLOW}\n\n")


@pytest.fixture(scope="module")
def native_dm(tmp_path_factory):
    """HST1: the hostile driver alone in group 1 (2 s timeout, restarts without end); ECO1: a
    well-behaved native driver in group 2, the bystander."""
    tmp = tmp_path_factory.mktemp("advnative")
    drivers = tmp / "drivers"
    native_build.build("hostile.c", drivers / "libhostile.so")
    native_build.build("echo.c", drivers / "libnaked.so", "NAKED")
    registry = (native_key("Hostile", "HST", "hostile.dll", USER, GROUP, 1)
                + native_key("Echo", "ECO", "naked.dll", USER | NAKED, 2, 2)
                + reg_group(GROUP, timeout_ms=2000, restart_limit=1000) + reg_group(2))
    dm = DeviceManagerProcess(tmp, registry, driver_dirs=(drivers,)).start()
    yield dm
    dm.stop()


def run(h, code: int, inp: bytes = b"", out: int = 16) -> tuple[int, int]:
    """One attack: (errno it got, value); the sentinel proves the attack code answered."""
    got = h.ioctl(code, inp, out)
    magic, err, value = struct.unpack_from("<IiQ", got)
    assert magic == SENTINEL, f"{code:#x}: the answer did not come from the attack code: {got[:16]!r}"
    return err, value


def raw(name_or_nr, *args: int) -> bytes:
    nr = NR[name_or_nr] if isinstance(name_or_nr, str) else name_or_nr
    return struct.pack("<7Q", nr, *args, *[0] * (6 - len(args)))


def crashes(dm) -> list[dict]:
    return [r for r in dm.audit("host.crashed") if r.get("group") == GROUP]


def crash_with(dm, code: int) -> dict:
    """Send the attack that ends HST1:'s host (EIO to us) while ECO1: is hammered; wait until the
    host is back; its host.crashed record."""
    crashed = len(crashes(dm))
    with Hammer(dm, "ECO1:"):
        with dm.client() as c, c.open("HST1:") as h:
            with pytest.raises(OSError) as exc:
                h.ioctl(code, b"", 16)
            assert exc.value.errno == errno.EIO
        wait_back(dm, crashed)
    return crashes(dm)[-1]


def wait_denied(dm, syscall: str, after: int) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        recs = [r for r in dm.audit("syscall.denied")[after:] if r.get("group") == GROUP
                and r["detail"]["syscall"] == syscall]
        if recs:
            return recs[-1]
        time.sleep(0.05)
    raise AssertionError(f"no syscall.denied for {syscall}; got {dm.audit('syscall.denied')[after:]}")


def wait_back(dm, crashed_before: int) -> None:
    """The attack ended the host: it is audited, restarted and serving again."""
    dm.wait_audit("host.crashed", count=crashed_before + 1, group=GROUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with dm.client() as c, c.open("HST1:") as h:
                assert h.ioctl(ECHO, b"back", 4) == b"back"
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"HST1: did not come back:\n{dm.log()}")


# -- system calls ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, args", [
    ("socket", (2, 1, 0)),                      # AF_INET, SOCK_STREAM
    ("kexec_load", (0, 0, 0, 0)),
    ("process_vm_writev", (1, 0, 0, 0, 0, 0)),  # pid 1: the sandbox's reaper
    ("io_uring_setup", (8, 0)),
    ("userfaultfd", (0,)),
])
def test_a_raw_syscall_outside_the_allowlist_is_refused_and_audited_with_its_args(native_dm, name, args):
    before = len(native_dm.audit("syscall.denied"))
    with native_dm.client() as c, c.open("HST1:") as h:
        err, _ = run(h, SYSCALL, raw(name, *args), 16)
    assert err == errno.EPERM, f"{name}: {errno.errorcode.get(err, err)}, expected EPERM from the filter"
    record = wait_denied(native_dm, name, before)
    assert record["detail"]["args"][:len(args)] == [f"{a:#x}" for a in args], record


CLONE_THREAD_VM_SIGHAND = 0x00010000 | 0x00000100 | 0x00000800


@pytest.mark.parametrize("flag", [0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x40000000],
                         ids=["newns", "newcgroup", "newuts", "newipc", "newnet"])
def test_a_thread_in_a_namespace_of_its_own_is_refused_by_our_filter(native_dm, flag):
    """clone passes the filter only with CLONE_THREAD; with a CLONE_NEW* flag as well it must not
    pass either (the kernel's capability check would refuse it too, but without a record)."""
    before = len(native_dm.audit("syscall.denied"))
    with native_dm.client() as c, c.open("HST1:") as h:
        err, _ = run(h, SYSCALL, raw(56, CLONE_THREAD_VM_SIGHAND | flag), 16)
    assert err == errno.EPERM, errno.errorcode.get(err, err)
    record = wait_denied(native_dm, "clone", before)
    assert record["detail"]["args"][0] == f"{CLONE_THREAD_VM_SIGHAND | flag:#x}", record


def test_the_x32_abi_is_not_a_way_around_the_filter(native_dm):
    """getpid is allowed; its x32 twin (nr | 0x40000000) is another ABI: the kernel kills the host
    for it (the filter's ACT_BADARCH, SIGSYS), and the call never runs."""
    crashed = len(crashes(native_dm))
    with Hammer(native_dm, "ECO1:"):
        with native_dm.client() as c, c.open("HST1:") as h:
            err, pid = run(h, SYSCALL, raw("getpid"), 16)      # the allowed side
            assert err == 0 and pid > 0, (err, pid)
            with pytest.raises(OSError) as exc:
                h.ioctl(SYSCALL, raw(NR["getpid"] | X32_BIT), 16)
            assert exc.value.errno == errno.EIO
        wait_back(native_dm, crashed)
    assert crashes(native_dm)[-1]["detail"]["signal"] == signal.SIGSYS, crashes(native_dm)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="int $0x80 is the i386 ABI of x86_64")
def test_the_i386_abi_kills_the_host_and_only_it(native_dm):
    """int $0x80 enters the kernel as i386, an architecture the filter does not pass: the kernel
    kills the host with SIGSYS (or SIGSEGV where IA-32 emulation is off); the call never runs."""
    crash = crash_with(native_dm, INT80)
    assert crash["detail"]["signal"] in (signal.SIGSYS, signal.SIGSEGV), crash


def test_a_constructor_runs_after_confinement(native_dm):
    """__attribute__((constructor)) runs at dlopen, before Init: the host is confined by then, so
    it can do nothing that Init could not (its socket() was refused by the filter)."""
    with native_dm.client() as c, c.open("HST1:") as h:
        err, _ = run(h, CTOR)
    assert err == errno.EPERM, f"socket() at dlopen got {errno.errorcode.get(err, err)}"
    assert any(r["detail"]["syscall"] == "socket" and r["detail"]["args"][0] == "0x2"
               for r in native_dm.audit("syscall.denied") if r.get("group") == GROUP)


# -- buffers and counts ---------------------------------------------------------------------------

@pytest.mark.parametrize("claimed", [17, 0x7FFFFFFF, 0xFFFFFFFF], ids=["one-more", "int-max", "dword-max"])
def test_a_count_beyond_the_output_fails_the_request_not_the_bounds(native_dm, claimed):
    crashed = len(crashes(native_dm))
    with native_dm.client() as c, c.open("HST1:") as h:
        with pytest.raises(OSError) as exc:
            h.ioctl(ACTUAL, struct.pack("<I", claimed), 16)
        assert exc.value.errno == errno.EIO
        assert len(h.ioctl(ACTUAL, struct.pack("<I", 16), 16)) == 16     # the allowed side: served
        with pytest.raises(OSError) as exc:
            h.read(100)                             # Read returns count + 1
        assert exc.value.errno == errno.EIO
        assert h.ioctl(ECHO, b"still here", 10) == b"still here"
    assert len(crashes(native_dm)) == crashed, "a bad count is the request's failure, not the host's"


def test_output_the_driver_did_not_write_is_zeros_not_another_callers_data(native_dm):
    """The driver reports *actual = 16 without writing its output.  In kernel mode those are the
    zeros of a fresh buffer; in a host they must be too -- not what the request before, maybe
    another user's, left in the same arena slot."""
    secret = b"another caller's"
    with native_dm.client() as a, a.open("HST1:") as ha, native_dm.client() as b, b.open("HST1:") as hb:
        for _ in range(4):
            assert ha.ioctl(ECHO, secret, 16) == secret
            assert hb.ioctl(ACTUAL, struct.pack("<I", 16), 16) == bytes(16)
            with pytest.raises(OSError):
                hb.read(8)                          # Read fills its buffer, then claims one byte more


def test_writes_after_the_return_change_only_its_own_bytes_never_their_number(native_dm):
    """A thread of the driver keeps writing the output after IOControl returned, racing the
    Reflector's copy-out: the client gets exactly the bytes it asked for, each the driver's."""
    data = bytes(range(256)) * 16
    with Hammer(native_dm, "ECO1:"), native_dm.client() as c, c.open("HST1:") as h:
        for _ in range(20):
            got = h.ioctl(LATE_WRITER, data, len(data))
            assert len(got) == len(data)
            assert all(b == 0xEE or b == d for b, d in zip(got, data))
    # Its threads would go on writing into slots later requests use: end this host for the tests
    # after this one.
    crashed = len(crashes(native_dm))
    with native_dm.client() as c, c.open("HST1:") as h, pytest.raises(OSError):
        h.ioctl(CLOSE_FDS, b"", 16)
    wait_back(native_dm, crashed)


def test_unguarding_the_arena_and_overwriting_it_reaches_no_one_else(native_dm):
    """The driver makes its arena's guard pages read-write and overwrites every byte of the arena
    but its own buffers: the other slots, the guard pages, the layout descriptor.  The Device
    Manager reads nothing from the arena but bytes it bounded, and trusts no descriptor: the next
    requests are served exactly, and a host started after this one maps a fresh, intact arena."""
    crashed = len(crashes(native_dm))
    big = os.urandom(9000)
    with Hammer(native_dm, "ECO1:"):
        with native_dm.client() as c, c.open("HST1:") as h:
            err, written = run(h, UNGUARD, b"", 16)
            assert err == 0 and written > 4096, (err, written)   # it did reach past its slot
            assert h.ioctl(ECHO, big, len(big)) == big
        with native_dm.client() as c, c.open("HST1:") as h:
            with pytest.raises(OSError):
                h.ioctl(CLOSE_FDS, b"", 16)         # end this host: the next maps a new arena
        wait_back(native_dm, crashed)
        with native_dm.client() as c, c.open("HST1:") as h:
            assert h.ioctl(ECHO, big, len(big)) == big


def test_a_driver_that_survives_its_guard_page_fault_reaches_only_its_own_arena(native_dm):
    """Its own SIGSEGV handler makes each faulting page writable and returns: it writes through
    the guard page into the next slot and lives on.  Guard pages catch mistakes, not a hostile
    driver (docs/native-drivers.md); what it returns is still bounded by the Reflector."""
    crashed = len(crashes(native_dm))
    with Hammer(native_dm, "ECO1:"), native_dm.client() as c, c.open("HST1:") as h:
        err, written = run(h, SURVIVE, b"", 16)
        assert err == 0 and written > 4096, (err, written)
        assert h.ioctl(ECHO, b"alive", 5) == b"alive"
    assert len(crashes(native_dm)) == crashed


def test_closing_the_hosts_channel_ends_only_its_host(native_dm):
    crash_with(native_dm, CLOSE_FDS)


# -- a host that stops reading its channel --------------------------------------------------------

def test_a_host_that_never_reads_its_kernel_replies_cannot_wedge_the_device_manager(tmp_path):
    """The driver's thread takes the GIL for good (so the host reads nothing more) and writes
    kernel calls to the channel without waiting: the Reflector's answers fill the host's socket.
    With no request in flight nothing times out, and the Reflector's reader blocked for ever in
    its next answer, with every later send to that host (an UNLOAD: the Device Manager's stop hung).
    A host that leaves its channel full must be killed for it, and the Device Manager stop."""
    drivers = tmp_path / "drivers"
    native_build.build("hostile.c", drivers / "libhostile.so")
    dm = DeviceManagerProcess(tmp_path, native_key("Hostile", "HST", "hostile.dll", USER, GROUP, 1)
                              + reg_group(GROUP, timeout_ms=2000), driver_dirs=(drivers,)).start()
    try:
        with dm.client() as c, c.open("HST1:") as h:
            assert run(h, WEDGE, struct.pack("<I", 5000), 16) == (0, 5000)
        # Guards against the hang, not thresholds: the fix needs the Reflector's send bound (~5 s).
        dm.wait_audit("protocol.violation", group=GROUP, timeout=12)
        dm.proc.send_signal(signal.SIGTERM)
        dm.proc.wait(15)
        assert dm.proc.returncode == 0, dm.log()[-3000:]
    finally:
        if dm.proc.poll() is None:
            dm.proc.kill()          # not dm.stop(): it would wait for the hang once more
        dm.stop()


def _running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_wedged_host_dies_with_a_killed_device_manager(tmp_path):
    drivers = tmp_path / "drivers"
    native_build.build("hostile.c", drivers / "libhostile.so")
    dm = DeviceManagerProcess(tmp_path, native_key("Hostile", "HST", "hostile.dll", USER, GROUP, 1)
                              + reg_group(GROUP, timeout_ms=2000), driver_dirs=(drivers,)).start()
    alive = []
    try:
        with dm.client() as c:
            hosts = [(h["pid"], h["reaper_pid"]) for h in c.devices()["hosts"]]
        with dm.client() as c, c.open("HST1:") as h:
            assert run(h, WEDGE, struct.pack("<I", 5000), 16) == (0, 5000)
        time.sleep(1)                  # the wedge takes hold half a second after the reply
        dm.proc.kill()
        dm.proc.wait()
        pids = [p for pair in hosts for p in pair]
        deadline = time.monotonic() + 10     # a guard against waiting for ever, not a threshold
        while time.monotonic() < deadline:
            alive = [p for p in pids if _running(p)]
            if not alive:
                break
            time.sleep(0.05)
    finally:
        for pid in alive:
            os.kill(pid, signal.SIGKILL)      # never leave the orphan behind for the next tests
        dm.stop()
    assert not alive, f"outlived the Device Manager: {alive}"
