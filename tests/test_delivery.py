"""Webhook delivery against a real local receiver: signatures, retries, ordering, dead letters."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import time

import orjson
import pytest
import structlog
import structlog.testing

from syncd.config import load_dir
from syncd.delivery import Deliverer, Target, next_delay
from syncd.engine import poll
from syncd.http import parse_retry_after, poll_session, webhook_session
from syncd.settings import load_settings
from syncd.source.fetcher import Source
from syncd.store import Store

from conftest import run_cli, wait_for

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


class Rig:
    """An upstream API, a sync whose webhook_url is the receiver, a store, and a deliverer."""

    def __init__(self, upstream, receiver, conf_dir, state_path, *, schedule=(0.05, 0.1), concurrency=4,
                 timeout=5.0, secret=SECRET, path="/hook", busy_timeout=10.0):
        self.upstream, self.receiver = upstream, receiver
        (conf_dir / "people.toml").write_text(
            f'webhook_url = "{receiver.url}{path}"\nlist_identifier = "$.items"\nrecord_identifier = "$.id"\n'
            f'[api_details]\nbase_url = "{upstream.url}"\npath = "/api"\n')
        self.settings = load_settings({"config_dir": conf_dir, "state_path": state_path})
        self.schedule, self.concurrency, self.timeout, self.secret = list(schedule), concurrency, timeout, secret
        self.url = None  # the target's webhook_url (None: the one stored with each event)
        self.busy_timeout = busy_timeout

    async def __aenter__(self):
        self.store = await Store.open(self.settings.state_path, busy_timeout=self.busy_timeout)
        self.poll_session = poll_session()
        self.source = Source(self.poll_session, max_bytes=10**7)
        self.hook_session = webhook_session(self.concurrency)
        # Looked up per attempt, as the daemon's Daemon._target: a test may change url and secret.
        self.deliverer = Deliverer(self.store, self.hook_session, concurrency=self.concurrency, timeout=self.timeout,
                                   schedule=self.schedule, target=lambda sid: Target(self.url, self.secret))
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.deliverer.run(self.stop))
        return self

    async def __aexit__(self, *exc):
        self.stop.set()
        await self.task
        await self.hook_session.close()
        await self.poll_session.close()
        await self.store.close()

    async def poll(self, items, sync_id="people"):
        self.upstream.body = {"items": items}
        syncs, problems = load_dir(self.settings)
        assert not problems
        result = await poll(syncs[sync_id], self.store, self.source)
        assert result.ok, result.error
        return [orjson.loads(b) for b in result.events]

    async def outbox(self):
        return await self.store.deliveries()


def standard_signature(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    return base64.b64encode(hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()).decode()


def knit_signature(secret: str, body: bytes) -> str:
    return base64.urlsafe_b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode().rstrip("=")


async def test_body_headers_and_signatures(upstream, receiver, conf_dir, state_path):
    async with Rig(upstream, receiver, conf_dir, state_path) as rig:
        events = await rig.poll([{"id": 1, "name": "Ann"}, {"id": "b", "name": "Bob"}])
        await wait_for(lambda: len(receiver.delivered()) == 2)
        assert await rig.outbox() == []  # delivered events leave the outbox
    for entry in receiver.received:
        h, body = entry["headers"], entry["body"]
        event = orjson.loads(body)
        assert event in events
        assert h["Content-Type"] == "application/json" and h["User-Agent"].startswith("syncd/")
        assert h["webhook-id"] == event["eventId"]
        assert abs(int(h["webhook-timestamp"]) - time.time()) < 30
        assert h["webhook-signature"] == "v1," + standard_signature(SECRET, h["webhook-id"], h["webhook-timestamp"], body)
        assert h["X-Knit-Signature"] == knit_signature(SECRET, body)
        assert "=" not in h["X-Knit-Signature"]


async def test_the_official_standard_webhooks_library_verifies_our_signatures(upstream, receiver, conf_dir, state_path):
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    async with Rig(upstream, receiver, conf_dir, state_path) as rig:
        await rig.poll([{"id": 1, "name": "Ann"}, {"id": 2, "name": "Bob"}])
        await wait_for(lambda: len(receiver.delivered()) == 2)
    verifier = Webhook(SECRET)
    for entry in receiver.received:
        headers = {k.lower(): v for k, v in entry["headers"].items()}
        assert verifier.verify(entry["body"], headers) == entry["event"]
        tampered = entry["body"].replace(b"Ann", b"Eve").replace(b"Bob", b"Eve")
        with pytest.raises(WebhookVerificationError):
            verifier.verify(tampered, headers)


async def test_plain_secret_is_used_as_utf8_bytes(upstream, receiver, conf_dir, state_path):
    async with Rig(upstream, receiver, conf_dir, state_path, secret="plain secret") as rig:
        await rig.poll([{"id": 1}])
        await wait_for(lambda: len(receiver.delivered()) == 1)
    h, body = receiver.received[0]["headers"], receiver.received[0]["body"]
    expected = base64.b64encode(hmac.new(b"plain secret", f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + body,
                                         hashlib.sha256).digest()).decode()
    assert h["webhook-signature"] == f"v1,{expected}"


async def test_no_secret_no_signature_headers(upstream, receiver, conf_dir, state_path):
    async with Rig(upstream, receiver, conf_dir, state_path, secret=None) as rig:
        await rig.poll([{"id": 1}])
        await wait_for(lambda: len(receiver.delivered()) == 1)
    assert not {"webhook-signature", "X-Knit-Signature"} & set(receiver.received[0]["headers"])


async def test_retries_until_the_receiver_recovers_and_keeps_record_order(upstream, receiver, conf_dir, state_path):
    first_id = None

    def respond(entry):
        if entry["event"]["eventId"] == first_id and entry["attempt"] <= 3:
            return 503, {}
        return None

    receiver.respond = respond
    with structlog.testing.capture_logs() as logs:
        async with Rig(upstream, receiver, conf_dir, state_path, schedule=[0.05] * 5) as rig:
            first = await rig.poll([{"id": 1, "v": 1}, {"id": 2, "v": 1}])
            first_id = next(e["eventId"] for e in first if e["recordId"] == "1")
            await rig.poll([{"id": 1, "v": 2}, {"id": 2, "v": 2}])
            await wait_for(lambda: len(receiver.delivered()) == 4)
    # One warning for the outage, naming the receiver (host:port only), not one per attempt.
    failing = [e for e in logs if e["event"].startswith("webhook receiver failing")]
    port = receiver.url.split(":")[2].split("/")[0]
    assert len(failing) == 1 and failing[0]["log_level"] == "warning" and failing[0]["receiver"] == f"127.0.0.1:{port}"
    assert [e["log_level"] for e in logs if e["event"] == "delivery failed; will retry"] == ["info", "info"]
    to_one = [r for r in receiver.received if r["event"]["recordId"] == "1"]
    # Four attempts of the first event (same eventId every time), then the second one.
    assert [r["event"]["eventId"] for r in to_one[:4]] == [first_id] * 4
    assert [r["status"] for r in to_one] == [503, 503, 503, 204, 204]
    assert to_one[-1]["event"]["eventData"] == {"id": 1, "v": 2}
    assert to_one[-1]["at"] >= to_one[3]["at"]
    # Record 2 was not held back by record 1's trouble.
    assert [r["event"]["eventData"]["v"] for r in receiver.received if r["event"]["recordId"] == "2"] == [1, 2]


async def test_dead_letters_after_the_schedule_and_replay(upstream, receiver, conf_dir, state_path):
    down = True
    receiver.respond = lambda entry: (500, {}) if down else None
    async with Rig(upstream, receiver, conf_dir, state_path, schedule=[0.1, 0.2]) as rig:
        await rig.poll([{"id": 1}, {"id": 2}])
        await wait_for(lambda: sum(1 for r in receiver.received if r["status"] == 500) == 6, timeout=10)

        async def dead():
            return [d for d in await rig.outbox() if d.state == "dead"]

        for _ in range(100):
            if len(await dead()) == 2:
                break
            await asyncio.sleep(0.05)
        letters = await dead()
        assert len(letters) == 2 and all(d.attempts == 3 and d.last_status == 500 for d in letters)
        assert "HTTP 500" in letters[0].last_error
        await asyncio.sleep(0.3)
        assert len(receiver.received) == 6  # dead letters are not retried on their own

        down = False
        assert await rig.store.replay(now=time.time()) == (2, 0)
        await wait_for(lambda: len(receiver.delivered()) == 2)
        await wait_for(lambda: rig.deliverer.delivered == 2)
        assert await rig.outbox() == []


async def test_gone_is_dead_at_once_and_redirects_are_not_followed(upstream, receiver, conf_dir, state_path):
    def respond(entry):
        if entry["path"] == "/hook":
            rid = entry["event"]["recordId"]
            if rid == "gone":
                return 410, {}
            if rid == "moved":
                return 302, {"Location": f"{receiver.url}/elsewhere"}
        return None

    receiver.respond = respond
    async with Rig(upstream, receiver, conf_dir, state_path, schedule=[0.05, 0.05]) as rig:
        await rig.poll([{"id": "gone"}, {"id": "moved"}, {"id": "fine"}])

        async def settled():
            rows = await rig.outbox()
            return len(rows) == 2 and all(d.state == "dead" for d in rows)

        for _ in range(200):
            if await settled():
                break
            await asyncio.sleep(0.02)
        rows = {d.record_id: d for d in await rig.outbox()}
    assert rows["gone"].attempts == 1 and rows["gone"].last_status == 410
    assert rows["moved"].attempts == 3 and rows["moved"].last_status == 302 and "redirect" in rows["moved"].last_error
    assert not [r for r in receiver.received if r["path"] == "/elsewhere"]
    assert [e["recordId"] for e in receiver.delivered()] == ["fine"]


async def test_a_receiver_that_never_answers_blocks_only_its_records(upstream, receiver, conf_dir, state_path):
    hang = asyncio.Event()

    async def respond(entry):
        if entry["event"]["recordId"] in ("slow1", "slow2"):
            await hang.wait()
        return None

    receiver.respond = respond
    async with Rig(upstream, receiver, conf_dir, state_path, concurrency=4, timeout=30) as rig:
        items = [{"id": "slow1"}, {"id": "slow2"}] + [{"id": f"r{i}"} for i in range(40)]
        await rig.poll(items)
        # 2 of 4 slots hang; the other 40 records flow through the remaining 2 slots.
        await wait_for(lambda: len(receiver.delivered()) == 40, timeout=10)
        hang.set()
        await wait_for(lambda: len(receiver.delivered()) == 42)


async def test_attempt_state_survives_a_restart(upstream, receiver, conf_dir, state_path):
    receiver.respond = lambda entry: (500, {})
    async with Rig(upstream, receiver, conf_dir, state_path, schedule=[0.05, 60]) as rig:
        await rig.poll([{"id": 1}])
        for _ in range(200):
            rows = await rig.outbox()
            if rows and rows[0].attempts == 2:
                break
            await asyncio.sleep(0.02)
    rows = await _read_outbox(state_path)
    assert rows[0].attempts == 2 and rows[0].next_attempt_at > time.time() + 30
    # A new deliverer on the same database waits for the stored next attempt instead of starting over.
    receiver.respond = None
    before = len(receiver.received)
    async with Rig(upstream, receiver, conf_dir, state_path, schedule=[0.05, 60]) as rig:
        await asyncio.sleep(0.5)
        assert len(receiver.received) == before


async def test_an_event_waiting_behind_its_record_is_not_due(upstream, receiver, conf_dir, state_path):
    receiver.respond = lambda entry: (500, {})
    async with Rig(upstream, receiver, conf_dir, state_path, schedule=[3600]) as rig:
        await rig.poll([{"id": 1, "v": 1}])
        for _ in range(200):
            rows = await rig.outbox()
            if rows and rows[0].attempts == 1:
                break
            await asyncio.sleep(0.02)
        await rig.poll([{"id": 1, "v": 2}])  # due now, but behind the first event for an hour
        assert await rig.store.next_due() > time.time() + 2800  # 3600 s -20% jitter at worst
        sent = len(receiver.received)
        await asyncio.sleep(0.3)
        assert len(receiver.received) == sent == 1


async def _read_outbox(state_path):
    async with await Store.open(state_path) as store:
        return await store.deliveries()


def test_retry_delays():
    rnd = random.Random(1)
    schedule = [5.0, 30.0]
    delays = [next_delay(1, schedule, None, rnd) for _ in range(200)]
    assert 4.0 <= min(delays) and max(delays) <= 6.0 and max(delays) - min(delays) > 1.0  # ±20% jitter
    assert next_delay(2, schedule, None, rnd) >= 24.0
    assert next_delay(3, schedule, None, rnd) is None  # exhausted: dead letter
    assert next_delay(1, schedule, 7.0, rnd) == 7.0  # Retry-After honoured
    assert next_delay(1, schedule, 3600.0, rnd) == 10.0  # ... capped at twice the scheduled delay
    assert parse_retry_after("120", 0) == 120.0
    now = time.time()
    assert 50 < parse_retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 60)), now) <= 61
    assert parse_retry_after("soon", now) is None


async def test_retry_after_is_honoured(upstream, receiver, conf_dir, state_path):
    receiver.respond = lambda entry: (429, {"Retry-After": "1"}) if entry["attempt"] == 1 else None
    async with Rig(upstream, receiver, conf_dir, state_path, schedule=[0.05, 0.05]) as rig:
        await rig.poll([{"id": 1}])
        await wait_for(lambda: len(receiver.delivered()) == 1, timeout=10)
    gap = receiver.received[1]["at"] - receiver.received[0]["at"]
    assert 0.09 <= gap  # not the 50 ms schedule: Retry-After 1 s capped at 2 x 50 ms = 100 ms


# -- the CLI ----------------------------------------------------------------------------------

async def test_deliveries_cli(upstream, receiver, conf_dir, state_path):
    receiver.respond = lambda entry: (500, {})
    async with Rig(upstream, receiver, conf_dir, state_path, schedule=[]) as rig:
        events = await rig.poll([{"id": 1}, {"id": 2}])
        for _ in range(200):
            if len([d for d in await rig.outbox() if d.state == "dead"]) == 2:
                break
            await asyncio.sleep(0.02)
    base = ("--state-path", str(state_path), "--config-dir", str(conf_dir))
    code, out, err = await run_cli("deliveries", "list", "--dead", "--json", *base)
    assert code == 0, err
    listed = orjson.loads(out)
    assert sorted(d["eventId"] for d in listed) == sorted(e["eventId"] for e in events)
    assert all(d["state"] == "dead" and d["lastStatus"] == 500 and d["sync"] == "people" for d in listed)
    code, out, _ = await run_cli("deliveries", "list", *base)
    assert code == 0 and "dead" in out and events[0]["eventId"] in out

    code, out, _ = await run_cli("deliveries", "replay", "--event", events[0]["eventId"], *base)
    assert code == 0 and "replayed 1" in out
    code, out, _ = await run_cli("deliveries", "list", "--dead", "--json", *base)
    assert [d["eventId"] for d in orjson.loads(out)] == [events[1]["eventId"]]
    code, out, _ = await run_cli("deliveries", "replay", "--sync", "people", "--since", "1h", *base)
    assert code == 0 and "replayed 1" in out

    async with Rig(upstream, receiver, conf_dir, state_path, schedule=[]) as rig:
        for _ in range(200):
            if len([d for d in await rig.outbox() if d.state == "dead"]) == 2:
                break
            await asyncio.sleep(0.02)
    code, out, _ = await run_cli("deliveries", "purge", "--dead", "--before", "2000-01-01", *base)
    assert code == 0 and "purged 0" in out
    code, out, _ = await run_cli("deliveries", "purge", "--dead", "--before", "2099-01-01T00:00:00Z", *base)
    assert code == 0 and "purged 2" in out
    code, _, err = await run_cli("deliveries", "purge", "--before", "1h", *base)
    assert code == 2 and "--dead" in err


async def test_a_dead_receiver_of_one_sync_does_not_hold_up_another(upstream, receiver, conf_dir, state_path):
    hang = asyncio.Event()

    async def respond(entry):
        if entry["path"] == "/stuck":
            await hang.wait()
        return None

    receiver.respond = respond
    async with Rig(upstream, receiver, conf_dir, state_path, concurrency=4, timeout=1.5, path="/stuck",
                   schedule=[60]) as rig:
        await rig.poll([{"id": i} for i in range(40)])  # 40 events to a receiver that never answers
        await wait_for(lambda: rig.deliverer._in_flight == 4, timeout=5)
        (conf_dir / "other.toml").write_text(
            f'webhook_url = "{receiver.url}/hook"\nlist_identifier = "$.items"\nrecord_identifier = "$.id"\n'
            f'[api_details]\nbase_url = "{upstream.url}"\npath = "/api"\n')
        await rig.poll([{"id": "x"}, {"id": "y"}], sync_id="other")
        # At most one webhook_timeout later the stuck sync has to share the workers: the other
        # sync's events go out long before the 40 stuck ones could have timed out 4 at a time.
        await wait_for(lambda: len(receiver.delivered()) == 2, timeout=4)
        hang.set()


async def test_outcomes_that_cannot_be_recorded_are_kept_not_resent(upstream, receiver, conf_dir, state_path):
    import sqlite3

    async with Rig(upstream, receiver, conf_dir, state_path, busy_timeout=0.05) as rig:
        locker = sqlite3.connect(state_path, timeout=0.05, isolation_level=None)
        await rig.poll([{"id": i} for i in range(5)])
        locker.execute("BEGIN EXCLUSIVE")  # writers now fail with 'database is locked'; readers go on
        try:
            await wait_for(lambda: len(receiver.received) == 5, timeout=5)
            await asyncio.sleep(1.0)
            assert len(receiver.received) == 5  # delivered once each, not again and again
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        for _ in range(200):
            if not await rig.outbox():
                break
            await asyncio.sleep(0.05)
        assert await rig.outbox() == []
    assert len(receiver.received) == 5
