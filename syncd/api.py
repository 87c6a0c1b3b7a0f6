"""Knit-compatible control API under /v1.0/ (DESIGN §8): start, list, get, pause, resume, trigger
and stop syncs over HTTP, so that code written against Knit's custom sync can point at syncd.

Off unless `api_keys` is set. Every request needs `Authorization: Bearer <key>`. Answers follow
Knit: `{"success": true, "data": {...}}` and `{"success": false, "error": {"msg": "..."}}`.
A started sync is written as a TOML file (0600) into api_config_dir, validated by the very code
that validates config_dir files, so it survives restarts and shows everywhere a file sync does.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from aiohttp import web
from yarl import URL

from syncd import tomlw
from syncd.config import Sync, load_file, parse_definition, scrub
from syncd.events import new_id
from syncd.store import StoreError

if TYPE_CHECKING:
    from syncd.daemon import Daemon

log = structlog.get_logger("syncd.api")

PREFIX = "/v1.0/"
MAX_BODY = 1024 * 1024
SOURCE = "request body"
STOP_WAIT = 10.0  # seconds sync.custom.stop waits for a poll under way to finish
#: Knit's camelCase names and our snake_case ones: the keys that hold the sync id and the request.
_ID_KEYS = ("idempotencyId", "idempotency_id")
_API_KEYS = ("apiDetails", "api_details")
_BASE_KEYS = ("baseUrl", "baseURL", "base_url")
_SECRET_FIELDS = {"token", "password", "value", "client_secret", "webhook_secret", "webhookSecret", "clientSecret"}


def key_matches(given: bytes, keys: list[bytes]) -> bool:
    """Whether `given` is one of `keys`, compared with every key in constant time (no early exit
    whose timing would tell how much of a key was right)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key)
    return found


class ApiError(Exception):
    def __init__(self, status: int, msg: str, problems: list[str] | None = None) -> None:
        super().__init__(msg)
        self.status, self.msg, self.problems = status, msg, problems


def ok(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps({"success": True, "data": data}), status=status, content_type="application/json")


def fail(status: int, msg: str, problems: list[str] | None = None) -> web.Response:
    error: dict[str, Any] = {"msg": msg}
    if problems:
        error["problems"] = problems
    return web.Response(body=orjson.dumps({"success": False, "error": error}), status=status,
                        content_type="application/json")


def escape_vars(value: Any) -> Any:
    """`${` -> `$${` in every string: a control-API body must never read the daemon's environment
    or credentials (`${AWS_SECRET}` in a header sent to the caller's own host)."""
    if isinstance(value, str):
        return value.replace("${", "$${")
    if isinstance(value, dict):
        return {k: escape_vars(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escape_vars(v) for v in value]
    return value


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def redact(value: Any, key: str = "") -> Any:
    """A definition without secrets: credential fields and header values become "***", and so do
    the query values and the userinfo password of URLs (webhook_url, base_url, path, token_url)."""
    if isinstance(value, dict):
        if key == "headers":
            return {k: "***" for k in value}
        return {k: ("***" if k in _SECRET_FIELDS and v else redact(v, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str) and (key == "path" or key.lower().endswith("url")):
        return redact_url(value)
    return value


def redact_url(url: str) -> str:
    """`url` with every query value and the userinfo password masked, the names kept
    (`https://u:***@h/p?token=***&page=***`): a token travels in a query string as often as in a
    header. Done on the text, so that the rest reads exactly as it was written."""
    head, hash_, fragment = url.partition("#")
    base, question, query = head.partition("?")
    scheme, sep, rest = base.partition("://")
    if sep:
        authority, slash, path = rest.partition("/")
        userinfo, at, host = authority.rpartition("@")
        if at:  # user:password, or a token as the user name alone
            authority = (userinfo.split(":", 1)[0] + ":***@" if ":" in userinfo else "***@") + host
        base = scheme + sep + authority + slash + path
    if question:
        query = "&".join(f"{name}=***" if value else ("***" if part and not sep else part)
                         for part in query.split("&") for name, sep, value in [part.partition("=")])
    return base + question + query + hash_ + fragment


class ControlAPI:
    """The /v1.0/ endpoints of one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.settings = daemon.settings
        self._keys = [k.get_secret_value().encode() for k in self.settings.api_keys]

    # -- plumbing ------------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.middlewares.append(self._guard)
        r = app.router
        r.add_post(PREFIX + "sync.custom.start", self.start)
        r.add_get(PREFIX + "sync.custom.list", self.list)
        r.add_get(PREFIX + "sync.custom.get", self.get)
        r.add_post(PREFIX + "sync.custom.pause", self.pause)
        r.add_post(PREFIX + "sync.custom.resume", self.resume)
        r.add_post(PREFIX + "sync.custom.trigger", self.trigger)
        r.add_post(PREFIX + "sync.custom.stop", self.stop)
        r.add_get(PREFIX + "openapi.json", self.openapi)

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if not request.path.startswith(PREFIX):
            return await handler(request)
        if not self._authorized(request.headers.get("Authorization", "")):
            return fail(401, "missing or wrong API key: send Authorization: Bearer <key> (one of api_keys)")
        if request.content_length is not None and request.content_length > MAX_BODY:
            return fail(413, f"the body is larger than {MAX_BODY} bytes")
        if request.method == "POST" and self.daemon.state_lost is not None:
            # A change now would go to a file nobody sees, and be gone at the restart.
            return fail(503, f"{self.daemon.state_lost}; nothing can be changed until syncd is restarted")
        try:
            return await handler(request)
        except ApiError as exc:
            if exc.status >= 500:
                log.error("control API request failed", method=request.method, path=request.path, error=exc.msg)
            return fail(exc.status, exc.msg, exc.problems)
        except web.HTTPRequestEntityTooLarge:
            return fail(413, f"the body is larger than {MAX_BODY} bytes")
        except web.HTTPException as exc:
            if exc.status == 405:
                return fail(405, f"{request.method} is not allowed here")
            if exc.status == 404:
                return fail(404, f"no endpoint {request.path}; see {PREFIX}openapi.json")
            raise
        except StoreError as exc:
            log.error("control API request failed: the state database refused it", method=request.method,
                      path=request.path, error=str(exc))
            return fail(503, "the state database cannot be used now (the daemon's log says why); try again later")
        except Exception as exc:
            # Knit's JSON shape and one log record, never aiohttp's text page and a bare traceback.
            log.exception("control API request failed with an internal error; please report it",
                          method=request.method, path=request.path)
            return fail(500, f"internal error ({type(exc).__name__}) while handling {request.method} {request.path}; "
                             "the daemon's log has the details")

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        return key_matches(token.strip().encode(), self._keys)

    async def _json(self, request: web.Request) -> Any:
        body = await request.read()
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the body is larger than {MAX_BODY} bytes")
        try:
            return orjson.loads(body) if body else {}
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None

    async def _sync_id(self, request: web.Request) -> str:
        if request.method == "GET":
            sync_id = request.query.get("syncJobId")
        else:
            body = await self._json(request)
            sync_id = body.get("syncJobId") if isinstance(body, dict) else None
        if not isinstance(sync_id, str) or not sync_id:
            raise ApiError(400, "syncJobId is required" + (" (query parameter)" if request.method == "GET" else ""))
        if sync_id not in self.daemon.syncs:
            raise ApiError(404, f"no sync {sync_id!r}; sync.custom.list shows them")
        return sync_id

    # -- endpoints -----------------------------------------------------------------------------

    async def start(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object (Knit's sync.custom.start body)")
        # Only what the caller sent is escaped: an integration comes from the daemon's settings, and
        # its ${NAME} references stay in the stored file, resolved at load like any file's.
        body = escape_vars(_drop_nulls(body))
        definition = self._with_integration(body, request.headers.get("X-Knit-Integration-Id"))
        sync_id = next((definition[k] for k in _ID_KEYS if k in definition), None)
        generated = sync_id is None
        if generated:
            sync_id = new_id("sync")
        elif not isinstance(sync_id, str):
            raise ApiError(400, "idempotencyId: must be a string")
        path = self.settings.api_dir / f"{sync_id}.toml"
        sync, problems = parse_definition(definition, self.settings, source=SOURCE, default_id=sync_id, file=path,
                                          origin="api")
        if problems:
            raise ApiError(400, f"the definition has {len(problems)} problem{'s' * (len(problems) != 1)}: "
                           + "; ".join(f"{p.key}: {p.reason}" for p in problems), [f"{p.key}: {p.reason}" for p in problems])
        self._check_hosts(sync)
        sync_id = sync.id
        existing = self.daemon.syncs.get(sync_id)
        if existing is not None and existing.origin != "api":
            raise ApiError(409, f"sync {sync_id!r} is defined by the file {existing.file}; choose another idempotencyId")
        if existing is not None:
            if existing.digest == sync.digest:
                return ok({"syncJobId": sync_id})  # the same body again: the same answer
            raise ApiError(409, f"sync {sync_id!r} exists with a different definition; stop it first or use another "
                                "idempotencyId")
        try:
            self._write(path, definition)
        except OSError as exc:
            raise ApiError(500, f"cannot store the sync in api_config_dir {path.parent}: {exc.strerror or exc}; "
                                "check that setting and the directory's permissions") from None
        loaded, problems = load_file(path, self.settings)
        if loaded is None:  # never expected: the same validation passed above
            path.unlink(missing_ok=True)
            raise ApiError(500, "the stored definition did not load back: " + "; ".join(str(p) for p in problems))
        self.daemon.apply_config()
        log.info("sync started through the control API", sync=sync_id, file=str(path))
        return ok({"syncJobId": sync_id})

    async def list(self, request: web.Request) -> web.Response:
        return ok({"syncs": await self.daemon.syncs_status()})

    async def get(self, request: web.Request) -> web.Response:
        sync_id = await self._sync_id(request)
        sync = self.daemon.syncs[sync_id]
        view = await self.daemon.sync_status(sync_id)
        view["definition"] = redact(scrub_definition(sync))
        return ok(view)

    async def pause(self, request: web.Request) -> web.Response:
        sync_id = await self._sync_id(request)
        await self.daemon.set_paused(sync_id, True)
        return ok({"syncJobId": sync_id, "paused": True})

    async def resume(self, request: web.Request) -> web.Response:
        sync_id = await self._sync_id(request)
        await self.daemon.set_paused(sync_id, False)
        return ok({"syncJobId": sync_id, "paused": False})

    async def trigger(self, request: web.Request) -> web.Response:
        sync_id = await self._sync_id(request)
        if await self.daemon.is_paused(sync_id):
            raise ApiError(409, f"sync {sync_id!r} is paused; resume it first")
        if not self.daemon.trigger(sync_id):
            raise ApiError(409, f"sync {sync_id!r} cannot be polled now (the daemon is stopping or its state is lost)")
        return ok({"syncJobId": sync_id, "triggered": True})

    async def stop(self, request: web.Request) -> web.Response:
        sync_id = await self._sync_id(request)
        sync = self.daemon.syncs[sync_id]
        if sync.origin != "api":
            raise ApiError(409, f"sync {sync_id!r} is defined by the file {sync.file}; remove the file to stop it")
        # A poll under way would commit after the reset below (or, refused, poll again at once):
        # the state of the stopped sync would come back. Let it finish first; then no await comes
        # between the check and taking the sync off the schedule, so none can start meanwhile.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_WAIT
        while self.daemon.next_polls().get(sync_id, 0.0) is None:
            if loop.time() > deadline:
                raise ApiError(409, f"sync {sync_id!r} is being polled and the poll has not finished within "
                                    f"{STOP_WAIT:g} s; try again shortly")
            await asyncio.sleep(0.05)
        sync.file.unlink(missing_ok=True)
        self.daemon.apply_config()
        # Forget it: a later start with this id is a new sync (an initial_sync, not paused), not
        # a delta against records its webhook never got. Queued events are still delivered.
        await self.daemon.store.reset(sync_id)
        await self.daemon.store.set_paused(sync_id, False)
        self.daemon.registry.set_paused(sync_id, False)
        log.info("sync stopped through the control API; its state is forgotten", sync=sync_id)
        return ok({"syncJobId": sync_id, "stopped": True})

    async def openapi(self, request: web.Request) -> web.Response:
        from syncd.openapi import document

        return web.Response(body=orjson.dumps(document()), content_type="application/json")

    # -- helpers -------------------------------------------------------------------------------

    def _with_integration(self, body: dict[str, Any], name: str | None) -> dict[str, Any]:
        """Knit's X-Knit-Integration-Id: the integration's base URL, headers and auth apply where
        the body does not set them."""
        if not name:
            return body
        integration = self.settings.integrations.get(name)
        if integration is None:
            known = ", ".join(sorted(self.settings.integrations)) or "none configured"
            raise ApiError(400, f"unknown integration {name!r} in X-Knit-Integration-Id (known: {known})")
        merged = dict(body)
        api_key = next((k for k in _API_KEYS if k in merged), "apiDetails")
        api = merged.get(api_key) or {}
        if not isinstance(api, dict):
            return merged  # not an object: validation reports it, as it does without an integration
        api = dict(api)
        if integration.get("base_url") and not any(k in api for k in _BASE_KEYS):
            api["baseUrl"] = integration["base_url"]
        if integration.get("headers") and isinstance(api.get("headers") or {}, dict):
            api["headers"] = {**integration["headers"], **(api.get("headers") or {})}
        if integration.get("auth") and "auth" not in api:
            api["auth"] = integration["auth"]
        merged[api_key] = api
        return merged

    def _check_hosts(self, sync: Sync) -> None:
        """api_allowed_hosts, checked on the URLs as polled (an integration's ${NAME} resolved)."""
        patterns = self.settings.api_allowed_hosts
        if not patterns:
            return
        api = sync.spec.api_details
        urls = [("apiDetails.baseUrl", api.base_url), ("webhookURL", sync.spec.webhook_url)]
        if api.auth is not None and api.auth.token_url:
            # Where the client secret goes: an integration's credentials must not follow a caller's URL.
            urls.append(("apiDetails.auth.token_url", api.auth.token_url))
        for key, url in urls:
            host = (URL(url).host or "").lower()
            if not any(fnmatch.fnmatchcase(host, p.lower()) for p in patterns):
                raise ApiError(400, f"{key}: host {host!r} is not in api_allowed_hosts")

    def _write(self, path: Path, definition: dict[str, Any]) -> None:
        """The definition as TOML, 0600, written whole or not at all (the watcher never sees half)."""
        directory = path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = "# Created through the control API (POST /v1.0/sync.custom.start); sync.custom.stop removes it.\n"
        text += tomlw.dumps(definition)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def scrub_definition(sync: Sync) -> dict[str, Any]:
    """The definition as loaded (Knit's names where it has them), with ${NAME} values scrubbed."""
    data = sync.spec.model_dump(mode="json", by_alias=False, exclude_none=True)
    text = scrub(orjson.dumps(data).decode(), sync.secrets)
    return orjson.loads(text)


