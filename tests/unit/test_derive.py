"""policy.drivers, policy.modules, policy.derive: driver keys to policy documents."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from policy.derive import derive
from policy.document import validate_document
from policy.drivers import find_drivers, group_key_candidates, group_settings
from policy.errors import DerivationError, ModuleNotFound, PolicyError
from policy.hive import Hive, Location, Value
from policy.modules import module_digest, module_stem, resolve_module
from policy.regfile import parse_files, parse_text

DATA = Path(__file__).parents[1] / "data" / "policy"
DRIVERS = DATA / "drivers"
KEY = r"HKEY_LOCAL_MACHINE\Drivers\BuiltIn\Serial"
NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)

_TYPES = {int: "dword", str: "sz", tuple: "multi_sz"}


def hive_with(values: dict, key: str = KEY, hive: Hive | None = None) -> Hive:
    """A hive with one driver key; ``values`` maps names to str (sz), int (dword), tuple (multi_sz) or Value."""
    hive = hive or Hive()
    base = {"Dll": "serial.dll", "Prefix": "COM", "Index": 1, "Flags": 0x10, "IoctlAllow": ("0x1",)}
    for name, data in {**base, **values}.items():
        if data is None:
            continue
        v = data if isinstance(data, Value) else Value(name, _TYPES[type(data)], data,
                                                       Location("test.reg", 10, 5))
        hive.set_value(key, v)
    return hive


def one(values: dict, **kw):
    [d] = derive(hive_with(values), [DRIVERS], now=NOW, **kw)
    return d


def error(values: dict) -> DerivationError:
    with pytest.raises(DerivationError) as info:
        derive(hive_with(values), [DRIVERS], now=NOW)
    return info.value


# --- finding drivers -------------------------------------------------------------------------

def test_find_drivers_modes_flags_and_names():
    h = hive_with({"Flags": 0x10 | 0x10000 | 0x4, "UserProcGroup": 3, "Order": 5})
    hive_with({"Dll": "gpio.dll", "Prefix": "GIO", "Index": None, "Flags": None}, r"HKLM\Drivers\BuiltIn\GPIO", h)
    [gpio, serial] = sorted(find_drivers(h), key=lambda e: e.key_path)
    assert serial.name == "COM1:" and serial.mode == "user" and serial.group == 3 and serial.order == 5
    assert serial.noload and serial.trusted_only and serial.flags == 0x10014
    assert gpio.mode == "kernel" and gpio.name == "GIO1:" and gpio.index == 1 and not gpio.noload


def test_find_drivers_sorted_by_order_then_key_and_nested_bus_keys():
    h = hive_with({"Order": 20})
    hive_with({"Order": 1, "Prefix": "PCI", "Index": 0}, r"HKLM\Drivers\BuiltIn\PCI", h)
    hive_with({"Order": 1, "Prefix": "NIC"}, r"HKLM\Drivers\BuiltIn\PCI\Template\E100", h)
    paths = [e.key_path.split("\\", 3)[3] for e in find_drivers(h)]
    assert paths == ["PCI", r"PCI\Template\E100", "Serial"]


def test_flags_outside_builtin_and_keys_without_dll_are_not_drivers():
    h = hive_with({})
    h.set_value(r"HKLM\System\StorageManager\Profiles\SDMemory\FATFS", Value("Flags", "dword", 0x14))
    h.set_value(r"HKLM\Drivers\USB\ClientDrivers\X", Value("Dll", "sz", "x.dll"))
    h.set_value(r"HKLM\Drivers\BuiltIn\NoDll", Value("Flags", "dword", 0x10))
    assert [e.key_path for e in find_drivers(h)] == [KEY]


def test_missing_index_gets_first_free_one():
    h = hive_with({"Index": 1, "Order": 1})
    hive_with({"Index": None, "Order": 2}, r"HKLM\Drivers\BuiltIn\Serial2", h)
    hive_with({"Index": None, "Order": 3}, r"HKLM\Drivers\BuiltIn\Serial3", h)
    assert [e.name for e in find_drivers(h)] == ["COM1:", "COM2:", "COM3:"]


def test_no_prefix_no_name():
    [e] = find_drivers(hive_with({"Prefix": None, "Index": None}))
    assert e.name is None and e.prefix is None


@pytest.mark.parametrize("values, words", [
    ({"Prefix": "CO"}, "Prefix"), ({"Index": 10}, "single digit"), ({"Dll": ""}, "Dll is empty"),
    ({"Dll": Value("Dll", "dword", 1)}, "expected a string"), ({"Flags": "ten"}, "not a number"),
])
def test_find_drivers_errors_name_key_value_and_location(values, words):
    with pytest.raises(DerivationError, match=words) as info:
        find_drivers(hive_with(values))
    assert info.value.key_path == KEY and "Serial]" in str(info.value)


def test_undefined_macro_left_in_a_number_says_to_define_it():
    e = error({"UserProcGroup": "$(PROCGROUP_SERIAL)"})
    assert e.value == "UserProcGroup" and "-D NAME=VALUE" in str(e) and "test.reg:10:5" in str(e)


# --- process groups --------------------------------------------------------------------------

def test_group_settings_defaults_and_values():
    h = Hive()
    gs = group_settings(h, 2)
    assert not gs.found and gs.timeout_ms == 20000 and gs.restart_limit == 5 and gs.restart_window_s == 60
    assert gs.key_path.endswith("ProcGroup_0002")
    for name, v in {"ProcName": "udevice.exe", "ProcTimeout": 5000, "RestartLimit": 0, "RestartWindow": 30,
                    "MemoryLimit": 64, "MaxThreads": 8, "MaxOpenFiles": 32}.items():
        h.set_value(r"HKLM\Drivers\ProcGroup_0002", Value(name, _TYPES[type(v)], v))
    gs = group_settings(h, 2)
    assert (gs.found, gs.proc_name, gs.timeout_ms, gs.restart_limit, gs.restart_window_s, gs.memory_limit_mib,
            gs.max_threads, gs.max_open_files) == (True, "udevice.exe", 5000, 0, 30, 64, 8, 32)


def test_group_key_decimal_first_then_hex_as_ce_writes_it():
    assert [p.rsplit("\\", 1)[1] for p in group_key_candidates(12)] == ["ProcGroup_0012", "ProcGroup_000c"]
    assert len(group_key_candidates(3)) == 1
    h = Hive()
    h.set_value(r"HKLM\Drivers\ProcGroup_000C", Value("ProcTimeout", "dword", 7))
    assert group_settings(h, 12).timeout_ms == 7


def test_group_timeout_zero_is_an_error():
    h = Hive()
    h.set_value(r"HKLM\Drivers\ProcGroup_0001", Value("ProcTimeout", "dword", 0))
    with pytest.raises(DerivationError, match="ProcTimeout is 0, below its minimum 1"):
        group_settings(h, 1)


# --- modules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dll, stem", [("serial.dll", "serial"), ("Serial.DLL", "Serial"), ("libuart.so", "uart"),
                                       ("uart.so", "uart"), ("x.py", "x"), ("gpio", "gpio")])
def test_module_stem(dll, stem):
    assert module_stem(dll) == stem


@pytest.mark.parametrize("dll", ["../x.dll", "a/b.dll", r"\Windows\x.dll", ".dll", "a b.dll"])
def test_module_stem_refuses_paths(dll):
    with pytest.raises(ModuleNotFound):
        module_stem(dll)


def test_resolve_module_kinds_and_case(tmp_path):
    (tmp_path / "a.py").write_text("")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "libnat.so").write_bytes(b"\x7fELF")
    (tmp_path / "nat2.so").write_bytes(b"\x7fELF")
    assert resolve_module("A.DLL", [tmp_path]).kind == "python"
    assert resolve_module("pkg.dll", [tmp_path]).kind == "package"
    assert resolve_module("nat.dll", [tmp_path]).path.name == "libnat.so"
    assert resolve_module("nat2.dll", [tmp_path]).relative == "nat2.so"


def test_resolve_module_first_directory_wins(tmp_path):
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.py").write_text(d)
    assert resolve_module("x.dll", [tmp_path / "one", tmp_path / "two"]).path.read_text() == "one"


def test_resolve_module_not_found_lists_what_was_tried(tmp_path):
    with pytest.raises(ModuleNotFound) as info:
        resolve_module("nothere.dll", [tmp_path])
    assert str(tmp_path / "nothere.py") in str(info.value) and "libnothere.so" in str(info.value)
    assert "--driver-path" in str(info.value)


def test_package_digest_covers_names_and_contents_not_pycache(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("a")
    ref = resolve_module("p", [tmp_path])
    first = module_digest(ref)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "x.pyc").write_bytes(b"junk")
    assert module_digest(ref) == first
    (pkg / "extra.py").write_text("")
    second = module_digest(ref)
    assert second != first
    (pkg / "extra.py").rename(pkg / "other.py")
    assert module_digest(ref) not in (first, second)
    (pkg / "link.py").symlink_to(pkg / "other.py")
    with pytest.raises(PolicyError, match="symlink"):
        module_digest(ref)


# --- derivation: windows ---------------------------------------------------------------------

def test_derived_document_is_valid_and_pins_module_and_registry():
    h = hive_with({})
    [d] = derive(h, [DRIVERS], now=NOW)
    validate_document(d.document)
    drv = d.document["driver"]
    assert drv["module"] == {"path": "serial.py", "kind": "python",
                             "sha256": module_digest(resolve_module("serial.dll", [DRIVERS]))}
    assert drv["registry_sha256"] == h.key(KEY).digest()
    assert d.document["serial"] == int(NOW.timestamp()) and d.document["issued"] == "2025-01-01T00:00:00Z"


def test_serial_and_expiry_can_be_given():
    d = one({}, serial=5, expires=NOW + timedelta(days=1))
    assert d.document["serial"] == 5 and d.document["expires"] == "2025-01-02T00:00:00Z"
    with pytest.raises(PolicyError, match="not after"):
        derive(hive_with({}), [DRIVERS], now=NOW, expires=NOW)


@pytest.mark.parametrize("base, length, expect", [
    (0x48004000, 0x1000, [(0x48004000, 0x1000)]),
    ("48004000", "1000", [(0x48004000, 0x1000)]),                   # sz, hex without 0x
    ("0x48004000", "0x1000", [(0x48004000, 0x1000)]),
    (("48004000", "48006000"), ("1000", "1000"), [(0x48004000, 0x1000), (0x48006000, 0x1000)]),
    ("48004000,48006000", "1000,100", [(0x48004000, 0x1000), (0x48006000, 0x100)]),
    (("48006000", "48004000"), ("100", "1000"), [(0x48004000, 0x1000), (0x48006000, 0x100)]),   # sorted
    (("48004000", "48004000"), ("1000", "1000"), [(0x48004000, 0x1000)]),                      # duplicate
])
def test_memory_windows_as_bsps_write_them(base, length, expect):
    mem = one({"MemBase": base, "MemLen": length}).document["resources"]["memory"]
    assert [(w["base"], w["length"]) for w in mem] == expect and all(w["access"] == "rw" for w in mem)


def test_qword_memory_window_above_4g():
    d = one({"MemBase": Value("MemBase", "qword", 0x1_0000_0000), "MemLen": 0x1000})
    assert d.document["resources"]["memory"][0]["base"] == 0x1_0000_0000


@pytest.mark.parametrize("values, value, words", [
    ({"MemBase": ("48004000", "48004800"), "MemLen": ("1000", "1000")}, "MemBase", "overlaps"),
    ({"MemBase": 0xFFFFF000, "MemLen": 0x2000}, "MemLen", "wraps"),
    ({"MemBase": 0x48004000, "MemLen": 0}, "MemLen", "length 0"),
    ({"MemBase": 0x48004000}, "MemBase", "without MemLen"),
    ({"MemLen": 0x1000}, "MemLen", "without MemBase"),
    ({"MemBase": ("1000", "2000"), "MemLen": ("10",)}, "MemLen", "2 MemBase entries but 1 MemLen"),
    ({"MemBase": "4800G000", "MemLen": "1000"}, "MemBase", "not a number"),
    ({"MemBase": "100000000", "MemLen": "1000"}, "MemBase", "larger than 32 bits"),
    ({"IoBase": 0xFFF0, "IoLen": 0x20}, "IoLen", "past port 0xFFFF"),
    ({"IoBase": 0, "IoLen": 0x10001}, "IoLen", "past port 0xFFFF"),
    ({"IoBase": ("3F8", "3FC"), "IoLen": ("8", "8")}, "IoBase", "overlaps"),
    ({"IoBase": 0x3F8, "IoLen": 0}, "IoLen", "length 0"),
])
def test_window_errors(values, value, words):
    e = error(values)
    assert e.value == value and words in e.problem and e.key_path == KEY
    assert str(e).startswith("test.reg:10:5: [HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\Serial]")


def test_port_window_up_to_ffff_is_fine():
    ports = one({"IoBase": 0xFFF8, "IoLen": 8}).document["resources"]["ports"]
    assert ports == [{"base": 0xFFF8, "length": 8, "access": "rw", "source": "IoBase[0]/IoLen[0]"}]


def test_iobase_beyond_port_space_is_memory_mapped_with_a_warning():
    d = one({"IoBase": 0x48020000, "IoLen": 0x400})
    assert d.document["resources"]["ports"] == []
    assert d.document["resources"]["memory"][0]["base"] == 0x48020000
    assert any("beyond the port space" in w and '"IoBase"' in w for w in d.warnings)


# --- derivation: I/O rules and the rest ------------------------------------------------------

def test_ioctl_allow_codes_and_ranges():
    d = one({"IoctlAllow": ("0x00220004", "00220010-0x0022001F", "0x00220004,0x8")})
    assert d.document["io"]["ioctls"] == {"ranges": [[8, 8], [0x220004, 0x220004], [0x220010, 0x22001F]]}
    assert not d.warnings
    assert one({"IoctlAllow": Value("IoctlAllow", "dword", 7)}).document["io"]["ioctls"] == {"ranges": [[7, 7]]}
    assert one({"IoctlAllow": ()}).document["io"]["ioctls"] == {"ranges": []}


def test_no_ioctl_allow_is_all_codes_with_a_warning():
    d = one({"IoctlAllow": None})
    assert d.document["io"]["ioctls"] == {"all": True}
    assert any("no IoctlAllow" in w for w in d.warnings)


@pytest.mark.parametrize("bad", ["0x1-", "zz", "0x10-0x1", "0x123456789", "1..2"])
def test_malformed_ioctl_allow_is_an_error(bad):
    assert error({"IoctlAllow": (bad,)}).value == "IoctlAllow"


def test_io_values_and_defaults():
    doc = one({}).document
    assert doc["io"]["max_io_size"] == 1 << 20 and doc["resources"]["dma_quota"] == 0
    assert doc["resources"]["register_access"] == "mapped" and doc["resources"]["device_nodes"] == []
    assert doc["clients"] == {"users": None, "groups": None, "trusted_only": False} and doc["syscalls"] == []
    doc = one({"MaxIoSize": 4096, "DmaQuota": "8192", "RegisterAccess": "Mediated", "Irq": ("4", "5"),
               "SysIntr": 17, "AllowUsers": ("alice", "1000"), "AllowGroups": "dialout"}).document
    assert doc["io"]["max_io_size"] == 4096 and doc["resources"]["dma_quota"] == 8192
    assert doc["resources"]["register_access"] == "mediated"
    assert doc["resources"]["irqs"] == [4, 5] and doc["resources"]["sysintrs"] == [17]
    assert doc["clients"]["users"] == ["alice", "1000"] and doc["clients"]["groups"] == ["dialout"]


@pytest.mark.parametrize("values, value", [
    ({"MaxIoSize": (1 << 30) + 1}, "MaxIoSize"), ({"RegisterAccess": "direct"}, "RegisterAccess"),
    ({"AllowUsers": ("bad user",)}, "AllowUsers"), ({"Syscalls": ("Open()",)}, "Syscalls"),
    ({"DeviceNodes": ("/dev/ttyS0:w",)}, "DeviceNodes"), ({"DeviceNodes": ("dev/ttyS0",)}, "DeviceNodes"),
    ({"DeviceNodes": ("/dev/../etc/shadow",)}, "DeviceNodes"), ({"DeviceNodes": ("/dev/a", "/dev/a:rw")}, "DeviceNodes"),
    ({"DeviceNodes": ("/dev/a:rw:0x5-0x1",)}, "DeviceNodes"), ({"Irq": "four"}, "Irq"),
])
def test_value_errors(values, value):
    assert error(values).value == value


def test_device_nodes():
    nodes = one({"DeviceNodes": ("/dev/ttyS0", "/dev/i2c-1:rw", "/dev/spidev0.0:rw:0x40046B01,0x80046B02-0x80046B04")}
                ).document["resources"]["device_nodes"]
    assert nodes == [{"path": "/dev/ttyS0", "mode": "r"}, {"path": "/dev/i2c-1", "mode": "rw"},
                     {"path": "/dev/spidev0.0", "mode": "rw",
                      "ioctls": [[0x40046B01, 0x40046B01], [0x80046B02, 0x80046B04]]}]


def test_syscalls_are_added_with_a_warning():
    d = one({"Syscalls": ("ioctl", "clock_nanosleep")})
    assert d.document["syscalls"] == ["clock_nanosleep", "ioctl"]
    assert any("adds system calls" in w and "ioctl" in w for w in d.warnings)


def test_module_not_found_warns_and_pins_nothing():
    d = one({"Dll": "absent.dll"})
    assert d.document["driver"]["module"] == {"path": None, "kind": None, "sha256": None}
    assert any("absent.dll" in w and "will be refused" in w for w in d.warnings)


def test_kernel_mode_has_no_host_user_mode_has_group_settings():
    assert one({"Flags": 0}).document["host"] is None
    h = hive_with({"UserProcGroup": 2})
    h.set_value(r"HKLM\Drivers\ProcGroup_0002", Value("ProcTimeout", "dword", 5000))
    [d] = derive(h, [DRIVERS], now=NOW)
    assert d.document["host"]["group"] == 2 and d.document["host"]["timeout_ms"] == 5000
    assert d.document["host"]["key"].endswith("ProcGroup_0002")
    d = one({"UserProcGroup": 9})
    assert d.document["host"]["key"] is None and any("no key" in w for w in d.warnings)
    assert one({}).document["host"]["group"] is None


def test_two_drivers_claiming_one_irq_both_warned():
    h = hive_with({"Irq": 4})
    hive_with({"Irq": 4, "Prefix": "GIO"}, r"HKLM\Drivers\BuiltIn\GPIO", h)
    ds = derive(h, [DRIVERS], now=NOW)
    for d in ds:
        assert any("IRQ 4 is also claimed" in w for w in d.warnings)


def test_noload_driver_does_not_count_for_conflicts():
    h = hive_with({"Irq": 4})
    hive_with({"Irq": 4, "Prefix": "GIO", "Flags": 0x14}, r"HKLM\Drivers\BuiltIn\GPIO", h)
    assert not any("also claimed" in w for d in derive(h, [DRIVERS], now=NOW) for w in d.warnings)


def test_duplicate_device_name_warned():
    h = hive_with({})
    hive_with({}, r"HKLM\Drivers\BuiltIn\Serial2", h)
    assert all(any("COM1: is also used" in w for w in d.warnings) for d in derive(h, [DRIVERS], now=NOW))


# --- from .reg text as BSPs write it ---------------------------------------------------------

def test_bsp_style_registry_text_derives():
    text = (
        '[HKEY_LOCAL_MACHINE\\Drivers\\Builtin\\Serial1]\r\n'
        '   "Prefix"="COM"\r\n   "Dll"="serial.dll"\r\n   "Index"=dword:1\r\n   "Order"=dword:0\r\n'
        '   "Flags"=dword:$(FLAGS)\r\n   "UserProcGroup"=dword:$(PROCGROUP_DEFAULT)\r\n'
        '   "MemBase"=multi_sz:"48004000","48006000"\r\n   "MemLen"=multi_sz:"1000","1000"\r\n'
        '   "Irq"=dword:48 ; UART1\r\n   "IClass"="{CC5195AC-BA49-48a0-BE17-DF6D1B0173DD}"\r\n'
    )
    parsed = parse_text(text, "platform.reg", defines={"FLAGS": "10", "PROCGROUP_DEFAULT": "2"})
    [d] = derive(parsed.hive, [DRIVERS], now=NOW)
    assert d.entry.mode == "user" and d.entry.group == 2 and d.entry.name == "COM1:"
    assert [w["base"] for w in d.document["resources"]["memory"]] == [0x48004000, 0x48006000]
    assert d.document["resources"]["irqs"] == [0x48]


def test_fixture_platform_derives():
    parsed = parse_files([DATA / "platform.reg"])
    ds = {d.entry.name: d for d in derive(parsed.hive, [DRIVERS], now=NOW)}
    assert set(ds) == {"COM1:", "GIO1:"}
    assert ds["COM1:"].document["host"]["memory_limit_mib"] == 64 and ds["COM1:"].document["host"]["timeout_ms"] == 5000
    assert ds["GIO1:"].document["driver"]["module"]["kind"] == "package"


# --- what real BSPs do (docs/bsp-trials.md) -----------------------------------------------------

BSP_SERIAL = """\
[HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\Serial1]
    "Flags"=dword:0010            ; User Mode: DEVFLAGS_LOAD_AS_USERPROC
    "Dll"="Com16550.Dll"
    "Prefix"="COM"
    "Index"=dword:1
    "IoBase"=dword:03F8
    "IoLen"=dword:8
    "UserProcGroup"=dword:$(PROCGROUP_DRIVER_MSFT_DEFAULT)
"""


def test_user_mode_driver_with_an_undefined_group_macro_derives_to_a_host_of_its_own_and_says_so():
    hive = parse_text(BSP_SERIAL, "platform.reg").hive
    [d] = derive(hive, [DRIVERS], now=NOW)
    assert d.entry.mode == "user" and d.document["host"]["group"] is None
    assert d.document["resources"]["ports"] == [{"base": 0x3F8, "length": 8, "access": "rw",
                                                 "source": "IoBase[0]/IoLen[0]"}]
    [w] = [w for w in d.warnings if "UserProcGroup" in w]
    assert w == ('platform.reg:8:5: [HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\Serial1] "UserProcGroup" was not read '
                 "(undefined macro $(PROCGROUP_DRIVER_MSFT_DEFAULT)): the driver gets a host of its own instead of "
                 "sharing its group's (fix: -D PROCGROUP_DRIVER_MSFT_DEFAULT=N)")


def test_the_group_macro_given_on_the_command_line_is_the_group():
    hive = parse_text(BSP_SERIAL, "platform.reg", defines={"PROCGROUP_DRIVER_MSFT_DEFAULT": "3"}).hive
    [d] = derive(hive, [DRIVERS], now=NOW)
    assert d.document["host"]["group"] == 3 and not any("was not read" in w for w in d.warnings)


@pytest.mark.parametrize("written, replacement", [
    ('"Flags"=dword:0010', '"Flags"=dword:$(MODE)'),
    ('"Dll"="Com16550.Dll"', '"Dll"="$(MODE).dll"'),
])
def test_unreadable_flags_or_dll_is_an_error_because_the_mode_or_module_is_unknown(written, replacement):
    text = BSP_SERIAL.replace(written, replacement)
    hive = parse_text(text, "platform.reg", defines={"PROCGROUP_DRIVER_MSFT_DEFAULT": "3"}).hive
    with pytest.raises(DerivationError) as info:
        derive(hive, [DRIVERS], now=NOW)
    assert info.value.value == written[1:written.index('"', 1)] and info.value.fix == "-D MODE=VALUE"
    assert "could not be read (undefined macro $(MODE))" in str(info.value)


def test_with_an_error_list_one_bad_key_does_not_stop_the_others():
    text = BSP_SERIAL.replace("$(PROCGROUP_DRIVER_MSFT_DEFAULT)", "3") + """
[HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\pl050]
    "Dll"="pl050.dll"
    "IoBase"=dword:91060000
    "Prefix"="KBD"
[HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\Bad]
    "Dll"="bad.dll"
    "Prefix"="TOOLONG"
"""
    hive = parse_text(text, "platform.reg").hive
    with pytest.raises(DerivationError):
        derive(hive, [DRIVERS], now=NOW)
    errors: list = []
    [d] = derive(hive, [DRIVERS], now=NOW, errors=errors)
    assert d.entry.name == "COM1:"
    assert sorted(e.key_path.rsplit("\\", 1)[1] for e in errors) == ["Bad", "pl050"]
    assert any(e.value == "IoBase" and "IoBase without IoLen" in e.problem for e in errors)


@pytest.mark.parametrize("line, words", [
    ('"IoctlAllow"=multi_sz:"$(CODES)"', "every ioctl code would be allowed"),
    ('"AllowUsers"=multi_sz:"$(WHO)"', "every user could open the device"),
    ('"MaxIoSize"=dword:$(SIZE)', "the default 1 MiB would apply"),
])
def test_unreadable_narrowing_value_is_an_error_not_a_wider_default(line, words):
    text = BSP_SERIAL.replace("$(PROCGROUP_DRIVER_MSFT_DEFAULT)", "3") + f"    {line}\n"
    hive = parse_text(text, "platform.reg").hive
    with pytest.raises(DerivationError, match=words) as info:
        derive(hive, [DRIVERS], now=NOW)
    assert info.value.location == Location("platform.reg", 9, 5) and info.value.fix.startswith("-D ")


def test_unreadable_value_derivation_does_not_use_is_left_to_the_parser_warning():
    text = BSP_SERIAL.replace("$(PROCGROUP_DRIVER_MSFT_DEFAULT)", "3") + '    "FriendlyName"=LOC_DISPLAYNAME_COM1\n'
    r = parse_text(text, "platform.reg")
    assert len(r.diagnostics) == 1
    [d] = derive(r.hive, [DRIVERS], now=NOW)
    assert not any("FriendlyName" in w for w in d.warnings)


def test_sysintr_zero_is_no_interrupt_and_a_window_listed_twice_warns_once():
    d = one({"SysIntr": 0, "Irq": 0x54, "IoBase": ("0x70300000", "0x70300000"), "IoLen": ("0x1998", "0x1998")})
    res = d.document["resources"]
    assert res["sysintrs"] == [] and res["irqs"] == [0x54]
    assert [(w["base"], w["length"]) for w in res["memory"]] == [(0x70300000, 0x1998)]
    assert sum("beyond the port space" in w for w in d.warnings) == 1


# -- SyscallViolation: what a call outside the allowlist gets ------------------------------------

def _violation_hive(value: str | None):
    from policy.hive import Hive, Value
    hive = Hive()
    path = r"HKEY_LOCAL_MACHINE\Drivers\BuiltIn\Probe"
    for name, typ, data in (("Dll", "sz", "probe.dll"), ("Prefix", "sz", "PRB"), ("Index", "dword", 1),
                            ("Flags", "dword", 0x10), ("IoctlAllow", "multi_sz", ("0x00220000",))):
        hive.set_value(path, Value(name, typ, data))
    if value is not None:
        hive.set_value(path, Value("SyscallViolation", "sz", value))
    return hive


@pytest.mark.parametrize("value, expected", [(None, "deny"), ("deny", "deny"), ("Kill", "kill")])
def test_syscall_violation_is_derived(value, expected):
    from policy.derive import derive
    (derived,) = derive(_violation_hive(value), [])
    assert derived.document["syscall_violation"] == expected


def test_syscall_violation_must_be_deny_or_kill():
    from policy.derive import derive
    from policy.errors import DerivationError
    with pytest.raises(DerivationError, match="'explode' is neither 'deny' nor 'kill'"):
        derive(_violation_hive("explode"), [])
