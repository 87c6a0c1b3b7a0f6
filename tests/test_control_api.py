"""The Knit-compatible control API (DESIGN §8): the seed's cURL example, validation shared with
`syncd check`, pause/resume/trigger/stop, persistence across restarts, keys, limits, integrations."""

from __future__ import annotations

import asyncio
import shutil
import stat
import sys
import tomllib
from pathlib import Path

import aiohttp
import orjson
import pytest
from test_config import BROKEN

from syncd.config import load_file
from syncd.daemon import Daemon
from syncd.settings import load_settings

from conftest import cli_env, run_cli, wait_for

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIST = {"items": [{"id": 1, "name": "Ann"}, {"id": 2, "name": "Bob"}]}


def seed_body(upstream, receiver, **extra):
    """The seed's sync.custom.start body, pointed at a local API and receiver."""
    body = {
        "apiDetails": {"method": "GET", "baseUrl": upstream.url, "path": "/api/v1/employees",
                       "headers": {"Authorization": "Bearer upstream-token"}},
        "idempotencyId": "employees",
        "webhookURL": f"{receiver.url}/hook",
        "listIdentifier": "$.items",
        "recordIdentifier": "$.id",
    }
    body.update(extra)
    return body


def env(**extra):
    return cli_env(SYNCD_API_KEYS=KEY, **extra)


async def call(address, method, endpoint, body=None, headers=AUTH, raw=None):
    async with aiohttp.ClientSession() as session:
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        if data is not None and len(data) > 1024 * 1024:
            import io

            data = io.BytesIO(data)
        async with session.request(method, f"http://{address}/v1.0/{endpoint}", data=data, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


async def test_the_seed_curl_example_starts_a_sync_once(upstream, receiver, conf_dir, state_path, daemons, tmp_path):
    upstream.body = LIST
    d = await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path), env=env())
    body = orjson.dumps(seed_body(upstream, receiver)).decode()
    curl = shutil.which("curl")
    for _ in range(2):
        if curl:
            proc = await asyncio.create_subprocess_exec(
                curl, "-s", "--request", "POST", "--url", f"http://{d.address}/v1.0/sync.custom.start",
                "--header", f"Authorization: Bearer {KEY}", "--header", "X-Knit-Integration-Id: ",
                "--header", "Content-Type: application/json", "--data", body, stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            answer = orjson.loads(out)
        else:
            _, answer = await call(d.address, "POST", "sync.custom.start", raw=body.encode())
        assert answer == {"success": True, "data": {"syncJobId": "employees"}}
    await wait_for(lambda: len(receiver.delivered()) == 2, timeout=15)
    assert sorted((e["eventType"], e["recordId"]) for e in receiver.delivered()) == [("record.new", "1"), ("record.new", "2")]
    assert upstream.requests[0]["headers"]["Authorization"] == "Bearer upstream-token"
    files = list((state_path.parent / "api.d").glob("*.toml"))
    assert [f.name for f in files] == ["employees.toml"] and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    status, listed = await call(d.address, "GET", "sync.custom.list")
    assert status == 200 and [(s["syncJobId"], s["origin"]) for s in listed["data"]["syncs"]] == [("employees", "api")]
    # The same id with another definition is a conflict; no id gets a generated one.
    status, answer = await call(d.address, "POST", "sync.custom.start", seed_body(upstream, receiver, interval="1h"))
    assert status == 409 and answer["success"] is False and "different definition" in answer["error"]["msg"]
    body = seed_body(upstream, receiver)
    del body["idempotencyId"]
    status, answer = await call(d.address, "POST", "sync.custom.start", body)
    assert status == 200 and answer["data"]["syncJobId"].startswith("sync_")
    assert await d.stop() == 0


def _check_cases():
    cases = {}
    for name, (text, _key, _reason) in BROKEN.items():
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            continue  # JSON bodies have no TOML syntax to break
        if "${" in text:
            continue  # API bodies never read ${NAME} (they are taken literally)
        cases[name] = data
    base = {"webhook_url": "https://h.example.com", "list_identifier": "$.items", "record_identifier": "$.id",
            "api_details": {"base_url": "https://a.example.com"}}
    extra = {
        "interval": {"interval": "500ms"}, "timeout": {"timeout": "2h"}, "events": {"events": ["record.gone"]},
        "secret": {"webhook_secret": "whsec_"}, "fraction": {"max_delete_fraction": 2},
        "pagination": {"api_details": {"base_url": "https://a.example.com", "pagination": {"type": "cursor"}}},
        "auth": {"api_details": {"base_url": "https://a.example.com", "auth": {"type": "bearer"}}},
        "header": {"api_details": {"base_url": "https://a.example.com", "headers": {"X-A": "a\r\nX-B: b"}}},
        "userinfo": {"api_details": {"base_url": "https://u:p@a.example.com", "headers": {"Authorization": "x"}}},
        "rate": {"rate_limit": "fast"}, "empty": {"empty_on_status": [200]},
        "knit-names": {"webhookURL": "https://h.example.com", "webhook_url": "https://h.example.com"},
    }
    for name, change in extra.items():
        cases[name] = {**base, **change}
    return cases


CASES = _check_cases()


@pytest.fixture
async def api_daemon(conf_dir, state_path):
    settings = load_settings({"config_dir": conf_dir, "state_path": state_path, "listen": "127.0.0.1:0",
                              "api_keys": [KEY]})
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run())
    await wait_for(lambda: daemon.address is not None or task.done(), timeout=10)
    try:
        yield daemon
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 15)


@pytest.mark.parametrize("case", sorted(CASES))
async def test_every_problem_check_reports_is_a_400(case, api_daemon, tmp_path):
    data = CASES[case]
    file = tmp_path / "check" / f"{case}.toml"
    file.parent.mkdir()
    from syncd import tomlw

    file.write_text(tomlw.dumps(data))
    _, problems = load_file(file, api_daemon.settings)
    assert problems, f"{case}: syncd check finds nothing wrong"
    address = "{}:{}".format(*api_daemon.address)
    status, answer = await call(address, "POST", "sync.custom.start", {**data, "idempotencyId": "x"})
    assert status == 400 and answer["success"] is False, answer
    for problem in problems:
        assert f"{problem.key}: {problem.reason}" in answer["error"]["problems"], (problem, answer)


async def test_pause_resume_trigger_stop_and_restart(upstream, receiver, conf_dir, state_path, daemons):
    upstream.bodies["/api/v1/employees"] = LIST
    upstream.bodies["/file"] = LIST
    (conf_dir / "fromfile.toml").write_text(
        f'webhook_url = "{receiver.url}/hook"\nlist_identifier = "$.items"\nrecord_identifier = "$.id"\n'
        f'interval = "1h"\n[api_details]\nbase_url = "{upstream.url}"\npath = "/file"\n')
    base = ("--config-dir", str(conf_dir), "--state-path", str(state_path))
    d = await daemons(*base, env=env())
    status, _ = await call(d.address, "POST", "sync.custom.start", seed_body(upstream, receiver, interval="1s"))
    assert status == 200
    path = "/api/v1/employees"
    await wait_for(lambda: len(upstream.hits(path)) >= 2, timeout=10)
    status, answer = await call(d.address, "POST", "sync.custom.pause", {"syncJobId": "employees"})
    assert status == 200 and answer["data"]["paused"] is True
    await asyncio.sleep(0.3)  # a poll under way may finish
    hits = len(upstream.hits(path))
    await asyncio.sleep(1.6)  # more than the 1 s interval (with its 10% jitter)
    assert len(upstream.hits(path)) == hits  # paused: no polls
    status, answer = await call(d.address, "POST", "sync.custom.trigger", {"syncJobId": "employees"})
    assert status == 409 and "paused" in answer["error"]["msg"]
    code, out, _ = await run_cli("status", *base)
    assert "employees (paused)" in out and "api" in out and "file" in out
    # Pause state and API-created syncs survive a restart.
    assert await d.stop() == 0
    d = await daemons(*base, env=env())
    await asyncio.sleep(1.6)
    assert len(upstream.hits(path)) == hits
    status, answer = await call(d.address, "GET", "sync.custom.get?syncJobId=employees")
    assert status == 200 and answer["data"]["paused"] is True and answer["data"]["origin"] == "api"
    assert answer["data"]["definition"]["api_details"]["headers"] == {"Authorization": "***"}
    await call(d.address, "POST", "sync.custom.resume", {"syncJobId": "employees"})
    await wait_for(lambda: len(upstream.hits(path)) > hits, timeout=10)
    # trigger polls at once (the file sync's interval is an hour).
    file_hits = len(upstream.hits("/file"))
    status, _ = await call(d.address, "POST", "sync.custom.trigger", {"syncJobId": "fromfile"})
    assert status == 200
    await wait_for(lambda: len(upstream.hits("/file")) > file_hits, timeout=5)
    # stop removes an API-created sync and refuses a file-defined one.
    status, answer = await call(d.address, "POST", "sync.custom.stop", {"syncJobId": "fromfile"})
    assert status == 409 and "file" in answer["error"]["msg"]
    status, _ = await call(d.address, "POST", "sync.custom.stop", {"syncJobId": "employees"})
    assert status == 200 and not (state_path.parent / "api.d" / "employees.toml").exists()
    status, answer = await call(d.address, "POST", "sync.custom.pause", {"syncJobId": "employees"})
    assert status == 404
    assert await d.stop() == 0


async def test_keys_limits_and_errors(upstream, receiver, api_daemon):
    address = "{}:{}".format(*api_daemon.address)
    endpoints = [("POST", "sync.custom.start"), ("GET", "sync.custom.list"), ("GET", "sync.custom.get?syncJobId=x"),
                 ("POST", "sync.custom.pause"), ("POST", "sync.custom.resume"), ("POST", "sync.custom.trigger"),
                 ("POST", "sync.custom.stop"), ("GET", "openapi.json")]
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": KEY}):
        for method, endpoint in endpoints:
            status, answer = await call(address, method, endpoint, {"syncJobId": "x"}, headers=headers)
            assert status == 401 and answer == {"success": False, "error": {"msg": answer["error"]["msg"]}}
    status, answer = await call(address, "POST", "sync.custom.start", raw=b'{"x": "' + b"a" * (2 * 1024 * 1024) + b'"}')
    assert status == 413 and answer["success"] is False
    status, answer = await call(address, "POST", "sync.custom.start", raw=b"{not json")
    assert status == 400 and "JSON" in answer["error"]["msg"]
    status, answer = await call(address, "POST", "sync.custom.pause", {})
    assert status == 400 and "syncJobId" in answer["error"]["msg"]
    status, answer = await call(address, "GET", "sync.custom.get?syncJobId=nope")
    assert status == 404


async def test_keys_never_reach_the_logs(upstream, receiver, conf_dir, state_path, daemons):
    d = await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path), "--log-level", "debug", env=env())
    await call(d.address, "POST", "sync.custom.start", seed_body(upstream, receiver))
    await call(d.address, "GET", "sync.custom.list", headers={"Authorization": "Bearer not-the-key-but-long"})
    assert await d.stop() == 0
    logs = orjson.dumps(d.logs).decode()
    assert KEY not in logs and "not-the-key-but-long" not in logs


async def test_integrations_and_allowed_hosts(upstream, receiver, conf_dir, state_path, tmp_path, daemons):
    settings = tmp_path / "syncd.toml"
    settings.write_text(
        f'[integrations.hr]\nbase_url = "{upstream.url}"\nheaders = {{ X-Tenant = "acme" }}\n'
        '[integrations.hr.auth]\ntype = "bearer"\ntoken = "integration-token"\n')
    upstream.body = LIST
    d = await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path), "--settings", str(settings),
                      "--api-allowed-hosts", "127.0.0.1,localhost", env=env())
    body = seed_body(upstream, receiver)
    del body["apiDetails"]["baseUrl"], body["apiDetails"]["headers"]
    status, answer = await call(d.address, "POST", "sync.custom.start", body, headers={**AUTH, "X-Knit-Integration-Id": "hr"})
    assert status == 200, answer
    await wait_for(lambda: upstream.requests, timeout=10)
    assert upstream.requests[0]["headers"]["X-Tenant"] == "acme"
    assert upstream.requests[0]["headers"]["Authorization"] == "Bearer integration-token"
    status, answer = await call(d.address, "POST", "sync.custom.start", body, headers={**AUTH, "X-Knit-Integration-Id": "nope"})
    assert status == 400 and "unknown integration" in answer["error"]["msg"]
    outside = seed_body(upstream, receiver, idempotencyId="outside", webhookURL="https://hooks.example.com/x")
    status, answer = await call(d.address, "POST", "sync.custom.start", outside)
    assert status == 400 and "api_allowed_hosts" in answer["error"]["msg"]
    # The token endpoint is where client credentials go: it is held to the same hosts.
    token = seed_body(upstream, receiver, idempotencyId="token")
    token["apiDetails"]["auth"] = {"type": "oauth2_client_credentials", "token_url": "https://evil.example.com/token",
                                   "client_id": "c", "client_secret": "s" * 16}
    status, answer = await call(d.address, "POST", "sync.custom.start", token)
    assert status == 400 and "token_url: host 'evil.example.com' is not in api_allowed_hosts" in answer["error"]["msg"], answer
    # ${NAME} in a body is taken literally, never read from the daemon's environment.
    sneaky = seed_body(upstream, receiver, idempotencyId="sneaky")
    sneaky["apiDetails"]["headers"] = {"X-Leak": "${HOME}"}
    status, _ = await call(d.address, "POST", "sync.custom.start", sneaky)
    assert status == 200
    await wait_for(lambda: any(r["headers"].get("X-Leak") for r in upstream.requests), timeout=10)
    assert {r["headers"].get("X-Leak") for r in upstream.requests} - {None} == {"${HOME}"}
    assert await d.stop() == 0


def test_openapi_describes_exactly_the_routes():
    from aiohttp import web

    from syncd.api import ControlAPI
    from syncd.openapi import document

    class FakeDaemon:  # only what ControlAPI reads at construction
        settings = load_settings({"api_keys": [KEY]})

    app = web.Application()
    ControlAPI(FakeDaemon()).routes(app)
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    documented = {(method, path) for path, item in document()["paths"].items() for method in item}
    assert routes == documented


async def test_schemathesis_finds_no_server_error_and_no_schema_break(conf_dir, state_path, daemons, tmp_path):
    st = shutil.which("st") or (str(Path(sys.executable).parent / "st") if (Path(sys.executable).parent / "st").exists() else None)
    if st is None:
        pytest.skip("schemathesis (the test extra) is not installed")
    # Only loopback URLs may be used by syncs the fuzzer manages to create.
    d = await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path), "--api-allowed-hosts", "127.0.0.1",
                      env=env())
    proc = await asyncio.create_subprocess_exec(
        st, "run", f"http://{d.address}/v1.0/openapi.json", "-H", f"Authorization: Bearer {KEY}",
        "--checks", "not_a_server_error,response_schema_conformance", "--max-examples", "25", "--seed", "20261130",
        "--request-timeout", "10", "--workers", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=cli_env(NO_COLOR="1"), cwd=tmp_path)
    out, _ = await asyncio.wait_for(proc.communicate(), 110)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "passed" in text
    assert await d.stop() == 0


def test_api_keys_from_the_credentials_directory(tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api_keys").write_text("# one key a line\nfirst-key-0123456789\n\nsecond-key-0123456789\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = load_settings({})
    assert [k.get_secret_value() for k in settings.api_keys] == ["first-key-0123456789", "second-key-0123456789"]
    assert "first-key" not in repr(settings)
    monkeypatch.setenv("SYNCD_API_KEYS", "short")
    from syncd.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_settings({})
