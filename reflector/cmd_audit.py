"""``drvbox audit show|verify|stats``: read and check the Device Manager's audit log.

Exit status: 0 success (for ``verify``: the log is intact), 1 when the log is missing or does not
verify, 2 for a command line or trust directory that cannot be used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

_HELP = """\
The audit log is <state dir>/audit.log: one JSON record per event (denials, violations, crashes,
restarts, rejected policies), chained by SHA-256 and signed at checkpoints and in audit.head.

  drvbox audit show --event host. --since 1h     what happened to hosts in the last hour
  drvbox audit verify                            exit 0 only if nothing was edited, removed or cut
  drvbox audit stats                             counts per event and per device"""

_RELATIVE = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``10m``, ``2h``, ``1d`` (ago), or an ISO time; an ISO time without a zone is local time."""
    m = _RELATIVE.fullmatch(text.strip())
    if m:
        now = now or datetime.now(timezone.utc)
        return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO time (2026-01-31T12:00, 2026-01-31 12:00:00Z) nor a relative "
            f"time (30s, 10m, 2h, 1d, 1w)") from None
    return when if when.tzinfo is not None else when.astimezone()


def register(subparsers) -> None:
    audit = subparsers.add_parser("audit", help="show, verify and count the audit log", description=_HELP,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = audit.add_subparsers(dest="audit_verb", metavar="ACTION")
    audit.set_defaults(func=lambda args: _usage(audit))

    def log_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--log", type=Path, metavar="FILE",
                       help="the log to read (default: <state dir>/audit.log); its head is FILE with suffix .head")

    show = sub.add_parser("show", help="print records, optionally filtered",
                          description="Print the records of the audit log, oldest first, one aligned line each.")
    show.add_argument("--event", metavar="E", help="an event (host.crashed) or a prefix (host. or host)")
    show.add_argument("--device", metavar="D", help="a device, e.g. COM1: (the colon and case do not matter)")
    show.add_argument("--since", metavar="T", type=parse_since,
                      help="records at or after T: an ISO time (local unless it has a zone) or 30s, 10m, 2h, 1d, 1w ago")
    show.add_argument("--json", action="store_true", help="print each record as one JSON line")
    log_option(show)
    show.set_defaults(func=cmd_show)

    verify = sub.add_parser("verify", help="check that nothing was edited, removed, reordered or cut",
                            description="Check every record's hash and link, every checkpoint's signature, and "
                                        "the signed head.  Exit 0 only when the log is intact.")
    verify.add_argument("--trust", type=Path, metavar="DIR",
                        help="directory of *.pub keys the log may be signed with (default: <state dir>/keys)")
    verify.add_argument("--json", action="store_true", help="print the report as one JSON object")
    log_option(verify)
    verify.set_defaults(func=cmd_verify)

    stats = sub.add_parser("stats", help="counts per event and per device, first and last time",
                           description="Count the records of the audit log per event and per device.")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    log_option(stats)
    stats.set_defaults(func=cmd_stats)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _log_path(args) -> Path:
    from reflector.paths import audit_log_path
    return args.log if args.log is not None else audit_log_path(args.state_dir)


def _missing(args, path: Path) -> int:
    print(f"drvbox audit {args.audit_verb}: no audit log at {path} (the Device Manager creates it on its "
          f"first run; use --state-dir or --log to read another)", file=sys.stderr)
    return 1


# -- show -------------------------------------------------------------------------------------------

def cmd_show(args) -> int:
    from policy.audit_query import iter_lines, matches

    path = _log_path(args)
    if not path.exists():
        return _missing(args, path)
    rows: list[tuple[str, ...]] = []
    skipped = 0
    for line in iter_lines(path):
        rec = line.record
        if rec is None:
            skipped += 1
            continue
        if not matches(rec, args.event, args.device, args.since):
            continue
        if args.json:
            print(json.dumps(rec, sort_keys=True, separators=(",", ":")))
        else:
            rows.append(_row(rec))
    if not args.json:
        _print_aligned(rows)
    if skipped:
        print(f"drvbox audit show: {skipped} line{'s' * (skipped != 1)} of {path} are not records and were "
              f"skipped; run `drvbox audit verify` to see why", file=sys.stderr)
    return 0


_HEADER = ("SEQ", "TIME", "EVENT", "DEVICE", "DRIVER", "GROUP", "PID", "DETAIL")


def _row(rec: dict) -> tuple[str, ...]:
    def dash(value) -> str:
        return "-" if value is None else str(value)
    return (str(rec["seq"]), _short_time(rec["time"]), rec["event"], dash(rec["device"]), dash(rec["driver"]),
            dash(rec["group"]), dash(rec["pid"]), _detail_text(rec))


def _short_time(text: str) -> str:
    # Millisecond precision, UTC, as recorded: a reader compares lines, not microseconds.
    try:
        when = datetime.fromisoformat(text).astimezone(timezone.utc)
    except ValueError:
        return text
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _detail_text(rec: dict) -> str:
    detail = rec["detail"]
    if rec["event"] == "audit.checkpoint":
        return f"signs seq {detail.get('seq')} (key {str(detail.get('keyid'))[:16]})"
    return " ".join(f"{k}={v if isinstance(v, str) and v and ' ' not in v else json.dumps(v)}"
                    for k, v in detail.items())


def _print_aligned(rows: list[tuple[str, ...]]) -> None:
    if not rows:
        return
    table = [_HEADER, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(_HEADER) - 1)]
    for r in table:
        cells = [c.rjust(w) if i in (0, 5, 6) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        print("  ".join(cells + [r[-1]]).rstrip())


# -- verify -----------------------------------------------------------------------------------------

def cmd_verify(args) -> int:
    from policy.audit import AuditError, load_public_keys, verify_log

    path = _log_path(args)
    trust = args.trust if args.trust is not None else Path(args.state_dir) / "keys"
    if not trust.is_dir():
        print(f"drvbox audit verify: trust directory {trust} does not exist; pass --trust DIR with the "
              f"*.pub key the Device Manager signs its audit log with", file=sys.stderr)
        return 2
    try:
        keys = load_public_keys(trust)
    except (AuditError, OSError) as exc:
        print(f"drvbox audit verify: {exc}", file=sys.stderr)
        return 2
    report = verify_log(path, keys)
    if args.json:
        print(json.dumps({"log": str(path), **dataclasses.asdict(report)}, indent=1))
        return 0 if report.ok else 1
    summary = (f"{_plural(report.records, 'record')}, {_plural(report.checkpoints, 'checkpoint')}, "
               f"last seq {report.last_seq}, signed up to seq {report.signed_seq}")
    if report.ok:
        print(f"{path}: intact: {summary}")
    else:
        print(f"{path}: NOT intact, {_plural(len(report.problems), 'problem')} ({summary}):")
        for problem in report.problems:
            print(f"  {problem}")
    for note in report.notes:
        print(f"  note: {note}")
    return 0 if report.ok else 1


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


# -- stats ------------------------------------------------------------------------------------------

def cmd_stats(args) -> int:
    from policy.audit import stats

    path = _log_path(args)
    if not path.exists():
        return _missing(args, path)
    s = stats(path)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"{s['records']} records from {s['first'] or '-'} to {s['last'] or '-'}"
          + (f", {s['unreadable']} unreadable lines" if s["unreadable"] else ""))
    for title, counts in (("EVENT", s["events"]), ("DEVICE", s["devices"])):
        if counts:
            width = max(len(title), *(len(k) for k in counts))
            print()
            print(f"{title:<{width}}  COUNT")
            for name, n in counts.items():
                print(f"{name:<{width}}  {n:>5}")
    return 0
