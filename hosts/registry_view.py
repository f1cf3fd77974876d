"""``ctx.registry``: the driver key's values, read-only and case-insensitive like the CE registry.

The Reflector sends the values in the LOAD frame's JSON as ``{"Name": {"type": T, "data": D}}``;
``from_wire`` turns each into the Python value a driver sees:

=====================  ===========================  ==================
type                   data on the wire             value in ctx.registry
=====================  ===========================  ==================
``dword``, ``qword``   integer                      ``int``
``sz``, ``expand_sz``  string                       ``str``
``multi_sz``           list of strings              ``tuple`` of ``str``
``binary``, ``hex(N)``  hex string (``"0a1b"``)      ``bytes``
=====================  ===========================  ==================

(``hex(N)`` is any other registry type kept as raw bytes, as ``policy.hive`` names it;
``string`` is accepted for ``sz``, ``hex`` and ``bytes`` for ``binary``.)  Anything else raises
``ValueError`` naming the value, so a LOAD with a malformed registry fails instead of handing the
driver something it did not expect.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

_INT_LIMITS = {"dword": 1 << 32, "qword": 1 << 64}
_STRINGS = ("sz", "string", "expand_sz")
_BINARY = ("binary", "hex", "bytes")


class RegistryView(Mapping):
    """A read-only mapping whose keys compare case-insensitively; iteration gives the names as
    they were written.  Values are immutable (int, str, tuple, bytes), so the view cannot be used
    to change what the Reflector checked."""

    __slots__ = ("_items",)

    def __init__(self, values: Mapping[str, object] = ()):
        items: dict[str, tuple[str, object]] = {}
        for name, value in dict(values).items():
            if not isinstance(name, str):
                raise ValueError(f"registry value name {name!r} is not a string")
            folded = name.casefold()
            if folded in items:
                raise ValueError(f"registry value {name!r} given twice (names are case-insensitive)")
            items[folded] = (name, value)
        self._items = items

    def __getitem__(self, name: str) -> object:
        if not isinstance(name, str):
            raise KeyError(name)
        return self._items[name.casefold()][1]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"RegistryView({dict(self.items())!r})"


def _is_hex_type(kind: str) -> bool:
    """``hex(N)``, N in hex: a registry type without a name of its own, held as bytes."""
    if not (kind.startswith("hex(") and kind.endswith(")")):
        return False
    digits = kind[4:-1]
    return 0 < len(digits) <= 8 and all(c in "0123456789abcdef" for c in digits)


def _value(name: str, typed: object) -> object:
    if not isinstance(typed, dict) or set(typed) != {"type", "data"}:
        raise ValueError(f"registry value {name!r}: expected {{'type': ..., 'data': ...}}, got {typed!r}")
    kind, data = typed["type"], typed["data"]
    if not isinstance(kind, str):
        raise ValueError(f"registry value {name!r}: type {kind!r} is not a string")
    kind = kind.lower()
    if kind in _INT_LIMITS:
        if type(data) is not int or not 0 <= data < _INT_LIMITS[kind]:
            raise ValueError(f"registry value {name!r}: {kind} data {data!r} is not an unsigned "
                             f"{_INT_LIMITS[kind].bit_length() - 1}-bit integer")
        return data
    if kind in _STRINGS:
        if not isinstance(data, str):
            raise ValueError(f"registry value {name!r}: {kind} data {data!r} is not a string")
        return data
    if kind == "multi_sz":
        if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
            raise ValueError(f"registry value {name!r}: multi_sz data {data!r} is not a list of strings")
        return tuple(data)
    if kind in _BINARY or _is_hex_type(kind):
        if not isinstance(data, str):
            raise ValueError(f"registry value {name!r}: binary data {data!r} is not a hex string")
        try:
            return bytes.fromhex(data)
        except ValueError:
            raise ValueError(f"registry value {name!r}: binary data {data!r} is not valid hex") from None
    raise ValueError(f"registry value {name!r}: unknown type {kind!r} "
                     f"(known: dword, qword, sz, expand_sz, multi_sz, binary, hex(N))")


def from_wire(values: object) -> RegistryView:
    """The LOAD frame's ``registry`` object as the view a driver gets.  Raises ``ValueError``."""
    if not isinstance(values, dict):
        raise ValueError(f"registry must be an object of values, got {type(values).__name__}")
    return RegistryView({name: _value(name, typed) for name, typed in values.items()})
