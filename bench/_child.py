"""The benchmarks' child servers: run an aiohttp app on 127.0.0.1 until the parent goes away."""

from __future__ import annotations

import asyncio
import sys
import threading

from aiohttp import web


def serve_until_parent_exits(app: web.Application, backlog: int = 128) -> None:
    """Serve `app` on a free port, print the port, stop when stdin closes (the parent is gone)."""

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=backlog).start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # The parent holds our stdin: EOF means it is gone (or done), so we never outlive it.
        threading.Thread(target=lambda: (sys.stdin.buffer.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
        print(runner.addresses[0][1], flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
