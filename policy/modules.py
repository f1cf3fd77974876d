"""Driver modules on the driver search path, and the hash a policy pins them with.

``Dll`` values come from CE registries ("serial.dll", "Serial.DLL"): the extension says nothing
on Linux, so a Dll names a *stem*, looked up in each search directory, in order, as

    STEM.py          a Python driver module            (kind "python")
    STEM/            a Python package (__init__.py)    (kind "package")
    libSTEM.so       a native driver                   (kind "native")
    STEM.so

first as written, then lower-cased (CE names are case-insensitive, Linux file names are not).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from policy.errors import ModuleNotFound, PolicyError

__all__ = ["ModuleRef", "resolve_module", "module_digest", "module_stem"]

_STEM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}\Z")
_EXTENSIONS = (".dll", ".py", ".so")


@dataclass(frozen=True)
class ModuleRef:
    dll: str
    path: Path          # absolute
    kind: str           # "python" | "package" | "native"
    root: Path | None = None    # the search directory it was found in

    @property
    def relative(self) -> str:
        """The path as resolved, relative to its search directory (what a policy records)."""
        return self.path.relative_to(self.root).as_posix() if self.root else self.path.name


def module_stem(dll: str) -> str:
    """``"Serial.dll"`` -> ``"Serial"``; ``"libuart.so"`` -> ``"uart"``.  Raises ModuleNotFound for a
    Dll that is a path or holds characters no module file name should."""
    name = dll.strip()
    if "/" in name or "\\" in name or "\0" in name:
        raise ModuleNotFound(dll, [], "Dll must be a bare module name, not a path")
    for ext in _EXTENSIONS:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            if ext == ".so" and name.startswith("lib"):
                name = name[3:]
            break
    if not _STEM.match(name) or name in (".", ".."):
        raise ModuleNotFound(dll, [], f"{name!r} is not a usable module name (letters, digits, '_', '.', '-')")
    return name


def resolve_module(dll: str, search_path: Sequence[Path]) -> ModuleRef:
    stem = module_stem(dll)
    tried = []
    for directory in search_path:
        directory = Path(directory).absolute()
        for s in dict.fromkeys((stem, stem.lower())):
            for rel, kind in ((f"{s}.py", "python"), (s, "package"), (f"lib{s}.so", "native"), (f"{s}.so", "native")):
                p = directory / rel
                tried.append(str(p) + ("/" if kind == "package" else ""))
                if kind == "package":
                    if p.is_dir() and (p / "__init__.py").is_file():
                        return ModuleRef(dll, p, kind, directory)
                elif p.is_file():
                    return ModuleRef(dll, p, kind, directory)
    raise ModuleNotFound(dll, tried)


def _file_bytes(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PolicyError(f"{path}: not a regular file; a driver module must be one")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def module_digest(ref: ModuleRef) -> str:
    """SHA-256 (hex) of the module.  A package: over its files' sorted relative paths and contents,
    each length-prefixed so that no two different trees hash alike.  ``__pycache__`` and ``*.pyc``
    do not count (they are derived).  A symlink inside a package is refused: what it points at
    could change without the package changing."""
    if ref.kind != "package":
        return hashlib.sha256(_file_bytes(ref.path)).hexdigest()
    h = hashlib.sha256(b"drvbox.package.v1\0")
    entries = []
    for dirpath, dirnames, filenames in os.walk(ref.path, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                raise PolicyError(f"{os.path.join(dirpath, d)}: symlink inside driver package {ref.path}; "
                                  "replace it with the real directory")
        for f in filenames:
            full = os.path.join(dirpath, f)
            if f.endswith(".pyc"):
                continue
            if os.path.islink(full):
                raise PolicyError(f"{full}: symlink inside driver package {ref.path}; replace it with the real file")
            entries.append((Path(full).relative_to(ref.path).as_posix(), Path(full)))
    for rel, full in sorted(entries):
        data = _file_bytes(full)
        name = rel.encode("utf-8", "surrogateescape")
        h.update(len(name).to_bytes(8, "big") + name + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()
