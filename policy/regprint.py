"""Writing a hive back out as ``.reg`` text that parses to an equal hive.

The printer picks, for each value, the plainest spelling that round-trips through
``policy.regfile``:

* ``sz`` is a quoted string, unless it holds a control character (other than tab) or ``$(``
  (which the parser would expand): then ``hex(1):`` (UTF-16LE, NUL-terminated);
* ``expand_sz`` is always ``hex(2):``, ``qword`` always ``hex(b):`` (CE has no keyword for them);
* ``multi_sz`` is CE's ``multi_sz:"a","b"`` when every item is quotable and there is at least one,
  else ``hex(7):``;
* ``dword`` is ``dword:XXXXXXXX``; ``binary`` and ``hex(N)`` are byte lists, wrapped with ``,\\``.

Only keys that hold values or have no subkeys are written; the others come into being as the
parents of what is written.
"""

from __future__ import annotations

import re

from policy.hive import Hive, Value

__all__ = ["format_hive", "format_value"]

_UNQUOTABLE = re.compile(r"[\x00-\x08\x0a-\x1f]|\$\(")
_BYTES_PER_LINE = 24


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _quotable(s: str) -> bool:
    return not _UNQUOTABLE.search(s)


def _hex_bytes(prefix: str, data: bytes) -> str:
    if not data:
        return prefix
    chunks = [",".join(f"{b:02x}" for b in data[i:i + _BYTES_PER_LINE])
              for i in range(0, len(data), _BYTES_PER_LINE)]
    return prefix + ",\\\n  ".join(chunks)


def _utf16(s: str) -> bytes:
    return s.encode("utf-16-le")


def format_value(value: Value) -> str:
    """One value as a ``.reg`` line (possibly continued over several lines with ``\\``)."""
    name = "@" if value.name == "" else _quote(value.name)
    t, d = value.type, value.data
    if t == "sz":
        data = _quote(d) if _quotable(d) else _hex_bytes("hex(1):", _utf16(d + "\0"))
    elif t == "expand_sz":
        data = _hex_bytes("hex(2):", _utf16(d + "\0"))
    elif t == "multi_sz":
        if d and all(_quotable(s) for s in d):
            data = "multi_sz:" + ",".join(_quote(s) for s in d)
        else:
            data = _hex_bytes("hex(7):", _utf16("".join(s + "\0" for s in d) + "\0"))
    elif t == "dword":
        data = f"dword:{d:08x}"
    elif t == "qword":
        data = _hex_bytes("hex(b):", d.to_bytes(8, "little"))
    elif t == "binary":
        data = _hex_bytes("hex:", d)
    else:                       # "hex(N)": Value has already checked the spelling
        data = _hex_bytes(t + ":", d)
    return f"{name}={data}"


def format_hive(hive: Hive) -> str:
    """The whole hive as ``REGEDIT4`` text, keys depth-first, values in insertion order."""
    out = ["REGEDIT4", ""]
    for key in hive.keys():
        values = key.values()
        if not values and key.subkeys():
            continue
        out.append(f"[{key.path}]")
        out.extend(format_value(v) for v in values)
        out.append("")
    return "\n".join(out) + "\n"
