"""The command line's face for bad input: a message that says what and where, exit 1, no traceback."""

import signal

import pytest

from reflector.cli import main


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_missing_registry_file_is_a_message(tmp_path, capsys):
    missing = tmp_path / "nope.reg"
    assert main(["--state-dir", str(tmp_path / "s"), "--socket", str(tmp_path / "sock"),
                 "run", "--registry", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"drvbox run: {missing}: cannot read registry file" in err
    assert "Traceback" not in err


def test_missing_trust_store_says_how_to_fix_it(tmp_path, capsys):
    reg = tmp_path / "p.reg"
    reg.write_text('REGEDIT4\n[HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\X]\n"Dll"="x.dll"\n"Prefix"="XXX"\n'
                   '"Flags"=dword:10\n')
    assert main(["--state-dir", str(tmp_path / "s"), "--socket", str(tmp_path / "sock"), "run",
                 "--registry", str(reg), "--policies", str(tmp_path), "--trust", str(tmp_path / "none")]) == 1
    assert "trust store directory not found (fix: create it" in capsys.readouterr().err


def test_no_verb_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "drvbox run" in capsys.readouterr().out
