"""How long a big changed poll stops the daemon's event loop, and what stops it.

    python bench/loop_stall.py [--records N] [--polls K] [--interval D] [--py-spy BIN]
    # defaults: 100000 records, 6 changed polls, 4s; about 40 s

One `Daemon` in this process (as `syncd run` builds it) with one sync of N records (~320 bytes
each, the bodies of bench/engine.py, `initial_sync = "skip"`), polled every D. The API runs in a
child process and alternates its answer: /v1, then /v2 (1% of the records changed, one field
each), then /v1, ...: every poll after the first is a 1%-changed one with N/100 record.modified
events, delivered to a receiver in the same child process (POST /hook, 204).

Measured, after the initial poll, over K changed polls:

  loop stall   a task in the daemon's loop sleeps 5 ms again and again; how late it wakes up is
               how long nothing else could run on the loop (health checks, deliveries, the
               other syncs' polls). Per poll: the longest stall from the poll's request reaching
               the API to the poll being counted in syncd_sync_polls_total; the longest stall
               outside polls (deliveries, idle) is given apart. Target: median of the per-poll
               maxima <= 50 ms.
  /healthz     another process GETs /healthz every 10 ms (one at a time, keep-alive) and times
               each answer: per poll, the slowest answer that was sent during the poll.
  stages       syncd's stages are wrapped in memory (nothing in syncd is edited; a stage that
               does not exist in this version is skipped) and their start and end recorded with
               their thread, with the cyclic GC's collections (gc.callbacks). Each stall of
               20 ms or more is charged to the stages that overlapped it, on the loop's thread
               or another one (a worker thread holding the GIL in a long C call, such as
               orjson.loads or freeing a big document, stops the loop as surely as the loop's own code).

--py-spy BIN: also sample this process with py-spy (`record --gil --threads --nonblocking`, only the
thread holding the GIL) during the changed polls, and print where the GIL was by thread and function
(a C call such as orjson.loads shows as the Python line that made it).
Exit status 0 when every poll succeeded (target met or not).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import gc
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TARGET = 0.050  # seconds: the longest loop stall of a changed poll (median over polls)
TICK = 0.005
PROBE_EVERY = 0.010
SYNC_ID = "big"
STALL_REPORT = 0.020  # stalls this long or longer are charged to stages


# -- the child processes: the API + webhook receiver, and the /healthz prober ----------------------


def serve(n: int) -> None:
    """GET /list alternates v1, v2, v1, ... (arrival times kept); POST /hook -> 204; GET /__times."""
    from aiohttp import web

    from _child import serve_until_parent_exits
    from engine import make_bodies

    bodies = make_bodies(n)
    arrivals: list[float] = []

    async def listing(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        return web.Response(body=bodies[(len(arrivals) - 1) % 2], content_type="application/json")

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    async def times(request: web.Request) -> web.Response:
        return web.json_response(arrivals)

    app = web.Application(client_max_size=1 << 20)
    app.router.add_get("/list", listing)
    app.router.add_post("/hook", hook)
    app.router.add_get("/__times", times)
    serve_until_parent_exits(app)


def probe(port: int) -> None:
    """GET /healthz every PROBE_EVERY until stdin closes; then print [[sent, seconds], ...] as JSON."""
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    results = []
    while not done.is_set():
        t0 = time.monotonic()
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        resp.read()
        results.append((t0, time.monotonic() - t0))
        time.sleep(max(0.0, PROBE_EVERY - (time.monotonic() - t0)))
    print(json.dumps(results), flush=True)


# -- in this process: the stage recorder and the ticker ------------------------------------------------

#: (label, thread name, start, end), monotonic seconds, for every wrapped call and GC collection.
INTERVALS: list[tuple[str, str, float, float]] = []


def _recorded(label: str, func):
    if asyncio.iscoroutinefunction(func):
        @functools.wraps(func)
        async def wrapper(*args, **kwargs):
            t0 = time.monotonic()
            try:
                return await func(*args, **kwargs)
            finally:
                INTERVALS.append((label + " (awaited)", threading.current_thread().name, t0, time.monotonic()))
    else:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            t0 = time.monotonic()
            try:
                return func(*args, **kwargs)
            finally:
                INTERVALS.append((label, threading.current_thread().name, t0, time.monotonic()))
    return wrapper


# (module, class or None, attribute): wrapped where they exist, so the bench runs on older and newer
# versions of the engine alike.
STAGES = [
    ("syncd.source.fetcher", "Fetch", "_exchange"),
    ("syncd.engine", None, "parse_document"),
    ("syncd.engine", None, "split_list"),
    ("syncd.engine", None, "may_need_exact"),
    ("syncd.engine", None, "_extract"),
    ("syncd.engine", None, "_analyse"),
    ("syncd.engine", None, "_add_page"),
    ("syncd.engine", None, "_plan"),
    ("syncd.engine", None, "_changes"),
    ("syncd.engine", None, "_build"),
    ("syncd.engine", None, "release_memory"),
    ("syncd.records", None, "parse_json"),
    ("syncd.diff", "SnapshotBuilder", "add"),
    ("syncd.diff", "SnapshotBuilder", "add_raw"),
    ("syncd.diff", "SnapshotBuilder", "finish"),
    ("syncd.diff", None, "changes"),
    ("syncd.diff", None, "apply"),
    ("syncd.store", "Store", "fingerprints"),
    ("syncd.store", "Store", "commit_run"),
    ("syncd.store", "Store", "record_run"),
    ("syncd.store.sqlite", "SqliteStore", "fingerprints"),
    ("syncd.store.sqlite", "SqliteStore", "commit_run"),
    ("syncd.store.sqlite", "SqliteStore", "record_run"),
    ("sqlite3", "Connection", "commit"),
]


def instrument() -> list[str]:
    import importlib

    wrapped = []
    for module_name, owner_name, name in STAGES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        owner = getattr(module, owner_name, None) if owner_name else module
        func = getattr(owner, name, None) if owner is not None else None
        if func is None or getattr(func, "_loop_stall", False):  # absent, or wrapped already under another name
            continue
        label = f"{owner_name}.{name}" if owner_name else f"{module_name.rsplit('.', 1)[-1]}.{name}"
        wrapper = _recorded(label, func)
        wrapper._loop_stall = True
        try:
            setattr(owner, name, wrapper)
        except TypeError:  # a C type (sqlite3.Connection): its methods cannot be replaced
            continue
        wrapped.append(label)

    gc_start = {}

    def on_gc(phase: str, info: dict) -> None:
        thread = threading.current_thread().name
        if phase == "start":
            gc_start[thread] = time.monotonic()
        elif thread in gc_start:
            INTERVALS.append((f"cyclic GC gen {info['generation']}", thread, gc_start.pop(thread), time.monotonic()))

    gc.callbacks.append(on_gc)
    return wrapped


async def ticker(stalls: list[tuple[float, float]], polls: list[float], count) -> None:
    """Sleep TICK again and again; record (woke at, how late) and the time the poll count changes."""
    last = count()
    while True:
        t0 = time.monotonic()
        await asyncio.sleep(TICK)
        t1 = time.monotonic()
        stalls.append((t1, t1 - t0 - TICK))
        now = count()
        if now != last:
            polls.extend([t1] * (now - last))
            last = now


def poll_count(daemon) -> int:
    series = daemon.metrics.polls.labels(SYNC_ID)
    value = series.get() if hasattr(series, "get") else series._value.get()  # older prometheus_client children
    return int(value)


# -- the run --------------------------------------------------------------------------------------------------


async def run(args) -> int:
    import structlog

    from syncd.daemon import Daemon
    from syncd.settings import load_settings
    from syncd.units import format_duration

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    wrapped = instrument()

    bench_dir = Path(__file__).parent
    api = subprocess.Popen([sys.executable, __file__, "--serve", str(args.records)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, cwd=bench_dir)
    prober = None
    try:
        port = int(api.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as tmp:
            conf = Path(tmp) / "conf.d"
            conf.mkdir()
            (conf / f"{SYNC_ID}.toml").write_text(
                f'webhook_url = "{url}/hook"\nlist_identifier = "$.response.payload.employees"\n'
                f'record_identifier = "$.employee.id"\ninterval = "{format_duration(args.interval)}"\n'
                f'initial_sync = "skip"\n[api_details]\nbase_url = "{url}"\npath = "/list"\n')
            settings = load_settings({"config_dir": conf, "state_path": Path(tmp) / "state.db", "listen": "127.0.0.1:0"})
            daemon = Daemon(settings)
            task = asyncio.create_task(daemon.run())
            while daemon.address is None and not task.done():
                await asyncio.sleep(0.05)
            if task.done():
                task.result()
            print(f"loop stall: {args.records:,} records, 1% changed each poll, every {format_duration(args.interval)}; "
                  f"one daemon in-process; stages wrapped: {', '.join(wrapped)}", flush=True)
            stalls: list[tuple[float, float]] = []
            ends: list[float] = []
            tick = asyncio.create_task(ticker(stalls, ends, lambda: poll_count(daemon)))
            # The initial poll (baseline, no events) is not measured.
            deadline = time.monotonic() + 120
            while not ends and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if not ends:
                raise SystemExit("the initial poll did not finish within 120 s")
            measure_from = ends[0]
            prober = subprocess.Popen([sys.executable, __file__, "--probe", str(daemon.address[1])], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, cwd=bench_dir)
            spy = None
            if args.py_spy:
                spy_out = Path(tmp) / "spy.txt"
                spy = subprocess.Popen([args.py_spy, "record", "--gil", "--threads", "--nonblocking", "-r", "500",
                                        "-f", "raw", "-o", str(spy_out), "--pid", str(os.getpid())],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while len(ends) < 1 + args.polls and time.monotonic() < deadline + args.polls * (args.interval + 30):
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # the last poll's deliveries
            if spy:
                spy.send_signal(2)
                await asyncio.to_thread(spy.wait, 30)
            prober.stdin.close()
            healthz = json.loads(await asyncio.to_thread(prober.stdout.readline))
            tick.cancel()
            ok = daemon.metrics.poll_failures.labels(SYNC_ID)
            failures = int(ok.get() if hasattr(ok, "get") else ok._value.get())
            daemon.request_stop()
            await task
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/__times")
            starts = json.loads(conn.getresponse().read())
            conn.close()
            spy_text = spy_out.read_text() if spy and spy_out.exists() else None
            thread_names = {str(t.native_id): t.name for t in threading.enumerate()}
    finally:
        for child in (prober, api):
            if child is not None:
                if not child.stdin.closed:
                    child.stdin.close()
                child.wait(timeout=30)

    report(args, stalls, ends, starts, healthz, measure_from)
    if spy_text is not None:
        report_spy(spy_text, thread_names)
    elif args.py_spy:
        print("  py-spy wrote nothing (ptrace not permitted?)")
    return 1 if failures else 0


def report(args, stalls, ends, starts, healthz, measure_from) -> None:
    # Poll i: from its request's arrival at the API to the tick that saw it counted.
    windows = []
    for end in ends[1:]:
        start = max((s for s in starts if s < end), default=None)
        if start is not None and start > measure_from:
            windows.append((start, end))
    rows = []
    charged: dict[str, list[float]] = collections.defaultdict(list)
    for start, end in windows:
        in_poll = [(t, late) for t, late in stalls if start <= t <= end + TICK]
        worst_t, worst = max(in_poll, key=lambda x: x[1], default=(0.0, 0.0))
        hz = [dt for sent, dt in healthz if start <= sent <= end]
        rows.append((end - start, worst, max(hz, default=0.0), statistics.median(hz) if hz else 0.0, len(hz)))
        for t, late in in_poll:
            if late >= STALL_REPORT:
                for label in overlapping(t - late, t):
                    charged[label].append(late)
    outside = [late for t, late in stalls if t > measure_from and not any(s <= t <= e + TICK for s, e in windows)]
    hz_outside = [dt for sent, dt in healthz if not any(s <= sent <= e for s, e in windows)]

    print(f"  {'poll':>4} {'duration':>10} {'longest stall':>14} {'/healthz max':>13} {'/healthz p50':>13} {'probes':>7}")
    for i, (dur, worst, hz_max, hz_med, count) in enumerate(rows, 1):
        print(f"  {i:>4} {dur * 1000:8.0f}ms {worst * 1000:12.1f}ms {hz_max * 1000:11.1f}ms {hz_med * 1000:11.1f}ms {count:>7}")
    if not rows:
        print("  no changed poll was measured")
        return
    med = statistics.median(r[1] for r in rows)
    print(f"  median {statistics.median(r[0] for r in rows) * 1000:8.0f}ms {med * 1000:12.1f}ms "
          f"{statistics.median(r[2] for r in rows) * 1000:11.1f}ms {statistics.median(r[3] for r in rows) * 1000:11.1f}ms")
    print(f"  outside polls (deliveries, idle): longest stall {max(outside, default=0) * 1000:.1f} ms, "
          f"slowest /healthz {max(hz_outside, default=0) * 1000:.1f} ms")
    print(f"  longest loop stall of a changed poll (median over {len(rows)}) <= {TARGET * 1000:.0f} ms: "
          f"{'PASS' if med <= TARGET else 'MISS'}")
    if charged:
        print(f"\n  stalls >= {STALL_REPORT * 1000:.0f} ms during polls, by the stages they overlapped "
              "(a stall can overlap several; [thread]):")
        print(f"    {'stage':<52} {'stalls':>6} {'longest':>9} {'sum':>9}")
        for label, lates in sorted(charged.items(), key=lambda kv: -sum(kv[1])):
            print(f"    {label:<52} {len(lates):>6} {max(lates) * 1000:7.1f}ms {sum(lates) * 1000:7.0f}ms")
    timeline(max(windows, key=lambda w: max((late for t, late in stalls if w[0] <= t <= w[1] + TICK), default=0)), stalls)
    spans: dict[str, list[float]] = collections.defaultdict(list)
    for label, thread, t0, t1 in INTERVALS:
        if any(s <= t0 <= e for s, e in windows):
            spans[f"{label} [{short(thread)}]"].append(t1 - t0)
    print("\n  stage durations during the changed polls (median per call, calls per poll):")
    for label, ds in sorted(spans.items(), key=lambda kv: -sum(kv[1])):
        print(f"    {label:<52} {statistics.median(ds) * 1000:8.1f}ms  x{len(ds) / len(windows):.1f}")


def timeline(window: tuple[float, float], stalls) -> None:
    """The poll with the longest stall: its stages and its stalls of 10 ms or more, in time order."""
    start, end = window
    rows = [(a - start, f"{label} [{short(thread)}]", b - a) for label, thread, a, b in INTERVALS if start <= a <= end]
    rows += [(t - late - start, "    LOOP STALL", late) for t, late in stalls if start <= t <= end + TICK and late >= 0.010]
    print("\n  the poll with the longest stall, from its request's arrival (ms; a stall is placed at its start):")
    for offset, label, length in sorted(rows):
        print(f"    {offset * 1000:8.1f}  {label:<52} {length * 1000:8.1f}")


def short(thread: str) -> str:
    return "loop" if thread == "MainThread" else "worker" if thread.startswith("asyncio_") else thread


def overlapping(t0: float, t1: float) -> list[str]:
    return sorted({f"{label} [{short(thread)}]" for label, thread, a, b in INTERVALS if a < t1 and b > t0})


def report_spy(text: str, thread_names: dict[str, str]) -> None:
    """py-spy raw (collapsed) stacks: 'thread (TID);frame;frame N'. Own samples by thread and leaf
    function, and by the syncd function nearest to the leaf."""
    by_leaf: collections.Counter = collections.Counter()
    by_syncd: collections.Counter = collections.Counter()
    by_thread: collections.Counter = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        tid = frames[0].partition("(")[2].rstrip(")").split(")")[0]
        thread = short(thread_names.get(tid, f"thread {tid}"))
        total += n
        by_thread[thread] += n
        by_leaf[(thread, frames[-1])] += n
        nearest = next((f for f in reversed(frames) if "syncd/" in f), "(outside syncd)")
        by_syncd[(thread, nearest)] += n
    if not total:
        print("  py-spy: no samples")
        return
    print(f"\n  py-spy (--gil: only the thread holding the GIL is sampled), {total} samples at 500/s:")
    for thread, n in by_thread.most_common():
        print(f"    {thread:<20} {n / total:6.1%}")
    print("  top leaf frames:")
    for (thread, leaf), n in by_leaf.most_common(15):
        print(f"    {n / total:6.1%}  [{thread}] {leaf[:110]}")
    print("  by the nearest syncd frame:")
    for (thread, frame), n in by_syncd.most_common(15):
        print(f"    {n / total:6.1%}  [{thread}] {frame[:110]}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    if sys.argv[1:2] == ["--serve"]:
        serve(int(sys.argv[2]))
        sys.exit(0)
    if sys.argv[1:2] == ["--probe"]:
        probe(int(sys.argv[2]))
        sys.exit(0)
    from syncd.units import parse_duration

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--polls", type=int, default=6, help="changed polls measured (default 6)")
    parser.add_argument("--interval", type=parse_duration, default=4.0, help="the sync's interval (default 4s)")
    parser.add_argument("--py-spy", metavar="BIN", default=None, help="sample with this py-spy binary too")
    sys.exit(asyncio.run(run(parser.parse_args())))
