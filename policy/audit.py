"""The tamper-evident audit log (DESIGN.md section 6).

``<state dir>/audit.log`` is JSON Lines, one record per event::

    {"detail":{...},"device":"COM1:","driver":"serial","event":"host.crashed","group":1,
     "hash":"<sha256>","pid":4242,"prev":"<hash of seq-1>","seq":17,"time":"2026-...Z"}

How each kind of tampering is caught, and by what
-------------------------------------------------

* **An edit** of any byte: every line must be the canonical JSON of what it parses to, and its
  ``hash`` is the SHA-256 of that canonical JSON without ``hash``.  Editing a record and its hash
  breaks the next record's ``prev``.
* **A deleted, inserted or reordered line**: ``seq`` must go up by one, and ``prev`` must be the
  hash of the line before.
* **A re-chained log** (edits, then every later hash recomputed): the chain is consistent again,
  but the Ed25519 signatures are not.  Every ``checkpoint_every`` records and at ``close`` the
  log writes an ``audit.checkpoint`` record signing the seq and hash of the record before it,
  and at every fsync it rewrites ``audit.head`` next to the log (atomically: temporary file,
  fsync, rename) with a signature over the latest seq and hash.  A re-chained history no longer
  matches what was signed.
* **A truncated tail**: the chain alone cannot see it -- a prefix of a valid chain is a valid
  chain.  The head can: it names the last fsync'd seq and hash, so a log that ends earlier, or
  holds a different record at that seq, is caught.  The head is written only *after* the fsync
  of the log, so a crash can never leave a head that promises more than the disk holds: a log
  shorter than its head was cut by someone, not by a crash.  A line cut in the middle is caught
  on its own (no newline, not JSON).

Crashes.  Each record is one ``os.write`` of one whole line on an ``O_APPEND`` fd, so what was
written is in the file even if the Device Manager dies the next instant; fsync (for a crash of
the whole machine) happens at least once a second from a timer thread, and at once for
violations.  On open, the last line is read back and its hash checked, and the chain continues
from its seq.  A torn last line (a crash of the machine mid-write) is not hidden: the log ends
it with a newline and writes an ``audit.recovered`` record with the length and SHA-256 of the
torn bytes, chained to the last whole record; ``verify`` accepts a broken line only when the
record right after it acknowledges exactly those bytes.  (If the torn bytes are a whole record
that chains on and only its newline was lost, the record is kept, and the ``audit.recovered``
after it says so, naming its seq, hash and bytes.)  A last line that is whole but does not
check, or a log shorter than its head, is tampering, not a crash: opening raises ``AuditError``
and the log is not written to until a person has moved it aside.

What this cannot detect -- say it plainly
-----------------------------------------

* Anyone who holds the **signing key** can rewrite the whole history, re-sign checkpoints and
  the head, and nothing here can tell.  The key must live where the drivers and their users
  cannot read it (the Device Manager's state dir, mode 0600).
* **Rolling back**: replacing ``audit.head`` with an older copy of itself and cutting the log to
  match it leaves a log that verifies, minus its newest records.  Only a copy of the head kept
  elsewhere (a remote log, a TPM counter) can catch that.
* **The unsigned tail**: records written after the last fsync (at most about a second's worth)
  are covered by no signature yet; whole lines of them can be cut, or ordinary records added,
  without a trace.  ``verify`` reports how many records that is.  Violations are signed before
  ``record`` returns, so an unsigned violation *is* reported as a problem -- which also means
  a crash in the microseconds between its write and its fsync is reported like tampering.
* **Deleting both files** leaves nothing to compare with.
* Times come from the Device Manager's clock and are recorded, not checked.

Writing the log never needs the public key; checking it never needs the private one.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from policy.audit_format import (
    CHECKPOINT_EVENT,
    EVENT_RE,
    GENESIS_PREV,
    MAX_RECORD_BYTES,
    RECOVERED_EVENT,
    RESERVED_PREFIX,
    AuditError,
    canonical,
    check_shape,
    checkpoint_message,
    head_message,
    head_path,
    is_hash,
    is_int,
    is_urgent,
    record_hash,
    seal,
    sign,
)
from policy.audit_query import read_records, stats
from policy.audit_verify import VerifyReport, verify_log

__all__ = [
    "KNOWN_EVENTS", "EVENT_DESCRIPTIONS", "AuditLog", "AuditError", "VerifyReport",
    "verify_log", "read_records", "stats", "load_public_keys", "load_signing_key",
]

log = logging.getLogger("drvbox.audit")

# The events the Device Manager writes, and what each means.  ``record`` accepts any dotted
# lowercase name (a new subsystem should not need this file changed to be audited); this list is
# the documentation, and what `drvbox audit stats` can name.
EVENT_DESCRIPTIONS: dict[str, str] = {
    "policy.loaded": "a signed policy verified and was accepted for a driver",
    "policy.rejected": "a driver's policy was missing, unsigned, untrusted, invalid, expired, rolled back or stale",
    "policy.denied": "a driver asked for a privileged operation its policy does not allow",
    "syscall.denied": "a host made a system call outside its allowlist (detail: name and arguments)",
    "buffer.violation": "a host replied with a length or offset outside the slot it was given",
    "protocol.violation": "a host sent a malformed or unexpected frame",
    "client.denied": "an application was refused a device (uid/gid, ioctl code, size)",
    "host.started": "a host process started (detail: its drivers)",
    "host.crashed": "a host died (detail: signal or exit status)",
    "host.timeout": "a host did not answer within its ProcTimeout and was killed",
    "host.restarted": "a host was started again after a crash or timeout",
    "driver.quarantined": "a driver crashed more than RestartLimit times in RestartWindow and is not restarted",
    "driver.failed": "a kernel-mode driver's module or init failed; its device is not loaded and answers ENODEV",
    "host.reclaimed": "what a dead host held went back (detail: interrupts, regions, DMA buffers and bytes, devices)",
    "host.limits": "a limit is enforced by a weaker stand-in here (detail: MemoryLimit by RLIMIT_AS, no cgroup, and why)",
    CHECKPOINT_EVENT: "written by the log: an Ed25519 signature over the seq and hash of the record before it",
    RECOVERED_EVENT: "written by the log: the line before this one was torn by a crash, or lost only its "
                     "newline (detail: its length and SHA-256)",
}
KNOWN_EVENTS: frozenset[str] = frozenset(EVENT_DESCRIPTIONS)

# Denials a less-trusted party can cause as fast as it can ask -- an application repeating an
# IOCTL its policy refuses, a driver repeating a call outside its window.  Each of them used to
# be one fsync'd, signed record: a loop of them grew the log by ~150 KB/s and fsync'd hundreds of
# times a second, until the disk was full (and the Device Manager stops on a log it cannot write).
# With AuditLog(fold=FOLDED_EVENTS) (the Device Manager's), per event and device, the first
# FOLD_BURST records of a FOLD_WINDOW are written in full; the rest of that window are counted
# and written as one record, detail {"folded": n, "last": ...}, when the window is over (at the
# latest one sync interval later, or at close).  Every denial is accounted for; the log grows
# with time, not with the attacker's speed.
FOLDED_EVENTS = frozenset({"policy.denied", "client.denied"})
FOLD_BURST = 20
FOLD_WINDOW = 1.0

_MAX_NAME = 1024               # device and driver names; with the detail bounded, a line stays bounded
SYNC_INTERVAL = 1.0            # seconds: the longest a written record waits for its fsync
_TAIL_CHUNK = 64 * 1024


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class AuditLog:
    """Appends records to one audit log; many threads may call ``record`` at once.

    Opening takes an exclusive ``flock`` on the log (one writer, or two chains would interleave),
    checks the last line and continues its chain.  Use as a context manager or call ``close``.
    """

    def __init__(self, path: Path, signing_key: Ed25519PrivateKey | None = None, checkpoint_every: int = 256,
                 fold: frozenset[str] = frozenset()):
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, not {checkpoint_every}")
        self.path = Path(path)
        self.head_path = Path(head_path(self.path))
        self._key = signing_key
        self._every = checkpoint_every
        self._lock = threading.Lock()          # seq, hash and the write: one record at a time
        self._sync_lock = threading.Lock()     # fsync + head, and the fd's life
        self._closed = False
        self._since_checkpoint = 0
        self._synced_seq = 0
        self._dir_synced = False
        self.last_sync_error: OSError | None = None
        # Called once, with the error, the first time a record cannot be written or fsync'd:
        # its owner decides what a monitor that can no longer record does (the Device Manager
        # stops).  Callers of ``record`` may catch its OSError; this still hears of it.
        self.on_failure: Callable[[OSError], None] | None = None
        self.failure: OSError | None = None
        self._fold_events = fold              # events folded beyond FOLD_BURST a window (FOLDED_EVENTS)
        self._folds: dict[tuple[str, str | None], _Fold] = {}

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
                               | os.O_NONBLOCK, 0o600)
        except OSError as exc:
            raise AuditError(_open_failure(exc), path=self.path) from None
        try:
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):
                raise AuditError("is not a regular file; the audit log must be one", path=self.path)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AuditError("another AuditLog (this process or another Device Manager) has it open "
                                 "for writing; only one writer may extend a chain", path=self.path) from None
            self._seq, self._hash, torn = self._read_tail()
            self._check_head()
            self._synced_seq = self._seq
            if torn is not None:
                self._append_recovery(torn)
                self.sync()
        except BaseException:
            os.close(self._fd)
            raise

        self._wake = threading.Event()
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._sync_loop, name=f"audit-sync:{self.path.name}", daemon=True)
        self._timer.start()

    # -- public ---------------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self._seq

    def record(self, event: str, *, device: str | None = None, driver: str | None = None,
               group: int | None = None, pid: int | None = None, detail: Mapping | None = None) -> dict:
        """Append one record and return it as written.  Violations are fsync'd and signed before returning.

        Raises ``ValueError`` for arguments that cannot be a record (caught by tests, not at run
        time), ``AuditError`` after ``close``, and ``OSError`` when the disk refuses the write.
        """
        _check_args(event, device, driver, group, pid, detail)
        try:
            with self._lock:
                if self._closed:
                    raise AuditError(f"cannot record {event!r}: the log is closed", path=self.path)
                recovered = self._torn_write and self._recover_locked()
                if event in self._fold_events and self._fold(event, device, driver, group, pid, detail):
                    self._wake.set()            # the sync loop writes the window's count when it ends
                    return {"event": event, "device": device, "folded": True}
                written = self._append(event, device, driver, group, pid, dict(detail or {}))
                if self._key is not None and self._since_checkpoint >= self._every:
                    self._append_checkpoint()
            if recovered or is_urgent(event):
                self._sync_to(written["seq"])
            else:
                self._wake.set()
        except OSError as exc:
            self._failed(exc, f"record {event!r}")
            raise
        return written

    def _fold(self, event: str, device, driver, group, pid, detail) -> bool:
        """Count this record instead of writing it, if its window already wrote FOLD_BURST
        (caller holds the lock).  A window that is over has its count written first."""
        now = time.monotonic()
        key = (event, device)
        fold = self._folds.get(key)
        if fold is None or now - fold.start >= FOLD_WINDOW:
            if fold is not None:
                self._write_fold(key, fold)
            fold = self._folds[key] = _Fold(now)
        if fold.written < FOLD_BURST:
            fold.written += 1
            return False
        fold.folded += 1
        fold.last = (driver, group, pid, dict(detail or {}))
        return True

    def _write_fold(self, key: tuple[str, str | None], fold: "_Fold") -> None:
        if fold.folded:
            driver, group, pid, detail = fold.last
            self._append(key[0], key[1], driver, group, pid,
                         {"folded": fold.folded, "window_s": FOLD_WINDOW, "last": detail})
            fold.folded = 0

    def _flush_folds(self, everything: bool = False) -> bool:
        """Write the counts of windows that are over (all of them at close); True if any was."""
        now = time.monotonic()
        wrote = False
        with self._lock:
            for key, fold in list(self._folds.items()):
                if everything or now - fold.start >= FOLD_WINDOW:
                    wrote = wrote or fold.folded > 0
                    self._write_fold(key, fold)
                    del self._folds[key]
        return wrote

    def _failed(self, exc: OSError, what: str) -> None:
        log.error("%s: could not %s: %s", self.path, what, exc)
        with self._sync_lock:
            first, self.failure = self.failure is None, self.failure or exc
        if first and self.on_failure is not None:
            try:
                self.on_failure(exc)
            except Exception:                   # the owner's trouble must not hide the log's
                log.exception("%s: on_failure", self.path)

    def sync(self) -> None:
        """fsync the log, then sign and atomically rewrite the head to what is now on disk."""
        self._sync_to(None)

    def _sync_to(self, seq_needed: int | None) -> None:
        # Many threads reporting violations at once queue here; whoever gets the lock fsyncs
        # everything written so far, and the others find their record already covered.
        with self._sync_lock:
            if self._fd is None or (seq_needed is not None and self._synced_seq >= seq_needed):
                return
            with self._lock:
                seq, digest = self._seq, self._hash
            os.fsync(self._fd)
            if seq != self._synced_seq:
                self._write_head(seq, digest)
                self._synced_seq = seq

    def close(self) -> None:
        """Final checkpoint, fsync, head, stop the timer.  Closing twice is harmless.  The fd is
        closed and the timer stopped even when the disk refuses the last writes (which raise)."""
        try:
            if not self._closed:
                self._flush_folds(everything=True)
            with self._lock:
                if self._closed:
                    return
                self._closed = True
                if self._key is not None and self._since_checkpoint > 0:
                    self._append_checkpoint()
        finally:
            if self._closed and self._fd is not None:
                self._stop.set()
                self._wake.set()
                self._timer.join()
                try:
                    self.sync()
                finally:
                    with self._sync_lock:
                        os.close(self._fd)
                        self._fd = None

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- appending ------------------------------------------------------------------------------

    def _append(self, event: str, device, driver, group, pid, detail: dict, *, lead: bytes = b"") -> dict:
        # Caller holds self._lock.
        rec: dict[str, Any] = {"seq": self._seq + 1, "time": _now(), "event": event, "device": device,
                               "driver": driver, "group": group, "pid": pid, "detail": detail, "prev": self._hash}
        try:
            line = seal(rec)
        except (TypeError, ValueError) as exc:
            # A detail that is not JSON is the caller's bug, but the event itself must not be
            # lost to it: record what it was, visibly marked.
            rec["detail"] = {"unserializable": True, "error": str(exc)[:200], "repr": repr(detail)[:1000]}
            line = seal(rec)
        if len(line) > MAX_RECORD_BYTES:
            # Bounded lines keep the tail reader's work bounded; the digest still proves what the
            # detail was to anyone who kept it elsewhere.
            blob = canonical(rec["detail"])
            rec["detail"] = {"oversized": True, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
            line = seal(rec)
        self._write(lead + line)
        self._seq, self._hash = rec["seq"], rec["hash"]
        self._since_checkpoint = 0 if event == CHECKPOINT_EVENT else self._since_checkpoint + 1
        return json.loads(line)             # exactly what is on disk, not the caller's objects

    def _append_checkpoint(self) -> None:
        signed = sign(self._key, checkpoint_message(self._seq, self._hash))
        self._append(CHECKPOINT_EVENT, None, None, None, None,
                     {"seq": self._seq, "hash": self._hash, **signed})

    def _write(self, data: bytes) -> None:
        # One os.write of one whole line: O_APPEND puts it at the end in one piece.  A short
        # write (disk full) is finished in a loop -- we hold the flock and self._lock, so nobody
        # can interleave -- and if the rest cannot be written, the torn line is recovered (see
        # _recover_locked) before the next record rather than left for verify to trip over.
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                done += os.write(self._fd, view[done:])
            except OSError:
                if done:
                    self._torn_write = True
                raise

    _torn_write = False

    def _recover_locked(self) -> bool:
        """After a write that was cut short: end the torn line and say so (caller holds the lock)."""
        seq, digest, torn = self._read_tail()
        self._torn_write = False
        if torn is None:
            return False
        self._seq, self._hash = seq, digest        # a record whose newline alone was lost counts
        self._append_recovery(torn)
        return True

    def _append_recovery(self, torn: "_Torn") -> None:
        # The newline that ends the torn line and the record that owns up to it go in one write,
        # so there is no moment where the torn bytes look like a whole line.
        detail: dict[str, Any] = {"offset": torn.offset, "bytes": torn.length, "sha256": torn.sha256}
        if torn.restored:
            detail.update(reason="newline restored: the line before is a whole record whose write "
                                 "stopped short of its newline", restored=True, seq=self._seq, hash=self._hash)
        else:
            detail.update(reason="torn line: a write was cut short (crash or full disk)")
        self._append(RECOVERED_EVENT, None, None, None, None, detail, lead=b"\n")
        log.warning("%s: torn line (%d bytes at offset %d) recovered as seq %d",
                    self.path, torn.length, torn.offset, self._seq)

    # -- the state of the file on open ------------------------------------------------------------

    def _read_tail(self) -> tuple[int, str, "_Torn | None"]:
        """(seq, hash) the chain goes on from, checked, and what follows the last newline, if anything."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return 0, GENESIS_PREV, None
        rfd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            last_nl = _rfind_newline(rfd, size)
            seq, digest = 0, GENESIS_PREV
            if last_nl >= 0:
                line_start = _rfind_newline(rfd, last_nl) + 1
                if last_nl - line_start > MAX_RECORD_BYTES:
                    raise AuditError(f"last whole line is {last_nl - line_start} bytes, longer than any record "
                                     f"({MAX_RECORD_BYTES}): not written by drvbox; {_MOVE_ASIDE}", path=self.path)
                seq, digest = _check_last_line(self.path, os.pread(rfd, last_nl - line_start, line_start))
            if last_nl == size - 1:
                return seq, digest, None
            start = last_nl + 1
            torn = _Torn(start, size - start, _sha256_range(rfd, start, size), restored=False)
            if torn.length <= MAX_RECORD_BYTES:
                # All of a record but its newline: keep the record (the event happened) and say so.
                follower = _next_record(os.pread(rfd, torn.length, start), seq, digest)
                if follower is not None:
                    return (*follower, torn._replace(restored=True))
            return seq, digest, torn
        finally:
            os.close(rfd)

    def _check_head(self) -> None:
        # The head is written only after the log's fsync, so it can never be ahead of the log
        # after a crash.  If it is, records were removed: refuse to extend the chain.
        try:
            raw = self.head_path.read_bytes()
        except FileNotFoundError:
            return
        try:
            head = json.loads(raw)
            seq, digest = head["seq"], head["hash"]
            if not is_int(seq) or not is_hash(digest):
                raise ValueError("seq or hash malformed")
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(f"{self.head_path.name} is unreadable ({exc}); it is rewritten atomically, so this "
                             f"is not a crash; {_MOVE_ASIDE}", path=self.head_path) from None
        if seq > self._seq:
            raise AuditError(f"the log ends at seq {self._seq} but {self.head_path.name} says seq {seq} was "
                             f"written and fsync'd: records were removed (truncation); {_MOVE_ASIDE}",
                             seq=self._seq, path=self.path)
        if seq == self._seq and digest != self._hash:
            raise AuditError(f"the last record's hash differs from the one {self.head_path.name} signed: "
                             f"the log was rewritten; {_MOVE_ASIDE}", seq=seq, path=self.path)

    def _write_head(self, seq: int, digest: str) -> None:
        # Caller holds self._sync_lock.  Temporary file, fsync, rename: a reader sees the old
        # head or the new one, never half of one.
        head: dict[str, Any] = {"version": 1, "log": self.path.name, "seq": seq, "hash": digest,
                                "time": _now(), "keyid": None, "sig": None}
        if self._key is not None:
            head.update(sign(self._key, head_message(seq, digest)))
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, canonical(head) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.head_path)
        if not self._dir_synced:
            # The rename (and the log's own creation) must reach the disk once; after that the
            # directory entry of the head only changes inode, which the next rename carries.
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            self._dir_synced = True

    def _sync_loop(self) -> None:
        # Sleeps until something is written, then at most SYNC_INTERVAL more, then fsyncs: no
        # wake-ups when the log is idle and never more than a second between a write and its fsync.
        while True:
            self._wake.wait()
            if self._stop.wait(SYNC_INTERVAL):
                return                                  # close() does the last sync itself
            self._wake.clear()
            try:
                if self._folds and (self._flush_folds() or self._folds):
                    self._wake.set()                    # windows still open: look again next interval
                self.sync()
                self.last_sync_error = None
            except OSError as exc:
                self.last_sync_error = exc
                self._failed(exc, "fsync the log and rewrite its head")
                self._wake.set()                        # try again next interval


def _open_failure(exc: OSError) -> str:
    """Why the log cannot be opened for appending, and what to do about it."""
    if exc.errno == errno.ELOOP:
        return ("is a symbolic link; the audit log must be a regular file of the state directory itself "
                "(a link could point the records anywhere).  Move the link away")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
        return (f"cannot be opened for appending ({exc.strerror}); drvbox does not run drivers it cannot "
                f"audit: make the state directory writable (or free space), or choose another with --state-dir")
    return f"cannot be opened for appending ({exc.strerror or exc}); {_MOVE_ASIDE}"


_MOVE_ASIDE = ("move audit.log and audit.head aside (keep them: they are evidence) "
               "and run `drvbox audit verify --log FILE` on them; a new log starts empty")


def _check_args(event, device, driver, group, pid, detail) -> None:
    if not isinstance(event, str) or not EVENT_RE.fullmatch(event):
        raise ValueError(f"audit event {event!r} is not a dotted lowercase name such as 'host.crashed'")
    if event.startswith(RESERVED_PREFIX):
        raise ValueError(f"audit event {event!r}: the 'audit.' events are written by the log itself")
    for name, value in (("device", device), ("driver", driver)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"audit {name} must be a string or None, not {value!r}")
        if value is not None and len(value) > _MAX_NAME:
            raise ValueError(f"audit {name} is {len(value)} characters long; names are at most {_MAX_NAME}")
    for name, value in (("group", group), ("pid", pid)):
        if value is not None and not is_int(value):
            raise ValueError(f"audit {name} must be an int or None, not {value!r}")
    if detail is not None and not isinstance(detail, Mapping):
        raise ValueError(f"audit detail must be a mapping or None, not {type(detail).__name__}")


def _check_last_line(path: Path, line: bytes) -> tuple[int, str]:
    try:
        rec = json.loads(line)
    except ValueError as exc:
        raise AuditError(f"last whole line is not JSON ({exc}); a crash tears only the line being written, "
                         f"which has no newline yet, so this is an edit; {_MOVE_ASIDE}", path=path) from None
    reason = check_shape(rec)
    if reason is None and canonical(rec) != line:
        reason = "not in canonical form (bytes were edited)"
    if reason is None and record_hash(rec) != rec["hash"]:
        reason = "its hash does not match its contents (edited)"
    if reason is not None:
        seq = rec.get("seq") if isinstance(rec, dict) and is_int(rec.get("seq")) else None
        raise AuditError(f"last record does not check: {reason}; {_MOVE_ASIDE}", seq=seq, path=path)
    return rec["seq"], rec["hash"]


class _Fold:
    """One (event, device)'s current window: records written in full, records only counted."""

    __slots__ = ("start", "written", "folded", "last")

    def __init__(self, start: float):
        self.start, self.written, self.folded, self.last = start, 0, 0, None


class _Torn(NamedTuple):
    offset: int          # where the bytes after the last newline start
    length: int
    sha256: str
    restored: bool       # they are a whole record that chains on; only the newline was lost


def _next_record(raw: bytes, seq: int, digest: str) -> tuple[int, str] | None:
    """(seq, hash) of ``raw`` if it is the whole, untouched record that follows (seq, digest)."""
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    if (check_shape(rec) is None and canonical(rec) == raw and record_hash(rec) == rec["hash"]
            and rec["seq"] == seq + 1 and rec["prev"] == digest):
        return rec["seq"], rec["hash"]
    return None


def _rfind_newline(fd: int, end: int) -> int:
    """Offset of the last b"\\n" before ``end``, or -1."""
    pos = end
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        chunk = os.pread(fd, pos - start, start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i
        pos = start
    return -1


def _sha256_range(fd: int, start: int, end: int) -> str:
    h = hashlib.sha256()
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(_TAIL_CHUNK, end - pos), pos)
        if not chunk:
            break
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


# -- keys -------------------------------------------------------------------------------------------

def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file ``path`` (unencrypted)."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"is a {type(key).__name__}, not an Ed25519 private key", path=Path(path))
    return key


def load_public_keys(directory: Path) -> list[Ed25519PublicKey]:
    """Every ``*.pub`` (PEM, Ed25519) in ``directory``; a file that is not one is an error, not skipped."""
    keys = []
    for file in sorted(Path(directory).glob("*.pub")):
        try:
            key = serialization.load_pem_public_key(file.read_bytes())
        except ValueError as exc:
            raise AuditError(f"not a PEM public key ({exc})", path=file) from None
        if not isinstance(key, Ed25519PublicKey):
            raise AuditError(f"is a {type(key).__name__}, not an Ed25519 public key", path=file)
        keys.append(key)
    return keys
