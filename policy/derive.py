"""Registry driver keys -> policy documents (DESIGN.md sections 2 and 3).

One document per driver key.  Derivation is strict where guessing would widen what a driver may
do, and says so where the registry itself widens it:

* hard errors (:class:`DerivationError`, naming key, value and ``file:line:col``): windows that
  wrap, overlap or have zero length, a base without its length, a port window running past
  0xFFFF, malformed IoctlAllow / DeviceNodes / Syscalls / AllowUsers entries, unknown
  RegisterAccess, MaxIoSize above 1 GiB, an undefined ``$(MACRO)`` left in a number;
* warnings (strings naming key and value): no IoctlAllow (every code allowed), Syscalls added,
  an IRQ claimed by two drivers, a device name used twice, a module not on the search path
  (its hash is then null and acceptance will refuse the policy), an IoBase beyond the port space
  (taken as memory-mapped I/O, as CE does on platforms without port I/O), a missing ProcGroup key;
* values the file wrote but the parser could not read (:meth:`policy.hive.Key.unread`, e.g.
  ``"UserProcGroup"=dword:$(PROCGROUP_X)`` without ``-D PROCGROUP_X=N``): a warning saying what
  the missing value changes when it only grants (a window, an IRQ, a shared host), a hard error
  when it narrows (IoctlAllow, MaxIoSize, RegisterAccess, AllowUsers/AllowGroups; Dll and Flags in
  find_drivers), because the default would widen what the author wrote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from policy.document import SCHEMA_ID, format_datetime, normalise_device_path, validate_document
from policy.drivers import (DriverEntry, find_drivers, group_settings, read_number, read_numbers, read_string,
                            read_strings)
from policy.errors import DerivationError, ModuleNotFound, PolicyError, PolicyInvalid
from policy.modules import module_digest, resolve_module

__all__ = ["Derived", "derive", "derive_one", "DEFAULT_MAX_IO_SIZE", "MAX_MAX_IO_SIZE"]

DEFAULT_MAX_IO_SIZE = 1 << 20
MAX_MAX_IO_SIZE = 1 << 30        # request buffers live in the host's shared arena
_PORT_END = 0x10000

_SYSCALL = re.compile(r"[a-z_][a-z0-9_]{0,63}\Z")
_PRINCIPAL = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}\$?\Z")
_CODE = re.compile(r"(?:0[xX])?([0-9A-Fa-f]{1,8})\Z")


@dataclass
class Derived:
    entry: DriverEntry
    document: dict
    warnings: list[str] = field(default_factory=list)


def _where(key, name: str | None) -> str:
    value = key.get(name) if name else None
    loc = f"{value.location}: " if value is not None and value.location else ""
    return f'{loc}[{key.path}]' + (f' "{name}"' if name else "")


def _err(key, name: str | None, problem: str, fix: str | None = None):
    value = key.get(name) if name else None
    raise DerivationError(key.path, name, problem, getattr(value, "location", None), fix)


# --- windows ---------------------------------------------------------------------------------

def _pairs(key, base_name: str, len_name: str, bits: int) -> list[tuple[int, int, int]]:
    bases = read_numbers(key, base_name, hex_strings=True, bits=bits)
    lens = read_numbers(key, len_name, hex_strings=True, bits=bits)
    if bases is None and lens is None:
        return []
    if bases is None or lens is None:
        missing, present = (base_name, len_name) if bases is None else (len_name, base_name)
        _err(key, present, f"{present} without {missing}", f"give {missing} as well, one entry per window")
    if len(bases) != len(lens):
        _err(key, len_name, f"{len(bases)} {base_name} entries but {len(lens)} {len_name} entries",
             "give one length per base, in the same order")
    out = []
    for i, (b, n) in enumerate(zip(bases, lens)):
        if n == 0:
            _err(key, len_name, f"window {i} (base 0x{b:X}) has length 0", "give the window's size in bytes")
        out.append((i, b, n))
    return out


def _check_overlaps(key, name: str, windows: list[dict]) -> list[dict]:
    """Sort, drop exact duplicates, and refuse partial overlaps."""
    unique = {(w["base"], w["length"]): w for w in windows}
    spans = sorted(unique.values(), key=lambda w: w["base"])
    for a, b in zip(spans, spans[1:]):
        if b["base"] < a["base"] + a["length"]:
            _err(key, name, f"window 0x{b['base']:X}+0x{b['length']:X} ({b['source']}) overlaps "
                 f"0x{a['base']:X}+0x{a['length']:X} ({a['source']})", "merge them into one window or fix the lengths")
    return spans


def _windows(key, warnings: list[str]) -> tuple[list[dict], list[dict]]:
    mem_bits = 64 if (key.get("MemBase") is not None and key.get("MemBase").type == "qword") else 32
    memory = []
    for i, b, n in _pairs(key, "MemBase", "MemLen", mem_bits):
        if b + n > 1 << mem_bits:
            _err(key, "MemLen", f"window {i} 0x{b:X}+0x{n:X} wraps past the end of the {mem_bits}-bit address space",
                 "correct MemBase or shorten MemLen")
        memory.append({"base": b, "length": n, "access": "rw", "source": f"MemBase[{i}]/MemLen[{i}]"})
    ports = []
    for i, b, n in _pairs(key, "IoBase", "IoLen", 32):
        if b < _PORT_END:
            if b + n > _PORT_END:
                _err(key, "IoLen", f"port window {i} 0x{b:X}+0x{n:X} runs past port 0xFFFF",
                     "I/O ports are 0..0xFFFF; shorten IoLen")
            ports.append({"base": b, "length": n, "access": "rw", "source": f"IoBase[{i}]/IoLen[{i}]"})
        else:
            if b + n > 1 << 32:
                _err(key, "IoLen", f"window {i} 0x{b:X}+0x{n:X} wraps past the end of the 32-bit address space",
                     "correct IoBase or shorten IoLen")
            warning = (f"{_where(key, 'IoBase')}: 0x{b:X} is beyond the port space 0..0xFFFF; granted as a "
                       "memory-mapped I/O window, as CE does on platforms without port I/O")
            if warning not in warnings:              # BSPs list one window twice (primary/secondary)
                warnings.append(warning)
            memory.append({"base": b, "length": n, "access": "rw", "source": f"IoBase[{i}]/IoLen[{i}]"})
    return _check_overlaps(key, "MemBase", memory), _check_overlaps(key, "IoBase", ports)


# --- I/O rules -------------------------------------------------------------------------------

def _code(key, name: str, text: str) -> int:
    m = _CODE.match(text.strip())
    if not m:
        _err(key, name, f"{text!r} is not an ioctl code", "write hexadecimal codes such as 0x00220004 "
             "or ranges such as 0x00220000-0x00220FFF")
    return int(m.group(1), 16)


def _code_ranges(key, name: str, items: list[str]) -> list[list[int]]:
    ranges = []
    for item in items:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            lo_text, dash, hi_text = part.partition("-")
            lo = _code(key, name, lo_text)
            hi = _code(key, name, hi_text) if dash else lo
            if lo > hi:
                _err(key, name, f"range {part!r} is upside down", "write the lower code first")
            ranges.append([lo, hi])
    return sorted(map(list, {tuple(r) for r in ranges}))


def _ioctls(key, warnings: list[str]) -> dict:
    value = key.get("IoctlAllow")
    if value is None:
        warnings.append(f"{_where(key, None)}: no IoctlAllow, so every ioctl code is allowed; list the codes "
                        'the driver serves, e.g. "IoctlAllow"=multi_sz:"0x00220004","0x00220010-0x0022001F"')
        return {"all": True}
    if value.type == "dword":
        return {"ranges": [[value.data, value.data]]}
    return {"ranges": _code_ranges(key, "IoctlAllow", read_strings(key, "IoctlAllow"))}


def _device_nodes(key) -> list[dict]:
    nodes, seen = [], set()
    for item in read_strings(key, "DeviceNodes") or []:
        path, _, rest = item.partition(":")
        mode, _, ioctl_text = rest.partition(":")
        mode = mode.strip().lower() or "r"
        if mode not in ("r", "rw"):
            _err(key, "DeviceNodes", f"{item!r}: mode {mode!r} is not r or rw",
                 "write /dev/NAME, /dev/NAME:rw or /dev/NAME:rw:0x5401,0x5402-0x5405")
        norm = normalise_device_path(path.strip())
        if norm is None or norm != path.strip() or norm == "/":
            _err(key, "DeviceNodes", f"{item!r}: {path.strip()!r} is not a normalised absolute path",
                 "write the device's absolute path without '..', '.' or repeated slashes")
        if norm in seen:
            _err(key, "DeviceNodes", f"{norm!r} is listed twice", "list each device once, with the widest mode it needs")
        seen.add(norm)
        node = {"path": norm, "mode": mode}
        if ioctl_text.strip():
            node["ioctls"] = _code_ranges(key, "DeviceNodes", [ioctl_text])
        nodes.append(node)
    return nodes


def _principals(key, name: str) -> list[str] | None:
    items = read_strings(key, name)
    if items is None:
        return None
    for item in items:
        if not _PRINCIPAL.match(item):
            _err(key, name, f"{item!r} is not a user/group name or numeric id",
                 "write names such as dialout or numeric ids such as 1000, one per multi_sz item")
    return list(dict.fromkeys(items))


def _syscall_violation(key) -> str:
    """``SyscallViolation``: "deny" (the call fails with EPERM, the host goes on) or "kill"."""
    text = read_string(key, "SyscallViolation")
    if text is None:
        return "deny"
    value = text.strip().lower()
    if value not in ("deny", "kill"):
        raise DerivationError(key.path, "SyscallViolation", f"{text!r} is neither 'deny' nor 'kill'",
                              getattr(key.get("SyscallViolation"), "location", None),
                              fix='write "SyscallViolation"="deny" or "kill"')
    return value


def _syscalls(key, warnings: list[str]) -> list[str]:
    items = read_strings(key, "Syscalls") or []
    for item in items:
        if not _SYSCALL.match(item):
            _err(key, "Syscalls", f"{item!r} is not a system call name", "write names such as ioctl, clock_nanosleep")
    if items:
        warnings.append(f"{_where(key, 'Syscalls')}: adds system calls to the host's allowlist: {', '.join(items)}")
    return sorted(set(items))


def _host(hive, entry: DriverEntry, warnings: list[str]) -> dict | None:
    if entry.mode != "user":
        return None
    if entry.group is None:
        return {"group": None, "key": None, "proc_name": None, "timeout_ms": 20000, "restart_limit": 5,
                "restart_window_s": 60, "memory_limit_mib": None, "max_threads": None, "max_open_files": None}
    gs = group_settings(hive, entry.group)
    if not gs.found:
        warnings.append(f"[{entry.key_path}] \"UserProcGroup\": no key {gs.key_path}; the group's host gets the defaults")
    return {"group": gs.id, "key": gs.key_path if gs.found else None, "proc_name": gs.proc_name,
            "timeout_ms": gs.timeout_ms, "restart_limit": gs.restart_limit, "restart_window_s": gs.restart_window_s,
            "memory_limit_mib": gs.memory_limit_mib, "max_threads": gs.max_threads, "max_open_files": gs.max_open_files}


# --- one driver ------------------------------------------------------------------------------

# What it means for the policy that a value the file wrote could not be read (the parser warned
# already; derivation says what the missing value changes).  Dll and Flags never get here: a key
# without them readable is refused by find_drivers.
_UNREAD_CONSEQUENCE = {
    "userprocgroup": "the driver gets a host of its own instead of sharing its group's",
    "membase": "no memory window is granted from it", "memlen": "no memory window is granted from it",
    "iobase": "no port window is granted from it", "iolen": "no port window is granted from it",
    "irq": "no interrupt is granted from it", "sysintr": "no interrupt is granted from it",
    "ioctlallow": "every ioctl code is allowed, as without IoctlAllow",
    "prefix": "the driver has no device name", "index": "the device gets the first free index",
    "order": "the driver loads last", "dmaquota": "no DMA buffers are granted",
    "devicenodes": "no device node is granted from it", "syscalls": "no system call is added from it",
}
# Values that narrow what a driver may do: without them the policy would be wider than the author
# wrote, so an unreadable one is a hard error, never a default.
_UNREAD_WIDENS = {"ioctlallow": "every ioctl code would be allowed", "maxiosize": "the default 1 MiB would apply",
                  "registeraccess": "register pages would be mapped instead of mediated",
                  "allowusers": "every user could open the device", "allowgroups": "every group could open the device"}


def _unread_warnings(key) -> list[str]:
    """What the values of ``key`` that could not be read change, for the values derivation uses
    (the parser has reported every one of them already; the others do not change the policy)."""
    out = []
    for unread in key.unread():
        name = unread.name.casefold()
        macro = re.search(r"undefined macro \$\(([A-Za-z_][A-Za-z0-9_]*)\)", unread.reason)
        fix = f"-D {macro.group(1)}={'N' if name == 'userprocgroup' else 'VALUE'}" if macro else "correct the value"
        if name in _UNREAD_WIDENS:
            raise DerivationError(key.path, unread.name, f"could not be read ({unread.reason}), and without it "
                                  f"{_UNREAD_WIDENS[name]}", unread.location, fix)
        if name in _UNREAD_CONSEQUENCE:
            where = f"{unread.location}: " if unread.location else ""
            out.append(f'{where}[{key.path}] "{unread.name}" was not read ({unread.reason}): '
                       f"{_UNREAD_CONSEQUENCE[name]} (fix: {fix})")
    return out


def derive_one(hive, entry: DriverEntry, search_path: Sequence[Path], serial: int, issued: str,
               expires: str | None = None) -> Derived:
    key = hive.key(entry.key_path)
    warnings: list[str] = _unread_warnings(key)
    try:
        ref = resolve_module(entry.dll, search_path)
        module = {"path": ref.relative, "kind": ref.kind, "sha256": module_digest(ref)}
    except ModuleNotFound as exc:
        warnings.append(f"{_where(key, 'Dll')}: {exc}; the policy pins no module hash and will be refused "
                        "when loaded")
        module = {"path": None, "kind": None, "sha256": None}
    memory, ports = _windows(key, warnings)
    max_io = read_number(key, "MaxIoSize", DEFAULT_MAX_IO_SIZE)
    if max_io > MAX_MAX_IO_SIZE:
        _err(key, "MaxIoSize", f"{max_io} bytes is above the limit of {MAX_MAX_IO_SIZE} (1 GiB)",
             "give the largest buffer one request really needs")
    register_access = (read_string(key, "RegisterAccess") or "mapped").strip().lower()
    if register_access not in ("mapped", "mediated"):
        _err(key, "RegisterAccess", f"{register_access!r} is neither mapped nor mediated",
             '"RegisterAccess"="mediated" to check every register access, "mapped" to map the window')
    doc = {
        "schema": SCHEMA_ID,
        "serial": serial,
        "issued": issued,
        "driver": {
            "key": entry.key_path, "name": entry.name, "dll": entry.dll, "module": module,
            "registry_sha256": key.digest(), "mode": entry.mode, "flags": entry.flags, "order": entry.order,
        },
        "host": _host(hive, entry, warnings),
        "resources": {
            "memory": memory, "ports": ports,
            "irqs": sorted(set(read_numbers(key, "Irq") or [])),
            # SysIntr 0 is CE's SYSINTR_NOP, "no interrupt" (BSPs write it for "not specified").
            "sysintrs": sorted(set(read_numbers(key, "SysIntr") or []) - {0}),
            "dma_quota": read_number(key, "DmaQuota", 0),
            "device_nodes": _device_nodes(key),
            "register_access": register_access,
        },
        "io": {"ioctls": _ioctls(key, warnings), "max_io_size": max_io},
        "clients": {"users": _principals(key, "AllowUsers"), "groups": _principals(key, "AllowGroups"),
                    "trusted_only": entry.trusted_only},
        "syscalls": _syscalls(key, warnings),
        "syscall_violation": _syscall_violation(key),
    }
    if expires is not None:
        doc["expires"] = expires
    try:
        validate_document(doc)
    except PolicyInvalid as exc:          # a value in range for the registry but not for a policy
        raise DerivationError(entry.key_path, None, f"derived policy is invalid at {exc.path}: {exc.problem}") from None
    return Derived(entry, doc, warnings)


def derive(hive, search_path: Sequence[Path], serial: int | None = None, now: datetime | None = None,
           expires: datetime | None = None, errors: list[DerivationError] | None = None) -> list[Derived]:
    """One :class:`Derived` per driver of :func:`find_drivers`, in load order.

    ``serial`` defaults to ``int(now.timestamp())``, so deriving again later never looks like a
    rollback.  Raises DerivationError on the first hard error; with ``errors`` given, each driver
    with a hard error is left out and its error appended there instead (a real BSP often has one
    key that needs fixing, and that should not hide what the others would be granted).
    """
    now = now or datetime.now(timezone.utc)
    if serial is None:
        serial = int(now.timestamp())
    if expires is not None and expires <= now:
        raise PolicyError(f"expiry {format_datetime(expires)} is not after the issue time {format_datetime(now)}")
    issued, exp = format_datetime(now), (format_datetime(expires) if expires else None)
    results = []
    for entry in find_drivers(hive, errors):
        try:
            results.append(derive_one(hive, entry, search_path, serial, issued, exp))
        except DerivationError as exc:
            if errors is None:
                raise
            errors.append(exc)
    _cross_checks(results)
    return results


def _cross_checks(results: list[Derived]) -> None:
    """What only shows across drivers: one IRQ or one device name claimed twice (noload drivers don't count)."""
    claims: dict[tuple[str, object], list[Derived]] = {}
    for d in results:
        if d.entry.noload:
            continue
        for irq in d.document["resources"]["irqs"]:
            claims.setdefault(("Irq", irq), []).append(d)
        if d.entry.name:
            claims.setdefault(("Prefix", d.entry.name.upper()), []).append(d)
    for (what, thing), ds in claims.items():
        if len(ds) < 2:
            continue
        for d in ds:
            others = ", ".join(o.entry.key_path for o in ds if o is not d)
            if what == "Irq":
                d.warnings.append(f'[{d.entry.key_path}] "Irq": IRQ {thing} is also claimed by {others}; both '
                                  "drivers may wait on it")
            else:
                d.warnings.append(f'[{d.entry.key_path}] "Prefix": device name {d.entry.name} is also used by '
                                  f"{others}; only one of them can be opened by that name")
