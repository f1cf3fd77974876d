"""Who a client is: read from the socket as of its connect(), never from /proc afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from reflector.server import _peer

# Joins group 4242, connects, leaves every supplementary group, then says so: by the time the
# Device Manager looks, the process is no longer in 4242 (as a reused pid would not be).
_CLIENT = """
import os, socket, sys
os.setgroups([4242])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
os.setgroups([])
s.sendall(b"x")
s.recv(1)
"""


def test_peer_of_a_socketpair_is_this_process():
    a, b = socket.socketpair()
    with a, b:
        caller = _peer(a)
    assert (caller.pid, caller.uid, caller.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert caller.groups == tuple(sorted({os.getgid(), *os.getgroups()}))


@pytest.mark.needs_root
def test_groups_are_those_the_client_had_when_it_connected(tmp_path):
    path = str(tmp_path / "s")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    client = subprocess.Popen([sys.executable, "-c", _CLIENT, path])
    try:
        server.settimeout(30)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(30)
            assert conn.recv(1) == b"x"            # it has left group 4242 by now
            with open(f"/proc/{client.pid}/status") as f:
                assert "4242" not in next(line for line in f if line.startswith("Groups:"))
            assert 4242 in _peer(conn).groups
            conn.sendall(b"x")
    finally:
        server.close()
        client.wait(30)
    assert client.returncode == 0
