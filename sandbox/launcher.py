"""The launcher: the fresh interpreter ``spawn`` starts, which confines itself and becomes a host.

Started as ``python -I -S -B -c "...; main(CTL_FD)"`` (never a fork of the multi-threaded
Reflector).  It reads its plan from the control socket, then:

    launcher (outside the new pid namespace)          host (pid 1 inside it)
    ----------------------------------------          ----------------------
    PR_SET_PDEATHSIG, unshare(...), maps
    fork ──────────────────────────────────────────▶  ``confine()``: the whole sequence
    sends the host's pid, takes the host's ids         calls target(fds, arg)
    and drops every capability, waits, then exits
    the way the host did (same status, or signal)

The launcher stays as a reaper because the Reflector must learn how the host ended and must be
able to kill it race-free: its pidfd is the launcher's, and the launcher's death takes the host
with it (PR_SET_PDEATHSIG), and the host's death takes its whole pid namespace with it.  The
reaper runs as the host's uid (``_become_unprivileged``): the kernel delivers that signal only
if the dying reaper could kill(2) the host.

Its stdout and stderr, and so the host's, are a pipe the Device Manager reads (sandbox/output.py):
what either prints -- a traceback at start, a driver's writes to fd 1 or 2 -- is logged there as
the host's, escaped and rate-bound, and can never reach the Device Manager's terminal as it is.

Every failure ends the process with the exit status of its step (sandbox/errors.py) after
sending ``{"failed": {step, call, errno}}`` on the control socket.  Nothing runs half-confined.
"""

from __future__ import annotations

import os
import signal
import sys

from sandbox import control, errors


class _StepFailed(Exception):
    def __init__(self, step: str, call: str, errno: int | None):
        super().__init__(step, call, errno)
        self.step, self.call, self.errno = step, call, errno


def _run(step: str, fn, *args):
    """Run one step; any failure becomes _StepFailed naming the step and the exact call."""
    try:
        return fn(*args)
    except _StepFailed:
        raise
    except OSError as exc:
        call = exc.filename if isinstance(exc.filename, str) else f"{getattr(fn, '__name__', fn)}()"
        if exc.errno is None:
            call = f"{call}: {exc.strerror or exc}"
        raise _StepFailed(step, call, exc.errno) from None
    except Exception as exc:  # an import error, a bad plan: still this step's failure
        raise _StepFailed(step, f"{type(exc).__name__}: {exc}", None) from None


def _fail(ctl, failure: _StepFailed) -> None:
    try:
        control.send(ctl, {"failed": {"step": failure.step, "call": failure.call, "errno": failure.errno}})
    except Exception:
        pass  # the exit status still names the step
    os._exit(errors.EXIT_STATUS.get(failure.step, errors.EXIT_STATUS["launcher"]))


# --- the launcher ----------------------------------------------------------------------------

def main(ctl_fd: int) -> None:
    import _socket
    ctl = _socket.socket(fileno=ctl_fd)
    try:
        plan = _run("spec", _read_plan, ctl)
        _run("spec", _preload, plan)
        from sandbox import namespaces
        # The launcher dies with the thread that started it (spawn starts every launcher from one
        # long-lived thread, see sandbox/spawning.py).  Re-check the parent after setting it: if it
        # died before, the signal will never come.
        _run("pdeathsig", _die_with_starter, plan["parent_pid"])
        flags, names = namespaces.flags(plan["userns"])
        from sandbox import libc
        _run("namespaces", libc.unshare, flags, names)
        if plan["userns"]:
            _run("userns_maps", _await_maps, ctl)
        life_r, life_w = _run("fork", os.pipe2, os.O_CLOEXEC)
        pid = _run("fork", os.fork)
    except _StepFailed as failure:
        _fail(ctl, failure)
        return
    if pid == 0:
        os.close(life_w)
        channel = [ctl]   # confine() renumbers the control socket; a failure reports on the new one
        try:
            function, fds, arg = confine(plan, channel, life_r)
        except _StepFailed as failure:
            _fail(channel[0], failure)
            return
        _call_target(function, fds, arg)
    os.close(life_r)
    _reap(pid, ctl, life_w, plan)


def _read_plan(ctl) -> dict:
    message, fds = control.recv(ctl)
    for fd in fds:
        os.close(fd)
    if message is None or "plan" not in message:
        raise OSError(22, "no plan", "recv(control)")
    return message["plan"]


def _preload(plan: dict) -> None:
    """Import now what the sandbox will need, while the full file system is still visible.

    pyseccomp calls ``ctypes.util.find_library`` at import, which runs ``ldconfig -p`` in a
    subprocess and imports half the stdlib (~30 ms).  The parent already knows the answers, so a
    small stand-in module answers from the plan: faster, and nothing is executed.
    """
    import types
    import ctypes
    known = dict(plan["libraries"])
    stub = types.ModuleType("ctypes.util")
    stub.find_library = known.get
    sys.modules["ctypes.util"] = stub
    ctypes.util = stub
    sys.path[:0] = [p for p in plan["sys_path"] if p not in sys.path]
    import prctl  # noqa: F401
    import pyseccomp  # noqa: F401
    # Only pyseccomp needed the stand-in: a driver asking ctypes.util later gets the real one.
    del sys.modules["ctypes.util"], ctypes.util
    import resource  # noqa: F401
    import select  # noqa: F401
    import importlib  # noqa: F401
    from sandbox import capabilities, identity, limits, mounts, readback, seccomp  # noqa: F401


def _await_maps(ctl) -> None:
    control.send(ctl, {"maps": True})
    message, fds = control.recv(ctl)
    for fd in fds:
        os.close(fd)
    if not message or not message.get("maps_done"):
        raise OSError(1, "the parent did not write the maps", "uid_map/gid_map")


def _reap(pid: int, ctl, life_w: int, plan: dict) -> None:
    """The launcher's life after the fork: report the host's pid, hold nothing, mirror its end."""
    try:
        control.send(ctl, {"inner_pid": pid})
    except OSError:
        pass
    ctl.close()
    # Hold no fd of the host's (its channel must see EOF when the host dies, not when we do).
    os.closerange(3, life_w)
    os.closerange(life_w + 1, 1 << 16)
    try:
        _become_unprivileged(plan)
    except Exception as exc:
        # Fail closed: a privileged reaper next to the host is not what we promised, and a
        # reaper whose parent is already gone will never get its death signal.  Kill first: the
        # write may fail (no reader left).  The kill still works: either the ids changed (the
        # host's own) or the capabilities did not.  waitpid below then mirrors the host's end.
        os.kill(pid, signal.SIGKILL)
        try:
            os.write(2, f"drvbox launcher: cannot become an unprivileged reaper: {exc!r}; "
                        "the host is killed\n".encode())
        except OSError:
            pass
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            os._exit(errors.EXIT_STATUS["launcher"])
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            import resource
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _become_unprivileged(plan: dict) -> None:
    """The reaper takes the host's own ids and gives up every capability.

    The ids are what makes the host die with it.  The kernel sends a parent-death signal with
    the dying parent's credentials and checks them like kill(2): a reaper left as root without
    CAP_KILL may not signal a host running as another uid, so the host's PR_SET_PDEATHSIG was
    silently dropped and a host that ignored its channel's EOF outlived a killed Device Manager
    (tests/adversarial/test_adv_native.py, the wedged host).  With the same uid no capability is
    needed, and the reaper holds less than before: an unprivileged id instead of root's.
    """
    import prctl

    from sandbox import capabilities, identity
    capabilities.bound(plan["cap_last"])             # needs CAP_SETPCAP: before leaving uid 0
    identity.assume(plan["uid"], plan["gid"], plan["set_groups"])
    capabilities.empty_sets()
    prctl.set_no_new_privs(1)
    prctl.set_dumpable(0)            # nobody else running as this uid may ptrace the reaper
    # The credential change cleared our own parent-death signal: set it again.
    _die_with_starter(plan["parent_pid"])


def _die_with_starter(parent_pid: int) -> None:
    """Die with the Device Manager's starter thread, our parent; re-check it after setting the
    signal, since a parent that died before will never send it."""
    import prctl
    prctl.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:
        raise _StepFailed("pdeathsig", f"getppid()={os.getppid()}, expected {parent_pid}", None)


# --- the host: the confinement sequence ------------------------------------------------------

def confine(plan: dict, channel: list, life_r: int):
    """Confine this process (the host, pid 1 of its pid namespace), in this order, then return
    (target function, fds, arg).  Every step either completes or raises _StepFailed."""
    import importlib

    import prctl

    from sandbox import capabilities, fds, identity, limits, mounts, readback, seccomp

    ctl = channel[0]
    # 1. Die with the launcher, from now on: if it is killed mid-way, so are we.
    _run("pdeathsig", _die_with_parent, life_r)
    # The uts namespace is a copy of the machine's: give it a name that says nothing about it.
    from sandbox import libc
    _run("namespaces", libc.sethostname, "drvbox-host")
    # 2. The mount view, while we hold CAP_SYS_ADMIN over our mount namespace.
    _run("mounts", mounts.apply, plan["mounts"])
    # 3. Securebits locked and the bounding set emptied: needs CAP_SETPCAP, which the identity
    #    change below takes away when leaving uid 0.
    securebits = _run("capabilities", capabilities.bound, plan["cap_last"])
    # 4. No controlling terminal, no groups, unprivileged ids: needs CAP_SETUID/CAP_SETGID.
    _run("identity", identity.apply, plan["uid"], plan["gid"], plan["set_groups"])
    # 5. Empty every remaining set; checked against /proc/self/status, fail closed.
    _run("capabilities", capabilities.clear)
    # 6. The credential change cleared the parent-death signal: set it again, re-check.
    _run("pdeathsig", _die_with_parent, life_r)
    # 7. no_new_privs: nothing this process runs can gain privilege, and the seccomp filter can
    #    be loaded without CAP_SYS_ADMIN (which we no longer have).
    _run("no_new_privs", prctl.set_no_new_privs, 1)
    if prctl.get_no_new_privs() != 1:
        raise _StepFailed("no_new_privs", "prctl(PR_GET_NO_NEW_PRIVS) != 1", None)
    #    Not dumpable either: no other process of the same uid (65534 is shared with whatever
    #    else runs as nobody) may ptrace it or open its /proc/PID/mem.
    _run("no_new_privs", prctl.set_dumpable, 0)
    # 8. Only the passed fds (renumbered from 3), the control socket and the life pipe remain.
    #    Before the limits: RLIMIT_NOFILE would refuse the high numbers the renumbering uses.
    kept = _run("fds", fds.keep_only, plan["fds"], [ctl.fileno(), life_r])
    passed, (ctl_fd, life_fd) = kept[:len(plan["fds"])], kept[len(plan["fds"]):]
    ctl = channel[0] = _rebind(ctl, ctl_fd)
    # 9. rlimits, before the import: the target's import-time allocations are bounded too.
    _run("limits", limits.apply, plan["limits"])
    # 10. The target, imported now: importing needs calls (stat, mmap of extension modules)
    #     the allowlist need not carry, and its code comes from the read-only view.
    module_name, _, function_name = plan["target"].partition(":")
    module = _run("import", importlib.import_module, module_name)
    function = _run("import", getattr, module, function_name)
    # 11. seccomp, last: every step above needs a call the filter forbids.
    notify_fd = _run("seccomp", seccomp.load, plan["syscalls"], plan["notify"], plan["on_violation"],
                     plan.get("ioctl_ranges"))
    # 12. Read back what is in force and report it, with the listener fd, then let go of both:
    #     a host holding its own listener could answer its own notifications.
    state = _run("report", readback.read_all, plan["ns_names"], limits.read(), securebits)
    _run("report", control.send, ctl, {"ready": state}, () if notify_fd is None else (notify_fd,))
    if notify_fd is not None:
        os.close(notify_fd)
    os.close(life_fd)
    # The control socket last: its EOF tells spawn that only the passed fds are left here.
    ctl.close()
    return function, passed, plan["target_arg"]


def _rebind(sock, fd: int):
    """The socket object for the control socket's new number (the old number is closed)."""
    import _socket
    sock.detach()
    return _socket.socket(fileno=fd)


def _die_with_parent(life_r: int) -> None:
    import select

    import prctl
    prctl.set_pdeathsig(signal.SIGKILL)
    # getppid() is 0 for a pid-namespace init, so the check is the life pipe: its only writer is
    # the launcher, so EOF (readable or hung up) means the launcher has already gone.
    poller = select.poll()
    poller.register(life_r, select.POLLIN)
    if poller.poll(0):
        raise OSError(3, "the launcher is gone", "poll(life pipe)")


def _call_target(function, fds: list[int], arg: dict) -> None:
    try:
        status = function(fds, arg)
        code = 0 if status is None else int(status)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code & 0xFF)
