"""Resource limits: rlimits (child side) as a table.  cgroups live in sandbox/cgroups.py.

Soft and hard limits are set equal: the host, holding no CAP_SYS_RESOURCE, can lower them but
never raise them back.

RLIMIT_NPROC counts every process *and thread* of a uid across the whole user namespace.  With
a user namespace of its own each host has its own count, so it bounds the host's threads.
Without one (a root parent), all hosts share uid 65534 and a per-host NPROC would starve the
others: then the threads are bounded by the cgroup pids controller alone.
"""

from __future__ import annotations

MIB = 1024 * 1024


def plan(spec, userns: bool) -> list[tuple[str, int]]:
    """(resource name, value) pairs for the child; a None in the spec means no limit there."""
    table = [
        ("RLIMIT_AS", None if spec.address_space_mib is None else spec.address_space_mib * MIB),
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
