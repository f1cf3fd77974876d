"""Where drvbox keeps its state and its socket (DESIGN.md section 5)."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def default_state_dir() -> Path:
    """``$DRVBOX_STATE_DIR``, else ``/var/lib/drvbox`` for root, else ``$XDG_STATE_HOME/drvbox``."""
    env = os.environ.get("DRVBOX_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/drvbox")
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(xdg) / "drvbox"


def default_socket() -> Path:
    """``$DRVBOX_SOCKET``, else ``/run/drvbox.sock`` for root, else ``$XDG_RUNTIME_DIR/drvbox.sock``,
    else ``/tmp/drvbox-<uid>/drvbox.sock`` (a directory only its owner may write: see
    :func:`check_socket_dir`)."""
    env = os.environ.get("DRVBOX_SOCKET")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/drvbox.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return (Path(runtime) if runtime else fallback_runtime_dir()) / "drvbox.sock"


def audit_log_path(state_dir: Path) -> Path:
    """The audit log of the Device Manager whose state is in ``state_dir``."""
    return Path(state_dir) / "audit.log"


class UnsafeSocketDir(PermissionError):
    """The socket's directory could let someone else put their own socket in its place."""


def fallback_runtime_dir() -> Path:
    """Where a non-root user's socket goes when ``$XDG_RUNTIME_DIR`` is unset."""
    return Path(f"/tmp/drvbox-{os.geteuid()}")


def check_socket_dir(socket_path: Path, *, create: bool, owner_checked: bool = True) -> None:
    """Refuse a socket directory someone else could write: whoever can write it can replace the
    socket, and then receives what clients send (device data) or answers them as the Device
    Manager.  A sticky directory (``/tmp``) is safe: nobody may remove or rename another's file.

    ``create``: make a missing directory, mode 0700 (the Device Manager does; clients do not).
    ``owner_checked``: also refuse a directory owned by anyone but this user or root (always for
    the Device Manager; for a client only where the directory should be its own, the fallback
    under /tmp -- a Device Manager run by a service user may well own the directory clients use).
    """
    directory = Path(socket_path).parent
    if create and not directory.exists():
        os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return                 # nothing listens there; connecting says so itself
    euid = os.geteuid()
    if owner_checked and st.st_uid not in (euid, 0):
        raise UnsafeSocketDir(
            f"{directory} (the directory of the socket {socket_path}) belongs to uid {st.st_uid}, not to you "
            f"(uid {euid}) or root: its owner could replace the socket.  Remove it, or choose another "
            f"path with --socket or DRVBOX_SOCKET")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise UnsafeSocketDir(
            f"{directory} (the directory of the socket {socket_path}) is writable by others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}) and not sticky: anyone could replace the socket.  "
            f"chmod go-w {directory}, or choose another path with --socket or DRVBOX_SOCKET")


class UnsafeStateDir(PermissionError):
    """The state directory could let someone else replace what drvbox trusts in it."""


def check_state_dir(state_dir: Path) -> None:
    """Make a missing state directory (mode 0700) and refuse one that is not safe to trust.

    The state directory holds the audit log and its signing key, the development signing key
    and the pinned copies of driver modules.  Whoever may write it (or rename what is in it, which
    a sticky bit would not stop for new names such as ``audit.head.tmp``) could swap any of those,
    so it must be a directory owned by this user or root that nobody else may write.  A symlink
    to such a directory is fine: it is the directory that is checked."""
    state_dir = Path(state_dir)
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(
            f"the state directory {state_dir} exists and is not a directory: move it away, or choose "
            f"another with --state-dir or DRVBOX_STATE_DIR") from None
    st = os.stat(state_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(
            f"the state directory {state_dir} is not a directory: move it away, or choose another with "
            f"--state-dir or DRVBOX_STATE_DIR")
    euid = os.geteuid()
    if st.st_uid not in (euid, 0):
        raise UnsafeStateDir(
            f"the state directory {state_dir} belongs to uid {st.st_uid}, not to you (uid {euid}) or root: "
            f"its owner could replace the audit log and the keys in it.  chown it, or choose another with "
            f"--state-dir or DRVBOX_STATE_DIR")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeStateDir(
            f"the state directory {state_dir} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"they could replace the audit log and the keys in it.  chmod go-w {state_dir} (0700 is what "
            f"drvbox makes), or choose another with --state-dir or DRVBOX_STATE_DIR")
