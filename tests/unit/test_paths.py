"""Where the socket may live: a directory someone else could write would let them replace the
socket and read what clients send, so both ends refuse it (a non-root user's socket falls back to
/tmp/drvbox-<uid>, which anyone could have made first)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from reflector import paths
from reflector.client import connect
from reflector.paths import UnsafeSocketDir, check_socket_dir

NOBODY = 65534


def test_a_missing_directory_is_made_private(tmp_path):
    sock = tmp_path / "run" / "drvbox" / "dm.sock"
    check_socket_dir(sock, create=True)
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) & 0o077 == 0


def test_a_directory_others_may_write_is_refused_unless_sticky(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafeSocketDir, match=r"writable by others \(mode 0777\).*chmod go-w"):
        check_socket_dir(shared / "dm.sock", create=True)
    shared.chmod(0o775)
    with pytest.raises(UnsafeSocketDir, match="mode 0775"):
        check_socket_dir(shared / "dm.sock", create=False)
    shared.chmod(0o1777)          # like /tmp: nobody may remove or rename another's socket
    check_socket_dir(shared / "dm.sock", create=True)


@pytest.mark.needs_root
def test_a_directory_owned_by_another_user_is_refused(tmp_path):
    planted = tmp_path / "drvbox-1001"
    planted.mkdir(mode=0o755)
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(UnsafeSocketDir, match=f"belongs to uid {NOBODY}"):
        check_socket_dir(planted / "drvbox.sock", create=True)
    # A client checks the owner only where the directory should be its own (the fallback): a
    # Device Manager run by a service user may own the directory its clients connect through.
    check_socket_dir(planted / "drvbox.sock", create=False, owner_checked=False)


def test_the_fallback_is_per_user_under_tmp(monkeypatch):
    monkeypatch.delenv("DRVBOX_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(paths.os, "geteuid", lambda: 0)
    assert paths.default_socket() == Path("/run/drvbox.sock")      # root's, whatever the environment
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1001)          # any other user: the fallback
    assert paths.default_socket() == Path("/tmp/drvbox-1001/drvbox.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1001")
    assert paths.default_socket() == Path("/run/user/1001/drvbox.sock")


def test_a_client_refuses_a_socket_in_a_directory_anyone_may_write(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind(str(shared / "dm.sock"))        # somebody's socket, planted there
        listener.listen(1)
        with pytest.raises(UnsafeSocketDir, match="anyone could replace the socket"):
            connect(shared / "dm.sock")
    finally:
        listener.close()


def test_the_device_manager_refuses_to_serve_there(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    reg = tmp_path / "empty.reg"
    reg.write_text("REGEDIT4\n")
    proc = subprocess.run(
        [sys.executable, "-m", "reflector.cli", "--state-dir", str(tmp_path / "state"), "--socket",
         str(shared / "dm.sock"), "run", "--registry", str(reg)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "writable by others" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (shared / "dm.sock").exists()
