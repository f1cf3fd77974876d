"""A probe target: runs the checks it is asked to, from inside a sandbox, and writes the results.

Used by ``drvbox sandbox check`` and by the end-to-end tests.  ``run(fds, arg)``: ``arg["checks"]``
names the checks in order; the results go as one JSON object to ``fds[0]`` (a socket).  Each
check performs one operation and records the errno it got (0: it succeeded), so the caller can
tell our layer's refusal (EPERM from seccomp, EROFS from the mount view, ...) from another.
Imports only what the host itself may import.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading


def _errno_of(fn) -> int:
    try:
        fn()
    except OSError as exc:
        return exc.errno or -1
    return 0


def _fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def _exec():
    os.execv("/bin/true", ["/bin/true"])


def _write_outside():
    fd = os.open("/drvbox-probe", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)


def _write_tmp():
    fd = os.open("/tmp/drvbox-probe", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"x")
    os.close(fd)
    os.unlink("/tmp/drvbox-probe")


def _create(path: str):
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _thread():
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()


def _open_fds() -> list[list]:
    """[fd, what it is] for every fd this process holds, as its own /proc/self/fd says: from
    outside, an unprivileged parent may not read the host's (it is not dumpable)."""
    held = []
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            held.append([int(name), os.readlink(f"/proc/self/fd/{name}")])
        except FileNotFoundError:
            pass        # the directory listdir read through, closed again by now
    return held


def _memory_bomb():
    hoard = []
    while True:
        hoard.append(b"\x01" * (8 << 20))   # touched pages: counted by RLIMIT_AS and the cgroup


CHECKS = {
    "socket": lambda: _errno_of(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
    "socketpair": lambda: _errno_of(lambda: [s.close() for s in socket.socketpair()]),
    "fork": lambda: _errno_of(_fork),
    "exec": lambda: _errno_of(_exec),
    "write_outside": lambda: _errno_of(_write_outside),
    "write_tmp": lambda: _errno_of(_write_tmp),
    "thread": lambda: _errno_of(_thread),
    "kill_outside": None,            # needs arg["outside_pid"]
    "create_files": None,            # needs arg["create_files"]: paths to create, each O_EXCL
    "proc_pids": lambda: sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "root_listing": lambda: sorted(os.listdir("/")),
    "getuid": lambda: [os.getuid(), os.getgid(), os.getgroups()],
    "open_fds": _open_fds,
    "memory_bomb": lambda: _errno_of(_memory_bomb),
}


def run(fds: list[int], arg: dict) -> int:
    out = socket.socket(fileno=fds[0])
    results = {"fds": fds}
    for name in arg.get("checks", []):
        if name == "kill_outside":
            results[name] = _errno_of(lambda: os.kill(int(arg["outside_pid"]), 0))
        elif name == "create_files":
            results[name] = {p: _errno_of(lambda p=p: _create(p)) for p in arg["create_files"]}
        elif name in CHECKS:
            try:
                results[name] = CHECKS[name]()
            except MemoryError:
                results[name] = "MemoryError"
        else:
            results[name] = f"unknown check {name!r}"
    if arg.get("crash_after"):
        raise SystemExit(int(arg["crash_after"]))
    out.sendall(json.dumps(results).encode())
    out.close()
    if arg.get("wait_for_eof"):
        os.read(fds[1], 1)
    return int(arg.get("exit", 0))


def idle(fds: list[int], arg: dict) -> int:
    """Block until fds[0] reaches EOF (the caller closes its end), then exit 0; without fds,
    exit 0 at once (a sandbox that only proves it can be started)."""
    if fds:
        os.read(fds[0], 1)
    return 0


def deaf(fds: list[int], arg: dict) -> int:
    """Never end of its own accord, whatever happens to its fds: only a signal ends it.  A host
    that ignores its channel's EOF, as a wedged driver's host does (the parent-death tests)."""
    import time
    while True:
        time.sleep(3600)


__all__ = ["run", "idle", "deaf", "CHECKS", "errno"]
