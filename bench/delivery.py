"""Webhook delivery throughput: syncd's Deliverer against a bare aiohttp client.

    python bench/delivery.py [--events N] [--concurrency C] [--rounds R] [--profile]

A local webhook receiver (aiohttp, one process, answers every POST with 204) runs in a separate
process, so it does not compete with the sender for the GIL. The machine's cores are shared: the
receiver, the sender's event loop and (for syncd) the SQLite worker thread all want CPU.

  baseline  C workers pull the N bodies from a list and POST them through one shared
            aiohttp ClientSession (the connector and headers syncd delivered with before it had its
            own client, minus the signature headers). No SQLite.
  syncd     N events (~400-byte envelopes, as syncd/engine.py builds them, distinct record ids)
            are committed to a fresh outbox (not timed); then a real `syncd.delivery.Deliverer`
            (concurrency C, whsec_ secret so every attempt is signed, timeout 30 s, the daemon's
            Metrics, the client from `syncd.http.webhook_session` as in the daemon) runs until
            every event is delivered and the outbox is committed empty, and is stopped.

They run alternately (baseline, syncd, baseline, syncd, ...; R rounds) after a short warm-up, and
the medians are compared with issue 11's targets: syncd/baseline events/s at least TARGET_RATIO,
and syncd's CPU per event (event-loop thread plus other threads, i.e. aiosqlite's worker) at most
TARGET_CPU_RATIO times the baseline's. Per run we also record the receiver's CPU time (from /proc;
near 100% of the wall time means the receiver is the bottleneck and the ratio is flattered) and the
sender's peak RSS (ru_maxrss, reset through /proc/self/clear_refs before each run where the kernel
allows it).

With --profile, one more baseline and one more syncd run (not in the table) are made under
cProfile and their own time is compared per group (signing, syncd.delivery, aiosqlite, aiohttp,
asyncio, ...), with a few counters (due rows read, record_attempts, next_due, Signer.headers) wrapped
around syncd's functions at run time; nothing in syncd is modified. cProfile sees only the
event-loop thread: SQLite's own work in aiosqlite's thread shows up as "other threads" CPU and in
the awaited time of the store calls.

Exit status 0 when every run delivered every event (target met or not), non-zero otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import functools
import io
import os
import pstats
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
import orjson

from _child import peak_rss_mib, reset_peak_rss

TARGET_RATIO = 0.90  # syncd events/s / baseline events/s, at least (issue 11)
TARGET_CPU_RATIO = 1.10  # syncd CPU per event / baseline CPU per event, at most (issue 11)
SYNC_ID = "bench"
SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
TIMEOUT = 30.0
WARMUP = 500  # baseline posts before the timed runs (receiver, connections, imports)

# -- data -------------------------------------------------------------------------------------------

FIRST = ["Olivia", "Liam", "Emma", "Noah", "Ava", "Elijah", "Sophia", "James", "Mia", "Lucas", "Amelia", "Mateo"]
LAST = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Martinez", "Lopez"]
DEPTS = ["Engineering", "Sales", "Marketing", "Finance", "Operations", "Support", "People"]
TITLES = ["Engineer", "Senior Engineer", "Account Executive", "Analyst", "Manager", "Specialist"]
CITIES = ["Springfield", "Riverside", "Franklin", "Greenville", "Bristol", "Clinton", "Fairview"]


def new_id(prefix: str, rnd: random.Random) -> str:
    """Same shape as syncd.engine.new_id: 48 bits of milliseconds, then 80 random bits."""
    return f"{prefix}_{int(time.time() * 1000):012x}{rnd.getrandbits(80):020x}"


def make_events(n: int, url: str) -> list[tuple[str, str, str, bytes]]:
    """(event_id, record_id, event_type, body) of n events, envelopes as syncd/engine.py writes them."""
    rnd = random.Random(20260101)
    run_id = new_id("run", rnd)
    now = time.time()
    from syncd.units import iso_time  # the engine's own timestamp format

    timestamp = iso_time(now)
    out = []
    for i in range(n):
        first, last = rnd.choice(FIRST), rnd.choice(LAST)
        record = {
            "id": 100000 + i,
            "name": f"{first} {last}",
            "email": f"{first.lower()}.{last.lower()}{i}@example.com",
            "department": rnd.choice(DEPTS),
            "title": rnd.choice(TITLES),
            "location": {"city": rnd.choice(CITIES), "country": "US"},
            "active": rnd.random() < 0.9,
            "updatedAt": timestamp,
        }
        event_id = new_id("evt", rnd)
        event_type = "record.new" if i % 5 else "record.modified"
        body = orjson.dumps({
            "eventId": event_id,
            "eventType": event_type,
            "eventData": record,
            "syncType": "delta_sync",
            "syncJobId": SYNC_ID,
            "syncRunId": run_id,
            "recordId": str(record["id"]),
            "timestamp": timestamp,
        })
        # orjson hands back each bytes object in a ~4 KiB allocation whatever its length; an exact-size
        # copy keeps the sender's RSS honest (syncd's own bodies come from SQLite, exactly sized).
        out.append((event_id, str(record["id"]), event_type, bytes(memoryview(body))))
    return out


# -- the receiver, in its own process --------------------------------------------------------------


def serve() -> None:
    """Child process: answer every POST with 204 (counting them), GET /stats, until stdin closes."""
    from aiohttp import web

    from _child import serve_until_parent_exits

    stats = {"posts": 0, "signed": 0, "bytes": 0}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        stats["posts"] += 1
        stats["bytes"] += len(body)
        if "webhook-signature" in request.headers:
            stats["signed"] += 1
        return web.Response(status=204)

    async def get_stats(request: web.Request) -> web.Response:
        body = orjson.dumps(stats)
        if request.query.get("reset"):
            for k in stats:
                stats[k] = 0
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/{tail:.*}", hook)
    app.router.add_get("/stats", get_stats)
    serve_until_parent_exits(app, backlog=1024)


class Receiver:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise SystemExit(f"bench: the receiver process did not start (exit status {self.proc.returncode})")
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def peak_rss_mib(self) -> float | None:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    async def stats(self, session: aiohttp.ClientSession) -> dict:
        async with session.get(f"{self.url}/stats?reset=1") as resp:
            return orjson.loads(await resp.read())

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


# -- measurement helpers ----------------------------------------------------------------------------


def others_busy(seconds: float = 0.5) -> float | None:
    """Share of all CPUs busy over `seconds` while this benchmark idles (other processes' load)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait
    try:
        t0, i0 = read()
        time.sleep(seconds)
        t1, i1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (i1 - i0) / max(1, t1 - t0)


def process_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Sample:
    def __init__(self, kind: str, n: int, seconds: float, cpu_main: float, cpu_other: float, cpu_receiver: float,
                 rss: float) -> None:
        self.kind, self.n, self.seconds = kind, n, seconds
        self.cpu_main, self.cpu_other, self.cpu_receiver, self.rss = cpu_main, cpu_other, cpu_receiver, rss

    @property
    def rate(self) -> float:
        return self.n / self.seconds


class Meter:
    """Wall time, CPU of this process (event-loop thread vs the rest) and of the receiver, peak RSS."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def __enter__(self) -> Meter:
        reset_peak_rss()
        self.cpu0, self.thread0, self.recv0 = process_cpu(), time.thread_time(), self.receiver.cpu_seconds()
        self.t0 = time.perf_counter()
        return self

    def stop(self) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.main = time.thread_time() - self.thread0
        self.other = max(0.0, process_cpu() - self.cpu0 - self.main)
        self.recv = self.receiver.cpu_seconds() - self.recv0
        self.rss = peak_rss_mib()

    def __exit__(self, *exc) -> None:
        pass

    def sample(self, kind: str, n: int) -> Sample:
        return Sample(kind, n, self.seconds, self.main, self.other, self.recv, self.rss)


def hook_session(concurrency: int) -> aiohttp.ClientSession:
    """The baseline's session: the one syncd's daemon delivered through until it got its own client
    (syncd/webhook_client.py). Kept as it was, so that figures stay comparable."""
    from syncd.http import USER_AGENT

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency, limit_per_host=0),
                                 headers={"User-Agent": USER_AGENT})


def fail(message: str) -> None:
    raise SystemExit(f"bench: FAILED: {message}")


# -- baseline -----------------------------------------------------------------------------------------


async def post_all(url: str, bodies: list[bytes], concurrency: int) -> int:
    """C workers pulling from a list, one shared session: the least a webhook sender must do."""
    from syncd.http import USER_AGENT

    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    failures = 0
    it = iter(bodies)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        for body in it:
            async with session.post(url, data=body, headers=headers, allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as resp:
                if not 200 <= resp.status < 300:
                    failures += 1

    async with hook_session(concurrency) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return failures


async def run_baseline(receiver: Receiver, url: str, bodies: list[bytes], concurrency: int) -> Sample:
    with Meter(receiver) as m:
        failures = await post_all(url, bodies, concurrency)
        m.stop()
    if failures:
        fail(f"baseline: {failures} posts were not answered 2xx")
    return m.sample("baseline", len(bodies))


# -- syncd ----------------------------------------------------------------------------------------------


async def fill_outbox(path: Path, url: str, events: list[tuple[str, str, str, bytes]], per_commit: int = 5000):
    """A fresh store at `path` with every event queued (a few Commits, as polls would write them)."""
    from syncd.store import Commit, OutboxEvent, RunRecord, Store

    store = await Store.open(path)
    now = time.time()
    for i in range(0, len(events), per_commit):
        chunk = events[i:i + per_commit]
        run = RunRecord(run_id=f"run_bench{i}", sync_id=SYNC_ID, started_at=now, finished_at=time.time(),
                        outcome="changed", sync_type="delta_sync", records=len(events), modified=len(chunk))
        await store.commit_run(Commit(run, "bench-shape", b"\0" * 16, record_count=len(events), events=[
            OutboxEvent(eid, SYNC_ID, rid, etype, url, now, body) for eid, rid, etype, body in chunk],
            expected_generation=i // per_commit))
    store.outbox_changed.clear()  # the deliverer must find them in the table, as after a restart
    return store


async def deliver_all(store, concurrency: int, n: int, *, profile: cProfile.Profile | None = None):
    """Run a Deliverer until all n events are delivered and committed; return the deliverer."""
    from syncd.delivery import Deliverer, Target
    from syncd.http import webhook_session
    from syncd.metrics import Metrics

    target = Target(None, SECRET)
    metrics = Metrics()  # as in the daemon: a duration per attempt, counters per batch of outcomes
    metrics.add_sync(SYNC_ID)
    async with webhook_session(concurrency) as session:  # what the daemon delivers through
        deliverer = Deliverer(store, session, concurrency=concurrency, timeout=TIMEOUT, schedule=[1.0, 5.0, 30.0],
                              target=lambda sid: target, metrics=metrics)
        stop = asyncio.Event()
        if profile is not None:
            profile.enable()
        task = asyncio.create_task(deliverer.run(stop), name="bench-delivery")
        deadline = time.monotonic() + max(60.0, n / 200)
        while deliverer.delivered + deliverer.failed_attempts < n and not task.done():
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.002)
        stop.set()
        await task  # returns once every outcome is persisted (committed)
        if profile is not None:
            profile.disable()
    return deliverer


async def run_syncd(receiver: Receiver, tmp: Path, index: int, url: str, events, concurrency: int) -> Sample:
    path = tmp / f"state-{index}.db"
    store = await fill_outbox(path, url, events)
    try:
        with Meter(receiver) as m:
            deliverer = await deliver_all(store, concurrency, len(events))
            m.stop()
        await check_syncd(store, deliverer, len(events))
    finally:
        await store.close()
        remove_db(path)
    return m.sample("syncd", len(events))


async def check_syncd(store, deliverer, n: int) -> None:
    stats = await store.outbox_stats()
    left = sum(s.pending + s.dead for s in stats.values())
    if deliverer.failed_attempts:
        fail(f"syncd: {deliverer.failed_attempts} failed delivery attempts")
    if deliverer.delivered != n or left:
        fail(f"syncd: delivered {deliverer.delivered} of {n}; {left} events left in the outbox")


def remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(f"{path}{suffix}")
        except FileNotFoundError:
            pass


# -- profile ---------------------------------------------------------------------------------------------


def instrument() -> tuple[dict, callable]:
    """Wrap a few syncd functions with counters/timers (at run time); returns (stats, undo)."""
    from syncd.signing import Signer
    from syncd.store import Store

    stats: dict = defaultdict(lambda: [0, 0.0, 0])  # calls, seconds, items
    undo = []

    def wrap_async(owner, name, items=None):
        orig = getattr(owner, name)

        @functools.wraps(orig)
        async def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                result = await orig(*args, **kwargs)
            finally:
                s = stats[name]
                s[0] += 1
                s[1] += time.perf_counter() - t0
            if items is not None:
                s[2] += items(args, result)
            return result

        setattr(owner, name, wrapper)
        undo.append((owner, name, orig))

    def wrap_sync(owner, name):
        orig = getattr(owner, name)

        @functools.wraps(orig)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                s = stats[name]
                s[0] += 1
                s[1] += time.perf_counter() - t0

        setattr(owner, name, wrapper)
        undo.append((owner, name, orig))

    wrap_async(Store, "_due_rows", lambda args, result: len(result))
    wrap_async(Store, "record_attempts", lambda args, result: len(args[1]) + len(args[2]) + len(args[3]))
    wrap_async(Store, "next_due")
    wrap_sync(Signer, "headers")

    def restore():
        for owner, name, orig in reversed(undo):
            setattr(owner, name, orig)

    return stats, restore


GROUPS = [  # (label, predicate on a pstats key (file, line, function)), first match wins
    ("syncd.signing + hmac/base64", lambda f, fn: "syncd/signing" in f or f.endswith(("hmac.py", "base64.py"))
     or "hmac" in fn or "binascii" in fn or "b64" in fn),
    ("syncd.delivery", lambda f, fn: "syncd/delivery" in f),
    ("syncd.store", lambda f, fn: "syncd/store" in f),
    ("aiosqlite (+ its queue hand-off)", lambda f, fn: "aiosqlite" in f or "SimpleQueue" in fn),
    ("syncd.webhook_client + httptools", lambda f, fn: "syncd/webhook_client" in f or "httptools" in f),
    ("aiohttp", lambda f, fn: "aiohttp" in f or "multidict" in f or "yarl" in f),
    ("socket send/recv", lambda f, fn: "_socket.socket" in fn),
    ("epoll (idle wait)", lambda f, fn: "select.epoll" in fn),
    ("asyncio", lambda f, fn: "asyncio" in f or "_asyncio" in fn or "_contextvars" in fn),
    ("bench (harness)", lambda f, fn: f.endswith("bench/delivery.py")),
]


def grouped(prof: cProfile.Profile) -> dict[str, float]:
    """Own time (tottime) per group of functions."""
    out: dict[str, float] = defaultdict(float)
    for (filename, _line, func), (_cc, _nc, tottime, _ct, _callers) in pstats.Stats(prof).stats.items():
        for label, match in GROUPS:
            if match(filename, func):
                out[label] += tottime
                break
        else:
            out["other"] += tottime
    return out


def print_stats(prof: cProfile.Profile, sort: str, top: int, *restrict) -> None:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats(sort).print_stats(*restrict, top)
    print("\n".join("    " + line for line in s.getvalue().splitlines() if line.strip()
                    and not line.startswith(("   Ordered", "         ", "   List reduced"))))


async def profile_run(receiver: Receiver, tmp: Path, url: str, events, concurrency: int, top: int) -> None:
    """One baseline and one syncd run under cProfile (event-loop thread), compared by group."""
    n = len(events)
    base_prof = cProfile.Profile()
    with Meter(receiver) as bm:
        base_prof.enable()
        failures = await post_all(url, [e[3] for e in events], concurrency)
        base_prof.disable()
        bm.stop()
    if failures:
        fail(f"baseline (profiled): {failures} posts were not answered 2xx")

    path = tmp / "state-profile.db"
    store = await fill_outbox(path, url, events)
    stats, restore = instrument()
    prof = cProfile.Profile()
    try:
        with Meter(receiver) as m:
            deliverer = await deliver_all(store, concurrency, n, profile=prof)
            m.stop()
        await check_syncd(store, deliverer, n)
    finally:
        restore()
        await store.close()
        remove_db(path)

    print()
    print("profile: one more baseline and syncd run each, under cProfile (event-loop thread only; the profiler")
    print("inflates per-call costs, so compare the two columns rather than trusting absolute values)")
    for label, mm in (("baseline", bm), ("syncd", m)):
        print(f"  {label:8s} {n / mm.seconds:7,.0f} events/s profiled; CPU: loop {mm.main:5.2f} s, other threads "
              f"{mm.other:5.2f} s (SQLite), receiver {mm.recv:5.2f} s; wall {mm.seconds:5.2f} s")
    gb, gs = grouped(base_prof), grouped(prof)
    print(f"  own time per event, us       {'baseline':>9s} {'syncd':>9s} {'extra':>9s}")
    for label in [g[0] for g in GROUPS] + ["other"]:
        b, y = gb.get(label, 0.0) / n * 1e6, gs.get(label, 0.0) / n * 1e6
        if b or y:
            print(f"    {label:32s} {b:7.1f} {y:9.1f} {y - b:+9.1f}")
    tb, ts = sum(gb.values()) / n * 1e6, sum(gs.values()) / n * 1e6
    print(f"    {'total':32s} {tb:7.1f} {ts:9.1f} {ts - tb:+9.1f}")
    print("  awaited time of wrapped syncd calls (includes queueing behind other SQLite work):")
    for name, (calls, seconds, items) in sorted(stats.items()):
        extra = f", {items} items ({items / calls:.1f}/call)" if items else ""
        print(f"    {name:16s} {calls:7d} calls  {seconds:7.3f} s  ({seconds / calls * 1e6:7.1f} us/call){extra}")
    print(f"  syncd run, top {top} functions by own time:")
    print_stats(prof, "tottime", top)
    print("  syncd run, syncd/aiosqlite/signing functions by cumulative time:")
    print_stats(prof, "cumulative", top, r"syncd|aiosqlite|hmac")


# -- main -----------------------------------------------------------------------------------------------------


async def bench(args, tmp: Path, receiver: Receiver) -> list[Sample]:
    url = f"{receiver.url}/hook"
    events = make_events(args.events, url)
    bodies = [e[3] for e in events]
    sizes = [len(b) for b in bodies]
    print(f"bench/delivery: {args.events:,} events (body {min(sizes)}-{max(sizes)} bytes, mean "
          f"{statistics.mean(sizes):.0f}), concurrency {args.concurrency}, {args.rounds} rounds, receiver pid "
          f"{receiver.proc.pid} on 127.0.0.1:{receiver.port} (1 process), {os.cpu_count()} CPUs")
    busy = others_busy()
    if busy is not None and busy > 0.15:
        print(f"  note: other processes kept {busy:.0%} of the CPUs busy just before the runs: expect noise "
              f"(the ratio is measured in alternation, but both sides lose CPU)")
    async with aiohttp.ClientSession() as control:
        await post_all(url, bodies[:WARMUP], args.concurrency)  # warm-up, not measured
        await receiver.stats(control)
        samples = []
        for r in range(args.rounds):
            for kind in ("baseline", "syncd"):
                if kind == "baseline":
                    sample = await run_baseline(receiver, url, bodies, args.concurrency)
                else:
                    sample = await run_syncd(receiver, tmp, r, url, events, args.concurrency)
                got = await receiver.stats(control)
                if got["posts"] != args.events:
                    fail(f"{kind}: the receiver got {got['posts']} posts, expected {args.events}")
                if got["signed"] != (args.events if kind == "syncd" else 0):
                    fail(f"{kind}: {got['signed']} signed posts of {got['posts']}")
                samples.append(sample)
                print(f"  round {r + 1} {kind:8s} {sample.rate:9,.0f} events/s  {sample.seconds:6.2f} s  "
                      f"cpu: loop {sample.cpu_main:5.2f} s + other threads {sample.cpu_other:5.2f} s, "
                      f"receiver {sample.cpu_receiver:5.2f} s ({sample.cpu_receiver / sample.seconds:4.0%})  "
                      f"rss {sample.rss:5.0f} MiB", flush=True)
        if args.profile:
            await profile_run(receiver, tmp, url, events, args.concurrency, args.top)
    return samples


def report(args, samples: list[Sample], receiver_rss: float | None) -> bool:
    def med(kind: str, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in samples if s.kind == kind)

    def cpu(kind: str) -> float:  # CPU per event, all threads
        return statistics.median((s.cpu_main + s.cpu_other) / s.n for s in samples if s.kind == kind)

    base, mine = med("baseline", "rate"), med("syncd", "rate")
    ratio = mine / base
    ok = ratio >= TARGET_RATIO
    cpu_ratio = cpu("syncd") / cpu("baseline")
    cpu_ok = cpu_ratio <= TARGET_CPU_RATIO
    print()
    print(f"medians of {args.rounds} runs each; {args.events:,} events, concurrency {args.concurrency}")
    print(f"  {'':10s} {'events/s':>10s} {'wall s':>8s} {'loop CPU us/ev':>15s} {'other thr us/ev':>16s} "
          f"{'receiver busy':>14s} {'peak RSS MiB':>13s}")
    for kind in ("baseline", "syncd"):
        n = args.events
        rss = max(s.rss for s in samples if s.kind == kind)
        busy = statistics.median(s.cpu_receiver / s.seconds for s in samples if s.kind == kind)
        print(f"  {kind:10s} {med(kind, 'rate'):10,.0f} {med(kind, 'seconds'):8.2f} "
              f"{med(kind, 'cpu_main') / n * 1e6:15.1f} {med(kind, 'cpu_other') / n * 1e6:16.1f} "
              f"{busy:14.0%} {rss:13.0f}")
    print(f"  ratio syncd/baseline {ratio:.2f}   target >= {TARGET_RATIO:.2f}   {'PASS' if ok else 'MISS'}")
    print(f"  CPU per event syncd/baseline {cpu_ratio:.2f} ({cpu('syncd') * 1e6:.1f} / {cpu('baseline') * 1e6:.1f} us, "
          f"loop + other threads)   target <= {TARGET_CPU_RATIO:.2f}   {'PASS' if cpu_ok else 'MISS'}")
    scope = "per run" if reset_peak_rss() else "process lifetime: /proc/self/clear_refs not writable"
    rss_recv = f"; receiver process peak {receiver_rss:.0f} MiB" if receiver_rss else ""
    print(f"  peak RSS (ru_maxrss, sender) {peak_rss_mib():.0f} MiB now, max of runs above ({scope}){rss_recv}")
    return ok and cpu_ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per run (default 20000)")
    parser.add_argument("--concurrency", type=int, default=16, help="deliveries in flight (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="baseline+syncd pairs (default 3)")
    parser.add_argument("--profile", action="store_true", help="one more baseline and syncd run each, under cProfile")
    parser.add_argument("--top", type=int, default=20, help="profile lines to print (default 25)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return 0
    if args.events < 1 or args.concurrency < 1 or args.rounds < 1:
        parser.error("--events, --concurrency and --rounds must be at least 1")

    from syncd.logs import configure

    configure("console", level="warning", stream=sys.stderr)  # the deliverer logs only failures at this level
    tmp = Path(tempfile.mkdtemp(prefix="syncd-bench-delivery-"))
    receiver = Receiver()
    t0 = time.perf_counter()
    try:
        samples = asyncio.run(bench(args, tmp, receiver))
        receiver_rss = receiver.peak_rss_mib()
    finally:
        receiver.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, samples, receiver_rss)
    print(f"  total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
