"""The conditions of CE ``.reg`` files: makeimg's ``IF X [=V] [!]`` tests and C's ``#if``
expressions, evaluated against defines only (the grammar is described in :mod:`policy.regfile`).

An expression that cannot be decided (an unknown token, a string where a number is needed) raises
:class:`Unevaluable`; the parser turns that into a diagnostic and skips the block, never guesses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping


@dataclass
class Branch:
    """One open IF / #if block on the parser's stack: which arm is active, and whether any was."""

    kind: str                 # "#" or "IF"
    label: str                # as written, for messages
    lineno: int
    parent_active: bool
    taken: bool               # some branch so far was true
    active: bool
    else_seen: bool = False


class Unevaluable(Exception):
    """A condition that cannot be decided from the defines; the message says what stopped it."""


_COND_TOKEN = re.compile(r"\s*(?:(\|\||&&|==|!=|<=|>=|[!()<>])|\"([^\"]*)\"|([A-Za-z0-9_.]+))")
_NUMBER = re.compile(r"(?:0[xX]([0-9a-fA-F]+)|([0-9]+))[uUlL]*\Z")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _number(word: str) -> int | None:
    m = _NUMBER.match(word)
    if not m:
        return None
    return int(m.group(1), 16) if m.group(1) else int(m.group(2), 10)


_CE_TEST = re.compile(r"[ \t]*([A-Za-z_][A-Za-z0-9_]*)(?:[ \t]*(==|!=|=)[ \t]*([^\s!=]+))?(?:[ \t]*(!))?[ \t]*\Z")

# A CE test: (name, value or None, negate).  'X != V' is stored as the negation of 'X = V'.
CeTest = tuple[str, "str | None", bool]


def parse_ce_test(text: str) -> CeTest | None:
    """makeimg's ``IF NAME [=VALUE] [!]`` test, or None when ``text`` is not one.  Samsung's and
    other vendors' BSPs also write ``IF X == V`` and ``IF X != V``; they mean what they say."""
    m = _CE_TEST.match(text)
    if not m:
        return None
    negate = (m.group(2) == "!=") != (m.group(4) is not None)
    return m.group(1), m.group(3), negate


def ce_label(test: CeTest) -> str:
    name, value, negate = test
    if value is None:
        return f"IF {name}" + (" !" if negate else "")
    return f"IF {name}{'!=' if negate else '='}{value}"


class Condition:
    """Recursive descent over a ``#if`` expression (after ``$(VAR)`` expansion)."""

    def __init__(self, text: str, defines: Mapping[str, str]) -> None:
        self.defines = defines
        self.tokens: list[tuple[str, str]] = []
        i = 0
        text = text.rstrip()
        while i < len(text):
            m = _COND_TOKEN.match(text, i)
            if not m or m.end() == i:
                raise Unevaluable(f"unexpected {text[i:].strip()[:20]!r}")
            if m.group(1):
                self.tokens.append(("op", m.group(1)))
            elif m.group(2) is not None:
                self.tokens.append(("str", m.group(2)))
            else:
                self.tokens.append(("word", m.group(3)))
            i = m.end()
        self.i = 0

    def run(self) -> bool:
        if not self.tokens:
            raise Unevaluable("empty condition")
        v = self.or_()
        if self.i != len(self.tokens):
            raise Unevaluable(f"unexpected {self.tokens[self.i][1]!r}")
        return self.truth(v)

    def peek(self) -> str | None:
        return self.tokens[self.i][1] if self.i < len(self.tokens) and self.tokens[self.i][0] == "op" else None

    def take(self) -> tuple[str, str]:
        if self.i >= len(self.tokens):
            raise Unevaluable("condition ends too early")
        self.i += 1
        return self.tokens[self.i - 1]

    @staticmethod
    def truth(v: int | str) -> bool:
        if isinstance(v, int):
            return v != 0
        raise Unevaluable(f"{v!r} is not a number")

    def or_(self) -> int | str:
        v = self.and_()
        while self.peek() == "||":
            self.i += 1
            r = self.and_()
            v = int(self.truth(v) or self.truth(r))
        return v

    def and_(self) -> int | str:
        v = self.cmp()
        while self.peek() == "&&":
            self.i += 1
            r = self.cmp()
            v = int(self.truth(v) and self.truth(r))
        return v

    def cmp(self) -> int | str:
        v = self.unary()
        while self.peek() in ("==", "!=", "<", ">", "<=", ">="):
            op = self.take()[1]
            r = self.unary()
            if op in ("==", "!="):
                same = v == r if type(v) is type(r) else False
                v = int(same if op == "==" else not same)
            else:
                if not (isinstance(v, int) and isinstance(r, int)):
                    raise Unevaluable(f"cannot order {v!r} and {r!r}")
                v = int({"<": v < r, ">": v > r, "<=": v <= r, ">=": v >= r}[op])
        return v

    def unary(self) -> int | str:
        if self.peek() == "!":
            self.i += 1
            return int(not self.truth(self.unary()))
        return self.primary()

    def primary(self) -> int | str:
        kind, tok = self.take()
        if kind == "op" and tok == "(":
            v = self.or_()
            if self.take() != ("op", ")"):
                raise Unevaluable("expected ')'")
            return v
        if kind == "str":
            return tok
        if kind == "word" and tok == "defined":
            paren = self.peek() == "("
            if paren:
                self.i += 1
            kind, name = self.take()
            if kind != "word" or not IDENT.match(name):
                raise Unevaluable(f"expected a name after 'defined', found {name!r}")
            if paren and self.take() != ("op", ")"):
                raise Unevaluable("expected ')' after 'defined(NAME'")
            return int(name in self.defines)
        if kind == "word":
            n = _number(tok)
            if n is not None:
                return n
            if IDENT.match(tok):
                if tok not in self.defines:
                    return 0                    # as in C: an undefined name is 0
                value = self.defines[tok].strip()
                n = _number(value)
                return n if n is not None else value
            return tok
        raise Unevaluable(f"unexpected {tok!r}")
