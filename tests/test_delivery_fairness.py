"""Several syncs share the delivery workers: receivers that never answer keep at most their share,
so every other sync's events go out within about one webhook_timeout."""

from __future__ import annotations

import asyncio

import pytest

from conftest import wait_for
from test_delivery import Rig

TIMEOUT = 1.0  # webhook_timeout


def hung_sync(conf_dir, name, receiver, upstream):
    (conf_dir / f"{name}.toml").write_text(
        f'webhook_url = "{receiver.url}/stuck/{name}"\nlist_identifier = "$.items"\nrecord_identifier = "$.id"\n'
        f'[api_details]\nbase_url = "{upstream.url}"\npath = "/api"\n')


# 8 workers. 1 and 2 hung syncs took every worker back after each timeout (a share of 3/4 each);
# with 5 a share of ceil(8/6) = 2 each would still let them hold all 8; 7 is one sync per worker.
@pytest.mark.parametrize("hung", [1, 2, 5, 7])
async def test_receivers_that_never_answer_delay_another_sync_by_one_timeout_at_most(upstream, receiver, conf_dir,
                                                                                       state_path, hung):
    hang = asyncio.Event()

    async def respond(entry):
        if entry["path"].startswith("/stuck/"):
            await hang.wait()
        return None

    receiver.respond = respond
    async with Rig(upstream, receiver, conf_dir, state_path, concurrency=8, timeout=TIMEOUT, schedule=[60]) as rig:
        try:
            for i in range(hung):
                hung_sync(conf_dir, f"stuck{i}", receiver, upstream)
                await rig.poll([{"id": f"{i}-{n}"} for n in range(30)], sync_id=f"stuck{i}")
            await wait_for(lambda: rig.deliverer._in_flight == 8, timeout=3)  # every worker waits on a hung receiver
            loop = asyncio.get_running_loop()
            queued = loop.time()
            await rig.poll([{"id": n} for n in range(50)])  # the good sync ("people", to /hook)
            await wait_for(lambda: len(receiver.delivered()) == 50, timeout=TIMEOUT + 2)
            took = loop.time() - queued
            # The attempts holding the workers end within one timeout (swept up to 10% late); then
            # the good sync has its share of the workers. The rest is margin for a loaded machine.
            assert took < TIMEOUT + 0.8, took
        finally:
            hang.set()


async def test_the_feeder_does_not_spin_while_an_attempt_hangs(upstream, receiver, conf_dir, state_path):
    # One attempt in flight and nothing else claimable: the feeder looks for newly due syncs twice
    # a second, not in a 10 ms loop of queries.
    hang = asyncio.Event()

    async def respond(entry):
        await hang.wait()

    receiver.respond = respond
    async with Rig(upstream, receiver, conf_dir, state_path, concurrency=4, timeout=5.0, schedule=[60]) as rig:
        store, counts = rig.store, {"due_syncs": 0, "claim_due": 0}
        real_due, real_claim = store.due_syncs, store.claim_due

        async def due_syncs(now):
            counts["due_syncs"] += 1
            return await real_due(now)

        async def claim_due(*args, **kwargs):
            counts["claim_due"] += 1
            return await real_claim(*args, **kwargs)

        store.due_syncs, store.claim_due = due_syncs, claim_due
        try:
            await rig.poll([{"id": 1}])
            await wait_for(lambda: rig.deliverer._in_flight == 1, timeout=3)
            before = dict(counts)
            await asyncio.sleep(1.0)  # a window to count in: nothing is to happen
            assert all(counts[k] - before[k] <= 6 for k in counts), (before, counts)
        finally:
            hang.set()
