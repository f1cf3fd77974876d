"""``drvbox fuzz``, part 3: running operations against a Device Manager and judging the answers.

Everything goes through ``reflector.client``, the path an application takes: the Device Manager
checks each request against the device's policy, marshals it into the sandboxed host, and reports
a host's death as an errno.  The driver is never imported here.

How an answer is judged (docs/fuzzing.md):

* success, or an errno the driver chose (EINVAL, ENOTTY, ...): normal, counted by errno;
* EACCES/EMSGSIZE: the policy refusing a code outside the allowlist or a buffer past MaxIoSize --
  expected; the *absence* of that refusal for a code outside a policy's allowlist is a finding;
* EIO with the host gone, ETIMEDOUT with a host.timeout record (or the host gone), ESTALE
  without a failure of ours: the host failed -- a finding, with its signal or exit status read
  from the audit log;
* a closed connection: the Device Manager itself failed -- a finding.

After a finding the fuzzer waits (bounded) for the restarted host, lifts a quarantine the way
`drvbox restart DEV` does, and goes on with a fresh handle.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from reflector import clientwire
from reflector.client import DeviceManager, connect
from reflector.fuzz import FuzzStop, Op, Target, generate
from reflector.fuzz_cases import AuditTail, Case, CaseBook, Evidence, signal_name
from reflector.paths import audit_log_path

# Answers that mean the request never reached the driver because the policy refused it.
_REFUSALS = (errno.EACCES, errno.EMSGSIZE)
# Answers after which the handle is of no more use.
_HANDLE_LOST = (errno.ENODEV, errno.EBADF)


@dataclass
class Options:
    socket: Path
    device: str
    state_dir: Path
    seed: int
    iterations: int | None = None
    seconds: float | None = None
    out_dir: Path | None = None
    restart_wait_s: float = 30.0      # how long a host may take to come back after a failure
    audit_wait_s: float = 5.0         # how long the audit record of a failure may take to appear
    kernel_ok: bool = False
    say: Callable[[str], None] = lambda text: None          # noqa: E731 -- notes (stderr)
    progress: Callable[[str], None] = lambda text: None     # noqa: E731 -- the progress line


@dataclass
class Report:
    device: str
    seed: int
    iterations: int = 0
    elapsed_s: float = 0.0
    buckets: list = field(default_factory=list)
    errnos: dict = field(default_factory=dict)
    refused: int = 0
    quarantines_lifted: int = 0
    interrupted: bool = False
    stopped: str | None = None
    codes_from: str = ""
    out_dir: str | None = None
    audit_note: str | None = None

    @property
    def findings(self) -> int:
        return sum(b["count"] for b in self.buckets)

    def to_json(self) -> dict:
        return {"device": self.device, "seed": self.seed, "iterations": self.iterations,
                "elapsed_s": round(self.elapsed_s, 3),
                "ops_per_s": round(self.iterations / self.elapsed_s, 1) if self.elapsed_s else 0.0,
                "findings": self.findings, "buckets": self.buckets, "errnos": self.errnos,
                "refused_by_policy": self.refused, "quarantines_lifted": self.quarantines_lifted,
                "interrupted": self.interrupted, "stopped": self.stopped, "codes_from": self.codes_from,
                "out_dir": self.out_dir, "audit_note": self.audit_note}


def _errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


class _Session:
    """A connection to the Device Manager and one handle on the device, reopened as needed, with
    what is needed to tell a host's failure from a driver's error: the host as last seen."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.dm: DeviceManager | None = None
        self.handle = None
        self.name = opts.device
        self.groups: set = set()
        self.host: tuple | None = None
        self.lifted = 0

    # -- the Device Manager's view of the device --------------------------------------------

    def connect(self) -> None:
        try:
            self.dm = connect(self.opts.socket)
        except OSError as exc:
            raise FuzzStop(f"cannot connect to the Device Manager at {self.opts.socket}: "
                           f"{exc.strerror or exc}") from None

    def describe(self) -> tuple[dict | None, dict | None]:
        """The device's entry of `drvbox ls --json` and its host's (either may be None)."""
        info = self.dm.devices()
        wanted = self.opts.device.rstrip(":").casefold()
        device = next((d for d in info["devices"] if d["name"].rstrip(":").casefold() == wanted), None)
        if device is None:
            return None, None
        self.name = device["name"]
        if device["group"] is not None:
            self.groups.add(device["group"])
        host = next((h for h in info["hosts"] if device["name"] in h["devices"]), None)
        if host is not None:
            self.groups.add(host["group"])
        return device, host

    def snapshot(self) -> tuple:
        """What changes when the device's host fails: its state, pid and restart count."""
        device, host = self.describe()
        if device is None:
            return ("gone",)
        return (device["state"], device["restarts"], host and host["pid"])

    def check_device(self) -> dict:
        device, _ = self.describe()
        if device is None:
            names = ", ".join(d["name"] for d in self.dm.devices()["devices"]) or "none"
            raise FuzzStop(f"no device {self.opts.device!r} on this Device Manager (devices: {names})")
        if device["mode"] == "kernel" and not self.opts.kernel_ok:
            raise FuzzStop(f"{device['name']} runs in kernel mode, inside the Device Manager: a crash found by "
                           f"fuzzing would take the Device Manager and every device down.  Load it in user mode "
                           f"(Flags 0x10), or pass --kernel-mode-ok if that is what you want")
        if device["state"] in ("rejected", "stopped"):
            raise FuzzStop(f"{device['name']} is {device['state']}: nothing to fuzz (`drvbox audit show --event "
                           f"policy.rejected` says why a policy was rejected)")
        return device

    # -- the handle ---------------------------------------------------------------------------

    def close_handle(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            try:
                handle.close()
            except (OSError, clientwire.ClientProtocolError):
                pass          # a stale handle, or a connection already gone: either way it is closed

    def reconnect(self) -> None:
        self.handle = None
        if self.dm is not None:
            self.dm.close()
        self.dm = None
        self.connect()

    def lift_quarantine(self) -> None:
        # Said once: a driver that keeps crashing is quarantined again and again, and the progress
        # line and the summary count the lifts.
        if not self.lifted:
            self.opts.say(f"{self.name} is quarantined (its host failed more than RestartLimit times); "
                          f"lifting it as `drvbox restart {self.name}` does, each time it happens")
        try:
            self.dm.restart(self.name)
        except PermissionError as exc:
            raise FuzzStop(f"{self.name} is quarantined and this user may not lift it ({exc.strerror}): run "
                           f"`drvbox restart {self.name}` as root or as the Device Manager's owner, or fuzz "
                           f"as one of them") from None
        self.lifted += 1

    def open(self) -> None:
        """A fresh handle on the device, waiting (bounded) for a host that is restarting and lifting
        a quarantine."""
        self.close_handle()
        deadline = time.monotonic() + self.opts.restart_wait_s
        while True:
            try:
                self.handle = self.dm.open(self.name, "rw")
                self.host = self.snapshot()
                return
            except (ConnectionError, clientwire.ClientProtocolError):
                self.reconnect()
                continue
            except OSError as exc:
                err = exc
            try:
                device, _ = self.describe()
            except (ConnectionError, clientwire.ClientProtocolError):
                self.reconnect()
                continue
            state = device["state"] if device else "gone"
            if state == "quarantined":
                self.lift_quarantine()
                continue
            if err.errno == errno.EACCES:
                raise FuzzStop(f"not allowed to open {self.name} ({err.strerror}): its policy's AllowUsers/"
                               f"AllowGroups do not include you")
            if state in ("gone", "rejected", "stopped") or time.monotonic() >= deadline:
                raise FuzzStop(f"{self.name} did not come back within {self.opts.restart_wait_s:g} s (state "
                               f"{state}, last error {_errname(err.errno)}: {err.strerror}); its host may "
                               f"fail to start: see `drvbox audit show --device {self.name}`")
            time.sleep(0.05)

    def do(self, op: Op) -> None:
        h = self.handle
        if op.kind == "ioctl":
            h.ioctl(op.code, op.data, out_size=op.size)
        elif op.kind == "read":
            h.read(op.size)
        elif op.kind == "write":
            h.write(op.data)
        elif op.kind == "seek":
            h.seek(op.offset, op.whence)
        else:
            self.open()

    def close(self, abandon: bool = False) -> None:
        """Close the handle, then the connection.  ``abandon``: a request was cut short (Ctrl-C) and
        its reply may still be on the way, so the connection is out of step and no further request
        is sent on it; the Device Manager closes a connection's handles when it goes."""
        if abandon:
            self.handle = None
        else:
            self.close_handle()
        if self.dm is not None:
            self.dm.close()
            self.dm = None


@dataclass
class Verdict:
    """How one operation's answer is judged: ``kind`` is None for no finding."""
    kind: str | None
    evidence: Evidence | None = None
    blame_previous: bool = False     # died-between: the operation before is the suspect


def _judge(session: _Session, tail: AuditTail, op: Op, exc: BaseException | None, target: Target | None) -> Verdict:
    """The verdict on ``op``'s answer (``exc`` None for success)."""
    if exc is None:
        if op.outside and target is not None and target.authoritative:
            return Verdict("not-refused", Evidence(note=f"code {op.code:#010x} is outside {target.source}'s "
                                                         f"allowlist, and the request reached the driver"))
        return Verdict(None)
    if isinstance(exc, (ConnectionError, clientwire.ClientProtocolError)):
        return Verdict("dm-closed", Evidence(note=str(exc)))
    code = exc.errno
    wait = session.opts.audit_wait_s
    if code == errno.ETIMEDOUT:
        if not _host_timed_out(session, tail):
            return Verdict(None)             # the driver's own ETIMEDOUT; its host lives on
        return Verdict("hang", tail.evidence(session.name, session.groups, hang=True, wait_s=wait))
    if code == errno.EIO:
        before, now = session.host, session.snapshot()
        if now == before:
            return Verdict(None)             # the driver failed the request; its host lives on
        ev = tail.evidence(session.name, session.groups, hang=False, wait_s=wait)
        return Verdict(ev.violation or "crash", ev)
    if code == errno.ESTALE:
        ev = tail.evidence(session.name, session.groups, hang=False, wait_s=wait)
        return Verdict("died-between", ev, blame_previous=True)
    if op.outside and target is not None and target.authoritative and code not in _REFUSALS:
        return Verdict("not-refused", Evidence(note=f"code {op.code:#010x} is outside {target.source}'s allowlist "
                                                     f"and was answered {_errname(code)}, not EACCES"))
    return Verdict(None)


def resolve_device(opts: Options) -> str:
    """The device's name as the Device Manager spells it (``com1`` -> ``COM1:``), after the same
    checks a run makes first: the Device Manager answers, the device exists, is not kernel mode
    (without ``kernel_ok``), and is loaded.  Done before the codes are looked up, so that a typo
    in DEV or a Device Manager that is not running is what the user hears about."""
    session = _Session(opts)
    try:
        session.connect()
        return session.check_device()["name"]
    except (ConnectionError, clientwire.ClientProtocolError) as exc:
        raise FuzzStop(f"the Device Manager at {opts.socket} closed the connection ({exc})") from None
    finally:
        session.close()


def _host_timed_out(session: _Session, tail: AuditTail) -> bool:
    """Whether an ETIMEDOUT means the Device Manager gave up on the host (ProcTimeout) rather than
    the driver answering ETIMEDOUT itself, as one that waited for data in vain may.

    The Device Manager writes host.timeout before it answers, so a readable log settles it at
    once.  Without one, the host must be seen to change (it was killed), within --audit-wait."""
    if tail.usable:
        return tail.seen(lambda r: r["event"] == "host.timeout"
                         and (r.get("group") in session.groups or r.get("device") == session.name))
    deadline = time.monotonic() + session.opts.audit_wait_s
    while session.snapshot() == session.host:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def run(opts: Options, target: Target) -> Report:
    """Fuzz ``opts.device`` with the operations of ``generate(opts.seed, target)`` until the
    iterations or the time are used up, a FuzzStop, or Ctrl-C.  Every case is on disk as soon as
    its bucket exists, so an interrupted run loses nothing."""
    session = _Session(opts)
    report = Report(opts.device, opts.seed, codes_from=target.source)
    out_dir = opts.out_dir or _default_out_dir(opts)
    book = CaseBook(out_dir, opts.device, opts.seed, target.source)
    started = time.monotonic()
    last_progress = started
    trail: list[Op] = []
    previous: Op | None = None
    tail = AuditTail(audit_log_path(opts.state_dir))
    if tail.problem:
        opts.say(tail.problem)
        report.audit_note = tail.problem
    try:
        book.prepare()
        session.connect()
        device = session.check_device()
        report.device = book.device = session.name
        if device["state"] == "quarantined":
            session.lift_quarantine()
        session.open()
        _check_audit_log(session, tail, report)
        for index, op in enumerate(generate(opts.seed, target)):
            if opts.iterations is not None and index >= opts.iterations:
                break
            now = time.monotonic()
            if opts.seconds is not None and now - started >= opts.seconds:
                break
            if now - last_progress >= 1.0:
                last_progress = now
                opts.progress(_progress_line(session.name, index, now - started, book, session.lifted))
            report.iterations = index + 1
            if op.kind == "reopen":
                session.open()
                trail, previous = [], op
                continue
            trail.append(op)
            try:
                session.do(op)
                exc = None
            except (OSError, clientwire.ClientProtocolError) as e:
                exc = e
                name = _errname(e.errno) if isinstance(e, OSError) and e.errno else type(e).__name__
                report.errnos[name] = report.errnos.get(name, 0) + 1
                if isinstance(e, OSError) and e.errno in _REFUSALS:
                    report.refused += 1
            try:
                verdict = _judge(session, tail, op, exc, target)
            except (ConnectionError, clientwire.ClientProtocolError) as e:
                verdict = Verdict("dm-closed", Evidence(note=f"while asking about {session.name}: {e}"))
            if verdict.kind is not None:
                blamed, case_trail = (previous, trail[:-1]) if verdict.blame_previous else (op, trail)
                book.add(verdict.kind, verdict.evidence, blamed, index, case_trail)
                if verdict.kind == "dm-closed":
                    _reconnect_or_gone(session, book, index, trail)
                if verdict.kind != "not-refused":
                    session.open()
                    trail, previous = [], None
                    continue
            elif isinstance(exc, OSError) and exc.errno in _HANDLE_LOST:
                # Not a failure we caused (someone restarted the device, or a failure of another
                # device quarantined a shared host): a fresh handle, lifting a quarantine, goes on.
                session.open()
                trail, previous = [], None
                continue
            previous = op
    except KeyboardInterrupt:
        report.interrupted = True
        opts.say("interrupted: writing the summary; every case so far is on disk")
    except FuzzStop as stop:
        report.stopped = str(stop)
    finally:
        try:
            session.close(abandon=report.interrupted)
        except OSError:
            pass
    report.elapsed_s = time.monotonic() - started
    report.quarantines_lifted = session.lifted
    report.buckets = [b.to_json() for b in book.buckets.values()]
    summary = book.write_summary(report.to_json())
    report.out_dir = str(summary.parent) if summary else None
    return report


def _check_audit_log(session: _Session, tail: AuditTail, report: Report | None) -> None:
    _, host = session.describe()
    if host is None or host.get("pid") is None or tail.problem:
        return
    foreign = tail.check_host(host["pid"], session.name, session.opts.audit_wait_s)
    if foreign:
        session.opts.say(foreign)
        if report is not None:
            report.audit_note = foreign


def _reconnect_or_gone(session: _Session, book: CaseBook, index: int, trail: list[Op]) -> None:
    try:
        session.reconnect()
    except FuzzStop as stop:
        book.add("dm-gone", Evidence(note=str(stop)), trail[-1] if trail else None, index, trail)
        raise


def _progress_line(device: str, done: int, elapsed: float, book: CaseBook, lifted: int) -> str:
    findings = sum(b.count for b in book.buckets.values())
    lifts = f", {plural(lifted, 'quarantine')} lifted" if lifted else ""
    return (f"fuzz {device} {done} ops, {done / elapsed:.0f} ops/s, {plural(findings, 'finding')} in "
            f"{plural(len(book.buckets), 'bucket')}{lifts}, {elapsed:.0f} s")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _default_out_dir(opts: Options) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return Path(opts.state_dir) / "fuzz" / f"{opts.device.rstrip(':')}-{stamp}-{os.getpid()}"


# -- replay ----------------------------------------------------------------------------------

@dataclass
class ReplayResult:
    reproduced: bool          # the same kind, signal and exit status as the case expects
    kind: str | None          # what happened (None: nothing)
    signal: int | None
    status: int | None
    at: int | None            # the index in the case's ops where it happened
    message: str
    stopped: bool = False     # the replay could not run to its end (no Device Manager, Ctrl-C, ...)


def replay(opts: Options, case: Case) -> ReplayResult:
    """Do the case's operations on a fresh handle and say whether they fail as the case says."""
    session = _Session(opts)
    tail = AuditTail(audit_log_path(opts.state_dir))
    if tail.problem:
        opts.say(tail.problem)
    expect = case.expect
    interrupted = False
    try:
        session.connect()
        device = session.check_device()
        if device["state"] == "quarantined":
            session.lift_quarantine()
        session.open()
        _check_audit_log(session, tail, None)
        verdict, at = Verdict(None), None
        for i, op in enumerate(case.ops):
            if op.kind == "reopen":
                session.open()
                continue
            try:
                session.do(op)
                exc = None
            except (OSError, clientwire.ClientProtocolError) as e:
                exc = e
            verdict = _judge(session, tail, op, exc, None)
            if op.outside and expect["kind"] == "not-refused" and getattr(exc, "errno", None) not in _REFUSALS:
                verdict = Verdict("not-refused", Evidence())
            if verdict.kind is not None:
                at = i
                break
        if verdict.kind is None and expect["kind"] == "died-between":
            # The host died after the last operation answered: it shows as a changed host.
            deadline = time.monotonic() + opts.audit_wait_s
            while verdict.kind is None and time.monotonic() < deadline:
                if session.snapshot() != session.host:
                    verdict = Verdict("died-between", tail.evidence(session.name, session.groups, hang=False,
                                                                    wait_s=opts.audit_wait_s))
                    at = len(case.ops) - 1
                time.sleep(0.05)
    except FuzzStop as stop:
        return ReplayResult(False, None, None, None, None, f"replay stopped: {stop}", stopped=True)
    except KeyboardInterrupt:
        interrupted = True
        return ReplayResult(False, None, None, None, None, "replay stopped: interrupted (Ctrl-C)", stopped=True)
    finally:
        try:
            session.close(abandon=interrupted)
        except OSError:
            pass
    if verdict.kind is None:
        return ReplayResult(False, None, None, None, None,
                            f"does not reproduce: all {len(case.ops)} operations answered without a finding")
    ev = verdict.evidence or Evidence()
    got = (verdict.kind, ev.signal, ev.status)
    want = (expect["kind"], expect.get("signal"), expect.get("status"))
    what = _describe(*got)
    if got == want:
        return ReplayResult(True, *got, at, f"reproduces: {what} at operation {at} ({case.ops[at].label()})")
    return ReplayResult(False, *got, at, f"fails differently: {what} at operation {at} ({case.ops[at].label()}), "
                                         f"the case expects {_describe(*want)}")


def _describe(kind: str, signal: int | None, status: int | None) -> str:
    parts = [kind]
    if signal is not None:
        parts.append(f"signal {signal_name(signal)}")
    if status is not None:
        parts.append(f"exit status {status}")
    return ", ".join(parts)
