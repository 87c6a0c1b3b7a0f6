"""A list response is read record by record (records.split_list + SnapshotBuilder.add_raw) instead
of as one document: the events, fingerprints and failures must be exactly those of a whole parse."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd import diff
from syncd.errors import ExtractError
from syncd.events import Envelopes, envelope, new_ids
from syncd.jsonpath import compile_path
from syncd.records import HINT_KEYS, may_need_exact, parse_document, split_list
from syncd.source.paginate import _HINT_KEYS, next_page_hint

from conftest import write_sync
from test_paginate import Engine, kinds

BIG = "123456789012345678901234567890"


def both_ways(body: bytes, list_path: str, id_path: str, ignore: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """The snapshot of `body` parsed whole, and read record by record (or the error of each)."""
    lp, ip, ig = compile_path(list_path), compile_path(id_path), tuple(compile_path(p) for p in ignore)
    whole = diff.SnapshotBuilder("s", lp, ip, ig)
    document, exact = parse_document(body)
    whole.add(document, exact=exact)
    split = split_list(body, lp.steps)
    assert split is not None, "the record-by-record path did not take this body"
    by_record = diff.SnapshotBuilder("s", lp, ip, ig)
    by_record.add_raw(split[0], exact_possible=may_need_exact(body))
    assert next_page_hint(None, split[1]) == next_page_hint(None, document)
    return _finish(whole), _finish(by_record)


def _finish(builder: diff.SnapshotBuilder) -> Any:
    try:
        return builder.finish()
    except ExtractError as exc:
        return str(exc)


def assert_same(whole: Any, by_record: Any) -> None:
    if isinstance(whole, str):  # no usable id at all: the same error
        assert by_record == whole
        return
    assert by_record.fingerprints == whole.fingerprints
    assert list(by_record.fingerprints) == list(whole.fingerprints)
    assert (by_record.invalid_ids, by_record.duplicate_ids, by_record.invalid_examples) == (
        whole.invalid_ids, whole.duplicate_ids, whole.invalid_examples)
    for rid in whole.records:
        assert by_record.value(rid) == whole.value(rid)
        assert by_record.json(rid) == whole.json(rid)


def test_records_read_one_by_one_match_the_whole_parse():
    body = ("""{"meta": {"count": 5},
      "data": {"x-items": [
        {"user": {"id": BIG}, "amount": 0.1000000000000000055511151231257827, "name": "Zo\u00eb \u2603 é"},
        {"user": {"id": 7}, "n": 1e400, "tags": ["a", {"b": null}]},
        {"user": {"id": 7}, "dup": true},
        {"user": {}, "no": "id"},
        {"user": {"id": "x\\"y"}, "f": 1.5e-7, "nested": [[1], [2, [3]]], "tags": [0, {"b": 1, "c": 2}]}
      ]}}""".replace("BIG", BIG)).encode()
    whole, by_record = both_ways(body, "$.data['x-items']", "$.user.id", ignore=("$.tags[1].b",))
    assert_same(whole, by_record)
    assert set(whole.fingerprints) == {BIG, "7", 'x"y'} and whole.invalid_ids == 1 and whole.duplicate_ids == 1
    assert by_record.exact and BIG.encode() in by_record.json(BIG)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(records=st.lists(st.fixed_dictionaries({"id": st.integers(0, 6) | st.text(max_size=3) | st.none()},
                                              optional={"v": json_values, "w": json_values}), max_size=8),
       top=st.dictionaries(st.sampled_from([*HINT_KEYS, "other"]), json_values | st.fixed_dictionaries(
           {"next": st.none() | st.text(max_size=3), "next_cursor": st.none() | st.integers(0, 3)}), max_size=3),
       indent=st.sampled_from([None, 1]))
def test_any_list_reads_the_same_record_by_record(records, top, indent):
    body = json.dumps({**top, "list": records}, indent=indent).encode()
    assert_same(*both_ways(body, "$.list", "$.id"))


@pytest.mark.parametrize("body", [
    b'{"items": [{"id": 1}], "other": NaN}',  # not JSON outside the list
    b'{"items": [{"id": 1}], "other": "\xff"}',  # invalid UTF-8 outside the list
    b'{"items": [{"id": 1}], "other": ' + b"[" * 1100 + b"]" * 1100 + b"}",  # nested too deeply
    b'{"items": [{"id": 1}]} trailing',
])
async def test_a_body_that_is_not_strict_json_anywhere_fails_the_run(upstream, conf_dir, state_path, body):
    upstream.body = body
    write_sync(conf_dir, "s", upstream.url, list_identifier="$.items", record_identifier="$.id")
    async with Engine(conf_dir, state_path) as h:
        result = await h.poll("s")
        assert not result.ok and result.error.startswith("parse:") and result.events == []


@pytest.mark.parametrize("body, error", [
    (b'{"items": {"id": 1}}', "leads to an object"),
    (b'{"items": null}', "leads to null"),
    (b'{"other": []}', "matched nothing"),
    (b'[{"id": 1}]', "matched nothing"),
])
async def test_a_list_path_that_leads_elsewhere_fails_as_before(upstream, conf_dir, state_path, body, error):
    upstream.body = body
    write_sync(conf_dir, "s", upstream.url, list_identifier="$.items", record_identifier="$.id")
    async with Engine(conf_dir, state_path) as h:
        result = await h.poll("s")
        assert not result.ok and error in result.error


async def test_pretty_printed_nested_ids_and_exact_numbers_end_to_end(upstream, conf_dir, state_path):
    def body(amount: str) -> bytes:
        return (b'{\n  "next_cursor": null,\n  "data": {"rows": [\n    {"k": {"id": ' + BIG.encode()
                + b'}, "amount": ' + amount.encode() + b', "s": "caf\\u00e9"},\n    {"k": {"id": "b"}, "amount": 1E2}\n  ]}\n}')

    upstream.body = body("1.00000000000000000001")
    write_sync(conf_dir, "s", upstream.url, list_identifier="$.data.rows", record_identifier="$.k.id")
    async with Engine(conf_dir, state_path) as h:
        first = await h.poll("s")
        assert first.ok and first.warning is None and sorted(kinds(first)) == [("record.new", BIG), ("record.new", "b")]
        big = next(e for e in first.events if BIG.encode() in e)
        # eventData is the record as orjson writes it (compact, "é" as UTF-8), its numbers as sent.
        assert b'"eventData":{"k":{"id":' + BIG.encode() + b'},"amount":1.00000000000000000001,"s":"caf\xc3\xa9"}' in big
        assert next(e for e in first.parsed if e["recordId"] == "b")["eventData"] == {"k": {"id": "b"}, "amount": 100.0}
        upstream.body = body("1.00000000000000000002")  # the same double: a change only the exact path sees
        second = await h.poll("s")
        assert kinds(second) == [("record.modified", BIG)]
        assert b'"amount":1.00000000000000000002' in second.events[0]


async def test_a_next_page_hint_beside_the_list_still_holds_deletes(upstream, conf_dir, state_path):
    upstream.body = {"items": [{"id": 1}, {"id": 2}], "has_more": False}
    write_sync(conf_dir, "s", upstream.url, list_identifier="$.items", record_identifier="$.id")
    async with Engine(conf_dir, state_path) as h:
        assert (await h.poll("s")).ok
        upstream.body = {"items": [{"id": 1}], "links": {"next": "/page/2"}}
        held = await h.poll("s")
        assert held.ok and kinds(held) == [] and "links.next" in held.warning


def test_every_key_that_hints_at_more_pages_is_read_beside_the_list():
    # split_list keeps only these top-level keys: a key next_page_hint reads must be among them.
    assert {key for key, _, _ in _HINT_KEYS} | {"links", "meta"} <= set(HINT_KEYS)


def test_envelopes_rendered_from_parts_are_the_envelope_bytes():
    for sync_type, record_id, fields in [("initial_sync", "1", None), ("delta_sync", 'é"\n\u2028', ["$.a", "$['x y']"]),
                                         (None, "7", [])]:
        parts = Envelopes(sync_type=sync_type, sync_id="s\u00e9", run_id="run_1", timestamp="2026-11-27T10:00:00.123Z")
        for data in ({"a": [1, 2.5, None], "b": "\u2603"}, None, []):
            expected = envelope("evt_1", "record.modified", data, sync_type=sync_type, sync_id="s\u00e9", run_id="run_1",
                                record_id=record_id, timestamp="2026-11-27T10:00:00.123Z", changed_fields=fields)
            fields_json = None if fields is None else orjson.dumps(fields)
            assert parts.render("evt_1", "record.modified", orjson.dumps(data), record_id, fields_json) == expected


def test_event_ids_of_a_run_are_unique_ascending_and_well_formed():
    ids = new_ids("evt", 10_000)
    assert len(set(ids)) == 10_000 and ids == sorted(ids) and new_ids("evt", 0) == []
    assert not set(ids) & set(new_ids("evt", 10_000))  # another run in the same millisecond
    assert all(len(i) == 36 and i.startswith("evt_") and int(i[4:], 16) >= 0 for i in ids)


def test_a_hint_beyond_a_double_reads_the_same_both_ways():
    # Found by the property test above: the record-by-record path parsed a hint with plain orjson
    # (-9.223372036854776e+18), the whole document exactly (-9223372036854775809).
    for value in (b"-9223372036854775809", b"123456789012345678901234567890", b"1.5", b"1e400"):
        body = b'{"items": [{"id": 1}], "next": ' + value + b"}"
        both_ways(body, "$.items", "$.id")
        document, _ = parse_document(body)
        assert next_page_hint(None, split_list(body, compile_path("$.items").steps)[1]) == next_page_hint(None, document)
        assert value.decode() in next_page_hint(None, document)
