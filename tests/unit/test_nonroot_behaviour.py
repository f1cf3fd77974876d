"""What drvbox says and sets where a host can get no cgroup (a non-root user on a cgroup v1 or
hybrid machine, v2 without delegation): the remedy it names, the RLIMIT_AS that stands in for a
memory limit, and how `drvbox sandbox check` judges the missing cgroup.  tests/e2e/
test_without_cgroup.py runs the real thing."""

from __future__ import annotations

import copy
import errno
import os

import pytest

from sandbox import limits
from sandbox.check import judge
from sandbox.errors import ConfinementError
from sandbox.spawning import ExitStatus
from sandbox.spec import DEFAULT_ADDRESS_SPACE_MIB, SandboxSpec

MIB = 1 << 20
NO_CGROUP = frozenset({"cgroup"})


# --- the remedy a failed cgroup step names --------------------------------------------------------

def test_cgroup_failure_names_the_flag_a_user_can_give():
    exc = ConfinementError("cgroup", "v1: mkdir '/sys/fs/cgroup/pids/x': Permission denied", errno.ENOTSUP,
                           name="host group 1")
    message = str(exc)
    assert "drvbox run --allow-missing cgroup" in message
    assert "make run ARGS='--allow-missing cgroup'" in message
    assert "RLIMIT_AS" in message                      # what stands in for it
    assert "accept 'cgroup' in spec.optional" not in message


def test_other_steps_keep_their_own_hint():
    assert "--allow-missing" not in str(ConfinementError("mounts", "mount('/x')", errno.ENOENT))


# --- RLIMIT_AS standing in for the memory limit ---------------------------------------------------

def _as(**kw) -> int | None:
    kw.setdefault("name", "t")
    return limits.address_space_mib(SandboxSpec(**kw))


def test_memory_limit_without_cgroup_becomes_rlimit_as_with_room_for_the_runtime():
    got = _as(memory_limit_mib=50, max_threads=32, mapped_mib=3, optional=NO_CGROUP)
    assert got == 50 + limits.RUNTIME_MIB + 32 * limits.THREAD_STACK_MIB + 3
    spec = SandboxSpec(name="t", memory_limit_mib=50, max_threads=32, mapped_mib=3, optional=NO_CGROUP)
    assert dict(limits.plan(spec, userns=True))["RLIMIT_AS"] == got * MIB


def test_fallback_never_exceeds_the_configured_address_space():
    assert _as(memory_limit_mib=4000, optional=NO_CGROUP) == DEFAULT_ADDRESS_SPACE_MIB
    assert _as(memory_limit_mib=100, address_space_mib=64, optional=NO_CGROUP) == 64


def test_fallback_applies_without_a_configured_address_space():
    assert _as(memory_limit_mib=10, max_threads=4, address_space_mib=None, optional=NO_CGROUP) == \
        10 + limits.RUNTIME_MIB + 4 * limits.THREAD_STACK_MIB


@pytest.mark.parametrize("kw", [
    {"memory_limit_mib": 50},                               # the cgroup is mandatory: it enforces the limit
    {"memory_limit_mib": None, "optional": NO_CGROUP},      # no memory limit to carry
    {"memory_limit_mib": 50, "optional": frozenset({"seccomp_notify"})},
])
def test_rlimit_as_is_the_configured_one_otherwise(kw):
    assert _as(**kw) == DEFAULT_ADDRESS_SPACE_MIB
    assert _as(address_space_mib=None, **kw) is None


def test_fallback_has_room_for_each_threads_stack_as_a_host_sets_it():
    # sandbox/ does not import hosts/: the stack size is mirrored, and must not fall behind.
    from hosts.main import THREAD_STACK
    assert limits.THREAD_STACK_MIB * MIB >= THREAD_STACK


@pytest.mark.parametrize("bad", [-1, 1.5, None])
def test_mapped_mib_must_be_a_whole_number(bad):
    with pytest.raises(ConfinementError) as exc:
        SandboxSpec(name="t", mapped_mib=bad)
    assert f"mapped_mib={bad!r}" in str(exc.value)


# --- drvbox sandbox check's judgement of a missing cgroup -----------------------------------------

def _conf(userns: bool) -> tuple[dict, dict]:
    conf = {
        "pid": 1, "userns": userns,
        "status": {"Uid": "65534 65534 65534 65534", "Gid": "65534 65534 65534 65534", "Groups": "",
                   "CapInh": "0" * 16, "CapPrm": "0" * 16, "CapEff": "0" * 16, "CapBnd": "0" * 16,
                   "CapAmb": "0" * 16, "NoNewPrivs": "1", "Seccomp": "2", "Seccomp_filters": "1"},
        "securebits": 0xEB,
        "namespaces": {n: {"inside": f"{n}:[1]", "new": userns or n != "user"}
                       for n in ("user", "pid", "net", "ipc", "uts", "cgroup", "mnt")},
        "mounts": [{"mount_point": "/", "options": "ro,nosuid,nodev", "fstype": "tmpfs"},
                   {"mount_point": "/tmp", "options": "rw,nosuid,nodev,noexec", "fstype": "tmpfs"},
                   {"mount_point": "/proc", "options": "ro,nosuid,nodev,noexec", "fstype": "proc"}],
        "interfaces": ["lo"],
        "rlimits": {"RLIMIT_AS": [1 << 30, 1 << 30], "RLIMIT_NOFILE": [64, 64], "RLIMIT_FSIZE": [16 * MIB, 16 * MIB],
                    "RLIMIT_CORE": [0, 0], "RLIMIT_NPROC": [32, 32]},
        "cgroup": {"inside": [], "missing": True},
        "seccomp": {"default": "errno+log", "allowed": 96},
    }
    probe = {"socket": errno.EPERM, "socketpair": errno.EPERM, "fork": errno.EPERM, "exec": errno.EPERM,
             "write_outside": errno.EROFS, "write_tmp": 0, "thread": 0, "proc_pids": [1]}
    return conf, probe


def _judge(conf, probe, spec, **kw) -> dict:
    return {f.mechanism: f for f in judge(conf, probe, [], spec, ExitStatus(0, None, None), **kw)}


def test_missing_cgroup_is_reported_with_why_and_the_remedy():
    spec = SandboxSpec(name="check", memory_limit_mib=256, optional=NO_CGROUP)
    conf, probe = _conf(userns=True)
    conf["rlimits"]["RLIMIT_AS"] = [limits.address_space_mib(spec) * MIB] * 2
    found = _judge(conf, probe, spec, cgroup_missing="v1: mkdir '/sys/fs/cgroup/pids/x': Permission denied")
    assert [m for m, f in found.items() if not f.ok] == ["cgroup"]
    detail = found["cgroup"].detail
    assert detail.startswith("missing: v1: mkdir '/sys/fs/cgroup/pids/x': Permission denied;")
    assert f"memory limit 256 MiB enforced only as RLIMIT_AS {limits.address_space_mib(spec)} MiB" in detail
    assert "threads bounded by RLIMIT_NPROC 32" in detail
    assert "drvbox run --allow-missing cgroup" in detail


def test_missing_cgroup_without_a_user_namespace_says_threads_are_unbounded():
    spec = SandboxSpec(name="check", optional=NO_CGROUP)
    found = _judge(*_conf(userns=False), spec)
    assert not found["cgroup"].ok
    assert "threads NOT bounded" in found["cgroup"].detail and "no memory limit" in found["cgroup"].detail


def test_rlimits_are_judged_against_the_fallback():
    spec = SandboxSpec(name="check", memory_limit_mib=256, optional=NO_CGROUP)
    conf, probe = _conf(userns=True)
    assert not _judge(copy.deepcopy(conf), probe, spec)["rlimits"].ok       # 1 GiB is not what was planned
    conf["rlimits"]["RLIMIT_AS"] = [limits.address_space_mib(spec) * MIB] * 2
    assert _judge(conf, probe, spec)["rlimits"].ok


# --- a host's memory in `drvbox ls` ----------------------------------------------------------------

def test_pss_is_read_where_readable_and_none_where_not():
    from reflector.hostgroup import _cgroup_memory, _pss
    assert _pss(os.getpid()) > 0                # our own smaps_rollup is always readable to us
    assert _pss(None) is None
    assert _pss(2 ** 22 + 1) is None             # beyond pid_max: no such process, no number
    assert _cgroup_memory(None) is None
    assert _cgroup_memory({"cgroup": {"missing": True}}) is None
