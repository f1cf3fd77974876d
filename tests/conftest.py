"""Shared fixtures, and the environment probes behind the skip markers.

A test marked ``needs_userns``, ``needs_seccomp_notify``, ``needs_root`` or ``needs_cgroup`` runs
only where its probe finds the feature, and is otherwise skipped with the probe's reason.  Each
probe asks the real kernel once per session (no mocks); a machine that has the feature never
skips.  Add fixtures below by topic; keep the probes first.
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


@functools.lru_cache(maxsize=None)
def _probe_sandbox() -> str | None:
    """Everything a host needs, asked the only honest way: by confining a real process once."""
    for probe in (_probe_seccomp_notify, _probe_cgroup):
        missing = probe()
        if missing:
            return missing
    if os.geteuid() != 0:
        missing = _probe_userns()
        if missing:
            return missing
    code = ("import sys; from sandbox import spawn, SandboxSpec\n"
            "s = spawn(SandboxSpec(name='probe'), 'sandbox.probe:idle', {}, [])\n"
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
