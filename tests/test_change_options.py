"""Change-semantics options and lifecycle events (DESIGN §7, §9), through the real CLI and daemon.

Each option changes exactly what it promises and nothing else."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import orjson
import pytest

from syncd.diff import changed_fields

from conftest import cli_env, run_cli, wait_for


def sync_file(conf_dir, upstream, *, name="s", extra="", webhook="http://127.0.0.1:9/hook"):
    (conf_dir / f"{name}.toml").write_text(
        f'webhook_url = "{webhook}"\nlist_identifier = "$.items"\nrecord_identifier = "$.id"\n{extra}\n'
        f'[api_details]\nbase_url = "{upstream.url}"\npath = "/{name}"\n[api_details.retry]\nretries = 0\n')


async def once(conf_dir, state_path, *flags, name="s"):
    code, out, err = await run_cli("once", name, "--config-dir", str(conf_dir), "--state-path", str(state_path), *flags,
                                   env=cli_env(SYNCD_LOG_LEVEL="error"))
    return code, [orjson.loads(line) for line in out.splitlines()], err


def kinds(events):
    return sorted((e["eventType"], e["recordId"]) for e in events)


def items(*records):
    return {"items": list(records)}


async def test_events_excluding_modified_sends_deletions_but_not_modifications(upstream, conf_dir, state_path):
    sync_file(conf_dir, upstream, extra='events = ["record.new", "record.deleted"]')
    upstream.bodies["/s"] = items({"id": 1, "v": 1}, {"id": 2, "v": 1})
    assert kinds((await once(conf_dir, state_path))[1]) == [("record.new", "1"), ("record.new", "2")]
    upstream.bodies["/s"] = items({"id": 1, "v": 2}, {"id": 2, "v": 1})
    code, events, _ = await once(conf_dir, state_path)
    assert code == 0 and events == []
    upstream.bodies["/s"] = items({"id": 1, "v": 2})
    assert kinds((await once(conf_dir, state_path))[1]) == [("record.deleted", "2")]
    # The state advanced through the unsent modification: nothing is sent for it later either.
    upstream.bodies["/s"] = items({"id": 1, "v": 2}, {"id": 3})
    assert kinds((await once(conf_dir, state_path))[1]) == [("record.new", "3")]


async def test_initial_sync_skip_baselines_silently(upstream, conf_dir, state_path):
    sync_file(conf_dir, upstream, extra='initial_sync = "skip"')
    upstream.bodies["/s"] = items({"id": 1, "v": 1}, {"id": 2, "v": 1})
    code, events, _ = await once(conf_dir, state_path)
    assert code == 0 and events == []
    upstream.bodies["/s"] = items({"id": 1, "v": 2}, {"id": 2, "v": 1})
    code, events, _ = await once(conf_dir, state_path)
    assert kinds(events) == [("record.modified", "1")] and events[0]["syncType"] == "delta_sync"


async def test_confirm_deletes_after_two_runs_survives_restarts_and_cancels(upstream, conf_dir, state_path):
    sync_file(conf_dir, upstream, extra="confirm_deletes_after = 2")
    upstream.bodies["/s"] = items({"id": 1}, {"id": 2, "v": 1}, {"id": 3})
    await once(conf_dir, state_path)
    # Missing once: nothing (each `once` is a new process: the pending deletion is in the database).
    upstream.bodies["/s"] = items({"id": 1}, {"id": 3})
    code, events, _ = await once(conf_dir, state_path)
    assert code == 0 and events == []
    code, out, _ = await run_cli("status", "--json", "--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert orjson.loads(out)["syncs"][0]["pending_deletions"] == 1
    # The same response again still counts: missing twice sends one record.deleted.
    code, events, _ = await once(conf_dir, state_path)
    assert kinds(events) == [("record.deleted", "2")]
    code, events, _ = await once(conf_dir, state_path)
    assert events == []
    # Back before confirmation: no event at all; back changed: record.modified.
    upstream.bodies["/s"] = items({"id": 1})
    assert (await once(conf_dir, state_path))[1] == []
    upstream.bodies["/s"] = items({"id": 1}, {"id": 3})
    assert (await once(conf_dir, state_path))[1] == []
    upstream.bodies["/s"] = items({"id": 1})
    assert (await once(conf_dir, state_path))[1] == []
    upstream.bodies["/s"] = items({"id": 1}, {"id": 3, "v": 9})
    assert kinds((await once(conf_dir, state_path))[1]) == [("record.modified", "3")]
    code, out, _ = await run_cli("status", "--json", "--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert orjson.loads(out)["syncs"][0]["pending_deletions"] == 0


async def test_max_delete_fraction_holds_a_mass_delete_until_accepted(upstream, conf_dir, state_path):
    sync_file(conf_dir, upstream, extra="max_delete_fraction = 0.5")
    upstream.bodies["/s"] = items(*({"id": i} for i in range(10)))
    await once(conf_dir, state_path)
    upstream.bodies["/s"] = items({"id": 0}, {"id": 1})
    code, events, err = await once(conf_dir, state_path)
    assert code == 1 and events == []
    assert "max_delete_fraction" in err and "--accept-deletes" in err and "8 of 10" in err
    code, out, _ = await run_cli("status", "--json", "--config-dir", str(conf_dir), "--state-path", str(state_path))
    view = orjson.loads(out)["syncs"][0]
    assert view["deletes_held"] == 8 and view["records"] == 10
    code, events, _ = await once(conf_dir, state_path, "--accept-deletes")
    assert code == 0 and kinds(events) == sorted(("record.deleted", str(i)) for i in range(2, 10))
    # Deletions up to the fraction go through without asking; a small sync is exempt.
    upstream.bodies["/s"] = items({"id": 0})
    assert kinds((await once(conf_dir, state_path))[1]) == [("record.deleted", "1")]


def test_changed_fields_lists_exactly_the_changed_leaves():
    before = {"a": {"b": 1, "c": [1, 2, 3], "d": {"e": "x"}}, "tags": ["p", "q"], "same": True, "gone": {"x": 1}}
    after = {"a": {"b": 2, "c": [1, 5], "d": {"e": "x"}}, "tags": ["p", "q", "r"], "same": True, "new": None}
    assert changed_fields(before, after) == ["$.a.b", "$.a.c[1]", "$.a.c[2]", "$.gone.x", "$.new", "$.tags[2]"]
    assert changed_fields({"n": 1}, {"n": 1.0}) == ["$.n"]  # 1 and 1.0 fingerprint differently
    assert changed_fields({"x y": 1}, {"x y": 2}) == ["$['x y']"]


async def test_keep_records_sends_changed_fields_and_the_last_body(upstream, conf_dir, state_path):
    sync_file(conf_dir, upstream, extra='keep_records = true\nignore_fields = ["$.seen"]')
    upstream.bodies["/s"] = items({"id": 1, "a": {"b": 1, "c": [1, 2]}, "seen": 1}, {"id": 2, "name": "Bo", "seen": 1})
    await once(conf_dir, state_path)
    upstream.bodies["/s"] = items({"id": 1, "a": {"b": 2, "c": [1, 2, 3]}, "seen": 2})
    code, events, _ = await once(conf_dir, state_path)
    by = {e["eventType"]: e for e in events}
    assert by["record.modified"]["changedFields"] == ["$.a.b", "$.a.c[2]"]  # never $.seen, though it changed
    assert by["record.deleted"]["eventData"] == {"id": 2, "name": "Bo", "seen": 1}
    # A change of an ignored field alone is no change at all.
    upstream.bodies["/s"] = items({"id": 1, "a": {"b": 2, "c": [1, 2, 3]}, "seen": 3})
    assert (await once(conf_dir, state_path))[1] == []


async def test_keep_records_compares_exact_numbers_exactly(upstream, conf_dir, state_path):
    # Numbers a double cannot hold, stored and read back: only the leaves that changed are named,
    # and a record holding 1e400 does not fail the run when another of its fields changes.
    sync_file(conf_dir, upstream, extra="keep_records = true")
    upstream.bodies["/s"] = (b'{"items":[{"id":1,"big":123456789012345678901234567890,"dec":0.10000000000000000001,'
                             b'"w":1,"tags":["a"]},{"id":2,"huge":1e400,"w":1}]}')
    assert (await run_cli("once", "s", "--config-dir", str(conf_dir), "--state-path", str(state_path)))[0] == 0
    upstream.bodies["/s"] = (b'{"items":[{"id":1,"big":123456789012345678901234567890,"dec":0.10000000000000000001,'
                             b'"w":2,"tags":["a","b"]},{"id":2,"huge":1e400,"w":2}]}')
    code, out, err = await run_cli("once", "s", "--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert code == 0, err
    by = {e["recordId"]: e for e in map(json.loads, out.splitlines())}  # json: 1e400 is a float('inf') there
    assert by["1"]["changedFields"] == ["$.tags[1]", "$.w"]
    assert by["2"]["changedFields"] == ["$.w"]


async def test_without_keep_records_nothing_extra(upstream, conf_dir, state_path):
    sync_file(conf_dir, upstream)
    upstream.bodies["/s"] = items({"id": 1, "v": 1}, {"id": 2})
    await once(conf_dir, state_path)
    upstream.bodies["/s"] = items({"id": 1, "v": 2})
    events = (await once(conf_dir, state_path))[1]
    by = {e["eventType"]: e for e in events}
    assert "changedFields" not in by["record.modified"] and by["record.deleted"]["eventData"] is None


async def test_processed_follows_every_successful_run_once(upstream, conf_dir, state_path):
    sync_file(conf_dir, upstream, extra='events = ["record.new", "record.modified", "record.deleted", "sync.events.processed"]')
    upstream.bodies["/s"] = items({"id": 1}, {"id": 2}, {"nope": 1})
    code, events, _ = await once(conf_dir, state_path)
    assert [e["eventType"] for e in events] == ["record.new", "record.new", "sync.events.processed"]
    processed = events[-1]
    assert processed["recordId"] is None and processed["syncType"] == "initial_sync"
    assert processed["eventData"] == {"recordsProcessed": 2, "eventsEmitted": 2, "new": 2, "modified": 0, "deleted": 0,
                                      "skipped": 1, "outcome": "changed"}
    # Unchanged (byte-identical): still exactly one processed event.
    code, events, _ = await once(conf_dir, state_path)
    assert [e["eventType"] for e in events] == ["sync.events.processed"]
    assert events[0]["eventData"]["outcome"] == "unchanged" and events[0]["eventData"]["eventsEmitted"] == 0
    # A failed run sends none.
    upstream.status = 500
    code, events, _ = await once(conf_dir, state_path)
    assert code == 1 and events == []
    # A re-baseline (ignore_fields changed) sends no record event; its processed is a delta_sync.
    upstream.status = 200
    sync_file(conf_dir, upstream, extra='events = ["record.new", "record.modified", "record.deleted", '
                                         '"sync.events.processed"]\nignore_fields = ["$.x"]')
    code, events, _ = await once(conf_dir, state_path)
    assert [(e["eventType"], e["syncType"], e["eventData"]["outcome"]) for e in events] == [
        ("sync.events.processed", "delta_sync", "baseline")]


async def test_lifecycle_events_through_the_daemon_and_a_kill(upstream, receiver, conf_dir, state_path, daemons):
    lifecycle = '["record.new", "record.modified", "record.deleted", "sync.events.processed", "sync.events.allConsumed"]'
    sync_file(conf_dir, upstream, extra=f'events = {lifecycle}\ninterval = "1h"', webhook=f"{receiver.url}/hook")
    upstream.bodies["/s"] = items({"id": 1}, {"id": 2})
    base = ("--config-dir", str(conf_dir), "--state-path", str(state_path))
    # Run 1 is committed by `once` (record events + processed, one transaction); nothing delivers it yet.
    code, run1, _ = await once(conf_dir, state_path)
    assert code == 0 and len(run1) == 3
    # The daemon delivers run 1, but is killed (-9) the moment the receiver has the last event of
    # it: the allConsumed, which is announced only after the outcomes are written, must survive.
    killed = {}

    def respond(entry):
        if entry["event"]["eventType"] == "sync.events.processed" and not killed:
            killed["pid"] = d.proc.pid
            os.kill(d.proc.pid, signal.SIGKILL)
        return None

    receiver.respond = respond
    d = await daemons(*base)
    await wait_for(lambda: killed and d.proc.returncode is not None, timeout=20)
    d2 = await daemons(*base)
    run_id = run1[0]["syncRunId"]

    def consumed():
        return [e for e in receiver.delivered() if e["eventType"] == "sync.events.allConsumed"]

    await wait_for(lambda: consumed(), timeout=20)
    got = consumed()[0]
    assert got["eventData"] == {"syncRunId": run_id, "eventsDelivered": 3, "deadLetters": 0}
    assert got["syncRunId"] == run_id and got["recordId"] is None
    # Every event of run 1 arrived before its allConsumed.
    order = [e["eventId"] for e in receiver.delivered()]
    assert all(order.index(e["eventId"]) < order.index(got["eventId"]) for e in run1)
    assert await d2.stop() == 0
    assert len({e["eventId"] for e in consumed()}) == 1


async def test_all_consumed_counts_dead_letters(upstream, receiver, conf_dir, state_path, daemons):
    lifecycle = '["record.new", "record.modified", "record.deleted", "sync.events.allConsumed"]'
    sync_file(conf_dir, upstream, extra=f'events = {lifecycle}\ninterval = "1h"', webhook=f"{receiver.url}/hook")
    upstream.bodies["/s"] = items({"id": 1}, {"id": 2})
    code, run1, _ = await once(conf_dir, state_path)
    receiver.respond = lambda entry: (410, {}) if entry["event"].get("recordId") == "2" else None
    d = await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path))
    await wait_for(lambda: any(e["eventType"] == "sync.events.allConsumed" for e in receiver.delivered()), timeout=20)
    got = next(e for e in receiver.delivered() if e["eventType"] == "sync.events.allConsumed")
    assert got["eventData"] == {"syncRunId": run1[0]["syncRunId"], "eventsDelivered": 1, "deadLetters": 1}
    assert await d.stop() == 0


@pytest.mark.parametrize("events", ['["record.gone"]', '["record.new", "record.new"]'])
async def test_invalid_events_option_is_a_check_error(events, upstream, conf_dir):
    sync_file(conf_dir, upstream, extra=f"events = {events}")
    code, _, err = await run_cli("check", "--config-dir", str(conf_dir))
    assert code == 78 and "s.toml: events:" in err


async def test_default_retry_schedule_spans_four_days():
    from syncd.settings import DEFAULT_RETRY_SCHEDULE
    from syncd.units import parse_duration

    assert sum(parse_duration(d) for d in DEFAULT_RETRY_SCHEDULE) * 0.8 >= 4 * 86400
    code, out, _ = await run_cli("run", "--help")
    assert "24h" in out and "4 days" in out
    await asyncio.sleep(0)


async def test_keep_records_turned_on_later_and_off_again(upstream, conf_dir, state_path):
    sync_file(conf_dir, upstream)
    upstream.bodies["/s"] = items({"id": 1, "v": 1}, {"id": 2, "v": 1})
    await once(conf_dir, state_path)
    sync_file(conf_dir, upstream, extra="keep_records = true")
    assert (await once(conf_dir, state_path))[1] == []  # bodies stored, nothing sent
    upstream.bodies["/s"] = items({"id": 1, "v": 2})
    by = {e["eventType"]: e for e in (await once(conf_dir, state_path))[1]}
    assert by["record.modified"]["changedFields"] == ["$.v"]
    assert by["record.deleted"]["eventData"] == {"id": 2, "v": 1}
    sync_file(conf_dir, upstream)
    upstream.bodies["/s"] = items({"id": 1, "v": 3})
    by = {e["eventType"]: e for e in (await once(conf_dir, state_path))[1]}
    assert "changedFields" not in by["record.modified"]
    import sqlite3

    conn = sqlite3.connect(state_path)
    assert conn.execute("SELECT count(*) FROM records WHERE body IS NOT NULL").fetchone()[0] == 0
    conn.close()
