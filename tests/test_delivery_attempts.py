"""Delivery attempts as a receiver sees them: the attempt timeout, per-record order with outcomes
written in batches, and targets that change on reload."""

from __future__ import annotations

import asyncio
import base64
import random
import sqlite3
import time

from conftest import wait_for
from test_delivery import Rig, knit_signature, standard_signature


async def test_an_attempt_without_an_answer_fails_after_webhook_timeout(upstream, receiver, conf_dir, state_path):
    hang = asyncio.Event()
    arrivals = []

    async def respond(entry):
        arrivals.append(entry)
        if entry["event"]["recordId"] == "1":
            await hang.wait()
        return None

    receiver.respond = respond
    try:
        # One worker: after the timeout it must go on with the other records.
        async with Rig(upstream, receiver, conf_dir, state_path, concurrency=1, timeout=0.5, schedule=[60]) as rig:
            await rig.poll([{"id": 1}, {"id": 2}, {"id": 3}])
            await wait_for(lambda: len(receiver.delivered()) == 2, timeout=10)
            for _ in range(200):  # the receiver answered; the outcomes are committed in a batch soon after
                rows = [d for d in await rig.outbox() if d.record_id == "1" and d.attempts]
                if rows:
                    break
                await asyncio.sleep(0.02)
            (row,) = rows
            assert row.attempts == 1
            assert row.last_error == "no complete response within webhook_timeout of 0.5s"
            sent = {e["event"]["recordId"]: e["at"] for e in arrivals}
            # Not cut short, and not much later than the timeout (the sweep runs every 10% of it). The
            # margins: the attempt's clock starts a little before the receiver sees it; a loaded machine.
            assert 0.4 <= sent["2"] - sent["1"] < 2.5
    finally:
        hang.set()


async def test_a_records_next_event_waits_until_the_previous_outcome_is_committed(upstream, receiver, conf_dir,
                                                                                  state_path):
    """Outcomes are written in batches: a record's next event still goes out only once the outcome
    of the one before is in the database (another process would see it delivered)."""
    order: dict[str, list[tuple[int, str]]] = {}  # record -> (version, eventId) in the order received
    overtaken = []
    db = None
    rnd = random.Random(3)

    async def respond(entry):
        event = entry["event"]
        record, version = event["recordId"], event["eventData"]["v"]
        earlier = order.setdefault(record, [])
        if earlier:
            marks = ",".join("?" * len(earlier))
            held = db.execute(f"SELECT count(*) FROM outbox WHERE event_id IN ({marks}) AND dead_at IS NULL",
                              [event_id for _, event_id in earlier]).fetchone()[0]
            if held:
                overtaken.append((record, version))
        earlier.append((version, event["eventId"]))
        await asyncio.sleep(rnd.random() * 0.01)
        return None

    receiver.respond = respond
    try:
        async with Rig(upstream, receiver, conf_dir, state_path, concurrency=8) as rig:
            db = sqlite3.connect(state_path, timeout=5)  # a second reader sees committed rows only
            for version in (1, 2, 3):
                await rig.poll([{"id": i, "v": version} for i in range(30)])
            await wait_for(lambda: len(receiver.delivered()) == 90, timeout=20)
    finally:
        if db is not None:
            db.close()
    assert overtaken == []
    assert {record: [v for v, _ in sent] for record, sent in order.items()} == {str(i): [1, 2, 3] for i in range(30)}


async def test_a_changed_webhook_url_or_secret_applies_to_the_next_attempt(upstream, receiver, conf_dir, state_path):
    async with Rig(upstream, receiver, conf_dir, state_path) as rig:
        await rig.poll([{"id": 1, "v": 1}])
        await wait_for(lambda: len(receiver.received) == 1)
        new_secret = "whsec_" + base64.b64encode(b"another secret of 32 bytes......").decode()
        rig.url, rig.secret = f"{receiver.url}/moved", new_secret  # what a reload of the sync's file does
        await rig.poll([{"id": 1, "v": 2}])
        await wait_for(lambda: len(receiver.received) == 2)
        rig.secret = None
        await rig.poll([{"id": 1, "v": 3}])
        await wait_for(lambda: len(receiver.received) == 3)
    first, second, third = receiver.received
    assert first["path"] == "/hook" and second["path"] == third["path"] == "/moved"
    h = second["headers"]
    assert h["webhook-signature"] == "v1," + standard_signature(new_secret, h["webhook-id"], h["webhook-timestamp"],
                                                                second["body"])
    assert h["X-Knit-Signature"] == knit_signature(new_secret, second["body"])
    assert "webhook-signature" not in third["headers"] and "X-Knit-Signature" not in third["headers"]
    assert abs(int(h["webhook-timestamp"]) - time.time()) < 30
