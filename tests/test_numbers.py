"""Numbers are kept exactly: integers beyond 64 bits and decimals beyond double precision reach
eventData as the API wrote them, and a change hidden by rounding is still a change (DESIGN §7)."""

from __future__ import annotations

import orjson
import pytest

from syncd.errors import ParseError
from syncd.records import ExactNumber, dumps, parse_document, parse_json

from conftest import write_sync
from test_paginate import Engine

BIG = "123456789012345678901234567890"
PRECISE = "0.1000000000000000055511151231257827"


def raw(body: str) -> bytes:
    return body.encode()


@pytest.mark.parametrize("text", [BIG, "-" + BIG, "18446744073709551616", PRECISE, "1e400", "-1.5E+999",
                                  "3.14159265358979323846264338327950288"])
def test_numbers_a_double_cannot_hold_round_trip_exactly(text):
    value, exact = parse_document(raw(f'{{"n": {text}, "ok": 1.5, "i": 42}}'))
    assert exact and type(value["n"]) is ExactNumber and str.__str__(value["n"]) == text
    assert value["ok"] == 1.5 and value["i"] == 42
    assert dumps(value) == raw(f'{{"n":{text},"ok":1.5,"i":42}}')


@pytest.mark.parametrize("text", ["1.1", "12345.67", "9007199254740993", "18446744073709551615", "-9223372036854775808",
                                  "0.30000000000000004", "1e300", "1.0"])
def test_numbers_a_double_or_int64_holds_stay_plain(text):
    value = parse_json(raw(f"[{text}]"))[0]
    assert type(value) in (int, float) and value == orjson.loads(text)


def test_long_digit_strings_are_not_numbers():
    value, _ = parse_document(raw('{"card": "4111111111111111111", "n": 1}'))
    assert value == {"card": "4111111111111111111", "n": 1}


@pytest.mark.parametrize("body", [b'{"n": NaN}', b'{"n": Infinity}', b'[1,]', b'{"a": 12345678901234567890,}',
                                  b'\xff' + b'1' * 20, b"[" * 2000 + b"]" * 2000])
def test_the_exact_path_is_as_strict_as_the_fast_one(body):
    with pytest.raises(ParseError):
        parse_json(body)


async def test_big_numbers_reach_eventdata_exactly_and_hidden_changes_are_reported(upstream, conf_dir, state_path):
    def body(amount: str, ident: str = BIG) -> bytes:
        return raw(f'{{"items": [{{"id": {ident}, "amount": {amount}, "note": "x"}}, {{"id": 1, "amount": 2}}]}}')

    upstream.body = body(PRECISE)
    write_sync(conf_dir, "s", upstream.url, path="/api", list_identifier="$.items", record_identifier="$.id")
    async with Engine(conf_dir, state_path) as engine:
        first = await engine.poll("s")
        assert first.ok and first.invalid_ids == 0
        sent = {e["recordId"]: e for e in first.parsed}
        assert set(sent) == {BIG, "1"}  # an id beyond 64 bits is usable, as written
        raw_event = next(b for b in first.events if BIG.encode() in b)
        assert f'"amount":{PRECISE}'.encode() in raw_event and f'"id":{BIG}'.encode() in raw_event
        # 0.1000000000000000055511151231257827 -> ...28: the same double, a different number.
        upstream.body = body(PRECISE[:-1] + "8")
        second = await engine.poll("s")
        assert [(e["eventType"], e["recordId"]) for e in second.parsed] == [("record.modified", BIG)]
        assert (PRECISE[:-1] + "8").encode() in second.events[0]
        # A different id that is the same double (the last digit of a 30-digit integer) is a new record.
        upstream.body = body(PRECISE[:-1] + "8", BIG[:-1] + "1")
        third = await engine.poll("s")
        assert sorted((e["eventType"], e["recordId"]) for e in third.parsed) == [
            ("record.deleted", BIG), ("record.new", BIG[:-1] + "1")]
