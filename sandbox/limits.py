"""Resource limits: rlimits (child side) as a table.  cgroups live in sandbox/cgroups.py.

Soft and hard limits are set equal: the host, holding no CAP_SYS_RESOURCE, can lower them but
never raise them back.

RLIMIT_NPROC counts every process *and thread* of a uid across the whole user namespace.  With
a user namespace of its own each host has its own count, so it bounds the host's threads.
Without one (a root parent), all hosts share uid 65534 and a per-host NPROC would starve the
others: then the threads are bounded by the cgroup pids controller alone -- and, without a cgroup,
by nothing but the room RLIMIT_AS leaves for their stacks.

A memory limit is the cgroup's to enforce (it counts the pages a host really uses).  A spec that
lets the cgroup be missing (``"cgroup" in spec.optional``) also carries its memory limit in
RLIMIT_AS, less precisely, so that the limit holds whether or not this host gets a cgroup --
which is known only once it is spawned.  See ``address_space_mib``.
"""

from __future__ import annotations

MIB = 1024 * 1024

# What RLIMIT_AS leaves a host beyond its memory limit when it stands in for the cgroup, so that
# the memory limit is roughly what the driver itself can allocate.  Measured (VmSize of hosts
# serving the echo driver, less their arena and thread stacks; CPython 3.11, pyenv's and
# Debian's): 19.6-21 MiB for the interpreter, its shared libraries, its heap and the modules a
# host imports, plus a little for a driver's own imports.  Not counted: the 64 MiB of
# PROT_NONE address space glibc reserves for a second malloc arena -- under a tight RLIMIT_AS
# that reservation fails and malloc keeps to its main arena; where there is room for it, it takes
# part of the limit, which errs on the strict side.
RUNTIME_MIB = 24
# The stack of each thread the host may run (MaxThreads): hosts/main.py THREAD_STACK, 1 MiB.  A
# target that keeps glibc's default 8 MiB stacks can run fewer threads under this bound.
THREAD_STACK_MIB = 1


def address_space_mib(spec) -> int | None:
    """The RLIMIT_AS a host of ``spec`` gets, in MiB (None: no limit).

    ``spec.address_space_mib``, except when the spec has a memory limit and accepts a missing
    cgroup: then the memory limit, plus the runtime (RUNTIME_MIB), a stack for each thread it
    may run, and what its parent maps into it (``spec.mapped_mib``: arena, DMA buffers, register
    windows) -- never above ``spec.address_space_mib``.  Address space is not memory used: a
    driver running fewer threads than it may can allocate their stacks' worth more."""
    cap = spec.address_space_mib
    if spec.memory_limit_mib is None or "cgroup" not in spec.optional:
        return cap
    fallback = spec.memory_limit_mib + RUNTIME_MIB + THREAD_STACK_MIB * spec.max_threads + spec.mapped_mib
    return fallback if cap is None else min(cap, fallback)


def plan(spec, userns: bool) -> list[tuple[str, int]]:
    """(resource name, value) pairs for the child; a None in the spec means no limit there."""
    address_space = address_space_mib(spec)
    table = [
        ("RLIMIT_AS", None if address_space is None else address_space * MIB),
        ("RLIMIT_NOFILE", spec.max_open_files),
        ("RLIMIT_FSIZE", spec.max_file_size_mib * MIB),
        ("RLIMIT_CORE", 0),                           # a crash must not write the driver's memory out
        ("RLIMIT_NPROC", spec.max_threads if userns else None),
    ]
    return [(name, value) for name, value in table if value is not None]


def apply(limits: list[tuple[str, int]]) -> None:
    import resource
    for name, value in limits:
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (OSError, ValueError) as exc:
            raise OSError(getattr(exc, "errno", None) or 22, str(exc),
                          f"setrlimit({name}, ({value}, {value}))") from None


def read(names=("RLIMIT_AS", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_CORE", "RLIMIT_NPROC")) -> dict:
    import resource
    return {name: list(resource.getrlimit(getattr(resource, name))) for name in names}
