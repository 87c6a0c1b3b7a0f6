"""A sync's requests to its API: pages, each with auth, retries, rate limits and a size cap.

`Fetch(sync, source).pages()` yields the pages of one run in order. Any page failing raises
FetchError, and the caller must then change nothing: a partial list never looks like a whole one.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from syncd.config import Sync, parse_rate, safe_url, scrub
from syncd.errors import FetchError
from syncd.http import describe_error, error_snippet, parse_retry_after
from syncd.source import ratelimit
from syncd.source.auth import TokenCache, make_auth
from syncd.source.paginate import PageRequest, PageView, Paginator, next_page_hint
from syncd.source.ratelimit import HostLimiter, TokenBucket
from syncd.source.tls import ssl_context

MAX_REDIRECTS = 10
_CHUNK = 1 << 20
_REDIRECTS = (301, 302, 303, 307, 308)


def retryable(status: int) -> bool:
    return status in (408, 429) or 500 <= status <= 599


class Source:
    """What every poll of the process shares: the HTTP session, the per-host request limit, OAuth2
    tokens and each sync's rate-limit bucket."""

    def __init__(self, session: aiohttp.ClientSession, *, max_bytes: int, max_requests_per_host: int = 8) -> None:
        self.session = session
        self.max_bytes = max_bytes
        self.hosts = HostLimiter(max_requests_per_host)
        self.tokens = TokenCache()
        self._buckets: dict[str, tuple[str, TokenBucket]] = {}

    def bucket(self, sync: Sync) -> TokenBucket | None:
        """The sync's token bucket, kept across runs so the limit holds from one poll to the next."""
        rate = sync.spec.rate_limit
        if rate is None:
            self._buckets.pop(sync.id, None)
            return None
        held = self._buckets.get(sync.id)
        if held is None or held[0] != rate:
            held = self._buckets[sync.id] = (rate, TokenBucket(parse_rate(rate)))
        return held[1]

    def forget(self, sync_ids: set[str]) -> None:
        """Drop the rate-limit state of syncs that no longer exist."""
        for sync_id in set(self._buckets) - sync_ids:
            del self._buckets[sync_id]


@dataclass
class Response:
    status: int
    reason: str
    headers: CIMultiDictProxy | CIMultiDict
    url: URL
    body: bytes = b""  # the whole body of a 2xx answer
    snippet: str = ""  # ": start of the body" of any other answer


@dataclass
class Page:
    """One page of a run. `empty`: a status listed in empty_on_status (no records); `not_modified`:
    a 304 to a conditional request (the list is as it was)."""

    number: int
    url: URL
    status: int
    headers: Any
    body: bytes
    empty: bool = False
    not_modified: bool = False
    document: Any = None
    parsed: bool = False

    def json(self, parse) -> Any:
        if not self.parsed:
            self.document, self.parsed = parse(self.body), True
        return self.document


class _Transient(Exception):
    """A failure worth another attempt (connection, timeout, broken transfer)."""


class Fetch:
    """One run's requests to the sync's API."""

    def __init__(self, sync: Sync, source: Source, *, validators: dict[str, str] | None = None, parse=orjson.loads) -> None:
        self.sync = sync
        self.source = source
        self.api = sync.spec.api_details
        try:
            self.ssl = ssl_context(sync.spec.tls_verify, sync.spec.ca_file, sync.spec.client_cert, sync.spec.client_key)
        except ValueError as exc:  # the files were readable when the definition was loaded
            raise FetchError(str(exc)) from None
        self.timeout = aiohttp.ClientTimeout(total=sync.spec.timeout)
        self.budget = source.max_bytes  # bytes left for the run: the cap spans every page
        self.bucket = source.bucket(sync)
        self.auth = make_auth(self.api.auth, source.tokens, self._post_plain)
        self.validators = validators
        self.parse = parse
        self.pages_fetched = 0
        self.requests = 0
        #: Set when the API asked for a pause longer than the interval: no poll before this time.
        self.not_before: float | None = None
        self._tokens: set[str] = set()
        #: A paginated run whose last page hints at more pages (see next_page_hint).
        self.end_hint: str | None = None

    # -- pages -----------------------------------------------------------------------------------

    async def pages(self) -> AsyncIterator[Page]:
        try:
            async for page in self._pages():
                yield page
        except FetchError as exc:
            # Access tokens fetched at run time are secrets too (an API may echo them in an error).
            exc.reason = scrub(exc.reason, self.sync.secrets | self._tokens)
            exc.args = (exc.reason,)
            exc.not_before = self.not_before
            raise

    async def _pages(self) -> AsyncIterator[Page]:
        spec = self.api.pagination
        paginator = Paginator(spec, self.sync.list_path) if spec is not None else None
        request: PageRequest | None = paginator.first() if paginator else PageRequest()
        number = 0
        while request is not None:
            number += 1
            page = await self._page(request, number, conditional=paginator is None)
            self.pages_fetched = number
            yield page
            if paginator is None or page.empty or page.not_modified:
                return
            document = page.json(self.parse)
            try:
                found = self.sync.list_path.get(document) if self.sync.list_path is not None else None
            except ValueError:
                found = None
            items = found if type(found) is list else None
            request = paginator.next(PageView(number, page.url, page.headers, page.body, document, items))
            if request is None:
                # The walk ended; if the last page still says there is more, a path in the
                # pagination settings is probably wrong (a missing cursor reads as the end).
                self.end_hint = next_page_hint(page.headers, document)

    async def _page(self, request: PageRequest, number: int, *, conditional: bool) -> Page:
        api = self.api
        url = request.url or URL(self.sync.url)
        headers = {"Accept": "application/json"}
        headers.update(api.headers)
        body: bytes | None = api.body.encode() if api.body is not None else None
        if request.params and request.url is None:
            where = api.pagination.param_in
            if where == "query":
                url = url.update_query({k: _param(v) for k, v in request.params.items()})
            elif where == "header":
                headers.update({k: _param(v) for k, v in request.params.items()})
            else:
                document = orjson.loads(body) if body else {}
                document.update(request.params)
                body = orjson.dumps(document)
        if body is not None and not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
        if conditional and self.validators and self.sync.spec.conditional_requests:
            if etag := self.validators.get("etag"):
                headers["If-None-Match"] = etag
            if modified := self.validators.get("last_modified"):
                headers["If-Modified-Since"] = modified
        resp = await self.request(api.method, url, headers=headers, data=body, rate_limited=True,
                                  what=f"page {number}" if api.pagination else None,
                                  final=tuple(self.sync.spec.empty_on_status))
        if resp.status == 304 and conditional and self.validators:
            return Page(number, resp.url, 304, resp.headers, b"", not_modified=True)
        if resp.status in self.sync.spec.empty_on_status:
            return Page(number, resp.url, resp.status, resp.headers, b"", empty=True)
        if not 200 <= resp.status < 300:
            where = f"{api.method} {self._display(resp.url)}" + (f" (page {number})" if api.pagination else "")
            raise FetchError(f"{where} answered HTTP {resp.status} {resp.reason}".rstrip() + resp.snippet)
        return Page(number, resp.url, resp.status, resp.headers, resp.body)

    # -- one request, with retries -------------------------------------------------------------

    async def request(self, method: str, url: URL, *, headers: dict[str, str], data: Any = None,
                      rate_limited: bool = False, what: str | None = None, use_auth: bool = True,
                      final: tuple[int, ...] = ()) -> Response:
        """Send one request with the sync's auth, retries, rate limit and the per-host limit.
        Returns the final answer (any status; `final` statuses are never retried); raises
        FetchError when no answer could be had."""
        retry = self.api.retry
        interval = self.sync.spec.interval
        attempt = 0
        refreshed = False
        while True:
            if rate_limited and self.bucket is not None:
                await self.bucket.acquire()
            sent_headers = dict(headers)
            sent_url, token = url, None
            if use_auth and self.auth is not None:
                sent_url, token = await self.auth.apply(sent_headers, url)
                if token:
                    self._tokens.add(token)
            where = f"{method} {self._display(sent_url)}" + (f" ({what})" if what else "")
            wait: float | None = None
            try:
                resp = await self._exchange(method, sent_url, sent_headers, data, where)
            except _Transient as exc:
                if attempt >= retry.retries:
                    tries = f" (after {attempt + 1} attempts)" if attempt else ""
                    raise FetchError(f"{where}: {exc}{tries}") from None
            else:
                if resp.status == 401 and use_auth and self.auth is not None and self.auth.refreshable and not refreshed:
                    # The token may have been revoked or expired early: exactly one refresh and retry.
                    refreshed = True
                    await self.auth.refresh(token)
                    continue
                if not retryable(resp.status) or resp.status in final:
                    return resp
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
                if retry_after is not None and retry_after > interval:
                    self.not_before = time.time() + retry_after
                    raise FetchError(f"{where} answered HTTP {resp.status} with Retry-After of {retry_after:g}s, longer "
                                     f"than the sync's interval ({interval:g}s): the next poll waits until then")
                if attempt >= retry.retries:
                    tries = f" (after {attempt + 1} attempts)" if attempt else ""
                    raise FetchError(f"{where} answered HTTP {resp.status} {resp.reason}".rstrip() + resp.snippet + tries)
                wait = retry_after
            if wait is None:
                wait = min(retry.max_backoff, retry.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            if self.budget == self.source.max_bytes:
                await ratelimit.wait(wait)  # nothing read yet: the poll's slot is given back meanwhile
            else:
                # Pages read are held meanwhile: keep the slot, so that max_concurrent_polls still
                # bounds how many runs hold data at once.
                await asyncio.sleep(wait)

    async def _post_plain(self, url: URL, *, data: Any, headers: dict[str, str]) -> Response:
        """A token request: the sync's retries and host limit, without its API credentials."""
        return await self.request("POST", url, headers=headers, data=data, use_auth=False)

    async def _exchange(self, method: str, url: URL, headers: dict[str, str], data: Any, where: str) -> Response:
        """One HTTP exchange, following same-origin redirects only; reads a 2xx body within the budget."""
        session = self.source.session
        for _ in range(MAX_REDIRECTS + 1):
            try:
                async with self.source.hosts.slot(url):
                    self.requests += 1
                    # Redirects are followed here, not by aiohttp: it forwards custom credential
                    # headers (X-Api-Key, ...) to any host; only same-origin redirects are followed.
                    async with session.request(method, url, headers=headers, data=data, timeout=self.timeout,
                                               allow_redirects=False, ssl=self.ssl) as resp:
                        if resp.status in _REDIRECTS and "Location" in resp.headers:
                            try:
                                target = url.join(URL(resp.headers["Location"]))
                                target.port  # noqa: B018 - a port that is no number raises here
                            except (ValueError, TypeError):
                                raise FetchError(f"{where} answered HTTP {resp.status} with a Location that is no "
                                                 "usable URL; not followed") from None
                            if target.user is not None or target.password is not None:
                                raise FetchError(f"{where} redirects to a URL with credentials in it; not followed")
                            if (target.scheme, target.host, target.port) != (url.scheme, url.host, url.port):
                                raise FetchError(
                                    f"{where} redirects to another origin ({target.scheme}://{target.host}:{target.port}); "
                                    "not followed so that credentials stay with the API's host: set base_url to the new address")
                            if resp.status in (301, 302, 303) and method != "GET":
                                method, data = "GET", None
                            url = target
                            continue
                        if not 200 <= resp.status < 300:
                            snippet = await error_snippet(resp, self.sync.secrets | self._tokens)
                            return Response(resp.status, resp.reason or "", resp.headers, url, snippet=snippet)
                        body = await self._read(resp, where)
                        return Response(resp.status, resp.reason or "", resp.headers, url, body)
            except (TimeoutError, aiohttp.ClientError) as exc:
                if isinstance(exc, aiohttp.InvalidURL):
                    raise FetchError(f"{where}: invalid URL") from None
                raise _Transient(describe_error(exc, self.timeout.total)) from None
        raise FetchError(f"{method} {self._display(url)}: more than {MAX_REDIRECTS} redirects")

    async def _read(self, resp: aiohttp.ClientResponse, where: str) -> bytes | bytearray:
        budget = self.budget
        cap = f"max_response_bytes ({self.source.max_bytes} bytes" + (", all pages together)" if self.api.pagination else ")")
        if resp.content_length is not None and resp.content_length > budget:
            raise FetchError(f"{where}: response of {resp.content_length} bytes exceeds {cap}; "
                             "raise the setting if this is expected")
        if resp.content_length is not None and not resp.headers.get("Content-Encoding"):
            # Length known and checked: read into one growing buffer, so the body is never held
            # twice (chunks plus their join): a 30 MB body peaks at 30 MB, not 60. Grown as bytes
            # arrive, not allocated from the header: a Content-Length of 1 GB over a body of one
            # byte must not cost 1 GB (large blocks grow in place, by mremap).
            declared = resp.content_length
            body = bytearray()
            async for chunk in resp.content.iter_any():
                if len(body) + len(chunk) > declared:
                    raise FetchError(f"{where}: the response is longer than its Content-Length ({declared} bytes)")
                body += chunk
            if len(body) != declared:
                raise _Transient(f"the response ended after {len(body)} of its {declared} bytes")
        else:
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(_CHUNK):
                size += len(chunk)
                if size > budget:
                    raise FetchError(f"{where}: response exceeds {cap}; raise the setting if this is expected")
                chunks.append(chunk)
            body = b"".join(chunks)
        self.budget -= len(body)
        return body

    def _display(self, url: URL) -> str:
        return scrub(safe_url(str(url)), self.sync.secrets)


def _param(value: Any) -> str:
    if value is True or value is False:
        return "true" if value else "false"
    return str(value)
