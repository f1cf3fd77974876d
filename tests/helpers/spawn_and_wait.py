"""Helper for the parent-death test: start one sandbox, print its pids, wait to be killed.

    python tests/helpers/spawn_and_wait.py [userns]

Prints one JSON line {"pid": launcher pid, "inner_pid": host pid, "self": own pid} once the
sandbox is confined, then blocks on stdin.  The test kills this process with SIGKILL and checks
that the sandbox ended with it.
"""

import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sandbox.spec import SandboxSpec, spawn  # noqa: E402

ours, theirs = socket.socketpair()
userns = True if sys.argv[1:] == ["userns"] else None
box = spawn(SandboxSpec(name="parent-death", userns=userns, optional=frozenset({"cgroup"})),
            "sandbox.probe:idle", {}, [theirs.fileno()])
print(json.dumps({"pid": box.pid, "inner_pid": box.inner_pid, "self": os.getpid()}), flush=True)
sys.stdin.read()
