"""Constructs met in real BSP platform.reg files (docs/bsp-trials.md), each pinned by a minimal
fixture of our own: makeimg's ``IF X=VALUE``, values lost to an undefined macro, includes whose
path names a build-tree root."""

from __future__ import annotations

import pytest

from policy.hive import Location, Unread, Value
from policy.regfile import RegistryError, parse_text

KEY = r"HKLM\Drivers\BuiltIn\Serial1"


def parse(text: str, **kw):
    return parse_text(text, "t.reg", **kw)


def keys(result) -> list[str]:
    return [k.name for k in result.hive.keys() if k.values()]


# --- IF NAME=VALUE [!] ---------------------------------------------------------------------------

IF_VALUE = """\
IF _TGTPROJ=smartfon !
[HKLM\\A]
"x"=dword:1
ENDIF _TGTPROJ=smartfon !
IF MAKEIMG_BIN_FORMAT = hybrid
[HKLM\\B]
"x"=dword:1
ENDIF MAKEIMG_BIN_FORMAT=hybrid
"""


@pytest.mark.parametrize("defines, expect", [
    ({}, ["A"]),                                                     # unset is not equal: '!' keeps A
    ({"_TGTPROJ": "smartfon"}, []),
    ({"_TGTPROJ": "SmartFon", "MAKEIMG_BIN_FORMAT": "HYBRID"}, ["B"]),   # values compare case-insensitively
    ({"_TGTPROJ": "uldr", "MAKEIMG_BIN_FORMAT": "imageupdate"}, ["A"]),
])
def test_if_name_equals_value(defines, expect):
    r = parse(IF_VALUE, defines=defines)
    assert r.diagnostics == [] and keys(r) == expect


def test_if_name_is_looked_up_case_insensitively_as_in_the_windows_environment():
    r = parse('IF bsp_serial2\n[HKLM\\A]\n"x"=dword:1\nENDIF\n', defines={"BSP_SERIAL2": "1"})
    assert keys(r) == ["A"]


def test_if_value_that_is_empty_is_unset():
    r = parse('IF X=1\n[HKLM\\A]\n"x"=dword:1\nENDIF\nIF X !\n[HKLM\\B]\n"x"=dword:1\nENDIF\n', defines={"X": ""})
    assert keys(r) == ["B"]


def test_endif_naming_another_variable_is_reported_with_both():
    r = parse("IF _TGTPROJ=uldr\nENDIF BSP_NOUSB !\n")
    [d] = r.diagnostics
    assert d.message == "'ENDIF BSP_NOUSB !' closes 'IF _TGTPROJ=uldr' (line 1)"
    assert d.location == Location("t.reg", 2, 7)


@pytest.mark.parametrize("pair", [
    "IF a = B !\nENDIF A=b !\n",                     # other spacing and case
    "IF _TGTPROJ=uldr\nENDIF _TGTPROJ=uldr !\n",      # the polarity does not matter to makeimg
    "IF BSP_USBFNCLASS == SERIAL\nENDIF BSP_USBFNCLASS\n",
    "IF BSP_ALLOWKITLSHAREDIRQ !\nENDIF BSP_ALLOWKITLSHAREDIRQ\n",
    "IF BSP_NOCAMERA !\nENDIF BSP_NOCAMERA!\n",
])
def test_endif_repeating_the_variable_of_its_if_is_fine(pair):
    assert parse(pair).diagnostics == []


@pytest.mark.parametrize("test, defines, expect", [
    ("BSP_KITL != USBSERIAL", {}, True),                  # unset is not USBSERIAL
    ("BSP_KITL != USBSERIAL", {"BSP_KITL": "usbserial"}, False),
    ("BSP_KITL!=SERIAL_UART0", {"BSP_KITL": "USBSERIAL"}, True),
    ("BSP_USBFNCLASS == SERIAL", {"BSP_USBFNCLASS": "SERIAL"}, True),
    ("BSP_USBFNCLASS == SERIAL", {"BSP_USBFNCLASS": "MASS_STORAGE"}, False),
    ("BSP_USBFNCLASS == SERIAL !", {"BSP_USBFNCLASS": "MASS_STORAGE"}, True),
])
def test_vendor_equality_operators(test, defines, expect):
    r = parse(f'IF {test}\n[HKLM\\A]\n"x"=dword:1\nENDIF\n', defines=defines)
    assert r.diagnostics == [] and keys(r) == (["A"] if expect else [])


def test_if_with_or_says_ce_if_has_no_or_and_what_to_write():
    r = parse('IF BSP_NOHSMMC_CH0 ! || BSP_NOHSMMC_CH1 !\n[HKLM\\A]\n"x"=dword:1\nENDIF BSP_NOHSMMC_CH0 ! || BSP_NOHSMMC_CH1 !\n')
    [d] = r.diagnostics
    assert d.message.endswith("found 'IF BSP_NOHSMMC_CH0 ! || BSP_NOHSMMC_CH1 !'; the block is skipped")
    assert "knows no || or &&" in d.hint and keys(r) == []


@pytest.mark.parametrize("line", ["IF X=", "IF =1", "IF X=1 2", "IF X===1", "IF X=1=2"])
def test_malformed_if_value_is_reported_and_its_block_skipped(line):
    r = parse(f'{line}\n[HKLM\\A]\n"x"=dword:1\nENDIF\n', defines={"X": "1"})
    [d] = r.diagnostics
    assert d.message.startswith("expected 'IF NAME', 'IF NAME=VALUE' or either followed by ' !', found ")
    assert keys(r) == []
    with pytest.raises(RegistryError):
        parse(f"{line}\nENDIF\n", strict=True)


# --- values lost to an undefined macro --------------------------------------------------------------

def test_value_with_undefined_macro_is_kept_as_unread_with_its_location():
    r = parse(f'[{KEY}]\n"Flags"=dword:10\n    "UserProcGroup"=dword:$(PROCGROUP_DRIVER_MSFT_DEFAULT)\n')
    key = r.hive.key(KEY)
    assert key.get("UserProcGroup") is None
    assert key.unread() == [Unread("UserProcGroup", Location("t.reg", 3, 5),
                                   "undefined macro $(PROCGROUP_DRIVER_MSFT_DEFAULT)")]
    [d] = r.diagnostics
    assert d.message == 'undefined macro $(PROCGROUP_DRIVER_MSFT_DEFAULT) in "UserProcGroup"; the value is skipped'
    assert d.hint.startswith("-D PROCGROUP_DRIVER_MSFT_DEFAULT=N puts the driver in process group N")


def test_unread_does_not_change_the_key_digest_and_a_later_value_clears_it():
    r = parse(f'[{KEY}]\n"Irq"=dword:$(IRQ)\n')
    plain = parse(f'[{KEY}]\n')
    assert r.hive.key(KEY).digest() == plain.hive.key(KEY).digest() and r.hive == plain.hive
    r = parse(f'[{KEY}]\n"Irq"=dword:$(IRQ)\n"Irq"=dword:5\n')
    assert r.hive.key(KEY).unread() == [] and r.hive.key(KEY).get("Irq") == Value("Irq", "dword", 5)
    r = parse(f'[{KEY}]\n"Irq"=dword:$(IRQ)\n"Irq"=-\n')
    assert r.hive.key(KEY).unread() == []


def test_malformed_data_is_unread_too_and_keeps_an_earlier_value():
    r = parse(f'[{KEY}]\n"BaudRate"=dword:1C200\n"BaudRate"=dword:Change Me\n')
    key = r.hive.key(KEY)
    assert key.get("BaudRate").data == 0x1C200
    [u] = key.unread()
    assert u.name == "BaudRate" and u.reason == "dword data 'Change Me' is not hexadecimal"


def test_macro_in_a_value_name_is_not_recorded_under_an_unexpanded_name():
    r = parse(f'[{KEY}]\n"$(NAME)"=dword:1\n')
    assert r.hive.key(KEY).unread() == [] and len(r.diagnostics) == 1


def test_include_naming_a_build_tree_root_says_it_is_skipped_and_how_to_give_the_tree():
    r = parse('#define DRIVERS_DIR $(_PUBLICROOT)\\common\\oak\\drivers\n#include "$(DRIVERS_DIR)\\x.reg"\n')
    [d] = r.diagnostics
    assert d.message == ("undefined macro $(_PUBLICROOT) (in $(DRIVERS_DIR)) in the #include path; "
                         "the include is skipped")
    assert d.hint == ("$(_PUBLICROOT) is a folder of a CE build tree: -D _PUBLICROOT=DIR if you have that tree "
                      "(file names match in any letter case)")


def test_include_through_a_build_root_resolves_in_any_letter_case(tmp_path):
    (tmp_path / "SRC" / "DRIVERS" / "UART").mkdir(parents=True)
    (tmp_path / "SRC" / "DRIVERS" / "UART" / "uart.reg").write_text(
        f'IF BSP_UART1\n[{KEY}]\n\t"Dll"="omap_uart.dll"\nENDIF\n')
    main = tmp_path / "FILES" / "platform.reg"
    main.parent.mkdir()
    main.write_bytes(b'#define PLAT_DRIVERS_DIR $(_TARGETPLATROOT)\\src\\drivers\r\n'
                     b'#include "$(PLAT_DRIVERS_DIR)\\UART\\uart.reg"\r\n')
    from policy.regfile import parse_files
    r = parse_files([main], defines={"_TARGETPLATROOT": str(tmp_path), "BSP_UART1": "1"})
    assert r.diagnostics == [] and r.hive.key(KEY).get("Dll").data == "omap_uart.dll"


def test_include_made_absolute_by_a_macro_names_the_file_not_search_folders(tmp_path):
    r = parse('#include "$(ROOT)\\SRC\\DRIVERS\\Serial3\\serial3.reg"\n', defines={"ROOT": str(tmp_path)})
    [d] = r.diagnostics
    assert d.message == (f"include file not found: {tmp_path}/SRC/DRIVERS/Serial3/serial3.reg (in any letter case); "
                         "the include is skipped")


def test_quoted_define_is_a_quoted_string_where_used_bare_and_plain_text_inside_a_string():
    r = parse('#define BLOCK_GUID "{A4E7EDDA-E575-4252-9D6B-4195D48BB865}"\n'
              '#define PM_GUID    "{8DD679CE-8AB4-43C8-A14A-EA4963FAA715}"\n'
              f'[{KEY}]\n"IClass"=multi_sz:$(BLOCK_GUID), $(PM_GUID)\n"Name"="$(BLOCK_GUID)"\n'
              '"Both"="guid $(BLOCK_GUID)"\n')
    key = r.hive.key(KEY)
    assert r.diagnostics == []
    assert key.get("IClass").data == ("{A4E7EDDA-E575-4252-9D6B-4195D48BB865}", "{8DD679CE-8AB4-43C8-A14A-EA4963FAA715}")
    assert key.get("Name").data == "{A4E7EDDA-E575-4252-9D6B-4195D48BB865}"
    assert key.get("Both").data == "guid {A4E7EDDA-E575-4252-9D6B-4195D48BB865}"


def test_quoted_define_compares_as_a_string_in_if():
    r = parse('#define KBD "kbdmouse.dll"\n#if $(KBD)=="kbdmouse.dll"\n[HKLM\\A]\n"x"=dword:1\n#endif\n')
    assert r.diagnostics == [] and keys(r) == ["A"]
