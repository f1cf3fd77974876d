"""Keys the Device Manager makes for itself in its state directory, and the built-in platform's
signed policies.

The development key signs the built-in simulated platform's policies, so that `drvbox run` with
no arguments goes through exactly the acceptance path a real deployment goes through (derive,
sign, verify against a trust store).  It is a development convenience and we say so when we make
it: a production Device Manager is given --policies and --trust made with keys kept elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from policy import signing
from policy.derive import derive

log = logging.getLogger("drvbox.keys")


def keys_dir(state_dir: Path) -> Path:
    d = Path(state_dir) / "keys"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def ensure_key(state_dir: Path, name: str):
    """Load ``<state>/keys/NAME.key``, making it (and NAME.pub) on first use."""
    d = keys_dir(state_dir)
    private = d / f"{name}.key"
    if not private.exists():
        signing.generate_key(name, d)
        log.warning("created the %s key %s (and %s.pub) in the state directory", name, private, name)
    return signing.load_private_key(private)


def sign_user_policies(hive, search_path, key, out_dir: Path) -> list[Path]:
    """Derive every user-mode driver of ``hive``, sign each policy with ``key`` and write it to
    ``out_dir/<key name>.json`` (atomically).  Returns the files written."""
    written = []
    for derived in derive(hive, search_path):
        if derived.entry.mode != "user":
            continue
        name = derived.entry.key_path.rsplit("\\", 1)[-1]
        tmp = out_dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(signing.sign(derived.document, key), indent=1))
        os.replace(tmp, out_dir / f"{name}.json")
        written.append(out_dir / f"{name}.json")
    return written


def new_trust(keys: Path, trust: Path, name: str):
    """A fresh key NAME in ``keys`` and a trust store ``trust`` holding its public half."""
    signing.generate_key(name, keys)
    shutil.copyfile(keys / f"{name}.pub", trust / f"{name}.pub")
    return signing.load_private_key(keys / f"{name}.key")


def builtin_policies(state_dir: Path, hive, search_path) -> tuple[Path, Path]:
    """Derive and sign the built-in platform's policies with the development key.

    Returns ``(policies_dir, trust_dir)``.  Serials are derivation times, so re-deriving on each
    start never looks like a rollback to the acceptance check.
    """
    key = ensure_key(state_dir, "dev")
    base = Path(state_dir) / "builtin"
    policies = base / "policies"
    trust = base / "trust"
    for d in (policies, trust):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in policies.glob("*.json"):
        stale.unlink()
    sign_user_policies(hive, search_path, key, policies)
    shutil.copyfile(keys_dir(state_dir) / "dev.pub", trust / "dev.pub")
    log.warning("built-in simulated platform: policies signed with the development key %s "
                "(trust store %s); for real drivers use --policies/--trust with your own keys",
                keys_dir(state_dir) / "dev.key", trust)
    return policies, trust
