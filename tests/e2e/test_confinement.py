"""End-to-end: real sandboxes, a probe inside (sandbox/probe.py), proof from inside.

Each rule is tested from both sides where it has two: what the host must be able to do (write
its /tmp, start a thread, talk over the fd it was given) next to what it must not.  A refusal
counts only with the errno of *our* layer (EPERM from the seccomp supervisor, EROFS from the
mount view, ESRCH from the pid namespace) and, for seccomp, the supervisor's report naming it.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading

import pytest

from sandbox.errors import ConfinementError
from sandbox.spec import SandboxSpec, spawn

pytestmark = [pytest.mark.needs_seccomp_notify, pytest.mark.usefixtures("require_namespaces")]

HELPERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")
# Only a guard against hanging the whole run if the sandbox never ends; never a measure.
HANG_GUARD = 120.0


def _spec(**kw) -> SandboxSpec:
    kw.setdefault("name", "e2e")
    kw.setdefault("optional", frozenset({"cgroup"}))
    return SandboxSpec(**kw)


class Probe:
    """One sandbox running sandbox.probe:run, with the supervisor's reports collected."""

    def __init__(self, spec: SandboxSpec, checks: list[str], supervisor=None, action: str = "deny",
                 extra_fds=(), **arg):
        self.reports = []
        self._ours, theirs = socket.socketpair()
        try:
            self.box = spawn(spec, "sandbox.probe:run", {"checks": checks, **arg}, [theirs.fileno(), *extra_fds])
        except BaseException:
            self._ours.close()
            raise
        finally:
            theirs.close()
        if supervisor is not None and self.box.notify_fd is not None:
            supervisor.watch(self.box.notify_fd, self.reports.append, action,
                             kill=self.box.kill if action == "kill" else None)
        self.supervisor = supervisor

    def results(self) -> dict:
        chunks = []
        while True:
            chunk = self._ours.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return json.loads(b"".join(chunks)) if chunks else {}

    def finish(self):
        status = self.box.wait(timeout=HANG_GUARD)
        if self.supervisor is not None and self.box.notify_fd is not None:
            self.supervisor.unwatch(self.box.notify_fd)
        self.box.close()
        self._ours.close()
        return status

    def reported(self) -> set[str]:
        return {r.syscall for r in self.reports}


def run_probe(checks, supervisor=None, spec=None, **arg):
    probe = Probe(spec or _spec(), checks, supervisor, **arg)
    results = probe.results()
    status = probe.finish()
    return results, status, probe


# --- seccomp: denied, reported by name; and what stays allowed --------------------------------

def test_socket_denied_with_eperm_and_reported_by_name(supervisor):
    results, status, probe = run_probe(["socket"], supervisor)
    assert results["socket"] == errno.EPERM
    sockets = [r for r in probe.reports if r.syscall == "socket"]
    assert sockets, f"no report naming socket: {probe.reports}"
    assert sockets[0].pid == probe.box.inner_pid
    assert sockets[0].arch == "x86_64"
    assert sockets[0].args[0] == socket.AF_INET
    assert status.code == 0 and status.signal is None


def test_passed_socket_still_works_and_threads_start(supervisor):
    # The allowed side: the probe's results travel over the fd it was given (sendto), and a
    # thread (clone with CLONE_THREAD) starts without any report.
    results, status, probe = run_probe(["thread"], supervisor)
    assert results["thread"] == 0
    assert results["fds"] == [3]
    assert probe.reports == []
    assert status.code == 0


def test_fork_and_exec_fail_and_are_reported(supervisor):
    results, _, probe = run_probe(["fork", "exec"], supervisor)
    assert results["fork"] == errno.EPERM
    assert results["exec"] == errno.EPERM
    assert {"clone", "execve"} <= probe.reported()


def test_on_violation_kill_ends_the_sandbox(supervisor):
    probe = Probe(_spec(on_violation="kill"), ["socket"], supervisor, action="kill")
    assert probe.results() == {}        # killed before it could send anything
    status = probe.finish()
    assert status.signal == signal.SIGKILL
    assert "socket" in probe.reported()


# --- file system: only /tmp is writable ---------------------------------------------------------

def test_writes_outside_tmp_fail_with_erofs_and_tmp_is_writable():
    results, _, _ = run_probe(["write_outside", "write_tmp"])
    assert results["write_outside"] == errno.EROFS
    assert results["write_tmp"] == 0


def test_view_holds_only_what_the_host_needs():
    results, _, probe = run_probe(["root_listing"])
    mounts = probe.box.confinement["mounts"]
    # Every name at the top of the view is there because something is mounted at or under it;
    # which names those are depends on where Python and the checkout live, so derive them.
    tops = {m["mount_point"].split("/")[1] for m in mounts if m["mount_point"] != "/"}
    # ...or because a bind's path goes through a symlink there (merged /usr: /lib -> usr/lib).
    links = {name for name in results["root_listing"] if os.path.islink("/" + name)}
    assert set(results["root_listing"]) <= tops | links | {"dev", "proc", "tmp"}
    assert {"proc", "tmp"} <= set(results["root_listing"])
    writable = [m["mount_point"] for m in mounts if "ro" not in m["options"].split(",")]
    assert writable == ["/tmp"]
    assert [m for m in mounts if m["mount_point"] == "/"][0]["fstype"] == "tmpfs"
    assert "/home" not in {m["mount_point"] for m in mounts}
    repo = os.path.dirname(os.path.dirname(HELPERS))
    # A checkout under /tmp has, at its own path, a directory the view made on the way to the
    # packages it binds (the host's tmpfs, bound onto itself read-only: see sandbox/mounts.py);
    # the repository itself, from its own file system, must not be there.
    host_tmp = [(m["fstype"], m["super_options"]) for m in mounts if m["mount_point"] == "/tmp"]
    at_repo = [(m["fstype"], m["super_options"]) for m in mounts if m["mount_point"] == repo]
    assert all(m in host_tmp for m in at_repo), f"the whole repository is bound: {at_repo}"


# --- processes: none visible outside, none signalable ------------------------------------------

def test_cannot_see_or_signal_processes_outside():
    results, _, probe = run_probe(["proc_pids", "kill_outside"], outside_pid=os.getpid())
    assert results["proc_pids"] == [1]
    assert results["kill_outside"] == errno.ESRCH
    assert probe.box.confinement["pid"] == 1


# --- identity, capabilities, no_new_privs, seccomp mode ----------------------------------------

def _status(probe) -> dict:
    return probe.box.confinement["status"]


def test_capabilities_empty_nnp_and_seccomp_in_force():
    _, _, probe = run_probe([])
    st = _status(probe)
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[field], 16) == 0, f"{field} = {st[field]}"
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    assert probe.box.confinement["securebits"] & 0xAA == 0xAA     # every lock bit


def test_uid_non_zero_inside_and_no_groups():
    results, _, probe = run_probe(["getuid"])
    uid, gid, groups = results["getuid"]
    assert uid != 0 and gid != 0
    assert all(u != "0" for u in _status(probe)["Uid"].split())
    if os.geteuid() == 0:
        # A root parent leaves setgroups(2) allowed, and the host clears its groups itself.
        assert groups == []
    else:
        # An unprivileged parent must deny setgroups(2) before it may write gid_map, so the host
        # keeps this user's groups (SECURITY.md, known limits): inside, ours shows as the host's
        # own gid (the one mapped) and any other as the overflow gid -- nothing else.
        assert probe.box.confinement["setgroups"] == "deny"
        with open("/proc/sys/kernel/overflowgid") as f:
            overflow = int(f.read())
        assert sorted(groups) == sorted(gid if g == os.getegid() else overflow for g in os.getgroups())
        assert set(groups) <= {gid, overflow}


@pytest.mark.needs_userns
def test_user_namespace_maps_an_unprivileged_id():
    results, _, probe = run_probe(["getuid"], spec=_spec(userns=True))
    assert results["getuid"][:2] == [65534, 65534]
    # Root maps the host's id to the same unprivileged id outside; an unprivileged parent may
    # only map its own ids.  Either way exactly one id, never 0 outside.
    outer_uid, outer_gid = (65534, 65534) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    assert outer_uid != 0 and outer_gid != 0
    assert probe.box.confinement["uid_map"] == ["65534", str(outer_uid), "1"]
    assert probe.box.confinement["gid_map"] == ["65534", str(outer_gid), "1"]
    assert probe.box.confinement["namespaces"]["user"]["new"]


def test_every_namespace_is_new_and_no_network():
    _, _, probe = run_probe([])
    ns = probe.box.confinement["namespaces"]
    for name in ("pid", "net", "ipc", "uts", "cgroup", "mnt"):
        assert ns[name]["new"], name
    assert probe.box.confinement["interfaces"] in ([], ["lo"])


# --- limits ---------------------------------------------------------------------------------

def test_memory_bomb_is_stopped_by_rlimit_as_inside_its_own_sandbox():
    results, status, probe = run_probe(["memory_bomb"], spec=_spec(address_space_mib=256))
    assert results["memory_bomb"] == "MemoryError"
    assert probe.box.confinement["rlimits"]["RLIMIT_AS"] == [256 << 20, 256 << 20]
    assert status.code == 0     # the sandbox ended on its own terms; this process is untouched


@pytest.mark.needs_cgroup
def test_memory_bomb_is_killed_by_the_cgroup_limit():
    spec = _spec(address_space_mib=None, memory_limit_mib=64, optional=frozenset())
    probe = Probe(spec, ["memory_bomb"])
    assert probe.results() == {}
    status = probe.finish()
    assert status.signal == signal.SIGKILL
    assert status.step == "limits"
    assert probe.box.cgroup_left == []


def test_rlimits_are_as_the_spec_says():
    _, _, probe = run_probe([], spec=_spec(max_open_files=32, max_file_size_mib=2))
    rl = probe.box.confinement["rlimits"]
    assert rl["RLIMIT_NOFILE"] == [32, 32]
    assert rl["RLIMIT_FSIZE"] == [2 << 20, 2 << 20]
    assert rl["RLIMIT_CORE"] == [0, 0]


# --- lifetime: the host dies with its parent; kill is immediate and idempotent -----------------

def _pidfd_if_child_of(pid: int, parent: int) -> int:
    fd = os.pidfd_open(pid)
    with open(f"/proc/{pid}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[1]) == parent
    return fd


@pytest.mark.parametrize("target", ["idle", "deaf"])
@pytest.mark.parametrize("mode", ["default", pytest.param("userns", marks=pytest.mark.needs_userns)])
def test_sandbox_dies_when_its_parent_dies(mode, target):
    """``deaf`` ignores its socket's EOF, so only PR_SET_PDEATHSIG can end it: the launcher's
    (its parent died) and then the host's (the launcher died).  The kernel sends the host's with
    the dying launcher's credentials, so this fails if the launcher's reaper may not kill(2) it."""
    helper = subprocess.Popen([sys.executable, os.path.join(HELPERS, "spawn_and_wait.py"), mode, target],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = json.loads(helper.stdout.readline())
        launcher = _pidfd_if_child_of(line["pid"], helper.pid)
        host = _pidfd_if_child_of(line["inner_pid"], line["pid"])
        helper.kill()
        helper.wait()
        for fd in (launcher, host):
            ready, _, _ = select.select([fd], [], [], HANG_GUARD)
            assert ready, "the sandbox outlived its parent"
            os.close(fd)
    finally:
        helper.kill()
        helper.wait()
        helper.stdin.close()
        helper.stdout.close()


def test_kill_ends_host_and_is_idempotent():
    ours, theirs = socket.socketpair()
    box = spawn(_spec(), "sandbox.probe:idle", {}, [theirs.fileno()])
    theirs.close()
    host = _pidfd_if_child_of(box.inner_pid, box.pid)
    assert box.poll() is None
    with pytest.raises(TimeoutError, match="still running"):
        box.wait(timeout=0)
    box.kill()
    box.kill()
    status = box.wait(timeout=HANG_GUARD)
    assert status.signal == signal.SIGKILL
    assert select.select([host], [], [], 0)[0]     # the host is gone once wait() returned
    box.kill()
    assert box.poll() == status
    os.close(host)
    box.close()
    ours.close()


def test_pidfd_is_readable_when_the_sandbox_ends():
    ours, theirs = socket.socketpair()
    box = spawn(_spec(), "sandbox.probe:idle", {}, [theirs.fileno()])
    theirs.close()
    assert select.select([box.pidfd], [], [], 0)[0] == []
    ours.close()                            # the host reads EOF and exits 0
    assert select.select([box.pidfd], [], [], HANG_GUARD)[0] == [box.pidfd]
    assert box.wait().code == 0
    box.close()


def test_wait_concurrently_from_two_threads():
    ours, theirs = socket.socketpair()
    box = spawn(_spec(), "sandbox.probe:idle", {}, [theirs.fileno()])
    theirs.close()
    got = []
    threads = [threading.Thread(target=lambda: got.append(box.wait(timeout=HANG_GUARD))) for _ in range(2)]
    for t in threads:
        t.start()
    ours.close()
    for t in threads:
        t.join()
    assert got[0] == got[1] and got[0].code == 0
    box.close()


# --- failures: named steps, nothing left behind ------------------------------------------------

def test_failed_step_is_reported_by_name():
    with pytest.raises(ConfinementError) as info:
        spawn(_spec(readonly_paths=("/nonexistent/drvbox-driver-dir",)), "sandbox.probe:idle", {}, [])
    exc = info.value
    assert exc.step == "mounts"
    assert exc.errno == errno.ENOENT
    assert "/nonexistent/drvbox-driver-dir" in exc.call
    assert "'mounts' failed" in str(exc) and "ENOENT" in str(exc) and "readonly_paths" in str(exc)


@pytest.mark.parametrize("path", ["/", "/tmp", "/tmp/", "/proc/self", "/dev/shm"])
def test_a_bind_over_what_the_view_is_made_of_is_refused_before_spawning(path):
    with pytest.raises(ConfinementError) as info:
        _spec(readonly_paths=(path,))
    assert info.value.step == "spec" and "a bind may not be /, /tmp" in str(info.value)


def test_a_path_that_resolves_into_proc_is_refused_by_the_view(tmp_path):
    # The spec sees an ordinary path; only the view, binding what it resolves to, can tell.
    link = tmp_path / "looks-harmless"
    link.symlink_to("/proc/self")
    with pytest.raises(ConfinementError) as info:
        spawn(_spec(readonly_paths=(str(link),)), "sandbox.probe:idle", {}, [])
    assert info.value.step == "mounts" and info.value.errno == errno.EINVAL
    assert "a bind may not be" in str(info.value)


def test_failed_import_is_reported_by_name():
    with pytest.raises(ConfinementError) as info:
        spawn(_spec(), "sandbox.no_such_module:run", {}, [])
    assert info.value.step == "import"
    assert "no_such_module" in info.value.call


def test_no_fd_leaks_after_success_and_after_failure(open_fds):
    before = open_fds()
    _, _, _ = run_probe([])
    with pytest.raises(ConfinementError):
        spawn(_spec(readonly_paths=("/nonexistent",)), "sandbox.probe:idle", {}, [])
    with pytest.raises(ConfinementError):
        spawn(_spec(extra_syscalls=("execve",)), "sandbox.probe:idle", {}, [])
    assert open_fds() == before


def test_host_holds_only_its_fds_not_the_listener():
    # The host must not keep the seccomp listener (it could answer its own notifications) nor
    # the control socket: only 0-2 and the fds it was given.  The host lists its own
    # /proc/self/fd: from outside, an unprivileged parent may not read it (not dumpable).
    extra_r, extra_w = os.pipe()
    try:
        try:
            probe = Probe(_spec(), ["open_fds"], extra_fds=[extra_r])
        finally:
            os.close(extra_r)           # the host holds its own copy now
        try:
            results = probe.results()
        finally:
            status = probe.finish()
        held = dict(results["open_fds"])
        assert results["fds"] == [3, 4]
        assert sorted(held) == [0, 1, 2, 3, 4], held
        assert held[3].startswith("socket:"), held
        assert held[4] == f"pipe:[{os.fstat(extra_w).st_ino}]", held   # our pipe, not another
        assert status.code == 0
    finally:
        os.close(extra_w)


@pytest.mark.needs_cgroup
def test_cgroup_is_removed_when_the_host_ends():
    results, status, probe = run_probe([], spec=_spec(optional=frozenset(), memory_limit_mib=128))
    paths = probe.box.confinement["cgroup"]["paths"]
    assert paths and all(not os.path.exists(p) for p in paths)
    assert status.code == 0


def test_drvbox_sandbox_check_passes():
    """Every mechanism in force; where this machine cannot give a host a cgroup (an unprivileged
    user on a hybrid hierarchy), that one alone is reported missing, and the exit status says so."""
    from sandbox.check import cgroup_unavailable
    result = subprocess.run([sys.executable, "-m", "reflector.cli", "sandbox", "check", "--json"],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(HELPERS)))
    report = json.loads(result.stdout)
    failing = {m["mechanism"] for m in report["mechanisms"] if not m["ok"]}
    if cgroup_unavailable() is None:
        assert result.returncode == 0 and report["ok"], failing
    else:
        assert result.returncode == 1 and not report["ok"] and failing == {"cgroup"}, failing
    assert {m["mechanism"] for m in report["mechanisms"]} >= {
        "namespaces", "identity", "capabilities", "no_new_privs", "seccomp", "mounts", "network",
        "rlimits", "cgroup"}
