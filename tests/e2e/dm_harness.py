"""Start a real Device Manager (a subprocess running `drvbox run`) on a registry of the test's
own, with policies derived and signed by the real toolchain, and talk to it with the real client."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from reflector.client import connect

HERE = Path(__file__).parent
TEST_DRIVERS = HERE / "drivers"
ROOT = HERE.parent.parent

# The confinement mechanisms this machine cannot give a host, passed to `drvbox run` as
# --allow-missing: a function, so that it is asked only when a Device Manager starts.
# tests/conftest.py sets it from its probes; left alone (the harness used outside a test session),
# nothing is accepted as missing and the Device Manager refuses a less confined host.
missing_here: Callable[[], frozenset[str]] = frozenset


def reg_driver(name: str, prefix: str, dll: str = "faulty.dll", *, user: bool = True, group: int | None = 1,
               order: int = 1, extra: str = "") -> str:
    lines = [f"[HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\{name}]", f'"Dll"="{dll}"', f'"Prefix"="{prefix}"',
             '"Index"=dword:1', f'"Order"=dword:{order}', f'"Flags"=dword:{"10" if user else "0"}']
    if group is not None:
        lines.append(f'"UserProcGroup"=dword:{group}')
    if extra:
        lines.append(extra.strip())
    return "\n".join(lines) + "\n\n"


def reg_group(group: int, timeout_ms: int = 3000, restart_limit: int = 5, window_s: int = 60, extra: str = "") -> str:
    return (f"[HKEY_LOCAL_MACHINE\\Drivers\\ProcGroup_{group:04d}]\n\"ProcName\"=\"udevice.exe\"\n"
            f"\"ProcTimeout\"=dword:{timeout_ms:x}\n\"RestartLimit\"=dword:{restart_limit:x}\n"
            f"\"RestartWindow\"=dword:{window_s:x}\n{extra}\n")


class DeviceManagerProcess:
    def __init__(self, tmp: Path, registry: str, driver_dirs=(TEST_DRIVERS,), sign=True, extra_args=()):
        self.tmp = tmp
        self.state = tmp / "state"
        self.socket = tmp / "dm.sock"
        self.reg = tmp / "platform.reg"
        self.reg.write_text("REGEDIT4\n\n" + registry)
        self.driver_dirs = [Path(d) for d in driver_dirs]
        self.policies = tmp / "policies"
        self.trust = tmp / "trust"
        self.proc: subprocess.Popen | None = None
        self.log_path = tmp / "dm.log"
        self.extra_args = list(extra_args)
        if sign:
            self.sign_policies()

    def sign_policies(self) -> None:
        from policy import signing
        from policy.regfile import parse_files
        from reflector.devkeys import new_trust, sign_user_policies
        keys = self.tmp / "keys"
        for d in (keys, self.policies, self.trust):
            d.mkdir(exist_ok=True)
        key = (signing.load_private_key(keys / "test.key") if (keys / "test.key").exists()
               else new_trust(keys, self.trust, "test"))
        sign_user_policies(parse_files([self.reg]).hive, self.driver_dirs, key, self.policies)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "reflector.cli", "--state-dir", str(self.state), "--socket", str(self.socket),
               "-v", "run", "--registry", str(self.reg), "--policies", str(self.policies), "--trust", str(self.trust)]
        for d in self.driver_dirs:
            cmd += ["--driver-path", str(d)]
        for mechanism in sorted(missing_here()):
            cmd += ["--allow-missing", mechanism]
        return cmd + self.extra_args

    def start(self, wait_states=("running", "rejected", "quarantined")) -> "DeviceManagerProcess":
        self._log = open(self.log_path, "ab")
        # Its own session, as at a terminal: a test may send it what Ctrl-C sends (SIGINT to the
        # whole process group) without hitting the test runner.
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"drvbox run exited {self.proc.returncode}:\n{self.log()}")
            try:
                with connect(self.socket) as dm:
                    devices = dm.devices()["devices"]
                if all(d["state"] in wait_states for d in devices):
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"drvbox run did not come up:\n{self.log()}")

    def client(self):
        return connect(self.socket)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def audit(self, event: str | None = None) -> list[dict]:
        path = self.state / "audit.log"
        out = []
        if not path.exists():
            return out
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if event is None or rec.get("event") == event:
                out.append(rec)
        return out

    def wait_audit(self, event: str, count: int = 1, timeout: float = 20, **match) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            recs = [r for r in self.audit(event) if all(r.get(k) == v for k, v in match.items())]
            if len(recs) >= count:
                return recs
            time.sleep(0.05)
        raise AssertionError(f"no {count}x {event} {match} in the audit log; got {self.audit()}\n{self.log()}")

    def wait_state(self, device: str, state: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            with self.client() as dm:
                for d in dm.devices()["devices"]:
                    if d["name"] == device:
                        last = d["state"]
                        if last == state:
                            return
            time.sleep(0.05)
        raise AssertionError(f"{device} stayed {last}, expected {state}\n{self.log()}")

    def host_pids(self) -> list[int]:
        with self.client() as dm:
            return [h["pid"] for h in dm.devices()["hosts"] if h["pid"]]

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


ECHO = 0x00220000          # the echo IOCTL of every test driver (faulty.py, the adversarial one)


def check_loopback_stream(h) -> None:
    """The stream interface every loopback test driver (faulty.py, tests/native/echo.c) gives on an
    open handle ``h``, the same in kernel and user mode: writes kept and read back, seeks from the
    start and the end, ECHO, a transfer larger than inline data (through shared memory, and the
    arena in user mode), EINVAL for an unknown whence."""
    import pytest
    assert h.write(b"hello world") == 11
    assert h.seek(0, 0) == 0
    assert h.read(5) == b"hello"
    assert h.seek(-5, 2) == 6
    assert h.read(100) == b"world"
    assert h.ioctl(ECHO, b"\x01\x02\x03", out_size=2) == b"\x01\x02"
    assert h.ioctl(ECHO, b"abc", out_size=0) == b""
    big = os.urandom(60_000)
    h.seek(0, 0)
    assert h.write(big) == len(big)
    h.seek(0, 0)
    assert h.read(len(big)) == big
    with pytest.raises(OSError) as exc:
        h.seek(0, 7)
    assert exc.value.errno == errno.EINVAL


class Hammer:
    """Keeps asking ``device`` for echoes from another thread while an attack or a crash happens
    elsewhere; every failure fails the test, and the device must have answered at least once."""

    def __init__(self, dm, device: str = "OKY1:"):
        self.dm, self.device = dm, device
        self.failures: list[BaseException] = []
        self.count = 0
        self.answered = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        try:
            with self.dm.client() as c, c.open(self.device) as h:
                while not self.stop.is_set():
                    assert h.ioctl(ECHO, b"ping", 4) == b"ping"
                    self.count += 1
                    self.answered.set()
        except BaseException as exc:     # noqa: BLE001 -- every failure is the test's business
            self.failures.append(exc)
            self.answered.set()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        # Wait for an answer, not for a time: on a loaded machine the first may come late.
        self.answered.wait(30)
        self.stop.set()
        self.thread.join(10)
        assert not self.failures, self.failures
        assert self.count > 0, f"{self.device} answered nothing"
