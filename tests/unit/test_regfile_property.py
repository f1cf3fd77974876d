"""Property: printing a hive and parsing the text back gives an equal hive, whatever it holds."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.hive import Hive, Value, split_path
from policy.regfile import RegistryError, parse_text
from policy.regprint import format_hive

# Names with spaces, quotes, backslashes, semicolons, brackets and non-ASCII letters; anything the
# hive refuses (control characters, "$(", blanks at the ends of key names) is filtered out by
# construction below, the same refusal a caller would get.
_NAME_CHARS = st.sampled_from(list(' "\\;[]=@$(),-_.:#!') + list("abcXYZ019") + ["é", "中", "ß", "Ω", "\t"])
_text = st.text(alphabet=st.one_of(_NAME_CHARS, st.characters(exclude_categories=("Cs",))), max_size=12)


def _valid_key_name(s: str) -> bool:
    try:
        return split_path("HKLM\\" + s) == ["HKEY_LOCAL_MACHINE", s]
    except ValueError:
        return False


def _valid_value(v):
    try:
        return Value(*v)
    except (ValueError, TypeError):
        return None


_key_names = st.text(alphabet=_NAME_CHARS, min_size=1, max_size=10).filter(_valid_key_name)
_string = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=20)
_data = st.one_of(
    st.tuples(st.just("sz"), _string),
    st.tuples(st.just("expand_sz"), _string),
    st.tuples(st.just("multi_sz"), st.lists(_string, max_size=4).map(tuple)),
    st.tuples(st.just("dword"), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("qword"), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("binary"), st.binary(max_size=60)),
    st.tuples(st.sampled_from(["hex(0)", "hex(5)", "hex(a)", "hex(ff)", "hex(4000)"]), st.binary(max_size=20)),
)
_values = st.builds(lambda name, td: _valid_value((name, td[0], td[1])),
                    st.one_of(st.just(""), _text), _data).filter(lambda v: v is not None)
_roots = st.sampled_from(["HKLM", "HKEY_CURRENT_USER", "HKCR", "HKU"])


@st.composite
def hives(draw):
    h = Hive()
    for _ in range(draw(st.integers(0, 6))):
        path = "\\".join([draw(_roots)] + draw(st.lists(_key_names, min_size=0, max_size=3)))
        h.ensure_key(path)
        for v in draw(st.lists(_values, max_size=5)):
            h.set_value(path, v)
    return h


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hives())
def test_parse_of_format_is_identity(h):
    text = format_hive(h)
    result = parse_text(text, "printed.reg", strict=True)
    assert result.diagnostics == []
    assert result.hive == h, text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hives())
def test_format_is_stable_and_digests_survive(h):
    text = format_hive(h)
    again = parse_text(text.encode("utf-8"), "printed.reg", strict=True).hive
    assert format_hive(again) == text
    for key in h.keys():
        assert again.key(key.path).digest() == key.digest()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hives())
def test_crlf_and_ctrl_z_do_not_change_the_hive(h):
    raw = format_hive(h).replace("\n", "\r\n").encode("utf-8") + b"\x1a"
    assert parse_text(raw, "dos.reg", strict=True).hive == h


# Fragments real files are made of, glued at random: the tolerant parser must report, never crash.
_FRAGMENTS = st.sampled_from([
    "[HKLM\\A]", "[-HKLM\\A]", "[HKLM\\A\\B", "[$(X)\\A]", '"N"=', "@=", '"a\\"b"', '"', "dword:", "FF", "$(X)",
    "$(", "hex:", "hex(7):", "hex(2):", "00,", "0,", ",", "\\", "multi_sz:", "mui_sz:", '"s",', ";", "//", "-",
    "IF X", "IF X !", "ELSE", "ENDIF", "ENDIF X", "#if", "#ifdef X", "#elif", "#else", "#endif", "#define X 1",
    "#define Y $(Y)", "#undef X", '#include "nowhere.reg"', "defined", "(", ")", "&&", "||", "==", "!", " ", "\t",
    "\n", "\r\n", "\x1a", "\xff", "中", "=",
])


@settings(max_examples=500, deadline=None)
@given(st.lists(_FRAGMENTS, max_size=40).map("".join), st.booleans())
def test_tolerant_parser_never_crashes_on_fragments(text, as_bytes):
    data = text.encode("utf-8", errors="surrogateescape") if as_bytes else text
    result = parse_text(data, "fuzz.reg")
    for d in result.diagnostics:
        assert d.location.file == "fuzz.reg" and d.location.line >= 1 and str(d)
    try:
        parse_text(data, "fuzz.reg", strict=True)
    except RegistryError as e:        # strict refuses with our error and nothing else
        assert e.location.file == "fuzz.reg" and e.location.line >= 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_tolerant_parser_never_crashes_on_bytes(data):
    parse_text(data, "fuzz.reg")
    parse_text(b'[HKLM\\A]\n"v"=' + data, "fuzz.reg")
