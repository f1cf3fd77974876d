"""policy.audit_query.read_from: following a log while it is written -- only complete lines, each
once, parsed and shape-checked as `drvbox audit show` parses them."""

from __future__ import annotations

import json

from policy.audit_query import read_from


def _line(seq: int, event: str = "host.crashed") -> bytes:
    return json.dumps({"seq": seq, "time": "2026-01-01T00:00:00+00:00", "event": event, "device": "FZZ1:",
                       "driver": None, "group": 1, "pid": None, "detail": {}, "prev": "0" * 64,
                       "hash": "0" * 64}).encode() + b"\n"


def test_read_from_returns_complete_lines_once_and_leaves_a_partial_one(tmp_path):
    log = tmp_path / "audit.log"
    first, second = _line(1), _line(2, "host.started")
    log.write_bytes(first + second[:30])
    lines, offset = read_from(log, 0)
    assert [line.record["seq"] for line in lines] == [1] and offset == len(first)
    assert read_from(log, offset) == ([], offset)            # the half-written record waits
    with open(log, "ab") as f:
        f.write(second[30:] + b'{"seq": 3}\n' + b"not json\n")
    lines, end = read_from(log, offset)
    assert end == log.stat().st_size
    assert lines[0].record["event"] == "host.started" and lines[0].number == 1
    assert lines[1].record is None and "wrong keys" in lines[1].problem
    assert lines[2].record is None and "not valid JSON" in lines[2].problem
