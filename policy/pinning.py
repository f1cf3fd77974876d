"""Pinning a driver module: the code a host runs is a private copy of the code the policy names.

A signed policy names its module by SHA-256, and acceptance checks the file when the Device
Manager starts.  But hosts start again later (restarts, splits), and a file on the driver path
can be replaced in between.  So at acceptance the module is copied into the state directory,
under its digest, the *copy* is hashed and compared with the policy, and every host of the driver
loads the copy.  Whoever can write the driver path afterwards changes nothing that runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from policy.errors import PolicyError
from policy.modules import ModuleRef, module_digest


class ModuleMismatch(PolicyError):
    """The module on disk is not the one the policy names."""


def pin_module(ref: ModuleRef, expected_sha256: str, state_dir: Path) -> ModuleRef:
    """Copy ``ref`` to ``<state>/modules/<sha256>/``, check the copy against ``expected_sha256``,
    and return a ModuleRef to the copy.  Raises ModuleMismatch if the copy does not match.

    Copies are made read-only (files 0444, directories 0555) inside a 0700 state directory; a pin
    that already exists and still matches is reused.
    """
    home = Path(state_dir) / "modules"
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = home / expected_sha256
    pinned = ModuleRef(ref.dll, final / ref.path.name, ref.kind, final)
    if final.exists():
        if module_digest(pinned) == expected_sha256:
            return pinned
        _remove(final)                       # damaged: make it again
    staging = Path(tempfile.mkdtemp(prefix=".pin-", dir=home))
    try:
        target = staging / ref.path.name
        if ref.kind == "package":
            shutil.copytree(ref.path, target, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copyfile(ref.path, target, follow_symlinks=False)
        got = module_digest(ModuleRef(ref.dll, target, ref.kind, staging))
        if got != expected_sha256:
            raise ModuleMismatch(f"{ref.path}: SHA-256 {got} is not the {expected_sha256} its signed policy names; "
                                 f"re-derive and re-sign the policy if the module changed on purpose")
        _read_only(staging)
        os.replace(staging, final)
    except BaseException:
        _remove(staging)
        raise
    return pinned


def _read_only(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o444, follow_symlinks=False)
        os.chmod(dirpath, 0o555)


def _remove(path: Path) -> None:
    if not path.exists():
        return
    for dirpath, dirnames, _ in os.walk(path):
        os.chmod(dirpath, 0o700)
    shutil.rmtree(path, ignore_errors=True)
