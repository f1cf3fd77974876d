"""May this driver do this?  Pure answers, deny by default, every answer with its reason.

Each ``may_*`` function takes a verified :class:`~policy.document.Policy` and the request as the
less-trusted side made it, and returns a :class:`Decision`.  Nothing here raises on odd input:
a request that is malformed (negative length, a bool for an int, an unknown access mode) is
denied, with a reason saying so, because the arguments may come straight from a hostile host.
Every function ends in a denial; an allow is only ever returned from inside a matching rule.
"""

from __future__ import annotations

import grp
import pwd
from operator import itemgetter
from typing import Callable, Iterable, Sequence

from policy.document import Policy, Window, normalise_device_path

__all__ = ["Decision", "may_open", "may_ioctl", "may_transfer", "may_map", "may_port", "may_interrupt",
           "may_alloc_dma", "may_open_device", "may_device_ioctl", "may_syscall"]

_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1


class Decision(tuple):
    """An answer and its reason: ``(allowed, op, reason)``, immutable, true only when allowed.

    The allowed answers of the per-request checks (``may_ioctl``, ``may_transfer``) run on every
    I/O request and their reasons are read only when someone looks: those carry a function that
    formats the reason when it is read (``_explained``).  A tuple, built by ``tuple.__new__``,
    because a frozen dataclass costs more to construct than the check itself.  Denials are always
    formatted at once.
    """

    __slots__ = ()

    def __new__(cls, allowed: bool, op: str, reason: str) -> "Decision":
        return _new(cls, (allowed, op, reason))

    allowed = property(itemgetter(0))
    op = property(itemgetter(1))

    @property
    def reason(self) -> str:
        reason = self[2]
        return reason if type(reason) is str else reason()

    def __bool__(self) -> bool:
        return self[0]

    def __repr__(self) -> str:
        return f"Decision(allowed={self[0]!r}, op={self[1]!r}, reason={self.reason!r})"


_new = tuple.__new__


def _explained(op: str, explain: Callable[[], str]) -> Decision:
    """An allow whose reason ``explain()`` formats when it is read."""
    return _new(Decision, (True, op, explain))


def _allow(op: str, reason: str) -> Decision:
    return Decision(True, op, reason)


def _deny(op: str, reason: str) -> Decision:
    return Decision(False, op, reason)


def _is_int(x: object, lo: int = 0, hi: int = _U64) -> bool:
    return type(x) is int and lo <= x <= hi          # bool is not an int here


def _hexr(lo: int, hi: int) -> str:
    return f"0x{lo:X}" if lo == hi else f"0x{lo:X}-0x{hi:X}"


# --- clients ---------------------------------------------------------------------------------

def _uid_of(entry: str) -> int | None:
    if entry.isdigit():
        return int(entry)
    try:
        return pwd.getpwnam(entry).pw_uid
    except KeyError:
        return None                       # a name this machine does not know matches nobody


def _gid_of(entry: str) -> int | None:
    if entry.isdigit():
        return int(entry)
    try:
        return grp.getgrnam(entry).gr_gid
    except KeyError:
        return None


def may_open(policy: Policy, uid: int, gids: Sequence[int], owner_uid: int) -> Decision:
    """A client (``uid``, ``gids`` from SO_PEERCRED and the process' groups) opening the device.

    TRUSTEDCALLERONLY admits only root and the Device Manager's owner.  AllowUsers/AllowGroups:
    both absent admits everyone who can reach the socket; otherwise the caller must be listed in
    one of them (an absent list then counts as empty).
    """
    op = "open"
    if not _is_int(uid, 0, _U32) or not _is_int(owner_uid, 0, _U32):
        return _deny(op, f"malformed caller credentials uid={uid!r}")
    try:
        gid_set = {g for g in gids if _is_int(g, 0, _U32)}
    except TypeError:
        return _deny(op, "malformed caller group list")
    if policy.trusted_only and uid not in (0, owner_uid):
        return _deny(op, f"device is TRUSTEDCALLERONLY (Flags 0x10000): uid {uid} is neither root nor the owner uid {owner_uid}")
    if policy.allow_users is None and policy.allow_groups is None:
        return _allow(op, "no AllowUsers/AllowGroups: every client that can reach the socket"
                      + (" (trusted caller)" if policy.trusted_only else ""))
    for entry in policy.allow_users or ():
        if _uid_of(entry) == uid:
            return _allow(op, f"uid {uid} is listed in AllowUsers as {entry!r}")
    for entry in policy.allow_groups or ():
        gid = _gid_of(entry)
        if gid is not None and gid in gid_set:
            return _allow(op, f"gid {gid} is listed in AllowGroups as {entry!r}")
    return _deny(op, f"uid {uid} (groups {sorted(gid_set)}) is in neither AllowUsers {list(policy.allow_users or [])} "
                     f"nor AllowGroups {list(policy.allow_groups or [])}")


# --- I/O requests ----------------------------------------------------------------------------

def may_ioctl(policy: Policy, code: int, in_len: int, out_len: int) -> Decision:
    op = "ioctl"
    # Checked inline (not through _is_int and a loop) and the allowed reason formatted lazily:
    # this runs on every IOCTL.  The denials are the same, in the same order.
    if type(code) is not int or not 0 <= code <= _U32:
        return _deny(op, f"ioctl code {code!r} is not a 32-bit unsigned integer")
    limit = policy.max_io_size
    if type(in_len) is not int or in_len < 0 or in_len > _U64:
        return _deny(op, f"input length {in_len!r} is not a non-negative integer")
    if in_len > limit:
        return _deny(op, f"input length {in_len} exceeds MaxIoSize {limit}")
    if type(out_len) is not int or out_len < 0 or out_len > _U64:
        return _deny(op, f"output length {out_len!r} is not a non-negative integer")
    if out_len > limit:
        return _deny(op, f"output length {out_len} exceeds MaxIoSize {limit}")
    ranges = policy.ioctl_ranges
    if ranges is None:
        return _explained(op, lambda: f"code 0x{code:08X}: the policy allows every code (no IoctlAllow)")
    for lo, hi in ranges:
        if lo <= code <= hi:
            return _explained(op, lambda: f"code 0x{code:08X} is in IoctlAllow {_hexr(lo, hi)}")
    return _deny(op, f"code 0x{code:08X} is not in IoctlAllow")


def may_transfer(policy: Policy, op: str, length: int) -> Decision:
    """A ``read`` or ``write`` of ``length`` bytes."""
    if op != "read" and op != "write":
        return _deny(str(op), f"unknown transfer operation {op!r}: expected 'read' or 'write'")
    if type(length) is not int or length < 0 or length > _U64:
        return _deny(op, f"length {length!r} is not a non-negative integer")
    limit = policy.max_io_size
    if length > limit:
        return _deny(op, f"{op} of {length} bytes exceeds MaxIoSize {limit}")
    # Formatted lazily: this runs on every read and write (see Decision).
    return _explained(op, lambda: f"{op} of {length} bytes is within MaxIoSize {limit}")


# --- hardware --------------------------------------------------------------------------------

def _access_ok(window_access: str, access: str) -> bool:
    # "rw" grants reading and writing; "r" grants reading only.
    return access == "r" or window_access == "rw"


def _inside(windows: Iterable[Window], start: int, length: int, access: str, op: str, what: str) -> Decision:
    end = start + length
    for w in windows:
        if w.base <= start and end <= w.end:
            if not _access_ok(w.access, access):
                return _deny(op, f"{what} 0x{start:X}+0x{length:X} lies in window 0x{w.base:X}+0x{w.length:X} "
                                 f"which grants '{w.access}', not '{access}'")
            return _allow(op, f"{what} 0x{start:X}+0x{length:X} lies in window 0x{w.base:X}+0x{w.length:X} ({w.access})")
    return _deny(op, f"{what} 0x{start:X}+0x{length:X} is not inside any window the policy grants")


def may_map(policy: Policy, phys: int, length: int, access: str = "rw") -> Decision:
    """Mapping physical memory ``[phys, phys+length)``: the whole range inside one memory window."""
    op = "map"
    if access not in ("r", "rw"):
        return _deny(op, f"access {access!r} is not 'r' or 'rw'")
    if not _is_int(phys) or not _is_int(length, 1):
        return _deny(op, f"malformed range phys={phys!r} length={length!r} (length must be at least 1)")
    if phys + length > 1 << 64:
        return _deny(op, f"range 0x{phys:X}+0x{length:X} wraps past the end of the address space")
    return _inside(policy.memory_windows, phys, length, access, op, "memory")


def may_port(policy: Policy, port: int, width: int, access: str) -> Decision:
    """A port access of ``width`` bytes (1, 2, 4) at ``port``; every byte of it inside one window.
    ``access``: ``"r"`` to read, ``"w"`` or ``"rw"`` to write."""
    op = "port"
    if access not in ("r", "w", "rw"):
        return _deny(op, f"access {access!r} is not 'r', 'w' or 'rw'")
    if width not in (1, 2, 4) or type(width) is not int:
        return _deny(op, f"width {width!r} is not 1, 2 or 4 bytes")
    if not _is_int(port, 0, 0xFFFF):
        return _deny(op, f"port {port!r} is outside 0..0xFFFF")
    return _inside(policy.port_windows, port, width, "r" if access == "r" else "rw", op, "port")


def may_interrupt(policy: Policy, irq: int) -> Decision:
    op = "interrupt"
    if not _is_int(irq, 0, _U32):
        return _deny(op, f"interrupt {irq!r} is not a 32-bit unsigned integer")
    if irq in policy.irqs:
        return _allow(op, f"interrupt {irq} is granted by Irq/SysIntr")
    return _deny(op, f"interrupt {irq} is not granted (granted: {sorted(policy.irqs) or 'none'})")


def may_alloc_dma(policy: Policy, size: int, held: int) -> Decision:
    """Allocating ``size`` more bytes of DMA buffer while ``held`` bytes are already held."""
    op = "dma"
    if not _is_int(size, 1) or not _is_int(held):
        return _deny(op, f"malformed request size={size!r} held={held!r} (size must be at least 1)")
    if held + size > policy.dma_quota:
        return _deny(op, f"{size} bytes more with {held} held exceeds DmaQuota {policy.dma_quota}")
    return _allow(op, f"{held + size} of DmaQuota {policy.dma_quota} bytes in use after this")


def _node(policy: Policy, path: str):
    norm = normalise_device_path(path)
    if norm is None:
        return None, f"device path {path!r} is not absolute (relative paths are refused)"
    for node in policy.device_nodes:
        if node.path == norm:
            return node, norm
    return None, f"device {norm!r} is not listed in DeviceNodes"


def may_open_device(policy: Policy, path: str, mode: str) -> Decision:
    """Opening a Linux device node, by the Reflector for the driver.  The path is compared after
    ``normpath``; the Reflector must still open it without following symlinks it did not expect."""
    op = "open_device"
    if mode not in ("r", "rw"):
        return _deny(op, f"mode {mode!r} is not 'r' or 'rw'")
    node, why = _node(policy, path)
    if node is None:
        return _deny(op, why)
    if not _access_ok(node.mode, mode):
        return _deny(op, f"device {node.path!r} is granted '{node.mode}', not '{mode}'")
    return _allow(op, f"device {node.path!r} is listed in DeviceNodes ({node.mode})")


def may_device_ioctl(policy: Policy, path: str, request: int) -> Decision:
    op = "device_ioctl"
    if not _is_int(request, 0, _U32):
        return _deny(op, f"request {request!r} is not a 32-bit unsigned integer")
    node, why = _node(policy, path)
    if node is None:
        return _deny(op, why)
    for lo, hi in node.ioctls:
        if lo <= request <= hi:
            return _allow(op, f"request 0x{request:X} on {node.path!r} is allowed ({_hexr(lo, hi)})")
    return _deny(op, f"request 0x{request:X} on {node.path!r} is not among the node's allowed ioctls")


def may_syscall(policy: Policy, name: str) -> Decision:
    """Only the system calls the policy adds to the host's base allowlist (that list is sandbox's)."""
    op = "syscall"
    if isinstance(name, str) and name in policy.syscalls:
        return _allow(op, f"system call {name!r} is added by the policy's Syscalls")
    return _deny(op, f"system call {name!r} is not among the policy's Syscalls additions")
