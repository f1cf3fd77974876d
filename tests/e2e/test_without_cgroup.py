"""drvbox where a host cannot get a cgroup: what a non-root user meets on a cgroup v1 or hybrid
machine, or on v2 without delegation.

As root the cgroups are hidden for real, not mocked: the command runs in a mount namespace of its
own where /sys/fs/cgroup is an empty read-only tmpfs, so sandbox/cgroups.py finds no hierarchy to
create a cgroup in, exactly as it does for a user who may not write one.  As non-root the command
runs as it is, and the tests run only where this user really cannot create a cgroup (elsewhere
there is no way to take it away without root).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dm_harness import DeviceManagerProcess, reg_driver, reg_group
from sandbox import limits

pytestmark = [pytest.mark.needs_seccomp_notify, pytest.mark.usefixtures("require_namespaces")]

ROOT = Path(__file__).resolve().parent.parent.parent
FLAG = "--allow-missing cgroup"
# Only a guard against a hung command, never a measure.
HANG_GUARD = 120

HOARD = 0x00220000
HOARD_DRIVER = '''
import struct
from hosts import StreamDriver

HOARD = 0x00220000


class Driver(StreamDriver):
    """IOCTL HOARD(u32 n): hold n MiB (0: as many as it can get), in 1 MiB pieces, until
    MemoryError; answer how many it got (u32), then let them go."""

    def init(self, ctx):
        self.hoard = []

    def open(self, access, share):
        return None

    def io_control(self, opened, code, inbuf, outbuf):
        (want,) = struct.unpack_from("<I", inbuf)
        try:
            while want == 0 or len(self.hoard) < want:
                self.hoard.append(bytearray(1 << 20))
        except MemoryError:
            pass
        got = len(self.hoard)
        self.hoard.clear()
        struct.pack_into("<I", outbuf, 0, got)
        return 4
'''


BROKEN_DRIVER = '''
from hosts import StreamDriver


class Driver(StreamDriver):
    def init(self, ctx):
        raise RuntimeError("this driver never starts")
'''


def without_cgroup(cmd: list[str]) -> list[str]:
    """``cmd`` run where no cgroup can be created: as root, behind an empty /sys/fs/cgroup in a
    mount namespace of its own; otherwise as it is, if this user really has no cgroup."""
    if os.geteuid() == 0:
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount -t tmpfs -o ro,size=4k drvbox-test-no-cgroup /sys/fs/cgroup && exec "$@"', "sh", *cmd]
    from sandbox.check import cgroup_unavailable
    if cgroup_unavailable() is None:
        pytest.skip("this user can create a cgroup here, and only root can hide it from a command")
    return cmd


def _strip_allow_missing(cmd: list[str]) -> list[str]:
    out, skip = [], False
    for arg in cmd:
        if skip:
            skip = False
        elif arg == "--allow-missing":
            skip = True
        else:
            out.append(arg)
    return out


class DeviceManagerWithoutCgroup(DeviceManagerProcess):
    """A real Device Manager where no cgroup can be had; given --allow-missing cgroup only when
    the test says so (whatever the harness would pass for this machine)."""

    def __init__(self, tmp: Path, registry: str, *, allow: bool, **kw):
        self.allow = allow
        super().__init__(tmp, registry, **kw)

    def command(self) -> list[str]:
        cmd = _strip_allow_missing(super().command())
        return without_cgroup(cmd + (["--allow-missing", "cgroup"] if self.allow else []))


def _hoard_dm(tmp: Path, *, allow: bool, memory_limit_mib: int | None, max_threads: int = 8,
              restart_limit: int = 5) -> DeviceManagerWithoutCgroup:
    drivers = tmp / "drivers"
    drivers.mkdir()
    (drivers / "hoard.py").write_text(HOARD_DRIVER)
    allow_ioctl = '"IoctlAllow"=multi_sz:"0x00220000"\n"MaxIoSize"=dword:1000'
    group = f'"MaxThreads"=dword:{max_threads:x}\n'
    if memory_limit_mib is not None:
        group += f'"MemoryLimit"=dword:{memory_limit_mib:x}\n'
    registry = (reg_driver("Hoard", "HRD", "hoard.dll", group=1, extra=allow_ioctl)
                + reg_driver("Plain", "PLN", "hoard.dll", group=2, order=2, extra=allow_ioctl)
                + reg_group(1, restart_limit=restart_limit, extra=group)
                + reg_group(2, restart_limit=restart_limit))
    return DeviceManagerWithoutCgroup(tmp, registry, allow=allow, driver_dirs=[drivers])


def _hoard(dm, device: str, want_mib: int) -> int:
    with dm.client() as c, c.open(device) as h:
        return struct.unpack("<I", h.ioctl(HOARD, struct.pack("<I", want_mib), 4))[0]


def _cli(dm, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reflector.cli", "--socket", str(dm.socket), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=HANG_GUARD)


# --- drvbox sandbox check ------------------------------------------------------------------------

def test_sandbox_check_reports_the_missing_cgroup_and_every_other_mechanism():
    result = subprocess.run(without_cgroup([sys.executable, "-m", "reflector.cli", "sandbox", "check", "--json"]),
                            capture_output=True, text=True, cwd=ROOT, timeout=HANG_GUARD)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)            # the report, not {"ok": false, "error": ...}
    assert report["ok"] is False and "error" not in report
    verdicts = {m["mechanism"]: m for m in report["mechanisms"]}
    assert {name for name, m in verdicts.items() if not m["ok"]} == {"cgroup"}, verdicts
    assert set(verdicts) >= {"namespaces", "identity", "capabilities", "no_new_privs", "seccomp", "processes",
                             "pid_view", "mounts", "network", "rlimits"}
    cgroup = verdicts["cgroup"]["detail"]
    assert cgroup.startswith("missing: ") and ("v1: " in cgroup or "v2: " in cgroup), cgroup   # why
    assert f"drvbox run {FLAG}" in cgroup                                                    # what to do
    # The probe's memory limit (256 MiB) is in RLIMIT_AS instead, and the rlimits judged against it.
    rlimit_as = 256 + limits.RUNTIME_MIB + limits.THREAD_STACK_MIB * 32
    assert f"RLIMIT_AS {rlimit_as} MiB" in cgroup
    assert report["raw"]["confinement"]["rlimits"]["RLIMIT_AS"] == [rlimit_as << 20] * 2


def test_sandbox_check_lines_say_missing_and_exit_1():
    result = subprocess.run(without_cgroup([sys.executable, "-m", "reflector.cli", "sandbox", "check"]),
                            capture_output=True, text=True, cwd=ROOT, timeout=HANG_GUARD)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("MISSING")] == ["cgroup"], result.stdout
    assert sum(line.startswith("ok ") for line in lines) >= 10, result.stdout
    assert lines[-1].startswith("some mechanism is missing")


@pytest.mark.needs_cgroup
def test_sandbox_check_with_a_cgroup_keeps_the_default_address_space():
    result = subprocess.run([sys.executable, "-m", "reflector.cli", "sandbox", "check", "--json"],
                            capture_output=True, text=True, cwd=ROOT, timeout=HANG_GUARD)
    report = json.loads(result.stdout)
    verdicts = {m["mechanism"]: m["ok"] for m in report["mechanisms"]}
    assert verdicts["cgroup"] and verdicts["rlimits"], report["mechanisms"]
    assert report["raw"]["confinement"]["rlimits"]["RLIMIT_AS"] == [1 << 30] * 2


# --- drvbox run ------------------------------------------------------------------------------------

def test_run_without_the_flag_refuses_to_start_and_names_it(tmp_path):
    dm = _hoard_dm(tmp_path, allow=False, memory_limit_mib=64)
    result = subprocess.run(dm.command(), capture_output=True, text=True, cwd=ROOT, timeout=HANG_GUARD)
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("drvbox run: hosts: confinement step 'cgroup' failed: "), message
    assert ("v1: " in message or "v2: " in message) and f"drvbox run {FLAG}" in message, message
    assert "Traceback" not in result.stderr and not dm.socket.exists()
    assert dm.audit("host.crashed") == []                   # no host was even tried


def test_a_group_without_a_host_shows_a_dash_not_a_false_zero(tmp_path):
    dm = _hoard_dm(tmp_path, allow=True, memory_limit_mib=None, restart_limit=1)
    (tmp_path / "drivers" / "broken.py").write_text(BROKEN_DRIVER)
    dm.reg.write_text(dm.reg.read_text().replace('"hoard.dll"', '"broken.dll"', 1))   # group 1 only
    dm.sign_policies()
    dm.start(wait_states=("quarantined", "running"))
    try:
        dm.wait_state("HRD1:", "quarantined")
        hosts = {h["group"]: h for h in json.loads(_cli(dm, "ls", "--json").stdout)["hosts"]}
        assert hosts[1]["state"] == "quarantined" and hosts[1]["pss"] is None, hosts
        rows = {line.split()[0]: line.split() for line in _cli(dm, "ls").stdout.splitlines()
                if line.split()[:1] in (["1"], ["2"])}
        assert rows["1"][4] == "-", rows
    finally:
        dm.stop()


def test_memory_limit_falls_back_to_rlimit_as(tmp_path):
    memory_limit, max_threads = 64, 8
    dm = _hoard_dm(tmp_path, allow=True, memory_limit_mib=memory_limit, max_threads=max_threads).start()
    try:
        dm.wait_state("HRD1:", "running")
        # The driver can have its MemoryLimit, less a little of what the runtime takes...
        assert _hoard(dm, "HRD1:", memory_limit - 8) == memory_limit - 8
        # ...and not much more: RLIMIT_AS leaves it the stacks of the threads it does not run.
        got = _hoard(dm, "HRD1:", 0)
        assert memory_limit - 8 <= got <= memory_limit + max_threads + 8, got
        assert _hoard(dm, "HRD1:", 1) == 1                 # the host survived its MemoryError
        said = dm.audit("host.limits")
        assert [r["group"] for r in said] == [1], said      # once, and only for the group with a limit
        detail = said[0]["detail"]
        assert detail["memory_limit_mib"] == memory_limit and detail["enforced_by"] == "RLIMIT_AS"
        assert memory_limit < detail["rlimit_as_mib"] < 1024 and detail["why"]
        assert dm.log().count(f"MemoryLimit {memory_limit} MiB is not enforced by a cgroup") == 1
        started = {r["group"]: r["pid"] for r in dm.audit("host.started")}
        with open(f"/proc/{started[1]}/limits") as f:
            line = next(line for line in f if line.startswith("Max address space"))
        assert line.split()[3:5] == [str(detail["rlimit_as_mib"] << 20)] * 2, line
    finally:
        dm.stop()


def test_a_host_with_a_tiny_memory_limit_still_starts_and_serves(tmp_path):
    # RLIMIT_AS is then little more than sandbox/limits.py's allowance for the runtime itself.
    dm = _hoard_dm(tmp_path, allow=True, memory_limit_mib=1, max_threads=8).start()
    try:
        dm.wait_state("HRD1:", "running")
        assert _hoard(dm, "HRD1:", 1) == 1
        assert _hoard(dm, "HRD1:", 0) < 1 + 8 + 8            # its limit, and the stacks it does not use
        assert dm.audit("host.crashed") == []
    finally:
        dm.stop()


def test_ls_shows_pss_or_a_dash_never_a_false_zero(tmp_path):
    dm = _hoard_dm(tmp_path, allow=True, memory_limit_mib=None).start()
    try:
        dm.wait_state("HRD1:", "running")
        hosts = json.loads(_cli(dm, "ls", "--json").stdout)["hosts"]
        rows = [line.split() for line in _cli(dm, "ls").stdout.splitlines() if line.split()[:1] in (["1"], ["2"])]
        assert len(hosts) == len(rows) == 2
        assert all(h["cgroup_memory"] is None for h in hosts)          # no cgroup to read it from
        if os.geteuid() == 0:
            # Root may read a host's smaps_rollup: its PSS is a real, non-zero number.
            assert all(isinstance(h["pss"], int) and h["pss"] > 0 for h in hosts), hosts
            assert all(row[4].endswith("K") and int(row[4][:-1]) > 0 for row in rows), rows
        else:
            # The host is non-dumpable and its memory belongs to the initial user namespace: its
            # parent may not read smaps_rollup, and says so instead of 0.
            assert all(h["pss"] is None for h in hosts), hosts
            assert [row[4] for row in rows] == ["-", "-"], rows
    finally:
        dm.stop()


@pytest.mark.needs_cgroup
def test_ls_json_has_the_hosts_cgroup_memory_when_there_is_one(tmp_path):
    drivers = tmp_path / "drivers"
    drivers.mkdir()
    (drivers / "hoard.py").write_text(HOARD_DRIVER)
    allow_ioctl = '"IoctlAllow"=multi_sz:"0x00220000"\n"MaxIoSize"=dword:1000'
    # A host gets a memory cgroup (v1) or the memory controller (v2) only with a MemoryLimit.
    dm = DeviceManagerProcess(tmp_path, reg_driver("Hoard", "HRD", "hoard.dll", group=1, extra=allow_ioctl)
                              + reg_group(1, extra='"MemoryLimit"=dword:40'), driver_dirs=[drivers]).start()
    try:
        dm.wait_state("HRD1:", "running")
        hosts = json.loads(_cli(dm, "ls", "--json").stdout)["hosts"]
        assert [type(h["cgroup_memory"]) for h in hosts] == [int] and hosts[0]["cgroup_memory"] > 0, hosts
    finally:
        dm.stop()


# --- drvbox bench ----------------------------------------------------------------------------------

def test_bench_stops_at_once_with_the_device_managers_reason(tmp_path):
    from reflector.bench import DeviceManagerFailed, _prepare, wait_serving
    cmd = without_cgroup(_strip_allow_missing(_prepare(tmp_path)))
    with open(tmp_path / "dm.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            with pytest.raises(DeviceManagerFailed) as failed:
                wait_serving(tmp_path / "dm.sock", proc, timeout=HANG_GUARD, log=tmp_path / "dm.log",
                             audit=tmp_path / "state" / "audit.log")
        finally:
            proc.terminate()
            proc.wait(HANG_GUARD)
    # Whether the Device Manager ended at once or its host failed to start, the reason is quoted.
    message = str(failed.value)
    assert "confinement step 'cgroup' failed" in message and f"drvbox run {FLAG}" in message, message
    assert "its log (" in message


@pytest.mark.slow
def test_bench_runs_without_a_cgroup_and_says_so():
    code = ("import json; from reflector.bench import measure, report\n"
            "import sys; r = measure(n=100, rounds=1, restarts=1, progress=lambda m: print(m, file=sys.stderr))\n"
            "print(json.dumps({'cgroup_missing': r['cgroup_missing'], 'ioctl_user_us': r['ioctl_user_us'], "
            "'report': report(r)}))")
    started = time.monotonic()
    result = subprocess.run(without_cgroup([sys.executable, "-c", code]), capture_output=True, text=True,
                            cwd=ROOT, timeout=HANG_GUARD + 60)
    assert result.returncode == 0, (time.monotonic() - started, result.stderr)
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["cgroup_missing"] and out["ioctl_user_us"] > 0
    assert f"hosts ran without a cgroup ({FLAG})" in out["report"]
    assert f"runs with {FLAG}" in result.stderr          # said while it runs, too
