"""``ConfinementError`` and the named steps of the confinement sequence.

Every step the launcher runs has a name and an exit status.  A step that fails sends
``(step, call, errno)`` over the control socket and exits with that status, so the parent can
name the step even when the message was lost.  The statuses sit in 64..78 (the ``sysexits``
range), below the host's own statuses (``hosts/exits.py`` starts at 80) and the shell's 126+.
"""

from __future__ import annotations

import errno as _errno
import os

# In the order the launcher runs them (sandbox/launcher.py argues that order).
STEPS = (
    "spec",          # the plan sent by the parent could not be read
    "pdeathsig",     # PR_SET_PDEATHSIG, or the parent was already gone
    "namespaces",    # unshare(2)
    "userns_maps",   # uid_map/gid_map written by the parent
    "fork",          # the fork that makes the host pid 1 of its pid namespace
    "mounts",        # the mount view and pivot_root
    "capabilities",  # bounding set, securebits, the other sets
    "identity",      # setgroups, setresgid, setresuid
    "no_new_privs",  # PR_SET_NO_NEW_PRIVS
    "limits",        # rlimits
    "fds",           # renumbering the passed fds, closing every other one
    "import",        # importing the target
    "seccomp",       # building and loading the filter
    "report",        # reading back what is in force and sending it to the parent
    "launcher",      # anything else that went wrong inside the launcher
)
EXIT_BASE = 64
EXIT_STATUS = {step: EXIT_BASE + i for i, step in enumerate(STEPS)}
STEP_OF_EXIT = {code: step for step, code in EXIT_STATUS.items()}

# Steps done by the parent (spawn), which have no exit status of their own.
PARENT_STEPS = ("cgroup", "start")


def errno_name(number: int | None) -> str:
    if number is None:
        return "no errno"
    return _errno.errorcode.get(number, f"errno {number}")


# Non-root users rarely get a cgroup: on cgroup v1 or hybrid machines the hierarchies are root's,
# and on v2 only a delegated subtree is theirs.  What to do about it, named once for every place
# that reports it (a failed host start, `drvbox sandbox check`, `drvbox bench`).
CGROUP_REMEDY = ("run as root, or inside a delegated cgroup v2 subtree with the memory and pids "
                 "controllers (e.g. systemd-run --user --scope -p Delegate=yes ...); or run without "
                 "one: `drvbox run --allow-missing cgroup` (`make run ARGS='--allow-missing cgroup'`), "
                 "which bounds a host's MemoryLimit by RLIMIT_AS instead and its threads by "
                 "RLIMIT_NPROC (in a user namespace: always when not root); in code, "
                 "SandboxSpec(optional={'cgroup'})")

# What usually fixes a failed step; quoted in the message.
_HINTS = {
    "namespaces": "user namespaces may be disabled (sysctl kernel.unprivileged_userns_clone, "
                  "user.max_user_namespaces) or the process is already in a restricted container",
    "userns_maps": "the parent could not write /proc/PID/uid_map; as root, check that the uid/gid "
                   "of the spec exist in the parent's user namespace",
    "mounts": "every path bound into the sandbox must exist; check readonly_paths",
    "identity": "uid and gid must be non-zero and mapped",
    "import": "the target must be importable from the read-only view: its package directory is "
              "bound automatically, anything else it imports must be in the stdlib or readonly_paths",
    "seccomp": "seccomp user notification needs Linux >= 5.0 and libseccomp >= 2.5; "
               "or accept 'seccomp_notify' in spec.optional",
    "cgroup": CGROUP_REMEDY,
}


class ConfinementError(Exception):
    """A sandbox could not be confined as asked; nothing of it is left running.

    ``step`` names the step (one of ``STEPS`` or ``PARENT_STEPS``), ``call`` the exact call that
    failed, ``errno`` its errno (None when the failure was not a system call's).
    """

    def __init__(self, step: str, call: str, errno: int | None = None, *, name: str = "sandbox",
                 hint: str | None = None):
        self.step = step
        self.call = call
        self.errno = errno
        self.name = name
        self.hint = hint if hint is not None else _HINTS.get(step)
        why = f"{errno_name(errno)} ({os.strerror(errno)})" if errno is not None else "refused"
        message = f"{name}: confinement step {step!r} failed: {call}: {why}"
        if self.hint:
            message += f"; hint: {self.hint}"
        super().__init__(message)

    def __reduce__(self):  # keeps the keyword-only arguments when pickled by test runners
        return (_rebuild, (self.step, self.call, self.errno, self.name, self.hint))


def _rebuild(step, call, errno, name, hint):
    return ConfinementError(step, call, errno, name=name, hint=hint)
