"""Capabilities (python-prctl): every set empty, securebits locked.

Two child-side halves, around the identity change:

* ``bound`` -- lock the securebits and empty the bounding set.  Both need CAP_SETPCAP, which
  setresuid away from uid 0 takes; so this runs *before* identity.
* ``clear`` -- empty the effective, permitted and inheritable sets and the ambient set, then
  check /proc/self/status: fail closed if any set still holds a bit (a libcap that does not know
  a capability this kernel has would leave it).  Runs *after* identity, which still needed
  CAP_SETUID/CAP_SETGID.
"""

from __future__ import annotations

import _prctl
import prctl

from sandbox import libc

# NOROOT: uid 0 grants nothing on exec.  NO_SETUID_FIXUP stays *off* (the kernel's own clearing
# of the sets on setresuid away from 0 is one more guard) but locked.  KEEP_CAPS off and locked.
# NO_CAP_AMBIENT_RAISE on and locked (python-prctl has no name for bits 6 and 7).
SECUREBITS = ((1 << 0) | (1 << 1)          # SECBIT_NOROOT, _LOCKED
              | (1 << 3)                   # SECBIT_NO_SETUID_FIXUP_LOCKED
              | (1 << 5)                   # SECBIT_KEEP_CAPS_LOCKED
              | (1 << 6) | (1 << 7))       # SECBIT_NO_CAP_AMBIENT_RAISE, _LOCKED

SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def bound(last: int) -> int:
    """Lock securebits, drop every capability from the bounding set; the securebits read back."""
    # Through libc: python-prctl refuses the NO_CAP_AMBIENT_RAISE bits it has no name for.
    libc.prctl(libc.PR_SET_SECUREBITS, SECUREBITS, f"prctl(PR_SET_SECUREBITS, {SECUREBITS:#x})")
    for cap in range(last + 1):
        try:
            _prctl.prctl(_prctl.PR_CAPBSET_DROP, cap)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, f"prctl(PR_CAPBSET_DROP, {cap})") from None
    found = libc.prctl(libc.PR_GET_SECUREBITS, 0, "prctl(PR_GET_SECUREBITS)")
    if found & SECUREBITS != SECUREBITS:
        raise OSError(1, "securebits not set", f"prctl(PR_GET_SECUREBITS)={found:#x}, wanted {SECUREBITS:#x}")
    return found


def clear() -> None:
    empty_sets()
    left = {name: value for name, value in read_sets().items() if value}
    if left:
        raise OSError(1, "capabilities remain", "read /proc/self/status: "
                      + ", ".join(f"{k}={v:016x}" for k, v in left.items()))


def empty_sets() -> None:
    """Empty the ambient, effective, permitted and inheritable sets, without clear's read-back.

    The launcher's reaper calls this alone: it shares the host's mount namespace, so its /proc
    may already be the host's, where the reaper (outside that pid namespace) has no /proc/self.
    """
    libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL, "prctl(PR_CAP_AMBIENT, CLEAR_ALL)")
    everything = list(prctl.ALL_CAPS)
    try:
        prctl.set_caps((everything, prctl.CAP_EFFECTIVE, False),
                       (everything, prctl.CAP_PERMITTED, False),
                       (everything, prctl.CAP_INHERITABLE, False))
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, "capset(effective=0, permitted=0, inheritable=0)") from None


def read_sets(status: str | None = None) -> dict[str, int]:
    if status is None:
        with open("/proc/self/status") as f:
            status = f.read()
    sets = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in SETS:
            sets[key] = int(value.strip(), 16)
    return sets
