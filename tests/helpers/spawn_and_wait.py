"""Helper for the parent-death test: start one sandbox, print its pids, wait to be killed.

    python tests/helpers/spawn_and_wait.py default|userns [idle|deaf]

Prints one JSON line {"pid": launcher pid, "inner_pid": host pid, "self": own pid} once the
sandbox is confined, then blocks on stdin.  The test kills this process with SIGKILL and checks
that the sandbox ended with it.  The target ``idle`` would also end on its socket's EOF; ``deaf``
ends only by a signal, so only the parent-death signals can end it.
"""

import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sandbox.spec import SandboxSpec, spawn  # noqa: E402

ours, theirs = socket.socketpair()
userns = True if sys.argv[1] == "userns" else None
target = sys.argv[2] if len(sys.argv) > 2 else "idle"
box = spawn(SandboxSpec(name="parent-death", userns=userns, optional=frozenset({"cgroup"})),
            f"sandbox.probe:{target}", {}, [theirs.fileno()])
print(json.dumps({"pid": box.pid, "inner_pid": box.inner_pid, "self": os.getpid()}), flush=True)
sys.stdin.read()
