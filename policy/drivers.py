"""Driver keys in a registry hive, and the process-group settings of their hosts (DESIGN.md section 2).

Also the readers for registry values as real BSPs write them: a number may be a ``dword``, a
``qword``, an ``sz`` ("5", "0x10"), or an item of a ``multi_sz``; several windows are written as a
``multi_sz`` of hex strings without ``0x`` ("48004000", "48006000").  Every reader names the key,
value and ``file:line:col`` when it refuses something.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from policy.errors import DerivationError

__all__ = ["DriverEntry", "GroupSettings", "find_drivers", "group_settings", "DRIVERS_ROOT", "BUILTIN_ROOT",
           "DEVFLAGS_NOLOAD", "DEVFLAGS_NAKEDENTRIES", "DEVFLAGS_LOAD_AS_USERPROC", "DEVFLAGS_TRUSTEDCALLERONLY",
           "read_number", "read_numbers", "read_strings", "read_string"]

DRIVERS_ROOT = "HKEY_LOCAL_MACHINE\\Drivers"
BUILTIN_ROOT = "HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn"

DEVFLAGS_NOLOAD = 0x4
DEVFLAGS_NAKEDENTRIES = 0x8
DEVFLAGS_LOAD_AS_USERPROC = 0x10
DEVFLAGS_TRUSTEDCALLERONLY = 0x10000

# Order when a driver has none: after every driver that has one (CE loads unordered drivers last).
DEFAULT_ORDER = 0xFFFFFFFF

_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9]{2}\Z")
_HEX = re.compile(r"(?:0[xX])?([0-9A-Fa-f]+)\Z")
_DEC = re.compile(r"[0-9]+\Z")


# --- value readers ---------------------------------------------------------------------------

def _fail(key, value, problem: str, fix: str | None = None):
    raise DerivationError(key.path, value.name, problem, getattr(value, "location", None), fix)


def _parse_number_text(key, value, text: str, hex_default: bool, bits: int) -> int:
    t = text.strip(" \t")
    if "$(" in t:
        _fail(key, value, f"{t!r} holds a macro that was never defined",
              "define it: drvbox policy derive -D NAME=VALUE")
    if t[:2] in ("0x", "0X") or hex_default:
        m = _HEX.match(t)
        n = int(m.group(1), 16) if m else None
    else:
        n = int(t) if _DEC.match(t) else None
    if n is None:
        radix = "hexadecimal (0x optional)" if hex_default else "decimal, or hexadecimal with 0x"
        _fail(key, value, f"{t!r} is not a number", f"write a {radix} number, or use dword:")
    if n >= 1 << bits:
        _fail(key, value, f"{t!r} is larger than {bits} bits")
    return n


def read_numbers(key, name: str, hex_strings: bool = False, bits: int = 32) -> list[int] | None:
    """All numbers of value ``name`` (a dword/qword, or a string or multi_sz of numbers, also
    comma-separated); None if the value is absent.  ``hex_strings``: strings are hexadecimal even
    without ``0x``, as CE reads memory and port windows."""
    value = key.get(name)
    if value is None:
        return None
    if value.type in ("dword", "qword"):
        if value.data >= 1 << bits:
            _fail(key, value, f"0x{value.data:X} is larger than {bits} bits")
        return [value.data]
    if value.type in ("sz", "expand_sz"):
        items = [value.data]
    elif value.type == "multi_sz":
        items = list(value.data)
    else:
        _fail(key, value, f"a {value.type} value cannot hold a number", "use dword: or a string")
    texts = [t for item in items for t in item.split(",") if t.strip(" \t")]
    return [_parse_number_text(key, value, t, hex_strings, bits) for t in texts]


def read_number(key, name: str, default: int | None = None, hex_strings: bool = False, bits: int = 32) -> int | None:
    nums = read_numbers(key, name, hex_strings, bits)
    if nums is None:
        return default
    if len(nums) != 1:
        _fail(key, key.get(name), f"expected one number, found {len(nums)}")
    return nums[0]


def read_string(key, name: str) -> str | None:
    value = key.get(name)
    if value is None:
        return None
    if value.type not in ("sz", "expand_sz"):
        _fail(key, value, f"expected a string, found a {value.type} value", 'write it as "Name"="text"')
    return value.data


def read_strings(key, name: str) -> list[str] | None:
    """A multi_sz as a list; an sz counts as a one-item list.  Empty items are dropped."""
    value = key.get(name)
    if value is None:
        return None
    if value.type == "multi_sz":
        items = list(value.data)
    elif value.type in ("sz", "expand_sz"):
        items = [value.data]
    else:
        _fail(key, value, f"expected a multi_sz (or sz), found a {value.type} value", 'write "Name"=multi_sz:"a","b"')
    return [s.strip(" \t") for s in items if s.strip(" \t")]


# --- drivers ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class DriverEntry:
    """One driver key: a key under ``HKLM\\Drivers\\BuiltIn`` (nested bus keys included) with a ``Dll``."""

    key_path: str
    name: str | None          # "COM1:" = Prefix + Index + ":"; None without a Prefix
    dll: str
    prefix: str | None
    index: int | None         # as written, or as assigned (first free of 1..9, then 0) when absent
    order: int
    flags: int
    mode: str                 # "user" if Flags & 0x10 else "kernel"
    group: int | None         # UserProcGroup
    noload: bool              # Flags & 0x4
    trusted_only: bool        # Flags & 0x10000


def _walk(key):
    yield key
    for sub in key.subkeys():
        yield from _walk(sub)


def find_drivers(hive, errors: list[DerivationError] | None = None) -> list[DriverEntry]:
    """Every driver key under ``HKLM\\Drivers\\BuiltIn``, sorted by (order, key path).

    Only BuiltIn is walked: that is what the Device Manager loads at boot (bus drivers load
    their children from nested keys).  ``Flags`` elsewhere (e.g. storage profiles) is not a driver.

    A key that cannot be read as a driver raises :class:`DerivationError`; with ``errors`` given,
    the error is appended there instead and that key is left out, so one bad key in a BSP does not
    hide the others.  A key whose ``Dll`` or ``Flags`` was written but could not be parsed (see
    :meth:`policy.hive.Key.unread`) is such an error: without them nobody can tell which module it
    is, or whether it runs sandboxed.
    """
    root = hive.key(BUILTIN_ROOT)
    if root is None:
        return []
    found = []
    for key in _walk(root):
        if key is root:
            continue
        try:
            entry = _entry(key)
        except DerivationError as exc:
            if errors is None:
                raise
            errors.append(exc)
            continue
        if entry is not None:
            found.append(entry)
    return _assign_indexes(found)


def _unread_fatal(key) -> None:
    """Refuse a key whose Dll, or a driver key whose Flags, was written but could not be parsed."""
    for unread in key.unread():
        name = unread.name.casefold()
        if name == "dll" or (name == "flags" and key.get("Dll") is not None):
            what = ("which module the driver is" if name == "dll"
                    else "whether the driver runs sandboxed (Flags 0x10) or in the Device Manager")
            macro = re.search(r"undefined macro \$\(([A-Za-z_][A-Za-z0-9_]*)\)", unread.reason)
            raise DerivationError(key.path, unread.name, f"could not be read ({unread.reason}), so {what} is unknown",
                                  unread.location, f"-D {macro.group(1)}=VALUE" if macro else "correct the value")


def _entry(key) -> dict | None:
    """The fields of one driver key, or None if the key names no Dll (it is not a driver)."""
    _unread_fatal(key)
    if key.get("Dll") is None:
        return None
    dll = read_string(key, "Dll")
    if not dll or not dll.strip():
        _fail(key, key.get("Dll"), "Dll is empty", 'name the driver module, e.g. "Dll"="serial.dll"')
    flags = read_number(key, "Flags", 0)
    prefix = read_string(key, "Prefix")
    if prefix is not None and not _PREFIX.match(prefix.strip()):
        _fail(key, key.get("Prefix"), f"Prefix {prefix!r} is not three letters or digits starting with a letter",
              'use a CE prefix such as "COM"')
    prefix = prefix.strip() if prefix else None
    index = read_number(key, "Index")
    if index is not None and index > 9:
        _fail(key, key.get("Index"), f"Index {index} is not a single digit; a device name is Prefix + 0..9 + ':'")
    return dict(key_path=key.path, dll=dll.strip(), prefix=prefix, index=index,
                order=read_number(key, "Order", DEFAULT_ORDER), flags=flags,
                mode="user" if flags & DEVFLAGS_LOAD_AS_USERPROC else "kernel",
                group=read_number(key, "UserProcGroup"),
                noload=bool(flags & DEVFLAGS_NOLOAD),
                trusted_only=bool(flags & DEVFLAGS_TRUSTEDCALLERONLY))


def _assign_indexes(found: list[dict]) -> list[DriverEntry]:
    found.sort(key=lambda d: (d["order"], d["key_path"].casefold()))
    # Drivers without an Index get the first free one, 1..9 then 0, in load order, as CE assigns them.
    used: dict[str, set[int]] = {}
    for d in found:
        if d["prefix"] and d["index"] is not None:
            used.setdefault(d["prefix"].upper(), set()).add(d["index"])
    for d in found:
        if d["prefix"] and d["index"] is None:
            taken = used.setdefault(d["prefix"].upper(), set())
            free = [i for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 0) if i not in taken]
            if free:
                d["index"] = free[0]
                taken.add(free[0])
    return [DriverEntry(name=f"{d['prefix']}{d['index']}:" if d["prefix"] and d["index"] is not None else None, **d)
            for d in found]


# --- process groups --------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupSettings:
    id: int
    key_path: str
    proc_name: str | None
    timeout_ms: int = 20000
    restart_limit: int = 5
    restart_window_s: int = 60
    memory_limit_mib: int | None = None
    max_threads: int | None = None
    max_open_files: int | None = None
    found: bool = True          # False: no ProcGroup key, defaults used


def group_key_candidates(group: int) -> list[str]:
    """``ProcGroup_%04d`` as DESIGN.md writes it, then ``ProcGroup_%04x`` as CE's devload.h formats it.
    They differ only from group 10 on (``0010`` against ``000a``); real BSPs use small groups."""
    names = [f"ProcGroup_{group:04d}", f"ProcGroup_{group:04x}"]
    return [f"{DRIVERS_ROOT}\\{n}" for n in dict.fromkeys(names)]


_GROUP_NUMBERS = (
    # (value, field, minimum)  -- why each minimum: a 0 timeout or window would mean "never", 0 MiB no memory
    ("ProcTimeout", "timeout_ms", 1),
    ("RestartLimit", "restart_limit", 0),
    ("RestartWindow", "restart_window_s", 1),
    ("MemoryLimit", "memory_limit_mib", 1),
    ("MaxThreads", "max_threads", 1),
    ("MaxOpenFiles", "max_open_files", 1),
)


def group_settings(hive, group: int) -> GroupSettings:
    """The settings of host group ``group`` from ``HKLM\\Drivers\\ProcGroup_XXXX`` (see
    :func:`group_key_candidates`); defaults, with ``found=False``, when there is no such key."""
    candidates = group_key_candidates(group)
    key = next((k for k in map(hive.key, candidates) if k is not None), None)
    if key is None:
        return GroupSettings(id=group, key_path=candidates[0], proc_name=None, found=False)
    fields = {}
    for name, field, minimum in _GROUP_NUMBERS:
        n = read_number(key, name)
        if n is None:
            continue
        if n < minimum:
            _fail(key, key.get(name), f"{name} is {n}, below its minimum {minimum}")
        if field == "restart_limit" and n > 1000:
            _fail(key, key.get(name), f"{name} is {n}; at most 1000 restarts per window make sense")
        fields[field] = n
    return GroupSettings(id=group, key_path=key.path, proc_name=read_string(key, "ProcName"), **fields)
