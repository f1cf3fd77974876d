"""drvbox keys new / policy derive|sign|verify|show, run through reflector.cli.main."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from reflector.cli import main
from reflector.cmd_policy import policy_file_name

DATA = Path(__file__).parents[1] / "data" / "policy"


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["--state-dir", "/nonexistent-drvbox-state", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def setup(tmp_path, capsys):
    rc, out, _ = run(capsys, "keys", "new", "rel", "--out", tmp_path / "keys")
    assert rc == 0 and "key id" in out
    trust = tmp_path / "trust"
    trust.mkdir()
    shutil.copy(tmp_path / "keys" / "rel.pub", trust)
    rc, out, err = run(capsys, "policy", "derive", DATA / "platform.reg", "--driver-path", DATA / "drivers",
                       "-o", tmp_path / "pol")
    assert rc == 0, err
    return tmp_path


def test_keys_new_writes_private_0600_and_refuses_overwrite(tmp_path, capsys):
    rc, out, _ = run(capsys, "keys", "new", "k", "--out", tmp_path)
    assert rc == 0 and stat.S_IMODE(os.stat(tmp_path / "k.key").st_mode) == 0o600
    rc, _, err = run(capsys, "keys", "new", "k", "--out", tmp_path)
    assert rc == 1 and "already exists" in err


def test_derive_writes_one_file_per_driver_and_prints_grants(setup, capsys):
    files = sorted(p.name for p in (setup / "pol").iterdir())
    assert files == ["BuiltIn.GPIO.json", "BuiltIn.Serial.json"]
    rc, out, err = run(capsys, "policy", "derive", DATA / "platform.reg", "--driver-path", DATA / "drivers",
                       "-o", setup / "pol2")
    assert "COM1:" in out and "0x48004000+0x1000 rw" in out and "ALL (no IoctlAllow)" in out
    assert "warning:" in err and "GPIO" in err


def test_derive_json(setup, capsys):
    rc, out, _ = run(capsys, "policy", "derive", DATA / "platform.reg", "--driver-path", DATA / "drivers",
                     "-o", setup / "pol2", "--json", "--serial", "42")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["COM1:"]["mode"] == "user" and rows["COM1:"]["group"] == 2 and rows["COM1:"]["warnings"] == []
    assert rows["GIO1:"]["group"] is None and any("IoctlAllow" in w for w in rows["GIO1:"]["warnings"])
    assert set(rows["COM1:"]) == {"key", "name", "mode", "group", "file", "warnings"}
    assert json.loads(Path(rows["COM1:"]["file"]).read_text())["serial"] == 42


def test_derive_defines_and_driver_path_default(tmp_path, capsys):
    reg = tmp_path / "p.reg"
    reg.write_text('[HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\X]\n"Dll"="x.dll"\n"Flags"=dword:$(F)\n"IoctlAllow"="1"\n')
    (tmp_path / "x.py").write_text("class Driver: pass\n")
    rc, out, err = run(capsys, "policy", "derive", reg, "-o", tmp_path / "o", "-D", "F=10", "--json")
    assert rc == 0, err
    [row] = json.loads(out)
    assert row["mode"] == "user"
    doc = json.loads(Path(row["file"]).read_text())
    assert doc["driver"]["module"]["path"] == "x.py"          # found next to the .reg file


def test_derive_error_names_file_value_and_fix(tmp_path, capsys):
    reg = tmp_path / "p.reg"
    reg.write_text('[HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\X]\n"Dll"="x.dll"\n"MemBase"=dword:1000\n')
    rc, _, err = run(capsys, "policy", "derive", reg, "-o", tmp_path / "o")
    assert rc == 1 and f"{reg}:3:" in err and '"MemBase"' in err and "fix:" in err
    assert not (tmp_path / "o").exists()


def test_derive_nothing_found_is_an_error(tmp_path, capsys):
    reg = tmp_path / "p.reg"
    reg.write_text("[HKEY_LOCAL_MACHINE\\Software\\X]\n")
    rc, _, err = run(capsys, "policy", "derive", reg, "-o", tmp_path / "o")
    assert rc == 1 and "no driver keys" in err


def test_derive_bad_define_and_bad_expiry(tmp_path, capsys):
    rc, _, err = run(capsys, "policy", "derive", DATA / "platform.reg", "-o", tmp_path, "-D", "1X=2")
    assert rc == 1 and "-D NAME=VALUE" in err
    rc, _, err = run(capsys, "policy", "derive", DATA / "platform.reg", "-o", tmp_path, "--expires", "soon")
    assert rc == 1 and "90d" in err


def test_sign_verify_show(setup, capsys):
    pol = sorted((setup / "pol").glob("*.json"))
    rc, out, err = run(capsys, "policy", "sign", "--key", setup / "keys" / "rel.key", *pol)
    assert rc == 0, err
    assert all("payload" in json.loads(p.read_text()) for p in pol)
    rc, out, _ = run(capsys, "policy", "verify", "--trust", setup / "trust", *pol)
    assert rc == 0 and out.count(": OK") == 2 and "rel.pub" in out
    rc, out, _ = run(capsys, "policy", "show", pol[1], "--trust", setup / "trust")
    assert rc == 0 and "signed envelope, 1 signature" in out and "trusted (rel.pub)" in out and "verifies" in out
    body = json.loads("\n".join(line for line in out.splitlines() if not line.startswith("#")))
    assert body["driver"]["name"] == "COM1:"


def test_sign_to_other_directory_keeps_originals(setup, capsys):
    pol = setup / "pol" / "BuiltIn.Serial.json"
    rc, _, _ = run(capsys, "policy", "sign", "--key", setup / "keys" / "rel.key", pol, "-o", setup / "signed")
    assert rc == 0 and "payload" not in json.loads(pol.read_text())
    assert "payload" in json.loads((setup / "signed" / pol.name).read_text())


def test_verify_fails_if_any_file_fails_and_says_why(setup, capsys):
    pol = sorted((setup / "pol").glob("*.json"))
    run(capsys, "policy", "sign", "--key", setup / "keys" / "rel.key", pol[0])
    rc, out, _ = run(capsys, "policy", "verify", "--trust", setup / "trust", *pol)
    assert rc == 1 and ": OK" in out and "REJECTED (unsigned)" in out
    env = json.loads(pol[0].read_text())
    env["signatures"][0]["sig"] = base64.b64encode(bytes(64)).decode()
    pol[0].write_text(json.dumps(env))
    rc, out, _ = run(capsys, "policy", "verify", "--trust", setup / "trust", pol[0])
    assert rc == 1 and "REJECTED (bad-signature)" in out


def test_verify_with_a_different_trust_store_is_unknown_key(setup, capsys, tmp_path):
    pol = setup / "pol" / "BuiltIn.Serial.json"
    run(capsys, "policy", "sign", "--key", setup / "keys" / "rel.key", pol)
    run(capsys, "keys", "new", "other", "--out", tmp_path / "k2")
    (tmp_path / "t2").mkdir()
    shutil.copy(tmp_path / "k2" / "other.pub", tmp_path / "t2")
    rc, out, _ = run(capsys, "policy", "verify", "--trust", tmp_path / "t2", pol)
    assert rc == 1 and "REJECTED (unknown-key)" in out


def test_sign_refuses_invalid_document_and_unsafe_key(setup, capsys):
    pol = setup / "pol" / "BuiltIn.Serial.json"
    doc = json.loads(pol.read_text())
    doc["serial"] = -5
    pol.write_text(json.dumps(doc))
    rc, _, err = run(capsys, "policy", "sign", "--key", setup / "keys" / "rel.key", pol)
    assert rc == 1 and "$.serial" in err and str(pol) in err
    os.chmod(setup / "keys" / "rel.key", 0o644)
    rc, _, err = run(capsys, "policy", "sign", "--key", setup / "keys" / "rel.key", pol)
    assert rc == 1 and "chmod 600" in err


def test_second_signer_adds_a_signature(setup, capsys, tmp_path):
    pol = setup / "pol" / "BuiltIn.Serial.json"
    run(capsys, "keys", "new", "second", "--out", tmp_path / "k2")
    run(capsys, "policy", "sign", "--key", setup / "keys" / "rel.key", pol)
    rc, out, _ = run(capsys, "policy", "sign", "--key", tmp_path / "k2" / "second.key", pol)
    assert rc == 0 and "2 signature(s)" in out


def test_show_unsigned_document(setup, capsys):
    rc, out, _ = run(capsys, "policy", "show", setup / "pol" / "BuiltIn.GPIO.json")
    assert rc == 0 and "UNSIGNED" in out


def test_show_not_json(tmp_path, capsys):
    (tmp_path / "x.json").write_text("nope")
    rc, _, err = run(capsys, "policy", "show", tmp_path / "x.json")
    assert rc == 1 and "not JSON" in err


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["policy", "--help"])
    out = capsys.readouterr().out
    assert "drvbox policy derive" in out and "drvbox policy sign" in out
    assert main(["policy"]) == 2


def test_policy_file_name():
    assert policy_file_name("HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\PCI\\Template\\E 100") == "BuiltIn.PCI.Template.E_100.json"


def test_verify_against_registry_catches_changed_module(setup, capsys, tmp_path):
    drivers = tmp_path / "drv"
    shutil.copytree(DATA / "drivers", drivers)
    rc, _, err = run(capsys, "policy", "derive", DATA / "platform.reg", "--driver-path", drivers, "-o", tmp_path / "p")
    assert rc == 0, err
    pol = tmp_path / "p" / "BuiltIn.Serial.json"
    run(capsys, "policy", "sign", "--key", setup / "keys" / "rel.key", pol)
    args = ("policy", "verify", "--trust", setup / "trust", "--registry", DATA / "platform.reg", "--driver-path", drivers, pol)
    rc, out, _ = run(capsys, *args)
    assert rc == 0, out
    (drivers / "serial.py").write_text("# changed\n")
    rc, out, _ = run(capsys, *args)
    assert rc == 1 and "REJECTED (module-mismatch)" in out


def test_derive_writes_the_good_drivers_and_fails_naming_the_bad_one(tmp_path, capsys):
    reg = tmp_path / "platform.reg"
    reg.write_text('[HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\Good]\n"Dll"="x.dll"\n"Prefix"="GOO"\n"Flags"=dword:10\n'
                   '[HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\pl050]\n"Dll"="pl050.dll"\n"IoBase"=dword:91060000\n')
    rc, out, err = run(capsys, "policy", "derive", reg, "-o", tmp_path / "o")
    assert rc == 1
    assert f'{reg}:7:1: [HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\pl050] "IoBase": IoBase without IoLen' in err
    assert "no policy written for it" in err
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["BuiltIn.Good.json"]
    assert "GOO1:" in out and "1 driver key(s) NOT derived" in out


def test_derive_nothing_in_builtin_names_the_driver_keys_elsewhere(tmp_path, capsys):
    reg = tmp_path / "p.reg"
    reg.write_text('[HKEY_LOCAL_MACHINE\\Drivers\\DWCUsbHost]\n"Prefix"="HCD"\n"Dll"="dwchci.dll"\n')
    rc, _, err = run(capsys, "policy", "derive", reg, "-o", tmp_path / "o")
    assert rc == 1 and "no driver keys" in err
    assert "outside BuiltIn (HKEY_LOCAL_MACHINE\\Drivers\\DWCUsbHost) are loaded on CE by another driver" in err
    assert not (tmp_path / "o").exists()


def test_derive_notes_a_root_bus_dll_and_derives_the_keys_below(tmp_path, capsys):
    reg = tmp_path / "platform.reg"
    reg.write_text('[HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn]\n"Prefix"="BUS"\n"Dll"="bus.dll"\n'
                   '[HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\DMA]\n"Prefix"="DMA"\n"Dll"="dma.dll"\n'
                   '"MemBase"=multi_sz:"48056000"\n"MemLen"=multi_sz:"00001000"\n')
    rc, out, err = run(capsys, "policy", "derive", reg, "-o", tmp_path / "o")
    assert rc == 0 and "DMA1:" in out and "0x48056000+0x1000 rw" in out
    assert f"note: {reg}:3:1: [HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn] \"Dll\" names the root bus driver 'bus.dll'" in err
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["BuiltIn.DMA.json"]
