"""Helpers the benchmarks share: child servers on 127.0.0.1 and peak-RSS measurement."""

from __future__ import annotations

import asyncio
import resource
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


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux >= 4.0), so ru_maxrss becomes per run."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
