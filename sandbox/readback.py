"""What is in force, read back from inside the sandbox after seccomp is loaded.

Runs under the host's filter, so it uses only calls the allowlist has (``os.open``/``os.read``
rather than ``open()``, which would ask the terminal with an ioctl).  It states what the kernel
says, not what was asked: the parent and ``drvbox sandbox check`` judge it.
"""

from __future__ import annotations

import os

STATUS_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                 "NoNewPrivs", "Seccomp", "Seccomp_filters")


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks).decode(errors="replace")
            chunks.append(chunk)
    finally:
        os.close(fd)


def status() -> dict[str, str]:
    found = {}
    for line in _read("/proc/self/status").splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            found[key] = " ".join(value.split())
    return found


def mounts() -> list[dict]:
    """/proc/self/mountinfo: mount point, file system type, per-mount and super-block options."""
    found = []
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        found.append({"mount_point": fields[4], "options": fields[5],
                      "fstype": rfields[0] if rfields else "?",
                      "super_options": rfields[2] if len(rfields) > 2 else ""})
    return found


def interfaces() -> list[str]:
    lines = _read("/proc/self/net/dev").splitlines()[2:]
    return [line.split(":", 1)[0].strip() for line in lines if ":" in line]


def namespaces(names) -> dict[str, str]:
    return {name: os.readlink(f"/proc/self/ns/{name}") for name in names}


def read_all(ns_names, rlimits: dict, securebits: int) -> dict:
    return {
        "pid": os.getpid(),
        "status": status(),
        "uid_map": _read("/proc/self/uid_map").split(),
        "gid_map": _read("/proc/self/gid_map").split(),
        "setgroups": _read("/proc/self/setgroups").strip(),
        "mounts": mounts(),
        "rlimits": rlimits,
        "cgroup": _read("/proc/self/cgroup").split(),
        "interfaces": interfaces(),
        "namespaces": namespaces(ns_names),
        "securebits": securebits,
    }
