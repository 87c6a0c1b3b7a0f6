"""Request pacing: a token bucket per sync (`rate_limit`) and a cap on concurrent requests per host
(`max_requests_per_host`), so fifty syncs on one API do not hammer it."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from yarl import URL


class TokenBucket:
    """`rate` requests per second, one at a time: each request may start 1/rate after the previous
    one. A burst of one keeps the promise simple: N requests take at least (N-1)/rate seconds."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            now = time.monotonic()
            wait = self._next - now
            self._next = max(now, self._next) + 1.0 / self.rate
        if wait > 0:
            await asyncio.sleep(wait)


class HostLimiter:
    """At most `limit` requests in flight to one host:port, across every sync of the process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._semaphores: dict[tuple[str, str | None, int | None], asyncio.Semaphore] = {}

    @asynccontextmanager
    async def slot(self, url: URL):
        key = (url.scheme, url.host, url.port)
        semaphore = self._semaphores.get(key)
        if semaphore is None:
            semaphore = self._semaphores[key] = asyncio.Semaphore(self.limit)
        async with semaphore:
            yield
