"""The events syncd sends: their types, ids and Knit's envelope (DESIGN §5, §9)."""

from __future__ import annotations

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
