"""`drvbox fuzz` without a Device Manager: the generator is deterministic and covers the input
space it promises; codes, policies and case files are read strictly; buckets count; the audit
tail hands out only new records, once each."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os

import pytest

from reflector.cmd_fuzz import Stderr, _again
from reflector.fuzz import FuzzStop, Op, Target, UsageError, generate, parse_codes, target_from_policy
from reflector.fuzz_cases import AuditTail, CaseBook, Evidence, load_case

TARGET = parse_codes("0x00220000,0x00220004-0x0022000C", max_io=256)


def take(seed: int, n: int = 2000, target: Target = TARGET) -> list[Op]:
    return list(itertools.islice(generate(seed, target), n))


def test_same_seed_same_operations():
    assert take(1234) == take(1234)
    assert [op.to_json() for op in take(99, 500)] == [op.to_json() for op in take(99, 500)]


def test_another_seed_other_operations():
    assert take(1, 200) != take(2, 200)


def test_the_operations_cover_what_is_promised():
    ops = take(5, 5000)
    kinds = {op.kind for op in ops}
    assert kinds == {"ioctl", "read", "write", "seek", "reopen"}
    ioctls = [op for op in ops if op.kind == "ioctl"]
    inside = {op.code for op in ioctls if not op.outside}
    assert inside == {0x00220000} | set(range(0x00220004, 0x0022000C + 1))
    outside = [op for op in ioctls if op.outside]
    assert outside and not any(TARGET.allows(op.code) for op in outside)
    sizes = {len(op.data) for op in ioctls} | {op.size for op in ioctls}
    assert {0, 1, 255, 256, 257} <= sizes           # around 0, and MaxIoSize's edges
    assert max(sizes) == 257                         # never more than one past MaxIoSize
    datas = [op.data for op in ioctls if len(op.data) >= 4]
    assert any(set(d) == {0} for d in datas) and any(set(d) == {0xFF} for d in datas)
    # The write-seek-read sequence appears as consecutive operations.
    triples = zip(ops, ops[1:], ops[2:])
    assert any((a.kind, b.kind, c.kind) == ("write", "seek", "read") for a, b, c in triples)


def test_op_json_round_trip():
    for op in take(3, 300):
        assert Op.from_json(op.to_json(), "test") == op


@pytest.mark.parametrize("text, message", [
    ("0x10-0x1", "low-high"),
    ("banana", "is not a code"),
    ("0x100000000", "is not a code"),
    ("", "no IOCTL codes"),
])
def test_bad_codes_are_refused_with_the_value(text, message):
    with pytest.raises(UsageError, match=message):
        parse_codes(text)


def _policy(tmp_path, name="FZZ1:", ioctls=None, signed=True):
    doc = {"driver": {"name": name}, "io": {"ioctls": ioctls or {"ranges": [[0x00220000, 0x00220004]]},
                                            "max_io_size": 512}}
    body = {"payload": base64.b64encode(json.dumps(doc).encode()).decode(), "signatures": []} if signed else doc
    path = tmp_path / f"{name.rstrip(':')}.json"
    path.write_text(json.dumps(body))
    return path


def test_codes_from_a_policy_are_authoritative(tmp_path):
    _policy(tmp_path)
    _policy(tmp_path, name="OTH1:", ioctls={"ranges": [[1, 1]]}, signed=False)
    target = target_from_policy(tmp_path, "fzz1")
    assert target.ranges == ((0x00220000, 0x00220004),) and target.max_io == 512 and target.authoritative
    assert target_from_policy(tmp_path, "OTH1:").ranges == ((1, 1),)
    assert target_from_policy(tmp_path, "NONE1:") is None
    assert not parse_codes("0x1").authoritative


def test_a_policy_that_allows_every_code_asks_for_codes(tmp_path):
    path = _policy(tmp_path, ioctls={"all": True})
    with pytest.raises(UsageError, match="--codes"):
        target_from_policy(path, "FZZ1:")


def test_buckets_count_and_keep_the_shortest_case(tmp_path):
    book = CaseBook(tmp_path / "out", "FZZ1:", 7, "--codes")
    crash = Evidence(signal=11)
    op = Op("ioctl", code=0x00220008, data=b"\xff")
    long_trail = [Op("read", size=4), Op("seek"), op]
    first = book.add("crash", crash, op, 10, long_trail)
    again = book.add("crash", crash, op, 20, [op])
    assert first is again and first.count == 2 and first.trail_len == 1
    other = book.add("crash", Evidence(status=7), Op("read", size=1), 30, [Op("read", size=1)])
    assert other is not first and len(book.buckets) == 2
    case = load_case(first.case)
    assert case.ops == [op] and case.seed == 7 and case.expect["signal"] == 11
    assert json.loads(first.case.read_text())["index"] == 20


@pytest.mark.parametrize("content, message", [
    ("not json", "not JSON"),
    ('{"format": "other"}', "not a drvbox fuzz case"),
    ('{"format": "drvbox.fuzz-case/1", "ops": [], "expect": {"kind": "crash"}}', "non-empty"),
    ('{"format": "drvbox.fuzz-case/1", "ops": [{"op": "ioctl", "code": "0x1", "in": "zz"}], '
     '"expect": {"kind": "crash"}}', r"ops\[0\]: ioctl operation is malformed"),
    ('{"format": "drvbox.fuzz-case/1", "ops": [{"op": "format_disk"}], "expect": {"kind": "crash"}}',
     r"ops\[0\]: expected"),
])
def test_bad_case_files_are_refused_with_the_place(tmp_path, content, message):
    path = tmp_path / "case.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=message) as info:
        load_case(path)
    assert str(path) in str(info.value)


def _record(event, group=1, **detail):
    # Shaped as the Device Manager writes them: the tail drops lines that are not records.
    return json.dumps({"seq": 1, "time": "2026-01-01T00:00:00+00:00", "event": event, "device": None,
                       "driver": None, "group": group, "pid": None, "detail": detail,
                       "prev": "0" * 64, "hash": "0" * 64}) + "\n"


def test_audit_tail_sees_only_new_records_once_each(tmp_path):
    log = tmp_path / "audit.log"
    log.write_text(_record("host.crashed", signal=6))                  # before the run: not ours
    tail = AuditTail(log)
    assert tail.problem is None
    with open(log, "a") as f:
        f.write(_record("host.crashed", group=2, signal=11))              # another group's
        f.write(_record("buffer.violation", offset=1))
        f.write(_record("host.crashed", exit_code=None, signal=9, killed_for="buffer.violation"))
        f.write('{"event": "host.crashed", "group": 1, "detail": {"signal": 4}}\n')   # not a record: skipped
        rest = _record("host.crashed", exit_code=7, signal=None)
        f.write(rest[:40])                                                # half written: later
    ev = tail.evidence("FZZ1:", {1}, hang=False, wait_s=0)
    assert (ev.signal, ev.status, ev.violation) == (9, None, "buffer.violation")
    assert [r["event"] for r in ev.records] == ["buffer.violation", "host.crashed"]
    missing = tail.evidence("FZZ1:", {1}, hang=False, wait_s=0)           # claimed already
    assert missing.signal is None and "no host.crashed record" in missing.note
    with open(log, "a") as f:
        f.write(rest[40:])
    assert tail.evidence("FZZ1:", {1}, hang=False, wait_s=0).status == 7


def test_audit_tail_says_when_it_cannot_read(tmp_path):
    tail = AuditTail(tmp_path / "nowhere" / "audit.log")
    assert "--state-dir" in tail.problem
    assert "cannot read the audit log" in tail.evidence("FZZ1:", {1}, hang=False, wait_s=0).note


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_off_a_terminal_comes_at_most_every_five_seconds():
    now = [100.0]
    err = Stderr(_Stream(tty=False), clock=lambda: now[0])
    for step in range(12):                      # one call a second, as the run makes them
        err.progress(f"p{step}")
        now[0] += 1.0
    assert err.stream.getvalue().split() == ["p0", "p5", "p10"]
    err.note("a note")
    assert err.stream.getvalue().endswith("drvbox fuzz: a note\n") and "\r" not in err.stream.getvalue()


def test_progress_on_a_terminal_is_redrawn_in_place_and_cleared_for_notes():
    err = Stderr(_Stream(tty=True), clock=lambda: 0.0)
    err.progress("p1")
    err.progress("p2")
    err.note("quarantined")
    err.progress("p3")
    err.done()
    assert err.stream.getvalue() == ("\rp1\x1b[K\rp2\x1b[K\r\x1b[Kdrvbox fuzz: quarantined\n"
                                     "\rp3\x1b[K\r\x1b[K")


def test_again_names_what_makes_the_same_operations():
    from reflector.cli import build_parser
    args = build_parser().parse_args(["fuzz", "MY D1:", "--codes", "0x1-0x4", "--time", "30", "--max-io", "64"])
    assert _again(args, "MY D1:", 7) == "drvbox fuzz 'MY D1:' --seed 7 --codes 0x1-0x4 --max-io 64 --time 30"


def test_max_io_past_what_a_policy_may_hold_is_refused():
    from reflector.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fuzz", "COM1:", "--max-io", str((1 << 30) + 1)])
    assert build_parser().parse_args(["fuzz", "COM1:", "--max-io", "0x1000"]).max_io == 4096


def test_audit_tail_tells_another_device_managers_log(tmp_path):
    log = tmp_path / "audit.log"
    started = json.loads(_record("host.started"))
    log.write_text(json.dumps({**started, "pid": 4242}) + "\n")
    tail = AuditTail(log)
    assert tail.check_host(4242, "FZZ1:", wait_s=0) is None and tail.foreign is None
    note = tail.check_host(777, "FZZ1:", wait_s=0)
    assert "pid 777" in note and "--state-dir" in note and str(log) in note
    with open(log, "a") as f:                     # a crash in that log is not evidence about ours
        f.write(_record("host.crashed", signal=11))
    assert tail.evidence("FZZ1:", {1}, hang=False, wait_s=0) == Evidence(note=note)


def test_help_teaches_what_is_sent_what_is_a_finding_exit_statuses_and_an_example():
    from reflector.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command" or getattr(a, "choices", None))
    text = sub.choices["fuzz"].format_help()
    for kind in ("crash", "hang", "buffer.violation", "protocol.violation", "died-between", "not-refused",
                 "dm-closed", "dm-gone"):
        assert kind in text
    assert "MaxIoSize" in text and "read/write/seek" in text and "--state-dir" in text
    assert "exit status" in text and "3 (--replay only)" in text
    assert "examples:" in text and "drvbox fuzz COM1: --time" in text and "--replay" in text


def test_a_policy_file_named_on_its_own_must_be_the_devices(tmp_path):
    other = _policy(tmp_path, name="OTH1:")
    with pytest.raises(UsageError, match=r"policy of OTH1:, not of FZZ1:"):
        target_from_policy(other, "FZZ1:")
    broken = tmp_path / "broken.json"
    broken.write_text("{bad")
    with pytest.raises(UsageError, match="not a drvbox policy .not JSON") as info:
        target_from_policy(broken, "FZZ1:")
    assert str(broken) in str(info.value)
    assert target_from_policy(tmp_path, "FZZ1:") is None     # in a directory, both are passed over


def _locked_out(locked, check) -> int:
    """``check()``'s return value, run by someone who may not search ``locked``: ourselves with the
    directory's mode 0 when not root (root may search anything), else a child dropped to nobody."""
    if os.geteuid() != 0:
        locked.chmod(0)
        try:
            return check()
        finally:
            locked.chmod(0o700)
    pid = os.fork()
    if pid == 0:                                       # the child: never returns into pytest
        code = 7
        try:
            os.setgid(65534)
            os.setuid(65534)
            code = check()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_out_under_a_directory_we_may_not_search_stops_the_run_without_a_traceback(tmp_path):
    # Path.is_dir() raises EACCES there (it only swallows "does not exist"): the summary step must
    # not ask it.
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    book = CaseBook(locked / "sub" / "out", "FZZ1:", 1, "--codes")

    def check() -> int:
        try:
            book.prepare()
            return 3                                   # it should not have been writable
        except FuzzStop as stop:
            if "cannot write case files" not in str(stop) or "--out" not in str(stop):
                return 4
        try:
            return 0 if book.write_summary({}) is None else 5
        except OSError:
            return 6

    assert _locked_out(locked, check) == 0


def test_policies_we_may_not_read_are_named_with_the_fix(tmp_path):
    from reflector.cli import build_parser
    from reflector.cmd_fuzz import _target
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    args = build_parser().parse_args(["--state-dir", str(locked / "state"), "fuzz", "FZZ1:"])
    with_policy = build_parser().parse_args(["fuzz", "FZZ1:", "--policy", str(locked / "pol")])

    def check() -> int:
        for a in (args, with_policy):
            try:
                _target(a, "FZZ1:")
                return 3
            except UsageError as exc:
                if "Permission denied" not in str(exc) or "--codes" not in str(exc) or str(locked) not in str(exc):
                    return 4
            except OSError:
                return 5
        return 0

    assert _locked_out(locked, check) == 0


def test_case_files_are_not_written_through_links_planted_in_out(tmp_path):
    # --out may be a directory others can write: names known in advance must not be followed.
    out = tmp_path / "shared"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    book = CaseBook(out, "FZZ1:", 7, "--codes")
    op = Op("ioctl", code=0x00220008, data=b"\xff")
    planted = ["summary.tmp", "summary.json", ".writable", "case-001-crash-ioctl-00220008.tmp",
               "case-001-crash-ioctl-00220008.json"]
    for name in planted:
        (out / name).symlink_to(victim)
    book.prepare()
    bucket = book.add("crash", Evidence(signal=11), op, 1, [op])
    summary = book.write_summary({"findings": 1})
    assert victim.read_text() == "precious\n"
    assert not bucket.case.is_symlink() and load_case(bucket.case).ops == [op]
    assert not summary.is_symlink() and json.loads(summary.read_text()) == {"findings": 1}
    assert not list(out.glob(".*.tmp"))
