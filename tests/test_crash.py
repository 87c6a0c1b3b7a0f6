"""Crash safety: SIGKILL `syncd once` at random moments; fingerprints never get ahead of the outbox.

Acceptance requirement: a crash between fetch and commit never leaves fingerprints updated without
their outbox events. The test kills real `syncd once` processes many times while a local API serves
a few thousand records that change between runs, and after every run checks on the SQLite file
itself that replaying the sync's outbox in `seq` order rebuilds exactly its `records` table.

The processes are forked by a fork server (conftest.ForkServer) that has imported syncd already,
and run the CLI's `main(["once", ...])` exactly as `python -m syncd once` does. They reach the API
after ~30 ms instead of ~350 ms of interpreter start-up and imports: the whole test takes a third of
the time, and "spawn" kills land in what start-up does with the state rather than mostly in
imports, which touch nothing.

Kills are aimed at four moments, chosen with a seeded random.Random:
  * "spawn":   a random delay after the process starts (mostly start-up: settings, definitions,
               opening or creating the database, reading the state);
  * "request": a random delay after the API received the request (fetch, parse, diff, commit);
  * "commit":  a random (short) delay after the process took SQLite's WAL write lock once the
               request was served, i.e. inside the commit transaction (Linux: seen in /proc/locks);
  * "none":    the run is left to finish.
Each run is then classified by what was observed at the moment of the kill (see `Run.phase`).

The test runs once per state backend (conftest `backend`). Against PostgreSQL (`--state-url`, a
schema of its own) the state is read with asyncpg in one REPEATABLE READ snapshot, and "inside the
commit transaction" means that the process's database session (found by its application_name) has
a transaction that has written something (pg_stat_activity.backend_xid is set).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from syncd.diff import DELETED, MODIFIED, NEW, fingerprint

from conftest import ForkServer, _drop_schema, _pg_schema, outbox_body, send_signal, write_sync

SYNC_ID = "crash"
SEED = 20240611
RECORDS = 4000
ITERATIONS = 26  # per backend
STRATEGIES = ["spawn"] * 5 + ["request"] * 9 + ["commit"] * 8 + ["none"] * 4  # sums to ITERATIONS
RUN_TIMEOUT = 30.0
POLL_INTERVAL = 0.0005
LOCKS = Path("/proc/locks")
# SQLite's unix VFS takes the WAL write lock as an fcntl lock on byte 120 of the -shm file.
WAL_WRITE_LOCK_BYTE = "120"


# -- the data the upstream serves -------------------------------------------------------------

class Dataset:
    """The records the API currently serves (the truth), mutated randomly between runs."""

    DEPTS = ["eng", "ops", "sales", "hr", "légal", "財務"]

    def __init__(self, rng: random.Random, size: int) -> None:
        self.rng = rng
        self.next_id = 0
        self.records: list[dict[str, Any]] = [self._new() for _ in range(size)]
        self.noise: list[Any] = []  # served but not part of the truth: id-less and duplicate records

    def _new(self) -> dict[str, Any]:
        n = self.next_id
        self.next_id += 1
        rid: int | str = n if n % 5 else f"e-{n}"  # numeric and string ids ("e-" never collides with a number)
        return {"employee": {
            "id": rid,
            "name": f"person {n} {self.rng.random():.6f}",
            "dept": self.rng.choice(self.DEPTS),
            "salary": self.rng.randint(100_000, 9_999_999) / 100,
            "active": self.rng.random() < 0.9,
            "manager": None if self.rng.random() < 0.3 else self.rng.randrange(max(n, 1)),
            "tags": [self.rng.choice("abcdefgh") for _ in range(self.rng.randint(0, 4))],
            "address": {"city": self.rng.choice(["Paris", "Berlin", "Zürich", "Lisboa"]), "zip": f"{self.rng.randint(0, 99999):05d}"},
        }}

    def _modify(self, record: dict[str, Any]) -> None:
        emp = record["employee"]
        kind = self.rng.randrange(6)
        if kind == 0:
            emp["name"] += "!"
        elif kind == 1:
            emp["salary"] = round(emp["salary"] + self.rng.randint(1, 5000) / 100, 2)
        elif kind == 2:
            emp["address"]["zip"] = f"{(int(emp['address']['zip']) + 1) % 100000:05d}"
        elif kind == 3:
            emp["tags"] = emp["tags"] + [self.rng.choice("xyz")]
        elif kind == 4:
            emp["active"] = not emp["active"]
        elif "extra" in emp:
            del emp["extra"]
        else:
            emp["extra"] = {"n": self.rng.randint(0, 9)}

    def mutate(self) -> str:
        """Add, modify and remove a random number of records; sometimes reorder, sometimes add noise."""
        rng = self.rng
        scale = rng.choice([0, 1, 10, 100, 400, 1500])
        deletes = min(rng.randint(0, scale), len(self.records) // 3)
        for _ in range(deletes):
            self.records.pop(rng.randrange(len(self.records)))
        modifies = rng.randint(0, scale)
        for index in rng.sample(range(len(self.records)), min(modifies, len(self.records))):
            self._modify(self.records[index])
        adds = rng.randint(0, scale)
        for _ in range(adds):
            self.records.insert(rng.randrange(len(self.records) + 1), self._new())
        if rng.random() < 0.3:
            rng.shuffle(self.records)  # order never causes events
        self.noise = []
        if rng.random() < 0.15:
            # A record without a usable id holds back every delete of that run; a later duplicate of an
            # id is skipped (the first occurrence counts). Neither changes the truth.
            self.noise = [{"employee": {"name": "no id"}}, {"employee": {**rng.choice(self.records)["employee"], "name": "dup"}}]
        return f"-{deletes} ~{modifies} +{adds}{' noise' if self.noise else ''}"

    def body(self) -> bytes:
        return orjson.dumps({"response": {"payload": {"employees": self.records + self.noise}}, "meta": {"count": len(self.records)}})

    def expected(self) -> dict[str, bytes]:
        return {str(r["employee"]["id"]): fingerprint(r) for r in self.records}


# -- the state database, read from outside ----------------------------------------------------

@dataclass
class DbState:
    records: dict[str, bytes]
    outbox_rows: int
    last_run_seq: int
    tail_bodies: list[bytes]  # bodies of the outbox, in seq order (checked against printed events)


def _table_names(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@dataclass
class _Replay:
    rows: list[tuple]
    replayed: dict[str, bytes]
    per_run: dict[str, Counter]


#: The last replay of each database's outbox. The outbox only grows (`once` never delivers): a check
#: whose rows start with exactly the rows replayed last time continues that replay with the new rows
#: instead of replaying everything again - the same result (the replay is a function of the rows,
#: compared whole), without redoing ~20k rows in each of ~40 checks.
_REPLAYS: dict[Any, _Replay] = {}


def replay_outbox(key: Any, rows: list[tuple], context: str) -> tuple[dict[str, bytes], dict[str, Counter]]:
    """Replay the outbox `rows` (seq order) of the database `key`: the fingerprints they rebuild
    and the events per run."""
    last = _REPLAYS.get(key)
    if last is not None and len(rows) >= len(last.rows) and rows[:len(last.rows)] == last.rows:
        start, replayed, per_run = len(last.rows), dict(last.replayed), {k: Counter(v) for k, v in last.per_run.items()}
    else:
        start, replayed, per_run = 0, {}, {}
    for seq, event_id, record_id, event_type, body in rows[start:]:
        event = orjson.loads(body)
        where = f"{context}: outbox seq {seq} ({event_type} {record_id})"
        assert event["eventId"] == event_id and event["eventType"] == event_type and event["recordId"] == record_id, \
            f"{where}: columns disagree with the body {event}"
        assert event["syncJobId"] == SYNC_ID, where
        per_run.setdefault(event["syncRunId"], Counter())[event_type] += 1
        if event_type == NEW:
            assert record_id not in replayed, f"{where}: record.new for a record the outbox already created"
            replayed[record_id] = fingerprint(event["eventData"])
        elif event_type == MODIFIED:
            assert record_id in replayed, f"{where}: record.modified for a record the outbox never created"
            new_fp = fingerprint(event["eventData"])
            assert new_fp != replayed[record_id], f"{where}: record.modified that changes nothing"
            replayed[record_id] = new_fp
        elif event_type == DELETED:
            assert record_id in replayed, f"{where}: record.deleted for a record the outbox never created"
            assert event["eventData"] is None, where
            del replayed[record_id]
        else:
            pytest.fail(f"{where}: unknown event type")
    _REPLAYS[key] = _Replay(rows, dict(replayed), {k: Counter(v) for k, v in per_run.items()})
    return replayed, per_run


class SqliteState:
    """The SQLite state database of the runs, read from outside."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.key: Any = path  # of its outbox replay (_REPLAYS)

    def args(self) -> list[str]:
        return ["--state-path", str(self.path)]

    async def close(self) -> None:
        pass

    async def in_commit(self, pid: int) -> bool | None:
        """Whether `pid` is inside its commit transaction now (None: cannot tell)."""
        return write_lock_holder(pid, self.path)

    async def read(self, context: str) -> tuple | None:
        return _read_sqlite(self.path, context)


class PgState:
    """The PostgreSQL state of the runs (a schema of its own), read from outside."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.key = url
        self.conn = None
        self.app = "crash_" + url.rsplit("search_path=", 1)[1]  # this test's own
        self._lock = asyncio.Lock()  # one query at a time on the connection

    def args(self) -> list[str]:
        # application_name: the syncd process's sessions, as pg_stat_activity shows them.
        return ["--state-path", "/nonexistent/unused.db", "--state-url", f"{self.url}&application_name={self.app}"]

    async def _conn(self):
        import asyncpg

        if self.conn is None:
            self.conn = await asyncpg.connect(self.url, timeout=10)
        return self.conn

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()

    async def in_commit(self, pid: int) -> bool | None:
        # Only one syncd process runs at a time: its session with a transaction that wrote something.
        async with self._lock:
            conn = await self._conn()
            return bool(await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND backend_xid IS NOT NULL", self.app))

    async def read(self, context: str) -> tuple | None:
        async with self._lock:
            return await self._read()

    async def _read(self) -> tuple | None:
        conn = await self._conn()
        async with conn.transaction(isolation="repeatable_read", readonly=True):  # one snapshot
            if not await conn.fetchval("SELECT to_regclass('outbox') IS NOT NULL"):
                return None
            stored = {r[0]: r[1] for r in await conn.fetch(
                "SELECT record_id, fingerprint FROM records WHERE sync_id = $1", SYNC_ID)}
            rows = [tuple(r) for r in await conn.fetch(
                "SELECT seq, event_id, record_id, event_type, body FROM outbox WHERE sync_id = $1 ORDER BY seq", SYNC_ID)]
            runs = [tuple(r) for r in await conn.fetch(
                "SELECT run_id, outcome, new, modified, deleted FROM runs WHERE sync_id = $1 ORDER BY seq", SYNC_ID)]
            last_run_seq = await conn.fetchval("SELECT COALESCE(MAX(seq), 0) FROM runs")
            sync_row = await conn.fetchrow("SELECT record_count, baselined FROM syncs WHERE sync_id = $1", SYNC_ID)
        return stored, rows, runs, last_run_seq, tuple(sync_row) if sync_row is not None else None


async def check_invariant(state: SqliteState | PgState, context: str) -> DbState:
    """Replaying the outbox of the sync must rebuild exactly its stored fingerprints."""
    read = await state.read(context)
    if read is None:
        return DbState({}, 0, 0, [])
    stored, rows, runs, last_run_seq, sync_row = read

    replayed, per_run = replay_outbox(state.key, rows, context)

    if replayed != stored:
        only_stored = sorted(set(stored) - set(replayed))
        only_replayed = sorted(set(replayed) - set(stored))
        differ = sorted(k for k in set(stored) & set(replayed) if stored[k] != replayed[k])
        pytest.fail(
            f"{context}: INVARIANT BROKEN: stored fingerprints do not match the outbox replay "
            f"({len(stored)} stored, {len(replayed)} replayed from {len(rows)} events): "
            f"{len(only_stored)} stored without events (e.g. {only_stored[:5]}), "
            f"{len(only_replayed)} with events but not stored (e.g. {only_replayed[:5]}), "
            f"{len(differ)} with a different fingerprint (e.g. {differ[:5]})"
        )
    if sync_row is not None:
        assert sync_row[0] == len(stored), f"{context}: syncs.record_count {sync_row[0]} != {len(stored)} stored records"
    for run_id, outcome, new, modified, deleted in runs:
        counts = per_run.get(run_id, Counter())
        assert (counts[NEW], counts[MODIFIED], counts[DELETED]) == (new, modified, deleted), \
            f"{context}: run {run_id} ({outcome}) recorded {new}/{modified}/{deleted} new/modified/deleted, outbox has {dict(counts)}"
    return DbState(stored, len(rows), last_run_seq, [r[4] for r in rows])


def _read_sqlite(state_path: Path, context: str) -> tuple | None:
    if not state_path.exists():
        return None
    # Read-only: look at exactly what the crashed process left, without recovering or checkpointing it.
    db = sqlite3.connect(f"file:{state_path}?mode=ro", uri=True, isolation_level=None)
    try:
        integrity = db.execute("PRAGMA integrity_check").fetchall()
        assert integrity == [("ok",)], f"{context}: PRAGMA integrity_check failed: {integrity}"
        db.execute("BEGIN")  # one snapshot for every query below
        tables = _table_names(db)
        stored = dict(db.execute("SELECT record_id, fingerprint FROM records WHERE sync_id = ?", (SYNC_ID,))) \
            if "records" in tables else {}
        rows = [(seq, event_id, record_id, event_type, outbox_body(event_id, sync_id, record_id, event_type, *parts))
                for seq, event_id, sync_id, record_id, event_type, *parts in db.execute(
                    "SELECT seq, event_id, sync_id, record_id, event_type, created_at, body, sync_type, sync_run_id, "
                    "changed_fields FROM outbox WHERE sync_id = ? ORDER BY seq", (SYNC_ID,))] if "outbox" in tables else []
        runs = db.execute(
            "SELECT run_id, outcome, new, modified, deleted FROM runs WHERE sync_id = ? ORDER BY seq", (SYNC_ID,)
        ).fetchall() if "runs" in tables else []
        last_run_seq = (db.execute("SELECT COALESCE(MAX(seq), 0) FROM runs").fetchone()[0]) if "runs" in tables else 0
        sync_row = db.execute("SELECT record_count, baselined FROM syncs WHERE sync_id = ?", (SYNC_ID,)).fetchone() \
            if "syncs" in tables else None
        db.execute("COMMIT")
    finally:
        db.close()
    return stored, rows, runs, last_run_seq, sync_row


# -- watching and killing one `syncd once` ----------------------------------------------------

def write_lock_holder(pid: int, state_path: Path) -> bool | None:
    """Whether `pid` holds the WAL write lock of the state database right now (None: cannot tell)."""
    try:
        text = LOCKS.read_text()
        inode = str(os.stat(f"{state_path}-shm").st_ino)
    except FileNotFoundError:
        return False if LOCKS.exists() else None
    except OSError:
        return None
    for line in text.splitlines():
        # "7: POSIX  ADVISORY  WRITE 4374 fe:00:2147314 120 120" (waiters have "->" after the number)
        parts = line.split()
        if (len(parts) >= 8 and parts[1] == "POSIX" and parts[3] == "WRITE" and parts[4] == str(pid)
                and parts[5].rsplit(":", 1)[-1] == inode and parts[6] == parts[7] == WAL_WRITE_LOCK_BYTE):
            return True
    return False


@dataclass
class Run:
    strategy: str
    delay: float
    rc: int | None = None
    killed: bool = False
    t_request: float | None = None  # seconds after spawn
    t_lock: float | None = None  # first time the write lock was seen after the request
    t_unlock: float | None = None
    t_exit: float | None = None
    request_at_kill: bool = False
    lock_at_kill: bool | None = None
    committed: bool = False
    stdout: bytes = b""
    stderr: bytes = b""

    @property
    def phase(self) -> str:
        if not self.killed:
            return "finished"
        if self.committed:
            return "killed after commit"
        if self.lock_at_kill:
            return "killed inside the commit transaction"
        if self.request_at_kill:
            return "killed in fetch/parse/diff"
        return "killed in start-up (before fetch)"


async def run_syncd(forks: ForkServer, args: list[str], upstream, state: SqliteState | PgState, workdir: Path,
                    strategy: str, delay: float) -> Run:
    run = Run(strategy, delay)
    out_path, err_path = workdir / "stdout", workdir / "stderr"
    out_path.write_bytes(b"")
    err_path.write_bytes(b"")
    requests_before = len(upstream.requests)
    request_seen, lock_seen = asyncio.Event(), asyncio.Event()
    t0 = time.perf_counter()
    proc = await forks.spawn(*args, stdout=out_path, stderr=err_path)
    exited = asyncio.ensure_future(proc.wait())

    async def watch() -> None:
        # Timestamps of the request reaching the API and of the write lock, polled without blocking.
        while not exited.done():
            now = time.perf_counter() - t0
            if run.t_request is None and len(upstream.requests) > requests_before:
                run.t_request = now
                request_seen.set()
            if run.t_request is not None and run.t_unlock is None:
                held = await state.in_commit(proc.pid)
                if held and run.t_lock is None:
                    run.t_lock = now
                    lock_seen.set()
                elif not held and run.t_lock is not None:
                    run.t_unlock = now
            await asyncio.sleep(POLL_INTERVAL)

    watcher = asyncio.ensure_future(watch())

    async def until(event: asyncio.Event) -> None:
        waiter = asyncio.ensure_future(event.wait())
        await asyncio.wait({waiter, exited}, timeout=RUN_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()

    try:
        if strategy == "request":
            await until(request_seen)
        elif strategy == "commit":
            await until(lock_seen)
        if strategy != "none" and not exited.done():
            await asyncio.wait({exited}, timeout=delay)
        else:
            await asyncio.wait({exited}, timeout=RUN_TIMEOUT)
        if not exited.done():
            run.request_at_kill = len(upstream.requests) > requests_before
            run.lock_at_kill = await state.in_commit(proc.pid)
            # Not proc.send_signal(): on a process that exits on its own at this very moment it would
            # reap it behind asyncio's back, and its exit status would read 255 (see send_signal).
            run.killed = send_signal(proc, signal.SIGKILL)
        run.rc = await asyncio.wait_for(exited, RUN_TIMEOUT)
    finally:
        if send_signal(proc, signal.SIGKILL):
            await proc.wait()
        await watcher
    run.t_exit = time.perf_counter() - t0
    if run.killed and run.rc != -signal.SIGKILL:
        run.killed = False  # it had already exited when the signal arrived
    run.stdout, run.stderr = out_path.read_bytes(), err_path.read_bytes()
    return run


# -- the test ---------------------------------------------------------------------------------

@pytest.mark.timeout(150)
async def test_sigkill_at_random_points_never_leaves_fingerprints_without_events(upstream, conf_dir, backend, tmp_path,
                                                                                  fork_server):
    if "state_url" in backend:
        db, calib_db = PgState(backend["state_url"]), PgState(await _pg_schema())
    else:
        db, calib_db = SqliteState(backend["state_path"]), SqliteState(tmp_path / "calibration" / "state.db")
    try:
        await _sigkill_at_random_points(upstream, conf_dir, tmp_path, fork_server, db, calib_db)
    finally:
        await db.close()
        await calib_db.close()
        if isinstance(calib_db, PgState):
            await _drop_schema(calib_db.url)


async def _sigkill_at_random_points(upstream, conf_dir, tmp_path, fork_server, db: SqliteState | PgState,
                                    calib_db: SqliteState | PgState) -> None:
    _REPLAYS.clear()
    rng = random.Random(SEED)
    data = Dataset(rng, RECORDS)
    upstream.body = data.body()
    write_sync(conf_dir, SYNC_ID, upstream.url)
    args = ["once", SYNC_ID, "--config-dir", str(conf_dir), *db.args(), "--log-format", "json"]
    started = time.perf_counter()

    # Calibrate on a throw-away database: how long start-up, the post-request work and the commit take.
    calib_args = ["once", SYNC_ID, "--config-dir", str(conf_dir), *calib_db.args(), "--log-format", "json"]
    calib = await run_syncd(fork_server, calib_args, upstream, calib_db, tmp_path, "none", 0.0)
    assert calib.rc == 0, calib.stderr.decode()
    assert calib.t_request is not None
    startup = calib.t_request
    post_request = calib.t_exit - calib.t_request  # fetch + parse + diff + commit + print + exit
    commit_window = (calib.t_unlock - calib.t_lock) if calib.t_lock is not None and calib.t_unlock is not None else 0.02

    strategies = list(STRATEGIES)
    rng.shuffle(strategies)
    phases: Counter = Counter()
    previous = await check_invariant(db, "before the first run")
    for i, strategy in enumerate(strategies):
        change = "initial data" if i == 0 else data.mutate()
        upstream.body = data.body()
        if strategy == "spawn":
            delay = rng.uniform(0, startup * 1.2)  # mostly before the request (see the module docstring)
        elif strategy == "request":
            delay = rng.uniform(0, post_request)
        elif strategy == "commit":
            delay = rng.uniform(0, commit_window) if rng.random() < 0.8 else 0.0
        else:
            delay = 0.0
        run = await run_syncd(fork_server, args, upstream, db, tmp_path, strategy, delay)
        context = f"iteration {i} ({strategy}, delay {delay * 1000:.1f} ms, {change}, rc {run.rc})"
        if not run.killed:
            assert run.rc == 0, f"{context}: syncd once failed: {run.stderr.decode()[-2000:]}"
            if run.t_request is not None:  # keep the post-request estimate current (delta runs are quicker)
                post_request = 0.5 * post_request + 0.5 * (run.t_exit - run.t_request)
        if run.t_lock is not None and run.t_unlock is not None:
            commit_window = 0.5 * commit_window + 0.5 * (run.t_unlock - run.t_lock)
        if run.t_request is not None:  # the start-up estimate too (the first run creates the database)
            startup = 0.5 * startup + 0.5 * run.t_request

        state = await check_invariant(db, context)
        run.committed = state.last_run_seq > previous.last_run_seq
        if not run.killed:
            # A run that finished committed once and printed exactly the events it put in the outbox.
            assert run.committed, f"{context}: finished without recording its run"
            printed = run.stdout.splitlines()
            added = state.tail_bodies[previous.outbox_rows:]
            assert printed == added, f"{context}: printed {len(printed)} events but the outbox gained {len(added)}"
        else:
            assert state.outbox_rows >= previous.outbox_rows, f"{context}: outbox rows disappeared"
        phases[run.phase] += 1
        # Printed as it goes: pytest shows the history of the runs before a failure.
        print(f"{i:2d} {strategy:7s} {run.phase:38s} delay={delay * 1000:6.1f}ms "
              f"req={_ms(run.t_request)} lock={_ms(run.t_lock)} exit={_ms(run.t_exit)} "
              f"events={state.outbox_rows - previous.outbox_rows:5d} records={len(state.records)} {change}")
        previous = state

    # One last run to completion finds every change the killed runs missed, exactly once.
    before_final = previous
    data.noise = []  # the last iteration's data, without id-less or duplicate records
    upstream.body = data.body()
    final = await run_syncd(fork_server, args, upstream, db, tmp_path, "none", 0.0)
    assert final.rc == 0, f"final run failed: {final.stderr.decode()[-2000:]}"
    state = await check_invariant(db, "after the final run")
    expected = data.expected()
    events = [orjson.loads(line) for line in final.stdout.splitlines()]
    got = sorted((e["eventType"], e["recordId"]) for e in events)
    old = before_final.records
    want = sorted(
        [(NEW, rid) for rid in expected if rid not in old]
        + [(MODIFIED, rid) for rid in expected if rid in old and old[rid] != expected[rid]]
        + [(DELETED, rid) for rid in old if rid not in expected]
    )
    assert got == want, f"the final run sent {len(got)} events, expected the {len(want)} changes the stored state missed"
    assert state.records == expected, (
        f"after the final run the stored fingerprints differ from the API's data: "
        f"{len(set(expected) - set(state.records))} missing, {len(set(state.records) - set(expected))} extra, "
        f"{sum(1 for k in expected if k in state.records and state.records[k] != expected[k])} different"
    )
    again = await run_syncd(fork_server, args, upstream, db, tmp_path, "none", 0.0)
    assert again.rc == 0 and again.stdout == b"", "a second run over unchanged data must send nothing"
    await check_invariant(db, "after the check run")
    _REPLAYS.clear()

    elapsed = time.perf_counter() - started
    calib_lock = calib.t_unlock - calib.t_lock if calib.t_lock is not None and calib.t_unlock is not None else None
    summary = (f"crash test: {len(strategies)} runs in {elapsed:.1f}s (calibration: start-up {_ms(calib.t_request)}, "
               f"after the request {_ms(calib.t_exit - calib.t_request)}, write lock held {_ms(calib_lock)}); "
               + ", ".join(f"{k}: {v}" for k, v in sorted(phases.items())))
    print(summary)
    killed = sum(v for k, v in phases.items() if k != "finished")
    assert killed >= len(strategies) // 3, f"too few runs were actually killed to mean anything: {summary}"
    assert phases["finished"] >= 1, summary
    assert phases["killed in fetch/parse/diff"] + phases["killed inside the commit transaction"] >= 1, \
        f"no kill landed between fetch and commit: {summary}"
    assert phases["killed in start-up (before fetch)"] >= 1, f"no kill landed in start-up: {summary}"


def _ms(value: float | None) -> str:
    return "   -   " if value is None else f"{value * 1000:5.0f}ms"
