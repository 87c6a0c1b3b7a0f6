"""The source side of a poll against real local APIs: auth, retries, rate limits, secrets, TLS.

Every server here is a real aiohttp app on 127.0.0.1; nothing is mocked. Timing assertions are
lower bounds only (a slow machine makes waits longer, never shorter). Retries use a 50 ms backoff
so that the whole file stays fast.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from contextlib import asynccontextmanager
from typing import Any, Self
from urllib.parse import unquote_plus

import aiohttp
import orjson
import pytest
from aiohttp import web

from syncd.config import load_dir
from syncd.engine import poll
from syncd.http import poll_session
from syncd.scheduler import Scheduler
from syncd.settings import load_settings
from syncd.source.fetcher import Source
from syncd.store import Store

from conftest import cli_env, run_cli, serve, wait_for

FAST_RETRY = 'backoff = "50ms"\nmax_backoff = "200ms"'
LIST = {"items": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def write(conf_dir, name: str, base_url: str, *, path: str = "/api", extra: str = "", api_extra: str = "",
          auth: str | None = None, retry: str | None = "retries = 0", pagination: str | None = None) -> None:
    """conf.d/NAME.toml: a list sync ($.items, $.id) polling base_url + path."""
    text = (f'webhook_url = "http://127.0.0.1:9/hook"\nlist_identifier = "$.items"\nrecord_identifier = "$.id"\n'
            f'{extra}\n[api_details]\nbase_url = "{base_url}"\npath = "{path}"\n{api_extra}\n')
    if retry is not None:
        text += f"[api_details.retry]\n{retry}\n"
    if auth is not None:
        text += f"[api_details.auth]\n{auth}\n"
    if pagination is not None:
        text += f"[api_details.pagination]\n{pagination}\n"
    (conf_dir / f"{name}.toml").write_text(text)


class Engine:
    """Polls as the daemon does: a real store, the real HTTP session, one Source for every poll."""

    def __init__(self, conf_dir, state_path, *, max_requests_per_host: int = 8) -> None:
        self.settings = load_settings({"config_dir": conf_dir, "state_path": state_path})
        self.max_requests_per_host = max_requests_per_host

    async def __aenter__(self) -> Self:
        self.store = await Store.open(self.settings.state_path)
        self.session = poll_session()
        self.source = Source(self.session, max_bytes=10**8, max_requests_per_host=self.max_requests_per_host)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()
        await self.store.close()

    def syncs(self):
        syncs, problems = load_dir(self.settings)
        assert not problems, problems
        return syncs

    async def poll(self, sync_id: str):
        return await poll(self.syncs()[sync_id], self.store, self.source)


def free_port() -> int:
    """A loopback port nobody listens on (bound, then closed: connecting is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- OAuth2 client credentials ----------------------------------------------------------------------

CLIENT_ID = "syncd-client"
CLIENT_SECRET = "Cl1ent-Secret-5e9a7b"


class OAuthServer:
    """A token endpoint (/oauth/token) and an API (anything else) that accepts only its tokens."""

    def __init__(self) -> None:
        self.url = ""
        self.expires_in: Any = 3600
        self.token_status = 200
        self.api_always_401 = False
        self.token_calls: list[dict[str, Any]] = []
        self.api_calls: list[str | None] = []  # the bearer token of each API request
        self.issued: list[str] = []
        self.revoked: set[str] = set()
        self.issued_at: list[float] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/oauth/token":
            return await self.token(request)
        return await self.api(request)

    async def token(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        form = {k: v for k, v in (await request.post()).items()}
        authorization = request.headers.get("Authorization")
        self.token_calls.append({"form": form, "authorization": authorization, "content_type": request.content_type,
                                 "method": request.method, "raw": raw})
        if self.token_status != 200:
            # Some servers say what they got: the client secret is echoed back in the error.
            return web.json_response({"error": "invalid_client", "error_description":
                                      f"client {form.get('client_id')} with secret {form.get('client_secret')} is not allowed"},
                                     status=self.token_status)
        if request.method != "POST" or request.content_type != "application/x-www-form-urlencoded":
            return web.json_response({"error": "invalid_request"}, status=400)
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if authorization is not None:
            if not authorization.startswith("Basic ") or "client_secret" in form:
                return web.json_response({"error": "invalid_request"}, status=400)  # one method only (RFC 6749 2.3)
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
            client = (unquote_plus(user), unquote_plus(password))
        else:
            client = (form.get("client_id"), form.get("client_secret"))
        if client != (CLIENT_ID, CLIENT_SECRET):
            return web.json_response({"error": "invalid_client"}, status=401)
        token = f"at-{len(self.issued) + 1}-{request.remote}"
        self.issued.append(token)
        self.issued_at.append(time.monotonic())
        answer = {"access_token": token, "token_type": "Bearer"}
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        return web.json_response(answer)

    async def api(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        self.api_calls.append(token)
        if self.api_always_401 or token not in self.issued or token in self.revoked:
            return web.json_response({"error": "invalid_token"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return web.json_response(LIST)


@asynccontextmanager
async def running(server):
    """Serve `server.handle` on loopback for the block; `server.url` is set to where."""
    runner, port = await serve(server.handle)
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def oauth():
    async with running(OAuthServer()) as server:
        yield server


def oauth_auth(server: OAuthServer, *, secret: str = CLIENT_SECRET, scopes: str = '["read:items", "write:items"]',
               more: str = "") -> str:
    return (f'type = "oauth2_client_credentials"\ntoken_url = "{server.url}/oauth/token"\n'
            f'client_id = "{CLIENT_ID}"\nclient_secret = "{secret}"\nscopes = {scopes}\n'
            f'audience = "https://api.example.test"\n{more}')


async def test_oauth2_one_token_for_many_polls_and_for_syncs_sharing_the_client(oauth, conf_dir, state_path):
    write(conf_dir, "a", oauth.url, path="/a", auth=oauth_auth(oauth))
    write(conf_dir, "b", oauth.url, path="/b", auth=oauth_auth(oauth))
    async with Engine(conf_dir, state_path) as engine:
        for _ in range(5):
            for sync_id in ("a", "b"):
                result = await engine.poll(sync_id)
                assert result.ok, result.error
        assert len(oauth.token_calls) == 1
        assert oauth.api_calls == [oauth.issued[0]] * 10

        call = oauth.token_calls[0]
        assert call["method"] == "POST" and call["content_type"] == "application/x-www-form-urlencoded"
        # RFC 6749 default: the client authenticates with HTTP Basic, not in the form.
        assert call["authorization"] == basic(CLIENT_ID, CLIENT_SECRET)
        assert call["form"] == {"grant_type": "client_credentials", "scope": "read:items write:items",
                                "audience": "https://api.example.test"}

        # Another client (other scopes) is another token.
        write(conf_dir, "c", oauth.url, path="/c", auth=oauth_auth(oauth, scopes='["read:items"]'))
        assert (await engine.poll("c")).ok
        assert len(oauth.token_calls) == 2 and oauth.token_calls[1]["form"]["scope"] == "read:items"
        assert oauth.api_calls[-1] == oauth.issued[1]
        assert (await engine.poll("a")).ok and oauth.api_calls[-1] == oauth.issued[0]
        assert len(oauth.token_calls) == 2


async def test_oauth2_client_credentials_in_the_form_body(oauth, conf_dir, state_path):
    write(conf_dir, "s", oauth.url, auth=oauth_auth(oauth, more='client_auth = "body"\nextra = { resource = "urn:items" }'))
    async with Engine(conf_dir, state_path) as engine:
        result = await engine.poll("s")
        assert result.ok, result.error
    call = oauth.token_calls[0]
    assert call["authorization"] is None
    assert call["form"] == {"grant_type": "client_credentials", "scope": "read:items write:items",
                            "audience": "https://api.example.test", "resource": "urn:items",
                            "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    assert oauth.api_calls == [oauth.issued[0]]


async def test_oauth2_token_is_renewed_after_it_expires(oauth, conf_dir, state_path):
    oauth.expires_in = 2  # renewed a tenth of its lifetime early: after 1.8 s
    write(conf_dir, "s", oauth.url, auth=oauth_auth(oauth))
    async with Engine(conf_dir, state_path) as engine:
        assert (await engine.poll("s")).ok
        assert (await engine.poll("s")).ok
        assert len(oauth.token_calls) == 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 6
        polls = 2
        while len(oauth.token_calls) < 2:
            assert loop.time() < deadline, "the token was never renewed"
            await asyncio.sleep(0.1)
            result = await engine.poll("s")
            assert result.ok, result.error
            polls += 1
        assert oauth.issued_at[1] - oauth.issued_at[0] >= 1.7
        assert polls >= 3  # the first token served every poll until it was due
        assert set(oauth.api_calls[:-1]) == {oauth.issued[0]} and oauth.api_calls[-1] == oauth.issued[1]
        assert (await engine.poll("s")).ok and len(oauth.token_calls) == 2


async def test_oauth2_revoked_token_is_refreshed_once_and_the_request_retried(oauth, conf_dir, state_path):
    write(conf_dir, "a", oauth.url, path="/a", auth=oauth_auth(oauth))
    write(conf_dir, "b", oauth.url, path="/b", auth=oauth_auth(oauth))
    async with Engine(conf_dir, state_path) as engine:
        assert (await engine.poll("a")).ok
        first = oauth.issued[0]
        oauth.revoked.add(first)  # revoked server-side long before its expiry
        result = await engine.poll("a")
        assert result.ok, result.error
        assert len(oauth.token_calls) == 2
        assert oauth.api_calls == [first, first, oauth.issued[1]]
        # The other sync of the same client uses the new token without asking for another one.
        assert (await engine.poll("b")).ok
        assert oauth.api_calls[-1] == oauth.issued[1] and len(oauth.token_calls) == 2


async def test_oauth2_api_that_always_answers_401_fails_after_exactly_one_refresh(oauth, conf_dir, state_path):
    oauth.api_always_401 = True
    write(conf_dir, "s", oauth.url, auth=oauth_auth(oauth), retry=f"retries = 3\n{FAST_RETRY}")
    async with Engine(conf_dir, state_path) as engine:
        result = await engine.poll("s")
    assert not result.ok
    assert "401" in result.error and "invalid_token" in result.error
    assert len(oauth.token_calls) == 2 and len(oauth.api_calls) == 2
    assert oauth.api_calls == oauth.issued
    assert CLIENT_SECRET not in result.error


async def test_oauth2_token_endpoint_refusing_the_client_fails_clearly_without_the_secret(oauth, conf_dir, state_path):
    oauth.token_status = 401
    write(conf_dir, "s", oauth.url, auth=oauth_auth(oauth, more='client_auth = "body"'),
          retry=f"retries = 3\n{FAST_RETRY}")
    async with Engine(conf_dir, state_path) as engine:
        result = await engine.poll("s")
    assert not result.ok
    assert "token request" in result.error and "/oauth/token" in result.error and "401" in result.error
    assert "client_secret" in result.error  # the hint says what to check...
    assert "invalid_client" in result.error  # ...with what the server said...
    assert CLIENT_SECRET not in result.error  # ...but never the secret it echoed
    assert len(oauth.token_calls) == 1 and oauth.api_calls == []  # a 401 is not retried


# -- static credentials -----------------------------------------------------------------------------

async def test_bearer_basic_and_api_key_send_the_right_credentials(upstream, conf_dir, state_path, monkeypatch):
    monkeypatch.setenv("SOURCE_TEST_TOKEN", "tok-from-env-81f2")
    upstream.body = LIST
    write(conf_dir, "bearer", upstream.url, path="/bearer", auth='type = "bearer"\ntoken = "${SOURCE_TEST_TOKEN}"')
    write(conf_dir, "basic", upstream.url, path="/basic", auth='type = "basic"\nusername = "alice"\npassword = "pa55-word"')
    write(conf_dir, "header", upstream.url, path="/header",
          auth='type = "api_key"\nname = "X-Api-Key"\nvalue = "key-in-header-9"\nin = "header"')
    write(conf_dir, "query", upstream.url, path="/query?status=active",
          auth='type = "api_key"\nname = "api_key"\nvalue = "key-in-query-7"\nin = "query"')
    async with Engine(conf_dir, state_path) as engine:
        for sync_id in ("bearer", "basic", "header", "query"):
            result = await engine.poll(sync_id)
            assert result.ok, result.error

    def only(path):
        hits = upstream.hits(path)
        assert len(hits) == 1
        return hits[0]

    assert only("/bearer")["headers"]["Authorization"] == "Bearer tok-from-env-81f2"
    assert only("/basic")["headers"]["Authorization"] == basic("alice", "pa55-word")
    header = only("/header")
    assert header["headers"]["X-Api-Key"] == "key-in-header-9"
    assert "Authorization" not in header["headers"] and "key-in-header-9" not in header["path"]
    query = only("/query")
    assert "api_key=key-in-query-7" in query["path"] and "status=active" in query["path"]
    assert "Authorization" not in query["headers"] and "X-Api-Key" not in query["headers"]


# -- retries ----------------------------------------------------------------------------------------

class Scripted:
    """Answers in the order given; the last answer repeats. Each answer: (status, headers, body)."""

    def __init__(self) -> None:
        self.url = ""
        self.answers: list[tuple[int, dict[str, str], Any]] = [(200, {}, LIST)]
        self.hits: list[float] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(time.monotonic())
        status, headers, body = self.answers[min(len(self.hits), len(self.answers)) - 1]
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        return web.Response(body=data, status=status, headers=headers, content_type="application/json")


@pytest.fixture
async def scripted():
    async with running(Scripted()) as server:
        yield server


async def test_429_with_retry_after_is_waited_out(scripted, conf_dir, state_path):
    scripted.answers = [(429, {"Retry-After": "1"}, {"error": "slow down"}), (200, {}, LIST)]
    write(conf_dir, "s", scripted.url, retry=f"retries = 3\n{FAST_RETRY}")  # Retry-After beats the 50 ms backoff
    async with Engine(conf_dir, state_path) as engine:
        t0 = time.monotonic()
        result = await engine.poll("s")
        elapsed = time.monotonic() - t0
    assert result.ok, result.error
    assert len(scripted.hits) == 2 and result.requests == 2
    assert elapsed >= 0.9 and scripted.hits[1] - scripted.hits[0] >= 0.9


async def test_three_503s_then_200_succeed_and_a_fourth_503_fails(scripted, conf_dir, state_path):
    write(conf_dir, "s", scripted.url, retry=f"retries = 3\n{FAST_RETRY}")
    async with Engine(conf_dir, state_path) as engine:
        scripted.answers = [(503, {}, {"error": "maintenance"})] * 3 + [(200, {}, LIST)]
        result = await engine.poll("s")
        assert result.ok, result.error
        assert len(scripted.hits) == 4 and result.requests == 4 and result.new == 2

        scripted.hits.clear()
        scripted.answers = [(503, {}, {"error": "maintenance"})]
        result = await engine.poll("s")
        assert not result.ok
        assert "503" in result.error and "maintenance" in result.error and "4 attempts" in result.error
        assert len(scripted.hits) == 4


async def test_400_fails_at_once_with_an_excerpt_of_the_body(scripted, conf_dir, state_path):
    scripted.answers = [(400, {}, {"error": "unknown filter 'colour'", "detail": "x" * 5000})]
    write(conf_dir, "s", scripted.url, retry=f"retries = 3\n{FAST_RETRY}")
    async with Engine(conf_dir, state_path) as engine:
        result = await engine.poll("s")
    assert not result.ok
    assert len(scripted.hits) == 1 and result.requests == 1
    assert "400" in result.error and "unknown filter 'colour'" in result.error
    assert len(result.error) < 600  # an excerpt, not the 5 kB body


async def test_connection_refused_is_retried_then_fails(conf_dir, state_path):
    port = free_port()
    write(conf_dir, "s", f"http://127.0.0.1:{port}", retry=f"retries = 2\n{FAST_RETRY}")
    async with Engine(conf_dir, state_path) as engine:
        t0 = time.monotonic()
        result = await engine.poll("s")
        elapsed = time.monotonic() - t0
    assert not result.ok
    assert result.requests == 3  # the first attempt and two retries
    assert "cannot connect" in result.error and f"127.0.0.1:{port}" in result.error and "3 attempts" in result.error
    assert elapsed >= 0.05  # two backoffs of 25-50 ms, then 50-100 ms


async def test_retry_after_longer_than_the_interval_fails_at_once_and_sets_not_before(scripted, conf_dir, state_path):
    scripted.answers = [(429, {"Retry-After": "120"}, {"error": "quota exhausted"})]
    write(conf_dir, "s", scripted.url, extra='interval = "1m"', retry=f"retries = 3\n{FAST_RETRY}")
    async with Engine(conf_dir, state_path) as engine:
        before = time.time()
        t0 = time.monotonic()
        result = await engine.poll("s")
        elapsed = time.monotonic() - t0
    assert not result.ok
    assert len(scripted.hits) == 1 and elapsed < 5  # not waited out, not retried
    assert "429" in result.error and "Retry-After" in result.error and "120" in result.error
    assert result.not_before is not None and before + 115 <= result.not_before <= time.time() + 125


async def test_scheduler_does_not_poll_again_before_a_long_retry_after(scripted, conf_dir, state_path):
    scripted.answers = [(429, {"Retry-After": "2"}, {"error": "slow down"}), (200, {}, LIST)]
    write(conf_dir, "s", scripted.url, extra='interval = "1s"', retry=f"retries = 3\n{FAST_RETRY}")
    async with Engine(conf_dir, state_path) as engine:
        results = []

        async def run_poll(sync):
            result = await poll(sync, engine.store, engine.source)
            results.append(result)
            return result

        scheduler = Scheduler(run_poll, max_concurrent=2)
        scheduler.update(engine.syncs())
        try:
            await wait_for(lambda: len(results) >= 2, timeout=8)
        finally:
            await scheduler.stop()
    first, second = results[:2]
    assert not first.ok and first.not_before is not None and second.ok, (first.error, second.error)
    # An interval of 1 s (±10%) would have polled again after at most 1.1 s.
    assert scripted.hits[1] - scripted.hits[0] >= 1.9


async def test_a_poll_waiting_out_a_retry_after_gives_its_slot_to_other_syncs(scripted, upstream, conf_dir, state_path):
    # One poll slot; sync a's API says "come back in 3 s" (within its interval, so a waits in the
    # run). Sync b must be polled meanwhile, not after a's wait.
    scripted.answers = [(503, {"Retry-After": "3"}, {"error": "busy"}), (200, {}, LIST)]
    upstream.body = LIST
    write(conf_dir, "a", scripted.url, extra='interval = "1h"', retry=f"retries = 1\n{FAST_RETRY}")
    write(conf_dir, "b", upstream.url, extra='interval = "1h"')
    async with Engine(conf_dir, state_path) as engine:
        done = await poll_a_then_b(engine, lambda: scripted.hits, timeout=10)  # a holds the slot, and waits
    assert scripted.hits[0] < done["b"][0] < scripted.hits[0] + 2.0, "b waited for a's Retry-After"
    assert done["a"][0] - scripted.hits[0] >= 2.9


async def poll_a_then_b(engine: Engine, a_started, *, timeout: float) -> dict[str, tuple[float, Any]]:
    """Syncs a and b under one poll slot: a first, and b once `a_started()` says a holds the
    slot. When each poll ended (monotonic) and its result, once both have."""
    done: dict[str, tuple[float, Any]] = {}

    async def run_poll(sync):
        result = await poll(sync, engine.store, engine.source)
        done[sync.id] = (time.monotonic(), result)
        return result

    syncs = engine.syncs()
    scheduler = Scheduler(run_poll, max_concurrent=1)
    scheduler.update({"a": syncs["a"]})
    try:
        scheduler.trigger("a")
        await wait_for(a_started, timeout=5)
        scheduler.update(syncs)
        scheduler.trigger("b")
        await wait_for(lambda: len(done) == 2, timeout=timeout)
    finally:
        await scheduler.stop()
    return done


# -- rate_limit and max_requests_per_host -----------------------------------------------------------

async def test_rate_limit_spaces_the_requests_of_a_paginated_run(conf_dir, state_path):
    pages = []

    async def handler(request):
        number = int(request.query.get("page", "1"))
        pages.append(number)
        return web.json_response({"items": [{"id": number}], "has_more": number < 20})

    runner, port = await serve(handler)
    try:
        write(conf_dir, "s", f"http://127.0.0.1:{port}", extra='rate_limit = "5/s"',
              pagination='type = "page"\nstop_path = "$.has_more"')
        async with Engine(conf_dir, state_path) as engine:
            t0 = time.monotonic()
            result = await engine.poll("s")
            elapsed = time.monotonic() - t0
    finally:
        await runner.cleanup()
    assert result.ok, result.error
    assert result.pages == 20 and pages == list(range(1, 21)) and result.new == 20
    assert elapsed >= 3.5  # 19 gaps of 1/5 s


async def test_max_requests_per_host_bounds_concurrent_requests_across_syncs(upstream, conf_dir, state_path):
    upstream.body = LIST
    upstream.delays["/slow"] = 0.3
    for n in range(6):
        write(conf_dir, f"s{n}", upstream.url, path="/slow")
    async with Engine(conf_dir, state_path, max_requests_per_host=2) as engine:
        t0 = time.monotonic()
        results = await asyncio.gather(*(engine.poll(f"s{n}") for n in range(6)))
        elapsed = time.monotonic() - t0
    assert all(r.ok for r in results), [r.error for r in results]
    assert len(upstream.hits("/slow")) == 6
    assert upstream.max_inflight["/slow"] == 2
    assert elapsed >= 0.85  # three rounds of two

    # The same polls with the default limit (8) do run all at once: the bound above is the setting's.
    upstream.max_inflight.clear()
    async with Engine(conf_dir, state_path) as engine:
        results = await asyncio.gather(*(engine.poll(f"s{n}") for n in range(6)))
    assert all(r.ok for r in results)
    assert upstream.max_inflight["/slow"] == 6


# -- secrets ----------------------------------------------------------------------------------------

SECRET_ENV = {
    "SRC_BEARER_TOKEN": "Bearer-Secret-7f3a9c2e",
    "SRC_CLIENT_SECRET": "Client-Secret-9e1c55aa",
    "SRC_API_KEY": "ApiKey-Secret-4d2e77bb",
}
LITERAL_PASSWORD = "Basic-Pass-2b8d41ff"
LITERAL_QUERY_KEY = "Query-Key-6a0f13cc"
SECRETS = [*SECRET_ENV.values(), LITERAL_PASSWORD, LITERAL_QUERY_KEY]


class LeakyApi:
    """An API whose error answers echo the credentials they were sent."""

    def __init__(self) -> None:
        self.url = ""
        self.seen: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.path)
        if request.path == "/oauth/token":  # refuses the client, echoing the secret from the form
            form = await request.post()
            return web.json_response({"error": "invalid_client",
                                      "error_description": f"bad secret {form.get('client_secret')}"}, status=401)
        if request.path == "/bearer":  # a 500 echoing the token
            return web.json_response({"error": f"crashed handling {request.headers.get('Authorization')}"}, status=500)
        if request.path == "/basic":  # a 401 echoing the decoded user and password
            user_pass = base64.b64decode(request.headers["Authorization"][6:]).decode()
            return web.json_response({"error": f"login {user_pass} refused"}, status=401)
        if request.path == "/key":  # a 403 echoing the key
            return web.json_response({"error": f"key {request.headers.get('X-Api-Key')} revoked"}, status=403)
        return web.json_response({"error": "not found"}, status=404)


def write_leaky_syncs(conf_dir, api: LeakyApi, refused_port: int) -> list[str]:
    retry = f"retries = 1\n{FAST_RETRY}"
    extra = 'interval = "1s"'
    write(conf_dir, "bearer", api.url, path="/bearer", extra=extra, retry=retry,
          auth='type = "bearer"\ntoken = "${SRC_BEARER_TOKEN}"')
    write(conf_dir, "basic", api.url, path="/basic", extra=extra, retry=retry,
          auth=f'type = "basic"\nusername = "alice"\npassword = "{LITERAL_PASSWORD}"')
    write(conf_dir, "oauth", api.url, path="/items", extra=extra, retry=retry,
          auth=(f'type = "oauth2_client_credentials"\ntoken_url = "{api.url}/oauth/token"\nclient_id = "syncd"\n'
                'client_secret = "${SRC_CLIENT_SECRET}"\nclient_auth = "body"'))
    write(conf_dir, "key", api.url, path="/key", extra=extra, retry=retry,
          auth='type = "api_key"\nname = "X-Api-Key"\nvalue = "${SRC_API_KEY}"')
    write(conf_dir, "refused", f"http://127.0.0.1:{refused_port}", path="/items?page=1", extra=extra, retry=retry,
          auth=f'type = "api_key"\nname = "api_key"\nvalue = "{LITERAL_QUERY_KEY}"\nin = "query"')
    return ["basic", "bearer", "key", "oauth", "refused"]


def assert_no_secret(text: str, where: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{where} shows {leaked}: {text[:2000]}"


@pytest.fixture
async def leaky():
    api = LeakyApi()
    runner, port = await serve(api.handle)
    api.url = f"http://127.0.0.1:{port}"
    try:
        yield api
    finally:
        await runner.cleanup()


async def test_secrets_never_appear_in_errors_cli_output_status_or_daemon(leaky, conf_dir, state_path, tmp_path,
                                                                          daemons, monkeypatch):
    refused = free_port()
    ids = write_leaky_syncs(conf_dir, leaky, refused)
    env = cli_env(**SECRET_ENV)
    args = ("--config-dir", str(conf_dir), "--state-path", str(state_path))

    # In process: every run fails, the API's echo reached the error, and the secret was masked.
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    async with Engine(conf_dir, tmp_path / "inproc.db") as engine:
        errors = {sync_id: (await engine.poll(sync_id)).error for sync_id in ids}
    assert all(errors.values()), errors
    for sync_id, error in errors.items():
        assert_no_secret(error, f"result.error of {sync_id}")
    assert "500" in errors["bearer"] and "Bearer ***" in errors["bearer"]
    assert "401" in errors["basic"] and "alice:***" in errors["basic"]
    assert "401" in errors["oauth"] and "bad secret ***" in errors["oauth"]
    assert "403" in errors["key"] and "key *** revoked" in errors["key"]
    assert "cannot connect" in errors["refused"]

    # syncd once at debug level, one sync at a time (they share the state database).
    for sync_id in ids:
        code, out, err = await run_cli("once", sync_id, *args, "--log-level", "debug", env=env)
        assert code == 1, (sync_id, out, err)
        assert f"poll of {sync_id} failed" in err
        assert_no_secret(out + err, f"syncd once {sync_id}")

    (code, out, err), (scode, sout, serr), (jcode, jout, jerr) = await asyncio.gather(
        run_cli("check", *args, env=env), run_cli("status", *args, env=env), run_cli("status", "--json", *args, env=env))
    assert code == 0 and "5 syncs" in out, err
    assert_no_secret(out + err, "syncd check")
    assert scode == 0 and "bearer" in sout, serr
    assert_no_secret(sout + serr, "syncd status")
    assert jcode == 0, jerr
    status = {s["id"]: s for s in orjson.loads(jout)["syncs"]}
    assert sorted(status) == ids and all(s["last_outcome"] == "failed" for s in status.values())
    assert "Bearer ***" in status["bearer"]["last_error"]
    assert_no_secret(jout + jerr, "syncd status --json")

    # The daemon: /v1/syncs and its debug logs.
    d = await daemons("--config-dir", str(conf_dir), "--state-path", str(tmp_path / "daemon.db"),
                      "--log-level", "debug", env=env)
    await wait_for(lambda: {e.get("sync") for e in d.events("poll failed")} >= set(ids), timeout=10)
    async with aiohttp.ClientSession() as session, session.get(f"http://{d.address}/v1/syncs") as resp:
        assert resp.status == 200
        text = await resp.text()
    syncs = {s["id"]: s for s in orjson.loads(text)["syncs"]}
    assert sorted(syncs) == ids and all(s["last_outcome"] == "failed" for s in syncs.values())
    assert_no_secret(text, "/v1/syncs")
    assert await d.stop() == 0
    logs = "\n".join(orjson.dumps(entry).decode() for entry in d.logs)
    assert "Bearer ***" in logs  # the failures were logged, masked
    assert_no_secret(logs, "the daemon's debug logs")


async def test_credentials_echoed_in_encoded_form_are_masked_too(conf_dir, state_path):
    """An API or token endpoint that echoes the Authorization header it got (HTTP Basic: base64 of
    user:password) shows the password as surely as echoing it in clear."""
    async def handler(request):
        return web.json_response({"error": "unauthorized", "got": request.headers.get("Authorization")}, status=401)

    runner, port = await serve(handler)
    url = f"http://127.0.0.1:{port}"
    try:
        write(conf_dir, "basic", url, auth=f'type = "basic"\nusername = "alice"\npassword = "{LITERAL_PASSWORD}"')
        write(conf_dir, "oauth", url, auth=(f'type = "oauth2_client_credentials"\ntoken_url = "{url}/token"\n'
                                            f'client_id = "syncd"\nclient_secret = "{CLIENT_SECRET}"'))
        async with Engine(conf_dir, state_path) as engine:
            basic_run, oauth_run = await engine.poll("basic"), await engine.poll("oauth")
    finally:
        await runner.cleanup()
    assert not basic_run.ok and "401" in basic_run.error
    assert not oauth_run.ok and "401" in oauth_run.error
    for error, (user, password) in ((basic_run.error, ("alice", LITERAL_PASSWORD)), (oauth_run.error, ("syncd", CLIENT_SECRET))):
        encoded = basic(user, password)[len("Basic "):]
        assert encoded not in error, f"the base64 of {user}:<password> is in the error: {error}"


# -- TLS settings -----------------------------------------------------------------------------------

async def test_tls_verify_false_is_a_warning_and_a_missing_ca_file_an_error(upstream, conf_dir, state_path, tmp_path):
    upstream.body = LIST
    write(conf_dir, "insecure", upstream.url, extra="tls_verify = false")
    args = ("--config-dir", str(conf_dir), "--state-path", str(state_path))
    (code, out, err), (ocode, oout, oerr) = await asyncio.gather(
        run_cli("check", *args), run_cli("once", "insecure", *args, "--log-level", "error"))
    assert code == 0, err
    assert "insecure.toml" in err and "tls_verify" in err and "warning" in err
    assert ocode == 0, oerr
    assert len(oout.splitlines()) == 2
    assert "warning" in oerr and "tls_verify = false" in oerr

    missing = tmp_path / "no-such-ca.pem"
    other = tmp_path / "conf-ca"
    other.mkdir()
    write(other, "private", "https://127.0.0.1:1", extra=f'ca_file = "{missing}"')
    code, out, err = await run_cli("check", "--config-dir", str(other), "--state-path", str(state_path))
    assert code == 78, (out, err)
    assert "private.toml" in err and "ca_file" in err and str(missing) in err


async def test_a_credential_echoed_cut_escaped_or_encoded_is_masked(conf_dir, state_path, monkeypatch):
    """Echoed where the 200-character excerpt would cut it, JSON-escaped, or percent-encoded as
    a library writes a URL: still the credential."""
    key = "sk_live/4eC39HqLyjWDarjtT1zdp7dc+x=="
    monkeypatch.setenv("ECHO_KEY", key)

    async def handler(request):
        got = request.headers.get("X-Api-Key", "")
        how = request.path.strip("/")
        if how == "cut":
            return web.Response(status=401, text="x" * 185 + " key=" + got + " " + "y" * 300)
        if how == "escaped":
            return web.json_response({"error": "bad key", "key": got}, status=401,
                                     dumps=lambda v: orjson.dumps(v).decode().replace("/", "\\/"))
        return web.Response(status=401, text="bad key in " + str(request.url))  # percent-encoded, in a URL

    runner, port = await serve(handler)
    url = f"http://127.0.0.1:{port}"
    try:
        for how in ("cut", "escaped", "query"):
            path = f"/{how}" + ("?api_key=${ECHO_KEY}" if how == "query" else "")
            write(conf_dir, how, url, path=path, api_extra='headers = { X-Api-Key = "${ECHO_KEY}" }')
        async with Engine(conf_dir, state_path) as engine:
            runs = {how: await engine.poll(how) for how in ("cut", "escaped", "query")}
    finally:
        await runner.cleanup()
    for how, run in runs.items():
        assert not run.ok and "401" in run.error and "***" in run.error, (how, run.error)
        for fragment in ("4eC39Hq", "Lyjw", "dp7dc", "sk_live"):
            assert fragment not in run.error, (how, run.error)


async def test_a_content_length_that_lies_costs_no_memory_up_front(conf_dir, state_path):
    import tracemalloc

    async def lie(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 90000000\r\n\r\n[")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(lie, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        write(conf_dir, "lie", f"http://127.0.0.1:{port}")
        async with Engine(conf_dir, state_path) as engine:
            tracemalloc.start()
            try:
                run = await engine.poll("lie")
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    finally:
        server.close()
        await server.wait_closed()
    assert not run.ok and "90000000" in run.error, run.error
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MiB traced for a 1-byte body"


def test_retry_after_is_bounded_and_never_crashes():
    from syncd.http import MAX_RETRY_AFTER, parse_retry_after

    now = time.time()
    assert parse_retry_after("²", now) is None  # str.isdigit() says yes, float() says no
    assert parse_retry_after("9" * 400, now) == MAX_RETRY_AFTER  # not inf: the sync polls again
    assert parse_retry_after("315360000", now) == MAX_RETRY_AFTER == 7 * 86400
    assert parse_retry_after("Wed, 21 Oct 2099 07:28:00 GMT", now) == MAX_RETRY_AFTER
    assert parse_retry_after("-3", now) is None and parse_retry_after(" 10 ", now) == 10.0


async def test_a_token_with_control_characters_fails_the_run_cleanly_and_is_not_kept(conf_dir, state_path):
    tokens = []

    async def handler(request):
        if request.path == "/oauth/token":
            tokens.append(1)
            return web.json_response({"access_token": "abc\r\nX-Injected: 1", "expires_in": 3600})
        return web.json_response(LIST)

    runner, port = await serve(handler)
    url = f"http://127.0.0.1:{port}"
    try:
        write(conf_dir, "s", url, auth=(f'type = "oauth2_client_credentials"\ntoken_url = "{url}/oauth/token"\n'
                                        f'client_id = "c"\nclient_secret = "{CLIENT_SECRET}"'))
        async with Engine(conf_dir, state_path) as engine:
            first, second = await engine.poll("s"), await engine.poll("s")
    finally:
        await runner.cleanup()
    for run in (first, second):
        assert not run.ok and "not a usable bearer token" in run.error and "internal error" not in run.error, run.error
    assert len(tokens) == 2  # asked again: a broken token is never cached


async def test_a_poll_waiting_for_a_shared_token_keeps_its_slot(conf_dir, state_path):
    # Two syncs of one OAuth2 client, one poll slot. a holds the client's token lock and waits out
    # the token endpoint's Retry-After: had it given its slot back, b would take it and wait for
    # the lock, and a for the slot, for ever.
    calls = {"token": 0, "api": 0}

    async def handler(request):
        if request.path == "/oauth/token":
            calls["token"] += 1
            if calls["token"] == 1:
                return web.json_response({"error": "busy"}, status=503, headers={"Retry-After": "1"})
            return web.json_response({"access_token": "tok", "expires_in": 3600})
        calls["api"] += 1
        return web.json_response(LIST)

    runner, port = await serve(handler)
    url = f"http://127.0.0.1:{port}"
    auth = (f'type = "oauth2_client_credentials"\ntoken_url = "{url}/oauth/token"\n'
            f'client_id = "c"\nclient_secret = "{CLIENT_SECRET}"')
    for name in ("a", "b"):
        write(conf_dir, name, url, path=f"/{name}", auth=auth, extra='interval = "1h"', retry="retries = 2")
    try:
        async with Engine(conf_dir, state_path) as engine:
            done = await poll_a_then_b(engine, lambda: calls["token"] >= 1, timeout=8)
    finally:
        await runner.cleanup()
    assert all(result.ok for _, result in done.values()) and calls["token"] == 2, (done, calls)


async def test_a_credential_echoed_in_a_body_sent_in_pieces_is_masked_whole(conf_dir, state_path, monkeypatch):
    secret = "tok_ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    monkeypatch.setenv("API_TOKEN", secret)

    async def handler(request):
        resp = web.StreamResponse(status=401)
        resp.content_type = "application/json"
        await resp.prepare(request)
        body = '{"error": "invalid credentials: ' + request.headers["Authorization"] + '"}'
        cut = body.index("tok_") + 10  # the excerpt's first read ends inside the token
        await resp.write(body[:cut].encode())
        await asyncio.sleep(0.2)
        await resp.write(body[cut:].encode())
        await resp.write_eof()
        return resp

    runner, port = await serve(handler)
    try:
        write(conf_dir, "s", f"http://127.0.0.1:{port}", api_extra='headers = { Authorization = "Bearer ${API_TOKEN}" }')
        async with Engine(conf_dir, state_path) as engine:
            result = await engine.poll("s")
    finally:
        await runner.cleanup()
    assert not result.ok and "401" in result.error and "tok_" not in result.error, result.error
