"""Crash safety of delivery: SIGKILL `syncd run` while webhooks are in flight, repeatedly.

Acceptance requirement: `kill -9` of the daemon while deliveries are in flight (subprocess test,
repeated): after a restart every event emitted is received at least once, none is lost, and
per-record order holds in what the receiver saw last for each record.

Set-up (everything on 127.0.0.1, in the test's event loop, never blocked by it):
  * a local API, polled every 150 ms, serves 50-200 records `{"id": k, "v": version}`; a task mutates them every
    20-80 ms (bump versions, add, delete; seeded random), a few "hot" records in nearly every poll;
  * a local webhook receiver answers 2xx after 0-30 ms (15%: 150-450 ms), and 503 to ~15% of first
    attempts: retries happen, a record's next event often queues behind an undelivered one, and no
    event can become a dead letter (3 attempts: at most the first is refused);
  * before the first start, a test-only SQLite trigger copies every row inserted into `outbox` into a
    table `emitted`. It runs inside syncd's own transaction, so `emitted` holds exactly the committed
    events, in `seq` order, including those delivered (deleted from the outbox) long ago.

Rounds: start `syncd run` (a real process, forked by conftest.ForkServer from a Python that has
imported syncd already: the CLI's `main(["run", ...])`, as `python -m syncd run` runs it, minus
~0.6 s of start-up per round), let it poll and deliver, SIGKILL it - either from inside the
receiver while it holds a delivery in flight, or at a random moment - and start it again. A final
round stops the mutations, lets the daemon catch up (a poll started after the last mutation, nothing
pending) and stops it with SIGTERM (exit 0).

What syncd promises and the test asserts:
  1. every emitted event was acknowledged (2xx) by the receiver at least once; none is a dead letter;
  2. for each record, the last event the receiver acknowledged is the record's last emitted event;
  3. per record, syncd never sends an event before the previous event of that record was recorded as
     delivered (a record stays claimed until its outcome is committed). Seen from the receiver:
     (a) in arrival order, a record's events never go back to an older `seq` (an older event may be
         redelivered after a crash only until a newer one was sent), and (b) the first arrival of an
         event comes after a 2xx answer to the record's previous event;
  4. replaying the last acknowledged event per record (new/modified -> eventData, deleted -> absent)
     gives exactly the data the API serves at the end.

The test runs once per state backend (conftest `backend`). Against PostgreSQL the daemon runs with
`--state-url` (a schema of its own), `--lease-ttl 3s` and a fixed `--instance-id`, as a systemd unit
would: a restarted daemon takes over the instance of its killed predecessor at once (its lease and
its delivery claims) instead of waiting for them to expire. `emitted` is filled by a PL/pgSQL trigger.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import signal
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from syncd.store import Store

from conftest import ForkedProcess, ForkServer, cli_env, outbox_body, send_signal

SYNC_ID = "crashy"
SEED = 20240917
KILL_ROUNDS = 5  # per backend (a PostgreSQL daemon's start takes a second longer: START_SETTLE)
HOT = 4
START_TIMEOUT = 20.0
FINAL_TIMEOUT = 30.0

EMITTED_SQL = """
CREATE TABLE IF NOT EXISTS emitted (event_id TEXT, sync_id TEXT, record_id TEXT, seq INTEGER, body BLOB,
                                    event_type TEXT, created_at REAL, sync_type TEXT, sync_run_id TEXT, changed_fields BLOB);
CREATE TRIGGER IF NOT EXISTS emitted_log AFTER INSERT ON outbox BEGIN
    INSERT INTO emitted VALUES (new.event_id, new.sync_id, new.record_id, new.seq, new.body, new.event_type,
                                new.created_at, new.sync_type, new.sync_run_id, new.changed_fields);
END;
"""
EMITTED_PG = """
CREATE TABLE IF NOT EXISTS emitted (event_id TEXT, sync_id TEXT, record_id TEXT, seq BIGINT, body BYTEA,
                                    event_type TEXT, created_at FLOAT8, sync_type TEXT, sync_run_id TEXT, changed_fields BYTEA);
CREATE OR REPLACE FUNCTION emitted_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO emitted VALUES (NEW.event_id, NEW.sync_id, NEW.record_id, NEW.seq, NEW.body, NEW.event_type,
                                NEW.created_at);
    RETURN NEW;
END $$;
CREATE TRIGGER emitted_log AFTER INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION emitted_log();
"""


# -- the API's data, mutated in the background ------------------------------------------------

class Source:
    """The records the upstream serves (the truth), mutated frequently by `run`."""

    def __init__(self, rng: random.Random, upstream, size: int = 100) -> None:
        self.rng, self.upstream = rng, upstream
        self.next_id = 0
        self.records: dict[int, dict[str, Any]] = {}
        self.hot: list[int] = []  # records changed far more often: several events of one record queue up
        for _ in range(size):
            self._add()
        self.mutations = 0
        self.last_mutation = time.time()
        self.publish()

    def _add(self) -> None:
        k = self.next_id
        self.next_id += 1
        self.records[k] = {"id": k, "v": 0}
        if len(self.hot) < HOT:
            self.hot.append(k)

    def _pick(self, hot_share: float) -> int:
        pool = self.hot if self.hot and self.rng.random() < hot_share else list(self.records)
        return self.rng.choice(pool)

    def mutate(self) -> None:
        rng = self.rng
        for _ in range(rng.randint(1, 5)):
            roll = rng.random()
            if (roll < 0.15 and len(self.records) < 200) or len(self.records) < 50:
                self._add()
            elif roll < 0.3 and len(self.records) > 50:
                k = self._pick(0.3)
                del self.records[k]
                if k in self.hot:
                    self.hot.remove(k)
            else:
                k = self._pick(0.7)
                self.records[k] = {"id": k, "v": self.records[k]["v"] + 1}  # a new dict: never mutate served data
        self.mutations += 1

    def publish(self) -> None:
        self.upstream.body = {"items": list(self.records.values())}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.rng.uniform(0.02, 0.08))
            except TimeoutError:
                pass
            if stop.is_set():
                break
            self.mutate()
            self.publish()
            self.last_mutation = time.time()  # after publishing: a poll started later sees it

    def final(self) -> dict[str, Any]:
        return {str(k): r for k, r in self.records.items()}


# -- the receiver's behaviour -----------------------------------------------------------------

class Hook:
    """`receiver.respond`: slow, jittery 2xx, some 503 on first attempts; can fire a kill mid-request."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.inflight = 0
        self.countdown: int | None = None  # fire `on_countdown` when this many more requests arrived
        self.on_countdown = None

    async def __call__(self, entry: dict[str, Any]):
        rng = self.rng
        entry["wall"] = time.time()  # comparable with the events' timestamps
        self.inflight += 1
        try:
            if self.countdown is not None:
                self.countdown -= 1
                if self.countdown <= 0:
                    self.countdown = None
                    fire, self.on_countdown = self.on_countdown, None
                    asyncio.get_running_loop().call_later(rng.uniform(0, 0.01), fire)
            # Mostly 0-30 ms; sometimes slow, so that a record's next poll queues its next event meanwhile.
            await asyncio.sleep(rng.uniform(0.15, 0.45) if rng.random() < 0.15 else rng.uniform(0, 0.03))
        finally:
            self.inflight -= 1
        if entry["path"] != "/hook":
            return 404, {}
        if entry["attempt"] == 1 and rng.random() < 0.15:
            return 503, {}
        return rng.choice((200, 202, 204)), {}


# -- the daemon subprocess --------------------------------------------------------------------

@dataclass
class Round:
    number: int
    mode: str  # "in-flight" (kill fired while the receiver holds a request) | "timed" | "final"
    log: Path
    inflight_at_kill: int | None = None
    pending_after: int | None = None
    emitted_after: int | None = None
    rc: int | None = None


@dataclass
class Daemon:
    proc: asyncio.subprocess.Process | ForkedProcess
    log: Path
    logfile: Any = field(default=None, repr=False)

    def signal(self, sig: int) -> None:
        # Never `self.proc.send_signal()`: on a daemon that has just died (killed a moment ago from
        # the receiver) it reaps the child behind asyncio's back and the exit status reads 255.
        send_signal(self.proc, sig)

    async def wait(self, timeout: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def close(self) -> None:
        if self.logfile is not None:
            self.logfile.close()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


DAEMON_ARGS = ("--listen", "127.0.0.1:0", "--webhook-retry-schedule", "100ms,200ms", "--log-format", "json",
               "--shutdown-timeout", "5s")


async def start_daemon(conf_dir: Path, state: StateDb, log: Path, forks: ForkServer | None = None) -> Daemon:
    """`syncd run`, logging to `log`: forked by `forks` (see conftest.ForkServer: a real process,
    without ~0.6 s of interpreter start-up and imports per round), else `python -m syncd run`."""
    args = ("run", "--config-dir", str(conf_dir), *state.args(), *DAEMON_ARGS)
    if forks is not None:
        log.write_bytes(b"")
        return Daemon(await forks.spawn(*args, stdout=log, stderr=log), log)
    logfile = open(log, "wb")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "syncd", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=logfile, stderr=logfile, env=cli_env(),
        )
    except BaseException:
        logfile.close()
        raise
    return Daemon(proc, log, logfile)


async def wait_started(daemon: Daemon) -> None:
    """Until the daemon logged 'syncd started' (bounded; fails if it exits first)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while b'"syncd started"' not in daemon.log.read_bytes():
        if daemon.proc.returncode is not None:
            raise AssertionError(f"syncd run exited with {daemon.proc.returncode} during start-up:\n{daemon.tail()}")
        if loop.time() > deadline:
            raise AssertionError(f"syncd run did not log 'syncd started' within {START_TIMEOUT}s:\n{daemon.tail()}")
        await asyncio.sleep(0.02)


# -- the state database, read from outside (SQLite in a thread: never block the loop) ---------

class StateDb:
    """The daemon's state database: the SQLite file, or (with `state_url`) a PostgreSQL schema."""

    def __init__(self, backend: dict[str, Any]) -> None:
        self.path: Path = backend["state_path"]
        self.url: str | None = backend.get("state_url")

    def args(self) -> tuple[str, ...]:
        if self.url is None:
            return ("--state-path", str(self.path))
        return ("--state-path", str(self.path), "--state-url", self.url, "--lease-ttl", "3s", "--instance-id", "crashy")


def _query(state_path: Path, sql: str, args: tuple = ()) -> list[tuple]:
    db = sqlite3.connect(state_path, timeout=10, isolation_level=None)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


async def query(state: StateDb, sql: str, args: tuple = ()) -> list[tuple]:
    """Rows of `sql` (SQLite's ? and ?N parameters; PostgreSQL gets $N)."""
    if state.url is None:
        return await asyncio.to_thread(_query, state.path, sql, args)
    import asyncpg

    numbers = itertools.count(1)
    sql = re.sub(r"\?(\d*)", lambda m: f"${m.group(1) or next(numbers)}", sql)
    conn = await asyncpg.connect(state.url, timeout=10)
    try:
        return [tuple(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def install_emitted_log(state: StateDb) -> None:
    if state.url is not None:
        import asyncpg

        from syncd.store.postgres import PostgresStore

        store = await PostgresStore.open(state.url, instance=False)  # creates syncd's schema
        await store.close()
        conn = await asyncpg.connect(state.url, timeout=10)
        try:
            await conn.execute(EMITTED_PG)
        finally:
            await conn.close()
        return
    store = await Store.open(state.path)  # creates syncd's schema
    await store.close()

    def install() -> None:
        db = sqlite3.connect(state.path, timeout=10)
        try:
            db.executescript(EMITTED_SQL)
            db.commit()
        finally:
            db.close()

    await asyncio.to_thread(install)


def _wall(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _limited(items, n: int = 8) -> str:
    items = list(items)
    return f"{items[:n]}{' ...' if len(items) > n else ''} ({len(items)} in all)"


# -- the test ---------------------------------------------------------------------------------

@pytest.mark.timeout(120)
async def test_sigkill_during_deliveries_loses_nothing_and_keeps_record_order(upstream, receiver, conf_dir, backend, tmp_path,
                                                                              fork_server):
    state = StateDb(backend)
    rng = random.Random(SEED)
    source = Source(random.Random(rng.random()), upstream)
    hook = Hook(random.Random(rng.random()))
    receiver.respond = hook
    (conf_dir / f"{SYNC_ID}.toml").write_text(
        f'webhook_url = "{receiver.url}/hook"\ninterval = "150ms"\n'
        f'list_identifier = "$.items"\nrecord_identifier = "$.id"\n'
        f'[api_details]\nbase_url = "{upstream.url}"\npath = "/api"\n'
    )
    await install_emitted_log(state)

    stop_mutating = asyncio.Event()
    mutator = asyncio.create_task(source.run(stop_mutating), name="mutator")
    rounds: list[Round] = []
    daemon: Daemon | None = None
    t_start = time.monotonic()
    try:
        # -- kill rounds ----------------------------------------------------------------------
        for number in range(KILL_ROUNDS):
            mode = "in-flight" if rng.random() < 0.7 else "timed"
            rnd = Round(number, mode, tmp_path / f"daemon-{number}.log")
            rounds.append(rnd)
            daemon = await start_daemon(conf_dir, state, rnd.log, fork_server)
            await wait_started(daemon)
            killed = asyncio.Event()

            def kill(daemon=daemon, rnd=rnd, killed=killed) -> None:
                if rnd.inflight_at_kill is None:
                    rnd.inflight_at_kill = hook.inflight
                daemon.signal(signal.SIGKILL)
                killed.set()

            if mode == "in-flight":
                await asyncio.sleep(rng.uniform(0.2, 1.0))
                hook.on_countdown, hook.countdown = kill, rng.randint(1, 15)
                try:
                    await asyncio.wait_for(killed.wait(), 5.0)
                except TimeoutError:
                    rnd.mode = "timed (no delivery arrived within 5s)"
                hook.countdown = hook.on_countdown = None
            else:
                await asyncio.sleep(rng.uniform(0.3, 1.5))
            if not killed.is_set():
                kill()
            rnd.rc = await daemon.wait(10)
            assert rnd.rc == -signal.SIGKILL, \
                f"round {number}: the daemon exited with {rnd.rc} before it was killed:\n{daemon.tail()}"
            daemon.close()
            daemon = None
            (rnd.pending_after,), = await query(state, "SELECT COUNT(*) FROM outbox WHERE dead_at IS NULL")
            (rnd.emitted_after,), = await query(state, "SELECT COUNT(*) FROM emitted")

        # -- final round: no more changes; the restarted daemon must catch up -----------------
        stop_mutating.set()
        await mutator
        last_mutation = source.last_mutation
        final = Round(KILL_ROUNDS, "final", tmp_path / "daemon-final.log")
        rounds.append(final)
        daemon = await start_daemon(conf_dir, state, final.log, fork_server)
        await wait_started(daemon)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FINAL_TIMEOUT
        while True:
            (polled_after, pending, dead), = await query(
                state,
                "SELECT (SELECT COUNT(*) FROM runs WHERE sync_id = ?1 AND outcome != 'failed' AND started_at > ?2), "
                "(SELECT COUNT(*) FROM outbox WHERE dead_at IS NULL), (SELECT COUNT(*) FROM outbox WHERE dead_at IS NOT NULL)",
                (SYNC_ID, last_mutation),
            )
            if polled_after and not pending:
                break
            assert daemon.proc.returncode is None, f"the final daemon exited with {daemon.proc.returncode}:\n{daemon.tail()}"
            if loop.time() > deadline:
                stuck = await query(
                    state, "SELECT event_id, record_id, attempts, last_status, last_error, "
                    "next_attempt_at - ?, dead_at FROM outbox ORDER BY seq LIMIT 5", (time.time(),))
                pytest.fail(
                    f"the restarted daemon did not catch up within {FINAL_TIMEOUT}s: polls after the last change: "
                    f"{polled_after}, pending events: {pending}, dead letters: {dead}; first undelivered "
                    f"(event, record, attempts, last status, last error, due in s, dead at): {stuck}\n{daemon.tail()}")
            await asyncio.sleep(0.05)
        daemon.signal(signal.SIGTERM)
        final.rc = await daemon.wait(15)
        assert final.rc == 0, f"SIGTERM: the daemon exited with {final.rc}, expected 0:\n{daemon.tail()}"
        daemon.close()
        daemon = None
    finally:
        stop_mutating.set()
        if not mutator.done():
            mutator.cancel()
        await asyncio.gather(mutator, return_exceptions=True)
        if daemon is not None:
            daemon.signal(signal.SIGKILL)
            try:
                await daemon.wait(10)
            finally:
                daemon.close()
    elapsed = time.monotonic() - t_start

    # -- what was committed, what is left, what the receiver saw ------------------------------
    emitted = [(event_id, sync_id, record_id, seq, outbox_body(event_id, sync_id, record_id, *parts))
               for event_id, sync_id, record_id, seq, *parts in await query(
                   state, "SELECT event_id, sync_id, record_id, seq, event_type, created_at, body, sync_type, sync_run_id, "
                          "changed_fields FROM emitted ORDER BY seq")]
    leftovers = await query(state, "SELECT event_id, record_id, attempts, last_status, last_error, dead_at FROM outbox")
    assert emitted, "no event was ever committed: the test exercised nothing"
    seq_of = {e[0]: e[3] for e in emitted}
    record_of = {e[0]: e[2] for e in emitted}
    body_of = {e[0]: e[4] for e in emitted}
    by_record: dict[str, list[str]] = {}
    for event_id, sync_id, record_id, _seq, _body in emitted:
        assert sync_id == SYNC_ID
        by_record.setdefault(record_id, []).append(event_id)

    hooks = [r for r in receiver.received if r["path"] == "/hook"]
    arrivals = sorted(range(len(hooks)), key=lambda i: (hooks[i]["at"], i))
    arrivals = [hooks[i] for i in arrivals]
    acked = [r for r in arrivals if 200 <= r["status"] < 300]
    acked_ids = {r["event"]["eventId"] for r in acked}
    received_ids = [r["event"]["eventId"] for r in arrivals]
    redelivered = {i for i in acked_ids if sum(1 for r in acked if r["event"]["eventId"] == i) > 1}

    first_ack_wall: dict[str, float] = {}
    for r in acked:
        first_ack_wall.setdefault(r["event"]["eventId"], r["wall"])
    queued_behind = sum(
        1 for events in by_record.values() for before, after in itertools.pairwise(events)
        if _wall(orjson.loads(body_of[after])["timestamp"]) < first_ack_wall.get(before, float("inf"))
    )
    summary = (
        f"{len(emitted)} events emitted for {len(by_record)} records by {source.mutations} mutations; "
        f"{len(hooks)} requests received, {len(acked)} acknowledged, {len(redelivered)} events acknowledged more than once, "
        f"{queued_behind} emitted while the record's previous event was undelivered; "
        f"rounds: " + "; ".join(
            f"#{r.number} {r.mode} in-flight@kill={r.inflight_at_kill} pending-after={r.pending_after} "
            f"emitted-after={r.emitted_after} rc={r.rc}" for r in rounds)
        + f"; {elapsed:.1f}s"
    )
    print(summary)

    # Sanity of the set-up: the kills really hit deliveries in flight, a restart had work left, and
    # records often had an event queued behind an earlier one that was not delivered yet.
    assert any(r.inflight_at_kill for r in rounds), f"no kill landed while a delivery was in flight: {summary}"
    assert any(r.pending_after for r in rounds), f"no kill left undelivered events behind: {summary}"
    assert queued_behind >= 3, f"too few events queued behind an undelivered one of their record: {summary}"

    # Everything received was committed first, and arrived intact.
    unknown = [i for i in received_ids if i not in seq_of]
    assert not unknown, f"the receiver got events that were never committed to the outbox: {_limited(unknown)}"
    altered = sorted({r["event"]["eventId"] for r in hooks if r["body"] != body_of[r["event"]["eventId"]]})
    assert not altered, f"delivered bodies differ from the committed ones: {_limited(altered)}"

    # 1. At least once: no emitted event lost, none left behind as a dead letter.
    assert not leftovers, f"events left in the outbox after the final run (pending or dead): {_limited(leftovers, 5)}; {summary}"
    lost = [(record_of[i], i) for i in seq_of if i not in acked_ids]
    assert not lost, f"LOST: emitted events never acknowledged by the receiver (record, event): {_limited(lost)}; {summary}"

    # 3. Per-record order as the design guarantees it (see the module docstring).
    backwards, early = [], []
    last_seen: dict[str, tuple[int, str]] = {}
    first_arrival: dict[str, float] = {}
    first_ack: dict[str, float] = {}
    for r in arrivals:
        event_id = r["event"]["eventId"]
        record_id, seq = record_of[event_id], seq_of[event_id]
        prev = last_seen.get(record_id)
        if prev is not None and seq < prev[0]:
            backwards.append(f"record {record_id}: {event_id} (seq {seq}, attempt {r['attempt']}) arrived after "
                             f"{prev[1]} (seq {prev[0]})")
        if prev is None or seq > prev[0]:
            last_seen[record_id] = (seq, event_id)
        first_arrival.setdefault(event_id, r["at"])
        if 200 <= r["status"] < 300:
            first_ack.setdefault(event_id, r["at"])
    assert not backwards, f"ORDER: a record's older event was sent after a newer one: {_limited(backwards, 5)}; {summary}"
    for record_id, events in by_record.items():
        for before, after in itertools.pairwise(events):
            if after in first_arrival and not (before in first_ack and first_ack[before] <= first_arrival[after]):
                early.append(f"record {record_id}: {after} (seq {seq_of[after]}) was sent before {before} "
                             f"(seq {seq_of[before]}) was acknowledged")
    assert not early, (f"ORDER: an event was sent before the record's previous event was delivered: "
                       f"{_limited(early, 5)}; {summary}")

    # 2. What the receiver acknowledged last for each record is the record's latest event.
    last_acked: dict[str, dict[str, Any]] = {}
    for r in acked:
        last_acked[record_of[r["event"]["eventId"]]] = r["event"]
    wrong_last = [
        f"record {rid}: last acknowledged {last_acked[rid]['eventId'] if rid in last_acked else None} "
        f"(seq {seq_of.get(last_acked[rid]['eventId']) if rid in last_acked else None}), latest emitted {events[-1]} "
        f"(seq {seq_of[events[-1]]})"
        for rid, events in by_record.items()
        if rid not in last_acked or last_acked[rid]["eventId"] != events[-1]
    ]
    assert not wrong_last, f"ORDER: the receiver's last event of a record is not its latest: {_limited(wrong_last, 5)}; {summary}"

    # 4. Replaying what the receiver saw last gives the API's final data.
    state = {rid: e["eventData"] for rid, e in last_acked.items() if e["eventType"] != "record.deleted"}
    truth = source.final()
    if state != truth:
        missing = sorted(set(truth) - set(state), key=int)
        extra = sorted(set(state) - set(truth), key=int)
        stale = sorted((k for k in set(state) & set(truth) if state[k] != truth[k]), key=int)
        pytest.fail(
            f"the receiver's final state differs from the API's: missing {_limited(missing)}, "
            f"extra {_limited(extra)}, stale {_limited([(k, state[k], truth[k]) for k in stale], 5)}; {summary}"
        )
