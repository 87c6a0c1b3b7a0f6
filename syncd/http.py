"""HTTP helpers shared by polling and delivery: sessions, the user agent, error messages, Retry-After.

Polling (`syncd.source`) and delivery (`syncd.delivery`) both use this module and never each other.
"""

from __future__ import annotations

import asyncio
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

import aiohttp

from syncd import __version__
from syncd.errors import scrub

if TYPE_CHECKING:
    from syncd.webhook_client import WebhookClient

USER_AGENT = f"syncd/{__version__}"


def poll_session(**kwargs) -> aiohttp.ClientSession:
    """The session shared by every sync's polls (one connection pool for the process).

    auto_decompress stays on: the response size caps then apply to decompressed bytes (no gzip
    bombs). Per-host concurrency is bounded by `max_requests_per_host`, not by the connector."""
    connector = aiohttp.TCPConnector(limit=256, limit_per_host=0, ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, headers={"User-Agent": USER_AGENT}, **kwargs)


def webhook_session(concurrency: int) -> WebhookClient:
    """The client that delivers webhooks (not aiohttp: see syncd.webhook_client), keeping as many
    connections as deliveries in flight. Close it with `await client.close()`."""
    from syncd.webhook_client import WebhookClient  # not imported by `syncd once`, which only polls

    return WebhookClient(concurrency, user_agent=USER_AGENT)


def describe_error(exc: BaseException, timeout: float | None, timeout_name: str = "the timeout") -> str:
    """A one-line reason for an aiohttp or timeout error, for a log line or a run's error."""
    if isinstance(exc, asyncio.TimeoutError):
        return f"no complete response within {timeout_name} of {timeout:g}s" if timeout else "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
    return f"{type(exc).__name__}: {exc}"


SNIPPET = 200  # characters of an error body quoted in an error


async def error_snippet(resp: aiohttp.ClientResponse, secrets: frozenset[str] = frozenset()) -> str:
    """The start of an error body, which often says why (`{"error":"invalid token"}`), without
    `secrets`: read far enough past the cut that a secret the cut would halve is masked whole."""
    want = SNIPPET + min(4096, max(map(len, secrets), default=0))
    data = b""
    try:
        while len(data) < want:  # read() gives what has arrived: a body sent in pieces needs several
            chunk = await resp.content.read(want - len(data))
            if not chunk:
                break
            data += chunk
    except (TimeoutError, aiohttp.ClientError):
        if not data:
            return ""
    return snippet_text(data, secrets)


def snippet_text(data: bytes, secrets: frozenset[str] = frozenset()) -> str:
    """`: <the bytes as one line of text>` to append to an error, or "" for an empty body:
    `secrets` masked first, then cut to SNIPPET characters."""
    text = scrub(data.decode("utf-8", "replace"), secrets)
    text = " ".join(text.split())[:SNIPPET]
    return f": {text}" if text else ""


#: The longest Retry-After honoured (a sync's longest interval): an API asking for ten years, or
#: for a 400-digit number of seconds, must not silence a sync for good.
MAX_RETRY_AFTER = 7 * 86400.0


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date, at most MAX_RETRY_AFTER;
    None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # not "²", which isdigit() takes and float() refuses
        return min(float(value[:12]) if len(value) <= 12 else MAX_RETRY_AFTER, MAX_RETRY_AFTER)
    try:
        return min(max(0.0, parsedate_to_datetime(value).timestamp() - now), MAX_RETRY_AFTER)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
