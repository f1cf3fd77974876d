"""cgroups: a cgroup per host with memory and pids limits, on v2 or v1.  Parent side only.

The parent creates it before the launcher unshares its cgroup namespace (the host then sees its
own cgroup as "/"), moves the launcher in, and removes it when the host has ended.

* v2: ``/sys/fs/cgroup`` is cgroup2 and our own cgroup's ``cgroup.subtree_control`` lists memory
  and pids (or we can enable them there).  ``memory.max``, ``memory.swap.max`` = 0,
  ``memory.oom.group`` = 1 (an OOM kill takes the whole host), ``pids.max``.
* v1: ``/sys/fs/cgroup/memory`` and ``/sys/fs/cgroup/pids`` (this machine is hybrid: v2 holds
  only hugetlb).  ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes`` where swap is
  accounted), ``pids.max``.

``pids.max`` is the spec's max_threads plus one for the launcher, which waits in the same cgroup.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
from pathlib import Path

from sandbox.errors import ConfinementError
from sandbox.kfiles import write_control

ROOT = Path("/sys/fs/cgroup")
MIB = 1024 * 1024
_counter = itertools.count(1)


class HostCgroup:
    """The cgroup(s) of one host: one directory on v2, one per controller on v1."""

    def __init__(self, version: int, dirs: dict[str, Path], limits: dict[str, str]):
        self.version = version
        self.dirs = dirs            # controller ("memory", "pids", or "unified") -> directory
        self.limits = limits        # file name -> value written

    def place(self, pid: int) -> None:
        for d in dict.fromkeys(self.dirs.values()):
            write_control(d / "cgroup.procs", str(pid))

    def read_back(self) -> dict:
        found = {"version": self.version, "paths": sorted({str(d) for d in self.dirs.values()})}
        for name in self.limits:
            path = self._file(name)
            try:
                found[name] = path.read_text().strip()
            except OSError as exc:
                found[name] = f"unreadable: {exc.strerror}"
        return found

    def oom_killed(self) -> bool:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        d = self.dirs.get("unified" if self.version == 2 else "memory")
        if d is None:
            return False
        try:
            text = (d / name).read_text()
        except OSError:
            return False
        match = re.search(r"^oom_kill (\d+)$", text, re.M)
        return bool(match and int(match.group(1)) > 0)

    def remove(self) -> list[str]:
        """rmdir each directory; the ones that could not be removed, with why."""
        left = []
        for d in dict.fromkeys(self.dirs.values()):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                left.append(f"{d}: {exc.strerror}")
        return left

    def _file(self, name: str) -> Path:
        controller = name.split(".")[0]
        return (self.dirs.get("unified") or self.dirs[controller]) / name


def _own_paths() -> dict[str, str]:
    """Controller -> our cgroup path in that hierarchy ("" key: the v2 hierarchy)."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            paths[c] = path
    return paths


def _wanted(memory_limit_mib: int | None, max_threads: int) -> dict[str, str]:
    limits = {"pids.max": str(max_threads + 1)}
    if memory_limit_mib is not None:
        limits["memory.max"] = str(memory_limit_mib * MIB)
    return limits


def create(name: str, memory_limit_mib: int | None, max_threads: int, optional: frozenset[str]
           ) -> HostCgroup | None:
    """The host's cgroup, limits written; None when unavailable and "cgroup" is optional."""
    limits = _wanted(memory_limit_mib, max_threads)
    tag = f"drvbox-{os.getpid()}-{next(_counter)}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:40]}"
    reasons = []
    for attempt in (_create_v2, _create_v1):
        try:
            group = attempt(tag, limits)
        except _Unavailable as exc:
            reasons.append(str(exc))
            continue
        except OSError as exc:
            raise ConfinementError("cgroup", exc.filename or "cgroup", exc.errno, name=name) from None
        return group
    if "cgroup" in optional:
        return None
    raise ConfinementError("cgroup", "; ".join(reasons), errno.ENOTSUP, name=name)


class _Unavailable(Exception):
    pass


_STALE = re.compile(r"^drvbox-(\d+)-\d+-")


def sweep(parent: Path) -> list[str]:
    """Remove the empty cgroups a Device Manager that died (SIGKILL, crash) left under ``parent``:
    those named after a pid that no longer exists.  rmdir refuses a populated one, so a cgroup in
    use is never touched.  The names removed."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for d in entries:
        match = _STALE.match(d.name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue                       # its owner is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            d.rmdir()
            removed.append(d.name)
        except OSError:
            pass
    return removed


def _create_v2(tag: str, limits: dict[str, str]) -> HostCgroup:
    if not (ROOT / "cgroup.controllers").exists():
        raise _Unavailable(f"v2: {ROOT} is not a cgroup2 mount")
    base = ROOT / _own_paths().get("", "/").lstrip("/")
    needed = {c.split(".")[0] for c in limits}
    enabled = set((base / "cgroup.subtree_control").read_text().split())
    if needed - enabled:
        try:
            write_control(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(needed - enabled)))
        except OSError as exc:
            raise _Unavailable(f"v2: cannot enable {sorted(needed - enabled)} in {base}: "
                               f"{exc.filename}: {exc.strerror}") from None
    d = base / tag
    sweep(base)
    try:
        d.mkdir(mode=0o755)
    except OSError as exc:
        raise _Unavailable(f"v2: mkdir {str(d)!r}: {exc.strerror}") from None
    group = HostCgroup(2, {"unified": d}, dict(limits))
    try:
        for file, value in limits.items():
            write_control(d / file, value)
        if "memory.max" in limits:
            for file, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                if (d / file).exists():
                    write_control(d / file, value)
                    group.limits[file] = value
    except OSError:
        group.remove()
        raise
    return group


def _create_v1(tag: str, limits: dict[str, str]) -> HostCgroup:
    own = _own_paths()
    dirs: dict[str, Path] = {}
    v1_names = {"memory.max": "memory.limit_in_bytes", "pids.max": "pids.max"}
    for file in limits:
        controller = file.split(".")[0]
        mount = ROOT / controller
        if controller not in own or not (mount / "cgroup.procs").exists():
            raise _Unavailable(f"v1: no {controller} hierarchy at {mount}")
        dirs[controller] = mount / own[controller].lstrip("/") / tag
    group = HostCgroup(1, {}, {})
    for d in dirs.values():
        sweep(d.parent)
    try:
        for controller, d in dirs.items():
            try:
                d.mkdir(mode=0o755)
            except OSError as exc:
                raise _Unavailable(f"v1: mkdir {str(d)!r}: {exc.strerror}") from None
            group.dirs[controller] = d
        for file, value in limits.items():
            v1 = v1_names[file]
            write_control(dirs[file.split(".")[0]] / v1, value)
            group.limits[v1] = value
        memsw = dirs.get("memory", Path("/nonexistent")) / "memory.memsw.limit_in_bytes"
        if "memory.max" in limits and memsw.exists():
            write_control(memsw, limits["memory.max"])      # no swapping past the limit either
            group.limits["memory.memsw.limit_in_bytes"] = limits["memory.max"]
    except BaseException:
        group.remove()
        raise
    return group
