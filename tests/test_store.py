"""The StateStore contract as the engine and the deliverer rely on it, run against both backends
(SQLite and PostgreSQL, through the `backend` fixture), then what only several PostgreSQL
instances sharing one database add: leases, fencing, claims across instances, LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import orjson
import pytest

from syncd.events import new_ids
from syncd.store import (
    RUNS_KEPT,
    Commit,
    ConsumedRun,
    LeaseLost,
    OutboxEvent,
    RunEvents,
    RunRecord,
    SchemaError,
    StateConflict,
    StoreError,
    body_dictionary,
    compress_body,
    open_store,
)

URL = "http://hooks.invalid/h"


# -- helpers -----------------------------------------------------------------------------------


def run_record(sync_id: str, run_id: str, *, outcome: str = "changed", at: float | None = None,
               error: str | None = None) -> RunRecord:
    at = time.time() if at is None else at
    return RunRecord(run_id, sync_id, at - 0.5, at, outcome, sync_type="delta_sync", error=error)


def event(sync_id: str, record_id: str, n: int, *, kind: str = "record.modified", run_id: str | None = None,
          at: float | None = None) -> OutboxEvent:
    body = orjson.dumps({"eventId": f"evt_{sync_id}_{record_id}_{n}", "recordId": record_id, "n": n})
    return OutboxEvent(f"evt_{sync_id}_{record_id}_{n}", sync_id, record_id, kind, URL,
                       time.time() if at is None else at, body, run_id)


_runs = iter(range(10**9))


async def commit(store, sync_id: str, *, upserts=None, deletes=(), events=(), replace_all=False, missing=None,
                 generation: int | None = None, **extra) -> int:
    """Commit a successful run the way the engine does: against the generation it read."""
    state = await store.sync_state(sync_id)
    current = dict(await store.fingerprints(state))
    if replace_all:
        current = {}
    for rid in deletes:
        current.pop(rid, None)
    current.update(upserts or {})
    c = Commit(run_record(sync_id, f"run_{next(_runs)}"), "shape", b"hash", upserts=dict(upserts or {}),
               deletes=list(deletes), replace_all=replace_all, record_count=len(current), events=list(events),
               expected_generation=state.generation if generation is None else generation,
               missing=dict(missing or {}), **extra)
    return await store.commit_run(c)


async def until(predicate, timeout: float = 8.0, interval: float = 0.05) -> None:
    """Wait until the coroutine function `predicate()` returns true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def ids(events) -> list[str]:
    return [e.event_id for e in events]


@pytest.fixture
async def store(backend):
    s = await open_store(**backend)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def other(backend, store):
    """A second store on the same state (another process: `syncd once`, the CLI, another instance):
    it reads the database, never the first store's caches."""
    s = await open_store(**backend)
    try:
        yield s
    finally:
        await s.close()


# -- syncs and runs ------------------------------------------------------------------------------


async def test_commit_run_writes_fingerprints_events_and_sync_row_together(store, other):
    assert await commit(store, "a", upserts={"1": b"f1", "2": b"f2"},
                        events=[event("a", "1", 1, kind="record.new"), event("a", "2", 1, kind="record.new")]) == 0
    for s in (store, other):
        state = await s.sync_state("a")
        assert (state.baselined, state.generation, state.record_count, state.shape, state.body_hash) == \
            (True, 1, 2, "shape", b"hash")
        assert state.last_outcome == "changed" and state.last_error is None
        assert state.last_success_at == state.last_run_at == state.last_change_at is not None
        assert await s.fingerprints(state) == {"1": b"f1", "2": b"f2"}
        assert ids(await s.outbox("a")) == ["evt_a_1_1", "evt_a_2_1"]
        assert len(await s.runs("a")) == 1

    # Records missing from this run but not deleted yet are counted and returned.
    assert await commit(store, "a", missing={"2": 1}) == 1
    assert (await other.sync_state("a")).pending_deletes == 1
    assert await other.pending_missing("a") == {"2": 1}
    # Seen again: no longer pending.
    assert await commit(store, "a", upserts={"2": b"f2"}) == 0
    assert await other.pending_missing("a") == {}


async def test_a_failing_commit_writes_nothing_at_all(store, other):
    await commit(store, "a", upserts={"1": b"f1"}, events=[event("a", "1", 1)])
    before = await other.sync_state("a")
    # The second event has no webhook URL: the outbox refuses it, after the fingerprints were written.
    with pytest.raises(StoreError):
        await commit(store, "a", upserts={"1": b"changed", "2": b"f2"}, deletes=[],
                     events=[event("a", "2", 1), dataclasses.replace(event("a", "1", 2), webhook_url=None)])
    for s in (store, other):
        state = await s.sync_state("a")
        assert state.generation == before.generation and state.record_count == 1
        assert await s.fingerprints(state) == {"1": b"f1"}
        assert ids(await s.outbox()) == ["evt_a_1_1"]
        assert len(await s.runs("a")) == 1
    # The store is usable afterwards.
    await commit(store, "a", upserts={"2": b"f2"}, events=[event("a", "2", 1)])
    assert await other.fingerprints(await other.sync_state("a")) == {"1": b"f1", "2": b"f2"}


async def test_a_stale_generation_raises_state_conflict_and_writes_nothing(store, other):
    await commit(store, "a", upserts={"1": b"f1"})
    await commit(other, "a", upserts={"2": b"f2"})  # another process committed meanwhile: generation 2
    with pytest.raises(StateConflict) as caught:
        await commit(store, "a", upserts={"3": b"f3"}, events=[event("a", "3", 1)], generation=1)
    assert not isinstance(caught.value, LeaseLost)
    for s in (store, other):
        state = await s.sync_state("a")
        assert state.generation == 2 and state.record_count == 2
        assert await s.fingerprints(state) == {"1": b"f1", "2": b"f2"}
        assert await s.outbox() == []
        assert len(await s.runs("a")) == 2
    assert not await store.events_since(0)


async def test_fingerprints_follow_upserts_deletes_and_replace_all(store, other):
    await commit(store, "a", upserts={"1": b"x1", "2": b"x2", "3": b"x3"})
    await commit(store, "b", upserts={"1": b"other sync"})
    await commit(store, "a", upserts={"2": b"y2", "4": b"x4"}, deletes=["1"])
    want = {"2": b"y2", "3": b"x3", "4": b"x4"}
    for s in (store, other):  # the committing store's cache and a fresh read agree
        assert await s.fingerprints(await s.sync_state("a")) == want
    await commit(store, "a", upserts={"9": b"z9"}, replace_all=True)
    for s in (store, other):
        state = await s.sync_state("a")
        assert await s.fingerprints(state) == {"9": b"z9"} and state.record_count == 1
        assert await s.fingerprints(await s.sync_state("b")) == {"1": b"other sync"}
    # A commit by another process is seen by the first store's next read (its cache is by generation).
    await commit(other, "a", deletes=["9"], upserts={"8": b"z8"})
    assert await store.fingerprints(await store.sync_state("a")) == {"8": b"z8"}
    assert await store.fingerprints(await store.sync_state("never")) == {}


async def test_record_run_for_failed_and_unchanged_runs(store):
    await commit(store, "a", upserts={"1": b"f1"}, validators={"etag": '"v1"'})
    good = await store.sync_state("a")
    assert good.validators == {"etag": '"v1"'}

    later = time.time() + 3600
    await store.record_run(run_record("a", "r_fail", outcome="failed", error="HTTP 503"), not_before=later,
                           validators={"etag": "ignored"}, deletes_held=3)
    state = await store.sync_state("a")
    assert (state.last_outcome, state.last_error, state.next_run_at, state.deletes_held) == \
        ("failed", "HTTP 503", later, 3)
    assert state.last_success_at == good.last_success_at  # a failure is not a success
    assert state.validators == {"etag": '"v1"'}  # a failed run's validators are not kept
    assert state.generation == good.generation and await store.fingerprints(state) == {"1": b"f1"}

    await store.record_run(run_record("a", "r_same", outcome="unchanged"), validators={"etag": '"v2"'})
    state = await store.sync_state("a")
    assert (state.last_outcome, state.last_error, state.next_run_at, state.deletes_held) == \
        ("unchanged", None, None, 0)
    assert state.validators == {"etag": '"v2"'} and state.last_success_at == state.last_run_at
    assert state.generation == good.generation and state.last_change_at == good.last_change_at
    await store.record_run(run_record("a", "r_same2", outcome="unchanged"))  # no validators: the stored ones stay
    assert (await store.sync_state("a")).validators == {"etag": '"v2"'}

    await store.record_run(run_record("a", "r_fail2", outcome="failed", error="x"), deletes_held=2)
    assert (await store.sync_state("a")).deletes_held == 2
    await commit(store, "a", upserts={"2": b"f2"})  # a successful run clears held deletes
    state = await store.sync_state("a")
    assert state.deletes_held == 0 and state.last_error is None and state.next_run_at is None
    assert [r.outcome for r in await store.runs("a")] == ["changed", "failed", "unchanged", "unchanged", "failed",
                                                         "changed"]

    # A sync that never succeeded: a row exists, not baselined.
    await store.record_run(run_record("new", "r0", outcome="failed", error="refused"))
    state = await store.sync_state("new")
    assert not state.baselined and state.generation == 0 and state.last_success_at is None
    assert state.last_error == "refused"


async def test_run_history_is_newest_first_and_trimmed(store):
    t0 = time.time()
    for i in range(RUNS_KEPT + 5):
        await store.record_run(run_record("a", f"r{i:03}", outcome="unchanged", at=t0 + i))
    await store.record_run(run_record("b", "b0", outcome="unchanged"))
    newest = [r.run_id for r in await store.runs("a", limit=3)]
    assert newest == [f"r{RUNS_KEPT + 4:03}", f"r{RUNS_KEPT + 3:03}", f"r{RUNS_KEPT + 2:03}"]
    assert len(await store.runs("a")) == 20
    kept = await store.runs("a", limit=RUNS_KEPT * 2)
    assert len(kept) == RUNS_KEPT and kept[-1].run_id == "r005"
    history = await store.all_runs("a")
    assert [r.run_id for r in history] == [f"r{i:03}" for i in range(5, RUNS_KEPT + 5)]
    assert history[0].sync_type == "delta_sync" and history[0].finished_at == t0 + 5
    assert [r.run_id for r in await store.runs("b")] == ["b0"]
    assert await store.runs("nobody") == []


# -- delivery claims -----------------------------------------------------------------------------


async def test_claim_due_hands_out_only_the_head_event_of_each_record(store):
    await commit(store, "a", upserts={"R": b"1", "S": b"1"},
                 events=[event("a", "R", 1), event("a", "R", 2), event("a", "S", 1), event("a", "S", 2),
                         event("a", "R", 3)])
    now = time.time() + 1
    first = await store.claim_due(now, 10)
    assert ids(first) == ["evt_a_R_1", "evt_a_S_1"]
    by_id = {e.event_id: e for e in first}
    assert by_id["evt_a_R_1"].record_id == "R" and by_id["evt_a_R_1"].attempts == 0
    assert orjson.loads(by_id["evt_a_R_1"].body)["n"] == 1
    assert all(store.claim_valid(e) for e in first)
    # Never the same event twice while claimed, and never a record's later event meanwhile.
    assert await store.claim_due(now, 10) == []

    # R's head delivered: R's second event is next. S's head dead-lettered: S's second event is next.
    await store.record_attempts([by_id["evt_a_R_1"].seq], [], [(10, now, 500, "boom", by_id["evt_a_S_1"].seq)])
    second = await store.claim_due(now, 10)
    assert ids(second) == ["evt_a_R_2", "evt_a_S_2"]
    assert await store.claim_due(now, 10) == []

    # A retried head keeps its record's later events waiting until it is settled.
    r2, s2 = second
    await store.record_attempts([s2.seq], [(1, now + 60, 503, "busy", r2.seq)], [])
    assert await store.claim_due(now, 10) == []
    # Only heads count for when to look again: R's third event (due since it was queued) waits behind.
    assert await store.next_due() == now + 60
    retried = await store.claim_due(now + 61, 10)
    assert ids(retried) == ["evt_a_R_2"] and retried[0].attempts == 1
    await store.record_attempts([retried[0].seq], [], [])
    assert ids(await store.claim_due(now + 61, 10)) == ["evt_a_R_3"]


async def test_claim_due_respects_limit_sync_and_due_time(store):
    await commit(store, "a", upserts={}, events=[event("a", f"r{i}", 1) for i in range(5)])
    await commit(store, "b", upserts={}, events=[event("b", f"r{i}", 1) for i in range(2)])
    now = time.time() + 1
    two = await store.claim_due(now, 2)
    assert ids(two) == ["evt_a_r0_1", "evt_a_r1_1"]  # oldest first
    only_b = await store.claim_due(now, 10, sync_id="b")
    assert ids(only_b) == ["evt_b_r0_1", "evt_b_r1_1"]
    assert await store.claim_due(now, 10, sync_id="b") == []
    # Put the next of a's events off: it is not due before its time.
    rest = await store.claim_due(now, 1, sync_id="a")
    assert ids(rest) == ["evt_a_r2_1"]
    await store.record_attempts([], [(1, now + 30, None, "timeout", rest[0].seq)], [])
    assert ids(await store.claim_due(now, 10)) == ["evt_a_r3_1", "evt_a_r4_1"]
    assert await store.claim_due(now, 10) == []
    assert ids(await store.claim_due(now + 31, 10)) == ["evt_a_r2_1"]


async def test_release_makes_claimed_events_claimable_again(store):
    await commit(store, "a", upserts={}, events=[event("a", "R", 1), event("a", "R", 2), event("a", "S", 1)])
    now = time.time() + 1
    claimed = await store.claim_due(now, 10)
    assert ids(claimed) == ["evt_a_R_1", "evt_a_S_1"]
    await store.release(claimed[:1])
    again = await store.claim_due(now, 10)
    assert ids(again) == ["evt_a_R_1"] and again[0].seq == claimed[0].seq
    await store.release([*again, claimed[1]])
    assert ids(await store.claim_due(now, 10)) == ["evt_a_R_1", "evt_a_S_1"]
    # The outbox is untouched by claims: both of R's events and S's are still pending, unattempted.
    assert [(d.event_id, d.attempts, d.state) for d in await store.deliveries()] == \
        [("evt_a_R_1", 0, "pending"), ("evt_a_R_2", 0, "pending"), ("evt_a_S_1", 0, "pending")]


async def test_record_attempts_and_outbox_stats(store):
    t0 = time.time()
    await commit(store, "a", upserts={}, events=[event("a", f"r{i}", 1, at=t0 + i) for i in range(4)])
    await commit(store, "b", upserts={}, events=[event("b", "r0", 1, at=t0 - 5)])
    stats = await store.outbox_stats()
    assert (stats["a"].pending, stats["a"].dead, stats["a"].oldest_pending_created_at) == (4, 0, t0)
    assert (stats["b"].pending, stats["b"].dead) == (1, 0)

    now = t0 + 10
    c = {e.event_id: e for e in await store.claim_due(now, 10, sync_id="a")}
    await store.record_attempts([c["evt_a_r0_1"].seq],
                                [(1, now + 5, 503, "HTTP 503", c["evt_a_r1_1"].seq)],
                                [(10, now, 410, "HTTP 410 Gone", c["evt_a_r2_1"].seq)])
    stats = await store.outbox_stats()
    assert (stats["a"].pending, stats["a"].dead, stats["a"].oldest_pending_created_at) == (2, 1, t0 + 1)
    rows = {d.event_id: d for d in await store.deliveries(sync_id="a")}
    assert "evt_a_r0_1" not in rows  # delivered events leave the outbox
    assert (rows["evt_a_r1_1"].attempts, rows["evt_a_r1_1"].next_attempt_at, rows["evt_a_r1_1"].last_status,
            rows["evt_a_r1_1"].last_error, rows["evt_a_r1_1"].state) == (1, now + 5, 503, "HTTP 503", "pending")
    dead = rows["evt_a_r2_1"]
    assert (dead.attempts, dead.dead_at, dead.last_status, dead.state) == (10, now, 410, "dead")
    assert rows["evt_a_r3_1"].state == "pending"
    # A dead letter is not claimable; the retried event is, at its time (after r3, due since it was queued).
    await store.release([c["evt_a_r3_1"]])
    assert ids(await store.claim_due(now + 100, 10, sync_id="a")) == ["evt_a_r3_1", "evt_a_r1_1"]


async def _settle(store, now: float, *, delivered=(), dead=()) -> None:
    """Claim everything due and settle the named events (the rest are released)."""
    claimed = {e.event_id: e for e in await store.claim_due(now, 100)}
    assert set(delivered) | set(dead) <= set(claimed), (delivered, dead, list(claimed))
    await store.record_attempts([claimed[i].seq for i in delivered], [],
                                [(3, now, 500, "boom", claimed[i].seq) for i in dead])
    await store.release([e for i, e in claimed.items() if i not in delivered and i not in dead])


async def test_dead_letters_superseded_and_replayed(store):
    await commit(store, "a", upserts={}, events=[
        event("a", "R", 1), event("a", "R", 2),  # R: 1 dead, then 2 delivered: 1 is superseded
        event("a", "S", 1), event("a", "S", 2),  # S: 1 dead, 2 still queued: 1 is superseded
        event("a", "T", 1),                      # T: 1 dead alone: replayable
        event("a", "U", 1), event("a", "U", 2),  # U: both dead: both replayable, in order
    ])
    await commit(store, "b", upserts={}, events=[event("b", "V", 1)])
    now = time.time() + 1
    await _settle(store, now, dead=["evt_a_R_1", "evt_a_S_1", "evt_a_T_1", "evt_a_U_1"])
    await _settle(store, now, delivered=["evt_a_R_2"], dead=["evt_a_U_2"])

    rows = {d.event_id: d for d in await store.deliveries()}
    assert {i: d.state for i, d in rows.items()} == {
        "evt_a_R_1": "superseded", "evt_a_S_1": "superseded", "evt_a_S_2": "pending", "evt_a_T_1": "dead",
        "evt_a_U_1": "dead", "evt_a_U_2": "dead", "evt_b_V_1": "pending"}
    assert [d.event_id for d in await store.deliveries(dead_only=True)] == \
        ["evt_a_R_1", "evt_a_S_1", "evt_a_T_1", "evt_a_U_1", "evt_a_U_2"]
    assert [d.event_id for d in await store.deliveries(sync_id="b")] == ["evt_b_V_1"]
    assert len(await store.deliveries(limit=2)) == 2
    assert (await store.outbox_stats())["a"].dead == 5

    store.outbox_changed.clear()
    assert await store.replay(now=now + 1, sync_id="b") == (0, 0)
    assert await store.replay(now=now + 1) == (3, 2)
    assert store.outbox_changed.is_set()
    rows = {d.event_id: d for d in await store.deliveries()}
    assert {i: d.state for i, d in rows.items()} == {
        "evt_a_R_1": "superseded", "evt_a_S_1": "superseded", "evt_a_S_2": "pending", "evt_a_T_1": "pending",
        "evt_a_U_1": "pending", "evt_a_U_2": "pending", "evt_b_V_1": "pending"}
    assert (rows["evt_a_T_1"].attempts, rows["evt_a_T_1"].last_status, rows["evt_a_T_1"].next_attempt_at) == \
        (0, None, now + 1)
    # Replayed events are due at `now + 1`, in their original order (U's second waits for its first).
    assert ids(await store.claim_due(now, 100)) == ["evt_a_S_2", "evt_b_V_1"]
    assert ids(await store.claim_due(now + 1, 100)) == ["evt_a_T_1", "evt_a_U_1"]
    # A superseded dead letter is never replayed, even by id.
    assert await store.replay(now=now + 2, event_id="evt_a_R_1") == (0, 1)


async def test_purge_dead(store):
    await commit(store, "a", upserts={}, events=[event("a", "R", 1), event("a", "S", 1)])
    await commit(store, "b", upserts={}, events=[event("b", "R", 1)])
    now = time.time()
    await _settle(store, now, dead=["evt_a_R_1", "evt_b_R_1"])
    assert await store.purge_dead(before=now - 1) == 0
    assert await store.purge_dead(before=now + 1, sync_id="b") == 1
    assert [d.event_id for d in await store.deliveries()] == ["evt_a_R_1", "evt_a_S_1"]
    assert await store.purge_dead(before=now + 1) == 1
    assert [d.event_id for d in await store.deliveries()] == ["evt_a_S_1"]  # pending events are never purged
    stats = await store.outbox_stats()
    assert (stats["a"].pending, stats["a"].dead) == (1, 0) and "b" not in stats


async def test_consumed_runs_are_announced_once(store):
    run_events = [event("a", r, 1, run_id="run_X") for r in ("R", "S", "T")]
    c = Commit(run_record("a", "run_X"), "shape", b"h", upserts={"R": b"1", "S": b"1", "T": b"1"}, record_count=3,
               events=[*run_events, event("a", "U", 1)], expected_generation=0, tally=(URL, "delta_sync"))
    await store.commit_run(c)
    now = time.time() + 1
    assert await store.consumed_runs() == []
    await _settle(store, now, delivered=["evt_a_R_1", "evt_a_U_1"], dead=["evt_a_S_1"])
    assert await store.consumed_runs() == []  # T is still pending
    await _settle(store, now, delivered=["evt_a_T_1"])
    assert await store.consumed_runs() == [ConsumedRun("run_X", "a", "delta_sync", URL, 2, 1)]
    # Purged dead letters still count as dead letters of a run not announced yet.
    assert await store.purge_dead(before=now + 1) == 1
    assert await store.consumed_runs() == [ConsumedRun("run_X", "a", "delta_sync", URL, 2, 1)]

    body = orjson.dumps({"eventType": "sync.events.allConsumed", "syncRunId": "run_X"})
    note = OutboxEvent("evt_all_X", "a", "__sync__", "sync.events.allConsumed", URL, now, body)
    store.outbox_changed.clear()
    await store.announce_consumed([note], ["run_X"], now)
    assert store.outbox_changed.is_set()
    assert await store.consumed_runs() == []
    assert ids(await store.outbox("a")) == ["evt_all_X"]
    # Announcing again (another instance, a crash between) queues nothing new.
    await store.announce_consumed([], ["run_X"], now)
    assert ids(await store.outbox("a")) == ["evt_all_X"]


async def test_a_run_without_a_tally_is_never_announced(store):
    await commit(store, "a", upserts={}, events=[event("a", "R", 1, run_id="r1")])
    await _settle(store, time.time() + 1, delivered=["evt_a_R_1"])
    assert await store.consumed_runs() == []


# -- a run's record events, stored as parts ------------------------------------------------------


def run_events(sync_id: str, count: int, *, run_id: str | None = None, prefix: str = "r") -> RunEvents:
    """`count` record events of one run, of all three types, with awkward ids and data."""
    types = ["record.new", "record.modified", "record.deleted"]
    odd = ['é"\\', "\u2028", "x y", "🙂", "1e3", "{}"]
    events = RunEvents(sync_id, URL, 1_790_000_000.125, "delta_sync", "run_parts", run_id,
                       new_ids("evt", count), [f"{prefix}{i}{odd[i % len(odd)]}" for i in range(count)],
                       [types[i % 3] for i in range(count)])
    events.data = [b"null" if i % 3 == 2 else b'{"id":%d,"amount":1.00000000000000000002,"s":"\\u00e9\\""}' % i
                   for i in range(count)]
    return events


@pytest.mark.parametrize("count", [3, 700])  # row by row, and one statement of packed parameters
async def test_run_events_come_back_as_their_envelopes_in_order(store, other, count):
    events = run_events("a", count, run_id="run_parts")
    expected = events.envelopes()
    assert orjson.loads(expected[0])["eventData"]["id"] == 0 and b"1.00000000000000000002" in expected[0]
    upserts = {f"k{i}": i.to_bytes(16, "big") for i in range(count)}
    c = Commit(run_record("a", "run_parts"), "shape", b"h", upserts=upserts, record_count=count, run_events=events,
               events=[event("a", "L", 1, kind="sync.events.processed")], expected_generation=0, replace_all=True,
               tally=(URL, "delta_sync"))
    await store.commit_run(c)
    assert await other.fingerprints(await other.sync_state("a")) == upserts
    assert [e.envelope() for e in await other.outbox("a")] == [*expected, c.events[0].body]
    claimed = []
    while batch := await other.claim_due(time.time() + 1, 500):
        claimed += batch
        await other.record_attempts([e.seq for e in batch], [], [])
    assert [e.body for e in claimed] == [*expected, c.events[0].body]
    assert [e.seq for e in claimed] == sorted(e.seq for e in claimed)
    assert [(e.event_id, e.record_id, e.event_type) for e in claimed[:-1]] == list(
        zip(events.event_ids, events.record_ids, events.types, strict=True))
    assert await other.events_since(0) == {"a": events.counts()}
    assert [(r.delivered, r.dead) for r in await other.consumed_runs()] == [(count, 0)]


async def test_a_large_runs_events_take_seqs_in_order_past_every_seq_used(store):
    # Delivered events leave the outbox; their seqs are never given again, and a packed run's
    # events are numbered in the run's order, whatever order the database inserts them in.
    async def queued() -> list:
        claimed = await store.claim_due(time.time() + 1, 1000)
        await store.release(claimed)
        return sorted(claimed, key=lambda e: e.seq)

    await commit(store, "a", upserts={}, events=[event("a", f"R{i}", 1) for i in range(3)])
    used = [e.seq for e in await queued()]
    await _settle(store, time.time() + 1, delivered=[f"evt_a_R{i}_1" for i in range(3)])
    assert await store.outbox("a") == []
    events = run_events("a", 700)
    state = await store.sync_state("a")
    await store.commit_run(Commit(run_record("a", "r1"), "shape", b"h", run_events=events,
                                  events=[event("a", "L", 1, kind="sync.events.processed")],
                                  expected_generation=state.generation))
    stored = await queued()
    assert [e.event_id for e in stored] == [*events.event_ids, "evt_a_L_1"]
    seqs = [e.seq for e in stored]
    assert len(set(seqs)) == 701 and seqs[0] > max(used)
    await commit(store, "a", upserts={}, events=[event("a", "R0", 2)])
    assert max(e.seq for e in await queued()) > seqs[-1]


async def test_packed_inserts_are_split_into_statements_of_bounded_size(tmp_path, monkeypatch):
    # SQLite refuses one value over 1e9 bytes: a large run goes in as several packed statements.
    from syncd.store import sqlite

    monkeypatch.setattr(sqlite, "_PACK_BYTES", 1_000)
    monkeypatch.setattr(sqlite, "_PACK_ROWS", 100)
    events = run_events("a", 700)
    upserts = {f"k{i}": i.to_bytes(16, "big") for i in range(700)}
    packed = await sqlite._packed_events(events)
    assert len(packed) > 10 and sum(len(orjson.loads(part[0])) for part in packed) == 700
    assert all(len(part[4]) <= 1_000 for part in packed)
    async with await sqlite.SqliteStore.open(tmp_path / "s.db") as store:
        await store.commit_run(Commit(run_record("a", "r1"), "shape", b"h", upserts=upserts, record_count=700,
                                      run_events=events, expected_generation=0, replace_all=True))
        assert [e.envelope() for e in await store.outbox("a")] == events.envelopes()
        assert await store.fingerprints(await store.sync_state("a")) == upserts


async def test_run_events_that_cannot_be_packed_are_stored_row_by_row(store):
    events = run_events("a", 300)
    events.changed_fields = [None] * 300
    events.changed_fields[1] = b'["$.amount"]'
    await store.commit_run(Commit(run_record("a", "r1"), "shape", b"h", run_events=events, expected_generation=0))
    stored = await store.outbox("a")
    assert [e.envelope() for e in stored] == events.envelopes()
    assert orjson.loads(stored[1].envelope())["changedFields"] == ["$.amount"]


# -- operators -----------------------------------------------------------------------------------


async def test_reset_bumps_the_generation_and_forgets_fingerprints(store, other):
    await commit(store, "a", upserts={"1": b"f1"}, events=[event("a", "1", 1)], validators={"etag": "e"})
    await commit(store, "b", upserts={"1": b"f1"})
    before = await store.sync_state("a")
    assert await store.fingerprints(before) == {"1": b"f1"}  # cached in `store`
    assert await other.reset("a") is True
    assert await other.reset("nobody") is False
    for s in (store, other):
        state = await s.sync_state("a")
        assert state.generation == before.generation + 1
        assert not state.baselined and state.record_count == 0 and state.validators is None and state.shape is None
        assert await s.fingerprints(state) == {}
        assert ids(await s.outbox("a")) == ["evt_a_1_1"]  # the outbox is kept
        assert await s.fingerprints(await s.sync_state("b")) == {"1": b"f1"}
    # A run computed before the reset must not commit.
    with pytest.raises(StateConflict):
        await commit(store, "a", upserts={"2": b"f2"}, generation=before.generation)
    await commit(store, "a", upserts={"2": b"f2"})
    assert await other.fingerprints(await other.sync_state("a")) == {"2": b"f2"}


async def test_paused(store, other):
    assert await store.paused() == set()
    await store.set_paused("a", True)
    await store.set_paused("b", True)
    await store.set_paused("b", True)
    await store.set_paused("c", False)
    assert await other.paused() == {"a", "b"}
    await other.set_paused("a", False)
    assert await store.paused() == {"b"}


async def test_events_since_counts_record_events_per_hour(store):
    now = time.time()
    await commit(store, "a", upserts={"1": b"1", "2": b"2"}, events=[
        event("a", "1", 1, kind="record.new"), event("a", "2", 1, kind="record.new"),
        event("a", "3", 1, kind="record.deleted")])
    await commit(store, "a", upserts={"1": b"x"}, events=[event("a", "1", 2)])
    await commit(store, "b", upserts={}, events=[event("b", "L", 1, kind="sync.events.processed")])
    assert await store.events_since(now - 3600) == {"a": (2, 1, 1)}
    assert await store.events_since(now + 7200) == {}


async def test_kept_record_bodies_round_trip(store, other):
    raw = {str(i): orjson.dumps({"id": i, "name": f"person {i}", "team": "ops"}) for i in range(5)}
    dictionary = body_dictionary(list(raw.values()))
    packed = {rid: compress_body(b, dictionary) for rid, b in raw.items()}
    await commit(store, "a", upserts={rid: b"fp" + rid.encode() for rid in raw}, bodies=packed, body_dict=dictionary)
    for s in (store, other):
        state = await s.sync_state("a")
        assert state.keeps_records and state.body_dict == dictionary
        assert await s.bodies(state, ["0", "3", "missing"]) == {"0": raw["0"], "3": raw["3"]}
        assert await s.bodies(state, []) == {}

    # A later run keeps the dictionary it does not repeat, and replaces a changed body.
    new3 = orjson.dumps({"id": 3, "name": "renamed", "team": "ops"})
    await commit(store, "a", upserts={"3": b"fp3b"}, bodies={"3": compress_body(new3, dictionary)})
    state = await other.sync_state("a")
    assert state.body_dict == dictionary
    assert await other.bodies(state, ["3", "4"]) == {"3": new3, "4": raw["4"]}

    # keep_records turned off: the bodies are forgotten.
    await commit(store, "a", upserts={}, drop_bodies=True)
    state = await other.sync_state("a")
    assert not state.keeps_records and state.body_dict is None
    assert await other.bodies(state, list(raw)) == {}
    assert await other.fingerprints(state) == {"0": b"fp0", "1": b"fp1", "2": b"fp2", "3": b"fp3b", "4": b"fp4"}


async def test_outbox_changed_is_set_by_a_commit_with_events(store):
    await commit(store, "a", upserts={"1": b"1"})
    store.outbox_changed.clear()
    await commit(store, "a", upserts={"2": b"2"})
    await store.record_run(run_record("a", "r_same", outcome="unchanged"))
    if type(store).__name__ == "SqliteStore":
        # PostgreSQL may set it any time a notification arrives (a wake-up too many is harmless).
        assert not store.outbox_changed.is_set()
    await commit(store, "a", upserts={"3": b"3"}, events=[event("a", "3", 1)])
    assert store.outbox_changed.is_set()
    store.outbox_changed.clear()
    await store.record_run(run_record("a", "r_life", outcome="unchanged"),
                           events=[event("a", "__sync__", 1, kind="sync.events.processed")])
    assert store.outbox_changed.is_set()


# -- PostgreSQL: several instances sharing one database -------------------------------------------


@pytest.fixture
async def pg(pg_url):
    """Open PostgresStore instances (each its own instance id) on the test's schema; all closed at the end."""
    from syncd.store.postgres import PostgresStore

    opened = []

    async def open_instance(name: str, lease_ttl: float = 30.0) -> PostgresStore:
        s = await PostgresStore.open(pg_url, instance_id=name, lease_ttl=lease_ttl, pool_size=3)
        opened.append(s)
        return s

    try:
        yield open_instance
    finally:
        for s in reversed(opened):
            await s.close()


async def _sql(url: str, query: str, *args):
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return await conn.execute(query, *args)
    finally:
        await conn.close()


WANTED = {f"s{i}" for i in range(5)}


async def test_lease_tick_shares_the_syncs_fairly(pg_url, pg):
    a = await pg("A")
    assert set(await a.lease_tick(WANTED)) == WANTED  # alone: everything
    b = await pg("B")
    assert await b.instances() == ["A", "B"]
    assert await b.lease_tick(WANTED) == {}  # nothing is free yet
    held_a = await a.lease_tick(WANTED)  # two live instances: A keeps ceil(5/2) = 3, gives back 2
    assert len(held_a) == 3
    held_b = await b.lease_tick(WANTED)
    assert len(held_b) == 2 and set(held_a).isdisjoint(held_b) and set(held_a) | set(held_b) == WANTED
    owners = await a.lease_owners()
    assert owners == {**{s: "A" for s in held_a}, **{s: "B" for s in held_b}}
    # Renewal keeps the leases and their tokens.
    assert await a.lease_tick(WANTED) == held_a and await b.lease_tick(WANTED) == held_b
    # A sync nobody wants any more is given back.
    gone = sorted(held_a)[0]
    assert set(await a.lease_tick(WANTED - {gone})) == set(held_a) - {gone}
    assert gone not in await b.lease_owners()


async def test_a_busy_sync_is_kept_but_the_fair_share_still_holds(pg_url, pg):
    a = await pg("A")
    await a.lease_tick(WANTED)
    await pg("B")
    busy = {"s4"}  # a run of s4 is under way on A: A gives back others first
    held = await a.lease_tick(WANTED, busy)
    assert "s4" in held and len(held) == 3, held


async def test_one_instance_holds_a_sync_and_closing_gives_leases_back(pg_url, pg):
    a = await pg("A")
    b = await pg("B")
    held_a = await a.lease_tick({"only"})
    assert list(held_a) == ["only"]
    assert await b.lease_tick({"only"}) == {}  # its share is 1, but A holds it
    assert await b.lease_tick({"only"}) == {}
    assert await b.lease_owners() == {"only": "A"}
    await a.close()
    assert await b.instances() == ["B"]
    held_b = await b.lease_tick({"only"})  # at once, not after lease_ttl
    assert list(held_b) == ["only"] and held_b["only"] > held_a["only"]  # a new fencing token


async def test_a_commit_without_the_lease_raises_lease_lost(pg_url, pg):
    a = await pg("A", lease_ttl=2.0)
    b = await pg("B", lease_ttl=2.0)
    a.start_leasing()
    b.start_leasing()
    with pytest.raises(LeaseLost):  # never took it
        await commit(a, "s", upserts={"1": b"1"})
    old_token = (await a.lease_tick({"s"}))["s"]
    await commit(a, "s", upserts={"1": b"1"})
    with pytest.raises(LeaseLost, match="held by A"):  # B is not the owner
        await commit(b, "s", upserts={"2": b"2"}, events=[event("s", "2", 1)])

    # A stops renewing (paused): the lease expires on the database's clock, and A cannot commit.
    async def expired():
        return "s" not in await b.lease_owners()
    await until(expired, timeout=6)
    with pytest.raises(LeaseLost):
        await commit(a, "s", upserts={"3": b"3"}, events=[event("s", "3", 1)])
    # B takes it; A, resuming with its old token, still cannot commit, even after B's run.
    assert "s" in await b.lease_tick({"s"})
    await commit(b, "s", upserts={"4": b"4"})
    a.tokens["s"] = old_token  # as if A never noticed the expiry
    with pytest.raises(LeaseLost, match="held by B"):
        await commit(a, "s", upserts={"5": b"5"}, events=[event("s", "5", 1)])
    with pytest.raises(LeaseLost):
        await a.record_run(run_record("s", "late", outcome="failed", error="x"))
    state = await b.sync_state("s")
    assert state.generation == 2 and await b.fingerprints(state) == {"1": b"1", "4": b"4"}
    assert await b.outbox() == [] and [r.outcome for r in await b.runs("s")] == ["changed", "changed"]


async def test_claims_across_instances_keep_per_record_order(pg_url, pg):
    a = await pg("A")
    b = await pg("B")
    await commit(a, "x", upserts={}, events=[event("x", "R", 1), event("x", "R", 2), event("x", "S", 1),
                                             event("x", "R", 3)])
    now = time.time() + 1
    got_a = await a.claim_due(now, 1)
    assert ids(got_a) == ["evt_x_R_1"]
    assert ids(await b.claim_due(now, 10)) == ["evt_x_S_1"]  # not R's later events
    assert await a.claim_due(now, 10) == [] and await b.claim_due(now, 10) == []
    await a.record_attempts([got_a[0].seq], [], [])
    got_b = await b.claim_due(now, 10)
    assert ids(got_b) == ["evt_x_R_2"]
    assert await a.claim_due(now, 10) == []
    # Settling is the claimant's: A cannot settle the event B holds.
    await a.record_attempts([got_b[0].seq], [], [])
    assert "evt_x_R_2" in ids(await a.outbox())
    await b.record_attempts([], [], [(5, now, 500, "boom", got_b[0].seq)])  # dead: R's next is free
    assert ids(await a.claim_due(now, 10)) == ["evt_x_R_3"]


async def test_a_dead_instance_claims_pass_to_the_others(pg_url, pg):
    a = await pg("A")
    b = await pg("B")
    await commit(a, "x", upserts={}, events=[event("x", "R", 1), event("x", "R", 2)])
    now = time.time() + 1
    got_a = await a.claim_due(now, 10)
    assert ids(got_a) == ["evt_x_R_1"] and await b.claim_due(now, 10) == []
    # A is killed: its heartbeat row expires (as it would lease_ttl after a kill -9).
    await _sql(pg_url, "UPDATE instances SET expires_at = 0 WHERE instance_id = 'A'")
    assert await b.instances() == ["B"]
    got_b = await b.claim_due(now, 10)
    assert ids(got_b) == ["evt_x_R_1"] and got_b[0].seq == got_a[0].seq
    # A's late outcome for the event it lost is not written; B's is.
    await a.record_attempts([got_a[0].seq], [], [])
    assert ids(await b.outbox()) == ["evt_x_R_1", "evt_x_R_2"]
    await b.record_attempts([got_b[0].seq], [], [])
    assert ids(await b.claim_due(now, 10)) == ["evt_x_R_2"]


async def test_notify_wakes_the_other_instance(pg_url, pg):
    a = await pg("A")
    # B starts listening with its first heartbeat renewal (a third of lease_ttl after it opened),
    # and then wakes up once by itself (events may have come while it did not listen).
    b = await pg("B", lease_ttl=1.5)
    await asyncio.wait_for(b.outbox_changed.wait(), 5)
    b.outbox_changed.clear()
    await commit(a, "x", upserts={"2": b"2"}, events=[event("x", "2", 1)])
    await asyncio.wait_for(b.outbox_changed.wait(), 5)
    assert ids(await b.claim_due(time.time() + 1, 10)) == ["evt_x_2_1"]


async def test_a_newer_schema_is_refused(pg_url, pg):
    from syncd.store.postgres import PostgresStore

    await (await pg("A")).close()
    await _sql(pg_url, "UPDATE syncd_meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(SchemaError, match="newer syncd") as caught:
        await PostgresStore.open(pg_url, instance_id="B")
    assert caught.value.kind == "schema"
    with pytest.raises(SchemaError):
        await open_store(state_path=None, state_url=pg_url, readonly=True)
