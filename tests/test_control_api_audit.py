"""Defects found by an audit of the control API, each pinned by a test against a real daemon:
control characters in a start body, errors a handler did not expect, secrets in URLs, stop and
start again under the same id, ${NAME} in integrations, and sync.events.processed on a
byte-identical response."""

from __future__ import annotations

import asyncio
import io
import tomllib

import aiohttp
import orjson
import pytest
import structlog
from test_control_api import AUTH, KEY, LIST, call, env, seed_body

from syncd import logs, server, tomlw
from syncd.api import ControlAPI
from syncd.daemon import Daemon
from syncd.metrics import Metrics
from syncd.settings import load_settings

from conftest import wait_for

#: Every character TOML forbids raw in a basic string: U+0000-U+0008, U+000A-U+001F, U+007F.
FORBIDDEN = "".join(chr(c) for c in [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])


def test_toml_writer_escapes_every_control_character():
    text = "tab\there " + FORBIDDEN + ' quote" backslash\\ é \u2028 \U0001f600'
    document = {"s": text, "list": [text], text: "key", "table": {text: {"inline": text}}}
    written = tomlw.dumps(document)
    assert tomllib.loads(written) == document
    assert "\x7f" not in written and "\\u007f" in written


async def test_start_body_with_a_delete_character_round_trips(upstream, receiver, inproc_daemons, conf_dir,
                                                              state_path):
    upstream.body = LIST
    d = await inproc_daemons(conf_dir, state_path, api_keys=[KEY])
    body = seed_body(upstream, receiver)
    body["apiDetails"].update(method="POST", body='{"note": "a\x7fb\\u0001c"}')
    status, answer = await call(d.address, "POST", "sync.custom.start", body)
    assert status == 200, answer
    await wait_for(lambda: upstream.requests, timeout=10)
    assert upstream.requests[0]["body"] == b'{"note": "a\x7fb\\u0001c"}'


# -- 1. errors a handler did not expect ------------------------------------------------------------


@pytest.mark.parametrize("api_details", ["str", {"headers": "x"}, {"headers": [1]}, {"auth": "x"}])
async def test_wrong_types_beside_an_integration_are_a_400_naming_them(api_details, upstream, receiver,
                                                                       inproc_daemons, conf_dir, state_path):
    d = await inproc_daemons(conf_dir, state_path, api_keys=[KEY],
                             integrations={"hr": {"base_url": upstream.url, "headers": {"X-Tenant": "acme"},
                                                  "auth": {"type": "bearer", "token": "t-0123456789"}}})
    body = {**seed_body(upstream, receiver), "apiDetails": api_details}
    status, answer = await call(d.address, "POST", "sync.custom.start", body,
                                headers={**AUTH, "X-Knit-Integration-Id": "hr"})
    assert status == 400 and answer["success"] is False, answer
    key = "apiDetails" if api_details == "str" else f"apiDetails.{next(iter(api_details))}"
    assert [p.split(":")[0] for p in answer["error"]["problems"]] == [key], answer
    assert key in answer["error"]["msg"]
    assert not [e for e in d.tap.entries if e.get("level") in ("error", "critical")]


async def test_an_api_config_dir_that_cannot_be_made_is_a_json_500_and_one_log_line(
        upstream, receiver, conf_dir, state_path, tmp_path, daemons):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    d = await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path),
                      env=env(SYNCD_API_CONFIG_DIR=str(blocker / "api.d")))
    status, answer = await call(d.address, "POST", "sync.custom.start", seed_body(upstream, receiver))
    assert status == 500 and answer["success"] is False, answer
    assert "api_config_dir" in answer["error"]["msg"] and "Not a directory" in answer["error"]["msg"]
    assert await d.stop() == 0
    assert not [e for e in d.logs if e.get("raw")], "a log line that is not JSON"
    errors = [e for e in d.logs if e.get("level") == "error"]
    assert len(errors) == 1 and "api_config_dir" in errors[0]["error"], errors


async def test_an_unexpected_error_is_a_json_500_and_one_json_log_record(state_path):
    """The control API's guard and the other endpoints' catch-all, around handlers that raise."""
    stream = io.StringIO()
    saved = structlog.get_config()
    logs.configure("json", "info", stream=stream)
    settings = load_settings({"state_path": state_path, "api_keys": [KEY]})

    async def boom(request):
        raise RuntimeError("something syncd did not expect")

    app = server.build_app(Metrics(), ready=lambda: (True, "ready"), syncs_status=lambda: None)
    ControlAPI(Daemon(settings)).routes(app)
    app.router.add_post("/v1.0/sync.custom.boom", boom)
    app.router.add_get("/boom", boom)
    runner = await server.start(app, "127.0.0.1", 0)
    address = "{}:{}".format(*runner.addresses[0][:2])
    try:
        status, answer = await call(address, "POST", "sync.custom.boom", {})
        assert status == 500 and answer["success"] is False, answer
        assert "internal error (RuntimeError)" in answer["error"]["msg"]
        async with aiohttp.ClientSession() as session, session.get(f"http://{address}/boom") as resp:
            assert resp.status == 500 and "internal error (RuntimeError)" in await resp.text()
    finally:
        await runner.cleanup()
        structlog.configure(**saved)
    records = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["level"], r["path"]) for r in records] == [("error", "/v1.0/sync.custom.boom"), ("error", "/boom")]
    assert all("something syncd did not expect" in orjson.dumps(r["exception"]).decode() for r in records)


# -- 3. secrets in URLs --------------------------------------------------------------------------


async def test_get_and_the_operator_page_mask_query_values_and_passwords_in_urls(upstream, receiver, inproc_daemons,
                                                                                conf_dir, state_path):
    d = await inproc_daemons(conf_dir, state_path, api_keys=[KEY])
    hook_port = receiver.url.rsplit(":", 1)[1]
    body = seed_body(upstream, receiver, webhookURL=f"http://hook:hook-pass-123@127.0.0.1:{hook_port}/hook"
                                                    "?token=hook-token-123&v=2&flag")
    body["apiDetails"] = {"baseUrl": upstream.url.replace("//", "//api:api-pass-123@"),
                          "path": "/api/v1/employees?api_key=path-key-123&page=1"}
    status, answer = await call(d.address, "POST", "sync.custom.start", body)
    assert status == 200, answer
    status, answer = await call(d.address, "GET", "sync.custom.get?syncJobId=employees")
    assert status == 200, answer
    definition = answer["data"]["definition"]
    assert definition["webhook_url"] == f"http://hook:***@127.0.0.1:{hook_port}/hook?token=***&v=***&***"  # a bare part may be a token too
    assert definition["api_details"]["base_url"] == upstream.url.replace("//", "//api:***@")
    assert definition["api_details"]["path"] == "/api/v1/employees?api_key=***&page=***"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{d.address}/syncs/employees", headers=AUTH) as resp:
            assert resp.status == 200
            page = await resp.text()
    assert "api_key=***" in page and "token=***" in page
    for text in (orjson.dumps(answer).decode(), page):
        for secret in ("hook-pass-123", "hook-token-123", "api-pass-123", "path-key-123"):
            assert secret not in text


# -- 4. stop, then start again under the same id ---------------------------------------------------

EMPLOYEES = "/api/v1/employees"


def items(*ids):
    return {"items": [{"id": i, "name": f"n{i}"} for i in ids]}


def summary(events, run_ids):
    return sorted((e["syncType"], e["eventType"], e["recordId"]) for e in events if e["syncRunId"] in run_ids)


async def test_a_stopped_sync_is_forgotten_but_its_queued_events_are_delivered(backend, upstream, receiver,
                                                                              inproc_daemons, conf_dir):
    upstream.bodies[EMPLOYEES] = items(1, 2)
    gate = {"open": False}
    receiver.respond = lambda entry: None if gate["open"] else (503, {})  # the old events stay queued
    d = await inproc_daemons(conf_dir, backend["state_path"], state_url=backend.get("state_url"), api_keys=[KEY],
                             webhook_retry_schedule=["200ms"] * 100)
    body = seed_body(upstream, receiver, interval="1h")
    status, answer = await call(d.address, "POST", "sync.custom.start", body)
    assert status == 200, answer
    await wait_for(lambda: {r["event"]["recordId"] for r in receiver.received} == {"1", "2"}, timeout=15)
    old_runs = {r["event"]["syncRunId"] for r in receiver.received}
    for endpoint in ("pause", "stop"):
        status, answer = await call(d.address, "POST", f"sync.custom.{endpoint}", {"syncJobId": "employees"})
        assert status == 200, answer

    # The same id again, the API's list changed meanwhile: a new sync, from scratch.
    upstream.bodies[EMPLOYEES] = items(2, 3)
    status, answer = await call(d.address, "POST", "sync.custom.start", body)
    assert status == 200, answer
    status, answer = await call(d.address, "POST", "sync.custom.trigger", {"syncJobId": "employees"})
    assert status == 200, answer  # not paused
    status, answer = await call(d.address, "GET", "sync.custom.get?syncJobId=employees")
    assert answer["data"]["paused"] is False
    gate["open"] = True
    await wait_for(lambda: len(receiver.delivered()) >= 4, timeout=20)
    delivered = receiver.delivered()
    assert summary(delivered, old_runs) == [("initial_sync", "record.new", "1"), ("initial_sync", "record.new", "2")]
    new_runs = {e["syncRunId"] for e in delivered} - old_runs
    assert summary(delivered, new_runs) == [("initial_sync", "record.new", "2"), ("initial_sync", "record.new", "3")]
    runs = await d.daemon.store.runs("employees", 10)
    first_new = [r for r in runs if r.run_id in new_runs]
    assert [(r.sync_type, r.new, r.deleted) for r in first_new] == [("initial_sync", 2, 0)]


async def test_stop_during_a_poll_leaves_nothing_of_it_behind(upstream, receiver, inproc_daemons, conf_dir,
                                                             state_path):
    upstream.bodies["/slow"] = items(1, 2)
    upstream.delays["/slow"] = 0.6
    upstream.bodies[EMPLOYEES] = items(2, 3)
    d = await inproc_daemons(conf_dir, state_path, api_keys=[KEY])
    old = seed_body(upstream, receiver, interval="1h")
    old["apiDetails"]["path"] = "/slow"
    status, answer = await call(d.address, "POST", "sync.custom.start", old)
    assert status == 200, answer
    await wait_for(lambda: upstream.inflight.get("/slow"), timeout=10)
    status, answer = await call(d.address, "POST", "sync.custom.stop", {"syncJobId": "employees"})
    assert status == 200, answer
    status, answer = await call(d.address, "POST", "sync.custom.start", seed_body(upstream, receiver, interval="1h"))
    assert status == 200, answer
    await wait_for(lambda: any(e["recordId"] == "3" for e in receiver.delivered()), timeout=15)
    # The new sync's first run is an initial sync of what its API says, whatever the stopped
    # sync's last poll did.
    newest = (await d.daemon.store.runs("employees", 1))[0]
    assert (newest.outcome, newest.sync_type, newest.new, newest.deleted) == ("changed", "initial_sync", 2, 0), newest


# -- 5. ${NAME} in integrations ------------------------------------------------------------------


async def test_an_integrations_names_are_read_from_the_daemons_environment(upstream, receiver, conf_dir, state_path,
                                                                          tmp_path, daemons):
    upstream.body = LIST
    settings = tmp_path / "syncd.toml"
    settings.write_text('[integrations.hr]\nbase_url = "${HR_BASE}"\nheaders = { X-Tenant = "${HR_TENANT}" }\n'
                        '[integrations.hr.auth]\ntype = "bearer"\ntoken = "${HR_TOKEN}"\n')
    d = await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path), "--settings", str(settings),
                      "--api-allowed-hosts", "127.0.0.1",
                      env=env(HR_BASE=upstream.url, HR_TENANT="acme", HR_TOKEN="hr-token-0123456789"))
    body = seed_body(upstream, receiver)
    body["apiDetails"] = {"path": EMPLOYEES, "headers": {"X-Body": "${HR_TOKEN}"}}
    status, answer = await call(d.address, "POST", "sync.custom.start", body, headers={**AUTH, "X-Knit-Integration-Id": "hr"})
    assert status == 200, answer
    await wait_for(lambda: upstream.hits(EMPLOYEES), timeout=10)
    headers = upstream.hits(EMPLOYEES)[0]["headers"]
    assert headers["Authorization"] == "Bearer hr-token-0123456789" and headers["X-Tenant"] == "acme"
    assert headers["X-Body"] == "${HR_TOKEN}"  # the caller's own ${...} is still taken literally
    stored = (state_path.parent / "api.d" / "employees.toml").read_text()
    assert "${HR_TOKEN}" in stored and "hr-token-0123456789" not in stored
    status, answer = await call(d.address, "GET", "sync.custom.get?syncJobId=employees")
    assert status == 200 and "hr-token-0123456789" not in orjson.dumps(answer).decode()
    assert await d.stop() == 0
    assert "hr-token-0123456789" not in orjson.dumps(d.logs).decode()


# -- 7. sync.events.processed on a byte-identical response ----------------------------------------


async def test_processed_counts_the_skipped_records_of_a_byte_identical_response(upstream, receiver, inproc_daemons,
                                                                                conf_dir, state_path):
    # One record without an id, one duplicate: two skipped, every run.
    upstream.bodies[EMPLOYEES] = {"items": [{"id": 1}, {"id": 2}, {"name": "no id"}, {"id": 2}]}
    d = await inproc_daemons(conf_dir, state_path, api_keys=[KEY])
    events = ["record.new", "record.modified", "record.deleted", "sync.events.processed"]
    body = seed_body(upstream, receiver, interval="200ms", events=events)
    body["apiDetails"]["retry"] = {"retries": 0}
    status, answer = await call(d.address, "POST", "sync.custom.start", body)
    assert status == 200, answer

    def processed():
        return [e["eventData"] for e in receiver.delivered() if e["eventType"] == "sync.events.processed"]

    await wait_for(lambda: len(processed()) >= 3, timeout=15)
    # A failed run between byte-identical ones: the counts are those of the last good run.
    upstream.status = 500
    for _ in range(300):  # bounded: until a failed run is recorded
        if (await d.daemon.store.runs("employees", 1))[0].outcome == "failed":
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("no failed run recorded")
    upstream.status = 200
    seen = len(processed())
    await wait_for(lambda: len(processed()) >= seen + 2, timeout=15)
    data = processed()
    assert data[0]["outcome"] == "changed" and data[-1]["outcome"] == "unchanged"
    assert [p["skipped"] for p in data] == [2] * len(data), data
    assert [p["recordsProcessed"] for p in data] == [2] * len(data), data


def test_redact_url_masks_a_token_as_user_name_and_a_bare_query():
    from syncd.api import redact_url

    assert redact_url("https://TOKEN123@hooks.example/x") == "https://***@hooks.example/x"
    assert redact_url("https://u:pw@h/x?s3cr3tvalue&a=1&b=") == "https://u:***@h/x?***&a=***&b="
    assert redact_url("https://h/plain/path") == "https://h/plain/path"
