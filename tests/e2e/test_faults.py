"""Faults around a real Device Manager: a second one on the same socket, something that is not a
socket at its path, the Device Manager killed under load and started again, its state and audit
log where they should not be or cannot be written.  Each ends in a clear message (the file, the
value, the fix), never a traceback, and never in a Device Manager that goes on without its socket
or without its audit log."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time

import pytest

from dm_harness import ECHO, ROOT, DeviceManagerProcess, reg_driver, reg_group
from reflector import clientwire as cw

ALLOW = '"IoctlAllow"=multi_sz:"0x00220000-0x002200FF"\n"MaxIoSize"=dword:10000'
KERNEL_LOOP = reg_driver("Loop", "LPB", user=False, group=None, extra=ALLOW)


def run_to_exit(dm: DeviceManagerProcess, timeout: float = 60) -> subprocess.CompletedProcess:
    """`drvbox run` of ``dm``'s configuration in the foreground, expected to stop on its own."""
    return subprocess.run(dm.command(), capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


@pytest.fixture
def first(tmp_path):
    dm = DeviceManagerProcess(tmp_path / "first", KERNEL_LOOP) if (tmp_path / "first").mkdir() is None else None
    dm.start()
    yield dm
    dm.stop()


def serves(dm: DeviceManagerProcess) -> None:
    with dm.client() as c, c.open("LPB1:") as h:
        assert h.ioctl(ECHO, b"alive", 5) == b"alive"


# -- the socket ---------------------------------------------------------------------------------

def test_a_second_device_manager_on_a_live_socket_refuses_and_leaves_it(first, tmp_path):
    (tmp_path / "second").mkdir()
    second = DeviceManagerProcess(tmp_path / "second", KERNEL_LOOP)
    second.socket = first.socket
    done = run_to_exit(second)
    assert done.returncode != 0
    assert_no_traceback(done.stderr)
    assert f"{first.socket}: another Device Manager" in done.stderr and "--socket" in done.stderr, done.stderr
    # It stopped before doing anything: no audit records of its own, and the first one's socket
    # is still there and still the first one's.
    assert not (second.state / "audit.log").exists()
    assert first.socket.is_socket()
    serves(first)


def test_two_device_managers_starting_at_once_get_one_socket(tmp_path):
    """The check and the bind are one step: of two started together, exactly one serves."""
    dms = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        dm = DeviceManagerProcess(tmp_path / name, KERNEL_LOOP)
        dm.socket = tmp_path / "shared.sock"
        dms.append(dm)
    procs = [subprocess.Popen(dm.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
             for dm in dms]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        loser = next((p for p in procs if p.poll() is not None), None)
        assert loser is not None, "neither Device Manager gave way"
        assert loser.returncode != 0
        out = loser.stdout.read()
        assert_no_traceback(out)
        assert "another Device Manager" in out, out
        winner = next(p for p in procs if p is not loser)
        deadline = time.monotonic() + 60
        while True:                          # the winner may still be loading: wait for it to listen
            assert winner.poll() is None, winner.stdout.read()
            try:
                serves(dms[procs.index(winner)])
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the winner never served"
                time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(20)
            p.stdout.close()


@pytest.mark.parametrize("kind", ["regular-file", "symlink", "directory"])
def test_something_that_is_not_a_socket_at_the_path_is_refused_not_removed(tmp_path, kind):
    dm = DeviceManagerProcess(tmp_path, KERNEL_LOOP)
    dm.socket = tmp_path / "not-a-socket"
    victim = tmp_path / "precious"
    victim.write_text("keep me")
    if kind == "regular-file":
        dm.socket.write_text("keep me")
    elif kind == "symlink":
        dm.socket.symlink_to(victim)
    else:
        dm.socket.mkdir()
    done = run_to_exit(dm)
    assert done.returncode != 0
    assert_no_traceback(done.stderr)
    assert f"{dm.socket} exists and is" in done.stderr and "--socket" in done.stderr, done.stderr
    assert os.path.lexists(dm.socket) and not dm.socket.is_socket()
    assert victim.read_text() == "keep me"
    if kind == "regular-file":
        assert dm.socket.read_text() == "keep me"


def test_a_dead_device_managers_socket_is_reused(tmp_path):
    dm = DeviceManagerProcess(tmp_path, KERNEL_LOOP).start()
    dm.proc.kill()
    dm.proc.wait()
    assert dm.socket.is_socket()              # left behind by SIGKILL
    dm._log.close()
    dm.start()
    try:
        serves(dm)
    finally:
        assert dm.stop() == 0
    assert not dm.socket.exists()


# -- the state directory and the audit log ------------------------------------------------------

def _symlinked_log(dm, tmp_path):
    dm.state.mkdir(mode=0o700)
    (tmp_path / "elsewhere.log").write_text("")
    (dm.state / "audit.log").symlink_to(tmp_path / "elsewhere.log")
    return "is a symbolic link", tmp_path / "elsewhere.log"


def _world_writable_state(dm, tmp_path):
    dm.state.mkdir()
    dm.state.chmod(0o777)
    return "is writable by others (mode 0777)", None


def _group_writable_state(dm, tmp_path):
    dm.state.mkdir()
    dm.state.chmod(0o770)
    return "chmod go-w", None


def _state_is_a_file(dm, tmp_path):
    dm.state.write_text("not a directory")
    return "exists and is not a directory", None


def _fifo_log(dm, tmp_path):
    dm.state.mkdir(mode=0o700)
    os.mkfifo(dm.state / "audit.log")      # opening it for writing would wait for a reader forever
    return "audit.log: cannot be opened", None


@pytest.mark.parametrize("setup", [_symlinked_log, _world_writable_state, _group_writable_state, _state_is_a_file,
                                   _fifo_log], ids=lambda f: f.__name__.strip("_"))
def test_a_state_directory_or_audit_log_not_to_be_trusted_is_refused_clearly(tmp_path, setup):
    dm = DeviceManagerProcess(tmp_path, KERNEL_LOOP)
    expected, untouched = setup(dm, tmp_path)
    done = run_to_exit(dm)
    assert done.returncode == 1, done.stderr
    assert_no_traceback(done.stderr)
    assert str(dm.state) in done.stderr and expected in done.stderr, done.stderr
    assert not dm.socket.exists()            # it never served
    if untouched is not None:
        assert untouched.read_text() == ""   # nothing was written through the link


@pytest.fixture
def small_state(tmp_path):
    """The state directory on a tmpfs of its own, small enough to fill (root: mount)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "drvbox-test-state", str(state)], check=True)
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def _fill(directory) -> None:
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


@pytest.mark.needs_root
def test_an_audit_log_that_cannot_be_written_stops_the_device_manager(tmp_path, small_state):
    dm = DeviceManagerProcess(tmp_path, KERNEL_LOOP).start()
    try:
        serves(dm)
        _fill(small_state)
        c = dm.client()
        h = c.open("LPB1:")
        with pytest.raises(OSError):              # denied and audited (policy.denied): the write fails
            h.ioctl(0x00330000, b"", 0)
        c.close()
        # Fail closed: it does not go on serving unaudited; it stops, says why and what to do.
        assert dm.proc.wait(30) == 1
        log = dm.log()
        assert_no_traceback(log)
        assert f"the audit log {small_state / 'audit.log'} cannot be written (No space left" in log, log
        assert "does not run drivers it cannot audit" in log and "start drvbox run again" in log, log
        assert not dm.socket.exists()
    finally:
        dm.stop()
    # Once there is room again, it starts, the chain goes on, and the log verifies.
    (small_state / "filler").unlink()
    before = len(dm.audit())
    dm._log.close()
    dm.start()
    serves(dm)
    assert dm.stop() == 0
    assert len(dm.audit()) > before
    from reflector.cli import main
    assert main(["--state-dir", str(dm.state), "audit", "verify"]) == 0


@pytest.mark.needs_root
def test_a_read_only_state_directory_is_refused_clearly(tmp_path, small_state):
    subprocess.run(["mount", "-o", "remount,ro", str(small_state)], check=True)
    dm = DeviceManagerProcess(tmp_path, KERNEL_LOOP)
    done = run_to_exit(dm)
    assert done.returncode == 1, done.stderr
    assert_no_traceback(done.stderr)
    assert str(small_state) in done.stderr and "Read-only file system" in done.stderr, done.stderr
    assert "--state-dir" in done.stderr


# -- killing things -------------------------------------------------------------------------------

def _two_user_hosts() -> str:
    return (reg_driver("Faulty", "FLT", group=1, extra=ALLOW) + reg_driver("Steady", "OKY", group=2, order=2, extra=ALLOW)
            + reg_group(1, timeout_ms=1500) + reg_group(2))


def _stopped(pid: int) -> bool:
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] != "T":
                return False
    return True


@pytest.mark.needs_sandbox
def test_a_stopped_host_times_out_and_is_restarted(tmp_path):
    dm = DeviceManagerProcess(tmp_path, _two_user_hosts()).start()
    try:
        with dm.client() as c:
            host = next(h["pid"] for h in c.devices()["hosts"] if h["group"] == 1)    # the host itself
        with dm.client() as c:
            h = c.open("FLT1:")
            os.kill(host, signal.SIGSTOP)
            # The signal is delivered asynchronously: wait until every thread of the host is stopped.
            deadline = time.monotonic() + 10
            while not _stopped(host) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _stopped(host)
            with pytest.raises(OSError) as exc:
                h.ioctl(ECHO, b"x", 1)
            assert exc.value.errno == errno.ETIMEDOUT
        dm.wait_audit("host.timeout", group=1)
        # The request it was killed for is no longer pending when it dies; it is still named.
        assert dm.wait_audit("host.crashed", group=1)[-1]["detail"]["in_flight"] == ["FLT1:"]
        dm.wait_audit("host.restarted", group=1)
        with dm.client() as c, c.open("FLT1:") as h, c.open("OKY1:") as o:
            assert h.ioctl(ECHO, b"back", 4) == b"back"
            assert o.ioctl(ECHO, b"calm", 4) == b"calm"
    finally:
        assert dm.stop() == 0


@pytest.mark.needs_sandbox
def test_sigkill_under_load_then_start_again_the_chain_goes_on(tmp_path):
    dm = DeviceManagerProcess(tmp_path, _two_user_hosts()).start()
    stop = threading.Event()
    served = []

    def load():
        while not stop.is_set():
            try:
                with dm.client() as c, c.open("OKY1:") as h:
                    while not stop.is_set():
                        assert h.ioctl(ECHO, b"a", 1) == b"a"
                        served.append(1)
                        with pytest.raises(OSError):
                            h.ioctl(0x00330000, b"", 0)       # audited on every round
            except OSError:
                time.sleep(0.01)                           # the Device Manager is down: try again

    workers = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        deadline = time.monotonic() + 30
        while len(served) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        with dm.client() as c:
            listed = c.devices()["hosts"]
        hosts = [h["pid"] for h in listed if h["pid"]]
        reapers = [h["reaper_pid"] for h in listed if h["reaper_pid"]]
        dm.proc.kill()
        dm.proc.wait()
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{p}") for p in reapers + hosts) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in reapers + hosts if os.path.exists(f"/proc/{p}")], "hosts outlived the Device Manager"
        before = len(dm.audit())
        dm._log.close()
        dm.start()                                  # the stale socket is reused, the chain goes on
        count = len(served)
        deadline = time.monotonic() + 30
        while len(served) < count + 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(served) >= count + 100, "the load was not served again"
    finally:
        stop.set()
        for w in workers:
            w.join(10)
        dm.stop()
    assert len(dm.audit()) > before
    from reflector.cli import main
    assert main(["--state-dir", str(dm.state), "audit", "verify"]) == 0
