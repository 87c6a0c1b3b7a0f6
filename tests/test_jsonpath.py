"""syncd.jsonpath against jsonpath-rw, the reference implementation.

The fast path of plain paths must return exactly what unguarded jsonpath-rw returns (same values,
same types, same objects), except where jsonpath-rw crashes: there it must match nothing.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import jsonpath_rw
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.jsonpath import MISSING, JsonPath, JsonPathError, compile_path, without

# jsonpath-rw's crashes on JSON values: Index on null/numbers (TypeError), on non-empty objects
# (KeyError), negative indices past the start (IndexError); Slice on null/floats (TypeError).
RW_CRASHES = (TypeError, KeyError, IndexError)


# jsonpath-rw rebuilds its LALR tables on every parse (~2 ms): parse each text once.
rw_parse = functools.lru_cache(maxsize=None)(jsonpath_rw.parse)
compiled = functools.lru_cache(maxsize=None)(compile_path)


def rw_find(text: str, value: Any) -> list[Any]:
    """Unguarded jsonpath-rw."""
    return [m.value for m in rw_parse(text).find(value)]


def shape(value: Any) -> Any:
    """`value` with every scalar tagged by its type, so 1, 1.0 and True compare different."""
    if isinstance(value, dict):
        return ("dict", {k: shape(v) for k, v in value.items()})
    if isinstance(value, list):
        return ("list", [shape(v) for v in value])
    return (type(value).__name__, value)


def assert_same(got: list[Any], expected: list[Any]) -> None:
    assert got == expected
    assert shape(got) == shape(expected)


def assert_plain_matches_rw(text: str, doc: Any) -> None:
    path = compiled(text)
    assert path.is_plain, text
    try:
        expected = rw_find(text, doc)
        crashed = False
    except RW_CRASHES:
        expected, crashed = [], True
    got = path.find(doc)
    assert_same(got, expected)
    if not crashed:
        # The very same objects, not copies (a str indexed by a str is a new str each time).
        assert all(g is e for g, e in zip(got, expected, strict=True) if not isinstance(e, str))
    found = path.get(doc)
    if expected:
        assert len(expected) == 1
        assert_same([found], expected)
        assert found is got[0] or isinstance(found, str)
        assert path.matches_with_paths(doc) == [(path.steps, found)]
    else:
        assert found is MISSING
        assert path.matches_with_paths(doc) == []


# ---------------------------------------------------------------------------------------------
# Plain paths: a hand-written table, every path on every document.

DOCS: list[Any] = [
    {},
    {"a": None},
    {"a": {"b": 1}},
    {"a": {"b": None}},
    {"a": {"b": 1.0, "c": True}},
    {"a": {"b": {"c": False}}},
    {"a": [{"b": 1}, {"b": 2.0}, {"c": True}]},
    {"a": [None, [None], [[1]]]},
    {"a": [[], [1, [2, 3]], "xyz"]},
    {"a": []},
    {"a": [0]},
    {"a": "xyz"},
    {"a": ""},
    {"a": 0},
    {"a": 1},
    {"a": -1.5},
    {"a": True},
    {"a": False},
    {"a": {"0": "zero", "-1": "minus one"}},
    {"a": {"b": {"c": {"d": [0, {"e": "deep"}]}}}},
    {"x-y": 1, "with space": 2, "dot.ted": 3, "where": 4, "@": 5, "_x": 6, "a-": 7, "": 8},
    {"a": {"x-y": [1, [2, 3]]}, "b": {"with space": {"dot.ted": None}}},
    [],
    [1, 2, 3],
    [None],
    [[1, 2], [3, [4, 5]], {"a": 1}],
    [{"a": {"b": "c"}}],
    "str",
    "",
    0,
    5,
    1.0,
    True,
    False,
    None,
]

PLAIN_PATHS = [
    "$",
    "$.a",
    "$.b",
    "$.a.b",
    "$.a.b.c",
    "$.a.c",
    "$.missing",
    "$.missing.deeper",
    "$.a[0]",
    "$.a[1]",
    "$.a[2]",
    "$.a[3]",
    "$.a[99]",
    "$.a[-1]",
    "$.a[-2]",
    "$.a[-3]",
    "$.a[-4]",
    "$.a[-99]",
    "$.a[0].b",
    "$.a[1].b",
    "$.a[2].c",
    "$.a[0][0]",
    "$.a[1][0]",
    "$.a[1][1][0]",
    "$.a[1][1][-1]",
    "$.a[2][0][0]",
    "$.a[2][-1]",
    "$.a.b[0]",
    "$[0]",
    "$[1]",
    "$[-1]",
    "$[5]",
    "$[0][1]",
    "$[1][1][0]",
    "$[2].a",
    "$[0].a.b",
    "$['x-y']",
    '$["with space"]',
    "$['dot.ted']",
    "$['where']",
    "$['']",
    "$.'a'",
    '$."a"."b"',
    "$.x-y",
    "$.@",
    "$._x",
    "$.a-",
    "$['a']['b']",
    "$['a'][0]",
    "$.a['x-y']",
    "$.a['x-y'][1][0]",
    "$.b['with space']['dot.ted']",
    "$.a['0']",
    "$.a['-1']",
    "$.a.b.c.d[1].e",
    "$.a.b.c.d[-1]['e']",
    "$.a.[0]",
    "$.a.(b)",
    "$.(a.b)",
    "($.a).b",
    "($.a)[0]",
    "a",
    "a.b",
    "a[0]",
    "a[0].b",
    "[0]",
    "[-1]",
    "[0].a",
    "['x-y']",
    " $ . a . b ",
]


@pytest.mark.parametrize("text", PLAIN_PATHS)
def test_plain_paths_match_jsonpath_rw(text: str) -> None:
    for doc in DOCS:
        assert_plain_matches_rw(text, doc)


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        ("$", ()),
        ("$.a.b", ("a", "b")),
        ("$.a[0].b", ("a", 0, "b")),
        ("$.a[-1]", ("a", -1)),
        ("$['x-y']", ("x-y",)),
        ("$['0']", ("0",)),
        ("$[0]", (0,)),
        ("a.b", ("a", "b")),
        ("[0].a", (0, "a")),
        ("$.(a.b).c", ("a", "b", "c")),
    ],
)
def test_plain_steps(text: str, steps: tuple[str | int, ...]) -> None:
    path = compile_path(text)
    assert path.is_plain
    assert path.steps == steps
    assert [type(s) for s in path.steps] == [type(s) for s in steps]
    assert path.text == text
    assert repr(path) == f"JsonPath({text!r})"


def test_table_covers_every_crash_kind() -> None:
    """The table really exercises jsonpath-rw's crashes (else the guard is untested)."""
    seen: set[type] = set()
    for text in PLAIN_PATHS:
        for doc in DOCS:
            try:
                rw_find(text, doc)
            except RW_CRASHES as exc:
                seen.add(type(exc))
    assert seen == {TypeError, KeyError, IndexError}


def test_plain_results_on_parsed_json() -> None:
    doc = orjson.loads(b'{"a": [{"id": 1, "v": 1.0, "t": true, "n": null, "s": "x"}], "e": {}}')
    assert_same(compile_path("$.a[0].id").find(doc), [1])
    assert_same(compile_path("$.a[0].v").find(doc), [1.0])
    assert_same(compile_path("$.a[0].t").find(doc), [True])
    assert_same(compile_path("$.a[0].n").find(doc), [None])
    assert_same(compile_path("$.a[0].s[0]").find(doc), ["x"])
    assert compile_path("$.a[0].n.x").find(doc) == []
    assert compile_path("$.e[0]").find(doc) == []
    for text in ("$.a[0].id", "$.a[0].n", "$.a[0].n.x", "$.e[0]", "$.a[-2]", "$.a[0].id[0]"):
        assert_plain_matches_rw(text, doc)


# ---------------------------------------------------------------------------------------------
# Plain paths: random documents and random paths.

KEYS = ["a", "b", "x-y", "with space", "dot.ted", "0", "where", "id"]
_ID = re.compile(r"[a-zA-Z_@][a-zA-Z0-9_@\-]*\Z")

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.sampled_from([0.0, 1.0, -1.0, 2.5])
    | st.floats(allow_nan=False)
    | st.text(max_size=3)
)
json_docs = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=2), children, max_size=4),
    max_leaves=15,
)


@st.composite
def steps_into(draw: Any, doc: Any) -> list[str | int]:
    """Steps that mostly follow `doc` (existing keys, in-range indices) and sometimes leave it."""
    steps: list[str | int] = []
    value = doc
    for _ in range(draw(st.integers(0, 5))):
        follow = draw(st.integers(0, 3)) > 0
        if follow and isinstance(value, dict) and value:
            # Not a "*" key: jsonpath-rw reads `['*']` as the wildcard, so it has no plain spelling.
            step: str | int = draw(st.sampled_from(sorted(value.keys() - {"*"} or {"missing"})))
        elif follow and isinstance(value, (list, str)) and value:
            step = draw(st.integers(-len(value), len(value) - 1))
        else:
            step = draw(st.sampled_from(KEYS + ["missing"]) | st.integers(-5, 5))
        steps.append(step)
        if isinstance(value, dict) and type(step) is str:
            value = value.get(step)
        elif isinstance(value, (list, str)) and type(step) is int and -len(value) <= step < len(value):
            value = value[step]
        else:
            value = None
    return steps


def _quote(key: str, quote: str) -> str:
    return quote + key.replace("\\", "\\\\").replace(quote, "\\" + quote) + quote


@st.composite
def render(draw: Any, steps: list[str | int]) -> str:
    """One of the spellings jsonpath-rw accepts for `steps`."""
    rooted = draw(st.booleans()) or not steps
    out = "$" if rooted else ""
    for i, step in enumerate(steps):
        first = not rooted and i == 0
        if type(step) is int:
            out += draw(st.sampled_from(["[%d]", "[%d]" if first else ".[%d]"])) % step
            continue
        forms = [f"[{_quote(step, chr(39))}]", f"[{_quote(step, chr(34))}]"]
        dotted = [_quote(step, chr(39)), _quote(step, chr(34))]
        if _ID.match(step) and step != "where":
            dotted.append(step)
        forms += [d if first else "." + d for d in dotted]
        out += draw(st.sampled_from(forms))
    return out


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), json_docs)
def test_plain_paths_match_jsonpath_rw_random(data: st.DataObject, doc: Any) -> None:
    steps = data.draw(steps_into(doc))
    text = data.draw(render(steps))
    path = compile_path(text)
    assert path.steps == tuple(steps), text
    assert_plain_matches_rw(text, doc)


@settings(max_examples=100, deadline=None, database=None)
@given(json_docs)
def test_plain_paths_on_orjson_round_trip(doc: Any) -> None:
    """Values as the daemon sees them: straight from orjson.loads."""
    doc = orjson.loads(orjson.dumps(doc))
    for text in ("$", "$.a", "$.a.b", "$.a[0]", "$.a[-1]", "$[0]", "$[-1].a", "$['x-y'][0]"):
        assert_plain_matches_rw(text, doc)


# ---------------------------------------------------------------------------------------------
# Non-plain paths go through jsonpath-rw, guarded.

NON_PLAIN_PATHS = [
    "$.a[*].b",
    "$.a[*]",
    "$[*]",
    "$..id",
    "$..b",
    "$..[0]",
    "$.a[1:3]",
    "$.a[:2]",
    "$.a[1:]",
    "$.a,b",
    "$['a','b']",
    "$.*",
    "$.a.*",
    "$['*']",
    "$.a[*].`parent`",
    "$.a.`this`",
    "$.a | $.b",
    "$.a where b",
    "$.a.($.b)",
    "$.a.$",
]

NON_PLAIN_DOCS: list[Any] = [
    {"a": [{"b": 1, "id": 1}, {"b": 2.0}, {"c": True, "id": "x"}], "b": [1, 2], "id": 0},
    {"a": [[1, 2], [3]], "b": {"id": {"id": 1}}},
    {"a": {"b": {"id": 5}}, "b": 3},
    {"a": [1, 2, 3, 4], "b": "s"},
    {"a": "xyz"},
    {"a": {"x": 1}},
    {"a": 7, "b": True},
    {"a": True},
    {"a": []},
    {"a": {}},
    {},
    [],
    [{"id": 1}, {"id": 2}],
    "s",
    3,
]


def test_non_plain_paths_are_not_plain() -> None:
    for text in NON_PLAIN_PATHS:
        assert not compile_path(text).is_plain, text
        assert compile_path(text).steps is None


@pytest.mark.parametrize("text", NON_PLAIN_PATHS)
def test_non_plain_paths_match_jsonpath_rw(text: str) -> None:
    path = compiled(text)
    compared = 0
    for doc in NON_PLAIN_DOCS:
        got = path.find(doc)  # never raises
        try:
            expected = rw_find(text, doc)
        except RW_CRASHES:
            continue
        assert_same(got, expected)
        compared += 1
    assert compared


@pytest.mark.parametrize(
    ("text", "doc", "expected"),
    [
        ("$.a[*].b", {"a": None}, []),
        ("$.a[*]", {"a": None}, []),
        ("$.a[1:3]", {"a": None}, []),
        ("$.a[0]", {"a": None}, []),
        ("$.a[0]", {"a": {}}, []),
        ("$.a[0]", {"a": {"b": 1}}, []),
        ("$.a[0]", {"a": 3}, []),
        ("$.a[-1]", {"a": []}, []),
        ("$.a[*].b[0]", {"a": [{"b": None}, {"b": [7]}, {"b": {"x": 1}}]}, [7]),
        ("$..[0]", {"a": [1], "b": {"c": 2}, "d": None}, [1]),
        ("$..b[0]", {"a": {"b": None}, "b": [4]}, [4]),
        ("$..id", {"a": [{"id": 1}, None, {"b": {"id": None}}]}, [1, None]),
        # floats are wrapped in a one-item list like ints (jsonpath-rw crashes on them).
        ("$.a[*]", {"a": 1.5}, [1.5]),
        ("$.a[:1]", {"a": -0.0}, [-0.0]),
        ("$.a[1:]", {"a": 1.5}, []),
        # jsonpath-rw's `parent` of the top yields None (crashing in .value).
        ("$.`parent`", {"a": 1}, []),
        ("$.a.`parent`.a", {"a": 1}, [1]),
    ],
)
def test_non_plain_guards(text: str, doc: Any, expected: list[Any]) -> None:
    path = compile_path(text)
    assert_same(path.find(doc), expected)
    path.matches_with_paths(doc)  # never raises either


def test_non_plain_guards_really_guard() -> None:
    """The cases above do crash unguarded jsonpath-rw."""
    for text, doc in [
        ("$.a[*].b", {"a": None}),
        ("$.a[0]", {"a": None}),
        ("$.a[0]", {"a": {"b": 1}}),
        ("$.a[-1]", {"a": []}),
        ("$.a[*]", {"a": 1.5}),
    ]:
        with pytest.raises(RW_CRASHES):
            rw_find(text, doc)


def test_root_in_the_middle_is_not_a_plain_step() -> None:
    """`$` after the start jumps back to the top: `$.a.($.b)` is `$.b` once `$.a` exists."""
    doc = {"a": {"b": 1}, "b": 2}
    for text in ("$.a.($.b)", "a.($.b)", "$.a.$"):
        path = compile_path(text)
        assert not path.is_plain
        assert_same(path.find(doc), rw_find(text, doc))
    assert compile_path("$.a.($.b)").find(doc) == [2]
    assert compile_path("$.x.($.b)").find(doc) == []


non_plain_parts = st.sampled_from(
    ["[*]", "[0]", "[-1]", "[1:3]", "[:2]", ".*", "..id", "..b", ".a", ".b", ".a,b", "['x-y']", "..[0]"]
)


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(non_plain_parts, min_size=1, max_size=4), json_docs)
def test_non_plain_paths_random(parts: list[str], doc: Any) -> None:
    text = "$" + "".join(parts)
    path = compiled(text)
    got = path.find(doc)  # never raises
    try:
        expected = rw_find(text, doc)
    except RW_CRASHES:
        expected = None
    except RecursionError:  # pragma: no cover - not with these sizes
        expected = None
    if expected is not None:
        assert_same(got, expected)
    if path.is_plain:
        return
    # Every reported location really holds the value (or is a string index).
    for steps, value in path.matches_with_paths(doc):
        here = doc
        for step in steps:
            here = here[step]
        assert here is value or isinstance(here, str) or here == value


# ---------------------------------------------------------------------------------------------
# compile_path errors


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("$.[", "unexpected end of expression"),
        ("$.a[", "unexpected end of expression"),
        ("$.a.", "unexpected end of expression"),
        ("$.a[0", "unexpected end of expression"),
        ("$$", "unexpected '$'"),
        ("$.a]", "unexpected ']'"),
        ("$.where", "unexpected 'where'"),
        ("$.a[x:]", "unexpected"),
        ("", "empty"),
        ("   ", "empty"),
        ("$.a?", "Unexpected character"),
        ("$.'a", "Unexpected EOF"),
        ("$.`nope`", "Unknown named operator"),
        ("$.a & $.b", "not implemented"),
    ],
)
def test_compile_errors(text: str, reason: str) -> None:
    with pytest.raises(JsonPathError) as info:
        compile_path(text)
    message = str(info.value)
    assert reason in message
    assert "NoneType" not in message
    assert "lineno" not in message
    if text.strip():
        assert repr(text) in message
    assert isinstance(info.value, ValueError)


def test_compile_rejects_non_strings() -> None:
    with pytest.raises(JsonPathError):
        compile_path(None)  # type: ignore[arg-type]


def test_compile_error_is_not_chained_noise() -> None:
    with pytest.raises(JsonPathError) as info:
        compile_path("$.a[")
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


# ---------------------------------------------------------------------------------------------
# JsonPath.get


def test_get_plain() -> None:
    doc = {"a": {"b": 0, "c": None, "d": False, "e": "", "f": [], "g": {}}, "l": [1, 2]}
    assert compile_path("$.a.b").get(doc) == 0
    assert compile_path("$.a.c").get(doc) is None
    assert compile_path("$.a.d").get(doc) is False
    assert compile_path("$.a.e").get(doc) == ""
    assert compile_path("$.a.f").get(doc) == []
    assert compile_path("$.a.g").get(doc) == {}
    assert compile_path("$.l[-1]").get(doc) == 2
    assert compile_path("$").get(doc) is doc
    assert compile_path("$.a.x").get(doc) is MISSING
    assert compile_path("$.a.c.x").get(doc) is MISSING
    assert compile_path("$.l[2]").get(doc) is MISSING
    assert compile_path("$.l.x").get(doc) is MISSING
    assert repr(MISSING) == "MISSING"


def test_get_non_plain() -> None:
    doc = {"a": [{"b": 1}, {"c": 2}], "n": None}
    assert compile_path("$.a[*].b").get(doc) == 1
    assert compile_path("$.a[*].x").get(doc) is MISSING
    assert compile_path("$.n[*].b").get(doc) is MISSING
    assert compile_path("$..c").get(doc) == 2
    with pytest.raises(ValueError, match="matched 2 values"):
        compile_path("$.a[*]").get(doc)
    with pytest.raises(ValueError):
        compile_path("$.*").get(doc)


def test_matches_with_paths() -> None:
    doc = {"a": [{"b": 1}, {"c": 2}, {"b": 3}], "s": "xy", "o": {"k": 1}}
    assert compile_path("$.a[*].b").matches_with_paths(doc) == [(("a", 0, "b"), 1), (("a", 2, "b"), 3)]
    assert compile_path("$.a[-1].b").matches_with_paths(doc) == [(("a", -1, "b"), 3)]
    assert compile_path("$..b").matches_with_paths(doc) == [(("a", 0, "b"), 1), (("a", 2, "b"), 3)]
    # `[*]` on an object matches the object itself, which lives at "o" (not at "o"[0]).
    assert compile_path("$.o[*]").matches_with_paths(doc) == [(("o",), {"k": 1})]
    assert compile_path("$.s[*]").matches_with_paths(doc) == [(("s",), "xy")]
    # ... and the one-item list jsonpath-rw wraps it in is nowhere in the document.
    assert compile_path("$.o[*].`parent`").find(doc) == [[{"k": 1}]]
    assert compile_path("$.o[*].`parent`").matches_with_paths(doc) == []
    assert compile_path("$.missing[*]").matches_with_paths(doc) == []


# ---------------------------------------------------------------------------------------------
# without


def _without(doc: Any, *texts: str) -> Any:
    before = copy.deepcopy(doc)
    result = without(doc, [compile_path(t) for t in texts])
    assert doc == before and shape(doc) == shape(before), "input modified"
    return result


def test_without_plain() -> None:
    doc = {"a": {"b": 1, "c": 2}, "x": {"y": [1]}, "l": [1, 2, 3]}
    result = _without(doc, "$.a.b")
    assert result == {"a": {"c": 2}, "x": {"y": [1]}, "l": [1, 2, 3]}
    assert result is not doc and result["a"] is not doc["a"]
    # Containers off the way are shared, not copied.
    assert result["x"] is doc["x"] and result["l"] is doc["l"]
    assert _without(doc, "$.a") == {"x": {"y": [1]}, "l": [1, 2, 3]}
    assert _without(doc, "$['a']['c']", "$.x.y[0]") == {"a": {"b": 1}, "x": {"y": []}, "l": [1, 2, 3]}


def test_without_list_items_highest_index_first() -> None:
    doc = {"l": [0, 1, 2, 3, 4]}
    assert _without(doc, "$.l[0]", "$.l[2]", "$.l[4]") == {"l": [1, 3]}
    assert _without(doc, "$.l[4]", "$.l[0]", "$.l[2]") == {"l": [1, 3]}
    assert _without(doc, "$.l[1:3]") == {"l": [0, 3, 4]}
    assert _without(doc, "$.l[1:3]", "$.l[0]") == {"l": [3, 4]}
    assert _without(doc, "$.l[*]") == {"l": []}
    assert _without([0, 1, 2], "$[0]", "$[1]") == [2]


def test_without_negative_indices() -> None:
    doc = {"l": [0, 1, 2]}
    assert _without(doc, "$.l[-1]") == {"l": [0, 1]}
    assert _without(doc, "$.l[-3]") == {"l": [1, 2]}
    # Same item twice (negative and positive): removed once.
    assert _without(doc, "$.l[-1]", "$.l[2]") == {"l": [0, 1]}
    assert _without(doc, "$.l[-1]", "$.l[0]") == {"l": [1]}
    assert _without(doc, "$.l[-4]") is doc


def test_without_non_plain() -> None:
    doc = {
        "items": [{"id": 1, "secret": "s", "n": {"id": 9}}, {"id": 2}, {"secret": None}],
        "meta": {"id": 3, "etag": "e"},
    }
    assert _without(doc, "$.items[*].secret") == {
        "items": [{"id": 1, "n": {"id": 9}}, {"id": 2}, {}],
        "meta": {"id": 3, "etag": "e"},
    }
    assert _without(doc, "$..id") == {
        "items": [{"secret": "s", "n": {}}, {}, {"secret": None}],
        "meta": {"etag": "e"},
    }
    # Overlapping matches: an item and something inside it.
    assert _without(doc, "$.items[0].n.id", "$.items[0]", "$.meta.*") == {
        "items": [{"id": 2}, {"secret": None}],
        "meta": {},
    }
    assert _without(doc, "$.meta.id,etag") == {"items": doc["items"], "meta": {}}


def test_without_slice_wrapped_value_removes_the_value() -> None:
    """jsonpath-rw's `$.o[*]` on an object matches the object; without removes it where it is."""
    doc = {"o": {"k": 1}, "n": 5, "keep": 1}
    assert _without(doc, "$.o[*]", "$.n[*]") == {"keep": 1}


def test_without_nothing_matched_returns_same_object() -> None:
    doc = {"a": None, "s": "xyz", "l": [1], "o": {}}
    for text in (
        "$.missing",
        "$.a.b",
        "$.a[0]",
        "$.a[*].b",
        "$.o[0]",
        "$.l[5]",
        "$.l[-2]",
        "$.s[0]",  # a character of a string is not removable
        "$",  # neither is the whole document
        "$..nothing",
    ):
        assert _without(doc, text) is doc, text
    assert without(doc, []) is doc
    for scalar in (None, 1, "x", 1.5, True):
        assert without(scalar, [compile_path("$.a"), compile_path("$[0]"), compile_path("$[*]")]) is scalar


def test_without_leaves_input_untouched_deeply() -> None:
    doc = orjson.loads(b'{"a": [{"b": [1, {"c": 2}]}, {"b": []}], "d": {"e": {"f": 1}}}')
    snapshot = orjson.dumps(doc)
    inner = doc["a"][0]["b"]
    result = _without(doc, "$.a[*].b[1].c", "$.d.e.f", "$.a[1]")
    assert result == {"a": [{"b": [1, {}]}], "d": {"e": {}}}
    assert orjson.dumps(doc) == snapshot
    assert doc["a"][0]["b"] is inner and inner == [1, {"c": 2}]


@settings(max_examples=150, deadline=None, database=None)
@given(json_docs, st.lists(st.sampled_from(PLAIN_PATHS[:30] + NON_PLAIN_PATHS[:12]), max_size=3))
def test_without_random(doc: Any, texts: list[str]) -> None:
    before = orjson.dumps(doc)
    paths: list[JsonPath] = [compiled(t) for t in texts]
    result = without(doc, paths)
    assert orjson.dumps(doc) == before
    if not any(
        steps and not isinstance(_parent(doc, steps), str) for p in paths for steps, _ in p.matches_with_paths(doc)
    ):
        assert result is doc


def _parent(doc: Any, steps: tuple[str | int, ...]) -> Any:
    for step in steps[:-1]:
        doc = doc[step]
    return doc


def test_paths_compiled_from_several_threads_at_once_are_each_their_own():
    # One parser serves every compile (its tables are built once); parses take turns.
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"$.page{i}['key {i}'][{i % 7}].id" for i in range(400)] + [f"$.a{i}[*].b" for i in range(100)]
    with ThreadPoolExecutor(8) as pool:
        compiled = list(pool.map(compile_path, texts))
    for i, path in enumerate(compiled[:400]):
        assert path.steps == (f"page{i}", f"key {i}", i % 7, "id")
    assert all(path.steps is None and path.text == text for path, text in zip(compiled[400:], texts[400:], strict=True))
    with pytest.raises(JsonPathError, match="unexpected end"):
        compile_path("$.a[")
