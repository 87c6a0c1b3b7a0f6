"""The events syncd sends: their types, ids and Knit's envelope (DESIGN §5, §9)."""

from __future__ import annotations

import functools
import os
import time
from enum import StrEnum
from typing import Any

import orjson

from syncd.records import dumps as exact_dumps
from syncd.units import iso_time


class EventType(StrEnum):
    NEW = "record.new"
    MODIFIED = "record.modified"
    DELETED = "record.deleted"
    PROCESSED = "sync.events.processed"
    ALL_CONSUMED = "sync.events.allConsumed"


RECORD_EVENTS = (EventType.NEW, EventType.MODIFIED, EventType.DELETED)
LIFECYCLE_EVENTS = (EventType.PROCESSED, EventType.ALL_CONSUMED)
ALL_EVENTS = RECORD_EVENTS + LIFECYCLE_EVENTS
#: What a sync sends unless its `events` says otherwise: lifecycle events are opt-in.
DEFAULT_EVENTS = RECORD_EVENTS

INITIAL = "initial_sync"
DELTA = "delta_sync"

#: The outbox key of a sync's lifecycle events (record ids are never empty): they are delivered
#: in order among themselves, like the events of one record.
LIFECYCLE_KEY = ""


def new_id(prefix: str) -> str:
    """`prefix_` + 32 hex digits: 48 bits of milliseconds (sortable by time) then 80 random bits."""
    return f"{prefix}_{int(time.time() * 1000):012x}{os.urandom(10).hex()}"


def new_ids(prefix: str, count: int) -> list[str]:
    """`count` ids like new_id's, in ascending order: the milliseconds, 48 random bits shared by
    the run, then a 32-bit counter from a random start below 2^31 (so it cannot wrap).

    Ascending, because PostgreSQL's unique index on eventId takes them in order (100k ids in
    random order made an initial run's insert ~30% slower); counted rather than sorted, because
    sorting 100k random ids took as long as making them."""
    head = f"{prefix.replace('%', '%%')}_{int(time.time() * 1000):012x}{os.urandom(6).hex()}%08x"
    start = int.from_bytes(os.urandom(4), "big") >> 1
    return list(map(head.__mod__, range(start, start + count)))


class Envelopes:
    """Envelopes of one run, rendered from parts: what is the same for every event of the run is
    serialised once, and each event's record is spliced in as the JSON it already is. Gives
    exactly the bytes `envelope` gives (a test holds them equal)."""

    __slots__ = ("_middle", "_tail", "_heads")

    def __init__(self, *, sync_type: str | None, sync_id: str, run_id: str, timestamp: str) -> None:
        self._middle = b"".join((b',"syncType":', orjson.dumps(sync_type), b',"syncJobId":', orjson.dumps(sync_id),
                                 b',"syncRunId":', orjson.dumps(run_id), b',"recordId":'))
        self._tail = b',"timestamp":' + orjson.dumps(timestamp) + b"}"
        self._heads: dict[str, bytes] = {}

    def render(self, event_id: str, event_type: str, data_json: bytes, record_id: str | None,
               fields_json: bytes | None = None) -> bytes:
        """The body of one event; `data_json` is eventData as compact JSON (b"null" for none),
        `fields_json` changedFields as compact JSON (or None: no changedFields)."""
        head = self._heads.get(event_type)
        if head is None:
            head = self._heads[event_type] = b',"eventType":' + orjson.dumps(event_type) + b',"eventData":'
        fields = b"" if fields_json is None else b',"changedFields":' + fields_json
        return b"".join((b'{"eventId":', orjson.dumps(event_id), head, data_json, fields, self._middle,
                         orjson.dumps(record_id), self._tail))


@functools.lru_cache(maxsize=64)
def _run_envelopes(sync_type: str | None, sync_id: str, run_id: str, created_at: float) -> Envelopes:
    # Events are read back a run at a time: one Envelopes per run serves all of them.
    return Envelopes(sync_type=sync_type, sync_id=sync_id, run_id=run_id, timestamp=iso_time(created_at))


def render_stored(event_id: str, event_type: str, record_id: str | None, data_json: bytes, *, sync_type: str | None,
                  sync_id: str, run_id: str, created_at: float, fields_json: bytes | None = None) -> bytes:
    """The webhook body of an event stored as its parts (eventData and the run's constants):
    byte for byte what `Envelopes.render` gave when the run built it."""
    return _run_envelopes(sync_type, sync_id, run_id, created_at).render(event_id, event_type, data_json, record_id,
                                                                         fields_json)


def envelope(event_id: str, event_type: str, data: Any, *, sync_type: str | None, sync_id: str, run_id: str,
             record_id: str | None, timestamp: str, exact: bool = False, changed_fields: list[str] | None = None) -> bytes:
    """The webhook body: Knit's envelope plus a timestamp, as exact-size bytes. `changed_fields`
    (keep_records, record.modified) goes right after eventData."""
    doc = {"eventId": event_id, "eventType": event_type, "eventData": data}
    if changed_fields is not None:
        doc["changedFields"] = changed_fields
    doc.update(syncType=sync_type, syncJobId=sync_id, syncRunId=run_id, recordId=record_id, timestamp=timestamp)
    body = (exact_dumps if exact else orjson.dumps)(doc)
    # orjson hands back each result in a ~4 KiB allocation: an exact-size copy keeps a 100k-event
    # initial run at ~50 MB of bodies instead of ~400 MB until the commit.
    return bytes(memoryview(body))


def lifecycle(event_type: EventType, data: dict, *, sync_type: str | None, sync_id: str, run_id: str,
              now: float | None = None) -> tuple[str, bytes]:
    """A lifecycle event (recordId null): its id and body."""
    event_id = new_id("evt")
    stamp = iso_time(time.time() if now is None else now)
    return event_id, envelope(event_id, event_type, data, sync_type=sync_type, sync_id=sync_id, run_id=run_id,
                              record_id=None, timestamp=stamp)
