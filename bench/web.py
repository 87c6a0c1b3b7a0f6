"""How fast the operator's page answers with many syncs.

    python bench/web.py [--syncs N] [--requests K]   # defaults: 1000, 30

A daemon (in this process) with N syncs against a local API (every sync polled once, so every row
has a last run, records and events), then K timed GETs of `/` and of one `/syncs/{id}`, each a
whole HTTP request on loopback. Target: `/` under 200 ms with 1,000 syncs (median).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

TARGET = 0.200


async def main(n: int, k: int) -> int:
    import structlog

    import syncd.scheduler
    from syncd.daemon import Daemon
    from syncd.settings import load_settings

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    syncd.scheduler.STARTUP_SPREAD = 2.0

    async def handler(request):
        return web.json_response({"items": [{"id": i, "name": f"r{i}"} for i in range(20)]})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "conf.d"
        conf.mkdir()
        for i in range(n):
            (conf / f"s{i:05d}.toml").write_text(
                'webhook_url = "http://127.0.0.1:9/hook"\nlist_identifier = "$.items"\nrecord_identifier = "$.id"\n'
                f'interval = "1h"\n[api_details]\nbase_url = "http://127.0.0.1:{port}"\npath = "/s{i}"\n')
        settings = load_settings({"config_dir": conf, "state_path": Path(tmp) / "state.db", "listen": "127.0.0.1:0",
                                  "max_concurrent_polls": 64, "max_requests_per_host": 64})
        daemon = Daemon(settings)
        task = asyncio.create_task(daemon.run())
        while daemon.address is None:
            await asyncio.sleep(0.05)
        base = "http://{}:{}".format(*daemon.address)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            views = await daemon.syncs_status()
            if sum(1 for v in views if v["last_run_at"]) == n:
                break
            await asyncio.sleep(0.5)
        results = {}
        async with aiohttp.ClientSession() as session:
            for path in ("/", "/syncs/s00000"):
                times = []
                for _ in range(k):
                    t0 = time.perf_counter()
                    async with session.get(base + path) as resp:
                        body = await resp.read()
                        assert resp.status == 200
                    times.append(time.perf_counter() - t0)
                results[path] = (statistics.median(times), sorted(times)[int(len(times) * 0.9) - 1], len(body))
        daemon.request_stop()
        await task
    await runner.cleanup()
    print(f"operator page benchmark: {n} syncs, {k} requests each")
    for path, (median, p90, size) in results.items():
        print(f"  GET {path:<16} median {median * 1000:7.1f} ms   p90 {p90 * 1000:7.1f} ms   {size / 1024:7.1f} KiB")
    verdict = "PASS" if results["/"][0] < TARGET else "MISS"
    print(f"  GET / median < {TARGET * 1000:.0f} ms with {n} syncs: {verdict}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--syncs", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.syncs, args.requests)))
