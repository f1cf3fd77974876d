"""``drvbox fuzz``, part 2: what a finding is made of.  The audit evidence about one host failure,
buckets, and case files.

A finding is bucketed by ``(kind, signal, status, op, code)``: a thousand crashes of one bug are one
bucket with a count.  Each bucket has a case file: the operations since the handle was last
(re)opened up to the one that failed, enough for ``drvbox fuzz DEV --replay CASE`` to do it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal as signal_mod
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from policy.audit_query import read_from
from reflector.fuzz import FuzzStop, Op, UsageError

CASE_FORMAT = "drvbox.fuzz-case/1"

# Kinds of finding, and what each means (docs/fuzzing.md has the same table).
KINDS = {
    "crash": "the host died during the request (EIO; host.crashed has the signal or exit status)",
    "hang": "the driver did not answer within ProcTimeout (ETIMEDOUT; host.timeout), and its host was killed",
    "buffer.violation": "the host replied with a length or offset outside its slot, and was killed (EIO)",
    "protocol.violation": "the host sent a malformed frame, and was killed (EIO)",
    "died-between": "the host died while no request of ours was in flight (ESTALE on the next one): "
                    "the operation before it is the suspect",
    "not-refused": "an IOCTL code outside the policy's allowlist was not refused with EACCES",
    "dm-closed": "the Device Manager closed our connection",
    "dm-gone": "the Device Manager went away (its socket refuses connections)",
}

# The audit events that say why a host went.
HOST_EVENTS = ("host.crashed", "host.timeout", "buffer.violation", "protocol.violation")


def signal_name(number: int | None) -> str | None:
    if number is None:
        return None
    try:
        return signal_mod.Signals(number).name
    except ValueError:
        return str(number)


@dataclass
class Evidence:
    """What the audit log says about one host failure: the host.crashed record's signal and exit
    status, and the violation that preceded it, if any.  ``note`` says why something is missing."""
    signal: int | None = None
    status: int | None = None
    violation: str | None = None
    records: list = field(default_factory=list)
    note: str | None = None


class AuditTail:
    """Follows the audit log from where it stood when opened, keeping the records about hosts.

    The fuzzer only wants records about its own failures, which come after it started; reading
    from the end also keeps each look short however long the log is.  A record is handed out once
    (``take``), so that two findings never claim the same crash.  Parsing is
    ``policy.audit_query``'s, as for `drvbox audit show`; the chain is not verified here
    (`drvbox audit verify` does that), and a line that is not a record is skipped.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.problem: str | None = None
        self.foreign: str | None = None     # set by check_host: the log is another Device Manager's
        self._pending: list[dict] = []
        try:
            self._pos = os.stat(self.path).st_size
        except OSError as exc:
            self._pos = 0
            fix = ("fuzz as the Device Manager's owner or root to have them" if isinstance(exc, PermissionError)
                   else "give the Device Manager's state directory with --state-dir")
            self.problem = (f"cannot read the audit log {self.path} ({exc.strerror}): findings have no signal or "
                            f"exit status; {fix}")

    def _poll(self) -> None:
        try:
            lines, self._pos = read_from(self.path, self._pos)
        except OSError as exc:
            self.problem = self.problem or f"cannot read the audit log {self.path} ({exc.strerror})"
            return
        self.problem = None
        self._pending += [line.record for line in lines
                          if line.record is not None and line.record["event"] in HOST_EVENTS]

    @property
    def usable(self) -> bool:
        """The log can be read and is the fuzzed Device Manager's: what it lacks did not happen."""
        return self.problem is None and self.foreign is None

    def seen(self, match) -> bool:
        """Whether an unclaimed record for which ``match(rec)`` is true is in the log now (not
        waiting, not claiming it)."""
        self._poll()
        return any(match(rec) for rec in self._pending)

    def take(self, match, deadline: float) -> dict | None:
        """The first unclaimed record for which ``match(rec)`` is true, waiting until ``deadline``
        (``time.monotonic()``) for it to be written; None when none came."""
        while True:
            self._poll()
            for i, rec in enumerate(self._pending):
                if match(rec):
                    return self._pending.pop(i)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    # How far back check_host looks: far enough for any host that is up, short enough to read at
    # once however old the log.
    CHECK_WINDOW = 16 << 20

    def check_host(self, pid: int, device: str, wait_s: float) -> str | None:
        """Whether this is the log of the Device Manager we fuzz through: its host.started records
        must include the pid of ``device``'s host.  When they do not, the reason (also kept in
        ``foreign``: every later finding carries it at once instead of waiting for records that will
        never come); None when they do, or when the log cannot be read (``problem`` says so).

        A host serves before its host.started record is written, so a missing record is waited
        for, up to ``wait_s``, before the log is judged another's."""
        deadline = time.monotonic() + wait_s
        try:
            pos = max(0, os.stat(self.path).st_size - self.CHECK_WINDOW)
            while True:
                lines, pos = read_from(self.path, pos)
                if any(line.record is not None and line.record["event"] == "host.started"
                       and line.record["pid"] == pid for line in lines):
                    return None
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        except OSError:
            return None
        self.foreign = (f"the audit log {self.path} has no host.started record of {device}'s host (pid {pid}): it is "
                        f"not the log of the Device Manager being fuzzed, so findings have no signal or exit "
                        f"status; give that Device Manager's state directory with --state-dir")
        return self.foreign

    def evidence(self, device: str, groups: set, hang: bool, wait_s: float) -> Evidence:
        """The evidence of the failure of ``device``'s host (in one of ``groups``: a device that keeps
        crashing a shared host may be moved into a host of its own)."""
        if self.foreign:
            return Evidence(note=self.foreign)
        ev = Evidence()
        deadline = time.monotonic() + wait_s
        ours = lambda rec: rec.get("group") in groups or rec.get("device") == device   # noqa: E731
        if hang:
            rec = self.take(lambda r: r["event"] == "host.timeout" and ours(r), deadline)
            if rec is not None:
                ev.records.append(rec)
        crashed = self.take(lambda r: r["event"] == "host.crashed" and ours(r)
                            and (r.get("detail") or {}).get("phase") != "start", deadline)
        if crashed is None:
            ev.note = self.problem or f"no host.crashed record for {device} within {wait_s:g} s"
            return ev
        detail = crashed.get("detail") or {}
        ev.signal, ev.status = detail.get("signal"), detail.get("exit_code")
        ev.violation = detail.get("killed_for") if detail.get("killed_for") in KINDS else None
        violation = self.take(lambda r: r["event"] in ("buffer.violation", "protocol.violation") and ours(r),
                              time.monotonic())
        if violation is not None:
            ev.violation = ev.violation or violation["event"]
            ev.records.append(violation)
        ev.records.append(crashed)
        return ev


# -- buckets and their case files ------------------------------------------------------------

@dataclass
class Bucket:
    kind: str
    signal: int | None
    status: int | None
    op: str
    code: int | None
    count: int = 0
    first_index: int = 0
    case: Path | None = None
    trail_len: int = 0
    note: str | None = None

    @property
    def key(self) -> tuple:
        return (self.kind, self.signal, self.status, self.op, self.code)

    def to_json(self) -> dict:
        return {"kind": self.kind, "signal": self.signal, "signal_name": signal_name(self.signal),
                "status": self.status, "op": self.op,
                "code": None if self.code is None else f"{self.code:#010x}", "count": self.count,
                "first_index": self.first_index, "case": None if self.case is None else str(self.case),
                "note": self.note}


class CaseBook:
    """The buckets of one run, and their case files in ``out_dir`` (made when the first is
    written).  A bucket's case keeps the shortest trail seen: the easiest one to read and replay."""

    def __init__(self, out_dir: Path, device: str, seed: int, target_source: str):
        self.out_dir = Path(out_dir)
        self.device, self.seed, self.target_source = device, seed, target_source
        self.buckets: dict[tuple, Bucket] = {}
        self.ready = False          # prepare() made out_dir: there is somewhere to write

    def prepare(self) -> None:
        """Make ``out_dir`` before the first operation: a run that could not keep its cases should
        not start (every run also leaves its summary.json there, seed included)."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            _write_whole(self.out_dir / ".writable", "").unlink()
            self.ready = True
        except OSError as exc:
            raise FuzzStop(f"cannot write case files to {self.out_dir} ({exc.strerror}): give a directory of "
                           f"yours with --out DIR") from None

    def add(self, kind: str, ev: Evidence, op: Op | None, index: int, trail: list[Op]) -> Bucket:
        op_kind = op.kind if op is not None else "-"
        code = op.code if op is not None and op.kind == "ioctl" else None
        bucket = Bucket(kind, ev.signal, ev.status, op_kind, code)
        bucket = self.buckets.setdefault(bucket.key, bucket)
        bucket.count += 1
        if bucket.count == 1:
            bucket.first_index, bucket.note = index, ev.note
        if bucket.case is None or len(trail) < bucket.trail_len:
            bucket.case = self._write(bucket, ev, index, trail)
            bucket.trail_len = len(trail)
        return bucket

    def _write(self, bucket: Bucket, ev: Evidence, index: int, trail: list[Op]) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        n = list(self.buckets).index(bucket.key) + 1
        code = f"-{bucket.code:08x}" if bucket.code is not None else ""
        path = self.out_dir / f"case-{n:03d}-{bucket.kind}-{bucket.op}{code}.json"
        case = {"format": CASE_FORMAT, "device": self.device, "seed": self.seed, "index": index,
                "codes_from": self.target_source,
                "expect": {"kind": bucket.kind, "signal": bucket.signal, "signal_name": signal_name(bucket.signal),
                           "status": bucket.status},
                "audit": ev.records, "ops": [op.to_json() for op in trail]}
        return _write_whole(path, json.dumps(case, indent=1) + "\n")

    def write_summary(self, summary: dict) -> Path | None:
        # Not out_dir.is_dir(): under a directory we may not search, that raises EACCES.
        if not self.ready:
            return None
        path = self.out_dir / "summary.json"
        return _write_whole(path, json.dumps(summary, indent=1) + "\n")


def _write_whole(path: Path, text: str) -> Path:
    """Write ``path`` whole, then rename it into place: never seen half written, even after
    Ctrl-C.  The temporary file gets a fresh name, created O_EXCL (mkstemp), because --out may be
    a directory others can write (/tmp): a name known in advance could be a symlink they planted,
    and a root fuzzer would write through it.  The rename replaces a link at ``path`` itself."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


@dataclass
class Case:
    path: Path
    device: str
    seed: int | None
    expect: dict
    ops: list[Op]


def load_case(path: Path) -> Case:
    """A case file, checked: every problem names the file and what to fix."""
    try:
        unverified = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"--replay {path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise UsageError(f"--replay {path}: not JSON ({exc})") from None
    if not isinstance(unverified, dict) or unverified.get("format") != CASE_FORMAT:
        raise UsageError(f"--replay {path}: not a drvbox fuzz case (expected \"format\": \"{CASE_FORMAT}\")")
    ops = unverified.get("ops")
    expect = unverified.get("expect")
    if not isinstance(ops, list) or not ops or not isinstance(expect, dict) or expect.get("kind") not in KINDS:
        raise UsageError(f"--replay {path}: needs a non-empty \"ops\" list and \"expect\": {{\"kind\": one of "
                         f"{', '.join(KINDS)}}}")
    return Case(Path(path), str(unverified.get("device", "")), unverified.get("seed"), expect,
                [Op.from_json(op, f"{path}: ops[{i}]") for i, op in enumerate(ops)])
