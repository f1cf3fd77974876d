"""Host start: ``sandbox.spawn`` until the target runs, against ``python -I -S -c pass``.

    .venv/bin/python bench/host_start.py [N] [--userns]

Measures, N times each (default 30), after one warm-up:
  * reference   -- ``python -I -S -c pass`` (fork+exec+interpreter start, nothing else)
  * spawn       -- ``spawn()`` returns: the host is confined, has reported, and its target is
                   about to be called (namespaces, mount view, identity, capabilities, limits,
                   cgroup, seccomp all in force)
  * first reply -- until the target's first byte arrives on a passed socket
Prints median and spread (min, p90, max) in milliseconds, and the ratio to the reference.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sandbox.spec import SandboxSpec, spawn  # noqa: E402


def _reference() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
    return time.perf_counter() - t0


def _host(spec: SandboxSpec) -> tuple[float, float]:
    ours, theirs = socket.socketpair()
    t0 = time.perf_counter()
    box = spawn(spec, "sandbox.probe:run", {"checks": []}, [theirs.fileno()])
    t1 = time.perf_counter()
    theirs.close()
    ours.recv(1)
    t2 = time.perf_counter()
    ours.close()
    box.wait()
    box.close()
    return t1 - t0, t2 - t0


def _line(name: str, samples: list[float], ref: float | None = None) -> str:
    ms = sorted(s * 1000 for s in samples)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    text = (f"{name:<12} median {statistics.median(ms):7.1f} ms   min {ms[0]:6.1f}   p90 {p90:6.1f}"
            f"   max {ms[-1]:6.1f}")
    if ref:
        text += f"   x{statistics.median(ms) / ref:.1f} reference"
    return text


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 30
    userns = True if "--userns" in sys.argv else None
    spec = SandboxSpec(name="bench", optional=frozenset({"cgroup"}), memory_limit_mib=256, userns=userns)
    _reference()
    _host(spec)
    reference = [_reference() for _ in range(n)]
    spawned, replied = zip(*(_host(spec) for _ in range(n)))
    ref_ms = statistics.median(reference) * 1000
    used = userns or os.geteuid() != 0
    print(f"host start, {n} runs each, uid {os.geteuid()}, user namespace {'yes' if used else 'no (root)'}")
    print(_line("reference", reference))
    print(_line("spawn", list(spawned), ref_ms))
    print(_line("first reply", list(replied), ref_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
