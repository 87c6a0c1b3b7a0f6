"""The daemon's HTTP endpoints: /metrics, /healthz, /readyz and /v1/syncs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from syncd.metrics import Metrics


def build_app(metrics: Metrics, *, ready: Callable[[], tuple[bool, str]],
              syncs_status: Callable[[], Awaitable[list[dict]]]) -> web.Application:
    async def metrics_handler(request: web.Request) -> web.Response:
        # In a worker thread: with thousands of syncs the text takes a second or more to render,
        # which must not stop polls and deliveries (prometheus_client's collect is thread-safe).
        body = await asyncio.to_thread(generate_latest, metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        # Answering at all proves the event loop is alive.
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        ok, reason = ready()
        return web.Response(text=f"{reason}\n", status=200 if ok else 503)

    async def syncs(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"syncs": await syncs_status()}, option=orjson.OPT_INDENT_2),
                            content_type="application/json")

    app = web.Application()
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
