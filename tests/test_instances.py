"""Several `syncd run` instances on one PostgreSQL database (DESIGN §10; issue 12, "Must hold").

  1. Three instances, one database, one config directory: every sync is polled, by one instance at
     a time (no initial run twice, no two polls of a sync overlapping, no poll by an instance that
     is giving the sync back), the leases spread (each instance holds its share) and /v1/syncs
     names the owner.
  2. `kill -9` of one instance (a real process) while records change and webhooks flow: its syncs
     are polled by the others within lease_ttl plus the lease renewal period plus one interval; no
     change is lost, none is reported twice under different event ids, and every record's events
     reach the receiver in order, throughout.
  3. A SIGSTOPped instance whose leases expired meanwhile cannot commit when it resumes: the poll it
     had in flight is discarded, and neither that poll nor the deliveries it had claimed put a
     duplicate or an out-of-order event in front of the receiver.

What the database committed is read from a table `emitted` that a test-only trigger fills with
every row inserted into `outbox`, inside syncd's own transactions: the committed events, in `seq`
order, delivered ones included. Each test gets a schema of its own (conftest `pg_url`) and skips,
saying why, when no PostgreSQL server is reachable.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from conftest import send_signal, wait_for
from test_daemon_crash import EMITTED_PG as EMITTED_SQL
from test_daemon_crash import _limited

INTERVAL = 1.0  # seconds: every sync's interval (the shortest DESIGN allows a real `syncd run`)
LEASE_TTL = 3.0  # seconds: the shortest lease_ttl the settings allow
RETRIES = "100ms,200ms,400ms"  # a 503 is retried at once; nothing becomes a dead letter here

# -- helpers ------------------------------------------------------------------------------------


def define(conf_dir: Path, sync_id: str, upstream_url: str, hook_url: str, interval: float = INTERVAL) -> None:
    """conf.d/SYNC_ID.toml: polls upstream /SYNC_ID ({"items": [{"id": ..., ...}]}) every `interval`."""
    (conf_dir / f"{sync_id}.toml").write_text(
        f'webhook_url = "{hook_url}"\ninterval = "{interval}s"\nlist_identifier = "$.items"\nrecord_identifier = "$.id"\n'
        f'[api_details]\nbase_url = "{upstream_url}"\npath = "/{sync_id}"\n[api_details.retry]\nretries = 0\n')


class Db:
    """The test's own connection to the schema the instances share."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> Db:
        from syncd.store.postgres import PostgresStore

        store = await PostgresStore.open(self.url, instance=False)  # creates syncd's schema
        await store.close()
        self.conn = await asyncpg.connect(self.url, timeout=10)
        await self.conn.execute(EMITTED_SQL)
        return self

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()

    async def fetch(self, sql: str, *args) -> list:
        async with self._lock:
            return await self.conn.fetch(sql, *args)

    async def value(self, sql: str, *args) -> Any:
        async with self._lock:
            return await self.conn.fetchval(sql, *args)

    async def owners(self) -> dict[str, str]:
        """sync id -> the instance holding its unexpired lease."""
        rows = await self.fetch("SELECT sync_id, owner FROM leases WHERE owner IS NOT NULL "
                                "AND expires_at > extract(epoch from clock_timestamp())")
        return {r[0]: r[1] for r in rows}

    async def emitted(self) -> list[tuple]:
        rows = await self.fetch("SELECT event_id, sync_id, record_id, seq, body FROM emitted ORDER BY seq")
        return [tuple(r) for r in rows]


async def until(condition, timeout: float, interval: float = 0.05, what: str = "condition", detail=None) -> float:
    """Await `condition()` (a coroutine function) until it is true; fail after `timeout` seconds,
    saying what `detail()` (a coroutine function, if given) says. Returns how long it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await condition():
        if loop.time() - start > timeout:
            raise AssertionError(f"{what}: not met within {timeout}s" + (f": {await detail()}" if detail else ""))
        await asyncio.sleep(interval)
    return loop.time() - start


def instance_args(conf_dir: Path, tmp_path: Path, url: str, name: str, *extra: str) -> tuple[str, ...]:
    return ("--config-dir", str(conf_dir), "--state-path", str(tmp_path / f"{name}.db"), "--state-url", url,
            "--lease-ttl", f"{LEASE_TTL:g}s", "--instance-id", name, "--webhook-retry-schedule", RETRIES,
            "--shutdown-timeout", "3s", *extra)


async def syncs_view(address: str) -> list[dict]:
    async with aiohttp.ClientSession() as session, session.get(f"http://{address}/v1/syncs") as resp:
        assert resp.status == 200
        return (await resp.json())["syncs"]


def check_deliveries(emitted: list[tuple], received: list[dict], truth: dict[tuple[str, str], Any]) -> str:
    """What DESIGN §5 and §10 promise of the events, across instances, crashes and pauses:

    - commits: replaying the committed record events of each record (seq order) is a valid history
      (record.new only for an absent record, record.modified only with different data,
      record.deleted only for a present one) that ends in exactly the API's final data. So no
      change is lost and none was committed twice (under another event id);
    - at least once: every committed event was acknowledged by the receiver; nothing else arrived;
    - per-record order: in arrival order a record's events never go back to an older seq, and an
      event's first arrival comes after a 2xx answer to the record's previous event;
    - the last event the receiver acknowledged for each record is the record's last one.
    Returns a one-line summary."""
    ids = [e[0] for e in emitted]
    assert len(ids) == len(set(ids)), "an event id was committed twice"
    seq_of = {e[0]: e[3] for e in emitted}
    key_of = {e[0]: (e[1], e[2]) for e in emitted}
    body_of = {e[0]: e[4] for e in emitted}
    by_record: dict[tuple[str, str], list[str]] = {}
    replayed: dict[tuple[str, str], Any] = {}
    for event_id, sync_id, record_id, seq, body in emitted:
        event = orjson.loads(body)
        assert event["eventId"] == event_id and event["syncJobId"] == sync_id
        if not event["eventType"].startswith("record."):
            continue
        key = (sync_id, record_id)
        by_record.setdefault(key, []).append(event_id)
        where = f"seq {seq}: {event['eventType']} of {key}"
        if event["eventType"] == "record.new":
            assert key not in replayed, f"{where}: the record was created before (a change committed twice)"
            replayed[key] = event["eventData"]
        elif event["eventType"] == "record.modified":
            assert key in replayed, f"{where}: the record was never created"
            assert replayed[key] != event["eventData"], f"{where}: changes nothing (a change committed twice)"
            replayed[key] = event["eventData"]
        else:
            assert key in replayed, f"{where}: the record was never created (or deleted twice)"
            del replayed[key]
    if replayed != truth:
        missing = sorted(set(truth) - set(replayed))
        extra = sorted(set(replayed) - set(truth))
        stale = sorted(k for k in set(truth) & set(replayed) if truth[k] != replayed[k])
        pytest.fail(f"LOST: the committed events do not replay to the API's data: missing {_limited(missing)}, "
                    f"extra {_limited(extra)}, stale {_limited((k, replayed[k], truth[k]) for k in stale)}")

    hooks = [r for r in received if r["path"] == "/hook"]
    arrivals = [hooks[i] for i in sorted(range(len(hooks)), key=lambda i: (hooks[i]["at"], i))]
    unknown = [r["event"]["eventId"] for r in arrivals if r["event"]["eventId"] not in seq_of]
    assert not unknown, f"the receiver got events that were never committed: {_limited(unknown)}"
    altered = {r["event"]["eventId"] for r in arrivals if r["body"] != body_of[r["event"]["eventId"]]}
    assert not altered, f"delivered bodies differ from the committed ones: {_limited(altered)}"
    acked = [r for r in arrivals if 200 <= r["status"] < 300]
    acked_ids = {r["event"]["eventId"] for r in acked}
    lost = [(key_of[i], i) for i in ids if i not in acked_ids]
    assert not lost, f"LOST: committed events never acknowledged by the receiver: {_limited(lost)}"

    backwards, early = [], []
    last_seen: dict[tuple[str, str], tuple[int, str]] = {}
    first_arrival: dict[str, float] = {}
    first_ack: dict[str, float] = {}
    for r in arrivals:
        event_id = r["event"]["eventId"]
        key, seq = key_of[event_id], seq_of[event_id]
        prev = last_seen.get(key)
        if prev is not None and seq < prev[0]:
            backwards.append(f"{key}: {event_id} (seq {seq}) arrived after {prev[1]} (seq {prev[0]})")
        if prev is None or seq > prev[0]:
            last_seen[key] = (seq, event_id)
        first_arrival.setdefault(event_id, r["at"])
        if 200 <= r["status"] < 300:
            first_ack.setdefault(event_id, r["at"])
    assert not backwards, f"ORDER: a record's older event arrived after a newer one: {_limited(backwards, 4)}"
    for key, events in by_record.items():
        for before, after in itertools.pairwise(events):
            if not (before in first_ack and first_ack[before] <= first_arrival[after]):
                early.append(f"{key}: seq {seq_of[after]} was sent before seq {seq_of[before]} was acknowledged")
    assert not early, f"ORDER: an event was sent before the record's previous one was delivered: {_limited(early, 4)}"
    last_acked: dict[tuple[str, str], str] = {}
    for r in acked:
        event_id = r["event"]["eventId"]
        if event_id in key_of and r["event"]["eventType"].startswith("record."):
            last_acked[key_of[event_id]] = event_id
    wrong = [k for k, events in by_record.items() if last_acked.get(k) != events[-1]]
    assert not wrong, f"ORDER: the receiver's last event of a record is not its latest: {_limited(wrong)}"
    redelivered = sum(1 for _ in acked) - len(acked_ids)
    return (f"{len(emitted)} events committed for {len(by_record)} records, {len(hooks)} requests received, "
            f"{len(acked)} acknowledged ({redelivered} acknowledged again)")


# -- 1. three instances share the syncs, one poller at a time --------------------------------


@pytest.mark.timeout(90)
async def test_three_instances_poll_every_sync_once_at_a_time_and_share_the_leases(
        pg_url, inproc_daemons, upstream, receiver, conf_dir, tmp_path):
    db = await Db(pg_url).open()
    try:
        syncs = [f"s{i}" for i in range(9)]
        data = {sid: {k: {"id": f"{sid}-{k}", "v": 0} for k in range(3)} for sid in syncs}
        for sid in syncs:
            upstream.bodies[f"/{sid}"] = {"items": list(data[sid].values())}
            define(conf_dir, sid, upstream.url, f"{receiver.url}/hook")
        # Each poll takes 100 ms at the API: two instances polling one sync at once would show as
        # two requests in flight on its path (upstream.max_inflight).
        upstream.delay = 0.1
        common = dict(state_url=pg_url, lease_ttl=LEASE_TTL, webhook_retry_schedule=[0.1, 0.2, 0.4])
        # a alone first: it holds all 9 and starts their initial runs (spread over the first
        # interval). Then b and c at once, while a polls: a gives 6 back, some polled already, some
        # not yet, none while a polls it; b and c share them without polling any twice.
        a = await inproc_daemons(conf_dir, tmp_path / "a.db", instance_id="a", **common)
        assert len(a.daemon._owned) == 9
        await wait_for(lambda: len(upstream.requests) >= 2, 10, interval=0.005)
        started = time.monotonic()
        b, c = await asyncio.gather(*(inproc_daemons(conf_dir, tmp_path / f"{name}.db", instance_id=name, **common)
                                      for name in "bc"))
        instances = [a, b, c]
        by_name = dict(zip("abc", instances, strict=True))

        # The leases spread: 9 syncs over 3 live instances, 3 each (within a few renewals).
        await wait_for(lambda: sorted(len(d.daemon._owned or ()) for d in instances) == [3, 3, 3], 20)
        spread_after = time.monotonic() - started
        # Every record's initial record.new reaches the receiver.
        await wait_for(lambda: sum(1 for e in receiver.delivered() if e["eventType"] == "record.new") >= 27, 20)

        # A change in every sync after the spread: each is polled (by its current owner) and reported once.
        for sid in syncs:
            data[sid][0] = {"id": f"{sid}-0", "v": 1}
            upstream.bodies[f"/{sid}"] = {"items": list(data[sid].values())}
        hits = {sid: len(upstream.hits(f"/{sid}")) for sid in syncs}
        await wait_for(lambda: sum(1 for e in receiver.delivered() if e["eventType"] == "record.modified") >= 9, 15)
        # Every sync goes on being polled (a few more intervals each).
        await wait_for(lambda: all(len(upstream.hits(f"/{sid}")) >= hits[sid] + 3 for sid in syncs), 15)

        # /v1/syncs of every instance names the same owner for each sync: the instance whose
        # scheduler polls it, each holding 3.
        owned = {sid: name for name, d in by_name.items() for sid in d.daemon._owned}
        views = {name: {v["id"]: v["owner"] for v in await syncs_view(d.address)} for name, d in by_name.items()}
        db_owners = await db.owners()
        for name, view in views.items():
            assert view == owned, f"/v1/syncs of {name} shows owners {view}, the instances poll {owned}"
        assert db_owners == owned
        assert Counter(owned.values()) == {"a": 3, "b": 3, "c": 3}, owned

        for d in instances:
            await d.stop()
        stopped = await db.owners()
        assert not stopped, f"leases still held after a clean stop: {stopped}"

        # One poller at a time: no path ever had two requests in flight, and in every sync's run
        # history no run overlaps another; exactly one initial run per sync.
        overlapping = {p: n for p, n in upstream.max_inflight.items() if n > 1}
        assert not overlapping, f"two polls of one sync were in flight at once: {overlapping}"
        # Nor did an instance poll a sync it was giving back (its commit would have been refused).
        wasted = [(e["sync"], e["timestamp"]) for e in instances[0].tap.entries
                  if e.get("event") == "poll discarded: this instance no longer holds the sync's lease"]
        assert not wasted, f"polls by an instance that no longer held the sync's lease: {wasted}"
        runs = await db.fetch("SELECT sync_id, started_at, finished_at, sync_type, outcome FROM runs ORDER BY sync_id, started_at")
        for sid, group in itertools.groupby(runs, key=lambda r: r[0]):
            group = list(group)
            initial = [r for r in group if r[3] == "initial_sync"]
            assert len(initial) == 1, f"{sid}: {len(initial)} initial runs"
            assert all(r[4] != "failed" for r in group), f"{sid}: failed runs {group}"
            for before, after in itertools.pairwise(group):
                assert after[1] >= before[2], f"{sid}: a run started at {after[1]} while one ran {before[1]}-{before[2]}"
        assert {r[0] for r in runs} == set(syncs)

        # Each record.new and each change committed once, delivered once, in order.
        new = Counter(e["recordId"] for e in receiver.delivered() if e["eventType"] == "record.new")
        assert set(new) == {f"{sid}-{k}" for sid in syncs for k in range(3)} and set(new.values()) == {1}, new
        truth = {(sid, rec["id"]): rec for sid in syncs for rec in data[sid].values()}
        summary = check_deliveries(await db.emitted(), receiver.received, truth)
        print(f"three instances: leases spread 3/3/3 {spread_after:.1f}s after b and c started; {summary}")
    finally:
        await db.close()


# -- 2. kill -9 of one instance ----------------------------------------------------------------


class Api:
    """Several syncs' records (the truth), mutated in the background: versions bumped, records
    added and deleted, a few hot records changed in nearly every poll."""

    def __init__(self, rng: random.Random, upstream, syncs: list[str], size: int = 8) -> None:
        self.rng, self.upstream, self.syncs = rng, upstream, syncs
        self.next_id = 0
        self.data: dict[str, dict[str, dict]] = {sid: {} for sid in syncs}
        for sid in syncs:
            for _ in range(size):
                self._add(sid)
            self.publish(sid)
        self.mutations = 0
        self.last_mutation = time.time()

    def _add(self, sid: str) -> None:
        rid = f"{sid}-{self.next_id}"
        self.next_id += 1
        self.data[sid][rid] = {"id": rid, "v": 0}

    def publish(self, sid: str) -> None:
        self.upstream.bodies[f"/{sid}"] = {"items": list(self.data[sid].values())}

    def mutate(self) -> None:
        rng = self.rng
        sid = rng.choice(self.syncs)
        records = self.data[sid]
        roll = rng.random()
        if roll < 0.15 or len(records) < 4:
            self._add(sid)
        elif roll < 0.25:
            del records[rng.choice(sorted(records)[1:])]  # the first (hot) record stays
        else:
            rid = sorted(records)[0] if rng.random() < 0.4 else rng.choice(sorted(records))
            records[rid] = {"id": rid, "v": records[rid]["v"] + 1}  # a new dict: never mutate served data
        self.publish(sid)
        self.mutations += 1
        self.last_mutation = time.time()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.rng.uniform(0.02, 0.08))
            except TimeoutError:
                self.mutate()

    def truth(self) -> dict[tuple[str, str], dict]:
        return {(sid, rid): rec for sid, records in self.data.items() for rid, rec in records.items()}


def jittery_receiver(rng: random.Random):
    """Mostly quick 2xx, sometimes slow, a 503 to ~10% of first attempts (retried at once)."""

    async def respond(entry):
        await asyncio.sleep(rng.uniform(0.1, 0.3) if rng.random() < 0.1 else rng.uniform(0, 0.02))
        if entry["attempt"] == 1 and rng.random() < 0.1:
            return 503, {}
        return 200, {}

    return respond


@pytest.mark.timeout(100)
async def test_kill_9_of_one_instance_moves_its_syncs_and_loses_nothing(
        pg_url, daemons, upstream, receiver, conf_dir, tmp_path):
    rng = random.Random(20261130)
    db = await Db(pg_url).open()
    stop_mutating = asyncio.Event()
    mutator = None
    try:
        syncs = [f"k{i}" for i in range(6)]
        api = Api(random.Random(rng.random()), upstream, syncs)
        for sid in syncs:
            define(conf_dir, sid, upstream.url, f"{receiver.url}/hook")
        upstream.delay = 0.03
        jitter = jittery_receiver(random.Random(rng.random()))
        kill: dict[str, Any] = {}

        async def respond(entry):
            # Armed: the instance that sent this request is killed while the request is in flight.
            if kill.get("armed") and entry["event"]:
                kill["armed"] = False
                sender = await db.value("SELECT claimed_by FROM outbox WHERE event_id = $1", entry["event"]["eventId"])
                if sender in procs:
                    kill["owners"] = await db.owners()
                    send_signal(procs[sender].proc, signal.SIGKILL)
                    kill.update(victim=sender, at=time.time(), event=entry["event"]["eventId"])
                else:
                    kill["armed"] = True
            return await jitter(entry)

        receiver.respond = respond
        procs = dict(zip("abc", await asyncio.gather(*(
            daemons(*instance_args(conf_dir, tmp_path, pg_url, name)) for name in "abc")), strict=True))

        async def spread() -> bool:
            return sorted(Counter((await db.owners()).values()).values()) == [2, 2, 2]
        await until(spread, 20, what="6 leases spread 2/2/2 over 3 instances")
        mutator = asyncio.create_task(api.run(stop_mutating), name="mutator")
        # Changes flow for a while: polls by all three, deliveries claimed by all three. Then the
        # instance that sends the next webhook is killed while the receiver holds that request.
        await asyncio.wait({mutator}, timeout=rng.uniform(1.5, 2.5))
        kill["armed"] = True
        await wait_for(lambda: "victim" in kill, 10)
        victim, killed_at, owners = kill["victim"], kill["at"], kill["owners"]
        victim_syncs = sorted(s for s, o in owners.items() if o == victim)
        assert len(victim_syncs) == 2, owners
        assert await procs[victim].proc.wait() == -signal.SIGKILL
        claims_at_kill = await db.value("SELECT count(*) FROM outbox WHERE claimed_by = $1", victim)
        assert claims_at_kill >= 1  # the request in flight at least: nobody else sends it before the victim is known dead

        # Its syncs are polled by the others once its leases expire: within lease_ttl (the lease
        # was renewed at most that long before the kill), plus a renewal period (when the others
        # look), plus the first poll's spread over one interval.
        bound = LEASE_TTL + LEASE_TTL / 3 + INTERVAL * 1.1 + 0.5
        picked_up: dict[str, float] = {}

        async def taken_over() -> bool:
            rows = await db.fetch("SELECT sync_id, min(started_at) FROM runs WHERE sync_id = ANY($1::text[]) "
                                  "AND started_at > $2 AND outcome <> 'failed' GROUP BY sync_id", victim_syncs, killed_at)
            picked_up.update({r[0]: r[1] - killed_at for r in rows})
            return len(picked_up) == len(victim_syncs)
        await until(taken_over, bound + 5, what=f"{victim}'s syncs {victim_syncs} polled by the others")
        new_owners = await db.owners()
        assert all(new_owners.get(s) not in (None, victim) for s in victim_syncs), new_owners
        assert max(picked_up.values()) <= bound, f"picked up after {picked_up} s, more than {bound:.1f} s"

        # Changes go on for a while under the two survivors, then stop; they catch up.
        await asyncio.wait({mutator}, timeout=1.5)
        stop_mutating.set()
        await mutator
        last = api.last_mutation

        async def caught_up() -> bool:
            polled = await db.value("SELECT count(DISTINCT sync_id) FROM runs WHERE started_at > $1 AND outcome <> 'failed'", last)
            return polled == len(syncs) and not await db.value("SELECT count(*) FROM outbox")
        await until(caught_up, 30, what="every sync polled after the last change and every event delivered")
        for name, proc in procs.items():
            if name != victim:
                assert await proc.stop(signal.SIGTERM, 15) == 0, proc.logs[-5:]

        overlapping = {p: n for p, n in upstream.max_inflight.items() if n > 1}
        assert not overlapping, f"two polls of one sync were in flight at once: {overlapping}"
        summary = check_deliveries(await db.emitted(), receiver.received, api.truth())
        print(f"kill -9 of {victim} (holding {victim_syncs}, {claims_at_kill} delivery claims): polled again after "
              + ", ".join(f"{s} {t:.2f}s" for s, t in sorted(picked_up.items()))
              + f" (bound {bound:.1f}s); {api.mutations} mutations; {summary}")
    finally:
        stop_mutating.set()
        if mutator is not None:
            await asyncio.gather(mutator, return_exceptions=True)
        await db.close()


# -- 3. SIGSTOP: a paused instance whose leases expired cannot commit ---------------------------


@pytest.mark.timeout(100)
async def test_a_paused_instance_whose_leases_expired_cannot_commit_when_it_resumes(
        pg_url, daemons, upstream, receiver, conf_dir, tmp_path):
    db = await Db(pg_url).open()
    try:
        sid, size = "p", 8
        define(conf_dir, sid, upstream.url, f"{receiver.url}/hook")

        def serve(version: Any) -> dict:
            truth = {(sid, f"r{k}"): {"id": f"r{k}", "v": version} for k in range(size)}
            upstream.bodies[f"/{sid}"] = {"items": list(truth.values())}
            return truth

        serve(0)

        async def slow(entry):  # one delivery at a time (below), each ~0.2 s: claimed events wait
            await asyncio.sleep(0.2)
            return 200, {}

        receiver.respond = slow
        # a alone first: it holds the one sync and makes the initial run.
        a = await daemons(*instance_args(conf_dir, tmp_path, pg_url, "a", "--webhook-concurrency", "1"))
        await until(lambda: _count(db, "SELECT count(*) FROM emitted"), 15, what="a's initial run")
        b = await daemons(*instance_args(conf_dir, tmp_path, pg_url, "b", "--webhook-concurrency", "1"))
        assert await db.owners() == {sid: "a"}

        # Every record changes; a polls, commits 8 record.modified and starts delivering them, one
        # at a time: the rest stay claimed by a.
        serve(1)
        await until(lambda: _count(db, "SELECT count(*) FROM emitted", at_least=2 * size), 10, what="a's commit of v1")
        assert await db.owners() == {sid: "a"}

        # Stop a in the middle of its next poll: the API has its request, and answers (after a is
        # stopped) with data that exists only in that answer.
        polls = len(upstream.hits(f"/{sid}"))
        upstream.delays[f"/{sid}"] = 0.3
        await wait_for(lambda: len(upstream.hits(f"/{sid}")) > polls, 5, interval=0.001)
        send_signal(a.proc, signal.SIGSTOP)
        stopped_at = time.time()
        serve("stale")
        claimed_by_a = await db.value("SELECT count(*) FROM outbox WHERE claimed_by = 'a'")
        await wait_for(lambda: not upstream.inflight.get(f"/{sid}"), 5)  # the stale answer is in a's socket
        upstream.delays.pop(f"/{sid}")
        truth = serve(2)

        # While a is stopped: its heartbeat and lease expire, b takes the sync, sends what a had
        # claimed, polls the new data and delivers it.
        async def b_took_over() -> bool:
            return await db.owners() == {sid: "b"} and not await db.value(
                "SELECT count(*) FROM instances WHERE instance_id = 'a' AND expires_at > extract(epoch from clock_timestamp())")
        await until(b_took_over, LEASE_TTL * 2 + 5, what="b holding the lease and a's heartbeat expired")
        await wait_for(lambda: {e["recordId"] for e in receiver.delivered() if (e["eventData"] or {}).get("v") == 2}
                       == {f"r{k}" for k in range(size)}, 15)

        # a resumes: its poll answer arrives, its commit is refused, nothing of it is kept.
        send_signal(a.proc, signal.SIGCONT)
        resumed_at = time.time()
        discarded = "poll discarded: this instance no longer holds the sync's lease"
        await wait_for(lambda: a.events(discarded), 10)
        await wait_for(lambda: any(sid in e.get("lost", ()) for e in a.events("leases changed")), 10)
        # Only the poll in flight during the stop: a starts none once it resumes (its leases were last
        # renewed too long ago to be trusted), and after its renewal it no longer has the sync.
        assert len(a.events(discarded)) == 1, [(e["run"], e["timestamp"]) for e in a.events(discarded)]
        (discarded,) = a.events(discarded)

        # Afterwards: a is a live instance again, b keeps polling; nothing is left claimed or pending.
        async def settled() -> bool:
            return (await db.value("SELECT count(*) FROM runs WHERE started_at > $1", resumed_at) >= 2
                    and not await db.value("SELECT count(*) FROM outbox")
                    and await db.value("SELECT count(*) FROM instances WHERE expires_at > "
                                       "extract(epoch from clock_timestamp())") == 2)
        async def state() -> str:
            runs = await db.fetch("SELECT started_at - $1, outcome FROM runs WHERE started_at > $1 - 3 ORDER BY seq", resumed_at)
            outbox = await db.fetch("SELECT seq, record_id, claimed_by, attempts, next_attempt_at - $1, last_error, dead_at "
                                    "FROM outbox ORDER BY seq", time.time())
            instances = await db.fetch("SELECT instance_id, expires_at - extract(epoch from clock_timestamp()) FROM instances")
            return (f"runs {[tuple(r) for r in runs]}, outbox {[tuple(r) for r in outbox]}, "
                    f"instances {[tuple(r) for r in instances]}; a's log: {a.logs[-12:]}; b's log: {b.logs[-8:]}")
        await until(settled, 15, what="b polling again after a resumed, the outbox empty, both instances live",
                    detail=state)
        assert await db.owners() == {sid: "b"}
        assert await a.stop(signal.SIGTERM, 15) == 0, a.logs[-5:]
        assert await b.stop(signal.SIGTERM, 15) == 0, b.logs[-5:]

        emitted = await db.emitted()
        run_ids = {r[0] for r in await db.fetch("SELECT run_id FROM runs")}
        assert discarded["run"] not in run_ids, "the discarded poll was recorded in the run history"
        committed_runs = {orjson.loads(e[4])["syncRunId"] for e in emitted}
        assert discarded["run"] not in committed_runs, "the discarded poll's events were committed"
        stale = [e for e in emitted if b'"stale"' in e[4]]
        assert not stale, f"the stopped instance's poll committed {len(stale)} events"
        assert not [r for r in receiver.received if b'"stale"' in r["body"]]
        summary = check_deliveries(emitted, receiver.received, truth)
        print(f"SIGSTOP for {resumed_at - stopped_at:.1f}s with {claimed_by_a} events claimed by a; {summary}")
    finally:
        await db.close()


async def _count(db: Db, sql: str, at_least: int = 1) -> bool:
    return (await db.value(sql)) >= at_least
