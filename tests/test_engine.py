"""One poll, end to end: a real local API, a real SQLite file, the engine as the daemon runs it."""

from __future__ import annotations

import asyncio
import copy

import orjson
import pytest

from syncd.config import load_dir
from syncd.engine import poll
from syncd.http import poll_session
from syncd.settings import load_settings
from syncd.source.fetcher import Source
from syncd.store import Store

from conftest import write_sync

SEED = {"response": {"payload": {"employees": [
    {"employee": {"id": 1, "name": "John"}},
    {"employee": {"id": 2, "name": "Jane"}},
]}}}


class Harness:
    def __init__(self, conf_dir, state_path, sync_id="employees", **settings):
        self.settings = load_settings({"config_dir": conf_dir, "state_path": state_path, **settings})
        self.sync_id = sync_id

    async def __aenter__(self):
        self.store = await Store.open(self.settings.state_path)
        self.session = poll_session()
        self.source = Source(self.session, max_bytes=int(self.settings.max_response_bytes))
        return self

    async def __aexit__(self, *exc):
        await self.session.close()
        await self.store.close()

    async def poll(self, *, dry_run=False):
        syncs, problems = load_dir(self.settings)
        assert not problems, problems
        self.source.max_bytes = int(self.settings.max_response_bytes)
        result = await poll(syncs[self.sync_id], self.store, self.source, dry_run=dry_run)
        result.parsed = [orjson.loads(b) for b in result.events]
        return result

    async def fingerprints(self):
        state = await self.store.sync_state(self.sync_id)
        return dict(await self.store.fingerprints(state))


@pytest.fixture
async def employees(upstream, conf_dir, state_path):
    upstream.body = copy.deepcopy(SEED)
    write_sync(conf_dir, "employees", upstream.url)
    async with Harness(conf_dir, state_path) as h:
        yield h


def kinds(result):
    return [(e["eventType"], e["recordId"]) for e in result.parsed]


async def test_seed_example_initial_then_deltas(employees, upstream):
    first = await employees.poll()
    assert first.ok and sorted(kinds(first)) == [("record.new", "1"), ("record.new", "2")]
    assert {e["syncType"] for e in first.parsed} == {"initial_sync"}
    jane = next(e for e in first.parsed if e["recordId"] == "2")
    assert jane["eventData"] == {"employee": {"id": 2, "name": "Jane"}}
    assert jane["syncJobId"] == "employees" and jane["syncRunId"] == first.run_id
    assert jane["eventId"].startswith("evt_") and jane["timestamp"].endswith("Z")
    assert list(jane) == ["eventId", "eventType", "eventData", "syncType", "syncJobId", "syncRunId", "recordId", "timestamp"]

    upstream.body["response"]["payload"]["employees"][1]["employee"]["name"] = "Janet"
    renamed = await employees.poll()
    assert kinds(renamed) == [("record.modified", "2")]
    assert renamed.parsed[0]["syncType"] == "delta_sync"
    assert renamed.parsed[0]["eventData"]["employee"]["name"] == "Janet"

    del upstream.body["response"]["payload"]["employees"][0]
    removed = await employees.poll()
    assert kinds(removed) == [("record.deleted", "1")]
    assert removed.parsed[0]["eventData"] is None

    upstream.body["response"]["payload"]["employees"].append({"employee": {"id": "x-3", "name": "Max"}})
    added = await employees.poll()
    assert kinds(added) == [("record.new", "x-3")]

    # Reordering the list or the keys inside records changes nothing.
    upstream.body["response"]["payload"]["employees"].reverse()
    upstream.body["response"]["payload"]["employees"] = [
        {"employee": dict(reversed(list(r["employee"].items())))} for r in upstream.body["response"]["payload"]["employees"]
    ]
    upstream.body = {"response": {"payload": upstream.body["response"]["payload"]}, "meta": None}
    reordered = await employees.poll()
    assert reordered.ok and reordered.parsed == []

    # The outbox holds every event of every run, in order.
    outbox = await employees.store.outbox("employees")
    assert [(e.event_type, e.record_id) for e in outbox] == (
        sorted(kinds(first)) if kinds(first)[0][1] == "1" else kinds(first)
    ) + [("record.modified", "2"), ("record.deleted", "1"), ("record.new", "x-3")]
    assert [orjson.loads(e.envelope()) for e in outbox][-1] == added.parsed[0]


async def test_unchanged_response_is_a_successful_run_without_events(employees, upstream):
    await employees.poll()
    again = await employees.poll()
    assert again.ok and again.outcome == "unchanged" and again.events == []
    runs = await employees.store.runs("employees")
    assert [r.outcome for r in runs] == ["unchanged", "changed"]


async def test_whole_mode(upstream, conf_dir, state_path):
    upstream.body = {"version": 1, "flags": {"a": True}}
    write_sync(conf_dir, "settings-doc", upstream.url, list_identifier=None, record_identifier=None)
    async with Harness(conf_dir, state_path, sync_id="settings-doc") as h:
        first = await h.poll()
        assert kinds(first) == [("record.new", "settings-doc")]
        assert first.parsed[0]["eventData"] == {"version": 1, "flags": {"a": True}}
        upstream.body = {"flags": {"a": True}, "version": 1}
        assert (await h.poll()).parsed == []
        upstream.body = {"version": 2, "flags": {"a": True}}
        changed = await h.poll()
        assert kinds(changed) == [("record.modified", "settings-doc")]
        assert changed.parsed[0]["eventData"] == {"version": 2, "flags": {"a": True}}
        # Any JSON value is a whole record, an array included (array order matters inside a record).
        upstream.body = [1, 2]
        assert kinds(await h.poll()) == [("record.modified", "settings-doc")]
        upstream.body = [2, 1]
        assert kinds(await h.poll()) == [("record.modified", "settings-doc")]


FAILURES = {
    "http 500": dict(status=500, body={"error": "boom"}),
    "http 404": dict(status=404, body={"error": "nope"}),
    "invalid json": dict(body=b'{"response": {"payload": {"employees": [1, 2'),
    "html page with 200": dict(body=b"<html><body>Maintenance</body></html>", content_type="text/html"),
    "NaN literal": dict(body=b'{"response": {"payload": {"employees": [{"employee": {"id": NaN}}]}}}'),
    "invalid utf-8": dict(body=b'{"response": {"payload": {"employees": ["\xff"]}}}'),
    "too deep": dict(body=b'{"response": {"payload": {"employees": [' + b"[" * 2000 + b"]" * 2000 + b"]}}}"),
    "list path missing": dict(body={"response": {"payload": {}}}),
    "list path is an object": dict(body={"response": {"payload": {"employees": {"employee": {"id": 1}}}}}),
    "list path is null": dict(body={"response": {"payload": {"employees": None}}}),
    "empty body": dict(body=b""),
}


@pytest.mark.parametrize("failure", FAILURES, ids=list(FAILURES))
async def test_failed_run_changes_nothing(employees, upstream, failure):
    await employees.poll()
    before = await employees.fingerprints()
    outbox_before = len(await employees.store.outbox())

    good = upstream.body
    for key, value in FAILURES[failure].items():
        setattr(upstream, key, value)
    failed = await employees.poll()
    assert not failed.ok and failed.events == [] and failed.error
    assert await employees.fingerprints() == before
    assert len(await employees.store.outbox()) == outbox_before
    state = await employees.store.sync_state("employees")
    assert state.last_outcome == "failed" and state.last_error == failed.error

    # The next good run diffs against the last good state: John is still there, so no deletes.
    upstream.status, upstream.content_type = 200, "application/json"
    good["response"]["payload"]["employees"].append({"employee": {"id": 3, "name": "New"}})
    upstream.body = good
    recovered = await employees.poll()
    assert kinds(recovered) == [("record.new", "3")]


async def test_timeout_and_connection_refused_change_nothing(employees, upstream, conf_dir):
    await employees.poll()
    before = await employees.fingerprints()
    upstream.body = {"response": {"payload": {"employees": []}}}  # would delete everything
    upstream.delay = 3
    write_sync(conf_dir, "employees", upstream.url, extra='timeout = "300ms"')
    slow = await employees.poll()
    assert not slow.ok and "timeout" in slow.error
    write_sync(conf_dir, "employees", "http://127.0.0.1:9")  # discard port: nothing listens
    refused = await employees.poll()
    assert not refused.ok and "cannot connect" in refused.error
    assert await employees.fingerprints() == before
    assert len(await employees.store.outbox()) == 2


async def test_empty_array_that_is_really_there_deletes_everything(employees, upstream):
    await employees.poll()
    upstream.body = {"response": {"payload": {"employees": []}}}
    gone = await employees.poll()
    assert sorted(kinds(gone)) == [("record.deleted", "1"), ("record.deleted", "2")]


async def test_ignore_fields(upstream, conf_dir, state_path):
    upstream.body = copy.deepcopy(SEED)
    upstream.body["response"]["payload"]["employees"][0]["employee"]["last_login"] = "2026-01-01"
    write_sync(conf_dir, "employees", upstream.url, extra='ignore_fields = ["$.employee.last_login", "$..tmp"]')
    async with Harness(conf_dir, state_path) as h:
        first = await h.poll()
        john = next(e for e in first.parsed if e["recordId"] == "1")
        assert john["eventData"]["employee"]["last_login"] == "2026-01-01"
        upstream.body["response"]["payload"]["employees"][0]["employee"]["last_login"] = "2026-02-02"
        upstream.body["response"]["payload"]["employees"][1]["employee"]["tmp"] = {"x": 1}
        assert (await h.poll()).parsed == []
        upstream.body["response"]["payload"]["employees"][0]["employee"]["name"] = "Jon"
        changed = await h.poll()
        assert kinds(changed) == [("record.modified", "1")]
        assert changed.parsed[0]["eventData"]["employee"] == {"id": 1, "name": "Jon", "last_login": "2026-02-02"}


async def test_invalid_and_duplicate_ids(employees, upstream):
    await employees.poll()
    upstream.body = {"response": {"payload": {"employees": [
        {"employee": {"id": 2, "name": "Jane B"}},
        {"employee": {"name": "no id"}},
        {"employee": {"id": {"nested": 1}}},
        {"employee": {"id": None}},
        {"employee": {"id": True}},
        {"employee": {"id": 4, "name": "first"}},
        {"employee": {"id": 4, "name": "second"}},
        "not an object",
    ]}}}
    result = await employees.poll()
    # John (1) is missing, but records were unreadable: no deletes this run; new and modified go out.
    assert sorted(kinds(result)) == [("record.modified", "2"), ("record.new", "4")]
    assert result.invalid_ids == 5 and result.duplicate_ids == 1
    assert next(e for e in result.parsed if e["recordId"] == "4")["eventData"]["employee"]["name"] == "first"
    assert "1" in await employees.fingerprints()
    # Once the response is clean again, John's absence is a delete.
    upstream.body = {"response": {"payload": {"employees": [
        {"employee": {"id": 2, "name": "Jane B"}}, {"employee": {"id": 4, "name": "first"}}]}}}
    assert kinds(await employees.poll()) == [("record.deleted", "1")]


async def test_numeric_and_string_ids_are_sent_as_strings(employees, upstream):
    upstream.body = {"response": {"payload": {"employees": [
        {"employee": {"id": 10}}, {"employee": {"id": "abc"}}, {"employee": {"id": 2.5}}, {"employee": {"id": 7.0}}]}}}
    result = await employees.poll()
    assert sorted(e["recordId"] for e in result.parsed) == ["10", "2.5", "7", "abc"]


async def test_changing_identity_paths_rebaselines_silently(employees, upstream, conf_dir):
    await employees.poll()
    upstream.body["response"]["payload"]["employees"][1]["employee"]["name"] = "Janet"
    write_sync(conf_dir, "employees", upstream.url, extra='ignore_fields = ["$.employee.name"]')
    rebased = await employees.poll()
    assert rebased.ok and rebased.outcome == "baseline" and rebased.parsed == []
    upstream.body["response"]["payload"]["employees"][1]["employee"]["name"] = "Janine"
    assert (await employees.poll()).parsed == []  # name is ignored now
    upstream.body["response"]["payload"]["employees"].append({"employee": {"id": 9}})
    assert kinds(await employees.poll()) == [("record.new", "9")]


async def test_dry_run_writes_nothing(employees, upstream):
    dry = await employees.poll(dry_run=True)
    assert len(dry.parsed) == 2
    assert await employees.store.outbox() == []
    state = await employees.store.sync_state("employees")
    assert not state.baselined and state.last_run_at is None
    real = await employees.poll()
    assert len(real.parsed) == 2 and {e["syncType"] for e in real.parsed} == {"initial_sync"}


async def test_request_carries_method_body_and_headers(upstream, conf_dir, state_path, monkeypatch):
    monkeypatch.setenv("TEST_TOKEN", "s3cr3t-token")
    upstream.body = []
    write_sync(conf_dir, "posted", upstream.url, list_identifier="$", record_identifier="$.id",
               path="/v1/search?page=1",
               api_extra='method = "post"\nbody = \'{"q": "all"}\'\nheaders = { Authorization = "Bearer ${TEST_TOKEN}" }')
    async with Harness(conf_dir, state_path, sync_id="posted") as h:
        assert (await h.poll()).ok
    req = upstream.requests[-1]
    assert req["method"] == "POST" and req["path"] == "/v1/search?page=1"
    assert orjson.loads(req["body"]) == {"q": "all"}
    assert req["headers"]["Authorization"] == "Bearer s3cr3t-token"
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["headers"]["User-Agent"].startswith("syncd/")


async def test_response_size_cap(employees, upstream):
    employees.settings = employees.settings.model_copy(update={"max_response_bytes": 1000})
    upstream.body = {"response": {"payload": {"employees": [{"employee": {"id": i}} for i in range(200)]}}}
    result = await employees.poll()
    assert not result.ok and "max_response_bytes" in result.error


async def test_error_messages_never_carry_secrets(upstream, conf_dir, state_path, monkeypatch):
    monkeypatch.setenv("API_KEY", "supersecretkey123")
    upstream.status, upstream.body = 401, {"error": "bad key supersecretkey123"}
    write_sync(conf_dir, "keyed", upstream.url, path="/v1?api_key=${API_KEY}")
    async with Harness(conf_dir, state_path, sync_id="keyed") as h:
        result = await h.poll()
    assert not result.ok and "401" in result.error
    assert "supersecretkey123" not in result.error


async def test_concurrent_polls_of_different_syncs(upstream, conf_dir, state_path):
    upstream.body = copy.deepcopy(SEED)
    for n in range(5):
        write_sync(conf_dir, f"s{n}", upstream.url)
    async with Harness(conf_dir, state_path, sync_id="s0") as h:
        syncs, _ = load_dir(h.settings)
        results = await asyncio.gather(*(poll(s, h.store, Source(h.session, max_bytes=10**6)) for s in syncs.values()))
        assert all(r.ok and len(r.events) == 2 for r in results)
        assert len(await h.store.outbox()) == 10


async def test_a_reset_during_a_run_is_noticed_and_the_poll_runs_again(employees, upstream):
    await employees.poll()
    upstream.body["response"]["payload"]["employees"][1]["employee"]["name"] = "Janet"
    upstream.delay = 1.0
    run = asyncio.create_task(employees.poll())
    await asyncio.sleep(0.3)
    async with await Store.open(employees.settings.state_path) as other:  # another process's view
        assert await other.reset("employees")
    result = await run
    # The stale diff (1 x modified) was refused; the poll ran again against the reset state.
    assert result.ok and sorted(kinds(result)) == [("record.new", "1"), ("record.new", "2")]
    assert {e["syncType"] for e in result.parsed} == {"initial_sync"}
    assert len(upstream.requests) == 3
    assert set(await employees.fingerprints()) == {"1", "2"}


async def test_secrets_in_the_url_path_never_reach_errors(upstream, conf_dir, state_path, monkeypatch):
    monkeypatch.setenv("PATH_TOKEN", "supersecrettoken")
    upstream.delay = 2
    write_sync(conf_dir, "keyed", upstream.url, path="/v1/${PATH_TOKEN}/items", extra='timeout = "200ms"')
    async with Harness(conf_dir, state_path, sync_id="keyed") as h:
        slow = await h.poll()
        write_sync(conf_dir, "keyed", "http://127.0.0.1:9", path="/v1/${PATH_TOKEN}/items")
        refused = await h.poll()
        syncs, _ = load_dir(h.settings)
        assert "supersecrettoken" not in repr(syncs["keyed"]) + syncs["keyed"].display_url
    assert not slow.ok and not refused.ok
    assert "supersecrettoken" not in slow.error + refused.error
    assert "***" in slow.error


async def test_redirects_are_followed_only_on_the_same_origin(conf_dir, state_path, monkeypatch):
    from aiohttp import web

    from conftest import serve

    monkeypatch.setenv("KEY", "apikey-secret-123")
    seen_elsewhere = []

    async def elsewhere(request):
        seen_elsewhere.append(dict(request.headers))
        return web.json_response(SEED)

    other, other_port = await serve(elsewhere)

    async def api(request):
        if request.path == "/old":
            raise web.HTTPFound("/new")
        if request.path == "/away":
            raise web.HTTPFound(f"http://127.0.0.1:{other_port}/data")
        if request.path == "/userinfo":  # same origin, with credentials of its choosing
            return web.Response(status=302, headers={"Location": f"http://evil@127.0.0.1:{port}/new"})
        if request.path == "/badport":
            return web.Response(status=302, headers={"Location": f"http://127.0.0.1:{port}:99/new"})
        assert request.headers["X-Api-Key"] == "apikey-secret-123"
        return web.json_response(SEED)

    runner, port = await serve(api)
    try:
        base = f"http://127.0.0.1:{port}"
        write_sync(conf_dir, "employees", base, path="/old", api_extra='headers = { "X-Api-Key" = "${KEY}" }')
        async with Harness(conf_dir, state_path) as h:
            followed = await h.poll()
            write_sync(conf_dir, "employees", base, path="/away", api_extra='headers = { "X-Api-Key" = "${KEY}" }')
            refused = await h.poll()
            odd = []
            for path in ("/userinfo", "/badport"):
                write_sync(conf_dir, "employees", base, path=path, api_extra='headers = { "X-Api-Key" = "${KEY}" }')
                odd.append(await h.poll())
    finally:
        await runner.cleanup()
        await other.cleanup()
    assert followed.ok and len(followed.events) == 2
    assert not refused.ok and "another origin" in refused.error and "base_url" in refused.error
    # Odd Locations fail the run as fetch errors, never as internal errors.
    assert not odd[0].ok and "credentials in it" in odd[0].error, odd[0].error
    assert not odd[1].ok and "no usable URL" in odd[1].error and "internal" not in odd[1].error, odd[1].error
    assert seen_elsewhere == []  # the API key never left the API's host
