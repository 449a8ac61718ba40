"""Content filters and topic matching of the devbroker."""

from __future__ import annotations

import inspect
import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ampsflow.devbroker.filters import (
    MAX_NESTING,
    FilterLimits,
    compile_filter,
    compile_topic,
    is_regex_topic,
)
from ampsflow.errors import AmpsflowError, FilterError, TopicError
from tests.strategies import examples, filter_bodies, hostile_filters


def matches(text: str, body: object) -> bool:
    return compile_filter(text)(body)


# --- match-all ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [None, "", "   ", "\t\n"])
def test_empty_filter_matches_everything(text: str | None) -> None:
    """No filter, an empty one or only whitespace matches any body."""
    f = compile_filter(text)
    assert [f({}), f("text"), f(None)] == [True, True, True]


# --- comparison operators -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/n = 5", True),
        ("/n == 5", True),
        ("/n = 6", False),
        ("/n != 6", True),
        ("/n != 5", False),
        ("/n <> 6", True),
        ("/n <> 5", False),
        ("/n < 6", True),
        ("/n < 5", False),
        ("/n > 4", True),
        ("/n > 5", False),
        ("/n <= 5", True),
        ("/n <= 4", False),
        ("/n >= 5", True),
        ("/n >= 6", False),
    ],
)
def test_each_comparison_operator_on_numbers(text: str, expected: bool) -> None:
    """Every comparison operator compares numbers numerically."""
    assert expected == matches(text, {"n": 5})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/s = 'abc'", True),
        ("/s < 'abd'", True),
        ("/s > 'abd'", False),
        ("/s >= 'ab'", True),
        ("/s != 'ABC'", True),
    ],
)
def test_strings_compare_lexically(text: str, expected: bool) -> None:
    """Two strings compare lexically and case-sensitively."""
    assert expected == matches(text, {"s": "abc"})


def test_integer_equals_decimal() -> None:
    """2 = 2.0 is a numeric comparison (AMPS)."""
    assert matches("/n = 2.0", {"n": 2})


def test_negative_and_exponent_literals() -> None:
    """Negative numbers and exponents are number literals."""
    assert [matches("/n = -3", {"n": -3}), matches("/n = 1.5e3", {"n": 1500})] == [True, True]


def test_literal_may_be_on_the_left() -> None:
    """A literal may stand on the left of a comparison."""
    assert matches("10 < /n", {"n": 11})


def test_field_compared_with_field() -> None:
    """Two fields of the same message can be compared."""
    assert [
        matches("/bid < /ask", {"bid": 1, "ask": 2}),
        matches("/bid < /ask", {"bid": 3, "ask": 2}),
    ] == [True, False]


# --- mixed types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "body", "expected"),
    [
        ("/px > 9", {"px": "10"}, True),
        ("/px = 10", {"px": "10.0"}, True),
        ("/px < '9'", {"px": 10}, False),
        ("/px > 'abc'", {"px": 10}, False),
        ("/px < 'abc'", {"px": 10}, True),
        ("/px = 'abc'", {"px": 10}, False),
        ("/px != 'abc'", {"px": 10}, True),
        ("/s > 5", {"s": "abc"}, True),
        ("/s = '2.0'", {"s": "2.000"}, False),
        ("/s = 1", {"s": " 1"}, False),
        ("/s = 0", {"s": "nan"}, False),
    ],
)
def test_string_number_comparisons_follow_amps(text: str, body: object, expected: bool) -> None:
    """Numeric strings compare numerically with numbers; other strings are greater."""
    assert expected == matches(text, body)


@pytest.mark.parametrize(
    ("text", "body", "expected"),
    [
        ("/b = TRUE", {"b": True}, True),
        ("/b = FALSE", {"b": False}, True),
        ("/b = true", {"b": False}, False),
        ("/b = 1", {"b": True}, True),
    ],
)
def test_booleans_compare_as_one_and_zero(text: str, body: object, expected: bool) -> None:
    """JSON booleans are 1/0, TRUE/FALSE are case-insensitive literals."""
    assert expected == matches(text, body)


# --- NULL and missing fields --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["/a = 1", "/a != 1", "/a <> 1", "/a < 1", "/a > 1", "/a IN (1, 2)", "/a NOT IN (1)",
     "/a BETWEEN 0 AND 2", "/a NOT BETWEEN 0 AND 2", "/a LIKE '.*'", "/a NOT LIKE 'x'",
     "NOT /a = 1", "NOT (/a != 1)"],
)  # fmt: skip
def test_missing_field_never_matches_a_comparison(text: str) -> None:
    """Any comparison with a missing field is unknown, and so is its negation."""
    assert not matches(text, {"b": 1})


@pytest.mark.parametrize("body", [{}, {"a": None}, {"a": ""}, {"a": [1]}, {"a": {"b": 1}}])
def test_is_null_for_missing_null_empty_and_containers(body: object) -> None:
    """Missing, null, empty-string, array and object values are NULL."""
    assert [matches("/a IS NULL", body), matches("/a IS NOT NULL", body)] == [True, False]


def test_is_not_null_for_a_value() -> None:
    """A present scalar value IS NOT NULL."""
    assert [matches("/a IS NULL", {"a": 0}), matches("/a is not null", {"a": 0})] == [False, True]


def test_comparison_with_null_literal_is_false() -> None:
    """Comparing with the NULL literal is never true, even for NULL fields."""
    assert [matches("/a = NULL", {}), matches("/a != NULL", {"a": 1})] == [False, False]


def test_unknown_or_true_is_true() -> None:
    """Three-valued OR: unknown OR true matches."""
    assert matches("/missing = 1 OR /a = 1", {"a": 1})


def test_unknown_and_false_is_false_and_negation_matches() -> None:
    """Three-valued AND: NOT (unknown AND false) matches because the AND is false."""
    assert matches("NOT (/missing = 1 AND /a = 2)", {"a": 1})


# --- paths and bodies ---------------------------------------------------------------------------


def test_nested_path() -> None:
    """/a/b/c walks nested objects."""
    assert matches("/a/b/c = 'deep'", {"a": {"b": {"c": "deep"}}})


@pytest.mark.parametrize("body", [{"a": 1}, {"a": {"x": 1}}, {"a": [{"b": 1}]}])
def test_nested_path_through_non_object_is_null(body: object) -> None:
    """A path through a scalar, a missing key or an array is NULL."""
    assert matches("/a/b IS NULL", body)


@pytest.mark.parametrize("body", [None, 3, "x", [1, 2], True])
def test_non_object_body_has_no_fields(body: object) -> None:
    """A non-object body does not match field comparisons but does match IS NULL."""
    assert [matches("/a = 1", body), matches("/a IS NULL", body)] == [False, True]


def test_non_object_body_matches_field_free_filter() -> None:
    """A filter that references no field matches any body when it is true."""
    assert [matches("1 = 1", "text"), matches("1 = 2", "text")] == [True, False]


def test_path_segments_allow_digits_and_at() -> None:
    """Field names may be digits (/55) or start with @ (XML-style attributes)."""
    assert matches("/55 = 'X' AND /o/@Px = 1", {"55": "X", "o": {"@Px": 1}})


# --- logic and precedence -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [({"a": 1, "b": 0, "c": 0}, True), ({"a": 0, "b": 1, "c": 1}, True),
     ({"a": 0, "b": 1, "c": 0}, False)],
)  # fmt: skip
def test_and_binds_tighter_than_or(body: object, expected: bool) -> None:
    """a OR b AND c parses as a OR (b AND c)."""
    assert expected == matches("/a = 1 OR /b = 1 AND /c = 1", body)


def test_not_binds_tighter_than_and() -> None:
    """NOT a AND b parses as (NOT a) AND b."""
    assert matches("NOT /a = 1 AND /b = 1", {"a": 0, "b": 1})


def test_parentheses_override_precedence() -> None:
    """(a OR b) AND c requires c."""
    assert not matches("(/a = 1 OR /b = 1) AND /c = 1", {"a": 1, "b": 0, "c": 0})


def test_double_not() -> None:
    """NOT NOT f is f."""
    assert matches("NOT NOT /a = 1", {"a": 1})


@pytest.mark.parametrize("text", ["/a = 1 and /b = 2", "/a = 1 AnD /b = 2", "/a = 1 AND /b = 2"])
def test_keywords_are_case_insensitive(text: str) -> None:
    """AND, OR, NOT and the other keywords are case-insensitive."""
    assert matches(text, {"a": 1, "b": 2})


# --- IN, BETWEEN, LIKE --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("/s IN ('a', 'b')", True), ("/s IN ('x')", False), ("/s NOT IN ('x', 'y')", True),
     ("/s not in ('a')", False), ("/n IN (1, 2.5, 'q')", True)],
)  # fmt: skip
def test_in_and_not_in(text: str, expected: bool) -> None:
    """IN is membership by =, NOT IN its negation."""
    assert expected == matches(text, {"s": "a", "n": 2.5})


def test_not_in_with_null_member_is_unknown() -> None:
    """NOT IN with a NULL in the list never matches (SQL semantics)."""
    assert not matches("/n NOT IN (1, NULL)", {"n": 5})


@pytest.mark.parametrize(
    ("n", "expected"), [(0, True), (5, True), (10, True), (-1, False), (11, False)]
)
def test_between_is_inclusive(n: int, expected: bool) -> None:
    """BETWEEN includes both bounds."""
    assert expected == matches("/n BETWEEN 0 AND 10", {"n": n})


def test_not_between() -> None:
    """NOT BETWEEN is true outside the range."""
    assert [
        matches("/n NOT BETWEEN 1 AND 2", {"n": 3}),
        matches("/n NOT BETWEEN 1 AND 2", {"n": 1}),
    ] == [True, False]


def test_between_inside_and_chain() -> None:
    """The AND of BETWEEN does not end the enclosing AND chain."""
    assert matches("/n BETWEEN 1 AND 3 AND /s = 'x'", {"n": 2, "s": "x"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("/s LIKE '^IB.?$'", True), ("/s LIKE 'M'", True), ("/s LIKE '^M'", False),
     ("/s LIKE '(?i)^ibm$'", True), ("/s NOT LIKE 'Z'", True), ("/s like 'B'", True)],
)  # fmt: skip
def test_like_is_an_unanchored_regex(text: str, expected: bool) -> None:
    """LIKE searches with a regular expression; (?i) makes it case-insensitive."""
    assert expected == matches(text, {"s": "IBM"})


def test_like_on_number_uses_its_text() -> None:
    """A number is matched against its decimal text."""
    assert matches('/px LIKE "^90\\..*"', {"px": 90.25})


# --- quoting ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("/s = 'it''s'", "it's"), ('/s = "say ""hi"""', 'say "hi"'), ("/s = \"it's\"", "it's"),
     ("/s = 'a\\b'", "a\\b"), ("/s = ' x '", " x ")],
)  # fmt: skip
def test_string_quoting(text: str, value: str) -> None:
    """Doubled quotes escape; backslashes and spaces are literal."""
    assert matches(text, {"s": value})


def test_keyword_inside_string_is_text() -> None:
    """Keywords and operators inside a string literal are just text."""
    assert matches("/s = 'a AND b OR (c)'", {"s": "a AND b OR (c)"})


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("/a = 1)", "unexpected token ')' at column 7"),
        ("(/a = 1", "expected ')' to close '(' at column 1 but found end of filter at column 8"),
        ("/a = ", "expected a field path or a literal but found end of filter at column 6"),
        ("/a", "expected a comparison operator, IN, BETWEEN, LIKE or IS"),
        ("UPPER(/a) = 'X'", "unsupported function 'UPPER' at column 1"),
        ("/a = 1 foo", "unsupported word 'foo' at column 8"),
        ("/a IN ()", "empty IN list at column 8"),
        ("/a IN (1, )", "expected a field path or a literal but found token ')' at column 11"),
        ("/a IN (1 2)", "expected ',' or ')' in IN list but found token '2' at column 10"),
        ("/a LIKE '('", "invalid LIKE regular expression '(' at column 9"),
        ("/a LIKE /b", "expected a quoted regular expression after LIKE"),
        ("/a = 'open", "unterminated string starting at column 6"),
        ("/a = 1 +", "unexpected character '+' at column 8"),
        ("/a + 1 = 2", "unexpected character '+' at column 4"),
        ("/ = 1", "empty or invalid field name after '/' at column 1"),
        ("/a = 12abc", "malformed number '12a' at column 6"),
        ("/a BETWEEN 1 OR 2", "expected AND but found token 'OR' at column 14"),
        ("/a NOT = 1", "expected IN, BETWEEN or LIKE after NOT"),
        ("/a IS 1", "expected NULL but found token '1' at column 7"),
        ("/a = 1 AND", "expected a field path or a literal but found end of filter"),
        ("()", "expected a field path or a literal but found token ')' at column 2"),
        ("/a = 1 OR OR /b = 1", "found token 'OR' at column 11"),
    ],
)
def test_bad_filter_message_says_what_and_where(text: str, message: str) -> None:
    """A filter outside the grammar raises FilterError naming the problem and column."""
    with pytest.raises(FilterError) as info:
        compile_filter(text)
    assert message in str(info.value)


def test_filter_error_is_value_error_and_ampsflow_error() -> None:
    """FilterError is both an AmpsflowError and a ValueError."""
    assert (issubclass(FilterError, AmpsflowError), issubclass(FilterError, ValueError)) == (
        True,
        True,
    )


def test_nesting_limit_is_a_filter_error() -> None:
    """Absurdly deep nesting is rejected, not a stack overflow."""
    text = "(" * (MAX_NESTING + 1) + "/a = 1" + ")" * (MAX_NESTING + 1)
    with pytest.raises(FilterError, match="nesting deeper than"):
        compile_filter(text)


def test_nesting_within_limit_compiles() -> None:
    """Nesting up to the limit works."""
    depth = MAX_NESTING - 1
    assert matches("(" * depth + "/a = 1" + ")" * depth, {"a": 1})


# --- topics -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "expected"),
    [("orders", False), ("a/b/c", False), ("LN_ORDERS", False), (".*_ORDERS", True),
     ("orders.us", True), ("^x$", True), ("a|b", True), ("x[12]", True)],
)  # fmt: skip
def test_is_regex_topic(topic: str, expected: bool) -> None:
    """A topic with regex metacharacters is a regex topic."""
    assert expected == is_regex_topic(topic)


def test_literal_topic_matches_only_itself() -> None:
    """A literal topic matches exactly, not as a prefix or substring."""
    m = compile_topic("orders")
    assert [m("orders"), m("orders2"), m("myorders")] == [True, False, False]


def test_regex_topic_matches_by_search() -> None:
    """A regex topic matches names the regex finds (unanchored)."""
    m = compile_topic(".*_ORDERS")
    assert [m("LN_ORDERS"), m("NY_ORDERS"), m("ORDERS")] == [True, True, False]


def test_anchored_regex_topic() -> None:
    """Anchors restrict a regex topic to whole names."""
    m = compile_topic("^(internal|external)$")
    assert [m("internal"), m("external"), m("internal2")] == [True, True, False]


@pytest.mark.parametrize("topic", ["orders(", "[a-", "*x", "a{2,1}"])
def test_bad_regex_topic(topic: str) -> None:
    """A regex topic that does not compile raises TopicError 'bad regex topic'."""
    with pytest.raises(TopicError) as info:
        compile_topic(topic)
    assert (str(info.value), info.value.reason) == ("bad regex topic", "bad regex topic")


@pytest.mark.parametrize("topic", ["", "   ", "a\nb", "a\x00b"])
def test_invalid_topic(topic: str) -> None:
    """An empty topic or one with control characters is 'invalid topic'."""
    with pytest.raises(TopicError) as info:
        compile_topic(topic)
    assert str(info.value) == "invalid topic"


def test_topic_error_carries_detail() -> None:
    """TopicError.detail says what is wrong, for the log line."""
    with pytest.raises(TopicError) as info:
        compile_topic("orders(")
    assert "orders(" in info.value.detail


# --- properties ---------------------------------------------------------------------------------

scalars = st.one_of(
    st.integers(-1000, 1000),
    st.floats(-1e6, 1e6, allow_nan=False),
    st.text(alphabet="ab01.-", min_size=1, max_size=4),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from("abc"), children, max_size=3),
    ),
    max_leaves=10,
)


def literal(value: int | float | str) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


@settings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from(["=", "!=", "<>", "<", ">", "<=", ">="]),
    field=scalars,
    lit=scalars,
)
def test_not_is_the_complement_for_non_null_comparisons(
    op: str, field: int | float | str, lit: int | float | str
) -> None:
    """For non-NULL operands NOT (f) matches exactly when f does not."""
    body = {"a": field}
    text = f"/a {op} {literal(lit)}"
    assert (not matches(text, body)) == matches(f"NOT ({text})", body)


@settings(max_examples=300, deadline=None)
@given(a=scalars, b=scalars)
def test_exactly_one_of_lt_eq_gt_holds(a: int | float | str, b: int | float | str) -> None:
    """The AMPS ordering is total on non-NULL values."""
    body = {"a": a, "b": b}
    results = [matches(f"/a {op} /b", body) for op in ("<", "=", ">")]
    assert sum(results) == 1


filter_alphabet = st.sampled_from(
    ["/a", "/b/c", " ", "'x'", '"y"', "1", "-2.5", "(", ")", ",", "=", "!=", "<>", "<", ">=",
     "AND", "OR", "NOT", "IN", "BETWEEN", "LIKE", "IS", "NULL", "TRUE", "'(?i)x'", "'['", "'"]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(
    parts=st.lists(filter_alphabet, max_size=12),
    bodies=st.lists(json_values, min_size=1, max_size=3),
)
def test_token_soup_only_raises_filter_error_and_never_at_evaluation(
    parts: list[str], bodies: list[object]
) -> None:
    """Random token sequences either compile or raise FilterError; evaluation returns a bool."""
    text = " ".join(parts)
    try:
        f = compile_filter(text)
    except FilterError:
        return
    assert all(type(f(body)) is bool for body in bodies)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=30), body=json_values)
def test_arbitrary_text_only_raises_filter_error(text: str, body: object) -> None:
    """Arbitrary text never raises anything but FilterError, and evaluation never raises."""
    try:
        f = compile_filter(text)
    except FilterError:
        return
    assert type(f(body)) is bool


@settings(max_examples=200, deadline=None)
@given(body=json_values)
def test_json_round_trip_bodies_evaluate(body: object) -> None:
    """A composite filter evaluates on any JSON-decoded body without raising."""
    f = compile_filter(
        "(/a > 1 OR /b LIKE 'x') AND /c NOT IN (1, 'y') AND /a/b BETWEEN 0 AND 'z' "
        "OR /b IS NOT NULL"
    )
    assert type(f(json.loads(json.dumps(body)))) is bool


@settings(max_examples=300, deadline=None)
@given(topic=st.text(max_size=12))
def test_compile_topic_only_raises_topic_error(topic: str) -> None:
    """Any topic string compiles or raises TopicError with one of the two reasons."""
    reason = None
    try:
        compile_topic(topic)
    except TopicError as exc:
        reason = exc.reason
    assert reason in (None, "bad regex topic", "invalid topic")


def test_empty_string_literal_is_null() -> None:
    """'' is NULL, as in AMPS: '' IS NULL holds and '' = '' does not."""
    assert [matches("'' IS NULL", {}), matches("'' = ''", {})] == [True, False]


def test_huge_numeric_string_compares_without_raising() -> None:
    """A numeric string longer than int() accepts still compares, as a float."""
    assert matches("/n > 5", {"n": "9" * 5000})


def test_huge_integer_literal_compiles() -> None:
    """An integer literal longer than int() accepts becomes a float."""
    assert matches("/n < " + "9" * 5000, {"n": 1})


def test_in_list_may_hold_fields() -> None:
    """IN list items may be field paths as well as literals."""
    assert [matches("/a IN (/b, 9)", {"a": 2, "b": 2}), matches("/a IN (/b)", {"a": 2})] == [
        True,
        False,
    ]


@pytest.mark.parametrize(
    "pattern",
    ["(a)\\1", "a(?=b)", "(?<=a)b", "(?>a+)", "a++", "(?R)", "a\\Kb", "a{1001}"],
    ids=["backreference", "lookahead", "lookbehind", "atomic", "possessive", "recursion",
         "keep-out", "huge-count"],
)  # fmt: skip
def test_pcre_only_like_syntax_is_a_filter_error(pattern: str) -> None:
    """A PCRE construct RE2 cannot run in linear time is refused at compile time."""
    with pytest.raises(FilterError, match="invalid LIKE regular expression"):
        compile_filter(f"/a LIKE '{pattern}'")


def test_quoted_literal_like_works_as_in_pcre() -> None:
    """RE2 has PCRE's \\Q..\\E literal quoting."""
    assert [matches("/a LIKE '\\Qa.b\\E'", {"a": v}) for v in ("xa.by", "axb")] == [True, False]


# --- limits: nothing a client sends can make compiling or matching slow -------------------------


def test_catastrophic_backtracking_pattern_is_linear() -> None:
    """^(a+)+$ against a long run of a's and one b: exponential in a backtracking engine
    (27 characters took 6.8 s), immediate here, with any length."""
    f = compile_filter("/s LIKE '^(a+)+$'")
    assert [f({"s": "a" * 100_000 + "b"}), f({"s": "a" * 100_000})] == [False, True]


def test_regex_program_above_the_limit_is_refused() -> None:
    """A pattern that compiles to a huge program is refused (matching costs program size
    times value length)."""
    limits = FilterLimits(max_regex_program=100)
    with pytest.raises(FilterError, match="instructions exceeds 100"):
        compile_filter("/a LIKE '(x[ab]{150}y)'", limits)
    assert compile_filter("/a LIKE 'x[ab]{5}y'", limits)({"a": "xababay"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("(" * 5_000_000 + "/a = 1" + ")" * 5_000_000, "bytes is longer than 16384"),
        ("/a IN (" + ",".join(["1"] * 1_000_000) + ")", "bytes is longer than 16384"),
    ],
    ids=["5M-parentheses", "1M-in-list"],
)
def test_oversized_filter_is_refused_before_parsing(text: str, message: str) -> None:
    """Filters that took 21 s and 9.8 s to parse are refused from their length."""
    with pytest.raises(FilterError, match=message):
        compile_filter(text)


def test_in_list_above_the_limit_is_refused() -> None:
    """An IN list longer than max_in_list is refused, naming the limit and where."""
    limits = FilterLimits(max_in_list=3)
    with pytest.raises(FilterError, match="IN list longer than 3 items at column 13"):
        compile_filter("/a IN (1,2,3,4)", limits)
    assert compile_filter("/a IN (1,2,3)", limits)({"a": 3})


def test_nesting_limit_is_configurable() -> None:
    """max_depth bounds parentheses and NOT together."""
    limits = FilterLimits(max_depth=3)
    with pytest.raises(FilterError, match="nesting deeper than 3"):
        compile_filter("NOT ((/a = 1))", limits)
    assert compile_filter("NOT (/a = 1)", limits)({"a": 2})


def test_surrogate_in_value_does_not_raise() -> None:
    """A lone surrogate in a body string (valid JSON escape) is matched, not an error."""
    body = json.loads('{"s":"x\\ud800y"}')
    assert [matches("/s LIKE 'x.y'", body), matches("/s LIKE '^z'", body)] == [True, False]


def test_body_that_cannot_be_evaluated_does_not_match() -> None:
    """Evaluation that fails (here: the stack runs out inside a nested filter) is no
    match, never an exception."""
    errors: list[Exception] = []
    f = compile_filter("NOT " * 31 + "/a = 2", on_error=errors.append)
    depth = len(inspect.stack())
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 20)
    try:
        result = f({"a": 1})
    finally:
        sys.setrecursionlimit(limit)
    assert (result, f({"a": 1}), [type(e) for e in errors]) == (False, True, [RecursionError])


def test_deeply_nested_body_evaluates() -> None:
    """A 100,000-level nested object is walked only as deep as the filter's paths."""
    body: object = {}
    for _ in range(100_000):
        body = {"a": body}
    body = {"x": 5, "a": body}
    assert [matches("/x = 5 AND /a/a/a IS NULL", body), matches("/b = 1", body)] == [True, False]


def test_regex_topic_uses_linear_matching() -> None:
    """A regex topic is RE2 too: a pathological pattern is instant, a backreference refused."""
    m = compile_topic("^(a+)+$")
    with pytest.raises(TopicError):
        compile_topic("(a)\\1")
    assert [m("a" * 100_000 + "b"), m("aaa"), compile_topic("x.")("x\ud800")] == [
        False,
        True,
        True,
    ]


@settings(max_examples=300, deadline=None)
@given(
    field=st.one_of(st.none(), scalars),
    items=st.lists(st.one_of(st.none(), scalars), min_size=1, max_size=4),
)
def test_in_equals_or_of_equalities(
    field: int | float | str | None, items: list[int | float | str | None]
) -> None:
    """/a IN (x, y) matches exactly when /a = x OR /a = y does, NOT IN likewise (AMPS)."""
    body = {"a": field}
    lits = [("NULL" if item is None else literal(item)) for item in items]
    ors = " OR ".join(f"/a = {lit}" for lit in lits)
    in_list = ", ".join(lits)
    assert (matches(f"/a IN ({in_list})", body), matches(f"/a NOT IN ({in_list})", body)) == (
        matches(ors, body),
        matches(f"NOT ({ors})", body),
    )


@settings(max_examples=examples(200), deadline=None)
@given(text=hostile_filters(), bodies=st.lists(filter_bodies(), min_size=1, max_size=3))
def test_generated_filters_compile_or_refuse_and_always_evaluate(
    text: str, bodies: list[bytes]
) -> None:
    """Any generated filter (grammar, pathological regexes, nesting past the limit, IN
    lists past the limit) compiles or raises FilterError; a compiled one returns a bool
    on every body, decodable or not."""
    try:
        f = compile_filter(text)
    except FilterError:
        return
    values: list[object] = []
    for raw in bodies:
        try:
            values.append(json.loads(raw))
        except (ValueError, RecursionError):
            values.append(None)
    assert all(type(f(value)) is bool for value in values)


def test_topic_that_is_not_utf8_text_is_invalid() -> None:
    """A topic with a lone surrogate (from a JSON escape) cannot be logged: invalid topic."""
    with pytest.raises(TopicError) as info:
        compile_topic("orders\ud800")
    assert info.value.reason == "invalid topic"
