"""Compile the native test drivers of this directory with the system's C compiler.

Each test compiles what it needs into its own temporary directory (nothing is written here);
``compiler()`` says why a test must skip where there is no compiler.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAGS = ("-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden", "-pthread")


def compiler() -> str | None:
    """The C compiler to use, or None."""
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def build(source: str, out: Path, *defines: str) -> Path:
    """Compile ``source`` (a file of this directory) into the shared object ``out``, with
    ``-D`` for each of ``defines``; returns ``out``.  A compiler error fails with its output."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [cc, *FLAGS, *(f"-D{d}" for d in defines), "-o", str(out), str(HERE / source)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return out
