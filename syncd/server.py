"""The daemon's HTTP endpoints: /metrics, /healthz, /readyz and /v1/syncs."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable

import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from syncd.metrics import Metrics

log = structlog.get_logger("syncd.server")


class Exposition:
    """/metrics bodies, rendered in a worker thread: at 10,000 syncs the text is 9 MiB and takes
    about 0.1 s of CPU, which must not stop polls and deliveries. A scrape that arrives while a
    render runs shares it (two Prometheus servers of an HA pair, a client retrying after its
    timeout), so a burst of scrapes costs one render, not one each."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._running: asyncio.Future[bytes] | None = None

    async def text(self) -> bytes:
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(asyncio.to_thread(self._metrics.render))
        # shield: a scraper that disconnects must not cancel the render the others wait for.
        return await asyncio.shield(self._running)


@web.middleware
async def internal_errors(request: web.Request, handler):
    """A handler's unexpected error: a short 500 and one log record (a JSON line with its traceback
    under `exception`), not aiohttp's own multi-line traceback through the logging module."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        log.exception("request failed with an internal error; please report it", method=request.method,
                      path=request.path)
        return web.Response(status=500, text=f"syncd: internal error ({type(exc).__name__}); the daemon's log has "
                                             "the details\n")


def build_app(metrics: Metrics, *, ready: Callable[[], tuple[bool, str]],
              syncs_status: Callable[[], Awaitable[list[dict]]]) -> web.Application:
    exposition = Exposition(metrics)

    async def metrics_handler(request: web.Request) -> web.Response:
        body = await exposition.text()
        headers = {"Content-Type": CONTENT_TYPE_LATEST, "Vary": "Accept-Encoding"}
        # Prometheus asks for gzip: at 10,000 syncs 9 MiB of text is 0.5 MiB on the wire, for
        # 20-30 ms of level-1 compression (off the loop too).
        if "gzip" in request.headers.get("Accept-Encoding", "").lower():
            body = await asyncio.to_thread(gzip.compress, body, 1)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    async def healthz(request: web.Request) -> web.Response:
        # Answering at all proves the event loop is alive.
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        ok, reason = ready()
        return web.Response(text=f"{reason}\n", status=200 if ok else 503)

    async def syncs(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"syncs": await syncs_status()}, option=orjson.OPT_INDENT_2),
                            content_type="application/json")

    app = web.Application(middlewares=[internal_errors])
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/syncs", syncs)
    return app


async def start(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host or None, port, reuse_address=True)
    await site.start()
    return runner
