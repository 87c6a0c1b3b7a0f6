"""How evenly one daemon keeps the intervals of many syncs, and what that costs.

    python bench/many_syncs.py [--syncs N] [--interval D] [--seconds S] [--profile FILE]
    # defaults: 10000 syncs, 60s, 3 intervals + the 10 s start-up spread
    # quick run: --syncs 2000 --interval 20s --seconds 70

One daemon, in this process (`Daemon(load_settings(...)).run()` as a task, max_concurrent_polls 64,
max_requests_per_host 64), with N definition files that all poll one local API every D. The API
runs in a child process (so its CPU is not counted as the daemon's): it answers every sync's path
with the same tiny JSON list (one record, never changing; the first poll of each sync makes one
event, delivered to POST /hook on the same API) and records the arrival time of each request per
path. After a window of S seconds from the daemon's start, the report gives:

  gap / interval   per sync, the gaps between consecutive polls over the interval: p50, p99, max
                   (target p99 <= 1.15)
  daemon CPU       getrusage(RUSAGE_SELF) of this process over the window (user + system), as a
                   fraction of wall time; the API's CPU (from /proc) is given apart
  GET /metrics, GET /v1/syncs   after the window, daemon still running: median of 5 requests and
                   the size of the text; /metrics both gzipped (what Prometheus asks for; also the
                   size sent) and not (target: <= 1 s)

--profile FILE: cProfile the event loop over the window (slows the daemon; figures then overstate
CPU) and print the top functions by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gzip
import io
import itertools
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

TARGET = 1.15
METRICS_TARGET = 1.0  # seconds for GET /metrics
REQUESTS = 5  # of each endpoint, after the window
BODY = b'{"items":[{"id":1,"name":"r1"}]}'


def serve() -> None:
    """Child process: GET /s{i} -> BODY (arrival time recorded), POST /hook -> 204, GET /__times."""
    from aiohttp import web

    from _child import serve_until_parent_exits

    arrivals: dict[str, list[float]] = {}

    async def answer(request: web.Request) -> web.Response:
        arrivals.setdefault(request.path, []).append(time.monotonic())
        return web.Response(body=BODY, content_type="application/json")

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    async def times(request: web.Request) -> web.Response:
        return web.Response(body=json.dumps(arrivals).encode(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/__times", times)
    app.router.add_post("/hook", hook)
    app.router.add_get("/{tail:.*}", answer)
    serve_until_parent_exits(app, backlog=1024)


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def main(n: int, interval: float, seconds: float, profile: str | None) -> int:
    import structlog

    from syncd.daemon import Daemon
    from syncd.settings import load_settings
    from syncd.units import format_duration

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    child = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             cwd=Path(__file__).parent)
    try:
        port = int(child.stdout.readline())
        api = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as tmp:
            conf = Path(tmp) / "conf.d"
            conf.mkdir()
            for i in range(n):
                (conf / f"s{i:05d}.toml").write_text(
                    f'webhook_url = "{api}/hook"\nlist_identifier = "$.items"\nrecord_identifier = "$.id"\n'
                    f'interval = "{format_duration(interval)}"\n[api_details]\nbase_url = "{api}"\npath = "/s{i}"\n')
            settings = load_settings({"config_dir": conf, "state_path": Path(tmp) / "state.db", "listen": "127.0.0.1:0",
                                      "max_concurrent_polls": 64, "max_requests_per_host": 64})
            daemon = Daemon(settings)
            prof = cProfile.Profile() if profile else None
            wall0, cpu0, api0 = time.monotonic(), self_cpu(), proc_cpu(child.pid)
            if prof:
                prof.enable()
            task = asyncio.create_task(daemon.run())
            while daemon.address is None and not task.done():
                await asyncio.sleep(0.05)
            started = time.monotonic() - wall0
            await asyncio.sleep(max(0.0, seconds - (time.monotonic() - wall0)))
            if prof:
                prof.disable()
            wall = time.monotonic() - wall0
            cpu, api_cpu = self_cpu() - cpu0, proc_cpu(child.pid) - api0

            base = "http://{}:{}".format(*daemon.address)
            endpoints = {}
            # Bodies are read as sent (no decompression in the timed part): /metrics as Prometheus
            # asks for it (gzip) and as curl does (identity); the size given is the text's.
            async with aiohttp.ClientSession(auto_decompress=False) as session:
                for label, path, encoding in (("/metrics gzip", "/metrics", "gzip"), ("/metrics", "/metrics", "identity"),
                                              ("/v1/syncs", "/v1/syncs", "identity")):
                    times = []
                    for _ in range(REQUESTS):
                        t0 = time.perf_counter()
                        async with session.get(base + path, headers={"Accept-Encoding": encoding}) as resp:
                            body = await resp.read()
                            assert resp.status == 200, (path, resp.status)
                            zipped = resp.headers.get("Content-Encoding") == "gzip"
                        times.append(time.perf_counter() - t0)
                    size = len(gzip.decompress(body)) if zipped else len(body)
                    endpoints[label] = (statistics.median(times), size, len(body) if zipped else None)
                async with session.get(api + "/__times") as resp:
                    arrivals: dict[str, list[float]] = await resp.json()
            daemon.request_stop()
            await task
    finally:
        child.stdin.close()
        child.wait(timeout=30)

    ratios, per_sync_max = [], []
    polls = sum(len(v) for v in arrivals.values())
    for ts in arrivals.values():
        gaps = [(b - a) / interval for a, b in itertools.pairwise(ts)]
        ratios.extend(gaps)
        if gaps:
            per_sync_max.append(max(gaps))
    polled = len(arrivals)
    print(f"many syncs: {n} syncs every {format_duration(interval)}, one daemon in-process, window {wall:.0f} s "
          f"(daemon listening after {started:.1f} s)")
    print(f"  polls         {polls} ({polls / wall:.1f}/s; expected ~{n / interval:.1f}/s), syncs polled {polled}/{n}, "
          f"gaps {len(ratios)}")
    if ratios:
        p99 = pct(ratios, 0.99)
        print(f"  gap/interval  p50 {pct(ratios, 0.5):.3f}   p99 {p99:.3f}   max {max(ratios):.3f}   "
              f"min {min(ratios):.3f}   syncs with a gap > {TARGET}: {sum(1 for m in per_sync_max if m > TARGET)}")
    print(f"  daemon CPU    {cpu:.1f} s over {wall:.0f} s wall = {cpu / wall:.1%} of one core   "
          f"(API process: {api_cpu:.1f} s = {api_cpu / wall:.1%})")
    for label, (median, size, wire) in endpoints.items():
        sent = f"   {wire / 1024:7.1f} KiB sent gzipped" if wire is not None else ""
        print(f"  GET {label:<14} median {median * 1000:7.1f} ms   {size / 1024:8.1f} KiB{sent}")
    if ratios:
        print(f"  p99 gap/interval <= {TARGET}: {'PASS' if p99 <= TARGET else 'MISS'}")
    metrics_time = endpoints["/metrics gzip"][0]
    print(f"  GET /metrics (gzip, as Prometheus asks) <= {METRICS_TARGET:.0f} s: {'PASS' if metrics_time <= METRICS_TARGET else 'MISS'}")
    if prof:
        prof.dump_stats(profile)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())
    return 0 if polled == n else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
        sys.exit(0)
    sys.path.insert(0, str(Path(__file__).parent))
    from syncd.units import parse_duration

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--syncs", type=int, default=10000)
    parser.add_argument("--interval", type=parse_duration, default=60.0, help="at least 1s (default 60s)")
    parser.add_argument("--seconds", type=float, default=None, help="window (default 3 intervals + 10 s)")
    parser.add_argument("--profile", metavar="FILE", default=None)
    args = parser.parse_args()
    if args.interval < 1.0:
        parser.error("--interval must be at least 1s")
    seconds = args.seconds if args.seconds is not None else 3 * args.interval + 10.0
    sys.exit(asyncio.run(main(args.syncs, args.interval, seconds, args.profile)))
