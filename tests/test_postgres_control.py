"""The control API with several instances on one PostgreSQL database: a pause, a resume or a
trigger sent to any instance reaches the instance that polls the sync."""

from __future__ import annotations

from test_control_api import KEY, call

from conftest import wait_for, write_sync


async def test_pause_and_trigger_through_an_instance_that_does_not_poll_the_sync(
        pg_url, inproc_daemons, upstream, conf_dir, tmp_path):
    upstream.body = {"items": [{"id": 1}]}
    write_sync(conf_dir, "one", upstream.url, path="/one", extra='interval = "1h"',
               list_identifier="$.items", record_identifier="$.id")
    common = dict(state_url=pg_url, lease_ttl=3, api_keys=[KEY])
    a = await inproc_daemons(conf_dir, tmp_path / "a.db", instance_id="a", **common)
    # One sync, one instance: `a` holds it and makes the initial poll.
    await wait_for(lambda: upstream.hits("/one"), 15)
    b = await inproc_daemons(conf_dir, tmp_path / "b.db", instance_id="b", **common)
    assert a.daemon._owned == {"one"} and b.daemon._owned == set()

    # Trigger through b: a polls now, though the interval is an hour.
    hits = len(upstream.hits("/one"))
    status, answer = await call(b.address, "POST", "sync.custom.trigger", {"syncJobId": "one"})
    assert status == 200 and answer["data"]["triggered"] is True, answer
    await wait_for(lambda: len(upstream.hits("/one")) > hits, 10)

    # Pause through b: a stops polling it (its registry follows the database), and says so.
    status, answer = await call(b.address, "POST", "sync.custom.pause", {"syncJobId": "one"})
    assert status == 200 and answer["data"]["paused"] is True
    await wait_for(lambda: "one" in a.daemon.registry.paused, 10)
    status, answer = await call(a.address, "POST", "sync.custom.trigger", {"syncJobId": "one"})
    assert status == 409 and "paused" in answer["error"]["msg"]

    # Resume through b. A paused sync's lease was given back; either instance may take it now,
    # and both show the same owner.
    status, answer = await call(b.address, "POST", "sync.custom.resume", {"syncJobId": "one"})
    assert status == 200
    await wait_for(lambda: "one" not in a.daemon.registry.paused, 10)
    await wait_for(lambda: (a.daemon._owned or set()) | (b.daemon._owned or set()) == {"one"}, 10)
    owner = "a" if a.daemon._owned else "b"
    assert [v["owner"] for v in await a.daemon.syncs_status()] == [owner]
    assert [v["owner"] for v in await b.daemon.syncs_status()] == [owner]
    # Metrics: the owner says 1, the other 0, and each names itself.
    owner_d, other_d = (a, b) if owner == "a" else (b, a)
    owner_text, other_text = owner_d.daemon.metrics.render().decode(), other_d.daemon.metrics.render().decode()
    assert 'syncd_sync_owned{sync="one"} 1.0' in owner_text
    assert 'syncd_sync_owned{sync="one"} 0.0' in other_text
    assert f'syncd_instance_info{{backend="postgresql",instance_id="{owner}"}} 1.0' in owner_text


async def test_trigger_right_after_a_pause_or_resume_through_another_instance(
        pg_url, inproc_daemons, upstream, conf_dir, tmp_path):
    """The owner's registry follows the database only at its lease renewals: its trigger must ask
    the database, or a sync paused a moment ago through another instance is polled."""
    upstream.body = {"items": [{"id": 1}]}
    write_sync(conf_dir, "one", upstream.url, path="/one", extra='interval = "1h"',
               list_identifier="$.items", record_identifier="$.id")
    common = dict(state_url=pg_url, lease_ttl=30, api_keys=[KEY])  # renewals 10 s apart: none in between
    a = await inproc_daemons(conf_dir, tmp_path / "a.db", instance_id="a", **common)
    await wait_for(lambda: upstream.hits("/one"), 15)
    b = await inproc_daemons(conf_dir, tmp_path / "b.db", instance_id="b", **common)
    assert a.daemon._owned == {"one"}

    status, answer = await call(b.address, "POST", "sync.custom.pause", {"syncJobId": "one"})
    assert status == 200
    status, answer = await call(a.address, "POST", "sync.custom.trigger", {"syncJobId": "one"})
    assert status == 409 and "paused" in answer["error"]["msg"], answer

    hits = len(upstream.hits("/one"))
    status, answer = await call(b.address, "POST", "sync.custom.resume", {"syncJobId": "one"})
    assert status == 200
    status, answer = await call(a.address, "POST", "sync.custom.trigger", {"syncJobId": "one"})
    assert status == 200 and answer["data"]["triggered"] is True, answer
    await wait_for(lambda: len(upstream.hits("/one")) > hits, 15)
