"""Where drvbox keeps its state and its socket (DESIGN.md section 5)."""

from __future__ import annotations

import os
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
    """``$DRVBOX_SOCKET``, else ``/run/drvbox.sock`` for root, else ``$XDG_RUNTIME_DIR/drvbox.sock``."""
    env = os.environ.get("DRVBOX_SOCKET")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/drvbox.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/drvbox-{os.geteuid()}"
    return Path(runtime) / "drvbox.sock"


def audit_log_path(state_dir: Path) -> Path:
    return Path(state_dir) / "audit.log"
