"""The audit log: what it writes, and that every kind of tampering is caught with a precise message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policy.audit import (
    KNOWN_EVENTS,
    AuditError,
    AuditLog,
    load_public_keys,
    read_records,
    stats,
    verify_log,
)
from policy.audit_format import GENESIS_PREV, canonical, checkpoint_message, key_id, record_hash, seal, sign

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "audit.log"


def write_log(path: Path, key, n: int = 10, every: int = 4) -> None:
    with AuditLog(path, key, checkpoint_every=every) as audit:
        for i in range(n):
            audit.record("host.started" if i % 2 else "client.denied", device=f"COM{i % 3}:",
                         driver="serial", group=1, pid=100 + i, detail={"i": i})


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in lines(path)]


def put_lines(path: Path, new: list[bytes]) -> None:
    path.write_bytes(b"".join(new))


def rechain(recs: list[dict]) -> list[bytes]:
    """What an attacker without the key can do: recompute every prev and hash."""
    prev, out = GENESIS_PREV, []
    for i, rec in enumerate(recs, 1):
        rec = dict(rec, seq=i, prev=prev)
        out.append(seal(rec))
        prev = rec["hash"]
    return out


def verify(path: Path, key) -> "object":
    return verify_log(path, [key.public_key()])


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# -- writing ----------------------------------------------------------------------------------------

def test_record_returns_what_it_wrote_and_log_verifies(log_path, key):
    with AuditLog(log_path, key) as audit:
        rec = audit.record("host.crashed", device="COM1:", driver="serial", group=2, pid=42,
                           detail={"signal": 11, "data": b"\x01\xff"})
    assert set(rec) == {"seq", "time", "event", "device", "driver", "group", "pid", "detail", "prev", "hash"}
    assert rec["seq"] == 1 and rec["prev"] == GENESIS_PREV and rec["hash"] == record_hash(rec)
    assert rec["detail"] == {"signal": 11, "data": "01ff"}
    assert records(log_path)[0] == rec
    report = verify(log_path, key)
    assert report.ok, report.problems
    assert (report.records, report.checkpoints, report.last_seq, report.signed_seq) == (2, 1, 2, 2)


def test_log_and_head_are_private_files(log_path, key):
    write_log(log_path, key, n=1)
    assert log_path.stat().st_mode & 0o777 == 0o600
    assert log_path.with_suffix(".head").stat().st_mode & 0o777 == 0o600


def test_checkpoint_every_n_records_and_on_close(log_path, key):
    write_log(log_path, key, n=10, every=4)
    events = [r["event"] for r in records(log_path)]
    assert [i for i, e in enumerate(events, 1) if e == "audit.checkpoint"] == [5, 10, 13]
    assert verify(log_path, key).checkpoints == 3


@pytest.mark.parametrize("event", ["host", "Host.crashed", "host..crashed", "host.crashed ", "1x.y", ""])
def test_record_refuses_malformed_event_name(log_path, key, event):
    with AuditLog(log_path, key) as audit, pytest.raises(ValueError, match="dotted lowercase"):
        audit.record(event)


def test_record_accepts_unknown_dotted_event(log_path, key):
    assert "sensor.overheat" not in KNOWN_EVENTS
    with AuditLog(log_path, key) as audit:
        assert audit.record("sensor.overheat")["event"] == "sensor.overheat"
    assert verify(log_path, key).ok


def test_record_refuses_the_logs_own_events(log_path, key):
    with AuditLog(log_path, key) as audit, pytest.raises(ValueError, match="written by the log itself"):
        audit.record("audit.checkpoint", detail={"seq": 1})


@pytest.mark.parametrize("field,value", [("pid", True), ("group", "1"), ("device", 3), ("detail", [1]),
                                         ("driver", "x" * 2000)])
def test_record_refuses_wrong_types(log_path, key, field, value):
    with AuditLog(log_path, key) as audit, pytest.raises(ValueError, match=f"audit {field}"):
        audit.record("host.started", **{field: value})


def test_known_events_include_design_list():
    assert {"policy.loaded", "policy.rejected", "policy.denied", "syscall.denied", "buffer.violation",
            "protocol.violation", "client.denied", "host.started", "host.crashed", "host.timeout",
            "host.restarted", "driver.quarantined"} <= KNOWN_EVENTS


def test_oversized_detail_is_replaced_by_its_digest(log_path, key):
    with AuditLog(log_path, key) as audit:
        rec = audit.record("protocol.violation", detail={"frame": "x" * 100_000})
    assert rec["detail"]["oversized"] is True and rec["detail"]["bytes"] > 100_000
    assert len(lines(log_path)[0]) < 1000
    assert verify(log_path, key).ok


def test_unserializable_detail_is_recorded_visibly_not_lost(log_path, key):
    with AuditLog(log_path, key) as audit:
        rec = audit.record("host.crashed", detail={"obj": object()})
    assert rec["event"] == "host.crashed" and rec["detail"]["unserializable"] is True
    assert verify(log_path, key).ok


def test_record_after_close_raises(log_path, key):
    audit = AuditLog(log_path, key)
    audit.close()
    audit.close()                       # twice is harmless
    with pytest.raises(AuditError, match="closed"):
        audit.record("host.started")


def test_second_writer_is_refused_and_leaks_no_fd(log_path, key):
    with AuditLog(log_path, key):
        before = fds()
        with pytest.raises(AuditError, match="only one writer"):
            AuditLog(log_path, key)
        assert fds() == before


def test_open_and_close_leak_no_fd(log_path, key):
    before = fds()
    write_log(log_path, key, n=3)
    assert fds() == before


def test_log_fd_is_append_only_and_close_on_exec(log_path, key):
    with AuditLog(log_path, key):
        def target(fd: str) -> str:
            try:
                return os.readlink(f"/proc/self/fd/{fd}")
            except FileNotFoundError:          # the fd listdir itself used
                return ""
        mine = [fd for fd in os.listdir("/proc/self/fd") if target(fd) == str(log_path)]
        assert len(mine) == 1
        flags = int(Path(f"/proc/self/fdinfo/{mine[0]}").read_text().split("flags:")[1].split()[0], 8)
    assert flags & os.O_APPEND and flags & os.O_CLOEXEC and flags & os.O_ACCMODE == os.O_WRONLY


def test_refused_open_of_a_tampered_log_leaks_no_fd(log_path, key):
    write_log(log_path, key, n=3)
    put_lines(log_path, lines(log_path)[:-1])
    before = fds()
    with pytest.raises(AuditError, match="truncation"):
        AuditLog(log_path, key)
    assert fds() == before


def test_head_is_replaced_atomically_leaving_no_temporary(log_path, key):
    write_log(log_path, key, n=3)
    assert sorted(p.name for p in log_path.parent.iterdir()) == ["audit.head", "audit.log"]


def test_checkpoint_every_must_be_positive(log_path, key):
    with pytest.raises(ValueError, match="checkpoint_every must be at least 1, not 0"):
        AuditLog(log_path, key, checkpoint_every=0)


def test_violation_is_fsynced_and_signed_in_head_before_record_returns(log_path, key):
    with AuditLog(log_path, key) as audit:
        audit.record("host.started")
        rec = audit.record("syscall.denied", detail={"name": "socket", "args": [2, 1, 0]})
        head = json.loads(log_path.with_suffix(".head").read_bytes())
        assert (head["seq"], head["hash"]) == (rec["seq"], rec["hash"])


def test_timer_thread_syncs_ordinary_records(log_path, key):
    with AuditLog(log_path, key) as audit:
        rec = audit.record("host.started")
        head_file = log_path.with_suffix(".head")
        deadline = time.monotonic() + 30          # liveness, not a speed threshold
        while time.monotonic() < deadline:
            if head_file.exists() and json.loads(head_file.read_bytes())["seq"] == rec["seq"]:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the sync timer never wrote the head")


def test_concurrent_writers_produce_one_valid_chain(log_path, key):
    threads, per_thread = 16, 150
    with AuditLog(log_path, key, checkpoint_every=50) as audit:
        def work(t: int) -> None:
            for i in range(per_thread):
                audit.record("client.denied" if i % 7 == 0 else "host.started", pid=t, detail={"i": i})
        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    report = verify(log_path, key)
    assert report.ok, report.problems[:5]
    recs = records(log_path)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    assert sum(r["event"] != "audit.checkpoint" for r in recs) == threads * per_thread


# -- across restarts and crashes --------------------------------------------------------------------

def test_chain_continues_across_close_and_reopen(log_path, key):
    write_log(log_path, key, n=3)
    last = records(log_path)[-1]
    with AuditLog(log_path, key) as audit:
        rec = audit.record("host.restarted")
    assert rec["seq"] == last["seq"] + 1 and rec["prev"] == last["hash"]
    assert verify(log_path, key).ok


CRASH = """
import os, sys
from cryptography.hazmat.primitives import serialization
from policy.audit import AuditLog
key = serialization.load_pem_private_key(open(sys.argv[2], "rb").read(), None)
audit = AuditLog(sys.argv[1], key, checkpoint_every=1000)
for i in range(5):
    audit.record("host.started", pid=i)
audit.record("host.crashed", detail={"signal": 9})     # fsync'd and signed in the head at once
audit.record("host.restarted")                            # written, not yet fsync'd
os._exit(1)                                               # the Device Manager dies: no close
"""


def crash_writer(log_path: Path, key, tmp_path: Path) -> None:
    pem = tmp_path / "k.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", CRASH, str(log_path), str(pem)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr


def test_crash_keeps_every_written_record_and_chain_continues(log_path, key, tmp_path):
    crash_writer(log_path, key, tmp_path)
    assert [r["seq"] for r in records(log_path)] == [1, 2, 3, 4, 5, 6, 7]
    report = verify(log_path, key)
    assert report.ok, report.problems
    assert report.signed_seq == 6 and any("seq 7..7 (1 record)" in n for n in report.notes)
    with AuditLog(log_path, key) as audit:
        assert audit.record("host.started")["seq"] == 8
    assert verify(log_path, key).ok


def test_torn_last_line_is_reported_then_recovered_by_a_record_that_says_so(log_path, key, tmp_path):
    crash_writer(log_path, key, tmp_path)
    torn = b'{"detail":{},"device":"COM1:","dri'
    with open(log_path, "ab") as f:
        f.write(torn)
    report = verify(log_path, key)
    assert not report.ok
    assert report.problems == ["line 8: no newline at the end: a record cut mid-line "
                               "(a crash while writing it, or the log was truncated here)"]

    with AuditLog(log_path, key) as audit:
        after = audit.record("host.started")
    recs = [json.loads(x) for x in lines(log_path) if x.startswith(b"{") and x != torn + b"\n"]
    recovered = [r for r in recs if r["event"] == "audit.recovered"]
    assert len(recovered) == 1
    assert recovered[0]["seq"] == 8 and recovered[0]["prev"] == recs[6]["hash"]
    assert recovered[0]["detail"]["bytes"] == len(torn) and after["seq"] == 9
    report = verify(log_path, key)
    assert report.ok, report.problems
    assert report.notes[0].startswith(f"line 8: torn by a crash ({len(torn)} bytes), acknowledged")


def test_record_that_lost_only_its_newline_is_kept_and_acknowledged(log_path, key, tmp_path):
    crash_writer(log_path, key, tmp_path)
    last = records(log_path)[-1]
    whole = seal(dict(last, seq=last["seq"] + 1, prev=last["hash"], event="host.started"))
    with open(log_path, "ab") as f:
        f.write(whole[:-1])                      # everything but the newline reached the disk
    assert verify(log_path, key).problems[0].startswith("line 8: no newline at the end")
    with AuditLog(log_path, key) as audit:
        assert audit.record("host.started")["seq"] == 10
    recs = records(log_path)
    assert recs[7]["seq"] == 8 and recs[8]["event"] == "audit.recovered"
    assert recs[8]["detail"]["restored"] is True and recs[8]["detail"]["seq"] == 8
    report = verify(log_path, key)
    assert report.ok, report.problems
    assert report.notes[0].startswith("line 8: a record whose newline was lost in a crash, kept")


def test_restored_record_acknowledgement_cannot_cover_an_edit(log_path, key, tmp_path):
    crash_writer(log_path, key, tmp_path)
    last = records(log_path)[-1]
    whole = seal(dict(last, seq=last["seq"] + 1, prev=last["hash"], event="host.started"))
    with open(log_path, "ab") as f:
        f.write(whole[:-1])
    AuditLog(log_path, key).close()
    data = lines(log_path)
    edited = json.loads(data[7])
    edited["event"] = "host.timeout"                 # change the kept record, re-seal it and rechain
    put_lines(log_path, rechain([json.loads(x) for x in data[:7]] + [edited] + [json.loads(x) for x in data[8:]]))
    problems = verify(log_path, key).problems
    assert problems[0].startswith("line 9: seq 9: audit.recovered names a torn line that is not right before it")


def test_whole_log_torn_before_first_newline_is_recovered(log_path, key):
    log_path.parent.mkdir(parents=True)
    log_path.write_bytes(b'{"detail":')
    with AuditLog(log_path, key) as audit:
        assert audit.record("host.started")["seq"] == 2
    report = verify(log_path, key)
    assert report.ok, report.problems


def test_torn_line_removed_after_recovery_is_detected(log_path, key, tmp_path):
    crash_writer(log_path, key, tmp_path)
    with open(log_path, "ab") as f:
        f.write(b'{"det')
    AuditLog(log_path, key).close()
    put_lines(log_path, [x for x in lines(log_path) if x != b'{"det\n'])
    report = verify(log_path, key)
    assert "line 8: seq 8: audit.recovered names a torn line that is not right before it" in report.problems[0]


def test_short_write_on_full_disk_is_recovered_on_next_record(log_path, key):
    # RLIMIT_FSIZE makes the kernel cut a write short and then refuse with EFBIG: a real full disk.
    code = """
import errno, resource, signal, sys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from policy.audit import AuditLog, verify_log
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
key = Ed25519PrivateKey.generate()
audit = AuditLog(sys.argv[1], key)
audit.record("host.started")
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
import os
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(sys.argv[1]) + 40, hard))
try:
    audit.record("host.crashed", detail={"signal": 11})
except OSError as exc:
    assert exc.errno == errno.EFBIG, exc
else:
    raise SystemExit("the write was not cut short")
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
rec = audit.record("host.restarted")
audit.close()
report = verify_log(sys.argv[1], [key.public_key()])
assert report.ok, report.problems
assert rec["seq"] == 3, rec
print(report.notes[0])
"""
    log_path.parent.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-c", code, str(log_path)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("line 2: torn by a crash (40 bytes)")
    assert [json.loads(x)["event"] for x in lines(log_path) if x.startswith(b"{") and x.endswith(b"}\n")][1:3] \
        == ["audit.recovered", "host.restarted"]


def test_open_refuses_a_log_whose_last_line_was_edited(log_path, key):
    write_log(log_path, key, n=3)
    data = lines(log_path)
    data[-1] = data[-1].replace(b'"event":"audit.checkpoint"', b'"event":"audit.checkpoinT"')
    put_lines(log_path, data)
    with pytest.raises(AuditError, match=r"audit\.log \(seq \d+\): last record does not check: bytes|"
                                         r"last record does not check"):
        AuditLog(log_path, key)


def test_open_refuses_a_log_shorter_than_its_head(log_path, key):
    write_log(log_path, key, n=5)
    put_lines(log_path, lines(log_path)[:-2])
    with pytest.raises(AuditError) as err:
        AuditLog(log_path, key)
    assert "the log ends at seq 5 but audit.head says seq 7 was written and fsync'd" in str(err.value)
    assert err.value.seq == 5 and "truncation" in err.value.reason


# -- tampering, each detected with a precise message ------------------------------------------------

def test_every_one_byte_edit_is_detected_on_its_line(log_path, key):
    write_log(log_path, key, n=4, every=2)
    original = log_path.read_bytes()
    line_of = [original.count(b"\n", 0, i) + 1 for i in range(len(original))]
    for i in range(len(original)):
        edited = bytearray(original)
        edited[i] ^= 0x01
        log_path.write_bytes(bytes(edited))
        report = verify(log_path, key)
        assert not report.ok, f"edit at byte {i} went unnoticed"
        assert report.problems[0].startswith(f"line {line_of[i]}: "), (i, report.problems)
    log_path.write_bytes(original)
    assert verify(log_path, key).ok


def test_edit_of_a_field_says_the_record_was_edited(log_path, key):
    write_log(log_path, key, n=4)
    data = lines(log_path)
    data[2] = data[2].replace(b'"pid":102', b'"pid":999')
    put_lines(log_path, data)
    assert verify(log_path, key).problems == [
        "line 3: seq 3: hash does not match the record's contents: the record was edited"]


def test_non_canonical_whitespace_is_an_edit(log_path, key):
    write_log(log_path, key, n=2)
    data = lines(log_path)
    data[0] = data[0].replace(b'"seq":1', b'"seq": 1')
    put_lines(log_path, data)
    assert verify(log_path, key).problems == [
        "line 1: seq 1: bytes differ from the record's canonical form: the line was edited"]


def test_deleted_line_is_detected(log_path, key):
    write_log(log_path, key, n=6)
    data = lines(log_path)
    del data[2]
    put_lines(log_path, data)
    assert verify(log_path, key).problems == ["line 3: seq 4: follows seq 2: seq 3 missing here (deleted, or moved elsewhere)"]


def test_two_swapped_lines_are_detected(log_path, key):
    write_log(log_path, key, n=6)
    data = lines(log_path)
    data[1], data[2] = data[2], data[1]
    put_lines(log_path, data)
    assert verify(log_path, key).problems == [
        "line 2: seq 3: follows seq 1: seq 2 missing here (deleted, or moved elsewhere)",
        "line 3: seq 2: comes after seq 3: records out of order or repeated",
    ]


def test_truncated_tail_of_whole_lines_is_detected(log_path, key):
    write_log(log_path, key, n=6, every=4)          # 6 records + checkpoints at 5 and 8: 8 lines
    put_lines(log_path, lines(log_path)[:-3])
    report = verify(log_path, key)
    assert report.problems == ["the log ends at seq 5 (line 5) but audit.head (signed) says seq 8 was "
                               "written: seq 6..8 are missing -- the log was truncated"]


def test_truncated_tail_mid_line_is_detected(log_path, key):
    write_log(log_path, key, n=6, every=4)
    log_path.write_bytes(log_path.read_bytes()[:-30])
    assert verify(log_path, key).problems == [
        "line 8: no newline at the end: a record cut mid-line (a crash while writing it, or the log was "
        "truncated here)",
        "the log ends at seq 7 (line 7) but audit.head (signed) says seq 8 was written: seq 8..8 are "
        "missing -- the log was truncated",
    ]


def test_emptied_and_deleted_log_are_detected(log_path, key):
    write_log(log_path, key, n=2)
    log_path.write_bytes(b"")
    assert "says seq 3 was written: seq 1..3 are missing" in verify(log_path, key).problems[0]
    log_path.unlink()
    assert verify(log_path, key).problems == [
        f"no audit log at {log_path} although audit.head says it held seq 3: it was deleted"]


def test_forged_checkpoint_with_the_right_keyid_is_detected(log_path, key):
    write_log(log_path, key, n=6, every=4)
    recs = records(log_path)
    cp = recs[4]
    assert cp["event"] == "audit.checkpoint"
    forged = sign(Ed25519PrivateKey.generate(), checkpoint_message(cp["detail"]["seq"], cp["detail"]["hash"]))
    cp["detail"]["sig"] = forged["sig"]                # keep the trusted keyid, use another key
    put_lines(log_path, rechain(recs))
    problems = verify(log_path, key).problems
    assert problems[0] == f"line 5: seq 5: checkpoint signature by key {key_id(key)} does not verify (forged or altered)"


def test_checkpoint_by_an_untrusted_key_is_detected(log_path, key):
    write_log(log_path, key, n=6, every=4)
    recs = records(log_path)
    other = Ed25519PrivateKey.generate()
    recs[4]["detail"].update(sign(other, checkpoint_message(recs[4]["detail"]["seq"], recs[4]["detail"]["hash"])))
    put_lines(log_path, rechain(recs))
    assert verify(log_path, key).problems[0] == (
        f"line 5: seq 5: checkpoint signed by key {key_id(other)}, which is not among the trusted keys ({key_id(key)})")


def test_rechained_log_without_the_key_is_detected(log_path, key):
    write_log(log_path, key, n=6, every=4)
    recs = records(log_path)
    recs[1]["detail"] = {"i": "nothing happened"}
    put_lines(log_path, rechain(recs))
    problems = verify(log_path, key).problems
    assert problems[0].startswith("line 5: seq 5: checkpoint signs seq 4 hash ")
    assert problems[0].endswith("forged or moved")
    assert problems[-1].startswith("seq 8 in the log is not the record audit.head signed")


def test_rechained_log_with_checkpoints_and_head_removed_is_detected(log_path, key):
    write_log(log_path, key, n=6, every=4)
    recs = [r for r in records(log_path) if r["event"] != "audit.checkpoint"]
    recs[1]["detail"] = {"i": "nothing happened"}
    put_lines(log_path, rechain(recs))
    log_path.with_suffix(".head").unlink()
    assert verify(log_path, key).problems == [
        "audit.head is missing: the end of the log is not signed, so records cut from the tail could not be noticed"]


def test_violation_appended_after_the_last_signature_is_detected(log_path, key):
    write_log(log_path, key, n=3)
    recs = records(log_path)
    recs.append(dict(recs[0], event="policy.denied", device="COM9:", detail={"framed": True}))
    put_lines(log_path, rechain(recs))
    assert verify(log_path, key).problems == [
        "line 5: seq 5: policy.denied is covered by no signature although violations are signed as soon as "
        "they are written: it was appended afterwards (or the Device Manager died in that instant)"]


def test_ordinary_record_appended_after_the_last_signature_is_only_a_note(log_path, key):
    # Indistinguishable from the second before a crash: reported, not failed (see policy.audit).
    write_log(log_path, key, n=3)
    recs = records(log_path)
    recs.append(dict(recs[0], event="host.started"))
    put_lines(log_path, rechain(recs))
    report = verify(log_path, key)
    assert report.ok and report.signed_seq == 4
    assert report.notes == ["seq 5..5 (1 record) were written after the last signature (a crash before the "
                            "next fsync); whole lines cut from there would not be noticed"]


def test_forged_head_is_detected(log_path, key):
    write_log(log_path, key, n=3)
    head_file = log_path.with_suffix(".head")
    head = json.loads(head_file.read_bytes())
    head["seq"] += 5
    head_file.write_bytes(canonical(head))
    assert verify(log_path, key).problems == [
        f"audit.head: signature by key {key_id(key)} does not verify (forged or altered)"]


def test_unsigned_log_does_not_verify(log_path, key):
    write_log(log_path, None, n=3)
    report = verify(log_path, key)
    assert report.problems == ["audit.head is not signed: the log was written without a signing key, so "
                               "re-chaining and truncation cannot be ruled out"]
    assert report.signed_seq == 0 and report.checkpoints == 0


def test_verify_without_keys_is_not_ok(log_path, key):
    write_log(log_path, key, n=2)
    report = verify_log(log_path, [])
    assert not report.ok and report.problems[0].startswith("no public key to check against")


def test_key_rotation_verifies_with_both_keys(log_path, key):
    write_log(log_path, key, n=2)
    new = Ed25519PrivateKey.generate()
    write_log(log_path, new, n=2)
    assert verify_log(log_path, [key.public_key(), new.public_key()]).ok
    assert not verify_log(log_path, [new.public_key()]).ok


def test_load_public_keys_reads_pub_files_and_refuses_garbage(tmp_path, key):
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "dev.pub").write_bytes(pub)
    (tmp_path / "notes.txt").write_text("ignored: not *.pub")
    assert [key_id(k) for k in load_public_keys(tmp_path)] == [key_id(key)]
    (tmp_path / "bad.pub").write_text("not a key")
    with pytest.raises(AuditError, match=r"bad\.pub: not a PEM public key"):
        load_public_keys(tmp_path)


# -- reading ----------------------------------------------------------------------------------------

def filled(log_path: Path, key) -> Path:
    with AuditLog(log_path, key) as audit:
        audit.record("host.started", device="COM1:", group=1, pid=10)
        audit.record("host.crashed", device="COM1:", group=1, pid=10, detail={"signal": 11})
        audit.record("host.restarted", device="COM1:", group=1, pid=11)
        audit.record("client.denied", device="DSK1:", detail={"uid": 1000})
        audit.record("hostile.thing", device="GIO1:")
    return log_path


def test_read_records_event_exact_and_prefix(log_path, key):
    filled(log_path, key)
    assert [r["event"] for r in read_records(log_path, event="host.crashed")] == ["host.crashed"]
    assert [r["event"] for r in read_records(log_path, event="host.")] == ["host.started", "host.crashed", "host.restarted"]
    assert [r["event"] for r in read_records(log_path, event="host")] == ["host.started", "host.crashed", "host.restarted"]
    assert list(read_records(log_path, event="host.crash")) == []


def test_read_records_device_with_or_without_colon(log_path, key):
    filled(log_path, key)
    assert [r["seq"] for r in read_records(log_path, device="DSK1:")] == [4]
    assert [r["seq"] for r in read_records(log_path, device="com1")] == [1, 2, 3]
    assert [r["seq"] for r in read_records(log_path, device="COM1:", event="host.restarted")] == [3]


def test_read_records_since(log_path, key):
    filled(log_path, key)
    third = records(log_path)[2]
    at = datetime.fromisoformat(third["time"])
    assert [r["seq"] for r in read_records(log_path, since=at)] == [3, 4, 5, 6]
    assert list(read_records(log_path, since=datetime.now(timezone.utc) + timedelta(hours=1))) == []
    naive_utc = at.astimezone(timezone.utc).replace(tzinfo=None)
    assert [r["seq"] for r in read_records(log_path, since=naive_utc)] == [3, 4, 5, 6]


def test_read_records_skips_lines_that_are_not_records(log_path, key):
    filled(log_path, key)
    with open(log_path, "ab") as f:
        f.write(b"garbage\n{\"torn")
    assert len(list(read_records(log_path))) == 6


def test_stats(log_path, key):
    filled(log_path, key)
    with open(log_path, "ab") as f:
        f.write(b"garbage\n")
    s = stats(log_path)
    recs = [json.loads(x) for x in lines(log_path)[:-1]]
    assert s == {"records": 6, "unreadable": 1,
                 "events": {"audit.checkpoint": 1, "client.denied": 1, "host.crashed": 1, "host.restarted": 1,
                            "host.started": 1, "hostile.thing": 1},
                 "devices": {"COM1:": 3, "DSK1:": 1, "GIO1:": 1},
                 "first": recs[0]["time"], "last": recs[-1]["time"]}
