"""Shared fixtures, and the environment probes behind the skip markers.

A test marked ``needs_userns``, ``needs_seccomp_notify``, ``needs_root``, ``needs_cgroup`` or
``needs_sandbox`` runs only where its probe finds the feature, and is otherwise skipped with the
probe's reason.  Each probe asks the real kernel once per session (no mocks); a machine that has
the feature never skips.  ``needs_sandbox`` is a host's confinement without its cgroup: where no
cgroup can be made (an unprivileged user, a hybrid hierarchy), the tests' Device Managers run with
``--allow-missing cgroup`` and only the tests of cgroup limits skip.  Add fixtures below by topic;
keep the probes first.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- environment probes: each returns None (present) or why it is missing --------------------

@functools.lru_cache(maxsize=None)
def _probe_userns() -> str | None:
    # In a fresh process: unshare(CLONE_NEWUSER) needs a single-threaded caller.
    code = ("import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
            "sys.exit(0 if libc.unshare(0x10000000) == 0 else ctypes.get_errno())")
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code])
    if result.returncode:
        return f"unshare(CLONE_NEWUSER) failed here (errno {result.returncode}): user namespaces are unavailable"
    return None


@functools.lru_cache(maxsize=None)
def _probe_seccomp_notify() -> str | None:
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as f:
            actions = f.read().split()
    except OSError as exc:
        return f"cannot read /proc/sys/kernel/seccomp/actions_avail: {exc.strerror}"
    return None if "user_notif" in actions else f"seccomp user notification not offered (actions: {actions})"


@functools.lru_cache(maxsize=None)
def _probe_root() -> str | None:
    return None if os.geteuid() == 0 else f"runs as uid {os.geteuid()}, needs root"


@functools.lru_cache(maxsize=None)
def _probe_cgroup() -> str | None:
    from sandbox import cgroups
    from sandbox.errors import ConfinementError
    try:
        group = cgroups.create("probe", 16, 4, frozenset())
    except ConfinementError as exc:
        return f"no writable memory+pids cgroup: {exc.call}"
    group.remove()
    return None


def sandbox_optional() -> frozenset[str]:
    """What a Device Manager started by a test must be told to do without (`drvbox run
    --allow-missing`): the cgroup, and only where its probe finds none we can write.  Nothing else
    is ever accepted as missing: a machine without namespaces or seccomp skips needs_sandbox."""
    return frozenset({"cgroup"}) if _probe_cgroup() else frozenset()


@functools.lru_cache(maxsize=None)
def _probe_sandbox() -> str | None:
    """Namespaces and seccomp with user notification, asked the only honest way: by confining a
    real process once.  Not the cgroup: hosts run without one where the operator accepts it
    (sandbox_optional), and a test that relies on cgroup limits says needs_cgroup."""
    missing = _probe_seccomp_notify()
    if missing:
        return missing
    if os.geteuid() != 0:
        missing = _probe_userns()
        if missing:
            return missing
    code = ("import sys; from sandbox import spawn, SandboxSpec\n"
            f"s = spawn(SandboxSpec(name='probe', optional=frozenset({sorted(sandbox_optional())!r})), "
            "'sandbox.probe:idle', {}, [])\n"
            "s.wait(30); s.close()")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    if result.returncode:
        return "a sandbox cannot be started here: " + (result.stderr.strip().splitlines() or ["?"])[-1]
    return None


PROBES = {
    "needs_sandbox": _probe_sandbox,
    "needs_userns": _probe_userns,
    "needs_seccomp_notify": _probe_seccomp_notify,
    "needs_root": _probe_root,
    "needs_cgroup": _probe_cgroup,
}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, probe in PROBES.items():
        if item.get_closest_marker(marker) is not None:
            missing = probe()
            if missing:
                pytest.skip(f"{marker}: {missing}")


def pytest_collection_finish(session: pytest.Session) -> None:
    # The harness that starts real Device Managers (tests/e2e/dm_harness.py, also behind the
    # adversarial kit) passes them what this machine lacks.  Every test module that uses it has
    # imported it by now; its own default, outside a test session, accepts nothing as missing.
    harness = sys.modules.get("dm_harness")
    if harness is not None:
        harness.missing_here = sandbox_optional


# --- sandbox fixtures -------------------------------------------------------------------------

@pytest.fixture
def supervisor():
    """A started SyscallSupervisor, stopped after the test."""
    from sandbox.notify import SyscallSupervisor
    sup = SyscallSupervisor()
    sup.start()
    yield sup
    sup.stop()


@pytest.fixture
def require_namespaces():
    """Skip unless this process can give a sandbox its namespaces: as root always; otherwise
    only through a user namespace."""
    if os.geteuid() != 0:
        missing = _probe_userns()
        if missing:
            pytest.skip(f"needs_userns (not root): {missing}")


@pytest.fixture
def open_fds():
    """The fds of this process, as a function: compare before and after to find leaks."""
    def listing() -> list[int]:
        return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    return listing
