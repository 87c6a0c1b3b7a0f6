"""Fingerprints and change detection: pure functions, no I/O.

A record's fingerprint is xxh3_128 over its canonical JSON (keys sorted at every level, no
whitespace) with `ignore_fields` left out. Key order and record order never cause events; array
order inside a record does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import orjson
from xxhash import xxh3_128_digest

from syncd.errors import ExtractError
from syncd.jsonpath import MISSING, JsonPath, without

NEW = "record.new"
MODIFIED = "record.modified"
DELETED = "record.deleted"
EVENT_TYPES = (NEW, MODIFIED, DELETED)

_SORT = orjson.OPT_SORT_KEYS


def fingerprint(record: Any, ignore: tuple[JsonPath, ...] = ()) -> bytes:
    """16-byte fingerprint of `record` minus the `ignore` paths."""
    if ignore:
        record = without(record, list(ignore))
    return xxh3_128_digest(orjson.dumps(record, option=_SORT))


@dataclass
class Snapshot:
    """The records of one successful fetch, by id."""

    fingerprints: dict[str, bytes]
    records: dict[str, Any]
    #: Records without a usable id (missing, null, not a string or number, or several matches).
    invalid_ids: int = 0
    #: Records whose id was already seen earlier in the same response (only the first counts).
    duplicate_ids: int = 0
    invalid_examples: list[str] = field(default_factory=list)


def _getter(path: JsonPath | None) -> Callable[[Any], Any]:
    """The record id lookup. Plain paths become chained subscripts: `r["employee"]["id"]` raises
    KeyError/TypeError/IndexError exactly where jsonpath-rw (guarded) finds nothing — a str key on a
    list or string, an int index on an object, an index out of range — and indexes strings like it."""
    if path is None or path.steps is None:
        def find(record: Any) -> Any:
            try:
                return path.get(record) if path is not None else MISSING
            except ValueError:
                return MISSING  # several matches: not one id
        return find
    steps = path.steps
    if len(steps) == 1:
        (a,) = steps
        return lambda r: r[a]
    if len(steps) == 2:
        a, b = steps
        return lambda r: r[a][b]
    if len(steps) == 3:
        a, b, c = steps
        return lambda r: r[a][b][c]

    def walk(record: Any) -> Any:
        for step in steps:
            record = record[step]
        return record
    return walk


def get_id_safe(get_id: Callable[[Any], Any], record: Any) -> Any:
    try:
        return get_id(record)
    except (KeyError, TypeError, IndexError):
        return MISSING


def _record_id(value: Any) -> str | None:
    kind = type(value)
    if kind is str:
        return value
    if kind is int:
        return str(value)
    if kind is float:
        if abs(value) >= 2**53:
            # A number beyond what a double holds exactly (e.g. an integer over 64 bits, which the
            # parser turns into a float): two different ids could collide, so it is no id at all.
            return None
        # 3.0 and 3 are the same number in JSON; send integral floats as "3", never as "3.0".
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def snapshot(document: Any, sync_id: str, list_path: JsonPath | None, id_path: JsonPath | None, ignore: tuple[JsonPath, ...] = ()) -> Snapshot:
    """Extract and fingerprint every record of a parsed response.

    List mode: `list_path` must lead to an array (ExtractError otherwise; an empty array is valid).
    Whole mode (no list_path): the document is one record whose id is the sync id.
    """
    if list_path is None:
        return Snapshot({sync_id: fingerprint(document, ignore)}, {sync_id: document})
    found = list_path.find(document)
    if not found:
        raise ExtractError(f"list_identifier {list_path.text} matched nothing in the response")
    if len(found) > 1:
        raise ExtractError(f"list_identifier {list_path.text} matched {len(found)} values; it must lead to one array")
    items = found[0]
    if type(items) is not list:
        raise ExtractError(f"list_identifier {list_path.text} leads to {_json_type(items)}, not an array")

    ids: list[Any] = []
    digests: list[bytes] = []
    kept: list[Any] = []
    add_id, add_digest, keep = ids.append, digests.append, kept.append
    invalid = duplicates = 0
    examples: list[str] = []
    all_str = True
    dumps = orjson.dumps
    get_id = _getter(id_path)
    ignore_list = list(ignore)
    # Once per record: keep it flat. Ids are collected raw and turned into strings in one C-level
    # pass afterwards (str() per int inside this loop was a third of its time).
    for index, record in enumerate(items):
        try:
            value = get_id(record)
        except (KeyError, TypeError, IndexError):
            value = MISSING
        kind = type(value)
        if kind is int:
            all_str = False
        elif kind is not str:
            value = _record_id(value)
            if value is None:
                invalid += 1
                if len(examples) < 3:
                    raw = get_id_safe(get_id, record)
                    what = "no id" if raw is MISSING else "id is " + _json_type(raw)
                    if type(raw) is float:
                        what = f"id {raw!r} is too large to be exact (over 2^53)"
                    examples.append(f"item {index}: {what}")
                continue
        add_id(value)
        keep(record)
        add_digest(xxh3_128_digest(dumps(without(record, ignore_list) if ignore_list else record, option=_SORT)))
    keys = ids if all_str else list(map(str, ids))
    fingerprints = dict(zip(keys, digests))
    if len(fingerprints) == len(keys):
        records = dict(zip(keys, kept))
    else:  # duplicate ids: the first occurrence wins
        fingerprints, records = {}, {}
        for key, digest, record in zip(keys, digests, kept):
            if key in fingerprints:
                duplicates += 1
                continue
            fingerprints[key] = digest
            records[key] = record
    return Snapshot(fingerprints, records, invalid, duplicates, examples)


@dataclass(slots=True)
class Change:
    type: str
    record_id: str
    record: Any  # None for record.deleted


def changes(old: dict[str, bytes], new: Snapshot, *, initial: bool, allow_deletes: bool) -> list[Change]:
    """The events that turn `old` into `new`. Initial runs report every record as new."""
    records = new.records
    if initial:
        return [Change(NEW, rid, records[rid]) for rid in new.fingerprints]
    out: list[Change] = []
    get = old.get
    added = 0
    for rid, fp in new.fingerprints.items():
        before = get(rid)
        if before is None:
            out.append(Change(NEW, rid, records[rid]))
            added += 1
        elif before != fp:
            out.append(Change(MODIFIED, rid, records[rid]))
    # Every old id is still there when the ids seen minus the new ones account for all of them.
    if allow_deletes and len(new.fingerprints) - added < len(old):
        current = new.fingerprints
        out.extend(Change(DELETED, rid, None) for rid in old if rid not in current)
    return out


def apply(old: dict[str, bytes], new: Snapshot, events: list[Change]) -> tuple[dict[str, bytes], list[str]]:
    """The fingerprint rows to write and the ids to delete so that the store matches `events`."""
    upserts = {c.record_id: new.fingerprints[c.record_id] for c in events if c.type != DELETED}
    deletes = [c.record_id for c in events if c.type == DELETED]
    return upserts, deletes


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(type(value), type(value).__name__)
