"""Identity: an unprivileged, non-zero uid and gid (also as seen inside), no supplementary groups.

Child side, after the mount view (which needs the privileges this gives up) and after the
bounding set is dropped (which needs CAP_SETPCAP, gone once setresuid leaves uid 0).

Without a user namespace (root parent), setresuid from 0 also makes the kernel clear the
permitted and effective sets; we clear them explicitly anyway (sandbox/capabilities.py).  In a
user namespace created by an unprivileged parent, setgroups(2) is denied, so the outer user's
supplementary groups stay (they show as the overflow gid inside): a documented limit.
"""

from __future__ import annotations

import os


def apply(uid: int, gid: int, set_groups: bool) -> None:
    # A new session: the host has no controlling terminal, so it cannot push input into the
    # terminal `drvbox run` was started from (TIOCSTI needs CAP_SYS_ADMIN on another's tty).
    _call(os.setsid, "setsid()")
    assume(uid, gid, set_groups)


def assume(uid: int, gid: int, set_groups: bool) -> None:
    """Just the ids (and no supplementary groups where we may clear them), read back."""
    if set_groups:
        _call(lambda: os.setgroups([]), "setgroups(0, [])")
    # gid before uid: once the uid is unprivileged, the gid can no longer be changed.
    _call(lambda: os.setresgid(gid, gid, gid), f"setresgid({gid}, {gid}, {gid})")
    _call(lambda: os.setresuid(uid, uid, uid), f"setresuid({uid}, {uid}, {uid})")
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError(1, "ids did not change", f"getresuid()={os.getresuid()} getresgid()={os.getresgid()}")
    if set_groups and os.getgroups():
        raise OSError(1, "supplementary groups remain", f"getgroups()={os.getgroups()}")


def _call(fn, call: str) -> None:
    try:
        fn()
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, call) from None
