"""The state database's schema is versioned: older databases are upgraded in place, newer ones refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from syncd.store import SCHEMA_VERSION, SchemaError, Store

V1 = (Path(__file__).parent / "data" / "schema-v1.sql").read_text()


def make_v1(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(V1)
    conn.execute("INSERT INTO syncs (sync_id, shape, body_hash, generation, baselined, record_count) "
                 "VALUES ('a', 'shape', x'00', 3, 1, 1)")
    conn.execute("INSERT INTO records VALUES ('a', '1', x'01')")
    conn.execute("INSERT INTO runs (run_id, sync_id, started_at, finished_at, outcome) VALUES ('r', 'a', 1, 2, 'changed')")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


async def test_a_version_1_database_is_upgraded_and_keeps_its_state(state_path):
    make_v1(state_path)
    async with await Store.open(state_path) as store:
        state = await store.sync_state("a")
        assert state.baselined and state.generation == 3 and state.validators is None and state.last_warning is None
        assert await store.fingerprints(state) == {"1": b"\x01"}
        runs = await store.runs("a")
        assert len(runs) == 1 and runs[0].pages == 0 and runs[0].warning is None
    conn = sqlite3.connect(state_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    async with await Store.open(state_path) as store:  # opening again changes nothing
        assert (await store.sync_state("a")).generation == 3


async def test_a_newer_database_is_refused_with_a_clear_error(state_path):
    async with await Store.open(state_path):
        pass
    conn = sqlite3.connect(state_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaError, match="newer syncd"):
        await Store.open(state_path)
    with pytest.raises(SchemaError, match="newer syncd"):
        await Store.open(state_path, readonly=True)
