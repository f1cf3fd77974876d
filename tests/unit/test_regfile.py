r"""The .reg parser: one test per syntax feature and per error, both the tolerant and the strict side."""

import textwrap
from pathlib import Path

import pytest

from policy.hive import Hive, Location, Value
from policy.regfile import Diagnostic, RegistryError, format_hive, parse_files, parse_text

SERIAL = r"HKLM\Drivers\BuiltIn\Serial"


def parse(text, **kw):
    if isinstance(text, str):
        text = textwrap.dedent(text)
    return parse_text(text, "t.reg", **kw)


def val(result, name, key=SERIAL):
    k = result.hive.key(key)
    assert k is not None, f"no key {key}"
    v = k.get(name)
    return None if v is None else v.data


def msgs(result):
    return [d.message for d in result.diagnostics]


def only_problem(text, **kw):
    """Parse tolerantly (expect exactly one diagnostic) and strictly (expect it raised)."""
    result = parse(text, **kw)
    assert len(result.diagnostics) == 1, msgs(result)
    with pytest.raises(RegistryError) as err:
        parse(text, strict=True, **kw)
    d = result.diagnostics[0]
    assert err.value.message == d.message and err.value.location == d.location
    return d


# ----------------------------------------------------------------------------- decoding

def test_utf8_bom_crlf_tabs_and_no_final_newline():
    raw = b'\xef\xbb\xbfREGEDIT4\r\n[HKLM\\Drivers\\BuiltIn\\Serial]\r\n\t"Dll"=\t"s.dll"\r\n\t"Irq"=dword:5'
    r = parse(raw)
    assert r.diagnostics == [] and val(r, "Dll") == "s.dll" and val(r, "Irq") == 5


def test_trailing_ctrl_z_is_end_of_file():
    r = parse(b'[HKLM\\Drivers\\BuiltIn\\Serial]\r\n"Irq"=dword:5\r\n\x1a')
    assert r.diagnostics == [] and val(r, "Irq") == 5
    r = parse(b'[HKLM\\Drivers\\BuiltIn\\Serial]\n"Irq"=dword:5\x1a\x1a\r\n')
    assert r.diagnostics == [] and val(r, "Irq") == 5


def test_utf16le_with_bom_as_regedit_writes_it():
    text = 'Windows Registry Editor Version 5.00\r\n\r\n[HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\Serial]\r\n"Name"="Ünï"\r\n'
    r = parse(b"\xff\xfe" + text.encode("utf-16-le"))
    assert r.diagnostics == [] and val(r, "Name") == "Ünï"


def test_gbk_in_a_comment_is_silent():
    raw = b'[HKLM\\Drivers\\BuiltIn\\Serial]\n"Irq"=dword:5 ; \xd6\xd0\xb6\xcf\n; \xb4\xae\xbf\xda\n'
    r = parse(raw)
    assert r.diagnostics == [] and val(r, "Irq") == 5


def test_gbk_in_a_string_is_read_and_reported():
    raw = b'[HKLM\\Drivers\\BuiltIn\\Serial]\n"FriendlyName"="\xb4\xae\xbf\xda"\n'
    r = parse(raw)
    assert val(r, "FriendlyName") == "串口"
    assert msgs(r) == ["line is not UTF-8; read as gbk"]
    assert r.diagnostics[0].location == Location("t.reg", 2, 17)
    # A decoding note is not a syntax problem: strict mode reads the file too.
    assert val(parse(raw, strict=True), "FriendlyName") == "串口"


def test_bytes_neither_utf8_nor_gbk_fall_back_to_latin1():
    r = parse(b'[HKLM\\Drivers\\BuiltIn\\Serial]\n"N"="\xff"\n')
    assert val(r, "N") == "ÿ" and msgs(r) == ["line is not UTF-8; read as latin-1"]


# ----------------------------------------------------------------------------- keys

def test_headers_are_optional_and_accepted():
    for header in ("REGEDIT4", "Windows Registry Editor Version 5.00", ""):
        r = parse(f'{header}\n[{SERIAL}]\n"Irq"=dword:1\n')
        assert r.diagnostics == [] and val(r, "Irq") == 1


def test_header_after_a_statement_is_reported():
    d = only_problem(f'[{SERIAL}]\nREGEDIT4\n')
    assert d.message == "'REGEDIT4' header after the start of the file"
    assert d.location == Location("t.reg", 2, 1)


def test_key_line_creates_an_empty_key():
    r = parse(f"[{SERIAL}]\n")
    assert r.hive.key(SERIAL).values() == []


def test_mixed_case_key_paths_are_one_key():
    r = parse(r'''
        [HKEY_LOCAL_MACHINE\Drivers\Builtin\Serial]
        "Dll"="a.dll"
        [hklm\DRIVERS\BuiltIn\serial]
        "Irq"=dword:3
    ''')
    k = r.hive.key(SERIAL)
    assert k.path == r"HKEY_LOCAL_MACHINE\Drivers\Builtin\Serial"
    assert (k.get("dll").data, k.get("IRQ").data) == ("a.dll", 3)


def test_comment_after_key_and_brackets_in_key_names():
    r = parse(r'''
        [HKLM\Drivers\BuiltIn\Serial]   ; the first UART [COM1]
        "Irq"=dword:3
        [HKLM\Odd]Name]
        [HKLM\Semi;colon]
    ''')
    assert r.diagnostics == [] and val(r, "Irq") == 3
    assert r.hive.key(r"HKLM\Odd]Name") is not None and r.hive.key(r"HKLM\Semi;colon") is not None


def test_delete_key_removes_subkeys():
    r = parse(r'''
        [HKLM\Drivers\BuiltIn\Serial\Config]
        "A"=dword:1
        [-HKLM\Drivers\BuiltIn\Serial]
        [HKLM\Drivers\BuiltIn\Other]
    ''')
    assert r.diagnostics == []
    assert r.hive.key(SERIAL) is None and r.hive.key(r"HKLM\Drivers\BuiltIn\Other") is not None


def test_value_after_delete_key_is_reported_and_ignored():
    d = only_problem(f'[-{SERIAL}]\n"Irq"=dword:1\n')
    assert d.message == r"value after [-HKEY_LOCAL_MACHINE\Drivers\BuiltIn\Serial], which deletes that key; ignored"


def test_unclosed_key_line():
    d = only_problem(r"[HKLM\Drivers\BuiltIn\Serial" + "\n")
    assert d.message == "expected ']' to close the key name; its values are skipped"
    assert d.location == Location("t.reg", 1, 29)
    assert str(d) == ("t.reg:1:29: warning: expected ']' to close the key name; its values are skipped\n"
                      "[HKLM\\Drivers\\BuiltIn\\Serial\n"
                      "                            ^\n"
                      "hint: a key line looks like [HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\Serial]")


def test_unknown_root_is_reported_and_its_values_skipped():
    r = parse('[Drivers\\BuiltIn\\Serial]\n"Irq"=dword:1\n[HKLM\\X]\n"Y"=dword:2\n')
    assert len(r.diagnostics) == 1
    assert r.diagnostics[0].message.startswith("bad key path: key path 'Drivers\\BuiltIn\\Serial' does not start with a root key")
    assert r.diagnostics[0].message.endswith("; its values are skipped")
    assert val(r, "Y", r"HKLM\X") == 2 and list(k.path for k in r.hive.keys()) == ["HKEY_LOCAL_MACHINE", r"HKEY_LOCAL_MACHINE\X"]


def test_empty_component_in_key_path():
    d = only_problem("[HKLM\\A\\\\B]\n")
    assert "has an empty component (two backslashes in a row?)" in d.message


# ----------------------------------------------------------------------------- values

def test_strings_and_escapes():
    r = parse(r'''
        [HKLM\Drivers\BuiltIn\Serial]
        "Path"="\\Windows\\serial.dll"
        "Quote"="say \"hi\""
        "Semi"="a;b" ; a real comment
        "Empty"=""
        "Raw"="\Windows\x.dll"
        "Spaced" = "v"
    ''')
    assert r.diagnostics == []
    assert val(r, "Path") == "\\Windows\\serial.dll"
    assert val(r, "Quote") == 'say "hi"'
    assert val(r, "Semi") == "a;b"
    assert val(r, "Empty") == ""
    assert val(r, "Raw") == "\\Windows\\x.dll"
    assert val(r, "Spaced") == "v"


def test_default_value():
    r = parse(f'[{SERIAL}]\n@="the default"\n')
    assert val(r, "") == "the default"


def test_value_names_are_case_insensitive_and_later_wins():
    r = parse(f'[{SERIAL}]\n"Order"=dword:1\n"ORDER"=dword:2\n')
    assert val(r, "order") == 2 and len(r.hive.key(SERIAL).values()) == 1


def test_delete_value():
    r = parse(f'[{SERIAL}]\n"Irq"=dword:1\n"Order"=dword:2\n"IRQ"=-\n"Never"=-\n')
    assert r.diagnostics == [] and val(r, "Irq") is None and val(r, "Order") == 2


def test_dword_forms():
    r = parse(r'''
        [HKLM\Drivers\BuiltIn\Serial]
        "A"=dword:FF;On
        "B"=dword:0000001c ;// C-style note after the comment mark
        "C"=dword:ffffffff
        "D"=DWORD:1
        "E"=dword:000000010
    ''')
    assert r.diagnostics == []
    assert [val(r, n) for n in "ABCDE"] == [0xFF, 0x1C, 0xFFFFFFFF, 1, 0x10]


def test_dword_not_hex():
    d = only_problem(f'[{SERIAL}]\n"Baud"=dword:Change Me\n')
    assert d.message == "dword data 'Change Me' is not hexadecimal"
    assert d.location == Location("t.reg", 2, 14)
    assert d.hint == "a dword is up to 8 hex digits without 0x, e.g. dword:1C200"


def test_dword_with_0x_prefix():
    d = only_problem(f'[{SERIAL}]\n"Irq"=dword:0x10\n')
    assert d.message == "dword data '0x10' has a '0x' prefix" and d.hint == "write dword:10"


def test_dword_too_large():
    d = only_problem(f'[{SERIAL}]\n"Irq"=dword:100000000\n')
    assert d.message == "dword data '100000000' does not fit in 32 bits"


def test_dword_empty():
    assert only_problem(f'[{SERIAL}]\n"Irq"=dword:\n').message == "dword: needs a value"


def test_hex_bytes_with_blanks_and_continuations():
    r = parse(r'''
        [HKLM\Drivers\BuiltIn\Serial]
        "A"=hex:01, 02 ,ff
        "B"=hex:0a,0b,\
              0c,\
              0d
        "C"=hex:10,11,
            12
        "D"=hex:
        "E"=hex:68,74,74,70,00 ; trailing comment
    ''')
    assert r.diagnostics == []
    assert val(r, "A") == b"\x01\x02\xff"
    assert val(r, "B") == b"\x0a\x0b\x0c\x0d"
    assert val(r, "C") == b"\x10\x11\x12"
    assert val(r, "D") == b""
    assert val(r, "E") == b"http\0"


def test_hex_bad_byte():
    d = only_problem(f'[{SERIAL}]\n"A"=hex:01,zz\n')
    assert d.message == "expected a hex byte (00..ff) in the hex list, found 'zz'"
    assert d.location == Location("t.reg", 2, 12)


def test_hex_empty_item():
    assert only_problem(f'[{SERIAL}]\n"A"=hex:01,,02\n').message == "empty item in the hex list (two commas in a row?)"


def test_hex_trailing_comma_without_continuation():
    d = only_problem(f'[{SERIAL}]\n"A"=hex:01,02,\n"B"=dword:1\n')
    assert d.message == "trailing ',' ends the hex list"
    r = parse(f'[{SERIAL}]\n"A"=hex:01,02,\n"B"=dword:1\n')
    assert val(r, "A") == b"\x01\x02" and val(r, "B") == 1


def test_typed_hex_values():
    u16 = lambda s: ",".join(f"{b:02x}" for b in s.encode("utf-16-le"))
    r = parse(textwrap.dedent(f'''
        [{SERIAL}]
        "Sz"=hex(1):{u16("abc" + chr(0))}
        "Exp"=hex(2):{u16("%WINDIR%" + chr(0))}
        "Bin"=hex(3):01,02
        "Dw"=hex(4):78,56,34,12
        "Multi"=hex(7):{u16("a" + chr(0) + "bc" + chr(0) + chr(0))}
        "EmptyMulti"=hex(7):00,00
        "Qw"=hex(b):01,00,00,00,00,00,00,80
        "None"=hex(0):
        "Big"=hex(5):00,00,00,01
    '''))
    assert r.diagnostics == []
    k = r.hive.key(SERIAL)
    got = {v.name: (v.type, v.data) for v in k.values()}
    assert got == {
        "Sz": ("sz", "abc"), "Exp": ("expand_sz", "%WINDIR%"), "Bin": ("binary", b"\1\2"),
        "Dw": ("dword", 0x12345678), "Multi": ("multi_sz", ("a", "bc")), "EmptyMulti": ("multi_sz", ()),
        "Qw": ("qword", 0x8000000000000001), "None": ("hex(0)", b""), "Big": ("hex(5)", b"\0\0\0\1"),
    }


@pytest.mark.parametrize("data,message", [
    ("hex(2):41", "hex(2) data has an odd number of bytes (1); expected UTF-16LE"),
    ("hex(4):01,02", "hex(4) data must be 4 bytes, found 2"),
    ("hex(b):01", "hex(b) data must be 8 bytes, found 1"),
    ("hex(7):00,d8", "hex(7) data is not valid UTF-16LE"),
    ("hex(1):41,00,00,00,42,00", "hex(1) string has a NUL inside it"),
    ("hex(q):00", "hex(q) is not a type number"),
])
def test_typed_hex_errors(data, message):
    assert only_problem(f'[{SERIAL}]\n"A"={data}\n').message == message


def test_multi_sz_forms():
    r = parse(r'''
        [HKLM\Drivers\BuiltIn\Serial]
        "IClass"=multi_sz:"{CC5195AC-BA49-48a0-BE17-DF6D1B0173DD}","{A32942B7-920C-486b-B0E6-92A702A99B35}"
        "MemBase"=multi_sz:"48004000", "48006000"
        "Cont"=multi_sz:"a",\
                        "b"
        "Comma"=multi_sz:"c",  ; first
                         "d"   ; second
        "One"=multi_sz:"only"
        "Empty"=multi_sz:
    ''')
    assert r.diagnostics == []
    assert val(r, "IClass") == ("{CC5195AC-BA49-48a0-BE17-DF6D1B0173DD}", "{A32942B7-920C-486b-B0E6-92A702A99B35}")
    assert val(r, "MemBase") == ("48004000", "48006000")
    assert val(r, "Cont") == ("a", "b")
    assert val(r, "Comma") == ("c", "d")
    assert val(r, "One") == ("only",)
    assert val(r, "Empty") == ()


def test_multi_sz_trailing_comma_is_kept_but_reported():
    text = f'[{SERIAL}]\n"L"=multi_sz:"a","b",\n"Irq"=dword:1\n'
    d = only_problem(text)
    assert d.message == "trailing ',' ends the multi_sz list"
    r = parse(text)
    assert val(r, "L") == ("a", "b") and val(r, "Irq") == 1


def test_multi_sz_unquoted_item():
    d = only_problem(f'[{SERIAL}]\n"L"=multi_sz:"a",b\n')
    assert d.message == "expected a quoted string in the multi_sz list, found 'b'"
    assert d.hint == 'multi_sz items are quoted and separated by commas: multi_sz:"a","b"'


def test_multi_sz_missing_comma():
    d = only_problem(f'[{SERIAL}]\n"L"=multi_sz:"a" "b"\n')
    assert d.message == "expected ',' between multi_sz items, found '\"b\"'"


def test_mui_sz_is_a_string():
    r = parse(f'[{SERIAL}]\n"DisplayName"=mui_sz:"serial.dll,#101"\n')
    v = r.hive.key(SERIAL).get("DisplayName")
    assert (v.type, v.data) == ("sz", "serial.dll,#101")


def test_mui_sz_continued_by_comma_and_wrong_count():
    r = parse(f'[{SERIAL}]\n"D"=mui_sz:\\\n   "x.dll,#1"\n')
    assert r.diagnostics == [] and val(r, "D") == "x.dll,#1"
    assert only_problem(f'[{SERIAL}]\n"D"=mui_sz:"a","b"\n').message == "mui_sz takes one string, found 2"


def test_value_records_its_location():
    r = parse(f'[{SERIAL}]\n\n   "Irq"=dword:5\n')
    assert r.hive.key(SERIAL).get("Irq").location == Location("t.reg", 3, 4)


def test_parse_into_an_existing_hive():
    h = Hive()
    h.set_value(SERIAL, Value("Dll", "sz", "old.dll"))
    r = parse(f'[{SERIAL}]\n"Irq"=dword:1\n', hive=h)
    assert r.hive is h and val(r, "Dll") == "old.dll" and val(r, "Irq") == 1


# ----------------------------------------------------------------------------- malformed lines

def test_unquoted_value_name():
    d = only_problem(f'[{SERIAL}]\nDefault=dword:0\n')
    assert d.message == "unexpected 'Default=dword:0': expected a [KEY], a value or a comment"
    assert d.hint == 'value names are quoted: "Default"=...'


def test_stray_dash_line():
    d = only_problem(f'[{SERIAL}]\n-----\n"Irq"=dword:1\n')
    assert d.message == "stray line '-----': expected a [KEY], a value or a comment"
    assert d.location == Location("t.reg", 2, 1)
    assert val(parse(f'[{SERIAL}]\n-----\n"Irq"=dword:1\n'), "Irq") == 1


def test_value_before_any_key():
    d = only_problem('"Irq"=dword:1\n')
    assert d.message == "value outside any key"
    assert d.hint == "put a [HKEY_LOCAL_MACHINE\\...] line before it"


def test_unquoted_data():
    d = only_problem(f'[{SERIAL}]\n"Name"=PLATFORMNAME\n')
    assert d.message == "expected a quoted string, dword:, hex:, hex(N):, multi_sz: or -, found 'PLATFORMNAME'"
    assert d.hint == 'quote the string: "PLATFORMNAME"'
    d = only_problem(f'[{SERIAL}]\n"Name"=LOC_PLATFORMNAME\n')
    assert d.hint == 'LOC_PLATFORMNAME is a CE localisation id: write the string itself, e.g. "My Device"'


def test_unknown_type():
    d = only_problem(f'[{SERIAL}]\n"Q"=qword:1\n')
    assert d.message == "unknown value type 'qword:'"


def test_unterminated_string():
    d = only_problem(f'[{SERIAL}]\n"Path"="C:\\"\n')
    assert d.message == "string is not closed: expected '\"'"
    assert d.location == Location("t.reg", 2, 8)


def test_text_after_string():
    d = only_problem(f'[{SERIAL}]\n"Dll"="a.dll" junk\n')
    assert d.message == "unexpected 'junk' after the string"
    assert d.location == Location("t.reg", 2, 15)


def test_missing_equals():
    assert only_problem(f'[{SERIAL}]\n"Dll" "a"\n').message == "expected '=' after the value name, found '\"a\"'"


def test_missing_data():
    assert only_problem(f'[{SERIAL}]\n"Dll"=\n').message == "expected data after '='"


def test_backslash_continuation_without_a_next_line():
    d = only_problem(f'[{SERIAL}]\n"A"=hex:01\\\n[HKLM\\X]\n')
    assert d.message == "'\\' continues the line, but no continuation line follows"


def test_unwritable_value_name():
    d = only_problem(f'[{SERIAL}]\n"a$(b"=dword:1\n')
    assert "contains '$('" in d.message


def test_one_bad_line_does_not_lose_the_rest():
    r = parse(f'[{SERIAL}]\n"Irq"=dword:zz\n"Order"=dword:2\nnonsense\n"Dll"="s.dll"\n')
    assert len(r.diagnostics) == 2 and val(r, "Order") == 2 and val(r, "Dll") == "s.dll" and val(r, "Irq") is None


# ----------------------------------------------------------------------------- CE IF blocks

def ce_block(defines):
    return parse(r'''
        [HKLM\Drivers\BuiltIn\Serial]
        IF BSP_SERIAL2
            "A"=dword:1
        ELSE
            "A"=dword:2
        ENDIF
        IF BSP_NOSERIAL !
            "B"=dword:1
        ENDIF BSP_NOSERIAL !
        IF BSP_NOSERIAL
            "C"=dword:1
        ENDIF BSP_NOSERIAL
    ''', defines=defines)


def test_ce_if_true_when_set_and_not_empty():
    r = ce_block({"BSP_SERIAL2": "1", "BSP_NOSERIAL": "1"})
    assert r.diagnostics == []
    assert (val(r, "A"), val(r, "B"), val(r, "C")) == (1, None, 1)


def test_ce_if_false_when_unset_or_empty():
    for defines in ({}, {"BSP_SERIAL2": "", "BSP_NOSERIAL": ""}):
        r = ce_block(defines)
        assert r.diagnostics == []
        assert (val(r, "A"), val(r, "B"), val(r, "C")) == (2, 1, None)


def test_ce_if_zero_is_set():
    assert val(ce_block({"BSP_SERIAL2": "0"}), "A") == 1


def test_ce_if_trailing_blanks_comments_and_nesting():
    r = parse(r'''
        [HKLM\Drivers\BuiltIn\Serial]
        IF BSP_NOPCIBUS !   
          IF BSP_USB ; a comment
            "A"=dword:1
          ENDIF ; BSP_USB
          "B"=dword:2
        ENDIF BSP_NOPCIBUS !
    ''', defines={"BSP_USB": "1"})
    assert r.diagnostics == [] and val(r, "A") == 1 and val(r, "B") == 2


def test_value_set_twice_later_one_under_a_conditional():
    text = f'[{SERIAL}]\n"Irq"=dword:3\nIF BSP_ALT_IRQ\n"Irq"=dword:4\nENDIF\n'
    assert val(parse(text), "Irq") == 3
    assert val(parse(text, defines={"BSP_ALT_IRQ": "1"}), "Irq") == 4


def test_endif_name_mismatch():
    d = only_problem(f'[{SERIAL}]\nIF BSP_A\nENDIF BSP_B\n')
    assert d.message == "'ENDIF BSP_B' closes 'IF BSP_A' (line 2)"


def test_ce_if_never_closed():
    d = only_problem(f'[{SERIAL}]\nIF BSP_A !\n"Irq"=dword:1\n')
    assert d.message == "'IF BSP_A !' is never closed" and d.location == Location("t.reg", 2, 1)
    assert d.hint == "add ENDIF where the conditional block ends"


def test_ce_endif_without_if():
    d = only_problem(f'[{SERIAL}]\nENDIF\n')
    assert d.message == "'ENDIF' without a matching 'IF'"


def test_ce_if_malformed():
    d = only_problem(f'[{SERIAL}]\nIF A B C\nENDIF\n')
    assert d.message == "expected 'IF NAME', 'IF NAME=VALUE' or either followed by ' !', found 'IF A B C'; " \
                        "the block is skipped"


def test_ce_second_else():
    assert only_problem("IF A\nELSE\nELSE\nENDIF\n").message == "second ELSE for 'IF A' (line 1)"


# ----------------------------------------------------------------------------- # directives

def cpp_value(cond, defines=None):
    r = parse(f"[{SERIAL}]\n{cond}\n\"X\"=dword:1\n#else\n\"X\"=dword:0\n#endif // done\n", defines=defines)
    return val(r, "X"), msgs(r)


@pytest.mark.parametrize("cond,defines,expected", [
    ("#ifdef A", {"A": ""}, 1),
    ("#ifdef A", {}, 0),
    ("#ifndef A", {}, 1),
    ("#if defined A", {"A": "0"}, 1),
    ("#if defined(A)", {}, 0),
    ("#if ! defined A", {}, 1),
    ("#if !defined(A)", {"A": "1"}, 0),
    ("#if (defined A || defined B)", {"B": "1"}, 1),
    ("#if (defined A || defined B)", {}, 0),
    ("#if defined A && defined B", {"A": "1"}, 0),
    ("#if defined A && !defined B", {"A": "1"}, 1),
    ("#if $(LOCALE)==0412", {"LOCALE": "0412"}, 1),
    ("#if $(LOCALE)==0412", {"LOCALE": "0409"}, 0),
    ("#if $(LOCALE) != 0412", {"LOCALE": "0409"}, 1),
    ("#if LEVEL >= 2", {"LEVEL": "3"}, 1),
    ("#if UNDEFINED_NAME", {}, 0),
    ("#if 0x10 == 16", {}, 1),
    ('#if "$(KITL)" == "SERIAL"', {"KITL": "SERIAL"}, 1),
    ("#if BSP_KITL == SERIAL_UART0", {"BSP_KITL": "SERIAL_UART0", "SERIAL_UART0": "SERIAL_UART0"}, 1),
])
def test_cpp_conditions(cond, defines, expected):
    got, problems = cpp_value(cond, defines)
    assert problems == [] and got == expected


def test_elif_chain():
    text = f"[{SERIAL}]\n#if $(V)==1\n\"X\"=dword:1\n#elif $(V)==2\n\"X\"=dword:2\n#elif $(V)==3\n\"X\"=dword:3\n#else\n\"X\"=dword:9\n#endif\n"
    assert [val(parse(text, defines={"V": v}), "X") for v in "1234"] == [1, 2, 3, 9]


def test_condition_with_undefined_macro_is_false_with_a_warning():
    got, problems = cpp_value("#if $(LOCALE)==0412")
    assert got == 0
    assert problems == ["undefined macro $(LOCALE) in condition '#if $(LOCALE)==0412'; treated as false"]
    with pytest.raises(RegistryError) as err:
        parse(f"#if $(LOCALE)==0412\n#endif\n", strict=True)
    assert "hint: define it on the command line (-D LOCALE=VALUE)" in str(err.value)


def test_condition_that_cannot_be_evaluated():
    got, problems = cpp_value("#if (defined A")
    assert got == 0 and problems == ["cannot evaluate '#if (defined A': condition ends too early; treated as false"]
    got, problems = cpp_value("#if NAME", {"NAME": "text"})
    assert problems == ["cannot evaluate '#if NAME': 'text' is not a number; treated as false"]


def test_inactive_blocks_are_not_evaluated_or_parsed():
    r = parse(f"[{SERIAL}]\n#ifdef NOPE\n#if $(UNDEFINED)==1\n\"X\"=dword:zz\n#bogus\n#endif\nIF A B C\nENDIF\ngarbage\n#endif\n")
    assert r.diagnostics == []


def test_define_and_undef():
    r = parse(r'''
        #define BUILTIN_ROOT HKEY_LOCAL_MACHINE\Drivers\BuiltIn
        #define SERIAL_ROOT $(BUILTIN_ROOT)\Serial
        #define NAME "COM port"
        #define IRQ 1f
        [$(SERIAL_ROOT)]
        "FriendlyName"="$(NAME)"
        "Irq"=dword:$(IRQ)
        #undef IRQ
        #ifdef IRQ
        "Undefined"=dword:1
        #endif
    ''')
    assert r.diagnostics == []
    assert val(r, "FriendlyName") == "COM port" and val(r, "Irq") == 0x1F and val(r, "Undefined") is None


def test_file_define_replaces_command_line_define():
    r = parse(f"#define IRQ 5\n[{SERIAL}]\n\"Irq\"=dword:$(IRQ)\n", defines={"IRQ": "7"})
    assert val(r, "Irq") == 5


def test_macro_in_dword_from_the_command_line():
    r = parse(f'[{SERIAL}]\n"UserProcGroup"=dword:$(PROCGROUP_SERIAL)\n', defines={"PROCGROUP_SERIAL": "3"})
    assert r.diagnostics == [] and val(r, "UserProcGroup") == 3


HINT_PROCGROUP_SERIAL = ("-D PROCGROUP_SERIAL=N puts the driver in process group N (HKLM\\Drivers\\ProcGroup_000N); "
                         "CE defines it in a .reg file outside the BSP. Without it the driver gets a host of its own")


def test_undefined_macro_in_a_value():
    text = f'[{SERIAL}]\n"UserProcGroup"=dword:$(PROCGROUP_SERIAL)\n"Irq"=dword:1\n'
    d = only_problem(text)
    assert d.message == 'undefined macro $(PROCGROUP_SERIAL) in "UserProcGroup"; the value is skipped'
    assert d.location == Location("t.reg", 2, 23)
    assert d.hint == HINT_PROCGROUP_SERIAL
    r = parse(text)
    assert val(r, "UserProcGroup") is None and val(r, "Irq") == 1
    with pytest.raises(RegistryError) as err:
        parse(text, strict=True)
    assert str(err.value) == (
        't.reg:2:23: undefined macro $(PROCGROUP_SERIAL) in "UserProcGroup"; the value is skipped\n'
        '"UserProcGroup"=dword:$(PROCGROUP_SERIAL)\n'
        "                      ^\n"
        f"hint: {HINT_PROCGROUP_SERIAL}")


def test_undefined_macro_in_a_key_path_skips_the_key():
    r = parse('[$(ROOT)\\Serial]\n"Irq"=dword:1\n')
    assert msgs(r) == ["undefined macro $(ROOT) in the key path; its values are skipped"]
    assert list(r.hive.keys()) == []


def test_undefined_macro_inside_another_names_both():
    d = only_problem('#define DRIVERS_DIR $(_PUBLICROOT)\\common\\oak\\drivers\n#include "$(DRIVERS_DIR)\\x.reg"\n')
    assert d.message == "undefined macro $(_PUBLICROOT) (in $(DRIVERS_DIR)) in the #include path; the include is skipped"
    assert d.hint == "$(_PUBLICROOT) is a folder of a CE build tree: -D _PUBLICROOT=DIR if you have that tree " \
                     "(file names match in any letter case)"
    assert d.location == Location("t.reg", 2, 11)


def test_recursive_macro():
    d = only_problem(f'#define A $(A)x\n[{SERIAL}]\n"V"="$(A)"\n')
    assert d.message == "macro $(A) expands into itself (more than 32 levels deep)"


def test_function_like_define_and_unknown_directive():
    assert only_problem("#define F(x) x\n").message == "function-like macro F(...) is not supported"
    assert only_problem("#pragma once\n").message == "unknown directive '#pragma'"


def test_cpp_else_without_if_and_unclosed_if():
    assert only_problem("#else\n").message == "'#else' without a matching '#if'"
    assert only_problem("#ifdef A\n").message == "'#ifdef A' is never closed"
    assert only_problem("IF A\n#endif\nENDIF\n").message == (
        "'#endif' without a matching '#if'; the innermost open block is 'IF A' (line 1)")


def test_cesysgen_and_xipregion_comments_are_plain_comments():
    r = parse(r'''
        ; @CESYSGEN IF CE_MODULES_SERIAL
        ; @XIPREGION IF DEFAULT_DEVICE
        [HKLM\Drivers\BuiltIn\Serial]
            "Dll"="serial.dll"
        ; @XIPREGION ENDIF DEFAULT_DEVICE
        ; @CESYSGEN ELSE
            "Dll"="other.dll"
        ; @CESYSGEN ENDIF CE_MODULES_SERIAL
    ''')
    assert r.diagnostics == [] and val(r, "Dll") == "other.dll"


# ----------------------------------------------------------------------------- #include

def test_include_relative_with_macro_and_backslashes(tmp_path):
    (tmp_path / "src" / "drivers").mkdir(parents=True)
    (tmp_path / "src" / "drivers" / "serial.reg").write_text(f'[{SERIAL}]\n"Dll"="serial.dll"\n')
    main = tmp_path / "platform.reg"
    main.write_text('#include "$(_TARGETPLATROOT)\\src\\drivers\\serial.reg"\n"Irq"=dword:4\n')
    r = parse_files([main], defines={"_TARGETPLATROOT": str(tmp_path)})
    assert r.diagnostics == []
    assert val(r, "Dll") == "serial.dll" and val(r, "Irq") == 4   # the key carries on after the include
    r = parse_files([main], defines={"_TARGETPLATROOT": "."})
    assert r.diagnostics == [] and val(r, "Dll") == "serial.dll"


def test_include_is_found_case_insensitively_and_via_include_dirs(tmp_path):
    (tmp_path / "Common").mkdir()
    (tmp_path / "Common" / "Serial.REG").write_text(f'[{SERIAL}]\n"Dll"="serial.dll"\n')
    r = parse_text('#include "common\\serial.reg"\n', "<cmdline>", include_dirs=[tmp_path])
    assert r.diagnostics == [] and val(r, "Dll") == "serial.dll"


def test_missing_include_is_a_warning_naming_the_path(tmp_path):
    main = tmp_path / "platform.reg"
    main.write_text('#include "nothere.reg"\n')
    r = parse_files([main])
    assert msgs(r) == [f"include file not found: 'nothere.reg' (searched {tmp_path})"]
    with pytest.raises(RegistryError):
        parse_files([main], strict=True)


def test_include_with_undefined_macro():
    d = only_problem('#include "$(_PUBLICROOT)\\common\\x.reg"\n')
    assert d.message == "undefined macro $(_PUBLICROOT) in the #include path; the include is skipped"
    assert d.location == Location("t.reg", 1, 11)


def test_include_cycle(tmp_path):
    a, b = tmp_path / "a.reg", tmp_path / "b.reg"
    a.write_text('#include "b.reg"\n')
    b.write_text('#include "a.reg"\n')
    r = parse_files([a])
    assert len(r.diagnostics) == 1 and "would recurse" in r.diagnostics[0].message
    assert r.diagnostics[0].location.file == str(b)


def test_problems_in_included_files_name_that_file(tmp_path):
    (tmp_path / "inc.reg").write_text(f'[{SERIAL}]\n"Irq"=dword:zz\n')
    main = tmp_path / "main.reg"
    main.write_text('#include "inc.reg"\n')
    r = parse_files([main])
    assert [str(d.location) for d in r.diagnostics] == [f"{tmp_path / 'inc.reg'}:2:13"]


# ----------------------------------------------------------------------------- several files

def test_files_merge_in_order_later_wins_and_deletes(tmp_path):
    a, b = tmp_path / "a.reg", tmp_path / "b.reg"
    a.write_text(f'#define GRP 2\n[{SERIAL}]\n"Irq"=dword:3\n"Order"=dword:1\n[HKLM\\Drivers\\BuiltIn\\Gone]\n')
    b.write_text(f'[{SERIAL.upper()}]\n"irq"=dword:4\n"Order"=-\n"UserProcGroup"=dword:$(GRP)\n'
                 '[-HKLM\\Drivers\\BuiltIn\\Gone]\n')
    r = parse_files([a, b])
    assert r.diagnostics == []
    assert val(r, "Irq") == 4 and val(r, "Order") is None and val(r, "UserProcGroup") == 2
    assert r.hive.key(r"HKLM\Drivers\BuiltIn\Gone") is None


def test_a_key_does_not_carry_into_the_next_file(tmp_path):
    a, b = tmp_path / "a.reg", tmp_path / "b.reg"
    a.write_text(f"[{SERIAL}]\n")
    b.write_text('"Irq"=dword:1\n')
    assert msgs(parse_files([a, b])) == ["value outside any key"]


def test_unreadable_file_is_an_error_even_when_tolerant(tmp_path):
    with pytest.raises(RegistryError) as err:
        parse_files([tmp_path / "missing.reg"])
    assert str(err.value) == f"{tmp_path / 'missing.reg'}: cannot read registry file: No such file or directory\nhint: check the path"


def test_diagnostic_is_a_value_object():
    d = Diagnostic(Location("a.reg", 1, 2), "m")
    assert d.severity == "warning" and str(d) == "a.reg:1:2: warning: m"


# ----------------------------------------------------------------------------- a whole BSP file

BSP = Path(__file__).resolve().parent.parent / "data" / "reg"
BSP_DEFINES = {"_TARGETPLATROOT": str(BSP), "LOCALE": "0804", "BSP_SERIAL2": "1", "BSP_USB_EHCI": "1"}


def test_bsp_fixture_is_what_real_files_look_like():
    raw = (BSP / "platform.reg").read_bytes()
    assert raw.count(b"\r\n") > 300 and raw.endswith(b"\x1a") and not raw.endswith(b"\r\n\x1a")
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")


def test_bsp_fixture_parses_with_the_expected_diagnostics():
    r = parse_files([BSP / "platform.reg"], defines=BSP_DEFINES)
    f = str(BSP / "platform.reg")
    assert [(d.location.line, d.location.column, d.message) for d in r.diagnostics] == [
        (97, 18, "line is not UTF-8; read as gbk"),
        (124, 19, "dword data 'Change Me' is not hexadecimal"),
        (140, 24, 'undefined macro $(PROCGROUP_GPIO) in "UserProcGroup"; the value is skipped'),
        (148, 1, "unexpected 'Default=dword:0': expected a [KEY], a value or a comment"),
        (202, 1, "stray line '-----': expected a [KEY], a value or a comment"),
        (323, 11, "undefined macro $(_PUBLICROOT) in the #include path; the include is skipped"),
        (328, 29, "undefined macro $(BSP_KITL_PORT) in condition "
                  "'#if ! defined BSP_NOKITL && $(BSP_KITL_PORT)==2'; treated as false"),
    ]
    assert {d.location.file for d in r.diagnostics} == {f}
    h = r.hive
    builtin = h.key(r"HKLM\Drivers\BuiltIn")
    with_dll = sorted(k.name for k in h.keys()
                      if k.path.casefold().startswith(builtin.path.casefold()) and k.get("Dll"))
    assert with_dll == ["Audio", "Display", "GPIO", "I2C1", "SDHC", "Serial1", "Serial2", "USBH", "UsbFn"]
    serial = h.key(r"HKLM\Drivers\BuiltIn\Serial1")
    assert serial.get("FriendlyName").data == "串口 1"
    assert serial.get("Order").data == 0x10 and serial.get("Flags").data == 0x10
    assert serial.get("Tsp").data == "unimodem.dll" and serial.get("Obsolete") is None     # from the include
    assert serial.get("IClass").data == ("{CC5195AC-BA49-48a0-BE17-DF6D1B0173DD}=%b",
                                         "{A32942B7-920C-486b-B0E6-92A702A99B35}")
    assert serial.get("IoctlAllow").data == ("0x001B0004-0x001B0090", "0x00220004")
    assert serial.get("RxBufferSize").data == 0x800
    assert serial.get("Irq").data == 4
    assert serial.get("DevConfig").data == h.key(r"HKLM\Drivers\BuiltIn\Serial1\Unimodem").get("DevConfig").data
    assert len(serial.get("DevConfig").data) == 25
    assert h.key(r"HKLM\Drivers\BuiltIn\Serial2").get("BaudRate") is None
    gpio = h.key(r"HKLM\Drivers\BuiltIn\GPIO")
    assert gpio.get("MemBase").data == ("48004000", "48006000")
    assert gpio.get("UserProcGroup") is None and gpio.get("Legacy") is None
    assert h.key(r"HKLM\Drivers\BuiltIn\Obsolete") is None
    assert h.key(r"HKLM\Drivers\BuiltIn\SDHC\Slot1").get("CardDetectGpio").data == 0x3B
    assert h.key(r"HKLM\Drivers\BuiltIn\I2C1\Devices\Codec").get("Address").data == 0x1A
    assert h.key(r"HKLM\Drivers\ProcGroup_0003").get("ProcTimeout").data == 180000
    assert h.key(r"HKLM\System\StorageManager\Profiles\SDMemory\FATFS").get("Flags").data == 0x14
    assert h.key(r"HKLM\nls").get("DefaultLCID").data == 0x804
    assert h.key(r"HKLM\Platform").get("Name").data == "DRVBOX EVM"
    assert h.key(r"HKLM\System\GDI\Drivers").get("DisplayCandidates").data == ("LCD",)
    assert h.key(r"HKLM\Drivers\Display\LCD").get("PixelClock").data == 100_000_000
    assert h.key(r"HKLM\Drivers\USB\FunctionDrivers").get("DefaultClientDriver") is None
    assert h.key(r"HKLM\System\CurrentControlSet\Control\Power\ActivityTimers\UserActivity").get(
        "WakeSources").data == ("{A32942B7-920C-486b-B0E6-92A702A99B35}\\$devices\\SYS1:",)


def test_bsp_fixture_with_other_defines():
    defines = {**BSP_DEFINES, "LOCALE": "0409", "BSP_UART1_ALT_IRQ": "1", "BSP_NOUSB": "1", "BSP_NOAUDIO": "",
               "PROCGROUP_GPIO": "2", "BSP_KITL_PORT": "2", "_PUBLICROOT": str(BSP), "BSP_USBFN_SERIAL": "1"}
    del defines["BSP_SERIAL2"]
    r = parse_files([BSP / "platform.reg"], defines=defines)
    assert [d.location.line for d in r.diagnostics] == [97, 148, 202, 323]
    assert r.diagnostics[-1].message.startswith("include file not found: ")
    h = r.hive
    assert h.key(r"HKLM\nls").get("DefaultLCID").data == 0x409
    assert h.key(r"HKLM\Drivers\BuiltIn\Serial1").get("Irq").data == 5
    assert h.key(r"HKLM\Drivers\BuiltIn\GPIO").get("UserProcGroup").data == 2
    assert h.key(r"HKLM\Drivers\BuiltIn\USBH") is None and h.key(r"HKLM\Drivers\BuiltIn\UsbFn") is None
    assert h.key(r"HKLM\Drivers\BuiltIn\Audio") is None          # #ifndef BSP_NOAUDIO: defined, even empty
    assert h.key(r"HKLM\Drivers\BuiltIn\Serial2").values() == [Value("Flags", "dword", 4)]


def test_bsp_fixture_strict_stops_at_the_first_problem():
    with pytest.raises(RegistryError) as err:
        parse_files([BSP / "platform.reg"], defines=BSP_DEFINES, strict=True)
    assert str(err.value).splitlines() == [
        f"{BSP / 'platform.reg'}:124:19: dword data 'Change Me' is not hexadecimal",
        '\t"BaudRate"=dword:Change Me',
        "\t                 ^",
        "hint: a dword is up to 8 hex digits without 0x, e.g. dword:1C200",
    ]


def test_bsp_fixture_round_trips_through_the_printer():
    h = parse_files([BSP / "platform.reg"], defines=BSP_DEFINES).hive
    assert parse_text(format_hive(h), "printed.reg", strict=True).hive == h
