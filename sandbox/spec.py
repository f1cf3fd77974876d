"""``SandboxSpec``: what one sandbox must be.  Restrictive defaults, all in one place.

``spawn``, ``Sandboxed``, ``ExitStatus`` and ``ConfinementError`` are reachable from here too
(``from sandbox.spec import spawn``), loaded on first use so that the launcher, which imports
nothing of the parent side, stays small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sandbox.errors import ConfinementError

# Mechanisms a caller may accept as missing.  Anything not named in spec.optional is mandatory.
OPTIONAL_MECHANISMS = frozenset({"cgroup", "seccomp_notify"})

# The identity of a host when the spec names none: the traditional "nobody"/"nogroup", which own
# no file a host could reach.  Non-zero, also inside the user namespace.
DEFAULT_UID = 65534
DEFAULT_GID = 65534

# RLIMIT_AS by default.  CPython itself needs ~30 MiB of address space, but every thread reserves
# its stack (8 MiB) and glibc reserves up to 64 MiB per malloc arena (the launcher caps arenas at
# 2 with MALLOC_ARENA_MAX); 1 GiB lets a host run its 32 threads and still stops a runaway
# allocation long before it hurts the machine.  The cgroup memory limit is the precise bound;
# without a cgroup, a memory limit lowers RLIMIT_AS instead (sandbox/limits.py).
DEFAULT_ADDRESS_SPACE_MIB = 1024

ON_VIOLATION = ("deny", "kill")


@dataclass(frozen=True)
class SandboxSpec:
    name: str
    readonly_paths: tuple[str, ...] = ()
    uid: int | None = None
    gid: int | None = None
    userns: bool | None = None
    tmpfs_mib: int = 16
    address_space_mib: int | None = DEFAULT_ADDRESS_SPACE_MIB
    max_open_files: int = 64
    max_threads: int = 32
    max_file_size_mib: int = 16
    memory_limit_mib: int | None = None   # the cgroup's; also RLIMIT_AS's when the cgroup is optional
    # What the parent maps into the host (its arena, DMA buffers, register windows): in its
    # address space but not its own allocation, so RLIMIT_AS standing in for a missing cgroup
    # leaves room for it (sandbox/limits.py address_space_mib).
    mapped_mib: int = 0
    extra_syscalls: tuple[str, ...] = ()
    on_violation: str = "deny"
    optional: frozenset[str] = field(default_factory=frozenset)
    # None: ioctl allowed (but for TIOCSTI/TIOCLINUX).  Ranges (lo, hi): ioctl allowed only for
    # these requests and the runtime's own (syscalls.BASE_IOCTLS) -- a policy's DeviceNodes codes.
    ioctl_ranges: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        problems = []
        for attr in ("uid", "gid"):
            value = getattr(self, attr)
            if value is not None and (not isinstance(value, int) or value <= 0 or value >= 2**32 - 1):
                problems.append(f"{attr}={value!r} (must be a non-zero, unprivileged id)")
        if self.on_violation not in ON_VIOLATION:
            problems.append(f"on_violation={self.on_violation!r} (must be one of {ON_VIOLATION})")
        unknown = set(self.optional) - OPTIONAL_MECHANISMS
        if unknown:
            problems.append(f"optional={sorted(unknown)!r} (only {sorted(OPTIONAL_MECHANISMS)} may be optional)")
        for attr in ("tmpfs_mib", "max_open_files", "max_threads", "max_file_size_mib"):
            if getattr(self, attr) <= 0:
                problems.append(f"{attr}={getattr(self, attr)!r} (must be positive)")
        for attr in ("address_space_mib", "memory_limit_mib"):
            value = getattr(self, attr)
            if value is not None and value <= 0:
                problems.append(f"{attr}={value!r} (must be positive, or None)")
        if not isinstance(self.mapped_mib, int) or self.mapped_mib < 0:
            problems.append(f"mapped_mib={self.mapped_mib!r} (must be a whole number of MiB, 0 or more)")
        if self.ioctl_ranges is not None:
            for r in self.ioctl_ranges:
                if (not isinstance(r, tuple) or len(r) != 2 or not all(isinstance(x, int) for x in r)
                        or not 0 <= r[0] <= r[1] <= 0xFFFFFFFF):
                    problems.append(f"ioctl_ranges entry {r!r} (must be (lo, hi) within 32 bits, lo <= hi)")
        from sandbox.mounts import UNBINDABLE, bindable
        for path in self.readonly_paths:
            if not isinstance(path, str) or not path.startswith("/"):
                problems.append(f"readonly_paths entry {path!r} (must be an absolute path)")
            elif not bindable(path):
                problems.append(f"readonly_paths entry {path!r} ({UNBINDABLE})")
        if problems:
            raise ConfinementError("spec", "SandboxSpec(" + ", ".join(problems) + ")", name=self.name,
                                   hint="fix the process group's settings in the registry or policy")


def __getattr__(name: str):
    if name in ("spawn", "Sandboxed", "ExitStatus"):
        import importlib
        return getattr(importlib.import_module("sandbox.spawning"), name)
    raise AttributeError(f"module 'sandbox.spec' has no attribute {name!r}")
