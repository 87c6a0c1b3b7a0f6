"""Fingerprints and change detection: pure functions, no I/O.

A record's fingerprint is xxh3_128 over its canonical JSON (keys sorted at every level, no
whitespace) with `ignore_fields` left out. Key order and record order never cause events; array
order inside a record does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson
from xxhash import xxh3_128_digest

from syncd.errors import ExtractError
from syncd.jsonpath import MISSING, JsonPath, without
from syncd.records import ExactNumber, parse_document, parse_record
from syncd.records import dumps as exact_dumps

NEW = "record.new"
MODIFIED = "record.modified"
DELETED = "record.deleted"
EVENT_TYPES = (NEW, MODIFIED, DELETED)

_SORT = orjson.OPT_SORT_KEYS


def fingerprint(record: Any, ignore: tuple[JsonPath, ...] = ()) -> bytes:
    """16-byte fingerprint of `record` minus the `ignore` paths."""
    if ignore:
        record = without(record, list(ignore))
    return xxh3_128_digest(exact_dumps(record, option=_SORT))


_Raw = msgspec.Raw


@dataclass
class Snapshot:
    """The records of one successful fetch, by id.

    A record in `records` is its parsed value, or, when it came from records.split_list, its raw
    bytes (a msgspec.Raw over the response) or its compact JSON (`bytes`, what orjson.dumps of its
    value gives): parsed only when an event needs it (see `value` and `json`)."""

    fingerprints: dict[str, bytes]
    records: dict[str, Any]
    #: Records without a usable id (missing, null, not a string or number, or several matches).
    invalid_ids: int = 0
    #: Records whose id was already seen earlier in the same response (only the first counts).
    duplicate_ids: int = 0
    invalid_examples: list[str] = field(default_factory=list)
    #: Some record may hold numbers kept as text (records.ExactNumber): serialise with records.dumps.
    exact: bool = False
    #: The response may hold such numbers: raw records are parsed with that in mind.
    exact_possible: bool = False

    def value(self, record_id: str) -> Any:
        """The parsed record."""
        return record_value(self.records[record_id], self.exact_possible)

    def json(self, record_id: str) -> bytes:
        """The record as compact JSON: exactly what orjson.dumps (records.dumps) of its value gives."""
        return record_json(self.records[record_id], self.exact_possible, self.exact)


def record_value(record: Any, exact_possible: bool = False) -> Any:
    """A Snapshot.records entry, parsed (see Snapshot)."""
    kind = type(record)
    if kind is _Raw:
        return parse_record(record, exact_possible)[0]
    if kind is bytes:
        return parse_document(record)[0]
    return record


def record_json(record: Any, exact_possible: bool = False, exact: bool = False) -> bytes:
    """A Snapshot.records entry as compact JSON (see Snapshot)."""
    kind = type(record)
    if kind is bytes:
        return record
    if kind is _Raw:
        value, exact = parse_record(record, exact_possible)
        return exact_dumps(value) if exact else orjson.dumps(value)
    return exact_dumps(record) if exact else orjson.dumps(record)


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
        # An empty id names nothing (and "" is the outbox's key of the lifecycle events).
        return value or None
    if kind is int:
        return str(value)
    if kind is ExactNumber:
        return str.__str__(value)  # an integer beyond 64 bits, as written
    if kind is float:
        if abs(value) >= 2**53:
            # A number beyond what a double holds exactly (e.g. an integer over 64 bits, which the
            # parser turns into a float): two different ids could collide, so it is no id at all.
            return None
        # 3.0 and 3 are the same number in JSON; send integral floats as "3", never as "3.0".
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def snapshot(document: Any, sync_id: str, list_path: JsonPath | None, id_path: JsonPath | None, ignore: tuple[JsonPath, ...] = ()) -> Snapshot:
    """Extract and fingerprint every record of one parsed response (see SnapshotBuilder)."""
    builder = SnapshotBuilder(sync_id, list_path, id_path, ignore)
    builder.add(document)
    return builder.finish()


class SnapshotBuilder:
    """The records of a run, fed page by page: duplicate and invalid ids are counted across pages.

    List mode: `list_path` must lead to an array on every page (ExtractError otherwise; an empty
    array is valid). Whole mode (no list_path): the document is one record whose id is the sync id.
    """

    def __init__(self, sync_id: str, list_path: JsonPath | None, id_path: JsonPath | None, ignore: tuple[JsonPath, ...] = ()) -> None:
        self.sync_id = sync_id
        self.list_path = list_path
        self.id_path = id_path
        self.ignore = list(ignore)
        self._get_id = _getter(id_path)
        self._ids: list[Any] = []
        self._digests: list[bytes] = []
        self._kept: list[Any] = []
        self._all_str = True
        self.items = 0  # records seen, usable or not
        self.invalid = 0
        self.examples: list[str] = []
        self._first_skipped: Any = MISSING
        self._whole: Snapshot | None = None
        self.exact = False
        self.exact_possible = False

    def add(self, document: Any, page: int | None = None, *, exact: bool = False) -> None:
        """Add the records of one parsed page (`page`: its number, for messages; `exact`: it was
        parsed with numbers kept as text, see records.parse_document)."""
        self.exact = self.exact or exact
        if self.list_path is None:
            self.items += 1
            self._whole = Snapshot({self.sync_id: fingerprint(document, tuple(self.ignore))}, {self.sync_id: document},
                                   exact=self.exact)
            return
        list_path = self.list_path
        where = f" of page {page}" if page else ""
        found = list_path.find(document)
        if not found:
            raise ExtractError(f"list_identifier {list_path.text} matched nothing in the response{where}")
        if len(found) > 1:
            raise ExtractError(f"list_identifier {list_path.text} matched {len(found)} values{where}; it must lead to one array")
        items = found[0]
        if type(items) is not list:
            raise ExtractError(f"list_identifier {list_path.text} leads to {_json_type(items)}{where}, not an array")
        self._add_items(items, page, exact)

    def add_raw(self, items: list[msgspec.Raw], *, exact_possible: bool, keep_json: bool = False) -> None:
        """Add the records of a one-page list response split by records.split_list: each record is
        parsed alone, fingerprinted and dropped, so the response never exists as one big document
        (a 1M-record list costs ~300 B a record here instead of ~2.4 KB).

        Kept for the events is the raw record (nothing is copied: it points into the response) or,
        with `keep_json` (every record will be sent, as in an initial run), its compact JSON,
        rendered now while the parsed value is at hand."""
        self.exact_possible = self.exact_possible or exact_possible
        add_id, add_digest, keep = self._ids.append, self._digests.append, self._kept.append
        get_id = self._get_id
        ignore_list = self.ignore
        loads, dumps, sort = orjson.loads, orjson.dumps, _SORT
        all_str = self._all_str
        invalid = 0
        exact_seen = False
        for index, raw in enumerate(items):
            if exact_possible:
                record, exact = parse_record(raw, True)
            else:
                try:
                    record, exact = loads(memoryview(raw)), False
                except orjson.JSONDecodeError:
                    record, exact = parse_record(raw, False)
            try:
                value = get_id(record)
            except (KeyError, TypeError, IndexError):
                value = MISSING
            kind = type(value)
            if kind is int:
                all_str = False
            elif kind is not str or not value:
                value = _record_id(value)
                if value is None:
                    invalid += 1
                    self._note_invalid(record, index, None)
                    continue
            add_id(value)
            if exact:
                exact_seen = True
                add_digest(xxh3_128_digest(exact_dumps(without(record, ignore_list) if ignore_list else record, option=sort)))
                keep(bytes(memoryview(exact_dumps(record))) if keep_json else raw)
            else:
                add_digest(xxh3_128_digest(dumps(without(record, ignore_list) if ignore_list else record, option=sort)))
                # An exact-size copy: orjson's own result sits in a ~4 KiB block (400 MB per 100k kept).
                keep(bytes(memoryview(dumps(record))) if keep_json else raw)
        self.exact = self.exact or exact_seen
        self._all_str = all_str
        self.invalid += invalid
        self.items += len(items)

    def _add_items(self, items: list, page: int | None, exact: bool) -> None:
        add_id, add_digest, keep = self._ids.append, self._digests.append, self._kept.append
        get_id = self._get_id
        ignore_list = self.ignore
        dumps = exact_dumps if exact else orjson.dumps
        all_str = self._all_str
        invalid = 0
        # Once per record: keep it flat. Ids are collected raw and turned into strings in one C-level
        # pass at the end (str() per int inside this loop was a third of its time).
        for index, record in enumerate(items):
            try:
                value = get_id(record)
            except (KeyError, TypeError, IndexError):
                value = MISSING
            kind = type(value)
            if kind is int:
                all_str = False
            elif kind is not str or not value:
                value = _record_id(value)
                if value is None:
                    invalid += 1
                    self._note_invalid(record, index, page)
                    continue
            add_id(value)
            keep(record)
            add_digest(xxh3_128_digest(dumps(without(record, ignore_list) if ignore_list else record, option=_SORT)))
        self._all_str = all_str
        self.invalid += invalid
        self.items += len(items)

    def _note_invalid(self, record: Any, index: int, page: int | None) -> None:
        if self._first_skipped is MISSING:
            self._first_skipped = record
        if len(self.examples) < 3:
            raw = get_id_safe(self._get_id, record)
            what = "no id" if raw is MISSING else "the id is an empty string" if raw == "" else "id is " + _json_type(raw)
            if type(raw) is float:
                what = f"id {raw!r} is too large to be exact (over 2^53)"
            self.examples.append((f"page {page} " if page else "") + f"item {index}: {what}")

    def finish(self) -> Snapshot:
        """The snapshot of every page added. Fails (ExtractError) when the list is non-empty and no
        record had a usable id: a wrong record_identifier must never look like an empty list."""
        if self.list_path is None:
            return self._whole or Snapshot({}, {})
        if self.items and not self._ids:
            first = self._first_skipped
            keys = ", ".join(list(first)[:12]) if type(first) is dict else f"it is {_json_type(first)}, not an object"
            raise ExtractError(
                f"none of the {self.items} records has a usable id at record_identifier {self.id_path.text if self.id_path else '(unset)'}"
                f" (first record's keys: {keys or 'none'}); fix record_identifier"
            )
        keys = self._ids if self._all_str else list(map(str, self._ids))
        digests, kept = self._digests, self._kept
        fingerprints = dict(zip(keys, digests, strict=True))
        duplicates = 0
        if len(fingerprints) == len(keys):
            records = dict(zip(keys, kept, strict=True))
        else:  # duplicate ids: the first occurrence wins
            fingerprints, records = {}, {}
            for key, digest, record in zip(keys, digests, kept, strict=True):
                if key in fingerprints:
                    duplicates += 1
                    continue
                fingerprints[key] = digest
                records[key] = record
        self._ids, self._digests, self._kept = [], [], []
        return Snapshot(fingerprints, records, self.invalid, duplicates, self.examples, exact=self.exact,
                        exact_possible=self.exact_possible)


@dataclass(slots=True)
class Change:
    type: str
    record_id: str
    record: Any  # None for record.deleted


@dataclass
class Plan:
    """What a run changes: the events it detects and the store writes that go with them."""

    #: The events as three lists of the same length: type, record id, and the record (None for
    #: record.deleted). Columns, not a Change each: an initial run of 100k records makes them
    #: in a few C-level passes.
    types: list[str]
    record_ids: list[str]
    records: list[Any]
    #: Fingerprints to write (new, modified, and records back before their deletion was confirmed).
    upserts: dict[str, bytes]
    #: Records gone for good (their record.deleted is in `changes`).
    deletes: list[str]
    #: Records missing for fewer runs than confirm_deletes_after: id -> consecutive runs missing.
    missing: dict[str, int]

    @classmethod
    def writes_only(cls, upserts: dict[str, bytes]) -> Plan:
        """No events, only fingerprints to write (a re-baseline)."""
        return cls([], [], [], upserts, [], {})

    @property
    def changes(self) -> list[Change]:
        return list(map(Change, self.types, self.record_ids, self.records))


def plan(old: dict[str, bytes], new: Snapshot, *, initial: bool, allow_deletes: bool,
         pending: dict[str, int] | None = None, confirm_after: int = 1) -> Plan:
    """The events that turn `old` into `new`, and the writes that record them.

    `pending`: records already missing from earlier runs (id -> runs missing). A record is deleted
    once it has been missing from `confirm_after` consecutive successful runs; one that comes back
    before is no deletion at all (a record.modified if it changed meanwhile). Initial runs report
    every record as new."""
    records = new.records
    fingerprints = new.fingerprints
    if initial:
        return Plan([NEW] * len(fingerprints), list(fingerprints), list(map(records.__getitem__, fingerprints)),
                     dict(fingerprints), [], {})
    pending = pending or {}
    types: list[str] = []
    ids: list[str] = []
    bodies: list[Any] = []
    upserts: dict[str, bytes] = {}
    get = old.get
    added = 0
    for rid, fp in fingerprints.items():
        before = get(rid)
        if before is None:
            types.append(NEW)
            ids.append(rid)
            bodies.append(records[rid])
            upserts[rid] = fp
            added += 1
        elif before != fp:
            types.append(MODIFIED)
            ids.append(rid)
            bodies.append(records[rid])
            upserts[rid] = fp
    for rid in pending:
        if rid in fingerprints and rid not in upserts:
            upserts[rid] = fingerprints[rid]  # back before its deletion was confirmed: not missing any more
    deletes: list[str] = []
    missing: dict[str, int] = {}
    # Every old id is still there when the ids seen minus the new ones account for all of them.
    if allow_deletes and len(fingerprints) - added < len(old):
        for rid in old:
            if rid in fingerprints:
                continue
            runs = pending.get(rid, 0) + 1
            if runs >= confirm_after:
                types.append(DELETED)
                ids.append(rid)
                bodies.append(None)
                deletes.append(rid)
            else:
                missing[rid] = runs
    # When deletes are held (unreadable ids, a partial list) missing records stay pending as they were.
    return Plan(types, ids, bodies, upserts, deletes, missing)


def changes(old: dict[str, bytes], new: Snapshot, *, initial: bool, allow_deletes: bool) -> list[Change]:
    """The events that turn `old` into `new` (every missing record deleted at once)."""
    return plan(old, new, initial=initial, allow_deletes=allow_deletes).changes


def apply(old: dict[str, bytes], new: Snapshot, events: list[Change]) -> tuple[dict[str, bytes], list[str]]:
    """The fingerprint rows to write and the ids to delete so that the store matches `events`."""
    upserts = {c.record_id: new.fingerprints[c.record_id] for c in events if c.type != DELETED}
    deletes = [c.record_id for c in events if c.type == DELETED]
    return upserts, deletes


# -- changedFields -------------------------------------------------------------------------------

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def changed_fields(before: Any, after: Any) -> list[str]:
    """Sorted JSONPaths (`$.a.b`, `$.tags[2]`) of the leaves added, removed or changed between two
    versions of a record. A leaf is a scalar, or an empty object or array."""
    found: list[str] = []
    _walk(before, after, "$", found)
    return sorted(found)


def _child(path: str, key: str | int) -> str:
    if type(key) is int:
        return f"{path}[{key}]"
    if _PLAIN_KEY.match(key):
        return f"{path}.{key}"
    quoted = key.replace("\\", "\\\\").replace("'", "\\'")
    return f"{path}['{quoted}']"


def _leaves(value: Any, path: str, found: list[str]) -> None:
    if type(value) is dict and value:
        for key, item in value.items():
            _leaves(item, _child(path, key), found)
    elif type(value) is list and value:
        for index, item in enumerate(value):
            _leaves(item, _child(path, index), found)
    else:
        found.append(path)


def _walk(before: Any, after: Any, path: str, found: list[str]) -> None:
    if type(before) is dict and type(after) is dict and (before or after):
        for key in before.keys() | after.keys():
            child = _child(path, key)
            if key not in after:
                _leaves(before[key], child, found)
            elif key not in before:
                _leaves(after[key], child, found)
            else:
                _walk(before[key], after[key], child, found)
    elif type(before) is list and type(after) is list and (before or after):
        for index in range(max(len(before), len(after))):
            child = _child(path, index)
            if index >= len(after):
                _leaves(before[index], child, found)
            elif index >= len(before):
                _leaves(after[index], child, found)
            else:
                _walk(before[index], after[index], child, found)
    elif type(before) is not type(after) or before != after:
        if type(before) in (dict, list) or type(after) in (dict, list):
            both: list[str] = []
            _leaves(before, path, both)
            _leaves(after, path, both)
            found.extend(dict.fromkeys(both))
        else:
            found.append(path)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(type(value), type(value).__name__)
