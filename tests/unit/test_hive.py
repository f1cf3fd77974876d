"""The case-insensitive hive: lookups, merging, deletion, digest, equality, and what it refuses."""

import pytest

from policy.hive import Hive, Location, Value, split_path


def test_location_str_is_file_line_col():
    assert str(Location("platform.reg", 12, 5)) == "platform.reg:12:5"


def test_root_aliases_normalise_to_long_names():
    h = Hive()
    k = h.ensure_key(r"HKLM\Drivers\BuiltIn\Serial")
    assert k.path == r"HKEY_LOCAL_MACHINE\Drivers\BuiltIn\Serial"
    assert k.name == "Serial"
    for alias, long in [("HKCU", "HKEY_CURRENT_USER"), ("HKCR", "HKEY_CLASSES_ROOT"), ("HKU", "HKEY_USERS"),
                        ("hkcc", "HKEY_CURRENT_CONFIG")]:
        assert h.ensure_key(alias + r"\X").path == long + r"\X"


def test_lookup_is_case_insensitive_and_keeps_first_spelling():
    h = Hive()
    h.ensure_key(r"HKEY_LOCAL_MACHINE\Drivers\BuiltIn")
    k = h.key(r"hklm\DRIVERS\builtin")
    assert k is not None and k.path == r"HKEY_LOCAL_MACHINE\Drivers\BuiltIn"
    assert h.ensure_key(r"HKLM\drivers\Builtin") is k
    assert h.key(r"HKLM\Drivers\Missing") is None
    assert h.key(r"HKCU\Drivers") is None


def test_value_names_are_case_insensitive_and_later_set_wins_in_place():
    h = Hive()
    h.set_value(r"HKLM\D", Value("Dll", "sz", "a.dll"))
    h.set_value(r"HKLM\D", Value("Order", "dword", 1))
    h.set_value(r"HKLM\D", Value("DLL", "sz", "b.dll"))
    k = h.key(r"HKLM\D")
    assert k.get("dll").data == "b.dll"
    assert [v.name for v in k.values()] == ["DLL", "Order"]


def test_subkeys_and_depth_first_order():
    h = Hive()
    h.ensure_key(r"HKLM\A\B")
    h.ensure_key(r"HKLM\C")
    h.ensure_key(r"HKLM\A\D")
    assert [k.path for k in h.keys()] == [
        "HKEY_LOCAL_MACHINE", r"HKEY_LOCAL_MACHINE\A", r"HKEY_LOCAL_MACHINE\A\B",
        r"HKEY_LOCAL_MACHINE\A\D", r"HKEY_LOCAL_MACHINE\C"]
    a = h.key(r"HKLM\A")
    assert [k.name for k in a.subkeys()] == ["B", "D"]
    assert a.subkey("b").name == "B" and a.subkey("x") is None


def test_delete_value_and_key_with_subkeys():
    h = Hive()
    h.set_value(r"HKLM\A\B", Value("x", "dword", 1))
    h.set_value(r"HKLM\A", Value("y", "dword", 2))
    h.delete_value(r"HKLM\a", "Y")
    assert h.key(r"HKLM\A").get("y") is None
    h.delete_value(r"HKLM\nope", "y")          # absent: no error, as "y"=- in a .reg
    h.delete_key(r"hklm\a")
    assert h.key(r"HKLM\A") is None and h.key(r"HKLM\A\B") is None
    h.delete_key(r"HKLM\nope\deeper")
    h.delete_key("HKLM")
    assert list(h.keys()) == []


def test_equality_ignores_case_and_order_but_not_data_or_type():
    a, b = Hive(), Hive()
    a.set_value(r"HKLM\D", Value("Dll", "sz", "x.dll"))
    a.set_value(r"HKLM\D", Value("Irq", "dword", 5))
    b.set_value(r"hklm\d", Value("IRQ", "dword", 5))
    b.set_value(r"hklm\d", Value("DLL", "sz", "x.dll"))
    assert a == b
    b.set_value(r"HKLM\D", Value("Irq", "qword", 5))
    assert a != b
    b.set_value(r"HKLM\D", Value("Irq", "dword", 5))
    b.set_value(r"HKLM\D", Value("Dll", "sz", "X.dll"))     # data is case-sensitive
    assert a != b


def test_equality_counts_empty_keys():
    a, b = Hive(), Hive()
    a.ensure_key(r"HKLM\Empty")
    b.ensure_key("HKLM")
    assert a != b
    b.ensure_key(r"HKLM\EMPTY")
    assert a == b


def test_digest_depends_on_values_only():
    a, b = Hive(), Hive()
    a.set_value(r"HKLM\D", Value("Dll", "sz", "x.dll", Location("a.reg", 1, 1)))
    a.set_value(r"HKLM\D", Value("Irq", "dword", 5))
    a.ensure_key(r"HKLM\D\Sub")
    b.set_value(r"HKLM\D", Value("IRQ", "dword", 5, Location("b.reg", 9, 9)))
    b.set_value(r"HKLM\D", Value("dll", "sz", "x.dll"))
    da = a.key(r"HKLM\D").digest()
    assert da == b.key(r"HKLM\D").digest()
    assert len(da) == 64 and int(da, 16) >= 0
    b.set_value(r"HKLM\D", Value("Irq", "dword", 6))
    assert b.key(r"HKLM\D").digest() != da


def test_digest_distinguishes_types_with_similar_data():
    a, b = Hive(), Hive()
    a.set_value(r"HKLM\D", Value("v", "sz", "ab"))
    b.set_value(r"HKLM\D", Value("v", "expand_sz", "ab"))
    assert a.key(r"HKLM\D").digest() != b.key(r"HKLM\D").digest()
    a.set_value(r"HKLM\D", Value("v", "multi_sz", ("a", "b")))
    b.set_value(r"HKLM\D", Value("v", "multi_sz", ("a,b",)))
    assert a.key(r"HKLM\D").digest() != b.key(r"HKLM\D").digest()


@pytest.mark.parametrize("vtype,data", [
    ("sz", "x"), ("expand_sz", "%WINDIR%"), ("multi_sz", ("a", "")), ("dword", 0xFFFFFFFF),
    ("qword", 1 << 63), ("binary", b"\x00\xff"), ("hex(0)", b""), ("hex(5)", b"\1\2\3\4"), ("hex(ff)", b"x"),
])
def test_value_accepts_each_type(vtype, data):
    assert Value("n", vtype, data).data == data


def test_value_normalises_list_and_bytearray():
    assert Value("n", "multi_sz", ["a", "b"]).data == ("a", "b")
    assert Value("n", "binary", bytearray(b"ab")).data == b"ab"


@pytest.mark.parametrize("vtype,data,message", [
    ("dword", 1 << 32, "outside 0..0xFFFFFFFF"),
    ("dword", -1, "outside"),
    ("dword", True, "must be an int"),
    ("qword", 1 << 64, "outside 0..0xFFFFFFFFFFFFFFFF"),
    ("sz", 5, "must be a str"),
    ("sz", "a\0b", "contains NUL"),
    ("sz", "\ud800", "lone surrogate"),
    ("multi_sz", "ab", "must be a tuple of str"),
    ("multi_sz", ("a\0",), "contains NUL"),
    ("binary", "ab", "must be bytes"),
    ("hex(7)", b"", "unknown value type 'hex(7)'"),
    ("hex(07)", b"", "unknown value type"),
    ("string", "x", "unknown value type 'string'"),
])
def test_value_refuses_mismatched_data(vtype, data, message):
    with pytest.raises((TypeError, ValueError), match=message.replace("(", r"\(").replace(")", r"\)")):
        Value("n", vtype, data)


@pytest.mark.parametrize("name,message", [("a\nb", "control character"), ("$(X)", r"contains '\$\('")])
def test_value_refuses_unwritable_names(name, message):
    with pytest.raises(ValueError, match=message):
        Value(name, "sz", "")


@pytest.mark.parametrize("path,message", [
    (r"Drivers\BuiltIn", "does not start with a root key"),
    (r"HKLM\A\\B", "empty component"),
    ("HKLM\\A\tB", "control character"),
    (r"HKLM\$(X)", r"contains '\$\('"),
    (r"HKLM\a] ;b", "reads as the end of the key"),
])
def test_key_paths_refused_with_reason(path, message):
    with pytest.raises(ValueError, match=message):
        Hive().ensure_key(path)


def test_key_path_blanks_and_one_trailing_backslash_are_tolerated():
    assert split_path(" HKLM\\ A \\B\\") == ["HKEY_LOCAL_MACHINE", "A", "B"]
    assert split_path(r"HKLM\a]b") == ["HKEY_LOCAL_MACHINE", "a]b"]


def test_hive_is_not_hashable_and_compares_only_to_hives():
    with pytest.raises(TypeError):
        hash(Hive())
    assert Hive() != {}
