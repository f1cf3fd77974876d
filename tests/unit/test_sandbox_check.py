"""``drvbox sandbox check``'s judgement: each mechanism passes on good evidence and fails when its
one piece of evidence is wrong.  The evidence here is written out by hand in the shape the
read-back produces; tests/e2e/test_confinement.py runs the real thing."""

from __future__ import annotations

import copy
import errno

import pytest

from sandbox.check import judge
from sandbox.notify import SyscallReport
from sandbox.spawning import ExitStatus
from sandbox.spec import SandboxSpec

SPEC = SandboxSpec(name="check", memory_limit_mib=256)


def good() -> tuple[dict, dict, list]:
    conf = {
        "pid": 1,
        "userns": False,
        "status": {"Uid": "65534 65534 65534 65534", "Gid": "65534 65534 65534 65534", "Groups": "",
                   "CapInh": "0" * 16, "CapPrm": "0" * 16, "CapEff": "0" * 16, "CapBnd": "0" * 16,
                   "CapAmb": "0" * 16, "NoNewPrivs": "1", "Seccomp": "2", "Seccomp_filters": "1"},
        "uid_map": ["0", "0", "4294967295"],
        "securebits": 0xEB,
        "namespaces": {n: {"inside": f"{n}:[1]", "new": n != "user"}
                       for n in ("user", "pid", "net", "ipc", "uts", "cgroup", "mnt")},
        "mounts": [{"mount_point": "/", "options": "ro,nosuid,nodev", "fstype": "tmpfs"},
                   {"mount_point": "/tmp", "options": "rw,nosuid,nodev,noexec", "fstype": "tmpfs"},
                   {"mount_point": "/usr/lib", "options": "ro,nosuid,nodev", "fstype": "ext4"},
                   {"mount_point": "/proc", "options": "ro,nosuid,nodev,noexec", "fstype": "proc"}],
        "interfaces": ["lo"],
        "rlimits": {"RLIMIT_AS": [1 << 30, 1 << 30], "RLIMIT_NOFILE": [64, 64], "RLIMIT_FSIZE": [16 << 20, 16 << 20],
                    "RLIMIT_CORE": [0, 0], "RLIMIT_NPROC": [100, 100]},
        "cgroup": {"version": 1, "pids.max": "33", "memory.limit_in_bytes": str(256 << 20), "inside": []},
        "seccomp": {"default": "notify", "allowed": 96},
    }
    probe = {"socket": errno.EPERM, "socketpair": errno.EPERM, "fork": errno.EPERM, "exec": errno.EPERM,
             "write_outside": errno.EROFS, "write_tmp": 0, "thread": 0, "proc_pids": [1]}
    reports = [SyscallReport(pid=9, nr=41, syscall="socket", args=(2, 1, 0, 0, 0, 0), arch="x86_64")]
    return conf, probe, reports


def _verdicts(conf, probe, reports) -> dict[str, bool]:
    return {f.mechanism: f.ok for f in judge(conf, probe, reports, SPEC, ExitStatus(0, None, None))}


def test_good_evidence_passes_every_mechanism():
    verdicts = _verdicts(*good())
    assert all(verdicts.values()), verdicts
    assert set(verdicts) == {"namespaces", "identity", "capabilities", "no_new_privs", "seccomp", "processes",
                             "pid_view", "mounts", "network", "rlimits", "cgroup"}


def _set(path: str, value):
    def change(conf, probe, reports):
        target = {"conf": conf, "probe": probe}[path.split(".")[0]]
        keys = path.split(".")[1:]
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


@pytest.mark.parametrize("mechanism, change", [
    ("namespaces", _set("conf.namespaces.net.new", False)),
    ("identity", _set("conf.status.Uid", "0 0 0 0")),
    ("identity", _set("conf.status.Groups", "0")),
    ("capabilities", _set("conf.status.CapBnd", "0000000000000400")),
    ("capabilities", _set("conf.status.CapAmb", "0000000000000001")),
    ("capabilities", _set("conf.securebits", 0x01)),
    ("no_new_privs", _set("conf.status.NoNewPrivs", "0")),
    ("seccomp", _set("conf.status.Seccomp", "0")),
    ("seccomp", _set("probe.socket", 0)),
    ("seccomp", lambda conf, probe, reports: reports.clear()),
    ("processes", _set("probe.fork", 0)),
    ("processes", _set("probe.exec", 0)),
    ("pid_view", _set("probe.proc_pids", [1, 4242])),
    ("mounts", _set("probe.write_outside", 0)),
    ("mounts", lambda conf, probe, reports: conf["mounts"][2].update(options="rw,nosuid")),
    ("network", _set("conf.interfaces", ["lo", "eth0"])),
    ("rlimits", _set("conf.rlimits.RLIMIT_NOFILE", [1024, 4096])),
    ("cgroup", _set("conf.cgroup", {"missing": True})),
])
def test_each_mechanism_fails_on_its_own_evidence(mechanism, change):
    conf, probe, reports = copy.deepcopy(good())
    change(conf, probe, reports)
    verdicts = _verdicts(conf, probe, reports)
    assert verdicts[mechanism] is False
    assert [m for m, ok in verdicts.items() if not ok] == [mechanism]
