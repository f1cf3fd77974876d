"""The mount view of a host: a read-only tmpfs root holding only what the host needs.

Parent side, ``plan``: which paths are bound (the shared libraries, Python's standard library
and libpython -- not its whole prefix --, the modules pyseccomp and prctl, the drvbox packages
the target needs, the spec's readonly_paths).
Child side, ``apply``, inside the new mount namespace, in this order:

1. every mount made private, so nothing we do propagates back to the host system;
2. a scratch tmpfs over ``/tmp`` (seen only by us) and a first ``pivot_root`` into it, so that the
   old root sits at ``/oldroot`` *unshadowed* (a bind source under ``/tmp`` stays reachable);
3. the new root: a tmpfs at ``/newroot``; its private writable ``/tmp`` (noexec: no native code
   written at run time can be mapped executable); each bind from ``/oldroot`` then made
   read-only, nosuid and nodev, recursively (``mount_setattr``; not noexec: they hold the
   extension modules and shared libraries the host maps); each directory made right under
   ``/tmp`` on the way to a bind deeper down bound onto itself read-only (the host's uid may be
   the only one that can own it: its mode cannot protect it); a
   fresh ``/proc`` of the host's own pid namespace, read-only; ``/dev/{null,zero,urandom}``;
4. the new root made read-only, and the second ``pivot_root(".", ".")`` with the old root
   detached (``umount2(MNT_DETACH)``): nothing of the host system is reachable any more.
"""

from __future__ import annotations

import os
import sys

# Shared libraries: ctypes (libseccomp, native drivers) and extension modules load from these.
SYSTEM_PATHS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/etc/ld.so.cache")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
# Paths the view makes itself; a bind may not be at or under them.
RESERVED = ("/proc", "/dev", "/oldroot", "/newroot")

_BASE = "/tmp"   # the scratch mount point, only in our own mount namespace
HOST_TMP = "/tmp"   # the host's own writable tmpfs, in its view
UNBINDABLE = f"a bind may not be /, {HOST_TMP} (the host's own tmpfs), or under " + ", ".join(RESERVED)


def bindable(path: str) -> bool:
    """Whether ``path`` may be bound into the view: not what the view itself is made of (a bind
    of /tmp would hide the host's private tmpfs behind the real, shared one)."""
    path = os.path.normpath(path)
    return path not in ("/", HOST_TMP) and not any(path == r or path.startswith(r + "/") for r in RESERVED)


def _module_paths(name: str) -> list[str]:
    """Where module ``name`` lives, without importing it (a package's directories, else its file)."""
    import importlib.util   # parent side only: the launcher does not pay for it
    spec = importlib.util.find_spec(name)
    if spec is None:
        return []
    if spec.submodule_search_locations:
        # An editable install adds a path-hook marker that is no directory: skip what is not.
        return [os.path.realpath(p) for p in spec.submodule_search_locations if os.path.isdir(p)]
    return [os.path.realpath(spec.origin)] if spec.origin and os.path.isabs(spec.origin) else []


def _python_paths() -> list[str]:
    """What the interpreter itself needs inside: its standard library (lib-dynload lies in it)
    and, for a shared build, libpython.  Not its prefix, which for a system Python is all of
    /usr (bin, sbin, share...)."""
    import sysconfig   # parent side only, like importlib.util above
    # The base installation's paths, not a virtual environment's: a venv's platstdlib is its own
    # lib/pythonX.Y, which holds its site-packages (every dependency of the Reflector).
    base = {"installed_base": sys.base_prefix, "base": sys.base_prefix,
            "installed_platbase": sys.base_exec_prefix, "platbase": sys.base_exec_prefix}
    paths = [sysconfig.get_path(name, vars=base) for name in ("stdlib", "platstdlib")]
    libdir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir:
        # The link name and the soname the dynamic linker resolves (usually a symlink to it).
        for var in ("LDLIBRARY", "INSTSONAME"):
            name = sysconfig.get_config_var(var)
            if name:
                paths.append(os.path.join(libdir, name))
    return [path for path in dict.fromkeys(paths) if path and os.path.exists(path)]


def plan(readonly_paths: tuple[str, ...], target_module: str, tmpfs_mib: int,
         uid: int, gid: int) -> tuple[dict, list[str]]:
    """The mount plan, and the directories to put first on the host's ``sys.path``."""
    binds: list[str] = []
    sys_path: list[str] = []
    for path in SYSTEM_PATHS:
        if os.path.lexists(path):
            binds.append(path)
    binds.extend(_python_paths())
    # pyseccomp and prctl are single modules in site-packages: bind the files, not the directory
    # (which holds every other dependency of the Reflector, none of which the host needs).
    for name in ("pyseccomp", "prctl", "_prctl"):
        for path in _module_paths(name):
            binds.append(path)
            sys_path.append(os.path.dirname(path))
    # The drvbox packages the host runs (sandbox for the launcher, hosts for the host program),
    # and the target's own top-level package: not the whole repository.
    top = target_module.split(".")[0]
    for name in dict.fromkeys(("sandbox", "hosts", top)):
        for path in _module_paths(name):
            binds.append(path)
            sys_path.append(os.path.dirname(path))
    binds.extend(readonly_paths)   # checked by the child: a missing one fails step "mounts"

    symlinks: dict[str, str] = {}
    real_binds: list[str] = []
    for path in binds:
        path = os.path.abspath(path)
        real = os.path.realpath(path)
        if real != path:
            link = _first_symlink(path)
            if link is not None and link not in symlinks:
                symlinks[link] = os.readlink(link)
        real_binds.append(real)
    kept = _outermost(real_binds)
    return {
        "binds": kept,
        # A link inside a bind is already there, as the bind shows it.
        "symlinks": [(link, target) for link, target in sorted(symlinks.items())
                     if not any(_inside(link, b) for b in kept)],
        "devices": [d for d in DEVICES if os.path.exists(d)],
        "tmpfs": f"size={tmpfs_mib}m,mode=0700,uid={uid},gid={gid}",
        "fs_ids": None,   # set by spawn for a user namespace: (uid, gid)
    }, list(dict.fromkeys(sys_path))


def _first_symlink(path: str) -> str | None:
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        candidate = "/" + "/".join(parts[:i])
        if os.path.islink(candidate):
            return candidate
    return None


def _outermost(paths: list[str]) -> list[str]:
    """Drop paths already visible through another bind; keep order stable, parents first."""
    kept: list[str] = []
    for path in sorted(set(paths), key=lambda p: (p.count("/"), p)):
        if not any(_inside(path, k) for k in kept):
            kept.append(path)
    return kept


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


# --- child side ------------------------------------------------------------------------------

def apply(view: dict) -> None:
    """Build the view and pivot into it.  Raises OSError naming the exact call."""
    from sandbox import libc
    from sandbox.libc import (MNT_DETACH, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID,
                              MOUNT_ATTR_RDONLY, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY,
                              MS_REC)

    for path in view["binds"]:
        # / and the host's own /tmp would each cover what the view is made of (a bind of /tmp
        # would hide the host's private tmpfs behind the real, shared one).
        if not bindable(path):
            raise OSError(22, "Invalid argument", f"bind {path!r} ({UNBINDABLE})")

    # Open every source now, while path lookup still runs as whoever started us: in a user
    # namespace created by root, the directories on the way (pyenv under /root, mode 0700) are
    # reachable only as their owner, and we are about to take a mapped, unprivileged fsuid.
    sources = {}
    for path in list(view["binds"]) + list(view["devices"]):
        try:
            sources[path] = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, f"bind {path!r}: open({path!r}, O_PATH)") from None
    if view.get("fs_ids"):
        # Files created on a tmpfs of our user namespace need an owner mapped in it; root's
        # own uid is not (it maps the host's uid to an unprivileged outer one).
        libc.set_fs_ids(*view["fs_ids"])

    libc.mount(None, "/", None, MS_REC | MS_PRIVATE, None, "mount(NULL, '/', NULL, MS_REC|MS_PRIVATE)")
    libc.mount("tmpfs", _BASE, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755",
               f"mount('tmpfs', {_BASE!r}, 'tmpfs', MS_NOSUID|MS_NODEV)")
    os.chdir(_BASE)
    os.mkdir("newroot", 0o755)
    os.mkdir("oldroot", 0o755)
    libc.pivot_root(".", "oldroot")
    os.chdir("/")

    new = "/newroot"
    libc.mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755",
               "mount('tmpfs', '/newroot', 'tmpfs', MS_NOSUID|MS_NODEV)")
    # The host's own writable /tmp first, so that a bind under /tmp lands on top of it.
    os.mkdir(new + HOST_TMP, 0o755)
    libc.mount("tmpfs", new + HOST_TMP, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, view["tmpfs"],
               f"mount('tmpfs', '/tmp', 'tmpfs', MS_NOSUID|MS_NODEV|MS_NOEXEC, {view['tmpfs']!r})")
    readonly = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
    for path in view["binds"]:
        _bind(sources[path], new + path, path, readonly)
    for path in view["devices"]:
        # Device nodes must stay usable: no nodev here, and read-only does not stop writing to
        # a device (it only stops changing the node).
        _bind(sources[path], new + path, path, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC)
    for fd in sources.values():
        os.close(fd)
    for link, target in view["symlinks"]:
        _makedirs(os.path.dirname(new + link))
        if not os.path.lexists(new + link):
            os.symlink(target, new + link)
    # The directories made above on the way to a bind or symlink under /tmp sit on the host's
    # writable tmpfs.  Their owner cannot protect them: in a user namespace the only id that may
    # own a new file there is the host's own.  So each one made right under /tmp is bound onto
    # itself read-only, with everything below it; the rest of /tmp stays the host's.
    for top in _made_under_tmp(view):
        libc.mount(new + top, new + top, None, libc.MS_BIND | MS_REC, None,
                   f"mount({top!r}, {top!r}, NULL, MS_BIND|MS_REC)")
        libc.mount_setattr(new + top, True, readonly, f"mount_setattr({top!r}, AT_RECURSIVE, read-only)")
    os.makedirs(new + "/proc", 0o755, exist_ok=True)
    libc.mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, None,
               "mount('proc', '/proc', 'proc', MS_NOSUID|MS_NODEV|MS_NOEXEC|MS_RDONLY)")
    libc.mount_setattr(new, False, MOUNT_ATTR_RDONLY, "mount_setattr('/', MOUNT_ATTR_RDONLY)")

    os.chdir(new)
    libc.pivot_root(".", ".")
    libc.umount2(".", MNT_DETACH, "umount2(old root, MNT_DETACH)")
    os.chdir("/")


def _made_under_tmp(view: dict) -> list[str]:
    """The directories right under the host's /tmp that ``apply`` makes on the way to a bind or
    a symlink deeper down (one right in /tmp covers its own mount point, or is only a link)."""
    made = []
    for path in [*view["binds"], *(link for link, _ in view["symlinks"])]:
        if path.startswith(HOST_TMP + "/") and "/" in path[len(HOST_TMP) + 1:]:
            made.append(HOST_TMP + "/" + path[len(HOST_TMP) + 1:].split("/")[0])
    return [top for top in dict.fromkeys(made) if top not in view["binds"]]


def _makedirs(path: str) -> None:
    os.makedirs(path, 0o755, exist_ok=True)


def _bind(source_fd: int, dest: str, shown: str, attrs: int) -> None:
    import stat

    from sandbox import libc
    if stat.S_ISDIR(os.fstat(source_fd).st_mode):
        _makedirs(dest)
    else:
        _makedirs(os.path.dirname(dest))
        if not os.path.exists(dest):
            os.close(os.open(dest, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    # Through the fd opened before (see apply): the old /proc still resolves our own fds.
    libc.mount(f"/oldroot/proc/self/fd/{source_fd}", dest, None, libc.MS_BIND | libc.MS_REC, None,
               f"mount({shown!r}, {shown!r}, NULL, MS_BIND|MS_REC)")
    libc.mount_setattr(dest, True, attrs, f"mount_setattr({shown!r}, AT_RECURSIVE, read-only)")
