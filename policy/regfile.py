r"""Parsing Windows CE ``.reg`` files (BSP ``platform.reg`` and friends) into a :class:`Hive`.

Everything drvbox grants a driver comes from here, so the parser says what it did not understand
instead of guessing: every problem carries ``file:line:column``, what was found, what was expected
and, where a fix is likely, a hint.

Two modes:

* tolerant (default): malformed lines (an unquoted ``Default=dword:0``, ``dword:Change Me``, a
  stray ``-----``, a value before any key, an undefined ``$(VAR)``, a condition that cannot be
  evaluated, a missing ``#include``) are reported as :class:`Diagnostic`\ s and skipped, so that
  real BSP files parse;
* ``strict=True``: the first such problem raises :class:`RegistryError`.

Syntax (DESIGN.md section 2 and issue 2):

* an optional ``REGEDIT4`` / ``Windows Registry Editor Version 5.00`` header;
* ``[KEY]``, ``[-KEY]`` (delete the key and its subkeys); roots may be abbreviated (``HKLM``);
* ``"Name"=...`` and ``@=...`` (the default value); ``"Name"=-`` deletes;
* data: ``"string"`` (escapes ``\\`` and ``\"``), ``dword:XXXXXXXX``, ``hex:..`` (bytes, blanks
  after commas allowed), ``hex(N):..`` (``hex(1)`` sz, ``hex(2)`` expand_sz, ``hex(3)`` binary,
  ``hex(4)`` dword, ``hex(7)`` multi_sz, ``hex(b)`` qword, other N kept as raw ``hex(N)``),
  ``multi_sz:"a","b"``, ``mui_sz:"res.dll,#12"`` (read as ``sz``: drvbox does not load MUI
  resources, it only needs to see the value);
* a line continues onto the next when it ends in ``\``, and a ``hex``/``multi_sz``/``mui_sz`` list
  also when it ends in a comma and the next line carries more items;
* ``;`` starts a comment anywhere outside a quoted string (``dword:FF;On``, ``;//``).  The CE
  comment directives ``; @CESYSGEN IF ...`` / ``; @CESYSGEN ELSE`` / ``; @CESYSGEN ENDIF`` and
  ``; @XIPREGION IF ...`` are plain comments to us: cesysgen keeps a block when its component is in
  the OS image, and a driver's registry only reaches us when it is, so we keep every such block
  (both arms of a ``@CESYSGEN ELSE``: the later one wins, as in any file);
* CE preprocessor lines, evaluated against ``defines`` (``-D NAME=VALUE``) and ``#define``\ s
  (never the process environment, so a parse is reproducible):

  - ``IF X`` / ``IF X=VALUE`` / either followed by `` !`` / ``ELSE`` / ``ENDIF`` / ``ENDIF X``
    (makeimg's forms, ``IF environment variable [= value] [!]``).  ``IF X`` is true when X is set
    *and not empty*, because ``set X=`` in a CE build window unsets X; ``IF X=VALUE`` when X's
    value is VALUE (Compact 7 BSPs test ``IF _TGTPROJ=smartfon !``, ``IF MAKEIMG_BIN_FORMAT=hybrid``);
    names and values compare case-insensitively, as in the Windows environment makeimg reads;
    `` !`` negates.  What follows ENDIF is a comment to makeimg; we warn when it names another variable;
  - ``#if``/``#ifdef``/``#ifndef``/``#elif``/``#else``/``#endif`` with C semantics: ``#ifdef X`` is
    true for any defined X, even empty; ``#if`` takes ``defined X``, ``defined(X)``, ``!``, ``&&``,
    ``||``, parentheses, ``== != < > <= >=``, numbers (decimal, ``0x`` hex; leading zeros are
    decimal, because CE writes locale ids as ``0409``), ``$(VAR)`` and bare names (an undefined
    bare name is 0, as in C; an undefined ``$(VAR)`` makes the condition unevaluable);
  - ``#define NAME value`` (kept as written, quotes included, as in C; a quoted value used inside a
    string, ``"$(NAME)"``, loses its own quotes there), ``#undef NAME``;
  - ``#include "path"`` with ``$(X)`` expanded and ``\`` read as ``/``, resolved against the
    including file's folder and then ``include_dirs``, matching names case-insensitively when the
    exact spelling is missing (BSPs come from case-insensitive file systems);
  - ``$(VAR)`` is expanded (recursively) in key paths, value names and data;
  - a command-line define is the initial value; a ``#define`` in a file replaces it (as in C).

Decoding: UTF-16LE when the file starts with its BOM; otherwise each line is UTF-8, or else GBK,
or else latin-1 (never an exception); a UTF-8 BOM, CRLF, a trailing Ctrl-Z and a missing final
newline are all fine.  A key or value whose text was not UTF-8 gets a warning saying how it was
read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from policy.hive import Hive, Location, Value, split_path
from policy.regcond import IDENT, Branch, CeTest, Condition, Unevaluable, ce_label, parse_ce_test
from policy.regprint import format_hive

__all__ = ["RegistryError", "Diagnostic", "ParseResult", "parse_files", "parse_text", "format_hive"]

MAX_INCLUDE_DEPTH = 32
MAX_MACRO_DEPTH = 32


# --------------------------------------------------------------------------------------------
# Errors and diagnostics


def _render(location: Location, message: str, hint: str, source: str, severity: str = "") -> str:
    where = str(location) if location.line else location.file
    head = f"{where}: {severity + ': ' if severity else ''}{message}"
    lines = [head]
    if source and location.line:
        lines.append(source)
        # Keep the source's tabs in the caret line so the caret sits under the right character.
        lines.append("".join(c if c == "\t" else " " for c in source[:max(location.column - 1, 0)]) + "^")
    if hint:
        lines.append(f"hint: {hint}")
    return "\n".join(lines)


class RegistryError(Exception):
    """A registry file that cannot be read as written.  ``str()`` is ``file:line:col: message``,
    then the source line and a caret under the column, then ``hint: ...`` when there is one."""

    def __init__(self, location: Location, message: str, hint: str = "", source: str = "") -> None:
        self.location = location
        self.message = message
        self.hint = hint
        self.source = source
        super().__init__(_render(location, message, hint, source))


@dataclass(frozen=True)
class Diagnostic:
    """A problem the tolerant parser reported and stepped over."""

    location: Location
    message: str
    severity: str = "warning"
    hint: str = ""
    source: str = field(default="", compare=False, repr=False)

    def __str__(self) -> str:
        return _render(self.location, self.message, self.hint, self.source, self.severity)


@dataclass
class ParseResult:
    hive: Hive
    diagnostics: list[Diagnostic]


class _Problem(Exception):
    """Raised inside the parser; turned into a Diagnostic or a RegistryError at statement level."""

    def __init__(self, pos: tuple[int, int], message: str, hint: str = "") -> None:
        super().__init__(message)
        self.pos, self.message, self.hint = pos, message, hint


# --------------------------------------------------------------------------------------------
# Sources and decoding


@dataclass
class _Source:
    name: str
    lines: list[str]
    encodings: dict[int, str]          # line number -> encoding, for lines that were not UTF-8
    directory: Path | None             # for relative #include


def _decode_line(raw: bytes) -> tuple[str, str]:
    for encoding in ("utf-8", "gbk"):
        try:
            return raw.decode(encoding), encoding
        except UnicodeDecodeError:
            pass
    return raw.decode("latin-1"), "latin-1"


def _strip_eof_marker(data: bytes) -> bytes:
    """Cut a trailing Ctrl-Z (CP/M's end of file, still written by some DOS-era editors)."""
    i = data.find(b"\x1a")
    if i >= 0 and not data[i:].strip(b"\x1a \t\r\n"):
        return data[:i]
    return data


def _load(data: str | bytes, name: str, directory: Path | None) -> _Source:
    encodings: dict[int, str] = {}
    if isinstance(data, str):
        text = data.removeprefix("\ufeff")
        i = text.find("\x1a")
        if i >= 0 and not text[i:].strip("\x1a \t\r\n"):
            text = text[:i]
        lines = text.split("\n")
    elif data.startswith(b"\xff\xfe"):        # regedit's own exports are UTF-16LE with a BOM
        text = data[2:].decode("utf-16-le", errors="replace")
        i = text.find("\x1a")
        if i >= 0 and not text[i:].strip("\x1a \t\r\n"):
            text = text[:i]
        lines = text.split("\n")
    else:
        data = _strip_eof_marker(data.removeprefix(b"\xef\xbb\xbf"))
        lines = []
        for n, raw in enumerate(data.split(b"\n"), 1):
            line, encoding = _decode_line(raw)
            if encoding != "utf-8":
                encodings[n] = encoding
            lines.append(line)
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()                            # the final newline ends the last line, it opens none
    return _Source(name, lines, encodings, directory)


# --------------------------------------------------------------------------------------------
# Text with positions: every character remembers the (line, column) it came from, through
# continuations and macro expansions, so messages point at what the author wrote.


class _Text:
    __slots__ = ("s", "pos", "end")

    def __init__(self, s: str, pos: list[tuple[int, int]], end: tuple[int, int]) -> None:
        self.s, self.pos, self.end = s, pos, end

    @classmethod
    def of(cls, line: str, lineno: int, start: int, stop: int) -> _Text:
        return cls(line[start:stop], [(lineno, c + 1) for c in range(start, stop)], (lineno, stop + 1))

    def __add__(self, other: _Text) -> _Text:
        return _Text(self.s + other.s, self.pos + other.pos, other.end)

    def at(self, i: int) -> tuple[int, int]:
        return self.pos[i] if i < len(self.s) else self.end

    def sub(self, a: int, b: int | None = None) -> _Text:
        b = len(self.s) if b is None else b
        return _Text(self.s[a:b], self.pos[a:b], self.at(b))


def _inside_string(s: str, stop: int) -> bool:
    """Whether ``s[stop]`` is inside a double-quoted string (``\\"`` and ``\\\\`` are escapes)."""
    quoted, i = False, 0
    while i < stop:
        if quoted and s[i] == "\\":
            i += 2
            continue
        if s[i] == '"':
            quoted = not quoted
        i += 1
    return quoted


def _comment_start(line: str, start: int = 0) -> tuple[int, bool]:
    """Index of the ``;`` that starts a comment (or len(line)), and whether a string is still open."""
    quoted = False
    i = start
    while i < len(line):
        c = line[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ";":
            return i, False
        i += 1
    return len(line), quoted


def _code_part(line: str) -> tuple[int, int, bool]:
    """(start, stop, string_open) of a line without its blanks and comment."""
    start = len(line) - len(line.lstrip(" \t"))
    stop, quoted = _comment_start(line, start)
    while stop > start and line[stop - 1] in " \t":
        stop -= 1
    return start, stop, quoted


# --------------------------------------------------------------------------------------------
# The parser


_MACRO = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_DIRECTIVE = re.compile(r"#\s*([A-Za-z_]+)")
_CE_COND = re.compile(r"(?i)(IF|ELSE|ENDIF)(?=[\s;]|\Z)")
_HEADER = re.compile(r"(?i)(REGEDIT4|Windows Registry Editor Version 5\.00)\Z")
_TYPE_PREFIX = re.compile(r"(?i)(dword|hex(?:\(([^)]*)\))?|multi_sz|mui_sz)[ \t]*:")
_LIST_TYPE_PREFIX = re.compile(r'(?i)(?:@|"(?:[^"\\]|\\.)*")[ \t]*=[ \t]*(hex(?:\([^)]*\))?|multi_sz|mui_sz)[ \t]*:')
_HEX_CONTINUATION = re.compile(r"[0-9a-fA-F]{1,2}[ \t]*(,|\\|\Z)")
# More list items, not the next value: a quoted string followed by a comma, a backslash or nothing.
_STRING_CONTINUATION = re.compile(r'"(?:[^"\\]|\\.)*"[ \t]*(,|\\|\Z)')
_WORD_COLON = re.compile(r"([A-Za-z_][A-Za-z0-9_()]*)[ \t]*:")
_HEX_DIGITS = re.compile(r"[0-9a-fA-F]+\Z")
_UNQUOTED_ASSIGN = re.compile(r"([A-Za-z_][^=\"\[]*?)[ \t]*=")

_DASH_HINT = "comment it out with ';' or delete it"


# The roots of a CE build tree, set by the build window (wince.bat), never by the BSP's files.
_BUILD_ROOTS = {"_WINCEROOT", "_PUBLICROOT", "_PRIVATEROOT", "_PLATFORMROOT", "_TARGETPLATROOT", "_PROJECTROOT",
                "_PROJECTOAKROOT", "_FLATRELEASEDIR", "_COMMONPUBROOT", "SG_OUTPUT_ROOT", "_OSDESIGNROOT"}


def _macro_hint(name: str) -> str:
    if name.upper().startswith("PROCGROUP_"):
        # CE defines these in its own common .reg files, which a BSP does not carry.
        return (f"-D {name}=N puts the driver in process group N (HKLM\\Drivers\\ProcGroup_000N); "
                "CE defines it in a .reg file outside the BSP. Without it the driver gets a host of its own")
    if name.upper() in _BUILD_ROOTS:
        return (f"$({name}) is a folder of a CE build tree: -D {name}=DIR if you have that tree "
                "(file names match in any letter case)")
    return f"define it on the command line (-D {name}=VALUE) or with #define {name} VALUE"


class _Parser:
    def __init__(self, hive: Hive, defines: Mapping[str, str] | None, strict: bool,
                 include_dirs: Sequence[str | os.PathLike]) -> None:
        self.hive = hive
        self.defines: dict[str, str] = {}
        for name, value in (defines or {}).items():
            self.defines[str(name)] = str(value)
        self.strict = strict
        self.include_dirs = [Path(d) for d in include_dirs]
        self.diagnostics: list[Diagnostic] = []
        self.key: str | None = None
        self.no_key_reason = "none"          # why self.key is None: none | deleted | skipped
        self.deleted_key = ""
        self.including: list[str] = []

    # -- reporting -----------------------------------------------------------------------

    def problem(self, src: _Source, pos: tuple[int, int], message: str, hint: str = "") -> None:
        """A tolerated problem: a warning now, or (strict) the error that ends the parse."""
        line, col = pos
        location = Location(src.name, line, col)
        source = src.lines[line - 1] if 0 < line <= len(src.lines) else ""
        if self.strict:
            raise RegistryError(location, message, hint, source)
        self.diagnostics.append(Diagnostic(location, message, "warning", hint, source))

    def note(self, src: _Source, pos: tuple[int, int], message: str, hint: str = "") -> None:
        """A warning even in strict mode: the file is fine, but the reader should know."""
        line, col = pos
        source = src.lines[line - 1] if 0 < line <= len(src.lines) else ""
        self.diagnostics.append(Diagnostic(Location(src.name, line, col), message, "warning", hint, source))

    # -- macros --------------------------------------------------------------------------

    def expand(self, t: _Text, depth: int = 0) -> _Text:
        """Replace every ``$(NAME)``; characters of an expansion point at its ``$``."""
        if "$(" not in t.s:
            return t
        out = _Text("", [], t.end)
        last = 0
        for m in _MACRO.finditer(t.s):
            out = out + t.sub(last, m.start())
            name, where = m.group(1), t.at(m.start())
            if name not in self.defines:
                raise _Problem(where, f"undefined macro $({name})", _macro_hint(name))
            if depth >= MAX_MACRO_DEPTH:
                raise _Problem(where, f"macro $({name}) expands into itself "
                                      f"(more than {MAX_MACRO_DEPTH} levels deep)")
            body = self.defines[name]
            if len(body) >= 2 and body[0] == body[-1] == '"' and _inside_string(t.s, m.start()):
                body = body[1:-1]
            try:
                out = out + self.expand(_Text(body, [where] * len(body), where), depth + 1)
            except _Problem as p:
                if not p.message.startswith("undefined macro") or "(in $(" in p.message:
                    raise
                raise _Problem(p.pos, f"{p.message} (in $({name}))", p.hint) from None
            last = m.end()
        out = out + t.sub(last)
        out.end = t.end
        return out

    # -- files and the preprocessor --------------------------------------------------------

    def run_source(self, src: _Source) -> None:
        lines = _Lookahead(self.active_lines(src))
        seen_statement = False
        for lineno in lines:
            try:
                seen_statement = self.statement(src, lineno, lines, seen_statement)
            except _Problem as p:
                self.problem(src, p.pos, p.message, p.hint)

    def active_lines(self, src: _Source) -> Iterator[int]:
        """Line numbers of ``src`` that the preprocessor keeps; included files are parsed as
        they are met, so that defines and the current key flow through them as in text."""
        stack: list[Branch] = []
        for n, line in enumerate(src.lines, 1):
            active = not stack or stack[-1].active
            start = len(line) - len(line.lstrip(" \t"))
            body = line[start:]
            try:
                if body.startswith("#"):
                    include = self.directive(src, n, start, stack, active)
                    if include is not None:
                        self.include(src, n, start, include)
                    continue
                m = _CE_COND.match(body)
                if m:
                    self.ce_condition(src, n, start, m, stack, active)
                    continue
            except _Problem as p:
                self.problem(src, p.pos, p.message, p.hint)
                continue
            if active:
                yield n
        for cond in reversed(stack):
            closer = "#endif" if cond.kind == "#" else "ENDIF"
            self.problem(src, (cond.lineno, 1), f"'{cond.label}' is never closed",
                         f"add {closer} where the conditional block ends")

    def ce_condition(self, src: _Source, n: int, start: int, m: re.Match, stack: list[Branch],
                     active: bool) -> None:
        line = src.lines[n - 1]
        word = m.group(1).upper()
        rest_start = start + m.end()
        stop, _ = _comment_start(line, rest_start)
        args = line[rest_start:stop].split()
        where = (n, start + 1)
        if word == "IF":
            test = parse_ce_test(line[rest_start:stop])
            if test is None:
                # Still open a (false) block, so that its ENDIF is not reported a second time.
                stack.append(Branch("IF", line[start:stop].strip(), n, active, True, False))
                if not active:
                    return
                either = "||" in line[rest_start:stop] or "&&" in line[rest_start:stop]
                raise _Problem((n, rest_start + 1), f"expected 'IF NAME', 'IF NAME=VALUE' or either followed by "
                                                    f"' !', found {line[start:stop].strip()!r}; the block is skipped",
                               "CE's IF tests one variable and knows no || or &&: nest two IF blocks, or use "
                               "#if (e.g. #if !defined(A) || !defined(B))" if either else
                               "CE's IF takes one environment variable, optionally '=VALUE', optionally then '!'")
            truth = self.ce_truth(test) if active else False
            stack.append(Branch("IF", ce_label(test), n, active, truth, active and truth))
            return
        if not stack or stack[-1].kind != "IF":
            opened = f"; the innermost open block is '{stack[-1].label}' (line {stack[-1].lineno})" if stack else ""
            raise _Problem(where, f"'{word}' without a matching 'IF'{opened}",
                           "CE's ELSE/ENDIF close an IF; #if blocks close with #else/#endif")
        cond = stack[-1]
        if word == "ELSE":
            if cond.else_seen:
                raise _Problem(where, f"second ELSE for '{cond.label}' (line {cond.lineno})")
            cond.else_seen = True
            cond.active = cond.parent_active and not cond.taken
            cond.taken = True
            return
        stack.pop()
        if args:
            # makeimg ignores what follows ENDIF; we compare the variable it names with the IF it
            # closes, because another name is the usual sign of a misplaced ENDIF.  BSPs often
            # repeat only the name ('IF X=V' ... 'ENDIF X', 'IF X !' ... 'ENDIF X'): that is fine.
            test = parse_ce_test(line[rest_start:stop])
            closes = parse_ce_test(cond.label[2:])
            if test is not None and closes is not None:
                same = test[0].casefold() == closes[0].casefold()
            else:                                    # a malformed IF repeated as written
                same = " ".join(args).casefold() == cond.label[2:].strip().casefold()
            if not same:
                name_at = rest_start + len(line[rest_start:]) - len(line[rest_start:].lstrip(" \t"))
                self.problem(src, (n, name_at + 1),
                             f"'ENDIF {' '.join(args)}' closes '{cond.label}' (line {cond.lineno})",
                             "the name after ENDIF should repeat the IF it closes")

    def ce_truth(self, test: CeTest) -> bool:
        """``IF X`` is true when X is set and not empty (``set X=`` in a CE build window unsets X);
        ``IF X=V`` (or ``==``) when X's value is V.  Names and values compare case-insensitively, as
        makeimg reads them from the Windows environment.  ``!`` (and ``!=``) negates."""
        name, expected, negate = test
        value = self.defines.get(name)
        if value is None:
            value = next((v for k, v in self.defines.items() if k.casefold() == name.casefold()), None)
        value = (value or "").strip(" \t")
        truth = value != "" if expected is None else value.casefold() == expected.casefold()
        return truth != negate

    def directive(self, src: _Source, n: int, start: int, stack: list[Branch], active: bool) -> str | None:
        line = src.lines[n - 1]
        m = _DIRECTIVE.match(line, start)
        where = (n, start + 1)
        if not m:
            if active:
                raise _Problem(where, f"expected a directive after '#', found {line[start:].strip()!r}",
                               "comments start with ';'")
            return None
        word = m.group(1)
        rest_start = m.end()
        rest_stop = _directive_end(line, rest_start)
        rest = line[rest_start:rest_stop].strip(" \t")
        rest_text = _Text.of(line, n, rest_start, rest_stop)
        if word in ("if", "ifdef", "ifndef"):
            label = f"#{word} {rest}".strip()
            truth = self.evaluate(src, n, word, rest, rest_text) if active else False
            stack.append(Branch("#", label, n, active, truth, active and truth))
            return None
        if word in ("elif", "else", "endif"):
            if not stack or stack[-1].kind != "#":
                opened = f"; the innermost open block is '{stack[-1].label}' (line {stack[-1].lineno})" if stack else ""
                raise _Problem(where, f"'#{word}' without a matching '#if'{opened}",
                               "#else/#endif close an #if; CE's IF blocks close with ELSE/ENDIF")
            cond = stack[-1]
            if word == "endif":
                stack.pop()
                return None
            if cond.else_seen:
                raise _Problem(where, f"'#{word}' after '#else' in '{cond.label}' (line {cond.lineno})")
            if word == "else":
                cond.else_seen = True
                cond.active = cond.parent_active and not cond.taken
                cond.taken = True
                return None
            truth = (self.evaluate(src, n, "if", rest, rest_text)
                     if cond.parent_active and not cond.taken else False)
            cond.active = cond.parent_active and not cond.taken and truth
            cond.taken = cond.taken or truth
            return None
        if not active:
            return None
        if word == "define":
            dm = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(\(?)", rest)
            if not dm:
                raise _Problem(where, f"expected '#define NAME value', found {line[start:rest_stop].strip()!r}")
            if dm.group(2):
                raise _Problem(where, f"function-like macro {dm.group(1)}(...) is not supported",
                               "a .reg #define takes a plain value: #define NAME value")
            # The body is kept as written, quotes included, as C's preprocessor keeps it: Datalight's
            # .reg files write multi_sz:$(GUID_A), $(GUID_B) with quoted GUID macros.  A quoted body
            # used inside a string ("$(NAME)") loses its quotes there (see expand).
            self.defines[dm.group(1)] = rest[dm.end():].strip(" \t")
            return None
        if word == "undef":
            if not IDENT.match(rest):
                raise _Problem(where, f"expected '#undef NAME', found {line[start:rest_stop].strip()!r}")
            self.defines.pop(rest, None)
            return None
        if word == "include":
            im = re.fullmatch(r'"([^"]*)"|<([^>]*)>', rest)
            if not im:
                raise _Problem((n, rest_start + 1), f"expected '#include \"file\"', found {rest!r}")
            offset = rest_text.s.index(rest) + 1
            try:
                return self.expand(rest_text.sub(offset, offset + len(im.group(1) or im.group(2) or ""))).s
            except _Problem as p:
                raise _Problem(p.pos, f"{p.message} in the #include path; the include is skipped", p.hint) from None
        raise _Problem(where, f"unknown directive '#{word}'",
                       "supported: #if #ifdef #ifndef #elif #else #endif #define #undef #include")

    def evaluate(self, src: _Source, n: int, word: str, rest: str, rest_text: _Text) -> bool:
        """Truth of one condition; one that cannot be evaluated is reported and taken as false."""
        where = rest_text.at(len(rest_text.s) - len(rest_text.s.lstrip()))
        if word in ("ifdef", "ifndef"):
            if not IDENT.match(rest):
                self.problem(src, where, f"expected '#{word} NAME', found {rest!r}; treated as false")
                return False
            return (rest in self.defines) == (word == "ifdef")
        try:
            text = self.expand(rest_text).s
        except _Problem as p:
            self.problem(src, p.pos, f"{p.message} in condition '#{word} {rest}'; treated as false", p.hint)
            return False
        try:
            return Condition(text, self.defines).run()
        except Unevaluable as e:
            self.problem(src, where, f"cannot evaluate '#{word} {rest}': {e}; treated as false",
                         "supported: defined X, !, &&, ||, ==, !=, <, >, (), numbers and $(VAR)")
            return False

    def include(self, src: _Source, n: int, start: int, target: str) -> None:
        where = (n, start + 1)
        found = _resolve_include(target, src.directory, self.include_dirs)
        if found is None:
            as_path = target.replace("\\", "/")
            if Path(as_path).is_absolute():
                # A macro made it absolute: say which file, not which folders (none were searched).
                raise _Problem(where, f"include file not found: {as_path} (in any letter case); the include is skipped",
                               "check the folder given with -D for the macro in its path")
            searched = [str(d) for d in ([src.directory] if src.directory else []) + self.include_dirs]
            raise _Problem(where, f"include file not found: '{target}' (searched {', '.join(searched) or 'nothing'})",
                           "pass the folder with include_dirs, or define the macro in its path with -D")
        found = found.resolve()
        if str(found) in self.including or len(self.including) >= MAX_INCLUDE_DEPTH:
            raise _Problem(where, f"#include of {str(found)!r} would recurse "
                                  f"({' -> '.join(self.including + [str(found)])}); skipped")
        try:
            data = found.read_bytes()
        except OSError as e:
            raise _Problem(where, f"cannot read include file {str(found)!r}: {e.strerror}") from None
        self.including.append(str(found))
        try:
            self.run_source(_load(data, str(found), found.parent))
        finally:
            self.including.pop()

    # -- statements ----------------------------------------------------------------------

    def statement(self, src: _Source, n: int, lines: _Lookahead, seen: bool) -> bool:
        line = src.lines[n - 1]
        start, stop, _ = _code_part(line)
        if start == stop:
            return seen
        code = line[start:stop]
        if code[0] == "[":
            self.key_line(src, n, start)
        elif code[0] in '"@':
            self.value_line(src, n, lines)
        elif _HEADER.match(code):
            if seen:
                self.problem(src, (n, start + 1), f"'{code}' header after the start of the file",
                             "a header belongs on the first line; remove this one")
        elif code.strip("-=*_ \t") == "":
            self.problem(src, (n, start + 1), f"stray line {code!r}: expected a [KEY], a value or a comment",
                         _DASH_HINT)
        else:
            m = _UNQUOTED_ASSIGN.match(code)
            hint = (f'value names are quoted: "{m.group(1).strip()}"=...' if m
                    else "expected a [KEY] line, a \"Name\"=value line, @=value, or a ';' comment")
            self.problem(src, (n, start + 1), f"unexpected {code[:40]!r}: expected a [KEY], a value or a comment",
                         hint)
        return True

    def key_line(self, src: _Source, n: int, start: int) -> None:
        line = src.lines[n - 1]
        self.key, self.no_key_reason = None, "skipped"
        close = -1
        for i in range(start + 1, len(line)):
            if line[i] == "]":
                after = line[i + 1:].lstrip(" \t")
                if after == "" or after.startswith(";"):
                    close = i
                    break
        if close < 0:
            raise _Problem((n, len(line.rstrip()) + 1), "expected ']' to close the key name; its values are skipped",
                           "a key line looks like [HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\Serial]")
        body = _Text.of(line, n, start + 1, close)
        delete = body.s.startswith("-")
        if delete:
            body = body.sub(1)
        try:
            path_text = self.expand(body)
        except _Problem as p:
            raise _Problem(p.pos, f"{p.message} in the key path; its values are skipped", p.hint) from None
        self.check_encoding(src, n, path_text.s)
        try:
            path = "\\".join(split_path(path_text.s))
        except ValueError as e:
            raise _Problem((n, start + 2), f"bad key path: {e}; its values are skipped") from None
        if delete:
            self.hive.delete_key(path)
            self.no_key_reason, self.deleted_key = "deleted", path
        else:
            self.hive.ensure_key(path)
            self.key = path

    def check_encoding(self, src: _Source, n: int, text: str) -> None:
        encoding = src.encodings.get(n)
        if encoding and not text.isascii():
            line = src.lines[n - 1]
            column = next(i for i, c in enumerate(line) if not c.isascii()) + 1
            self.note(src, (n, column), f"line is not UTF-8; read as {encoding}",
                      "save the file as UTF-8 so that names and strings read as intended")

    def value_line(self, src: _Source, n: int, lines: _Lookahead) -> None:
        line = src.lines[n - 1]
        start, stop, string_open = _code_part(line)
        text = _Text.of(line, n, start, stop)
        list_type = _LIST_TYPE_PREFIX.match(text.s)
        # Gather continuation lines: a trailing backslash, or (hex and string lists) a trailing comma
        # followed by a line that carries more items.
        while not string_open:
            if text.s.endswith("\\"):
                nxt = lines.peek()
                nline = src.lines[nxt - 1] if nxt is not None else ""
                nstart, nstop, nopen = _code_part(nline)
                if nxt is None or nline[nstart:nstart + 1] in ("[", ""):
                    text = text.sub(0, len(text.s) - 1)
                    self.problem(src, text.end, "'\\' continues the line, but no continuation line follows",
                                 "remove the trailing backslash")
                    break
                next(lines)
                text = text.sub(0, len(text.s) - 1) + _Text.of(nline, nxt, nstart, nstop)
                string_open = nopen
                continue
            if text.s.endswith(",") and list_type:
                nxt = lines.peek()
                if nxt is None:
                    break
                nline = src.lines[nxt - 1]
                nstart, nstop, nopen = _code_part(nline)
                more = nline[nstart:nstop]
                is_hex = list_type.group(1).lower().startswith("hex")
                if (_STRING_CONTINUATION if not is_hex else _HEX_CONTINUATION).match(more):
                    next(lines)
                    text = text + _Text.of(nline, nxt, nstart, nstop)
                    string_open = nopen
                    continue
            break
        if self.key is None:
            if self.no_key_reason == "none":
                raise _Problem(text.at(0), "value outside any key",
                               "put a [HKEY_LOCAL_MACHINE\\...] line before it")
            if self.no_key_reason == "deleted":
                raise _Problem(text.at(0), f"value after [-{self.deleted_key}], which deletes that key; ignored",
                               "put a [KEY] line before the value")
            return                               # the key line's problem said its values are skipped
        self.check_encoding(src, n, text.s)
        try:
            written_name = _parse_name(text)[0]          # for messages, before any expansion
        except _Problem:
            written_name = None
        try:
            self.value(src, text, written_name)
        except _Problem as p:
            if written_name is not None and "$(" not in written_name:
                # Keep a trace in the hive: derivation must know that a value the author wrote is missing.
                shown = f'"{written_name}"' if written_name else "@"
                reason = p.message.removesuffix("; the value is skipped").removesuffix(f" in {shown}")
                self.hive.note_unread(self.key, written_name, Location(src.name, *text.at(0)), reason)
            raise

    def value(self, src: _Source, text: _Text, written_name: str | None) -> None:
        try:
            text = self.expand(text)
        except _Problem as p:
            if written_name is None or not p.message.startswith("undefined macro"):
                raise
            shown = f'"{written_name}"' if written_name else "@"
            raise _Problem(p.pos, f"{p.message} in {shown}; the value is skipped", p.hint) from None
        name, i = _parse_name(text)
        while i < len(text.s) and text.s[i] in " \t":
            i += 1
        if i >= len(text.s) or text.s[i] != "=":
            raise _Problem(text.at(i), f"expected '=' after the value name, found {text.s[i:i + 20]!r}"
                           if i < len(text.s) else "expected '=' after the value name")
        i += 1
        while i < len(text.s) and text.s[i] in " \t":
            i += 1
        data = text.sub(i)
        if data.s == "-":
            self.hive.delete_value(self.key, name)
            return
        value = self.parse_data(src, name, data)
        try:
            value = Value(name, value[0], value[1], Location(src.name, *text.at(0)))
        except ValueError as e:
            raise _Problem(text.at(0), str(e)) from None
        self.hive.set_value(self.key, value)

    def parse_data(self, src: _Source, name: str, data: _Text) -> tuple[str, object]:
        s = data.s
        if s == "":
            raise _Problem(data.at(0), "expected data after '='",
                           'e.g. "text", dword:1, hex:00,01, multi_sz:"a","b", or - to delete')
        if s[0] == '"':
            text, j = _parse_quoted(data, 0)
            _expect_end(data, j, "after the string")
            return "sz", text
        m = _TYPE_PREFIX.match(s)
        if not m:
            wm = _WORD_COLON.match(s)
            if wm:
                raise _Problem(data.at(0), f"unknown value type '{wm.group(1)}:'",
                               "supported: dword:, hex:, hex(N):, multi_sz:, mui_sz:, or a quoted string")
            if re.fullmatch(r"LOC_[A-Za-z0-9_]+", s):
                # CE's build replaces LOC_ ids from a localisation (.str) file we do not have.
                hint = f'{s} is a CE localisation id: write the string itself, e.g. "My Device"'
            else:
                hint = f'quote the string: "{s}"' if '"' not in s else ""
            raise _Problem(data.at(0), f"expected a quoted string, dword:, hex:, hex(N):, multi_sz: or -, "
                                       f"found {s[:30]!r}", hint)
        kind = m.group(1).lower()
        body = data.sub(m.end())
        if kind == "dword":
            return "dword", _parse_dword(body)
        if kind in ("multi_sz", "mui_sz"):
            items = self.parse_list(src, body, kind)
            if kind == "mui_sz":
                if len(items) != 1:
                    raise _Problem(body.at(0), f"mui_sz takes one string, found {len(items)}",
                                   'write mui_sz:"module.dll,#ID"')
                return "sz", items[0]
            return "multi_sz", items
        raw = self.parse_hex(src, body)
        if m.group(2) is None:
            return "binary", raw
        try:
            number = int(m.group(2).strip(), 16)
        except ValueError:
            raise _Problem(data.at(4), f"hex({m.group(2)}) is not a type number",
                           "write the registry type in hex, e.g. hex(7) for multi_sz") from None
        return _typed_hex(number, raw, data.at(0))

    def parse_list(self, src: _Source, body: _Text, kind: str) -> tuple[str, ...]:
        items: list[str] = []
        s, j = body.s, _skip_blanks(body.s, 0)
        if j == len(s):
            return ()
        while True:
            if j >= len(s) or s[j] != '"':
                raise _Problem(body.at(j), f"expected a quoted string in the {kind} list, found {s[j:j + 20]!r}"
                               if j < len(s) else f"expected a quoted string in the {kind} list",
                               f'{kind} items are quoted and separated by commas: {kind}:"a","b"')
            item, j = _parse_quoted(body, j)
            items.append(item)
            j = _skip_blanks(s, j)
            if j == len(s):
                return tuple(items)
            if s[j] != ",":
                raise _Problem(body.at(j), f"expected ',' between {kind} items, found {s[j:j + 20]!r}")
            j = _skip_blanks(s, j + 1)
            if j == len(s):
                # The meaning is plain; keep the items, but say so (strict refuses).
                self.problem(src, body.at(j - 1), f"trailing ',' ends the {kind} list",
                             "remove the comma, or continue the list on the next line")
                return tuple(items)

    def parse_hex(self, src: _Source, body: _Text) -> bytes:
        s = body.s
        if s.strip(" \t") == "":
            return b""
        out = bytearray()
        pos = 0
        parts = s.split(",")
        for k, part in enumerate(parts):
            token = part.strip(" \t")
            at = body.at(pos + len(part) - len(part.lstrip(" \t")))
            if token == "":
                if k == len(parts) - 1:
                    self.problem(src, body.at(pos - 1), "trailing ',' ends the hex list",
                                 "remove the comma, or continue the list on the next line")
                    break
                raise _Problem(at, "empty item in the hex list (two commas in a row?)")
            if len(token) > 2 or not _HEX_DIGITS.match(token):
                raise _Problem(at, f"expected a hex byte (00..ff) in the hex list, found {token[:20]!r}",
                               "bytes are two hex digits separated by commas: hex:0a,1b,ff")
            out.append(int(token, 16))
            pos += len(part) + 1
        return bytes(out)


class _Lookahead:
    """An iterator of line numbers with one line of lookahead, for continuations."""

    def __init__(self, it: Iterator[int]) -> None:
        self.it = it
        self.buffered: list[int] = []

    def __iter__(self) -> _Lookahead:
        return self

    def __next__(self) -> int:
        if self.buffered:
            return self.buffered.pop()
        return next(self.it)

    def peek(self) -> int | None:
        if not self.buffered:
            try:
                self.buffered.append(next(self.it))
            except StopIteration:
                return None
        return self.buffered[-1]


def _directive_end(line: str, start: int) -> int:
    """End of a directive's argument: before a ``//`` or ``;`` comment outside quotes."""
    quoted = False
    for i in range(start, len(line)):
        c = line[i]
        if c == '"':
            quoted = not quoted
        elif not quoted and (c == ";" or line.startswith("//", i)):
            return i
    return len(line)


def _skip_blanks(s: str, j: int) -> int:
    while j < len(s) and s[j] in " \t":
        j += 1
    return j


def _expect_end(t: _Text, j: int, what: str) -> None:
    j = _skip_blanks(t.s, j)
    if j < len(t.s):
        raise _Problem(t.at(j), f"unexpected {t.s[j:j + 20]!r} {what}",
                       "a ';' starts a comment; anything else after the data is a mistake")


def _parse_quoted(t: _Text, j: int) -> tuple[str, int]:
    """A quoted string starting at ``t.s[j] == '"'``: its text and the index after it.

    ``\\\\`` and ``\\"`` are escapes; a backslash before anything else is kept as written
    (CE files write ``"\\Windows\\x.dll"`` both ways)."""
    s = t.s
    out = []
    i = j + 1
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in '\\"':
            out.append(s[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise _Problem(t.at(j), "string is not closed: expected '\"'",
                   'a backslash right before the closing quote escapes it; write \\\\ for a backslash')


def _parse_name(t: _Text) -> tuple[str, int]:
    if t.s.startswith("@"):
        return "", 1
    return _parse_quoted(t, 0)


def _parse_dword(body: _Text) -> int:
    s = body.s.strip(" \t")
    at = body.at(len(body.s) - len(body.s.lstrip(" \t")))
    digits = s[2:] if s[:2].lower() == "0x" else s
    if not s or not _HEX_DIGITS.match(digits):
        raise _Problem(at, f"dword data {s!r} is not hexadecimal" if s else "dword: needs a value",
                       "a dword is up to 8 hex digits without 0x, e.g. dword:1C200")
    if digits is not s:
        raise _Problem(at, f"dword data {s!r} has a '0x' prefix", f"write dword:{digits}")
    n = int(digits, 16)
    if n > 0xFFFFFFFF:
        raise _Problem(at, f"dword data {s!r} does not fit in 32 bits", "use hex(b): for a 64-bit qword")
    return n


def _utf16_text(raw: bytes, what: str, at: tuple[int, int]) -> str:
    if len(raw) % 2:
        raise _Problem(at, f"{what} data has an odd number of bytes ({len(raw)}); expected UTF-16LE")
    try:
        return raw.decode("utf-16-le")
    except UnicodeDecodeError:
        raise _Problem(at, f"{what} data is not valid UTF-16LE") from None


def _typed_hex(number: int, raw: bytes, at: tuple[int, int]) -> tuple[str, object]:
    label = f"hex({number:x})"
    if number in (1, 2):
        s = _utf16_text(raw, label, at).rstrip("\0")
        if "\0" in s:
            raise _Problem(at, f"{label} string has a NUL inside it")
        return ("sz" if number == 1 else "expand_sz"), s
    if number == 3:
        return "binary", raw
    if number in (4, 0xB):
        size = 4 if number == 4 else 8
        if len(raw) != size:
            raise _Problem(at, f"{label} data must be {size} bytes, found {len(raw)}")
        return ("dword" if number == 4 else "qword"), int.from_bytes(raw, "little")
    if number == 7:
        s = _utf16_text(raw, label, at)
        # One NUL ends each string and one more ends the list; tolerate a missing final one.
        if s.endswith("\0\0"):
            s = s[:-2]
        elif s.endswith("\0"):
            s = s[:-1]
            if s == "":
                return "multi_sz", ()
        return "multi_sz", tuple(s.split("\0"))
    return label, raw


def _resolve_include(target: str, directory: Path | None, include_dirs: Sequence[Path]) -> Path | None:
    target = target.replace("\\", "/")
    candidate = Path(target)
    bases = [] if candidate.is_absolute() else [d for d in ([directory] if directory else []) + list(include_dirs)]
    for full in ([candidate] if candidate.is_absolute() else [b / candidate for b in bases]):
        found = _find_case_insensitive(full)
        if found is not None:
            return found
    return None


def _find_case_insensitive(path: Path) -> Path | None:
    if path.is_file():
        return path
    here = Path(path.anchor) if path.is_absolute() else Path(".")
    for part in path.parts[1:] if path.is_absolute() else path.parts:
        if part in ("", "."):
            continue
        if part == "..":
            here = here.parent
            continue
        exact = here / part
        if exact.exists():
            here = exact
            continue
        try:
            matches = [e for e in os.listdir(here) if e.casefold() == part.casefold()]
        except OSError:
            return None
        if len(matches) != 1:
            return None
        here = here / matches[0]
    return here if here.is_file() else None


# --------------------------------------------------------------------------------------------
# Entry points


def parse_text(text: str | bytes, filename: str = "<string>", defines: Mapping[str, str] | None = None,
               strict: bool = False, hive: Hive | None = None,
               include_dirs: Sequence[str | os.PathLike] = ()) -> ParseResult:
    """Parse one file's content.  ``hive`` (if given) is updated in place and returned."""
    parser = _Parser(hive if hive is not None else Hive(), defines, strict, include_dirs)
    directory = Path(filename).parent if not filename.startswith("<") else None
    parser.run_source(_load(text, filename, directory))
    return ParseResult(parser.hive, parser.diagnostics)


def parse_files(paths: Sequence[str | os.PathLike], defines: Mapping[str, str] | None = None,
                strict: bool = False, hive: Hive | None = None,
                include_dirs: Sequence[str | os.PathLike] = ()) -> ParseResult:
    """Parse files in order into one hive: later files win, and ``#define``\\ s carry over to the
    files after them (CE concatenates its .reg files before processing them).  A file that cannot
    be read is a RegistryError even in tolerant mode: the caller named it."""
    parser = _Parser(hive if hive is not None else Hive(), defines, strict, include_dirs)
    for p in paths:
        path = Path(p)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise RegistryError(Location(str(p), 0, 0), f"cannot read registry file: {e.strerror}",
                                "check the path") from None
        parser.including.append(str(path.resolve()))
        try:
            parser.run_source(_load(data, str(p), path.parent))
        finally:
            parser.including.pop()
        parser.key, parser.no_key_reason = None, "none"      # a key does not carry into the next file
    return ParseResult(parser.hive, parser.diagnostics)
