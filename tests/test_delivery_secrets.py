"""Secrets of a webhook URL never reach a delivery error: not through a receiver echoing the request
in its error body, nor through a redirect's Location. Errors go to the log, to the outbox (`syncd
deliveries list`) and to the dead letters on the operator page."""

from __future__ import annotations

import asyncio
import base64
import time

import orjson
import pytest
import structlog.testing
from aiohttp import web

from syncd.store import Store

from conftest import cli_env, run_cli, serve, wait_for
from test_delivery import Rig

TOKEN = "tok-0f9e8d7c6b5a"  # in the query, under a name that does not look like a credential
SIG = "s+g/v=1"  # percent-encoded in the URL: the receiver may echo it either way
PASSWORD = "pw-93ab1c7d"  # the URL's userinfo
PATH_TOKEN = "T0KEN-in-the-path-4d2c"  # from ${HOOK_TOKEN}: only the sync's secrets know it


class Echo:
    """A receiver that fails every event as misconfigured receivers do, showing what it got: record
    "moved" gets a 301 to a URL carrying the token, the others a 400 echoing the request ("cut":
    only the token, after 190 other characters)."""

    def __init__(self) -> None:
        self.attempts = 0

    async def handle(self, request: web.Request) -> web.Response:
        event = orjson.loads(await request.read())
        self.attempts += 1
        if event["recordId"] == "moved":
            where = f"https://new.example/{PATH_TOKEN}/in?code={TOKEN}&s=%2B1%2F{PASSWORD}#{TOKEN}"
            return web.Response(status=301, headers={"Location": where})
        if event["recordId"] == "cut":  # the token across the 200 characters of body an error shows
            return web.Response(status=400, text="x" * 190 + request.query["h"])
        echo = (f"bad request {request.method} {request.raw_path} (decoded: {request.path_qs}) "
                f"authorization={request.headers.get('Authorization')} query={dict(request.query)}")
        return web.Response(status=400, text=echo)


@pytest.fixture
async def echo():
    receiver = Echo()
    runner, port = await serve(receiver.handle)
    receiver.url = f"http://127.0.0.1:{port}"
    try:
        yield receiver
    finally:
        await runner.cleanup()


def leaks(text: str) -> list[str]:
    from urllib.parse import quote

    forms = {TOKEN, SIG, quote(SIG, safe=""), PASSWORD, PATH_TOKEN,
             base64.b64encode(f"hook:{PASSWORD}".encode()).decode()}
    return [form for form in forms if form in text]


async def dead_letters(store, count: int) -> list:
    for _ in range(200):
        rows = [d for d in await store.deliveries() if d.state == "dead"]
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.02)
    raise AssertionError(f"not {count} dead letters")


async def test_the_urls_query_values_and_password_are_masked_in_delivery_errors(upstream, echo, conf_dir, state_path):
    from urllib.parse import quote

    path = f"/hook?h={TOKEN}&sig={quote(SIG, safe='')}&v=2"
    async with Rig(upstream, echo, conf_dir, state_path, schedule=[0.05], path=path) as rig:
        # Target URL as given by the sync (the Rig's target), with a password in the userinfo.
        rig.url = echo.url.replace("http://", f"http://hook:{PASSWORD}@") + path
        with structlog.testing.capture_logs() as logs:
            await rig.poll([{"id": "echoed"}, {"id": "moved"}, {"id": "cut"}])
            rows = await dead_letters(rig.store, 3)
            await wait_for(lambda: rig.deliverer.failed_attempts == 6)  # logged
    errors = {d.record_id: d.last_error for d in rows}
    assert errors["echoed"].startswith("HTTP 400: bad request POST /hook?h=***&sig=***&v=2 ")
    assert errors["moved"] == ("HTTP 301 redirect to 'https://new.example/" + PATH_TOKEN + "/in?code=***&s=***' "
                               "(redirects are not followed; fix webhook_url)")
    assert "authorization=Basic *** query=" in errors["echoed"] and errors["cut"] == "HTTP 400: " + "x" * 190 + "***"
    assert not leaks(errors["echoed"]) and set(leaks(errors["moved"])) == {PATH_TOKEN}  # not a secret here
    logged = [str(e) for e in logs if e.get("error")]
    assert len(logged) == 6 and not any(set(leaks(line)) - {PATH_TOKEN} for line in logged)


async def test_the_syncs_secrets_are_masked_in_delivery_errors_the_log_and_the_cli(upstream, echo, conf_dir,
                                                                                  state_path, inproc_daemons,
                                                                                  monkeypatch):
    monkeypatch.setenv("HOOK_TOKEN", PATH_TOKEN)
    upstream.body = {"items": [{"id": "echoed"}, {"id": "moved"}]}
    (conf_dir / "hooks.toml").write_text(
        f'webhook_url = "http://hook:{PASSWORD}@127.0.0.1:{echo.url.rsplit(":", 1)[1]}/hooks/${{HOOK_TOKEN}}/in'
        f'?h={TOKEN}"\nlist_identifier = "$.items"\nrecord_identifier = "$.id"\ninterval = "1h"\n'
        f'[api_details]\nbase_url = "{upstream.url}"\npath = "/api"\n')
    daemon = await inproc_daemons(conf_dir, state_path, webhook_retry_schedule=["50ms"])
    deadline = time.monotonic() + 10
    rows = []
    while time.monotonic() < deadline and len(rows) < 2:
        async with await Store.open(state_path) as store:
            rows = [d for d in await store.deliveries() if d.state == "dead"]
        await asyncio.sleep(0.05)
    assert len(rows) == 2, rows
    await wait_for(lambda: len(daemon.events("event is now a dead letter")) == 2)
    await daemon.stop()
    errors = {d.record_id: d.last_error for d in rows}
    assert errors["echoed"].startswith("HTTP 400: bad request POST /hooks/***/in?h=*** ")
    assert errors["moved"] == ("HTTP 301 redirect to 'https://new.example/***/in?code=***&s=***' "
                               "(redirects are not followed; fix webhook_url)")
    logged = [str(e) for e in daemon.tap.entries if e.get("error")]
    assert len(logged) >= 4 and not any(leaks(line) for line in logged)
    code, out, err = await run_cli("deliveries", "list", "--dead", "--json", "--state-path", str(state_path),
                                   "--config-dir", str(conf_dir), env=cli_env(HOOK_TOKEN=PATH_TOKEN))
    assert code == 0, err
    assert sorted(d["lastError"] for d in orjson.loads(out)) == sorted(errors.values())
    assert not leaks(out)
