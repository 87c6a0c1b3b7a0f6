"""Property tests for the pure diff: events always replay to the latest state."""

from __future__ import annotations

import random

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd import diff
from syncd.jsonpath import compile_path
from syncd.records import split_list

LIST = compile_path("$.items")
ID = compile_path("$.id")

values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("abc"), inner, max_size=3),
    max_leaves=6,
)
records = st.dictionaries(st.integers(0, 12), st.dictionaries(st.sampled_from(["x", "y", "z"]), values, max_size=3), max_size=10)


def document(state: dict[int, dict], rnd: random.Random) -> dict:
    items = [{"id": k, **v} for k, v in state.items()]
    rnd.shuffle(items)  # record order must never matter
    return {"items": items}


def canonical(record) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


@settings(max_examples=100, deadline=None)
@given(st.lists(records, min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_replaying_events_reconstructs_every_state(states, rnd):
    stored: dict[str, bytes] = {}
    replica: dict[str, bytes] = {}  # what a receiver applying the events would hold
    for n, state in enumerate(states):
        snap = diff.snapshot(document(state, rnd), "s", LIST, ID)
        events = diff.changes(stored, snap, initial=n == 0, allow_deletes=True)
        for e in events:
            if e.type == diff.DELETED:
                assert e.record is None
                del replica[e.record_id]
            else:
                assert (e.type == diff.NEW) == (e.record_id not in replica)
                replica[e.record_id] = canonical(e.record)
        upserts, deletes = diff.apply(stored, snap, events)
        for rid in deletes:
            del stored[rid]
        stored.update(upserts)
        expected = {str(k): canonical({"id": k, **v}) for k, v in state.items()}
        assert replica == expected
        assert stored == snap.fingerprints
        # Only real changes produce events.
        assert len(events) == len({e.record_id for e in events})


@settings(max_examples=100, deadline=None)
@given(records, st.randoms(use_true_random=False))
def test_order_of_records_and_keys_never_causes_events(state, rnd):
    first = diff.snapshot(document(state, rnd), "s", LIST, ID)
    shuffled = {k: dict(reversed(list(v.items()))) for k, v in state.items()}
    second = diff.snapshot(document(shuffled, rnd), "s", LIST, ID)
    assert diff.changes(first.fingerprints, second, initial=False, allow_deletes=True) == []


def test_array_order_inside_a_record_matters():
    assert diff.fingerprint({"a": [1, 2]}) != diff.fingerprint({"a": [2, 1]})
    assert diff.fingerprint({"a": 1, "b": {"c": 1, "d": 2}}) == diff.fingerprint({"b": {"d": 2, "c": 1}, "a": 1})


def test_ignore_fields_leave_the_record_untouched():
    record = {"id": 1, "meta": {"seen": 5, "keep": 1}, "tags": ["a", "b"]}
    ignore = (compile_path("$.meta.seen"), compile_path("$.tags[*]"))
    assert diff.fingerprint(record, ignore) == diff.fingerprint({"id": 1, "meta": {"keep": 1}, "tags": []})
    assert record == {"id": 1, "meta": {"seen": 5, "keep": 1}, "tags": ["a", "b"]}


def test_deletes_held_when_ids_are_unreadable():
    old = diff.snapshot({"items": [{"id": 1}, {"id": 2}]}, "s", LIST, ID).fingerprints
    snap = diff.snapshot({"items": [{"id": 2, "v": 1}, {"no": "id"}]}, "s", LIST, ID)
    assert snap.invalid_ids == 1
    held = diff.changes(old, snap, initial=False, allow_deletes=snap.invalid_ids == 0)
    assert [(c.type, c.record_id) for c in held] == [(diff.MODIFIED, "2")]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, allow_infinity=False) | st.text("ab", max_size=2),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "id", "0"]), inner, max_size=3),
    max_leaves=8,
)
step_lists = st.lists(st.sampled_from(["a", "b", "id", "0"]) | st.integers(-3, 3), min_size=0, max_size=4)


def _spell(steps) -> str:
    return "$" + "".join(f"[{s}]" if isinstance(s, int) else f"['{s}']" for s in steps)


@settings(max_examples=200, deadline=None)
@given(json_values, step_lists)
def test_id_lookup_matches_the_jsonpath_fast_path(value, steps):
    from syncd.diff import _getter
    from syncd.jsonpath import MISSING

    path = compile_path(_spell(steps))
    assert path.steps == tuple(steps)
    try:
        got = _getter(path)(value)
    except (KeyError, TypeError, IndexError):
        got = MISSING
    expected = path.get(value)
    assert got is expected or (got == expected and type(got) is type(expected))


def test_ids_too_large_to_be_exact_are_invalid_not_merged():
    import orjson as _orjson

    doc = _orjson.loads(b'{"items": [{"id": 18446744073709551616}, {"id": 18446744073709551617}, {"id": 9007199254740993}]}')
    snap = diff.snapshot(doc, "s", LIST, ID)
    # The first two parse to the same float; the third is a 64-bit int and stays exact.
    assert snap.invalid_ids == 2 and list(snap.fingerprints) == ["9007199254740993"]
    assert "too large" in snap.invalid_examples[0]


def test_an_empty_id_is_no_id_on_both_paths():
    # "" names no record (and is the outbox's key of lifecycle events, which it would be queued behind).
    body = b'{"items": [{"id": ""}, {"id": "a"}, {"id": 0}]}'
    whole = diff.snapshot(orjson.loads(body), "s", LIST, ID)
    by_record = diff.SnapshotBuilder("s", LIST, ID)
    by_record.add_raw(split_list(body, LIST.steps)[0], exact_possible=False)
    for snap in (whole, by_record.finish()):
        assert snap.invalid_ids == 1 and list(snap.fingerprints) == ["a", "0"]
        assert "the id is an empty string" in snap.invalid_examples[0]
