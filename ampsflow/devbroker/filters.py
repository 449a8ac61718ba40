"""Content filters and topic matching for the devbroker (pure code, no I/O).

``compile_filter(text)`` turns an AMPS content filter into a predicate over a
JSON-decoded message body; ``compile_topic(topic)`` turns a subscription topic
into a predicate over published topic names.

Grammar (keywords are case-insensitive)::

    filter     := or_expr EOF
    or_expr    := and_expr ("OR" and_expr)*
    and_expr   := not_expr ("AND" not_expr)*
    not_expr   := "NOT" not_expr | "(" or_expr ")" | predicate
    predicate  := operand ( cmp_op operand
                          | ["NOT"] "IN" "(" operand ("," operand)* ")"
                          | ["NOT"] "BETWEEN" operand "AND" operand
                          | ["NOT"] "LIKE" string
                          | "IS" ["NOT"] "NULL" )
    cmp_op     := "=" | "==" | "!=" | "<>" | "<" | ">" | "<=" | ">="
    operand    := path | string | number | "TRUE" | "FALSE" | "NULL"
    path       := ("/" segment)+          segment: letters, digits, "_", "@", "$"
    string     := '...' ('' escapes ')  |  "..." ("" escapes ")
    number     := ["-"] digits ["." digits] [exponent]

Precedence is NOT > AND > OR. Anything else (functions, arithmetic, unknown
words, trailing input, unbalanced parentheses, an empty IN list, a bad LIKE
pattern) raises :class:`FilterError` naming the problem and its 1-based column.

Semantics, following the AMPS User Guide ("AMPS Expressions": comparison
operators, data types, LIKE, regular expressions; checked on
docs.crankuptheamps.com):

- Values: JSON strings, numbers and booleans are values; ``true``/``false``
  compare as the numbers 1/0 (AMPS: "Boolean: true (1) or false (0)"). A missing
  field, JSON ``null``, the empty string (AMPS: "an empty string is considered to
  be NULL"), and arrays/objects are NULL. A path into a non-object is NULL, so a
  body that is not an object only matches filters that do not depend on fields.
  AMPS matches arrays element-wise; the devbroker does not (arrays are NULL).
- Mixed types: as AMPS documents, a string compared with a number is converted
  to a number when it is numeric (``'2'``, ``'-1.5e3'``; no spaces, no ``nan``
  or ``inf``), so ``{"px": "10"}`` matches ``/px > 9``; a string that is not
  numeric is greater than every number. Two strings compare lexically (by code
  point) even when both are numeric (``'2.000' <> '2.0'`` is true).
- NULL follows SQL three-valued logic: a comparison, IN, BETWEEN or LIKE with a
  NULL operand is unknown, ``NOT unknown`` is unknown, and only a filter that
  evaluates to true matches. So ``/a != 1`` and ``NOT (/a = 1)`` do not match a
  message without ``/a``; ``IS NULL`` / ``IS NOT NULL`` are never unknown.
- ``BETWEEN`` is inclusive on both ends; ``IN`` is the OR of ``=`` comparisons.
- ``LIKE`` takes a regular expression. AMPS uses PCRE, a backtracking engine in
  which a pattern such as ``^(a+)+$`` takes exponential time on a hostile value;
  the devbroker uses RE2 (``google-re2``), whose matching time is linear in the
  value's length, compiled once at filter-compile time and applied unanchored
  (as PCRE matching is by default). RE2 covers the PCRE subset AMPS documents
  (classes, anchors, quantifiers, groups, alternation, ``(?i)``, ``\\Q..\\E``).
  What RE2 cannot express raises FilterError ``invalid LIKE regular expression``:
  backreferences (``\\1``), lookahead and lookbehind, atomic groups, possessive
  quantifiers, recursion, ``\\K``, repetition counts above 1000. Differences that
  compile: ``$`` matches only at the very end (PCRE also before a final
  newline), and ``\\d``, ``\\w``, ``\\s``, ``\\b`` are ASCII-only (as in PCRE
  without UCP). A pattern whose compiled program exceeds
  :attr:`FilterLimits.max_regex_program` instructions is refused too, since
  matching costs up to program size times value length. Numbers are matched
  against their decimal text; a string with lone surrogates (a JSON
  ``"\\ud800"`` escape) is matched as its raw code units.
- Size and shape: a filter longer than :attr:`FilterLimits.max_bytes` UTF-8
  bytes, nested deeper than :attr:`FilterLimits.max_depth` (parentheses and
  ``NOT``), or with an ``IN`` list of more than :attr:`FilterLimits.max_in_list`
  items raises FilterError before any work proportional to it is done beyond
  reading it, so compiling stays fast whatever a client sends.
- Double-quoted strings are accepted as AMPS examples use them; backslashes are
  literal characters (so ``LIKE "^90\\..*"`` is the regex ``^90\\..*``).
- Not supported (FilterError): functions, arithmetic, ``TOPIC_MATCH``, raw
  string literals, bare fields as booleans (write ``/flag = TRUE``).

Topics: as the AMPS User Guide ("Topics") says, a topic containing regular
expression characters is a regular expression; other topics match exactly.
A regex topic is an RE2 regular expression like ``LIKE`` patterns, applied
unanchored (AMPS does not document anchoring, PCRE's default is unanchored, so
write ``^orders$`` to anchor).

Evaluation never raises: a body the compiled predicate cannot evaluate (any
exception, e.g. a RecursionError on a pathological object) is "no match".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import re2

from ampsflow.errors import FilterError, TopicError

__all__ = ["FilterLimits", "compile_filter", "compile_topic", "is_regex_topic"]

Value = int | float | str | None
"""A normalized operand value: a number, a non-empty string, or None (NULL)."""
Getter = Callable[[object], Value]
Tri = Callable[[object], bool | None]
"""A compiled condition: True, False, or None for SQL's unknown."""

MAX_NESTING = 32
"""Default deepest nesting of parentheses and NOT (so compiling never overflows the stack)."""


@dataclass(frozen=True, slots=True)
class FilterLimits:
    """Bounds on what :func:`compile_filter` accepts (the broker's ``max_filter_*`` keys)."""

    max_bytes: int = 16 * 1024
    """Longest filter, in UTF-8 bytes."""
    max_depth: int = MAX_NESTING
    """Deepest nesting of parentheses and NOT."""
    max_in_list: int = 1000
    """Most items in one IN list."""
    max_regex_program: int = 2000
    """Largest compiled RE2 program (instructions) of a LIKE pattern or regex topic."""


DEFAULT_LIMITS = FilterLimits()
_RE2_MAX_MEM = 1 << 20
"""RE2 memory budget per regular expression (its DFA cache), bytes."""

_KEYWORDS = frozenset({"AND", "OR", "NOT", "IN", "BETWEEN", "LIKE", "IS", "NULL", "TRUE", "FALSE"})
_CMP_OPS = ("<=", ">=", "<>", "!=", "==", "=", "<", ">")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_@$]+")
_NUMBER_RE = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NUMERIC_STRING_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INT_STRING_RE = re.compile(r"[+-]?[0-9]+")
_DIGITS = frozenset("0123456789")
_WORD_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_WORD_CHARS = _WORD_START | _DIGITS
_TOPIC_REGEX_CHARS = frozenset(".*+?[](){}|^$\\")


# --- tokens -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "path", "string", "number", "word", "op", "(", ")", ",", "end"
    text: str
    column: int
    value: object = None


def _describe(tok: _Token) -> str:
    if tok.kind == "end":
        return "end of filter"
    return f"token {tok.text!r}"


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        col = i + 1
        if ch.isspace():
            i += 1
        elif ch in "(),":
            tokens.append(_Token(ch, ch, col))
            i += 1
        elif ch in "'\"":
            i = _read_string(text, i, tokens)
        elif ch == "/":
            i = _read_path(text, i, tokens)
        elif ch in _DIGITS or (ch in "-." and i + 1 < n and text[i + 1] in _DIGITS):
            m = _NUMBER_RE.match(text, i)
            if m is None:
                raise FilterError(f"malformed number at column {col}")
            end = m.end()
            if end < n and (text[end] in _WORD_CHARS or text[end] in ".@$"):
                raise FilterError(f"malformed number {text[i : end + 1]!r} at column {col}")
            lit = m.group()
            num = _to_number(lit)
            tokens.append(_Token("number", lit, col, num))
            i = end
        elif ch in _WORD_START:
            end = i + 1
            while end < n and text[end] in _WORD_CHARS:
                end += 1
            word = text[i:end]
            if word.upper() not in _KEYWORDS:
                after = text[end:].lstrip()
                what = "function" if after.startswith("(") else "word"
                raise FilterError(f"unsupported {what} {word!r} at column {col}")
            tokens.append(_Token("word", word.upper(), col))
            i = end
        else:
            op = next((o for o in _CMP_OPS if text.startswith(o, i)), None)
            if op is None:
                raise FilterError(f"unexpected character {ch!r} at column {col}")
            tokens.append(_Token("op", op, col))
            i += len(op)
    tokens.append(_Token("end", "", n + 1))
    return tokens


def _read_string(text: str, start: int, tokens: list[_Token]) -> int:
    quote = text[start]
    parts: list[str] = []
    i = start + 1
    while True:
        j = text.find(quote, i)
        if j < 0:
            raise FilterError(f"unterminated string starting at column {start + 1}")
        parts.append(text[i:j])
        if j + 1 < len(text) and text[j + 1] == quote:
            parts.append(quote)
            i = j + 2
            continue
        tokens.append(_Token("string", text[start : j + 1], start + 1, "".join(parts)))
        return j + 1


def _read_path(text: str, start: int, tokens: list[_Token]) -> int:
    segments: list[str] = []
    i = start
    while i < len(text) and text[i] == "/":
        m = _SEGMENT_RE.match(text, i + 1)
        if m is None:
            raise FilterError(f"empty or invalid field name after '/' at column {i + 1}")
        segments.append(m.group())
        i = m.end()
    tokens.append(_Token("path", text[start:i], start + 1, tuple(segments)))
    return i


# --- values and comparison ----------------------------------------------------------------------


def _norm(v: object) -> Value:
    """Map a JSON value to an operand value (exact type checks: never raises)."""
    t = type(v)
    if t is str:
        return v or None  # type: ignore[return-value]
    if t is int or t is float:
        return v  # type: ignore[return-value]
    if t is bool:
        return 1 if v else 0
    return None


def _to_number(s: str) -> int | float | None:
    """The number an ASCII decimal string denotes, or None when it is not one."""
    if _INT_STRING_RE.fullmatch(s):
        try:
            return int(s)
        except ValueError:  # more digits than int() accepts: fall back to a float
            return float(s)
    if _NUMERIC_STRING_RE.fullmatch(s):
        return float(s)
    return None


def _compare(a: int | float | str, b: int | float | str) -> int | None:
    """Order two non-NULL values AMPS-style: -1, 0, 1, or None if unordered (NaN)."""
    if type(a) is str:
        if type(b) is str:
            return (a > b) - (a < b)
        na = _to_number(a)
        if na is None:
            return 1
        a = na
    elif type(b) is str:
        nb = _to_number(b)
        if nb is None:
            return -1
        b = nb
    if a < b:  # type: ignore[operator]
        return -1
    if a > b:  # type: ignore[operator]
        return 1
    if a == b:
        return 0
    return None


_ORDER_TESTS: dict[str, Callable[[int], bool]] = {
    "=": lambda r: r == 0,
    "==": lambda r: r == 0,
    "!=": lambda r: r != 0,
    "<>": lambda r: r != 0,
    "<": lambda r: r < 0,
    ">": lambda r: r > 0,
    "<=": lambda r: r <= 0,
    ">=": lambda r: r >= 0,
}


# --- operands -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Operand:
    """A compiled operand: a getter, plus the value when it is a literal."""

    get: Getter
    is_const: bool
    const: Value = None
    text: str = ""


def _const(value: Value, text: str) -> _Operand:
    return _Operand(lambda _body: value, True, value, text)


def _path_getter(segments: tuple[str, ...]) -> Getter:
    if len(segments) == 1:
        key = segments[0]

        def get1(body: object) -> Value:
            if type(body) is dict:
                return _norm(body.get(key))
            return None

        return get1

    def get_n(body: object) -> Value:
        node = body
        for key in segments:
            if type(node) is not dict:
                return None
            node = node.get(key)
        return _norm(node)

    return get_n


# --- parser -------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, tokens: list[_Token], limits: FilterLimits) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.limits = limits

    @property
    def tok(self) -> _Token:
        return self.tokens[self.pos]

    def advance(self) -> _Token:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def at_word(self, word: str) -> bool:
        return self.tok.kind == "word" and self.tok.text == word

    def error(self, expected: str) -> FilterError:
        tok = self.tok
        return FilterError(f"expected {expected} but found {_describe(tok)} at column {tok.column}")

    def expect(self, kind: str, expected: str) -> _Token:
        if self.tok.kind != kind:
            raise self.error(expected)
        return self.advance()

    def expect_word(self, word: str) -> None:
        if not self.at_word(word):
            raise self.error(word)
        self.advance()

    def parse(self) -> Tri:
        cond = self.or_expr()
        if self.tok.kind != "end":
            tok = self.tok
            raise FilterError(f"unexpected {_describe(tok)} at column {tok.column}")
        return cond

    def or_expr(self) -> Tri:
        terms = [self.and_expr()]
        while self.at_word("OR"):
            self.advance()
            terms.append(self.and_expr())
        return terms[0] if len(terms) == 1 else _or(terms)

    def and_expr(self) -> Tri:
        terms = [self.not_expr()]
        while self.at_word("AND"):
            self.advance()
            terms.append(self.not_expr())
        return terms[0] if len(terms) == 1 else _and(terms)

    def not_expr(self) -> Tri:
        tok = self.tok
        self.depth += 1
        if self.depth > self.limits.max_depth:
            raise FilterError(f"nesting deeper than {self.limits.max_depth} at column {tok.column}")
        try:
            if self.at_word("NOT"):
                self.advance()
                return _not(self.not_expr())
            if tok.kind == "(":
                self.advance()
                cond = self.or_expr()
                if self.tok.kind != ")":
                    raise FilterError(
                        f"expected ')' to close '(' at column {tok.column} but found "
                        f"{_describe(self.tok)} at column {self.tok.column}"
                    )
                self.advance()
                return cond
            return self.predicate()
        finally:
            self.depth -= 1

    def operand(self) -> _Operand:
        tok = self.tok
        if tok.kind == "path":
            self.advance()
            return _Operand(_path_getter(tok.value), False, None, tok.text)  # type: ignore[arg-type]
        if tok.kind == "string":
            self.advance()
            return _const(tok.value or None, tok.text)  # type: ignore[arg-type]
        if tok.kind == "number":
            self.advance()
            return _const(tok.value, tok.text)  # type: ignore[arg-type]
        if tok.kind == "word" and tok.text in ("TRUE", "FALSE", "NULL"):
            self.advance()
            value = {"TRUE": 1, "FALSE": 0, "NULL": None}[tok.text]
            return _const(value, tok.text)
        raise self.error("a field path or a literal")

    def predicate(self) -> Tri:
        left = self.operand()
        tok = self.tok
        if tok.kind == "op":
            self.advance()
            return _comparison(left, tok.text, self.operand())
        if self.at_word("IS"):
            self.advance()
            negate = self.at_word("NOT")
            if negate:
                self.advance()
            self.expect_word("NULL")
            return _is_null(left, negate)
        negate = self.at_word("NOT")
        if negate:
            self.advance()
        if self.at_word("IN"):
            self.advance()
            cond = self.in_list(left)
        elif self.at_word("BETWEEN"):
            self.advance()
            low = self.operand()
            self.expect_word("AND")
            high = self.operand()
            cond = _between(left, low, high)
        elif self.at_word("LIKE"):
            self.advance()
            pattern = self.expect("string", "a quoted regular expression after LIKE")
            cond = _like(left, pattern, self.limits)
        else:
            raise self.error(
                "IN, BETWEEN or LIKE after NOT"
                if negate
                else "a comparison operator, IN, BETWEEN, LIKE or IS"
            )
        return _not(cond) if negate else cond

    def in_list(self, left: _Operand) -> Tri:
        self.expect("(", "'(' after IN")
        if self.tok.kind == ")":
            raise FilterError(f"empty IN list at column {self.tok.column}")
        items = [self.operand()]
        while self.tok.kind == ",":
            if len(items) >= self.limits.max_in_list:
                raise FilterError(
                    f"IN list longer than {self.limits.max_in_list} items at column "
                    f"{self.tok.column}"
                )
            self.advance()
            items.append(self.operand())
        self.expect(")", "',' or ')' in IN list")
        return _in(left, items)


# --- compiled conditions ------------------------------------------------------------------------


def _comparison(left: _Operand, op: str, right: _Operand) -> Tri:
    test = _ORDER_TESTS[op]
    if left.is_const and right.is_const:
        a, b = left.const, right.const
        r = None if a is None or b is None else _compare(a, b)
        result = None if r is None else test(r)
        return lambda _body: result
    lget, rget = left.get, right.get
    if right.is_const and op in ("=", "==") and type(right.const) is str:
        c = right.const
        if _to_number(c) is None:
            # Fast path for the common `/field = 'text'`: a non-numeric string literal equals
            # only the identical string; a number is never equal to it; NULL is unknown.
            def eq_text(body: object) -> bool | None:
                v = lget(body)
                if v is None:
                    return None
                return v == c

            return eq_text

    def cmp(body: object) -> bool | None:
        a = lget(body)
        if a is None:
            return None
        b = rget(body)
        if b is None:
            return None
        r = _compare(a, b)
        return None if r is None else test(r)

    return cmp


def _is_null(left: _Operand, negate: bool) -> Tri:
    get = left.get
    if negate:
        return lambda body: get(body) is not None
    return lambda body: get(body) is None


def _in(left: _Operand, items: list[_Operand]) -> Tri:
    if not left.is_const and all(item.is_const for item in items):
        return _in_literals(left.get, tuple(item.const for item in items))
    eqs = [_comparison(left, "=", item) for item in items]

    def member(body: object) -> bool | None:
        unknown = False
        for eq in eqs:
            r = eq(body)
            if r:
                return True
            if r is None:
                unknown = True
        return None if unknown else False

    return member


def _in_literals(get: Getter, literals: tuple[Value, ...]) -> Tri:
    """``/field IN (literal, ...)``: read the field once, compare with each literal."""
    has_null = None in literals
    values = tuple(v for v in literals if v is not None)

    def member(body: object) -> bool | None:
        v = get(body)
        if v is None:
            return None
        for c in values:
            if _compare(v, c) == 0:
                return True
        return None if has_null else False

    return member


def _between(left: _Operand, low: _Operand, high: _Operand) -> Tri:
    return _and([_comparison(left, ">=", low), _comparison(left, "<=", high)])


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # RE2 would print every refused pattern to stderr
    options.never_capture = True  # a yes/no answer lets RE2 use its DFA
    options.max_mem = _RE2_MAX_MEM
    return options


_RE2_OPTIONS = _re2_options()


def _regex(pattern: str, limits: FilterLimits) -> Callable[[bytes], bool]:
    """Compile ``pattern`` with RE2; return a predicate over UTF-8 bytes.

    Raises:
        ValueError: RE2 cannot compile it, or its program is too large (the message says).
    """
    try:
        compiled = re2.compile(pattern, options=_RE2_OPTIONS)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise ValueError(str(detail)) from None
    except (TypeError, UnicodeError) as exc:
        raise ValueError(f"pattern is not UTF-8 text ({exc})") from None
    if compiled.programsize > limits.max_regex_program:
        raise ValueError(
            f"compiled program of {compiled.programsize} instructions exceeds "
            f"{limits.max_regex_program}"
        )
    search = compiled.search

    def matches(value: bytes) -> bool:
        return search(value) is not None

    return matches


def _utf8(text: str) -> bytes:
    # surrogatepass: a lone surrogate from a JSON escape is matched as its code unit
    return text.encode("utf-8", "surrogatepass")


def _like(left: _Operand, pattern_tok: _Token, limits: FilterLimits) -> Tri:
    pattern = str(pattern_tok.value)
    try:
        search = _regex(pattern, limits)
    except ValueError as exc:
        raise FilterError(
            f"invalid LIKE regular expression {pattern_tok.text[:200]} at column "
            f"{pattern_tok.column}: {exc}"
        ) from None
    get = left.get

    def like(body: object) -> bool | None:
        v = get(body)
        if v is None:
            return None
        return search(_utf8(v) if type(v) is str else repr(v).encode("ascii"))

    return like


def _not(cond: Tri) -> Tri:
    def negated(body: object) -> bool | None:
        r = cond(body)
        return None if r is None else not r

    return negated


def _and(terms: list[Tri]) -> Tri:
    conds = tuple(terms)

    def all_true(body: object) -> bool | None:
        unknown = False
        for c in conds:
            r = c(body)
            if r is False:
                return False
            if r is None:
                unknown = True
        return None if unknown else True

    return all_true


def _or(terms: list[Tri]) -> Tri:
    conds = tuple(terms)

    def any_true(body: object) -> bool | None:
        unknown = False
        for c in conds:
            r = c(body)
            if r:
                return True
            if r is None:
                unknown = True
        return None if unknown else False

    return any_true


def _match_all(_body: object) -> bool:
    return True


# --- public API ---------------------------------------------------------------------------------


def compile_filter(
    text: str | None,
    limits: FilterLimits = DEFAULT_LIMITS,
    on_error: Callable[[Exception], None] | None = None,
) -> Callable[[object], bool]:
    """Compile an AMPS content filter into a predicate over a JSON-decoded body.

    ``None``, ``""`` and whitespace match everything. The predicate never
    raises; it returns True only when the filter evaluates to true, and False for
    a body it cannot evaluate (after passing the exception to ``on_error``, for a
    counter). Raises :class:`FilterError` (message: what and at which column) for
    anything the grammar in this module's docstring does not accept or that
    exceeds ``limits``.
    """
    if text is None:
        return _match_all
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise FilterError(f"filter of {size} bytes is longer than {limits.max_bytes}")
    if not text.strip():
        return _match_all
    try:
        cond = _Parser(_tokenize(text), limits).parse()
    except RecursionError:  # only if the caller's stack was nearly full already
        raise FilterError("filter is nested too deeply") from None

    def matches(body: object) -> bool:
        try:
            return cond(body) is True
        except Exception as exc:  # a body that cannot be evaluated does not match
            if on_error is not None:
                on_error(exc)
            return False

    return matches


def is_regex_topic(topic: str) -> bool:
    """Whether AMPS treats this subscription topic as a regular expression."""
    return any(ch in _TOPIC_REGEX_CHARS for ch in topic)


def compile_topic(topic: str, limits: FilterLimits = DEFAULT_LIMITS) -> Callable[[str], bool]:
    """Compile a subscription topic into a predicate over published topic names.

    A literal topic matches only itself; a topic with regex characters is an RE2
    regular expression applied unanchored. Raises :class:`TopicError` with reason
    ``invalid topic`` for an empty name, one with control characters or one that is not
    UTF-8 text, ``bad regex topic`` for a regex RE2 cannot compile or whose program
    exceeds ``limits.max_regex_program``. The predicate never raises.
    """
    if not topic or not topic.strip():
        raise TopicError("invalid topic", "topic is empty")
    bad = next((ch for ch in topic if ord(ch) < 0x20 or ord(ch) == 0x7F), None)
    if bad is not None:
        raise TopicError("invalid topic", f"topic contains control character {bad!r}")
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:
        raise TopicError("invalid topic", "topic is not UTF-8 text (a lone surrogate)") from None
    if not is_regex_topic(topic):
        return topic.__eq__
    try:
        search = _regex(topic, limits)
    except ValueError as exc:
        raise TopicError("bad regex topic", f"{topic[:200]!r}: {exc}") from None

    def matches(name: str) -> bool:
        return search(_utf8(name))

    return matches
