"""``spawn``: start one host, confined; ``Sandboxed``: the handle on it.  Parent side.

    spawn(spec, target, target_arg, pass_fds)
      1. prepare    -- everything that can be refused before a process exists: the spec, the
                       target, the extra system calls, the kernel's seccomp features, the plan
      2. cgroup     -- the host's cgroup, limits written (before the launcher unshares its cgroup
                       namespace, so the host sees its own cgroup as its root)
      3. start      -- a fresh ``python -I -S -B`` running sandbox/launcher.py, started from one
                       long-lived thread (PR_SET_PDEATHSIG follows the *thread* that started a
                       process: a short-lived worker thread would take the host down with it);
                       its stdout and stderr a pipe whose lines sandbox/output.py logs, escaped
                       and rate-bound, never the Device Manager's own fds
      4. handshake  -- plan in; uid/gid maps written for it; inner pid, a failed step, or the
                       read-back and the seccomp listener out
    Any failure: the launcher killed and reaped, the cgroup removed, every fd closed, and a
    ConfinementError naming the step.  Nothing is left half-confined or running.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import functools
import os
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Sequence

from sandbox import cgroups, control, errors, limits, mounts, namespaces, output, seccomp, syscalls
from sandbox.errors import ConfinementError
from sandbox.spec import DEFAULT_GID, DEFAULT_UID, SandboxSpec

_TARGET = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
# Only a safety net for a launcher that hangs before it reports (it never should): the time a
# loaded machine might need to start Python, not a measure of anything.
START_TIMEOUT = 60.0
# Only a guard, too: once the launcher is reaped every writer of its output pipe has gone (the
# host's pid namespace ended with it), so the reader is at EOF already and ends at once.
OUTPUT_GRACE = 5.0
_SANDBOX_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class ExitStatus:
    code: int | None          # the exit status, when the host exited
    signal: int | None        # the signal, when one killed it
    step: str | None          # what ended it when it was the sandbox: "seccomp" (SIGSYS: a
                              # foreign architecture), "limits" (the cgroup's OOM killer)


# --- 1. prepare ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _libraries() -> tuple[tuple[str, str], ...]:
    """Sonames for the launcher's ctypes.util stand-in (see launcher._preload)."""
    found = []
    for name in ("c", "seccomp", "cap"):
        soname = ctypes.util.find_library(name)
        if soname:
            found.append((name, soname))
    return tuple(found)


@functools.lru_cache(maxsize=None)
def _cap_last() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def _check_syscalls(spec: SandboxSpec) -> list[str]:
    forbidden = syscalls.refuse_forbidden(spec.extra_syscalls)
    if forbidden:
        raise ConfinementError("spec", "extra_syscalls: " + ", ".join(forbidden), name=spec.name,
                               hint="these are never allowed in a host; remove them from the policy's Syscalls")
    import pyseccomp
    unknown = [n for n in spec.extra_syscalls
               if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, n) < 0]
    if unknown:
        raise ConfinementError("spec", f"extra_syscalls: unknown system calls {unknown}", name=spec.name,
                               hint="use the kernel's names for x86_64, e.g. 'getitimer'")
    return list(dict.fromkeys(list(syscalls.ALLOWED) + list(spec.extra_syscalls)))


def prepare(spec: SandboxSpec, target: str, target_arg: dict, n_fds: int) -> dict:
    """The plan the launcher carries out.  Raises ConfinementError for what can be refused now."""
    if not _TARGET.match(target or ""):
        raise ConfinementError("spec", f"target {target!r}", name=spec.name,
                               hint='write the target as "package.module:function"')
    module = target.partition(":")[0]
    if not mounts._module_paths(module.split(".")[0]):
        raise ConfinementError("spec", f"target {target!r}: no module {module.split('.')[0]!r} on sys.path",
                               name=spec.name)
    userns = namespaces.use_userns(spec.userns)
    if not userns and os.geteuid() != 0:
        raise ConfinementError("namespaces", "userns=False without root", 1, name=spec.name,
                               hint="only root can create the other namespaces without a user namespace")
    notify = seccomp.notify_available()
    if not notify and "seccomp_notify" not in spec.optional:
        raise ConfinementError("seccomp", "user_notif not in /proc/sys/kernel/seccomp/actions_avail",
                               95, name=spec.name)
    uid = DEFAULT_UID if spec.uid is None else spec.uid
    gid = DEFAULT_GID if spec.gid is None else spec.gid
    view, sys_path = mounts.plan(spec.readonly_paths, module, spec.tmpfs_mib, uid, gid)
    if userns:
        view["fs_ids"] = (uid, gid)
    return {
        "name": spec.name,
        "parent_pid": os.getpid(),
        "userns": userns,
        "uid": uid,
        "gid": gid,
        "set_groups": namespaces.can_set_groups(userns),
        "mounts": view,
        "sys_path": [_SANDBOX_ROOT] + sys_path,
        "libraries": list(_libraries()),
        "cap_last": _cap_last(),
        "fds": [],   # filled in by spawn: the numbers in the launcher
        "limits": limits.plan(spec, userns),
        "target": target,
        "target_arg": target_arg,
        "syscalls": _check_syscalls(spec),
        "notify": notify,
        "on_violation": spec.on_violation,
        "ioctl_ranges": None if spec.ioctl_ranges is None else [list(r) for r in spec.ioctl_ranges],
        "ns_names": list(namespaces.PROC_NS),
    }


# --- 3. start, from one long-lived thread ------------------------------------------------------

class _Starter:
    """The one thread every launcher is started from (see the module docstring, step 3)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def run(self, fn):
        with self._lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._serve, name="drvbox-sandbox-starter", daemon=True)
                self._thread.start()
        if threading.current_thread() is self._thread:
            return fn()
        box: dict = {}
        done = threading.Event()
        self._queue.put((fn, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _serve(self) -> None:
        while True:
            fn, box, done = self._queue.get()
            try:
                box["result"] = fn()
            except BaseException as exc:  # handed to the caller
                box["error"] = exc
            finally:
                done.set()


_starter = _Starter()


def _argv(ctl_fd: int) -> list[str]:
    boot = (f"import sys; sys.path.insert(0, {_SANDBOX_ROOT!r}); "
            f"from sandbox.launcher import main; main({ctl_fd})")
    return [sys.executable, "-I", "-S", "-B", "-c", boot]


# --- the handle ------------------------------------------------------------------------------

class Sandboxed:
    """A running (or ended) sandbox.  Made by ``spawn`` only."""

    def __init__(self, *, name: str, popen: subprocess.Popen, pidfd: int, inner_pid: int,
                 inner_pidfd: int | None, notify_fd: int | None, confinement: dict,
                 cgroup: cgroups.HostCgroup | None, output_reader: threading.Thread):
        self.name = name
        self.pid = popen.pid
        self.inner_pid = inner_pid
        self.pidfd = pidfd
        self.notify_fd = notify_fd
        self.confinement = confinement
        self._popen = popen
        self._cgroup = cgroup
        self._output_reader = output_reader
        self._lock = threading.Lock()
        self._status: ExitStatus | None = None
        # Our own pidfd, closed only once the launcher is reaped: kill() and wait() keep working
        # race-free after close() has closed the public one.
        self._own_pidfd = os.dup(pidfd)
        self._inner_pidfd = inner_pidfd
        self.cgroup_left: list[str] = []

    def __repr__(self) -> str:
        return f"<Sandboxed {self.name!r} pid={self.pid} inner_pid={self.inner_pid} status={self._status}>"

    def kill(self) -> None:
        """SIGKILL the host, and with it everything in its pid namespace.  Idempotent.

        The signal goes to the host itself (through a pidfd: no pid can be recycled under us);
        the launcher reaps it and then ends the same way, so once ``wait`` returns nothing of the
        sandbox is left and its cgroup can be removed.  Without that pidfd, the launcher is
        killed and the host follows by its parent-death signal.
        """
        with self._lock:
            if self._status is not None:
                return
            for fd in (self._inner_pidfd, self._own_pidfd):
                if fd is None:
                    continue
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    return
                except ProcessLookupError:
                    continue

    def poll(self) -> ExitStatus | None:
        with self._lock:
            if self._status is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self._finish(status)
            return self._status

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """The exit status; raises TimeoutError if ``timeout`` seconds pass first."""
        while True:
            with self._lock:
                if self._status is not None:
                    return self._status
                own = self._own_pidfd
            if not _readable(own, timeout):
                raise TimeoutError(f"sandbox {self.name!r} (pid {self.pid}) still running after {timeout} s")
            status = self.poll()
            if status is not None:
                return status

    def _finish(self, status: int) -> None:
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        step = None
        if sig == signal.SIGSYS:
            step = "seccomp"
        elif self._cgroup is not None and self._cgroup.oom_killed():
            step = "limits"
        if self._cgroup is not None:
            self.cgroup_left = self._cgroup.remove()
        self._popen.returncode = os.waitstatus_to_exitcode(status)
        os.close(self._own_pidfd)
        if self._inner_pidfd is not None:
            os.close(self._inner_pidfd)
            self._inner_pidfd = None
        self._status = ExitStatus(code, sig, step)

    def close(self) -> None:
        """Close our fds (pidfd, notify_fd).  Does not kill: call kill() first if need be.

        Once the sandbox has ended, also waits for its output reader to log the last lines and
        close its end of the pipe: after close(), no fd of this sandbox is left open here."""
        with self._lock:
            ended = self._status is not None
            if ended and self._cgroup is not None and self.cgroup_left:
                self.cgroup_left = self._cgroup.remove()   # a host killed from outside may end late
        if ended:
            self._output_reader.join(OUTPUT_GRACE)
        for attr in ("pidfd", "notify_fd"):
            fd = getattr(self, attr)
            if fd is not None and fd >= 0:
                setattr(self, attr, -1 if attr == "pidfd" else None)
                os.close(fd)


# --- spawn -----------------------------------------------------------------------------------

def spawn(spec: SandboxSpec, target: str, target_arg: dict, pass_fds: Sequence[int]) -> Sandboxed:
    """Start ``target`` confined as ``spec`` says; returns once the target is about to be called.

    ``target`` ("package.module:function") is imported inside the sandbox before seccomp is
    loaded, then called as ``function(fds, target_arg) -> int``, ``fds`` being ``pass_fds``
    renumbered from 3 in the same order.  Raises ConfinementError naming the failed step.
    """
    plan = prepare(spec, target, target_arg, len(pass_fds))
    plan["fds"] = [int(fd) for fd in pass_fds]
    with contextlib.ExitStack() as undo:
        group = cgroups.create(spec.name, spec.memory_limit_mib, spec.max_threads, spec.optional)
        if group is not None:
            undo.callback(group.remove)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        undo.callback(ours.close)
        # stdout and stderr: a pipe of ours, never the Device Manager's own fds (a hostile host
        # would write straight to our terminal or log); sandbox/output.py logs what comes on it.
        out_r, out_w = output.pipe()
        try:
            popen = _starter.run(lambda: subprocess.Popen(
                _argv(theirs.fileno()), pass_fds=(theirs.fileno(), *plan["fds"]), close_fds=True,
                stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w, cwd="/", env={"MALLOC_ARENA_MAX": "2"},
                # Its own session: a Ctrl-C at the Device Manager's terminal (SIGINT to the whole
                # foreground process group) is the Device Manager's to handle, in order; the
                # launcher still dies with it (PR_SET_PDEATHSIG).
                start_new_session=True))
        except OSError as exc:
            os.close(out_r)
            raise ConfinementError("start", f"Popen({sys.executable!r}, ...)", exc.errno, name=spec.name) from None
        finally:
            theirs.close()
            os.close(out_w)
        # Read from now on, before the handshake: what the launcher prints when it fails to start
        # is logged too.  The reader closes out_r at EOF, once the launcher and host have ended.
        try:
            reader = output.start_reader(spec.name, out_r)
        except BaseException:
            popen.kill()     # not yet owned by the undo stack; nothing of it may outlive spawn
            popen.wait()
            raise
        # Undone last (after the launcher is killed and reaped, registered below): its start-up
        # output is logged before the ConfinementError goes up, and its fd is closed by then.
        undo.callback(reader.join, OUTPUT_GRACE)
        pidfd = os.pidfd_open(popen.pid)
        undo.callback(os.close, pidfd)
        undo.callback(_kill_and_reap, popen, pidfd)
        try:
            if group is not None:
                group.place(popen.pid)
        except OSError as exc:
            raise ConfinementError("cgroup", exc.filename or "cgroup.procs", exc.errno, name=spec.name) from None
        inner_pid, state, notify_fd = _handshake(spec, ours, popen, plan, undo)
        inner_pidfd = _pidfd_of_child(inner_pid, popen.pid)
        if inner_pidfd is not None:
            undo.callback(os.close, inner_pidfd)
        confinement = _describe(state, plan, group, spec)
        handle = Sandboxed(name=spec.name, popen=popen, pidfd=pidfd, inner_pid=inner_pid,
                           inner_pidfd=inner_pidfd, notify_fd=notify_fd, confinement=confinement,
                           cgroup=group, output_reader=reader)
        undo.pop_all()
        ours.close()
        return handle


def _pidfd_of_child(pid: int, parent: int) -> int | None:
    """A pidfd for ``pid`` if it is still the launcher's child (checked *after* opening, so a
    recycled pid cannot slip in); None if the host has already ended."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        ppid = -1
    if ppid != parent:
        os.close(fd)
        return None
    return fd


def _await_exit(popen: subprocess.Popen, timeout: float) -> None:
    """Reap the launcher if it exits within ``timeout``; else leave it to _kill_and_reap."""
    with contextlib.closing(_PidFd(popen.pid)) as fd:
        if _readable(fd.fd, timeout):
            _, status = os.waitpid(popen.pid, 0)
            popen.returncode = os.waitstatus_to_exitcode(status)


def _readable(fd: int, timeout: float | None) -> bool:
    """poll, not select: a busy Reflector's fds may be numbered past FD_SETSIZE (1024)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))


class _PidFd:
    def __init__(self, pid: int):
        self.fd = os.pidfd_open(pid)

    def close(self) -> None:
        os.close(self.fd)


def _kill_and_reap(popen: subprocess.Popen, pidfd: int) -> None:
    if popen.returncode is not None:   # already reaped
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, status = os.waitpid(popen.pid, 0)
    popen.returncode = os.waitstatus_to_exitcode(status)


def _handshake(spec: SandboxSpec, ours: socket.socket, popen: subprocess.Popen, plan: dict,
               undo: contextlib.ExitStack) -> tuple[int, dict, int | None]:
    ours.settimeout(START_TIMEOUT)
    child_plan = dict(plan)
    try:
        control.send(ours, {"plan": child_plan})
    except (OSError, control.ControlError) as exc:
        raise ConfinementError("start", f"send plan: {exc}", getattr(exc, "errno", None), name=spec.name) from None
    inner_pid = state = None
    notify_fd: int | None = None
    while inner_pid is None or state is None:
        try:
            message, fds = control.recv(ours)
        except socket.timeout:
            raise ConfinementError("start", f"no report from the launcher within {START_TIMEOUT:.0f} s",
                                   110, name=spec.name) from None
        except (OSError, control.ControlError) as exc:
            raise ConfinementError("start", f"recv(control): {exc}", getattr(exc, "errno", None),
                                   name=spec.name) from None
        for fd in fds:
            undo.callback(os.close, fd)
        if message is None:
            raise _ended_early(spec, popen, undo)
        if "failed" in message:
            # The failing process exits by itself; let the launcher reap it and end, so that
            # nothing of the sandbox (nor its cgroup) outlives this call.
            _await_exit(popen, START_TIMEOUT)
            f = message["failed"]
            step = f.get("step") if f.get("step") in errors.STEPS else "launcher"
            err = f.get("errno") if isinstance(f.get("errno"), int) else None
            raise ConfinementError(step, str(f.get("call")), err, name=spec.name)
        if message.get("maps"):
            try:
                namespaces.write_maps(popen.pid, plan["uid"], plan["gid"])
            except OSError as exc:
                raise ConfinementError("userns_maps", exc.filename or "uid_map", exc.errno, name=spec.name) from None
            control.send(ours, {"maps_done": True})
        elif "inner_pid" in message and isinstance(message["inner_pid"], int):
            inner_pid = message["inner_pid"]
        elif "ready" in message and isinstance(message["ready"], dict):
            state = message["ready"]
            expected = 1 if plan["notify"] else 0
            if len(fds) != expected:
                raise ConfinementError("report", f"{len(fds)} fds with the report, expected {expected}",
                                       name=spec.name)
            if fds:
                kind = os.readlink(f"/proc/self/fd/{fds[0]}")
                if kind != "anon_inode:seccomp notify":
                    raise ConfinementError("report", f"the listener fd is {kind!r}", name=spec.name)
                notify_fd = fds[0]
        else:
            raise ConfinementError("start", f"unexpected control message {sorted(message)}", name=spec.name)
    # The host closes the control socket after its listener and life pipe, right before it calls
    # the target: once we see EOF, it holds exactly the fds it was given.
    try:
        message, fds = control.recv(ours)
    except (OSError, control.ControlError) as exc:
        raise ConfinementError("report", f"recv(control) after the report: {exc}", getattr(exc, "errno", None),
                               name=spec.name) from None
    for fd in fds:
        undo.callback(os.close, fd)
    if message is not None:
        raise ConfinementError("report", f"unexpected control message after the report {sorted(message)}",
                               name=spec.name)
    return inner_pid, state, notify_fd


def _ended_early(spec: SandboxSpec, popen: subprocess.Popen, undo: contextlib.ExitStack) -> ConfinementError:
    _, status = os.waitpid(popen.pid, 0)
    popen.returncode = code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return ConfinementError("launcher", f"the launcher was killed by signal {-code}", name=spec.name)
    step = errors.STEP_OF_EXIT.get(code, "launcher")
    return ConfinementError(step, f"the launcher exited with status {code} before reporting", name=spec.name)


def _describe(state: dict, plan: dict, group: cgroups.HostCgroup | None, spec: SandboxSpec) -> dict:
    """The read-back from inside, with what only the parent can see added and labelled."""
    outer = {}
    for name in plan["ns_names"]:
        try:
            outer[name] = os.readlink(f"/proc/self/ns/{name}")
        except OSError:
            outer[name] = None
    confinement = dict(state)
    confinement["namespaces"] = {name: {"inside": link, "new": link != outer.get(name)}
                                 for name, link in state.get("namespaces", {}).items()}
    confinement["userns"] = plan["userns"]
    confinement["cgroup"] = {"inside": state.get("cgroup"),
                             **(group.read_back() if group is not None else {"missing": True})}
    confinement["seccomp"] = {
        "default": "notify" if plan["notify"] else
                   ("kill+log" if spec.on_violation == "kill" else "errno+log"),
        "on_violation": spec.on_violation,
        "allowed": len(plan["syscalls"]),
    }
    return confinement
