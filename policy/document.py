"""A policy document, and :class:`Policy`: the type a verified one has.

*Verified is a type.*  Code that acts on a policy takes a :class:`Policy`, never a dict.  A Policy
can be made in exactly two ways:

* by :mod:`policy.acceptance`, after the envelope's signature, the schema, the expiry, the serial
  and the module and registry hashes all checked out (it calls ``Policy._from_verified``);
* by :meth:`Policy.trusted`, for a kernel-mode driver whose document the Device Manager derived
  itself, in its own process, from its own registry — no signature can add anything there.

Calling ``Policy(...)`` raises TypeError.  Both ways validate the document against
``schemas/policy.schema.json`` and then check what a schema cannot say: windows that wrap or
overlap, ranges upside down, device paths that are not normalised.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

from policy.errors import PolicyInvalid

__all__ = ["Window", "DeviceNode", "GroupLimits", "Policy", "validate_document", "parse_datetime",
           "format_datetime", "SCHEMA_ID"]

SCHEMA_ID = "drvbox.policy/1"
_MEMORY_END = 1 << 64
_PORT_END = 1 << 16

# RFC 3339 date-time, which JSON Schema's "date-time" format means.  jsonschema checks that
# format only when an optional package is installed, so drvbox checks it itself.
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})\Z")


def parse_datetime(text: str) -> datetime:
    """An RFC 3339 date-time with its offset, as an aware datetime; ValueError otherwise."""
    if not isinstance(text, str) or not _DATE_TIME.match(text):
        raise ValueError(f"{text!r} is not an RFC 3339 date-time such as 2025-01-31T12:00:00Z")
    frac = re.search(r"\.(\d+)", text)
    if frac and len(frac.group(1)) > 6:                 # datetime keeps microseconds
        text = text.replace(frac.group(0), "." + frac.group(1)[:6], 1)
    return datetime.fromisoformat(text.upper().replace("Z", "+00:00"))


def format_datetime(when: datetime) -> str:
    """UTC, second precision, ``Z``: the one spelling drvbox writes."""
    if when.tzinfo is None:
        raise ValueError("a naive datetime has no time zone; pass an aware one (e.g. datetime.now(timezone.utc))")
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_validator = None


def _get_validator():
    global _validator
    if _validator is None:
        from jsonschema import Draft202012Validator, FormatChecker

        import schemas

        checker = FormatChecker()

        @checker.checks("date-time", raises=ValueError)
        def _is_date_time(instance: object) -> bool:
            if isinstance(instance, str):
                parse_datetime(instance)
            return True

        _validator = Draft202012Validator(schemas.load("policy.schema.json"), format_checker=checker)
    return _validator


def _json_path(error) -> str:
    path = "$"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def validate_document(unverified_document: object) -> None:
    """Raise :class:`PolicyInvalid` (with the JSON path) unless the document is a valid policy."""
    validator = _get_validator()
    errors = sorted(validator.iter_errors(unverified_document), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if errors:
        # oneOf errors hide the useful message in their context; take the deepest one.
        err = errors[0]
        while err.context:
            err = max(err.context, key=lambda e: len(e.absolute_path))
        raise PolicyInvalid(_json_path(err), err.message)
    _check_semantics(unverified_document)


def _check_ranges(ranges, where: str) -> None:
    for i, (lo, hi) in enumerate(ranges):
        if lo > hi:
            raise PolicyInvalid(f"{where}[{i}]", f"range 0x{lo:X}-0x{hi:X} is upside down (lo > hi)")


def _check_windows(windows, end: int, where: str, what: str) -> None:
    spans = []
    for i, w in enumerate(windows):
        if w["base"] + w["length"] > end:
            raise PolicyInvalid(f"{where}[{i}]", f"{what} window 0x{w['base']:X}+0x{w['length']:X} runs past 0x{end - 1:X}")
        spans.append((w["base"], w["base"] + w["length"], i))
    spans.sort()
    for (b1, e1, i1), (b2, _e2, i2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise PolicyInvalid(f"{where}[{i2}]", f"{what} window at 0x{b2:X} overlaps {where}[{i1}] (0x{b1:X}-0x{e1 - 1:X})")


def normalise_device_path(path: str) -> str | None:
    """The normalised absolute form of ``path``, or None if it is not absolute or holds NUL."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        return None
    norm = os.path.normpath(path)
    return "/" + norm.lstrip("/")        # POSIX keeps a leading '//'; we do not


def _check_semantics(doc: dict) -> None:
    res = doc["resources"]
    _check_windows(res["memory"], _MEMORY_END, "$.resources.memory", "memory")
    _check_windows(res["ports"], _PORT_END, "$.resources.ports", "port")
    seen = set()
    for i, node in enumerate(res["device_nodes"]):
        where = f"$.resources.device_nodes[{i}]"
        if normalise_device_path(node["path"]) != node["path"]:
            raise PolicyInvalid(f"{where}.path", f"{node['path']!r} is not a normalised absolute path")
        if node["path"] in seen:
            raise PolicyInvalid(f"{where}.path", f"{node['path']!r} is listed twice")
        seen.add(node["path"])
        _check_ranges(node.get("ioctls", []), f"{where}.ioctls")
    if "ranges" in doc["io"]["ioctls"]:
        _check_ranges(doc["io"]["ioctls"]["ranges"], "$.io.ioctls.ranges")


# ---------------------------------------------------------------------------------------------

class Window(NamedTuple):
    base: int
    length: int
    access: str          # "r" | "rw"

    @property
    def end(self) -> int:
        """One past the last address."""
        return self.base + self.length


class DeviceNode(NamedTuple):
    path: str
    mode: str            # "r" | "rw"
    ioctls: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class GroupLimits:
    timeout_ms: int
    restart_limit: int
    restart_window_s: int
    memory_limit_mib: int | None
    max_threads: int | None
    max_open_files: int | None


def _freeze(obj: Any) -> Any:
    if isinstance(obj, dict):
        return MappingProxyType({k: _freeze(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return tuple(_freeze(v) for v in obj)
    return obj


class _NoPublicConstructor(type):
    """``Policy(...)`` is refused; see the module docstring for the two ways in."""

    def __call__(cls, *args, **kwargs):
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} has no public constructor: a policy is "
                        "made by policy.acceptance.accept() after verification, or by Policy.trusted() "
                        "for a kernel-mode driver the Device Manager derived itself")

    def _create(cls, *args, **kwargs):
        return super().__call__(*args, **kwargs)


class Policy(metaclass=_NoPublicConstructor):
    """A verified policy: immutable, every field typed.  See the module docstring."""

    __slots__ = ("document", "key_path", "device", "dll", "mode", "group", "serial", "module_sha256",
                 "registry_sha256", "memory_windows", "port_windows", "irqs", "dma_quota", "device_nodes",
                 "register_access", "ioctl_ranges", "max_io_size", "allow_users", "allow_groups",
                 "trusted_only", "syscalls", "syscall_violation", "limits", "issued", "expires")

    def __init__(self, document: dict) -> None:
        doc = copy.deepcopy(document)      # nobody holding the dict can change us later
        drv, res, io, cl, host = doc["driver"], doc["resources"], doc["io"], doc["clients"], doc["host"]
        set_ = object.__setattr__.__get__(self)
        set_("document", _freeze(doc))
        set_("key_path", drv["key"])
        set_("device", drv["name"])
        set_("dll", drv["dll"])
        set_("mode", drv["mode"])
        set_("serial", doc["serial"])
        set_("module_sha256", drv["module"]["sha256"])
        set_("registry_sha256", drv["registry_sha256"])
        set_("memory_windows", tuple(Window(w["base"], w["length"], w["access"]) for w in res["memory"]))
        set_("port_windows", tuple(Window(w["base"], w["length"], w["access"]) for w in res["ports"]))
        set_("irqs", frozenset(res["irqs"]) | frozenset(res["sysintrs"]))
        set_("dma_quota", res["dma_quota"])
        set_("device_nodes", tuple(DeviceNode(n["path"], n["mode"], tuple(tuple(r) for r in n.get("ioctls", [])))
                                   for n in res["device_nodes"]))
        set_("register_access", res["register_access"])
        ioctls = io["ioctls"]
        set_("ioctl_ranges", None if ioctls.get("all") is True else tuple(tuple(r) for r in ioctls["ranges"]))
        set_("max_io_size", io["max_io_size"])
        set_("allow_users", None if cl["users"] is None else tuple(cl["users"]))
        set_("allow_groups", None if cl["groups"] is None else tuple(cl["groups"]))
        set_("trusted_only", cl["trusted_only"])
        set_("syscalls", tuple(doc["syscalls"]))
        set_("syscall_violation", doc.get("syscall_violation", "deny"))
        set_("group", host["group"] if host else None)
        set_("limits", None if host is None else GroupLimits(
            host["timeout_ms"], host["restart_limit"], host["restart_window_s"],
            host["memory_limit_mib"], host["max_threads"], host["max_open_files"]))
        set_("issued", parse_datetime(doc["issued"]))
        set_("expires", parse_datetime(doc["expires"]) if "expires" in doc else None)

    def as_dict(self) -> dict:
        """A plain, mutable deep copy of the document (for JSON output, audit records)."""
        def thaw(obj):
            if isinstance(obj, Mapping):
                return {k: thaw(v) for k, v in obj.items()}
            if isinstance(obj, tuple):
                return [thaw(v) for v in obj]
            return obj
        return thaw(self.document)

    def __setattr__(self, name, value):
        raise AttributeError(f"a Policy is immutable (tried to set {name!r})")

    __delattr__ = __setattr__

    def __repr__(self) -> str:
        return f"<Policy {self.key_path!r} {self.device or '-'} {self.mode} serial={self.serial}>"

    @classmethod
    def _from_verified(cls, document: dict) -> "Policy":
        """For policy.acceptance only, after the signature and every acceptance rule checked out."""
        validate_document(document)
        return cls._create(document)

    @classmethod
    def trusted(cls, document: dict) -> "Policy":
        """A policy for a kernel-mode driver, derived in-process by the Device Manager from its own
        registry.  Validated against the schema; refused for a user-mode document, which must come
        signed through policy.acceptance."""
        validate_document(document)
        if document["driver"]["mode"] != "kernel":
            raise PolicyInvalid("$.driver.mode", "Policy.trusted() is for kernel-mode drivers only; a user-mode "
                                "driver's policy must be signed and loaded through policy.acceptance.accept()")
        return cls._create(document)
