"""Checking an audit log: is it, byte for byte, what the Device Manager wrote?

``verify_log`` walks every line once and checks, in order: the line is whole (ends in a newline)
and JSON; it is a well-formed record in canonical form; its hash matches its contents; its seq
follows the previous one and its prev is the previous hash; a checkpoint signs exactly the record
before it, with a trusted key.  At the end, the signed head next to the log must name a seq and
hash that are in the log -- that is what catches a cut tail (see ``policy.audit`` for the whole
argument, and for what no check here can catch).

Each problem names the line, the seq, what is wrong and what it means ("deleted", "edited",
"truncated").  After a problem, checking goes on from the record as it stands, so one edit is
reported once instead of as a cascade on every later line.  The report is data; `drvbox audit
verify` exits 0 only when ``ok``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from policy.audit_format import (
    CHECKPOINT_EVENT,
    FIRST_SEQ,
    GENESIS_PREV,
    RECOVERED_EVENT,
    canonical,
    check_shape,
    check_signature,
    checkpoint_message,
    head_message,
    head_path,
    is_hash,
    is_int,
    is_urgent,
    keys_by_id,
    record_hash,
)

MAX_PROBLEMS = 100


@dataclass
class VerifyReport:
    records: int                  # well-formed records (checkpoints included)
    checkpoints: int              # checkpoint records whose signature holds
    last_seq: int                 # seq of the last well-formed record (0 if none)
    problems: list[str]           # each one names a line and what is wrong; empty when intact
    ok: bool                      # no problems
    notes: list[str] = field(default_factory=list)   # facts that are not problems (recovered crashes, unsigned tail)
    signed_seq: int = 0           # the highest seq a valid signature (checkpoint or head) covers


class _Walk:
    """The state of one pass over the log."""

    def __init__(self, path: Path, keys: Mapping[str, Ed25519PublicKey]):
        self.path = path
        self.keys = keys
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.records = 0
        self.checkpoints = 0
        self.expected_seq = FIRST_SEQ
        self.prev_hash = GENESIS_PREV
        self.prev_where = "the start of the log"
        self.last_seq = 0
        self.last_line = 0
        self.signed_seq = 0
        self.hashes: dict[int, str] = {}       # only the seqs the head may ask about
        self.urgent: list[tuple[int, int, str]] = []   # (line, seq, event) of violations seen
        self.broken: tuple[int, bytes, str] | None = None   # a line that is not a record, awaiting acknowledgement
        self.prev_body = b""                   # the bytes of the previous record's line

    def problem(self, line: int | None, text: str) -> None:
        where = f"line {line}: " if line is not None else ""
        self.problems.append(where + text)

    # -- one line ---------------------------------------------------------------------------------

    def line(self, number: int, raw: bytes, want_hash_of: int | None) -> None:
        whole = raw.endswith(b"\n")
        body = raw[:-1] if whole else raw
        if not whole:
            return self._not_a_record(number, body, "no newline at the end: a record cut mid-line "
                                                    "(a crash while writing it, or the log was truncated here)")
        try:
            rec = json.loads(body)
        except ValueError as exc:
            return self._not_a_record(number, body, f"not valid JSON ({exc}): the line was edited or torn")
        acknowledged = self._settle_broken(rec)

        shape = check_shape(rec)
        if shape is not None:
            seq = rec.get("seq") if isinstance(rec, dict) else None
            return self.problem(number, f"{_seq_text(seq)}not a well-formed record: {shape} (edited)")
        seq = rec["seq"]
        where = f"seq {seq}: "
        if canonical(rec) != body:
            self.problem(number, where + "bytes differ from the record's canonical form: the line was edited")
        elif record_hash(rec) != rec["hash"]:
            self.problem(number, where + "hash does not match the record's contents: the record was edited")

        if seq > self.expected_seq:
            missing = (f"seq {self.expected_seq}" if seq == self.expected_seq + 1
                       else f"seq {self.expected_seq}..{seq - 1}")
            self.problem(number, where + f"follows seq {self.expected_seq - 1}: {missing} missing here "
                                         f"(deleted, or moved elsewhere)")
        elif seq < self.expected_seq:
            self.problem(number, where + f"comes after seq {self.expected_seq - 1}: records out of order "
                                         f"or repeated")
        elif rec["prev"] != self.prev_hash:
            self.problem(number, where + f"prev is not the hash of {self.prev_where}: a record before it "
                                         f"was replaced or re-chained")

        if rec["event"] == CHECKPOINT_EVENT:
            self._checkpoint(number, rec)
        elif rec["event"] == RECOVERED_EVENT and not acknowledged and not self._restored(number, rec):
            self.problem(number, where + "audit.recovered names a torn line that is not right before it "
                                         "(the torn bytes were removed or changed)")

        self.records += 1
        if seq < self.expected_seq - 1:
            return          # a record from the past: the chain goes on from the newest one seen
        self.expected_seq = seq + 1
        self.prev_hash = rec["hash"]
        self.prev_where = f"line {number} (seq {seq})"
        self.prev_body = body
        self.last_seq, self.last_line = seq, number
        if want_hash_of == seq:
            self.hashes[seq] = rec["hash"]
        if is_urgent(rec["event"]):
            self.urgent.append((number, seq, rec["event"]))

    def _not_a_record(self, number: int, body: bytes, reason: str) -> None:
        self._settle_broken(None)
        self.broken = (number, body, reason)

    def _settle_broken(self, rec: Any) -> bool:
        # A line that is not a record is forgiven only when the very next record is the log's own
        # audit.recovered naming exactly its bytes: then a crash tore it, and the log said so.
        if self.broken is None:
            return False
        number, body, reason = self.broken
        self.broken = None
        detail = rec.get("detail") if isinstance(rec, dict) and rec.get("event") == RECOVERED_EVENT else None
        if (isinstance(detail, dict) and detail.get("bytes") == len(body)
                and detail.get("sha256") == hashlib.sha256(body).hexdigest()):
            self.notes.append(f"line {number}: torn by a crash ({len(body)} bytes), acknowledged by the "
                              f"audit.recovered record on line {number + 1}")
            return True
        self.problem(number, reason)
        return False

    def _restored(self, number: int, rec: dict) -> bool:
        # The other kind of recovery: the line before is a whole record that had lost only its
        # newline; the log kept it, and says exactly which record and which bytes.
        detail = rec["detail"]
        if (detail.get("restored") is True and detail.get("seq") == rec["seq"] - 1
                and detail.get("hash") == rec["prev"] == self.prev_hash
                and detail.get("bytes") == len(self.prev_body)
                and detail.get("sha256") == hashlib.sha256(self.prev_body).hexdigest()):
            self.notes.append(f"line {number - 1}: a record whose newline was lost in a crash, kept and "
                              f"acknowledged by the audit.recovered record on line {number}")
            return True
        return False

    def _checkpoint(self, number: int, rec: dict) -> None:
        detail, seq = rec["detail"], rec["seq"]
        where = f"seq {seq}: checkpoint "
        if detail.get("seq") != seq - 1 or detail.get("hash") != rec["prev"]:
            return self.problem(number, where + f"signs seq {detail.get('seq')!r} hash {str(detail.get('hash'))[:16]}.. "
                                                f"but the record before it is seq {seq - 1} hash {rec['prev'][:16]}..: "
                                                f"forged or moved")
        why = check_signature(self.keys, detail.get("keyid"), detail.get("sig"),
                              checkpoint_message(seq - 1, rec["prev"]))
        if why is not None:
            return self.problem(number, where + why)
        self.checkpoints += 1
        self.signed_seq = max(self.signed_seq, seq - 1)

    # -- the end ----------------------------------------------------------------------------------

    def finish(self) -> None:
        self._settle_broken(None)

    def head(self, head: dict | None, head_file: Path) -> None:
        name = head_file.name
        if head is None:
            if self.records or self.problems:
                self.problem(None, f"{name} is missing: the end of the log is not signed, so records cut "
                                   f"from the tail could not be noticed")
            return
        seq, digest = head.get("seq"), head.get("hash")
        if not is_int(seq) or not is_hash(digest):
            return self.problem(None, f"{name} is malformed (seq {seq!r}, hash {digest!r})")
        signed = head.get("sig") is not None
        if not signed:
            self.problem(None, f"{name} is not signed: the log was written without a signing key, so "
                               f"re-chaining and truncation cannot be ruled out")
        else:
            why = check_signature(self.keys, head.get("keyid"), head.get("sig"), head_message(seq, digest))
            if why is not None:
                return self.problem(None, f"{name}: {why}")
        if seq > self.last_seq:
            self.problem(None, f"the log ends at seq {self.last_seq} (line {self.last_line}) but {name} "
                               f"{'(signed) ' * signed}says seq {seq} was written: seq {self.last_seq + 1}..{seq} "
                               f"are missing -- the log was truncated")
        elif seq > 0 and self.hashes.get(seq) != digest:
            self.problem(None, f"seq {seq} in the log is not the record {name} signed (hash "
                               f"{digest[:16]}..): the log was rewritten up to there")
        elif signed:
            self.signed_seq = max(self.signed_seq, seq)
            self._unsigned_urgent()      # only against a head that holds: else that is the problem
        if self.signed_seq < self.last_seq and not self.problems:
            n = self.last_seq - self.signed_seq
            self.notes.append(f"seq {self.signed_seq + 1}..{self.last_seq} ({n} record{'s' * (n != 1)}) "
                              f"were written after the last signature (a crash before the next fsync); "
                              f"whole lines cut from there would not be noticed")

    def _unsigned_urgent(self) -> None:
        # The unsigned tail a crash leaves holds only ordinary records: the writer signs every
        # violation before `record` returns.  A violation no signature covers was appended by
        # someone else -- or the Device Manager died in the microseconds between write and fsync,
        # which we cannot tell apart and so do not excuse.
        for number, seq, event in self.urgent:
            if seq > self.signed_seq:
                self.problem(number, f"seq {seq}: {event} is covered by no signature although violations "
                                     f"are signed as soon as they are written: it was appended afterwards "
                                     f"(or the Device Manager died in that instant)")


def _seq_text(seq: Any) -> str:
    return f"seq {seq}: " if is_int(seq) else ""


def _read_head(head_file: Path) -> tuple[dict | None, str | None]:
    try:
        raw = head_file.read_bytes()
    except FileNotFoundError:
        return None, None
    try:
        head = json.loads(raw)
    except ValueError as exc:
        return None, f"{head_file.name} is not JSON ({exc})"
    if not isinstance(head, dict):
        return None, f"{head_file.name} is not a JSON object"
    return head, None


def verify_log(path: Path, public_keys: Sequence[Ed25519PublicKey]) -> VerifyReport:
    """Check every line of the log at ``path`` and its signed head against ``public_keys``."""
    path = Path(path)
    walk = _Walk(path, keys_by_id(public_keys))
    if not public_keys:
        walk.problem(None, "no public key to check against: without one, re-chaining and truncation "
                           "cannot be ruled out (pass --trust DIR, or put the key in <state>/keys/)")
    head_file = Path(head_path(path))
    head, head_problem = _read_head(head_file)
    if head_problem:
        walk.problem(None, head_problem)
    want = head.get("seq") if head is not None and is_int(head.get("seq")) else None
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        walk.problem(None, f"no audit log at {path}" + (f" although {head_file.name} says it held seq {want}: "
                                                         f"it was deleted" if want else ""))
        return _report(walk)
    with f:
        for number, raw in enumerate(f, 1):
            walk.line(number, raw, want)
            if len(walk.problems) > MAX_PROBLEMS:
                walk.problems.append(f"... stopped after {MAX_PROBLEMS} problems at line {number}")
                return _report(walk)
    walk.finish()
    if not head_problem:
        walk.head(head, head_file)
    return _report(walk)


def _report(walk: _Walk) -> VerifyReport:
    return VerifyReport(records=walk.records, checkpoints=walk.checkpoints, last_seq=walk.last_seq,
                        problems=walk.problems, ok=not walk.problems, notes=walk.notes,
                        signed_seq=walk.signed_seq)
