"""Authentication strategies: static credentials, and OAuth2 client credentials with a shared,
expiring token cache (one token request for many polls and for every sync with the same client)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_plus

import orjson
from yarl import URL

from syncd.errors import FetchError
from syncd.source import ratelimit

#: A token is renewed this long before it expires (or a tenth of its lifetime, if shorter).
RENEW_MARGIN = 60.0
#: Tokens that say nothing of their lifetime are kept this long (or until a 401).
DEFAULT_LIFETIME = 3600.0


class Auth:
    """Static credentials: a header or a query parameter on every request."""

    refreshable = False

    def __init__(self, headers: dict[str, str] | None = None, query: dict[str, str] | None = None) -> None:
        self.headers = headers or {}
        self.query = query or {}

    async def apply(self, headers: dict[str, str], url: URL) -> tuple[URL, str | None]:
        """Add credentials to `headers`; the URL to use and the token used (for refresh)."""
        headers.update(self.headers)
        return (url.update_query(self.query) if self.query else url), None

    async def refresh(self, used: str | None) -> None:  # pragma: no cover - static credentials never refresh
        pass


@dataclass
class _Token:
    value: str
    renew_at: float  # monotonic


@dataclass
class TokenCache:
    """OAuth2 access tokens by client (token URL, client id and secret, scopes, audience, extra):
    shared by every sync of the process that uses the same client."""

    tokens: dict[tuple, _Token] = field(default_factory=dict)
    locks: dict[tuple, asyncio.Lock] = field(default_factory=dict)
    requests: int = 0  # token requests sent (for tests and metrics)

    async def get(self, key: tuple, fetch: Callable[[], Awaitable[tuple[str, float | None]]]) -> str:
        token = self.tokens.get(key)
        if token is not None and time.monotonic() < token.renew_at:
            return token.value
        lock = self.locks.setdefault(key, asyncio.Lock())
        async with lock:  # one request for all the polls that found the token missing or stale
            token = self.tokens.get(key)
            if token is not None and time.monotonic() < token.renew_at:
                return token.value
            self.requests += 1
            with ratelimit.keep_slot():  # other polls of this client wait for the lock: see keep_slot
                value, lifetime = await fetch()
            lifetime = DEFAULT_LIFETIME if lifetime is None else lifetime
            margin = min(RENEW_MARGIN, lifetime / 10)
            self.tokens[key] = _Token(value, time.monotonic() + max(0.0, lifetime - margin))
            return value

    def invalidate(self, key: tuple, used: str | None) -> None:
        """Forget the token the API refused, unless another poll already replaced it."""
        token = self.tokens.get(key)
        if token is not None and (used is None or token.value == used):
            del self.tokens[key]


class OAuth2ClientCredentials(Auth):
    """RFC 6749 §4.4: a bearer token from `token_url`, cached until shortly before it expires."""

    refreshable = True

    def __init__(self, spec: Any, cache: TokenCache, post: Callable[..., Awaitable[Any]]) -> None:
        super().__init__()
        self.spec = spec
        self.cache = cache
        self.post = post  # post(url, data=..., headers=...) -> Response, with the sync's retries and limits
        self.key = (spec.token_url, spec.client_id, spec.client_secret, tuple(spec.scopes), spec.audience,
                    tuple(sorted(spec.extra.items())), spec.client_auth)

    async def apply(self, headers: dict[str, str], url: URL) -> tuple[URL, str | None]:
        token = await self.cache.get(self.key, self._request_token)
        headers["Authorization"] = f"Bearer {token}"
        return url, token

    async def refresh(self, used: str | None) -> None:
        self.cache.invalidate(self.key, used)

    async def _request_token(self) -> tuple[str, float | None]:
        spec = self.spec
        form = {"grant_type": "client_credentials"}
        if spec.scopes:
            form["scope"] = " ".join(spec.scopes)
        if spec.audience:
            form["audience"] = spec.audience
        form.update(spec.extra)
        headers = {"Accept": "application/json"}
        if spec.client_auth == "basic":
            headers["Authorization"] = "Basic " + basic_credentials(spec.client_id, spec.client_secret, form_encoded=True)
        else:
            form["client_id"], form["client_secret"] = spec.client_id, spec.client_secret
        where = f"token request to {URL(spec.token_url).with_query(None)}"
        resp = await self.post(URL(spec.token_url), data=form, headers=headers)
        if not 200 <= resp.status < 300:
            raise FetchError(f"{where} answered HTTP {resp.status}{resp.snippet}: check client_id, client_secret and scopes")
        try:
            answer = orjson.loads(resp.body)
            token = answer["access_token"]
            if not isinstance(token, str) or not token:
                raise TypeError
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise FetchError(f"{where}: the answer has no access_token (expected JSON with access_token and expires_in)") from None
        if not token.isascii() or not token.isprintable() or " " in token.strip() or token != token.strip():
            # It goes into an Authorization header: CR/LF or NUL would break every request (and
            # must never be cached), and RFC 6750's token68 has no spaces.
            raise FetchError(f"{where}: the access_token is not a usable bearer token (control characters, spaces or "
                             "non-ASCII characters in it)")
        expires_in = answer.get("expires_in") if isinstance(answer, dict) else None
        if isinstance(expires_in, str) and expires_in.isdigit():
            expires_in = int(expires_in)
        lifetime = float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else None
        return token, lifetime


def basic_credentials(user: str, password: str, *, form_encoded: bool = False) -> str:
    """The base64 part of an HTTP Basic header. `form_encoded`: RFC 6749 §2.3.1 has OAuth2 client
    ids and secrets form-urlencoded first. Also what must be masked if a server echoes the header."""
    if form_encoded:
        user, password = quote_plus(user), quote_plus(password)
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def make_auth(spec: Any, cache: TokenCache, post: Callable[..., Awaitable[Any]]) -> Auth | None:
    """The strategy for a sync's `[api_details.auth]` table (None: no auth configured)."""
    if spec is None:
        return None
    if spec.type == "bearer":
        return Auth(headers={"Authorization": f"Bearer {spec.token}"})
    if spec.type == "basic":
        return Auth(headers={"Authorization": "Basic " + basic_credentials(spec.username, spec.password)})
    if spec.type == "api_key":
        if spec.location == "query":
            return Auth(query={spec.name: spec.value})
        return Auth(headers={spec.name: spec.value})
    return OAuth2ClientCredentials(spec, cache, post)
