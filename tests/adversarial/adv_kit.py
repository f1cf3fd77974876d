"""The adversarial suite's kit: a real Device Manager serving hostile drivers, and helpers.

The hostile driver is written into a temporary directory at run time (``hostile_source``), so
what runs is a driver that is not part of this repository.  One Device Manager per module keeps
the whole suite within its time budget; tests that kill hosts use their own group.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path


HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "e2e"))
sys.path.insert(0, str(HERE))

from dm_harness import DeviceManagerProcess, Hammer, reg_driver, reg_group  # noqa: E402,F401 (Hammer: for the tests)
from hostile_source import ATTACK, ECHO, SENTINEL, SOURCE  # noqa: E402

ALLOW = '"IoctlAllow"=multi_sz:"0x00220000-0x002200FF"\n"MaxIoSize"=dword:10000'


def write_hostile(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hostile.py").write_text(SOURCE)
    # World-writable on purpose: uid 65534 passes the permission check, so only the read-only
    # mount of the driver's files can refuse a write there (EROFS, not EACCES).
    directory.chmod(0o777)
    (directory / "hostile.py").chmod(0o666)
    return directory


def hostile(name: str, prefix: str, group: int, order: int = 1, extra: str = "") -> str:
    return reg_driver(name, prefix, "hostile.dll", group=group, order=order,
                      extra=ALLOW + ("\n" + extra if extra else ""))


def attack(handle, name: str, arg=None) -> tuple[int, int]:
    """Run one attack in the driver behind ``handle``: (errno the attack got, value)."""
    out = handle.ioctl(ATTACK, json.dumps({"attack": name, "arg": arg}).encode(), 16)
    magic, err, value = struct.unpack("<IiQ", out)
    assert magic == SENTINEL, f"{name}: the answer did not come from the attack code: {out!r}"
    return err, value


def denied_syscalls(dm, group: int) -> set[str]:
    return {r["detail"]["syscall"] for r in dm.audit("syscall.denied") if r.get("group") == group}


def start(tmp: Path, registry: str, **kw) -> DeviceManagerProcess:
    drivers = write_hostile(tmp / "untrusted-drivers")
    return DeviceManagerProcess(tmp, registry, driver_dirs=[drivers], **kw).start()


def hostile_dm_fixture(tmp_path_factory):
    """HOS1: (group 1, the attacker, MemoryLimit 50 MiB, 2 s timeout), OKY1: (group 2, the bystander),
    TWA1: and TWB1: (group 3, one host; only TWB1:'s policy grants /dev/null)."""
    tmp = tmp_path_factory.mktemp("adv")
    registry = (hostile("Hostile", "HOS", 1) + hostile("Steady", "OKY", 2, order=2)
                + hostile("TwinA", "TWA", 3, order=3)
                + hostile("TwinB", "TWB", 3, order=4, extra='"DeviceNodes"=multi_sz:"/dev/null:r"')
                + reg_group(1, timeout_ms=2000, restart_limit=1000, extra='"MemoryLimit"=dword:32')  # hex: 50 MiB
                + reg_group(2) + reg_group(3, restart_limit=1000))
    dm = start(tmp, registry)
    yield dm
    dm.stop()
