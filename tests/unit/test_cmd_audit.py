"""`drvbox audit show|verify|stats`: filters, output, and exit status on intact and tampered logs."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policy.audit import AuditLog
from reflector import cmd_audit


def run(argv: list[str], state: Path) -> int:
    parser = argparse.ArgumentParser(prog="drvbox")
    cmd_audit.register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(argv)
    args.state_dir = state
    return args.func(args)


def write_pub(key, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "audit.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def state(tmp_path: Path, key) -> Path:
    state = tmp_path / "state"
    write_pub(key, state / "keys")
    with AuditLog(state / "audit.log", key) as audit:
        audit.record("host.started", device="COM1:", driver="uart16550", group=1, pid=4242,
                     detail={"drivers": ["COM1:"]})
        audit.record("host.crashed", device="COM1:", driver="uart16550", group=1, pid=4242,
                     detail={"signal": 11, "reason": "SIGSEGV in io_control"})
        audit.record("client.denied", device="DSK1:", detail={"uid": 1000})
        audit.record("host.restarted", device="COM1:", driver="uart16550", group=1, pid=4300)
    return state


def shown_seqs(out: str) -> list[int]:
    return [json.loads(line)["seq"] for line in out.splitlines()]


def test_show_prints_one_aligned_line_per_record(state, capsys):
    assert run(["audit", "show"], state) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["SEQ", "TIME", "EVENT", "DEVICE", "DRIVER", "GROUP", "PID", "DETAIL"]
    assert len(out) == 1 + 5                         # 4 records and the closing checkpoint
    event_col = out[0].index("EVENT")
    assert [line[event_col:].split()[0] for line in out[1:]] == [
        "host.started", "host.crashed", "client.denied", "host.restarted", "audit.checkpoint"]
    assert 'reason="SIGSEGV in io_control" signal=11' in out[2]


def test_show_json_filters_by_event_and_prefix(state, capsys):
    assert run(["audit", "show", "--json", "--event", "host.crashed"], state) == 0
    assert shown_seqs(capsys.readouterr().out) == [2]
    assert run(["audit", "show", "--json", "--event", "host."], state) == 0
    assert shown_seqs(capsys.readouterr().out) == [1, 2, 4]


def test_show_filters_by_device(state, capsys):
    assert run(["audit", "show", "--json", "--device", "dsk1"], state) == 0
    assert shown_seqs(capsys.readouterr().out) == [3]
    assert run(["audit", "show", "--json", "--device", "COM1:", "--event", "host.restarted"], state) == 0
    assert shown_seqs(capsys.readouterr().out) == [4]


def test_show_since_relative_and_iso(state, capsys):
    assert run(["audit", "show", "--json", "--since", "1h"], state) == 0
    assert shown_seqs(capsys.readouterr().out) == [1, 2, 3, 4, 5]
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    assert run(["audit", "show", "--json", "--since", future], state) == 0
    assert capsys.readouterr().out == ""


def test_parse_since_forms():
    now = datetime(2026, 1, 31, 12, 0, tzinfo=timezone.utc)
    assert cmd_audit.parse_since("10m", now) == now - timedelta(minutes=10)
    assert cmd_audit.parse_since("2h", now) == now - timedelta(hours=2)
    assert cmd_audit.parse_since("1d", now) == now - timedelta(days=1)
    assert cmd_audit.parse_since("2026-01-31T11:00:00Z") == datetime(2026, 1, 31, 11, tzinfo=timezone.utc)
    assert cmd_audit.parse_since("2026-01-31T11:00").tzinfo is not None     # naive: local time
    with pytest.raises(argparse.ArgumentTypeError, match="neither an ISO time"):
        cmd_audit.parse_since("yesterday")


def test_show_bad_since_is_a_usage_error(state, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(["audit", "show", "--since", "yesterday"], state)
    assert exit_.value.code == 2
    assert "'yesterday' is neither an ISO time" in capsys.readouterr().err


def test_show_reports_skipped_lines(state, capsys):
    with open(state / "audit.log", "ab") as f:
        f.write(b"not a record\n")
    assert run(["audit", "show", "--json"], state) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 5
    assert "1 line of" in captured.err and "run `drvbox audit verify`" in captured.err


def test_show_missing_log(tmp_path, capsys):
    assert run(["audit", "show"], tmp_path) == 1
    assert f"no audit log at {tmp_path / 'audit.log'}" in capsys.readouterr().err


def test_verify_intact_exits_0(state, capsys):
    assert run(["audit", "verify"], state) == 0
    assert capsys.readouterr().out.strip().endswith(
        "audit.log: intact: 5 records, 1 checkpoint, last seq 5, signed up to seq 5")


def test_verify_tampered_exits_1_naming_the_line(state, capsys):
    log = state / "audit.log"
    log.write_bytes(log.read_bytes().replace(b'"signal":11', b'"signal":15'))
    assert run(["audit", "verify"], state) == 1
    out = capsys.readouterr().out
    assert "NOT intact, 1 problem" in out
    assert "  line 2: seq 2: hash does not match the record's contents: the record was edited" in out


def test_verify_json(state, capsys):
    assert run(["audit", "verify", "--json"], state) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["records"] == 5 and report["problems"] == []


def test_verify_with_wrong_trust_dir_fails(state, tmp_path, capsys):
    other = tmp_path / "other"
    write_pub(Ed25519PrivateKey.generate(), other)
    assert run(["audit", "verify", "--trust", str(other)], state) == 1
    assert "which is not among the trusted keys" in capsys.readouterr().out


def test_verify_with_missing_trust_dir_is_a_usage_error(state, tmp_path, capsys):
    assert run(["audit", "verify", "--trust", str(tmp_path / "nope")], state) == 2
    assert "trust directory" in capsys.readouterr().err


def test_verify_other_log_with_log_option(state, tmp_path, key, capsys):
    other = tmp_path / "elsewhere" / "old.log"
    with AuditLog(other, key) as audit:
        audit.record("host.timeout")
    assert (tmp_path / "elsewhere" / "old.head").exists()
    assert run(["audit", "verify", "--log", str(other), "--trust", str(state / "keys")], state) == 0
    assert "old.log: intact: 2 records" in capsys.readouterr().out


def test_verify_missing_log_fails(tmp_path, key, capsys):
    write_pub(key, tmp_path / "keys")
    assert run(["audit", "verify"], tmp_path) == 1
    assert "no audit log at" in capsys.readouterr().out


def test_stats_json_and_text(state, capsys):
    assert run(["audit", "stats", "--json"], state) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["records"] == 5 and s["events"]["host.crashed"] == 1
    assert s["devices"] == {"COM1:": 3, "DSK1:": 1}
    assert run(["audit", "stats"], state) == 0
    out = capsys.readouterr().out
    assert out.startswith("5 records from ")
    assert any(line.split() == ["host.started", "1"] for line in out.splitlines())


def test_audit_without_action_prints_usage(state, capsys):
    assert run(["audit"], state) == 2
    assert "drvbox audit verify" in capsys.readouterr().err


def test_through_the_real_cli(state, capsys):
    from reflector.cli import main
    assert main(["--state-dir", str(state), "audit", "verify"]) == 0
    assert "intact" in capsys.readouterr().out
