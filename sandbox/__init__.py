"""Confinement of host processes: one module per kernel mechanism, applied in order by spawn.

Public surface (loaded on first use, so that the launcher, which imports this package inside
every host, pays only for what it uses):

    from sandbox import SandboxSpec, spawn, Sandboxed, ExitStatus, ConfinementError
    from sandbox import SyscallSupervisor, SyscallReport

Where each piece lives:

    spec.py          SandboxSpec: restrictive defaults in one place
    spawning.py      spawn / Sandboxed / ExitStatus: the parent side, one entry point
    launcher.py      the child side: ``confine()`` lists the whole sequence, in order, argued
    namespaces.py    user (when not root), pid, net, ipc, uts, cgroup, mount; uid/gid maps
    mounts.py        the read-only view, private /tmp, fresh /proc, pivot_root
    identity.py      setsid, setgroups, setresgid, setresuid
    capabilities.py  securebits locked, every capability set empty
    limits.py        rlimits        cgroups.py   per-host memory/pids cgroup, v2 or v1
    syscalls.py      the allowlist, one reason per call, and what is never allowed
    seccomp.py       the filter (pyseccomp), default action: user notification
    notify.py        SyscallSupervisor: reports each refused call, answers EPERM or kills
    readback.py      what is in force, read back from inside
    check.py         ``drvbox sandbox check``      probe.py   the probe target it runs
"""

_EXPORTS = {
    "SandboxSpec": "sandbox.spec",
    "ConfinementError": "sandbox.errors",
    "spawn": "sandbox.spawning",
    "Sandboxed": "sandbox.spawning",
    "ExitStatus": "sandbox.spawning",
    "SyscallSupervisor": "sandbox.notify",
    "SyscallReport": "sandbox.notify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(module), name)
