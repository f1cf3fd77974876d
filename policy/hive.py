"""The registry as drvbox sees it: a case-insensitive tree of keys holding typed values.

A :class:`Hive` is what parsing ``.reg`` files produces (``policy.regfile``) and what policy
derivation reads.  Keys and value names compare case-insensitively, as on Windows CE, but keep the
spelling they were first written with, so messages and printed files show what the author wrote.

Everything stored here can be written back to a ``.reg`` file (``policy.regfile.format_hive``)
and parse to an equal hive.  Names that could not be written unambiguously are refused when they
enter the hive, not when someone later tries to print it:

* a key name is non-empty, has no backslash (the path separator), no control characters, no
  leading or trailing blanks (the parser strips them), no ``$(`` (the parser would expand it),
  and no ``]`` followed by blanks and ``;`` (the parser would take that for the end of the key);
* a value name has no control characters and no ``$(``;
* strings hold no NUL (a ``multi_sz`` uses NUL as its separator) and no lone surrogates.

Case folding is Python's ``str.casefold``, which folds a little more than Windows does (``ß``
equals ``SS``); for the ASCII names every real registry uses the two agree.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Iterator

__all__ = ["Location", "Value", "Unread", "Key", "Hive", "ROOTS", "VALUE_TYPES", "split_path"]

# Root keys by every name a .reg file may use; a path's root is always stored by its long name.
ROOTS = {
    "HKEY_LOCAL_MACHINE": "HKEY_LOCAL_MACHINE", "HKLM": "HKEY_LOCAL_MACHINE",
    "HKEY_CURRENT_USER": "HKEY_CURRENT_USER", "HKCU": "HKEY_CURRENT_USER",
    "HKEY_CLASSES_ROOT": "HKEY_CLASSES_ROOT", "HKCR": "HKEY_CLASSES_ROOT",
    "HKEY_USERS": "HKEY_USERS", "HKU": "HKEY_USERS",
    "HKEY_CURRENT_CONFIG": "HKEY_CURRENT_CONFIG", "HKCC": "HKEY_CURRENT_CONFIG",
}
_ROOTS_FOLDED = {alias.casefold(): long for alias, long in ROOTS.items()}

# The named value types.  Any other registry type is "hex(N)", N in lowercase hex without leading
# zeros, holding raw bytes; the types below never appear in that form (the parser decodes them).
VALUE_TYPES = ("sz", "expand_sz", "multi_sz", "dword", "qword", "binary")
_NAMED_HEX = {"1", "2", "3", "4", "7", "b"}          # sz, expand_sz, binary, dword, multi_sz, qword
_HEX_TYPE = re.compile(r"hex\(([1-9a-f][0-9a-f]{0,7}|0)\)\Z")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_KEY_END_LOOKALIKE = re.compile(r"\][ \t]*;")


@dataclass(frozen=True)
class Location:
    """Where something was written: ``str()`` gives ``file:line:col`` (both 1-based)."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


def _check_string(what: str, s: object) -> str:
    if not isinstance(s, str):
        raise TypeError(f"{what} must be a str, not {type(s).__name__}")
    if "\0" in s:
        raise ValueError(f"{what} {s!r} contains NUL, which the registry uses as a terminator")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {s!r} contains a lone surrogate") from None
    return s


@dataclass(frozen=True)
class Value:
    """One registry value.  ``name`` is ``""`` for the default value (``@``).

    ``data`` by type: ``sz``/``expand_sz`` a str, ``multi_sz`` a tuple of str, ``dword``/``qword``
    an int in range, ``binary``/``hex(N)`` bytes.  A mismatch raises at construction, so a Value
    that exists is well-formed.
    """

    name: str
    type: str
    data: str | int | tuple[str, ...] | bytes
    location: Location | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_string("value name", self.name)
        if _CONTROL.search(self.name):
            raise ValueError(f"value name {self.name!r} contains a control character")
        if "$(" in self.name:
            raise ValueError(f"value name {self.name!r} contains '$(', which a .reg file would expand")
        t, d = self.type, self.data
        if t in ("sz", "expand_sz"):
            _check_string(f"{t} data of {self.name!r}", d)
        elif t == "multi_sz":
            if isinstance(d, (str, bytes)) or not isinstance(d, (tuple, list)):
                raise TypeError(f"multi_sz data of {self.name!r} must be a tuple of str")
            object.__setattr__(self, "data", tuple(_check_string(f"multi_sz item of {self.name!r}", s) for s in d))
        elif t in ("dword", "qword"):
            bits = 32 if t == "dword" else 64
            if type(d) is not int:
                raise TypeError(f"{t} data of {self.name!r} must be an int, not {type(d).__name__}")
            if not 0 <= d < 1 << bits:
                raise ValueError(f"{t} data of {self.name!r} is {d}, outside 0..0x{(1 << bits) - 1:X}")
        elif t == "binary" or (_HEX_TYPE.match(t) and _HEX_TYPE.match(t).group(1) not in _NAMED_HEX):
            if not isinstance(d, (bytes, bytearray, memoryview)):
                raise TypeError(f"{t} data of {self.name!r} must be bytes")
            object.__setattr__(self, "data", bytes(d))
        else:
            raise ValueError(f"unknown value type {t!r} for {self.name!r}: expected one of "
                             f"{', '.join(VALUE_TYPES)} or hex(N) for N not in 1,2,3,4,7,b")


@dataclass(frozen=True)
class Unread:
    """A value a registry file wrote but the parser could not read (an undefined ``$(MACRO)``,
    malformed data): it is not in the key, and whoever acts on the key should know it is missing."""

    name: str
    location: Location | None
    reason: str


def _canonical(value: Value) -> list:
    """Type-tagged JSON-able form of a value, so that different types never encode alike."""
    d = value.data
    if isinstance(d, bytes):
        d = d.hex()
    elif isinstance(d, tuple):
        d = list(d)
    return [value.name.casefold(), value.type, d]


def _show(s: str) -> str:
    """A name or path for a message: in quotes, backslashes as written; repr() only if it needs escapes."""
    return repr(s) if _CONTROL.search(s) or "'" in s else f"'{s}'"


def split_path(path: str) -> list[str]:
    """Split a key path into its root's long name and the components below it.

    Blanks around components are stripped; an empty component, an unknown root or a
    malformed name raise ValueError saying which.
    """
    if not isinstance(path, str):
        raise TypeError(f"key path must be a str, not {type(path).__name__}")
    parts = [p.strip(" \t") for p in path.strip(" \t").split("\\")]
    if parts and parts[-1] == "" and len(parts) > 1:    # one trailing backslash is harmless
        parts.pop()
    root = _ROOTS_FOLDED.get(parts[0].casefold())
    if root is None:
        raise ValueError(f"key path {_show(path)} does not start with a root key: expected one of "
                         "HKEY_LOCAL_MACHINE (HKLM), HKEY_CURRENT_USER (HKCU), HKEY_CLASSES_ROOT (HKCR), "
                         "HKEY_USERS (HKU), HKEY_CURRENT_CONFIG (HKCC)")
    for p in parts[1:]:
        _check_key_name(p, path)
    return [root, *parts[1:]]


def _check_key_name(name: str, path: str) -> None:
    if name == "":
        raise ValueError(f"key path {_show(path)} has an empty component (two backslashes in a row?)")
    _check_string(f"key name in {_show(path)}", name)
    if _CONTROL.search(name):
        raise ValueError(f"key name {_show(name)} in {_show(path)} contains a control character")
    if name != name.strip(" \t"):
        raise ValueError(f"key name {_show(name)} in {_show(path)} has leading or trailing blanks")
    if "$(" in name:
        raise ValueError(f"key name {_show(name)} in {_show(path)} contains '$(', which a .reg file would expand")
    if _KEY_END_LOOKALIKE.search(name):
        raise ValueError(f"key name {_show(name)} in {_show(path)} contains ']' then ';', which reads as the end of the key")


class Key:
    """A registry key: its values (by case-folded name, in insertion order) and its subkeys."""

    __slots__ = ("path", "name", "_values", "_subkeys", "_unread")

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.name = name
        self._values: dict[str, Value] = {}
        self._subkeys: dict[str, Key] = {}
        self._unread: dict[str, Unread] = {}

    def __repr__(self) -> str:
        return f"<Key {self.path!r}: {len(self._values)} values, {len(self._subkeys)} subkeys>"

    def get(self, name: str) -> Value | None:
        return self._values.get(name.casefold())

    def values(self) -> list[Value]:
        return list(self._values.values())

    def unread(self) -> list[Unread]:
        """Values written for this key that could not be read, unless a later line set or deleted them.
        They are not part of the key: :meth:`digest` and equality ignore them."""
        return list(self._unread.values())

    def subkeys(self) -> list[Key]:
        return list(self._subkeys.values())

    def subkey(self, name: str) -> Key | None:
        return self._subkeys.get(name.strip(" \t").casefold())

    def digest(self) -> str:
        """SHA-256 (hex) of this key's own values, canonically encoded.

        Names are case-folded and sorted; each value contributes its type and data.  Subkeys,
        spelling of names, comments, formatting and file order do not count, so the digest
        changes exactly when what a driver would read from this key changes.
        """
        items = sorted((_canonical(v) for v in self._values.values()), key=lambda c: c[0])
        blob = json.dumps(["drvbox.regkey.v1", items], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _state(self) -> dict:
        return {n: (v.type, v.data) for n, v in self._values.items()}


class Hive:
    """A set of root keys.  All lookups are case-insensitive; paths may use HKLM-style roots."""

    __hash__ = None  # type: ignore[assignment]   # mutable

    def __init__(self) -> None:
        self._roots: dict[str, Key] = {}

    def __repr__(self) -> str:
        return f"<Hive: {sum(1 for _ in self.keys())} keys>"

    def _walk(self, path: str, create: bool) -> Key | None:
        parts = split_path(path)
        key = self._roots.get(parts[0].casefold())
        if key is None:
            if not create:
                return None
            key = self._roots[parts[0].casefold()] = Key(parts[0], parts[0])
        for name in parts[1:]:
            child = key._subkeys.get(name.casefold())
            if child is None:
                if not create:
                    return None
                child = key._subkeys[name.casefold()] = Key(f"{key.path}\\{name}", name)
            key = child
        return key

    def key(self, path: str) -> Key | None:
        """The key at ``path`` or None; a malformed path (unknown root, empty component) raises ValueError."""
        return self._walk(path, create=False)

    def ensure_key(self, path: str) -> Key:
        key = self._walk(path, create=True)
        assert key is not None
        return key

    def keys(self) -> Iterator[Key]:
        """Every key, depth-first, parents before children, in insertion order."""
        stack = list(reversed(self._roots.values()))
        while stack:
            key = stack.pop()
            yield key
            stack.extend(reversed(key._subkeys.values()))

    def set_value(self, path: str, value: Value) -> None:
        """Set ``value`` in the key at ``path`` (created if missing).  A later set wins; a value set
        again keeps its place in the key's order."""
        if not isinstance(value, Value):
            raise TypeError(f"set_value takes a Value, not {type(value).__name__}")
        key = self.ensure_key(path)
        key._values[value.name.casefold()] = value
        key._unread.pop(value.name.casefold(), None)

    def note_unread(self, path: str, name: str, location: Location | None, reason: str) -> None:
        """Record that a file wrote value ``name`` of ``path`` but it could not be read.  A value of
        that name read before stays (a later line that fails does not delete an earlier one)."""
        self.ensure_key(path)._unread[name.casefold()] = Unread(name, location, reason)

    def delete_value(self, path: str, name: str) -> None:
        """Delete a value; deleting what is not there is not an error (as ``"x"=-`` in a .reg)."""
        key = self.key(path)
        if key is not None:
            key._values.pop(name.casefold(), None)
            key._unread.pop(name.casefold(), None)

    def delete_key(self, path: str) -> None:
        """Delete a key and its subkeys; a missing key is not an error (as ``[-KEY]``)."""
        parts = split_path(path)
        if len(parts) == 1:
            self._roots.pop(parts[0].casefold(), None)
            return
        parent = self.key("\\".join(parts[:-1]))
        if parent is not None:
            parent._subkeys.pop(parts[-1].casefold(), None)

    def _state(self) -> dict:
        return {tuple(k.path.casefold().split("\\")): k._state() for k in self.keys()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Hive):
            return NotImplemented
        return self._state() == other._state()
