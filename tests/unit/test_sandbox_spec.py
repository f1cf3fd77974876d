"""SandboxSpec validation, ConfinementError messages, the allowlist table, refused extra calls."""

from __future__ import annotations

import errno
import pickle

import pytest

from sandbox import errors, syscalls
from sandbox.errors import ConfinementError
from sandbox.spec import SandboxSpec


def test_defaults_are_restrictive():
    spec = SandboxSpec(name="x")
    assert spec.uid is None and spec.gid is None            # documented default: 65534
    assert spec.on_violation == "deny"
    assert spec.optional == frozenset()                      # nothing may be missing by default
    assert spec.max_open_files == 64 and spec.max_threads == 32


@pytest.mark.parametrize("kw, text", [
    ({"uid": 0}, "uid=0"),
    ({"gid": 0}, "gid=0"),
    ({"uid": -5}, "uid=-5"),
    ({"on_violation": "allow"}, "on_violation='allow'"),
    ({"optional": frozenset({"seccomp"})}, "only ['cgroup', 'seccomp_notify'] may be optional"),
    ({"max_threads": 0}, "max_threads=0"),
    ({"memory_limit_mib": 0}, "memory_limit_mib=0"),
    ({"readonly_paths": ("relative/dir",)}, "'relative/dir' (must be an absolute path)"),
])
def test_bad_spec_is_refused_with_the_value_named(kw, text):
    with pytest.raises(ConfinementError) as info:
        SandboxSpec(name="host group 7", **kw)
    assert info.value.step == "spec"
    assert text in str(info.value)
    assert str(info.value).startswith("host group 7: confinement step 'spec' failed")


def test_good_spec_is_accepted():
    SandboxSpec(name="ok", uid=1000, gid=1000, optional=frozenset({"cgroup", "seccomp_notify"}),
                readonly_paths=("/opt/drivers",), memory_limit_mib=64, on_violation="kill")


def test_confinement_error_message_names_step_call_errno_and_hint():
    exc = ConfinementError("mounts", "bind '/x': open('/x', O_PATH)", errno.ENOENT, name="host group 1")
    text = str(exc)
    assert "host group 1: confinement step 'mounts' failed: bind '/x': open('/x', O_PATH): ENOENT" in text
    assert "No such file or directory" in text
    assert "hint: " in text and "readonly_paths" in text
    assert (exc.step, exc.call, exc.errno) == ("mounts", "bind '/x': open('/x', O_PATH)", errno.ENOENT)


def test_confinement_error_without_errno_and_pickles():
    exc = ConfinementError("import", "ModuleNotFoundError: No module named 'x'", name="n")
    assert "refused" in str(exc) and exc.errno is None
    again = pickle.loads(pickle.dumps(exc))
    assert (again.step, again.call, again.errno, str(again)) == (exc.step, exc.call, exc.errno, str(exc))


def test_step_exit_statuses_are_distinct_and_below_the_hosts_own():
    codes = list(errors.EXIT_STATUS.values())
    assert len(set(codes)) == len(errors.STEPS)
    assert min(codes) >= 64 and max(codes) < 80       # hosts/exits.py starts at 80
    assert all(errors.STEP_OF_EXIT[c] == s for s, c in errors.EXIT_STATUS.items())


def test_every_allowed_call_has_a_reason_and_none_is_forbidden():
    for name, reason in syscalls.ALLOWED.items():
        assert reason.strip(), name
    assert not set(syscalls.ALLOWED) & set(syscalls.FORBIDDEN)


@pytest.mark.parametrize("name", ["execve", "execveat", "fork", "vfork", "ptrace", "socket", "connect",
                                  "mount", "umount2", "pivot_root", "bpf", "keyctl", "add_key", "request_key",
                                  "unshare", "setns", "init_module", "finit_module", "kexec_load",
                                  "perf_event_open", "userfaultfd", "io_uring_setup", "process_vm_readv",
                                  "process_vm_writev", "clone3"])
def test_never_allowed_calls_are_not_in_the_allowlist_and_refused_as_extra(name):
    assert name not in syscalls.ALLOWED
    assert name in syscalls.FORBIDDEN
    assert syscalls.refuse_forbidden((name,)) == [f"{name} ({syscalls.FORBIDDEN[name]})"]


def test_clone_is_not_allowed_unconditionally():
    # clone is added by sandbox/seccomp.py with the CLONE_THREAD condition only.
    assert "clone" not in syscalls.ALLOWED


def test_forbidden_extra_syscalls_refused_before_any_process_starts():
    from sandbox.spawning import prepare
    with pytest.raises(ConfinementError) as info:
        prepare(SandboxSpec(name="g", extra_syscalls=("getitimer", "execve", "ptrace")), "sandbox.probe:run", {}, 0)
    assert info.value.step == "spec"
    assert "execve (runs a new program" in info.value.call and "ptrace" in info.value.call
    assert "getitimer" not in info.value.call
    assert "remove them from the policy's Syscalls" in str(info.value)


def test_unknown_extra_syscall_refused():
    from sandbox.spawning import prepare
    with pytest.raises(ConfinementError) as info:
        prepare(SandboxSpec(name="g", extra_syscalls=("no_such_call",)), "sandbox.probe:run", {}, 0)
    assert "unknown system calls ['no_such_call']" in str(info.value)


def test_allowed_extra_syscall_joins_the_allowlist():
    from sandbox.spawning import prepare
    plan = prepare(SandboxSpec(name="g", extra_syscalls=("getitimer",)), "sandbox.probe:run", {}, 0)
    assert "getitimer" in plan["syscalls"]
    assert set(syscalls.ALLOWED) <= set(plan["syscalls"])


@pytest.mark.parametrize("target", ["", "sandbox.probe", "sandbox.probe:", ":run", "sandbox/probe:run",
                                    "sandbox.probe:run:x", "1x:run"])
def test_malformed_target_refused(target):
    from sandbox.spawning import prepare
    with pytest.raises(ConfinementError) as info:
        prepare(SandboxSpec(name="g"), target, {}, 0)
    assert info.value.step == "spec"
    assert "package.module:function" in str(info.value)


def test_target_whose_package_does_not_exist_refused():
    from sandbox.spawning import prepare
    with pytest.raises(ConfinementError) as info:
        prepare(SandboxSpec(name="g"), "no_such_package_xyz.mod:run", {}, 0)
    assert "no module 'no_such_package_xyz'" in str(info.value)
