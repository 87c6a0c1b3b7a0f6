"""One poll's HTTP request, with a timeout and a cap on the response size."""

from __future__ import annotations

import asyncio

import aiohttp

from syncd import __version__
from yarl import URL

from syncd.config import Sync, safe_url, scrub
from syncd.errors import FetchError

USER_AGENT = f"syncd/{__version__}"
_CHUNK = 1 << 20


def client_session(**kwargs) -> aiohttp.ClientSession:
    """The session shared by every sync's polls (one connection pool for the process)."""
    connector = aiohttp.TCPConnector(limit=100, limit_per_host=16, ttl_dns_cache=300)
    # auto_decompress: the size cap below then applies to decompressed bytes (no gzip bombs).
    return aiohttp.ClientSession(connector=connector, headers={"User-Agent": USER_AGENT}, **kwargs)


MAX_REDIRECTS = 10


async def fetch(session: aiohttp.ClientSession, sync: Sync, *, max_bytes: int) -> bytes:
    """The body of a 2xx response to the sync's request. Raises FetchError with a readable reason,
    scrubbed of every value that came from ${NAME}."""
    try:
        return await _fetch(session, sync, max_bytes)
    except FetchError as exc:
        exc.reason = scrub(exc.reason, sync.secrets)
        exc.args = (exc.reason,)
        raise


async def _fetch(session: aiohttp.ClientSession, sync: Sync, max_bytes: int) -> bytes:
    api = sync.spec.api_details
    headers = {"Accept": "application/json"}
    headers.update(api.headers)
    data = None
    if api.body is not None:
        data = api.body.encode()
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
    method, url = api.method, URL(sync.url)
    timeout = aiohttp.ClientTimeout(total=sync.spec.timeout)
    for _ in range(MAX_REDIRECTS + 1):
        where = f"{method} {safe_url(str(url))}"
        try:
            # Redirects are followed here, not by aiohttp: it forwards custom credential headers
            # (X-Api-Key, ...) to any host; we follow only redirects that stay on the same origin.
            async with session.request(method, url, headers=headers, data=data, timeout=timeout,
                                       allow_redirects=False) as resp:
                if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                    target = url.join(URL(resp.headers["Location"]))
                    if (target.scheme, target.host, target.port) != (url.scheme, url.host, url.port):
                        raise FetchError(
                            f"{where} redirects to another origin ({target.scheme}://{target.host}:{target.port}); "
                            "not followed so that credentials stay with the API's host: set base_url to the new address"
                        )
                    if resp.status in (301, 302, 303) and method != "GET":
                        method, data = "GET", None
                    url = target
                    continue
                if not 200 <= resp.status < 300:
                    snippet = await error_snippet(resp)
                    raise FetchError(f"{where} answered HTTP {resp.status} {resp.reason or ''}".rstrip() + snippet)
                if resp.content_length is not None and resp.content_length > max_bytes:
                    raise FetchError(f"{where}: response of {resp.content_length} bytes exceeds max_response_bytes ({max_bytes})")
                if resp.content_length is not None and not resp.headers.get("Content-Encoding"):
                    # Length known and checked above: one read, no chunk list to join.
                    return await resp.read()
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FetchError(f"{where}: response exceeds max_response_bytes ({max_bytes} bytes); "
                                         "raise the setting if this is expected")
                    chunks.append(chunk)
                return b"".join(chunks)
        except asyncio.TimeoutError:
            raise FetchError(f"{where}: no complete response within the timeout of {sync.spec.timeout:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            raise FetchError(f"{where}: cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}") from None
        except aiohttp.ClientError as exc:
            raise FetchError(f"{where}: {type(exc).__name__}: {exc}") from None
    raise FetchError(f"{api.method} {sync.display_url}: more than {MAX_REDIRECTS} redirects")


async def error_snippet(resp: aiohttp.ClientResponse) -> str:
    """The start of an error body, which often says why (`{"error":"invalid token"}`)."""
    try:
        text = (await resp.content.read(200)).decode("utf-8", "replace")
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return ""
    text = " ".join(text.split())
    return f": {text}" if text else ""
