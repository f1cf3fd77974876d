"""Reading the audit log to answer questions: which records, how many of each.

These functions *read*; they do not vouch for what they read (``policy.audit_verify`` does that).
A line that is not a well-formed record is not dropped in silence: ``iter_lines`` yields it with
the reason, ``stats`` counts it, and `drvbox audit show` says how many it skipped.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, NamedTuple

from policy.audit_format import check_shape


class Line(NamedTuple):
    number: int               # 1-based
    record: dict | None       # None when the line is not a well-formed record
    problem: str | None       # why not, when record is None


def iter_lines(path: Path) -> Iterator[Line]:
    """Every line of the log, parsed and shape-checked (hashes are verify's business)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                yield Line(number, None, "no newline at the end: a record cut mid-line")
                continue
            try:
                rec = json.loads(raw)
            except ValueError as exc:
                yield Line(number, None, f"not valid JSON ({exc})")
                continue
            problem = check_shape(rec)
            yield Line(number, None if problem else rec, problem)


def _event_matches(event: str, wanted: str) -> bool:
    # "host.crashed" matches itself; "host" and "host." match every "host.*".
    prefix = wanted.rstrip(".")
    return event == wanted or event.startswith(prefix + ".")


def _device_key(name: str) -> str:
    # Device names are case-insensitive on CE, and people type "COM1" for "COM1:".
    return name.rstrip(":").casefold()


def parse_time(value: str) -> datetime:
    """A record's ``time`` as an aware datetime (UTC)."""
    return datetime.fromisoformat(value).astimezone(timezone.utc)


def matches(rec: dict, event: str | None = None, device: str | None = None,
            since: datetime | None = None) -> bool:
    """Whether a well-formed record passes the filters of ``read_records``."""
    if event is not None and not _event_matches(rec["event"], event):
        return False
    if device is not None and (rec["device"] is None or _device_key(rec["device"]) != _device_key(device)):
        return False
    if since is not None:
        if since.tzinfo is None:
            since = since.replace(tzinfo=timezone.utc)
        try:
            return parse_time(rec["time"]) >= since
        except ValueError:
            return False          # a time we cannot read cannot be shown to be after `since`
    return True


def read_records(path: Path, event: str | None = None, device: str | None = None,
                 since: datetime | None = None) -> Iterator[dict]:
    """Well-formed records of the log, in order, matching every filter given.

    ``event``: an exact name, or a prefix such as ``"host."`` (or ``"host"``).  ``device``:
    ``"COM1:"`` or ``"COM1"``, case-insensitive.  ``since``: records at or after it; a naive
    datetime is taken as UTC.  Lines that are not records are skipped (see ``iter_lines``).
    """
    for line in iter_lines(path):
        if line.record is not None and matches(line.record, event, device, since):
            yield line.record


def stats(path: Path) -> dict:
    """``{"records", "unreadable", "events": {name: n}, "devices": {name: n}, "first", "last"}``.

    ``first``/``last`` are the ``time`` of the first and last record (None for an empty log).
    Counts are sorted by name so the output is stable.
    """
    events: dict[str, int] = {}
    devices: dict[str, int] = {}
    records = unreadable = 0
    first = last = None
    for line in iter_lines(path):
        rec = line.record
        if rec is None:
            unreadable += 1
            continue
        records += 1
        events[rec["event"]] = events.get(rec["event"], 0) + 1
        if rec["device"] is not None:
            devices[rec["device"]] = devices.get(rec["device"], 0) + 1
        first = first or rec["time"]
        last = rec["time"]
    return {"records": records, "unreadable": unreadable,
            "events": dict(sorted(events.items())), "devices": dict(sorted(devices.items())),
            "first": first, "last": last}


def read_from(path: Path, offset: int) -> tuple[list[Line], int]:
    """The complete lines of the log from byte ``offset`` on, parsed as ``iter_lines`` parses
    them, and the offset to go on from next time.

    For a reader that follows the log while the Device Manager writes it (``drvbox fuzz``): a last
    line without its newline is a record still being written, not a cut one, so it is left for the
    next call instead of being reported.  ``number`` counts from 1 at ``offset``.
    """
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    lines = []
    for number, raw in enumerate(complete.split(b"\n")[:-1], 1):
        try:
            rec = json.loads(raw)
        except ValueError as exc:
            lines.append(Line(number, None, f"not valid JSON ({exc})"))
            continue
        problem = check_shape(rec)
        lines.append(Line(number, None if problem else rec, problem))
    return lines, offset + len(complete)
