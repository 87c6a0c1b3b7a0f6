"""What keep_records costs: database size and run time for 100k records, with and without it.

    python bench/keep_records.py [--records N]

The same bodies as bench/engine.py (about 320 bytes a record) served from a local aiohttp API in
this process; the real engine polls them into two fresh state databases, one sync with
keep_records = false and one with keep_records = true: an initial run, then a 1%-changed run.
Prints the database size on disk after a WAL checkpoint (db file, VACUUMed), and each run's time.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import ID_PATH, LIST_PATH, make_bodies  # noqa: E402


async def main(n: int) -> None:
    from syncd.config import load_dir
    from syncd.engine import poll
    from syncd.http import poll_session
    from syncd.settings import load_settings
    from syncd.source.fetcher import Source
    from syncd.store import Store

    v1, v2 = make_bodies(n)
    current = {"body": v1}

    async def handler(request):
        return web.Response(body=current["body"], content_type="application/json")

    app = web.Application()
    app.router.add_get("/api", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    print(f"keep_records benchmark: {n:,} records, {len(v1) / 2**20:.1f} MiB body")
    print(f"  {'':<22}{'initial run':>14}{'1% changed':>14}{'database':>14}{'per record':>12}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for keep in (False, True):
                conf = Path(tmp) / f"conf-{keep}"
                conf.mkdir()
                (conf / "bench.toml").write_text(
                    f'webhook_url = "http://127.0.0.1:9/hook"\nlist_identifier = "{LIST_PATH}"\n'
                    f'record_identifier = "{ID_PATH}"\nkeep_records = {str(keep).lower()}\n'
                    f'[api_details]\nbase_url = "http://127.0.0.1:{port}"\npath = "/api"\n')
                state = Path(tmp) / f"state-{keep}.db"
                settings = load_settings({"config_dir": conf, "state_path": state})
                sync = load_dir(settings)[0]["bench"]
                times = []
                async with await Store.open(state) as store, poll_session() as session:
                    source = Source(session, max_bytes=2**30)
                    for body in (v1, v2):
                        current["body"] = body
                        t0 = time.perf_counter()
                        result = await poll(sync, store, source)
                        times.append(time.perf_counter() - t0)
                        assert result.ok, result.error
                    # Sizes of what a sync keeps, not of the outbox (delivered events leave it).
                    await store._conn.execute("DELETE FROM outbox")
                conn = sqlite3.connect(state)
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                conn.execute("VACUUM")
                conn.close()
                size = state.stat().st_size
                label = f"keep_records = {str(keep).lower()}"
                print(f"  {label:<22}{times[0] * 1000:>12.0f}ms{times[1] * 1000:>12.0f}ms"
                      f"{size / 2**20:>11.1f}MiB{size / n:>10.0f} B")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    asyncio.run(main(parser.parse_args().records))
