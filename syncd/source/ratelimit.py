"""Request pacing: a token bucket per sync (`rate_limit`) and a cap on concurrent requests per host
(`max_requests_per_host`), so fifty syncs on one API do not hammer it."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar

from yarl import URL

#: Waits shorter than this keep the poll's slot: giving it back and taking it again costs more.
IDLE_AFTER = 1.0


class PollSlot:
    """One of max_concurrent_polls, held by a poll while it runs, and given back while the poll
    only waits for its API (a Retry-After, a backoff, its rate limit): syncs whose APIs throttle
    must not keep every other sync from polling for as long as their APIs ask."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self.held = False
        self._token = None

    async def __aenter__(self) -> PollSlot:
        await self._slots.acquire()
        self.held = True
        self._token = _current.set(self)
        return self

    async def __aexit__(self, *exc) -> None:
        _current.reset(self._token)
        if self.held:
            self.held = False
            self._slots.release()

    async def idle(self, seconds: float) -> None:
        self.held = False
        self._slots.release()
        try:
            await asyncio.sleep(seconds)
        finally:
            await self._slots.acquire()  # cancelled meanwhile: not held, and __aexit__ knows it
            self.held = True


_current: ContextVar[PollSlot | None] = ContextVar("poll_slot", default=None)
#: Set while the poll holds a lock other polls may wait for (a shared OAuth2 token's): giving the
#: slot back then could let those polls take every slot and wait for the lock, while the holder
#: waits for a slot.
_keep: ContextVar[bool] = ContextVar("keep_poll_slot", default=False)


@contextmanager
def keep_slot():
    """Within this block, waits keep the poll's slot (see _keep)."""
    token = _keep.set(True)
    try:
        yield
    finally:
        _keep.reset(token)


async def wait(seconds: float) -> None:
    """asyncio.sleep for a poll: a longer wait gives the poll's slot back meanwhile, unless the
    poll holds a lock (keep_slot)."""
    slot = _current.get()
    if slot is None or not slot.held or seconds < IDLE_AFTER or _keep.get():
        await asyncio.sleep(seconds)
    else:
        await slot.idle(seconds)


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
            delay = self._next - now
            self._next = max(now, self._next) + 1.0 / self.rate
        if delay > 0:
            # Not wait(): a paginated run waiting between pages holds the pages read so far, and
            # max_concurrent_polls is what bounds how many such runs hold theirs at once.
            await asyncio.sleep(delay)


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
