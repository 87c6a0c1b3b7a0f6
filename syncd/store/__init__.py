"""State backends: SQLite (embedded, one instance) and PostgreSQL (several instances).

Callers open a store with `open_store` and use it through `StateStore` (see `store.base`)."""

from __future__ import annotations

from pathlib import Path

from syncd.store.base import (
    RUNS_KEPT,
    Commit,
    ConsumedRun,
    Delivery,
    LeaseLost,
    OutboxEvent,
    OutboxStats,
    PendingEvent,
    RunEvents,
    RunRecord,
    SchemaError,
    StateConflict,
    StateStore,
    StoreError,
    SyncState,
    body_dictionary,
    compress_body,
    decompress_body,
    default_instance_id,
)
from syncd.store.sqlite import SCHEMA_VERSION, SqliteStore, StateLocked, create_private, lock_instance

#: The embedded backend under its historical name.
Store = SqliteStore

__all__ = [
    "RUNS_KEPT", "SCHEMA_VERSION", "Commit", "ConsumedRun", "Delivery", "LeaseLost", "OutboxEvent", "OutboxStats",
    "PendingEvent", "RunEvents", "RunRecord", "SchemaError", "SqliteStore", "StateConflict", "StateLocked", "StateStore", "Store",
    "StoreError", "SyncState", "body_dictionary", "compress_body", "create_private", "decompress_body", "default_instance_id",
    "lock_instance", "open_store",
]


async def open_store(*, state_path: Path, state_url: str | None = None, readonly: bool = False, **options) -> StateStore:
    """The store the settings name: PostgreSQL when `state_url` is set, else the SQLite file.
    `options` go to that backend's `open`."""
    if state_url:
        from syncd.store.postgres import PostgresStore

        return await PostgresStore.open(state_url, readonly=readonly, **options)
    return await SqliteStore.open(state_path, readonly=readonly, **options)
