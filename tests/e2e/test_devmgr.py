"""End-to-end: a real Device Manager, real sandboxed hosts, the real client.

Each errno of the client contract is produced by a real situation; each way a driver can fail
is contained in its own host, audited, and followed by a restart while other hosts keep serving.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import time

import pytest

from dm_harness import ROOT, TEST_DRIVERS, DeviceManagerProcess, Hammer, check_loopback_stream, reg_driver, reg_group

pytestmark = [pytest.mark.needs_sandbox, pytest.mark.slow]

B = 0x00220000
ECHO, SEGV, EXIT, LOOP, BOMB, SLEEP, RAISE = B, B + 4, B + 8, B + 0xC, B + 0x10, B + 0x14, B + 0x18
FORGE_REPLY, FORGE_ID, SEND_FD, FLOOD, GARBAGE, SYSCALL = B + 0x1C, B + 0x20, B + 0x24, B + 0x28, B + 0x2C, B + 0x30
SYSCALL_FLOOD = B + 0x34
DENIED = 0x00330000
ALLOW = '"IoctlAllow"=multi_sz:"0x00220000-0x002200FF"\n"MaxIoSize"=dword:10000'


@pytest.fixture
def start_dm(tmp_path):
    running = []

    def start(registry: str, **kw) -> DeviceManagerProcess:
        dm = DeviceManagerProcess(tmp_path, registry, **kw).start()
        running.append(dm)
        return dm
    yield start
    for dm in running:
        dm.stop()


def two_hosts(**group1) -> str:
    """FLT1: (group 1, the one we break) and OKY1: (group 2, which must not notice)."""
    return (reg_driver("Faulty", "FLT", group=1, extra=ALLOW) + reg_driver("Steady", "OKY", group=2, order=2, extra=ALLOW)
            + reg_group(1, **group1) + reg_group(2))


# -- the same module, the same behaviour, in both modes ---------------------------------------

@pytest.mark.parametrize("user", [False, True], ids=["kernel", "user"])
def test_stream_interface_is_the_same_in_both_modes(start_dm, user):
    dm = start_dm(reg_driver("Loop", "LPB", user=user, extra=ALLOW) + reg_group(1))
    with dm.client() as c:
        info = {d["name"]: d for d in c.devices()["devices"]}
        assert info["LPB1:"]["mode"] == ("user" if user else "kernel")
        with c.open("LPB1:") as h:
            check_loopback_stream(h)
            with pytest.raises(OSError) as exc:
                h.ioctl(RAISE, struct.pack("<I", errno.ENOSPC), 0)
            assert exc.value.errno == errno.ENOSPC


# -- the errno contract ------------------------------------------------------------------------

def test_errno_contract(start_dm):
    dm = start_dm(two_hosts(timeout_ms=1500))
    with dm.client() as c:
        with pytest.raises(OSError) as exc:
            c.open("NOPE1:")
        assert exc.value.errno == errno.ENODEV
        with c.open("FLT1:") as h:
            with pytest.raises(OSError) as exc:
                h.ioctl(DENIED, b"", 0)
            assert exc.value.errno == errno.EACCES
            with pytest.raises(OSError) as exc:
                h.write(b"x" * 0x10001)
            assert exc.value.errno == errno.EMSGSIZE
            # A code allowed once (and remembered so) is still held to MaxIoSize; a denied one
            # stays denied, and is audited each time.
            assert h.ioctl(ECHO, b"ok", 2) == b"ok"
            with pytest.raises(OSError) as exc:
                h.ioctl(ECHO, b"x" * 0x10001, 2)
            assert exc.value.errno == errno.EMSGSIZE
            with pytest.raises(OSError) as exc:
                h.ioctl(DENIED, b"", 0)
            assert exc.value.errno == errno.EACCES
            assert len(dm.wait_audit("policy.denied", count=3, device="FLT1:")) >= 3
            with pytest.raises(OSError) as exc:
                h.ioctl(SLEEP, struct.pack("<I", 5000), 0)
            assert exc.value.errno == errno.ETIMEDOUT
    dm.wait_audit("host.timeout")
    dm.wait_audit("policy.denied")
    dm.wait_state("FLT1:", "running")
    with dm.client() as c:
        h = c.open("FLT1:")
        with pytest.raises(OSError) as exc:
            h.ioctl(EXIT, b"", 0)
        assert exc.value.errno == errno.EIO
        dm.wait_state("FLT1:", "running")
        with pytest.raises(OSError) as exc:
            h.read(1)
        assert exc.value.errno == errno.ESTALE
        with c.open("FLT1:") as h2:
            assert h2.ioctl(ECHO, b"ok", 2) == b"ok"


def test_policy_rejected_device_answers_enodev(start_dm, tmp_path):
    registry = two_hosts()
    dm = DeviceManagerProcess(tmp_path, registry)
    tampered = dm.policies / "Faulty.json"
    envelope = tampered.read_text()
    tampered.write_text(envelope.replace('"payload": "', '"payload": "A', 1))
    dm.start()
    try:
        with dm.client() as c:
            states = {d["name"]: d["state"] for d in c.devices()["devices"]}
            assert states == {"FLT1:": "rejected", "OKY1:": "running"}
            with pytest.raises(OSError) as exc:
                c.open("FLT1:")
            assert exc.value.errno == errno.ENODEV
            with c.open("OKY1:") as h:
                assert h.ioctl(ECHO, b"x", 1) == b"x"
        rejected = dm.wait_audit("policy.rejected")
        assert rejected[0]["device"] == "FLT1:"
    finally:
        dm.stop()


def test_a_kernel_mode_driver_that_fails_to_load_is_listed_and_the_others_load(start_dm):
    # In the Device Manager's own process there is no host to restart: a module that does not
    # import or an init that fails leaves its device not loaded (ENODEV), audited, and nothing else.
    registry = (reg_driver("Broken", "BRK", "init_fails.dll", user=False, group=None)
                + reg_driver("NoImport", "NIM", "import_fails.dll", user=False, group=None, order=2)
                + reg_driver("Steady", "OKY", user=False, group=None, order=3, extra=ALLOW))
    dm = start_dm(registry, driver_dirs=(TEST_DRIVERS, ROOT / "tests" / "drivers"))
    with dm.client() as c:
        devices = {d["name"]: d for d in c.devices()["devices"]}
        assert {n: (d["state"], d["mode"]) for n, d in devices.items()} == {
            "BRK1:": ("rejected", "kernel"), "NIM1:": ("rejected", "kernel"), "OKY1:": ("running", "kernel")}
        for name in ("BRK1:", "NIM1:"):
            with pytest.raises(OSError) as exc:
                c.open(name)
            assert exc.value.errno == errno.ENODEV
        with c.open("OKY1:") as h:
            assert h.ioctl(ECHO, b"x", 1) == b"x"
    failed = {r["device"]: r["detail"] for r in dm.wait_audit("driver.failed", count=2)}
    assert failed["BRK1:"]["errno"] == "ENXIO" and "init failed" in failed["BRK1:"]["detail"]
    assert failed["NIM1:"]["errno"] == "ENOEXEC" and "cannot be imported" in failed["NIM1:"]["detail"]
    assert "Traceback" not in dm.log()


def test_trusted_caller_only_and_allow_users(start_dm):
    registry = (reg_driver("Owner", "OWN", group=1, extra=ALLOW + '\n"AllowUsers"=multi_sz:"4242"')
                + reg_group(1))
    dm = start_dm(registry)
    if os.getuid() == 4242:
        pytest.skip("the test runs as uid 4242, the one allowed user")
    with dm.client() as c:
        with pytest.raises(OSError) as exc:
            c.open("OWN1:")
        assert exc.value.errno == errno.EACCES
    denied = dm.wait_audit("client.denied")
    assert denied[0]["detail"]["uid"] == os.getuid()


# -- crashes are contained, audited, restarted; other hosts do not notice -----------------------

@pytest.mark.parametrize("code,expect", [(SEGV, {"signal": signal.SIGSEGV}), (EXIT, {"exit_code": 3}),
                                         (LOOP, {"signal": signal.SIGKILL})],
                         ids=["segfault", "exit", "infinite-loop"])
def test_crash_is_contained_and_restarted(start_dm, code, expect):
    dm = start_dm(two_hosts(timeout_ms=1000))
    with Hammer(dm):
        with dm.client() as c, c.open("FLT1:") as h:
            with pytest.raises(OSError) as exc:
                h.ioctl(code, b"", 0)
            assert exc.value.errno == (errno.ETIMEDOUT if code == LOOP else errno.EIO)
        crashed = dm.wait_audit("host.crashed", group=1)
        for k, v in expect.items():
            assert crashed[0]["detail"][k] == v, crashed
        dm.wait_audit("host.restarted", group=1)
        dm.wait_state("FLT1:", "running")
        with dm.client() as c, c.open("FLT1:") as h:
            assert h.ioctl(ECHO, b"back", 4) == b"back"
    assert not dm.audit("host.crashed") or all(r["group"] == 1 for r in dm.audit("host.crashed"))


def test_memory_bomb_ends_in_its_own_host(start_dm):
    dm = start_dm(two_hosts(extra='"MemoryLimit"=dword:80'))
    with Hammer(dm):
        with dm.client() as c, c.open("FLT1:") as h:
            with pytest.raises(OSError) as exc:
                h.ioctl(BOMB, b"", 0)
            assert exc.value.errno == errno.EIO
        dm.wait_state("FLT1:", "running")
        with dm.client() as c, c.open("FLT1:") as h:
            assert h.ioctl(ECHO, b"ok", 2) == b"ok"


def test_quarantine_after_restart_limit_and_restart_lifts_it(start_dm):
    dm = start_dm(two_hosts(restart_limit=2))
    for _ in range(3):
        dm.wait_state("FLT1:", "running")
        with dm.client() as c, c.open("FLT1:") as h:
            with pytest.raises(OSError):
                h.ioctl(EXIT, b"", 0)
    dm.wait_state("FLT1:", "quarantined")
    dm.wait_audit("driver.quarantined", device="FLT1:")
    with dm.client() as c:
        with pytest.raises(OSError) as exc:
            c.open("FLT1:")
        assert exc.value.errno == errno.ENODEV
        with c.open("OKY1:") as h:
            assert h.ioctl(ECHO, b"x", 1) == b"x"
        c.restart("FLT1:")
    dm.wait_state("FLT1:", "running")
    with dm.client() as c, c.open("FLT1:") as h:
        assert h.ioctl(ECHO, b"y", 1) == b"y"


def test_a_driver_that_keeps_crashing_a_shared_host_gets_its_own(start_dm):
    registry = (reg_driver("Faulty", "FLT", group=1, extra=ALLOW)
                + reg_driver("Neighbour", "NBR", group=1, order=2, extra=ALLOW) + reg_group(1, restart_limit=10))
    dm = start_dm(registry)
    for _ in range(2):
        dm.wait_state("FLT1:", "running")
        with dm.client() as c, c.open("FLT1:") as h:
            with pytest.raises(OSError):
                h.ioctl(EXIT, b"", 0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with dm.client() as c:
            hosts = c.devices()["hosts"]
        if any(h["devices"] == ["FLT1:"] for h in hosts) and any(h["devices"] == ["NBR1:"] for h in hosts):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"FLT1: was not moved into a host of its own: {hosts}")
    dm.wait_state("FLT1:", "running")
    dm.wait_state("NBR1:", "running")


# -- the host channel is hostile ----------------------------------------------------------------

@pytest.mark.parametrize("code,event", [(FORGE_REPLY, "buffer.violation"), (FORGE_ID, "protocol.violation"),
                                        (SEND_FD, "protocol.violation"), (FLOOD, "protocol.violation"),
                                        (GARBAGE, "protocol.violation")],
                         ids=["oversized-reply", "forged-id", "smuggled-fd", "flood", "garbage"])
def test_hostile_host_is_killed_and_others_go_on(start_dm, code, event):
    dm = start_dm(two_hosts())
    with Hammer(dm):
        with dm.client() as c, c.open("FLT1:") as h:
            with pytest.raises(OSError) as exc:
                h.ioctl(code, b"", 16)
            assert exc.value.errno == errno.EIO
        dm.wait_audit(event, group=1)
        dm.wait_audit("host.crashed", group=1)
        dm.wait_state("FLT1:", "running")


def test_denied_syscall_is_reported_by_name(start_dm):
    dm = start_dm(two_hosts())
    with dm.client() as c, c.open("FLT1:") as h:
        out = h.ioctl(SYSCALL, b"", 4)
    assert struct.unpack("<I", out)[0] == errno.EPERM
    recs = dm.wait_audit("syscall.denied", group=1)
    assert any(r["detail"]["syscall"] == "socket" for r in recs)


# -- the end --------------------------------------------------------------------------------------

def test_sigterm_stops_cleanly_and_leaves_no_host_behind(start_dm):
    dm = start_dm(two_hosts())
    pids = dm.host_pids()
    assert len(pids) == 2
    assert dm.stop() == 0
    time.sleep(0.2)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_ctrl_c_stops_everything_in_order(start_dm):
    """Ctrl-C at a terminal is SIGINT to the whole foreground process group: the Device Manager
    stops in order, its hosts' launchers do not die of it on their own, nothing is left."""
    dm = start_dm(two_hosts())
    pids = dm.host_pids()
    os.killpg(dm.proc.pid, signal.SIGINT)
    assert dm.proc.wait(20) == 0
    log = dm.log()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert "drvbox: stopping" in log
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_sigkill_of_the_device_manager_leaves_no_orphan(start_dm):
    dm = start_dm(two_hosts())
    with dm.client() as c:
        inner = [h["pid"] for h in c.devices()["hosts"]]
    dm.proc.kill()
    dm.proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in inner):
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{p}") for p in inner)


def test_audit_verify_detects_a_one_byte_edit(start_dm):
    from reflector.cli import main
    dm = start_dm(two_hosts())
    dm.stop()
    assert main(["--state-dir", str(dm.state), "audit", "verify"]) == 0
    log = dm.state / "audit.log"
    data = bytearray(log.read_bytes())
    i = data.index(b'"event"')
    data[i + 10] ^= 0x01
    log.write_bytes(bytes(data))
    assert main(["--state-dir", str(dm.state), "audit", "verify"]) != 0


def test_syscall_violation_kill_ends_the_host(start_dm):
    registry = (reg_driver("Faulty", "FLT", group=1, extra=ALLOW + '\n"SyscallViolation"="kill"')
                + reg_driver("Steady", "OKY", group=2, order=2, extra=ALLOW) + reg_group(1) + reg_group(2))
    dm = start_dm(registry)
    with Hammer(dm):
        with dm.client() as c, c.open("FLT1:") as h:
            with pytest.raises(OSError) as exc:
                h.ioctl(SYSCALL, b"", 4)
            assert exc.value.errno == errno.EIO
        recs = dm.wait_audit("syscall.denied", group=1)
        assert any(r["detail"]["syscall"] == "socket" for r in recs)
        dm.wait_audit("host.crashed", group=1)
        dm.wait_state("FLT1:", "running")


def test_a_flood_of_denied_syscalls_is_cut_short(start_dm):
    dm = start_dm(two_hosts())
    with Hammer(dm):
        with dm.client() as c, c.open("FLT1:") as h:
            with pytest.raises(OSError) as exc:
                h.ioctl(SYSCALL_FLOOD, b"", 0)
            assert exc.value.errno == errno.EIO
        dm.wait_audit("host.crashed", group=1)
        dm.wait_state("FLT1:", "running")
    records = dm.audit("syscall.denied")
    assert any("flood" in r["detail"] for r in records)
    # Cut short: the driver would make 100 000 denied calls.  How many are audited before the
    # rate (100 a second) is seen to be exceeded depends on how fast this machine handles each
    # report (about 200 when idle, a few hundred under load), so the bound here is loose.
    assert len(records) < 5000, len(records)
