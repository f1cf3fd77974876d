"""End-to-end: `drvbox fuzz` against a real Device Manager, with fuzzme (three planted bugs) in a
real sandboxed host, finds each bug, buckets it with the signal or exit status the audit log
gives, writes case files that replay, and leaves the other devices answering."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dm_harness import ROOT, DeviceManagerProcess, Hammer, reg_driver, reg_group

pytestmark = [pytest.mark.needs_sandbox, pytest.mark.slow]

TEST_DRIVERS = ROOT / "tests" / "drivers"


def _load(path: Path):
    # By path, not through sys.path: tests/drivers holds modules named like others (echo, plain).
    spec = importlib.util.spec_from_file_location(f"fuzz_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fuzzme = _load(TEST_DRIVERS / "fuzzme.py")      # only its constants: the driver itself runs in the host

SEED = 1
ITERATIONS = 300
# What SEED finds in ITERATIONS operations: each planted bug, once bucketed, whatever the counts.
PLANTED = {
    ("crash", "SIGSEGV", None, "ioctl", f"{fuzzme.IOCTL_PARSE:#010x}"),       # in[0] == 0xFF
    ("hang", "SIGKILL", None, "ioctl", f"{fuzzme.IOCTL_WAIT:#010x}"),         # empty input; killed
    ("crash", None, fuzzme.EXIT_STALE_CURSOR, "read", None),                  # write, seek, read
}
STEADY_ALLOW = '"IoctlAllow"=multi_sz:"0x00220000-0x002200FF"'


@pytest.fixture(scope="module")
def dm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    registry = (reg_driver("Fuzzme", "FZZ", dll="fuzzme.dll", group=1,
                           extra=fuzzme.IOCTL_ALLOW + '\n"MaxIoSize"=dword:100')
                # A short ProcTimeout so a hang costs little; a low RestartLimit so the run meets
                # quarantines and must lift them.
                + reg_group(1, timeout_ms=1000, restart_limit=2)
                + reg_driver("Steady", "OKY", dll="faulty.dll", group=2, order=2, extra=STEADY_ALLOW)
                + reg_group(2)
                + reg_driver("Inproc", "KRN", dll="echo.dll", user=False, group=None, order=3))
    dm = DeviceManagerProcess(tmp, registry, driver_dirs=(TEST_DRIVERS, ROOT / "tests" / "e2e" / "drivers")).start()
    yield dm
    dm.stop()


def drvbox(dm: DeviceManagerProcess, *args, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "reflector.cli", "--state-dir", str(dm.state), "--socket", str(dm.socket), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, **kw)


def keys(report: dict) -> set:
    return {(b["kind"], b["signal_name"], b["status"], b["op"], b["code"]) for b in report["buckets"]}


@pytest.fixture(scope="module")
def found(dm, tmp_path_factory):
    """One run of SEED on fuzzme while another host is hammered: (exit status, report, stderr, out)."""
    out = tmp_path_factory.mktemp("found") / "out"
    with Hammer(dm, "OKY1:"):
        r = drvbox(dm, "fuzz", "FZZ1:", "--seed", SEED, "--iterations", ITERATIONS, "--policy", dm.policies,
                   "--out", out, "--json")
    return r.returncode, (json.loads(r.stdout) if r.stdout else None), r.stderr, out


def test_fuzz_finds_the_planted_bugs_and_the_other_device_keeps_answering(dm, found):
    status, report, stderr, out = found
    assert status == 1, stderr
    assert keys(report) == PLANTED, (report, stderr, dm.log())
    assert report["device"] == "FZZ1:" and report["seed"] == SEED and report["iterations"] == ITERATIONS
    assert report["elapsed_s"] > 0 and report["ops_per_s"] > 0
    # Codes outside the allowlist were tried and refused by the policy, which is not a finding.
    assert report["refused_by_policy"] > 0 and report["errnos"]["EACCES"] > 0
    # IOCTL_SUM's own ETIMEDOUT was met, and is not a hang (PLANTED has only IOCTL_WAIT's).
    assert report["errnos"].get("ETIMEDOUT", 0) > sum(b["count"] for b in report["buckets"] if b["kind"] == "hang")
    # RestartLimit 2 was passed, and the fuzzer lifted the quarantine to go on, saying so.
    assert report["quarantines_lifted"] > 0
    assert "quarantined" in stderr and "drvbox restart FZZ1:" in stderr
    assert stderr.count("is quarantined") == 1        # said once, however often it is lifted
    assert f"seed {SEED}" in stderr
    for bucket in report["buckets"]:
        case = json.loads(Path(bucket["case"]).read_text())
        assert Path(bucket["case"]).parent == out
        assert case["seed"] == SEED and case["device"] == "FZZ1:"
        assert case["expect"]["kind"] == bucket["kind"] and case["expect"]["signal"] == bucket["signal"]
        assert case["audit"] and case["audit"][-1]["event"] == "host.crashed"
        last = case["ops"][-1]
        assert last["op"] == bucket["op"] and last.get("code") == bucket["code"]
    assert json.loads((out / "summary.json").read_text())["buckets"] == report["buckets"]
    with dm.client() as c:
        states = {d["name"]: d["state"] for d in c.devices()["devices"]}
        with c.open("OKY1:") as h:
            assert h.ioctl(0x00220000, b"still here", 10) == b"still here"
    assert states["OKY1:"] == "running"


def test_each_case_replays_and_a_harmless_one_does_not(dm, found, tmp_path):
    status, report, stderr, _ = found
    assert status == 1, stderr
    cases = [Path(b["case"]) for b in report["buckets"]]
    assert len(cases) == len(PLANTED)
    for case in cases:
        replay = drvbox(dm, "fuzz", "FZZ1:", "--replay", case, "--json")
        result = json.loads(replay.stdout)
        assert replay.returncode == 1 and result["reproduced"], (case.read_text(), replay.stdout, replay.stderr)
        assert "reproduces" in result["message"]
    # The same case without its last operation: nothing fails, and the exit status says so.
    doc = json.loads(cases[0].read_text())
    doc["ops"] = doc["ops"][:-1] + [{"op": "ioctl", "code": f"{fuzzme.IOCTL_VERSION:#010x}", "in": "", "out": 8}]
    harmless = tmp_path / "harmless.json"
    harmless.write_text(json.dumps(doc))
    replay = drvbox(dm, "fuzz", "FZZ1:", "--replay", harmless)
    assert replay.returncode == 0, (replay.stdout, replay.stderr)
    assert "does not reproduce" in replay.stdout


def test_same_seed_same_operations_same_buckets(dm, found, tmp_path):
    _, first, _, _ = found
    r = drvbox(dm, "fuzz", "FZZ1:", "--seed", SEED, "--iterations", ITERATIONS, "--policy", dm.policies,
               "--out", tmp_path / "out", "--json")
    again = json.loads(r.stdout)
    assert keys(again) == keys(first)
    # Where each bucket was first hit does not depend on timing: the operations are the same.
    assert [b["first_index"] for b in again["buckets"]] == [b["first_index"] for b in first["buckets"]]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_still_writes_the_summary_and_every_case(dm, tmp_path, sig):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "reflector.cli", "--state-dir", str(dm.state), "--socket", str(dm.socket),
           "fuzz", "FZZ1:", "--seed", str(SEED), "--time", "120", "--policy", str(dm.policies), "--out", str(out),
           "--json"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60           # a guard against a hang, not a measurement
        while not list(out.glob("case-*.json")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert list(out.glob("case-*.json")), proc.stderr.read() if proc.poll() is not None else "no case yet"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, stderr
    report = json.loads(stdout)
    assert report["interrupted"] is True and report["buckets"]
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True
    for bucket in report["buckets"]:
        assert Path(bucket["case"]).exists()
    assert "interrupted" in stderr and "Traceback" not in stderr


def test_refusals_exit_2_with_the_reason(dm, tmp_path):
    r = drvbox(dm, "fuzz", "KRN1:", "--codes", "0x80002000", "--iterations", 10)
    assert r.returncode == 2 and "kernel mode" in r.stderr and "--kernel-mode-ok" in r.stderr
    r = drvbox(dm, "fuzz", "NOPE1:", "--codes", "0x1", "--iterations", 10)
    assert r.returncode == 2 and "no device 'NOPE1:'" in r.stderr
    # Without --codes too: the missing device is the problem, not a missing policy for it.
    r = drvbox(dm, "fuzz", "NOPE1:", "--iterations", 10)
    assert r.returncode == 2 and "no device 'NOPE1:'" in r.stderr and "FZZ1:" in r.stderr
    r = drvbox(dm, "fuzz", "FZZ1:", "--iterations", 10, "--policy", tmp_path / "missing")
    assert r.returncode == 2 and "--policy" in r.stderr and "no such file" in r.stderr
    r = drvbox(dm, "fuzz", "FZZ1:", "--iterations", 10, "--policy", tmp_path)
    assert r.returncode == 2 and "--codes" in r.stderr
    r = drvbox(dm, "fuzz", "FZZ1:", "--codes", "0x10-0x1")
    assert r.returncode == 2 and "low-high" in r.stderr
    (tmp_path / "a-file").write_text("")
    r = drvbox(dm, "fuzz", "FZZ1:", "--codes", "0x00220000", "--iterations", 10, "--out", tmp_path / "a-file" / "out")
    assert r.returncode == 2 and "cannot write case files" in r.stderr and "--out" in r.stderr
    assert r.stdout == ""            # no table of zeros for a run that never started
    r = subprocess.run([sys.executable, "-m", "reflector.cli", "--state-dir", str(dm.state), "--socket",
                        str(tmp_path / "none.sock"), "fuzz", "FZZ1:", "--codes", "0x1", "--iterations", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot connect" in r.stderr


def test_a_device_manager_that_goes_away_stops_the_run_with_what_was_found(tmp_path):
    registry = (reg_driver("Fuzzme", "FZZ", dll="fuzzme.dll", group=1, extra=fuzzme.IOCTL_ALLOW)
                + reg_group(1, timeout_ms=1000, restart_limit=50))
    dm = DeviceManagerProcess(tmp_path, registry, driver_dirs=(TEST_DRIVERS,)).start()
    cmd = [sys.executable, "-m", "reflector.cli", "--state-dir", str(dm.state), "--socket", str(dm.socket),
           "fuzz", "FZZ1:", "--seed", str(SEED), "--time", "120", "--policy", str(dm.policies),
           "--out", str(tmp_path / "out"), "--json"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        dm.wait_audit("host.crashed", timeout=60)       # it is fuzzing, and has found something
        dm.proc.kill()
        dm.proc.wait()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        dm.stop()
    assert proc.returncode == 1, stderr
    report = json.loads(stdout)
    assert "Traceback" not in stderr
    assert "cannot connect to the Device Manager" in report["stopped"] and report["stopped"] in stderr
    assert report["buckets"] and not report["interrupted"]


def test_ctrl_c_in_the_middle_of_a_request_stops_cleanly(tmp_path):
    # A request cut short leaves its reply on the way: sending anything more on that connection
    # (closing the handle) read the wrong reply and ended in a traceback.  The request here is one
    # that never returns within the test (IOCTL_WAIT, empty input, ProcTimeout 60 s), so the
    # Ctrl-C lands in it for certain.
    registry = (reg_driver("Fuzzme", "FZZ", dll="fuzzme.dll", group=1, extra=fuzzme.IOCTL_ALLOW)
                + reg_group(1, timeout_ms=60000))
    dm = DeviceManagerProcess(tmp_path, registry, driver_dirs=(TEST_DRIVERS,)).start()
    case = tmp_path / "wait.json"
    case.write_text(json.dumps({"format": "drvbox.fuzz-case/1", "device": "FZZ1:", "expect": {"kind": "hang"},
                                "ops": [{"op": "ioctl", "code": f"{fuzzme.IOCTL_WAIT:#010x}", "in": "", "out": 0}]}))
    cmd = [sys.executable, "-m", "reflector.cli", "--state-dir", str(dm.state), "--socket", str(dm.socket),
           "fuzz", "FZZ1:", "--replay", str(case)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60           # a guard against a hang, not a measurement
        busy = 0
        while not busy and time.monotonic() < deadline and proc.poll() is None:
            with dm.client() as c:
                busy = sum(h["lanes"]["busy"] for h in c.devices()["hosts"])
            time.sleep(0.05)
        assert busy, "the request never reached the host"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        with dm.client() as c:                      # the Device Manager serves on
            assert any(d["name"] == "FZZ1:" for d in c.devices()["devices"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        dm.stop()
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == 2 and "interrupted" in stdout, (stdout, stderr)


def test_without_the_audit_log_a_hang_is_told_from_the_drivers_own_etimedout(tmp_path):
    # --state-dir of another Device Manager: no audit evidence.  IOCTL_WAIT with no input hangs
    # the host (killed at ProcTimeout: a hang); IOCTL_SUM with no input answers ETIMEDOUT itself
    # (not a finding).  The host seen to change is what tells them apart.  Seed 31's first 22
    # operations hold two of each (the generator is blind: the same operations every run).
    registry = (reg_driver("Fuzzme", "FZZ", dll="fuzzme.dll", group=1, extra=fuzzme.IOCTL_ALLOW)
                + reg_group(1, timeout_ms=1000, restart_limit=50))
    (tmp_path / "dm").mkdir()
    dm = DeviceManagerProcess(tmp_path / "dm", registry, driver_dirs=(TEST_DRIVERS,)).start()
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    (other / "audit.log").write_text("")
    codes = f"{fuzzme.IOCTL_SUM:#010x},{fuzzme.IOCTL_WAIT:#010x}"
    cmd = [sys.executable, "-m", "reflector.cli", "--state-dir", str(other), "--socket", str(dm.socket),
           "fuzz", "FZZ1:", "--seed", "31", "--iterations", "22", "--codes", codes, "--audit-wait", "1",
           "--out", str(tmp_path / "out"), "--json"]
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        dm.stop()
    report = json.loads(r.stdout)
    assert "not the log of the Device Manager being fuzzed" in report["audit_note"], r.stderr
    hangs = [b for b in report["buckets"] if b["kind"] == "hang"]
    assert [b["code"] for b in hangs] == [f"{fuzzme.IOCTL_WAIT:#010x}"], report
    assert report["errnos"]["ETIMEDOUT"] > hangs[0]["count"], report     # IOCTL_SUM's were met too
