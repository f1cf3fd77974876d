"""``drvbox fuzz``, part 1: what to send.  Operations, the device's input space, and the generator.

The generator is a pure function of its seed and of the :class:`Target` (codes, MaxIoSize): it
never looks at what the device answered, so the same seed against the same driver is the same
sequence of operations, and a run can be re-made from ``(seed, index)`` alone.  Running the
operations, recognising findings and keeping case files are ``reflector.fuzz_run`` and
``reflector.fuzz_cases``.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

__all__ = ["Op", "Target", "generate", "parse_codes", "target_from_policy", "UsageError", "FuzzStop"]

U32_MAX = 0xFFFF_FFFF
DEFAULT_MAX_IO = 1 << 20          # the policy default of MaxIoSize (DESIGN.md section 2)
OPS = ("ioctl", "read", "write", "seek", "reopen")


class UsageError(ValueError):
    """Bad input to `drvbox fuzz` (a code list, a policy file, a case file): exit status 2."""


class FuzzStop(Exception):
    """The run cannot go on (the device is gone, a quarantine cannot be lifted, the Device Manager
    is unreachable, the case files have nowhere to go); the message says what happened and what
    to do."""


@dataclass(frozen=True)
class Op:
    """One operation on the fuzzed device.  ``reopen`` closes the handle and opens it again."""
    kind: str
    code: int | None = None        # ioctl
    data: bytes = b""              # ioctl input, write data
    size: int = 0                  # ioctl out size, read size
    offset: int = 0                # seek
    whence: int = 0                # seek
    outside: bool = False          # an ioctl code outside the allowlist: EACCES is the right answer

    def to_json(self) -> dict:
        d: dict = {"op": self.kind}
        if self.kind == "ioctl":
            d.update(code=f"{self.code:#010x}", **{"in": self.data.hex()}, out=self.size)
            if self.outside:
                d["outside"] = True
        elif self.kind == "read":
            d["size"] = self.size
        elif self.kind == "write":
            d["data"] = self.data.hex()
        elif self.kind == "seek":
            d.update(offset=self.offset, whence=self.whence)
        return d

    @classmethod
    def from_json(cls, unverified: object, where: str) -> "Op":
        """An operation of a case file; ``where`` names it in errors (file and index)."""
        if not isinstance(unverified, dict) or unverified.get("op") not in OPS:
            raise UsageError(f"{where}: expected {{\"op\": one of {', '.join(OPS)}, ...}}, got {unverified!r:.80}")
        kind = unverified["op"]
        try:
            if kind == "ioctl":
                return cls("ioctl", code=_u32(unverified["code"]), data=bytes.fromhex(unverified.get("in", "")),
                           size=_count(unverified.get("out", 0)), outside=bool(unverified.get("outside", False)))
            if kind == "read":
                return cls("read", size=_count(unverified["size"]))
            if kind == "write":
                return cls("write", data=bytes.fromhex(unverified["data"]))
            if kind == "seek":
                offset, whence = unverified["offset"], unverified["whence"]
                if type(offset) is not int or not -(1 << 63) <= offset < (1 << 63):
                    raise ValueError(f"offset {offset!r} is not a signed 64-bit integer")
                return cls("seek", offset=offset, whence=_u32(whence))
            return cls("reopen")
        except (KeyError, ValueError, TypeError) as exc:
            raise UsageError(f"{where}: {kind} operation is malformed ({exc}): {unverified!r:.120}") from None

    def label(self) -> str:
        """Short, for tables: ``ioctl 0x00220008 in=1 out=16``."""
        if self.kind == "ioctl":
            return f"ioctl {self.code:#010x} in={len(self.data)} out={self.size}"
        if self.kind == "read":
            return f"read {self.size}"
        if self.kind == "write":
            return f"write {len(self.data)}"
        if self.kind == "seek":
            return f"seek {self.offset} whence={self.whence}"
        return "reopen"


def _u32(value) -> int:
    n = int(value, 0) if isinstance(value, str) else value
    if type(n) is not int or not 0 <= n <= U32_MAX:
        raise ValueError(f"{value!r} is not a 32-bit unsigned integer")
    return n


def _count(value) -> int:
    if type(value) is not int or not 0 <= value <= U32_MAX:
        raise ValueError(f"{value!r} is not a byte count")
    return value


# -- the device's input space ----------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """What the generator may choose from.

    ``ranges``: the IOCTL codes to fuzz, ``[lo, hi]`` inclusive.  ``authoritative``: the ranges are
    the device's whole allowlist (read from its policy), so a code outside them that is *not*
    refused with EACCES is a finding; with codes given by hand (``--codes``) they may be a subset,
    and nothing is concluded from a code outside them.  ``max_io``: the policy's MaxIoSize.
    """
    ranges: tuple[tuple[int, int], ...]
    max_io: int = DEFAULT_MAX_IO
    authoritative: bool = False
    source: str = "--codes"
    outside: tuple[int, ...] = field(default=(), compare=False)

    def __post_init__(self):
        if not self.ranges:
            raise UsageError("no IOCTL codes to fuzz: give --codes 0x...,0x...-0x...")
        if self.max_io < 0:
            raise UsageError(f"MaxIoSize {self.max_io} is negative")
        object.__setattr__(self, "ranges", tuple(sorted((int(lo), int(hi)) for lo, hi in self.ranges)))
        object.__setattr__(self, "outside", _outside_codes(self.ranges))

    def allows(self, code: int) -> bool:
        return any(lo <= code <= hi for lo, hi in self.ranges)


def _outside_codes(ranges) -> tuple[int, ...]:
    """Codes next to each range (one and one DWORD past each end) and a few far away, none of
    them inside any range: each should be refused by the policy."""
    candidates = []
    for lo, hi in ranges:
        candidates += [lo - 4, lo - 1, hi + 1, hi + 4]
    candidates += [0, U32_MAX, 0x0022_0000 ^ 0x8000_0000, 0x7FFF_FFFC]
    inside = lambda c: any(lo <= c <= hi for lo, hi in ranges)   # noqa: E731
    return tuple(sorted({c for c in candidates if 0 <= c <= U32_MAX and not inside(c)}))


def parse_codes(text: str, max_io: int = DEFAULT_MAX_IO) -> Target:
    """``--codes 0x00220000,0x00220010-0x0022001C``: codes and inclusive ranges, like IoctlAllow."""
    ranges = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo_text, _, hi_text = part.partition("-")
        try:
            lo = _u32(lo_text.strip())
            hi = _u32(hi_text.strip()) if hi_text else lo
        except ValueError:
            raise UsageError(f"--codes: {part!r} is not a code (0x00220004) or a range "
                             f"(0x00220000-0x00220FFF) of 32-bit numbers") from None
        if lo > hi:
            raise UsageError(f"--codes: range {part!r} ends before it starts; write it low-high")
        ranges.append((lo, hi))
    return Target(tuple(ranges), max_io=max_io, authoritative=False, source="--codes")


def target_from_policy(path: Path, device: str) -> Target | None:
    """The IOCTL allowlist and MaxIoSize of ``device`` from a policy file, or from the first of a
    directory's ``*.json`` that names it; None when no policy there names the device.

    The signature is *not* checked: the fuzzer only chooses its inputs from what it reads, and the
    Device Manager checks every request against the policy it verified itself.  A policy that
    allows every code gives no codes: then ``--codes`` is needed.
    """
    one_file = not Path(path).is_dir()
    files = [Path(path)] if one_file else sorted(Path(path).glob("*.json"))
    wanted = device.rstrip(":").casefold()
    for file in files:
        unverified, problem = _policy_document(file)
        try:
            name = unverified["driver"]["name"]
            io = unverified["io"]
        except (KeyError, TypeError):
            # In a directory other files may be anything; a file named on its own must be a policy.
            if one_file:
                raise UsageError(f"--policy {file}: not a drvbox policy ({problem or 'no driver.name or io section'}); "
                                 f"give a file of `drvbox policy derive`/`sign`, or their directory") from None
            continue
        if not isinstance(name, str) or name.rstrip(":").casefold() != wanted:
            if one_file:
                raise UsageError(f"--policy {file}: this is the policy of {name}, not of {device}; give {device}'s, "
                                 f"or the directory of policies") from None
            continue
        try:
            max_io = int(io["max_io_size"])
            ioctls = io["ioctls"]
            if ioctls.get("all"):
                raise UsageError(f"{file}: the policy of {device} allows every IOCTL code (no IoctlAllow): "
                                 f"say which to fuzz with --codes 0x...,0x...-0x...")
            ranges = tuple((_u32(lo), _u32(hi)) for lo, hi in ioctls["ranges"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UsageError(f"{file}: the io section of {device}'s policy is malformed ({exc}); "
                             f"check it with `drvbox policy show {file}`") from None
        if not ranges:
            raise UsageError(f"{file}: the policy of {device} allows no IOCTL code at all")
        return Target(ranges, max_io=max_io, authoritative=True, source=str(file))
    return None


def _policy_document(file: Path) -> tuple[object, str | None]:
    """A policy document, plain or inside a signed envelope; ``(None, why)`` when it is neither."""
    try:
        doc = json.loads(file.read_bytes())
        if isinstance(doc, dict) and "payload" in doc and "signatures" in doc:
            doc = json.loads(base64.b64decode(doc["payload"], validate=True))
        return doc, None
    except OSError as exc:
        return None, f"cannot read it: {exc.strerror}"
    except (ValueError, binascii.Error, TypeError) as exc:
        return None, f"not JSON, nor a signed envelope of JSON: {exc}"


# -- the generator ---------------------------------------------------------------------------

# Integers that break parsers: zero, one, sign boundaries, all ones, page and size edges.
_INTERESTING = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x1000, 0x10000,
                0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF, 0x7FFF_FFFF_FFFF_FFFF)
_SMALL_SIZES = (0, 0, 1, 2, 3, 4, 5, 7, 8, 12, 15, 16, 17, 31, 32, 33, 63, 64, 100, 255, 256)
_SEEK_OFFSETS = (0, 0, 0, 1, -1, 4, 16, 255, 4096, -4096, 0x7FFF_FFFF, -(1 << 31), (1 << 63) - 1, -(1 << 63))

# Relative weights of what comes next.  The write-seek-read triple is its own step because
# stateful drivers break on sequences that three independent draws would rarely make.
_STEPS = (("ioctl", 60), ("read", 8), ("write", 8), ("seek", 8), ("sequence", 8), ("reopen", 2))
_OUTSIDE_PERCENT = 5


def generate(seed: int, target: Target) -> Iterator[Op]:
    """The endless, deterministic sequence of operations for ``seed`` on ``target``."""
    rng = random.Random(seed)
    kinds = [k for k, _ in _STEPS]
    weights = [w for _, w in _STEPS]
    codes = _code_pool(target.ranges)
    while True:
        step = rng.choices(kinds, weights)[0]
        if step == "ioctl":
            yield _ioctl(rng, target, codes)
        elif step == "read":
            yield Op("read", size=_size(rng, target.max_io))
        elif step == "write":
            yield Op("write", data=_buffer(rng, _size(rng, target.max_io)))
        elif step == "seek":
            yield _seek(rng)
        elif step == "sequence":
            yield Op("write", data=_buffer(rng, _size(rng, min(target.max_io, 4096))))
            yield _seek(rng)
            yield Op("read", size=_size(rng, target.max_io))
        else:
            yield Op("reopen")


def _code_pool(ranges) -> tuple[int, ...] | None:
    """Every code, when the ranges are few enough to list (so each is as likely as another)."""
    total = sum(hi - lo + 1 for lo, hi in ranges)
    if total > 4096:
        return None
    return tuple(c for lo, hi in ranges for c in range(lo, hi + 1))


def _ioctl(rng: random.Random, target: Target, codes) -> Op:
    outside = bool(target.outside) and rng.randrange(100) < _OUTSIDE_PERCENT
    if outside:
        code = rng.choice(target.outside)
    elif codes is not None:
        code = rng.choice(codes)
    else:
        lo, hi = rng.choice(target.ranges)
        # CE codes are DWORD-aligned function numbers: favour the ends and aligned codes.
        aligned = min(hi, lo + (rng.randrange(0, hi - lo + 1) & ~3))
        code = rng.choice((lo, hi, aligned, rng.randint(lo, hi)))
    return Op("ioctl", code=code, data=_buffer(rng, _size(rng, target.max_io)),
              size=_size(rng, target.max_io), outside=outside)


def _size(rng: random.Random, max_io: int) -> int:
    """Around 0 mostly, else powers of two and their neighbours, else MaxIoSize's edges (one
    past it must be refused with EMSGSIZE)."""
    roll = rng.randrange(100)
    if roll < 70:
        return min(rng.choice(_SMALL_SIZES), max_io + 1)
    if roll < 90 and max_io >= 1:
        power = 1 << rng.randrange(0, max_io.bit_length())
        return max(0, min(power + rng.choice((-1, 0, 0, 1)), max_io + 1))
    return max(0, max_io + rng.choice((-1, 0, 0, 1)))


def _buffer(rng: random.Random, size: int) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(size)
    if kind == 1:
        return b"\xff" * size
    if kind == 2:
        return rng.randbytes(size)
    # Structured: little-endian integers of mixed widths, as a driver's input struct would hold.
    out = bytearray()
    while len(out) < size:
        width = rng.choice((1, 2, 4, 4, 8))
        value = rng.choice(_INTERESTING + (size, size - 1, size + 1, rng.getrandbits(32)))
        out += struct.pack("<Q", value & 0xFFFF_FFFF_FFFF_FFFF)[:width]
    return bytes(out[:size])


def _seek(rng: random.Random) -> Op:
    whence = rng.choice((0, 0, 1, 2, 3, U32_MAX)) if rng.randrange(10) == 0 else rng.choice((0, 1, 2))
    return Op("seek", offset=rng.choice(_SEEK_OFFSETS), whence=whence)
