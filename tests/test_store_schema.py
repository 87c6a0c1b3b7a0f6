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


async def test_a_new_database_has_16k_pages_and_an_old_one_keeps_its_own(state_path, tmp_path):
    def page_size(path: Path) -> int:
        conn = sqlite3.connect(path)
        try:
            return conn.execute("PRAGMA page_size").fetchone()[0]
        finally:
            conn.close()

    async with await Store.open(state_path):
        pass
    assert page_size(state_path) == 16384
    old = tmp_path / "old" / "state.db"
    make_v1(old)
    assert page_size(old) == 4096
    async with await Store.open(old) as store:  # upgraded in place, its pages as they were
        assert await store.fingerprints(await store.sync_state("a")) == {"1": b"\x01"}
    assert page_size(old) == 4096


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


async def test_queued_events_survive_the_outbox_rebuild_of_version_4(state_path):
    """v4 rebuilt the outbox (no UNIQUE on event_id, record events stored as parts): events queued
    before the upgrade keep their bodies, state and order, and sequence numbers go on."""
    make_v1(state_path)
    conn = sqlite3.connect(state_path)
    insert = ("INSERT INTO outbox (seq, event_id, sync_id, record_id, event_type, webhook_url, created_at, body, "
              "attempts, next_attempt_at, dead_at) VALUES (?, ?, 'a', ?, 'record.new', 'http://127.0.0.1:9/h', 1, ?, ?, ?, ?)")
    conn.execute(insert, (50, "evt_gone", "0", b"{}", 0, 0, None))
    conn.execute("DELETE FROM outbox WHERE seq = 50")  # delivered: the sequence stays at 50
    conn.execute(insert, (7, "evt_dead", "1", b'{"eventId":"evt_dead"}', 8, 0, 5.0))
    conn.execute(insert, (9, "evt_due", "2", b'{"eventId":"evt_due"}', 1, 0, None))
    conn.commit()
    conn.close()
    async with await Store.open(state_path) as store:
        [due] = await store.claim_due(10.0, 10)
        assert (due.seq, due.event_id, due.body, due.attempts) == (9, "evt_due", b'{"eventId":"evt_due"}', 1)
        listed = {d.event_id: d for d in await store.deliveries()}
        assert listed["evt_dead"].dead_at == 5.0 and listed["evt_dead"].attempts == 8
    conn = sqlite3.connect(state_path)
    assert conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchall() == [(50,)]
    assert not [row for row in conn.execute("PRAGMA index_list(outbox)") if row[2]]  # no unique index left
    indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'outbox'")}
    assert {"outbox_by_record", "outbox_due", "outbox_due_by_sync", "outbox_dead", "outbox_by_run"} <= indexes
    conn.close()
