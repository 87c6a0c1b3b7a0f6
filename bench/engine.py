"""Throughput benchmark of one poll, end to end, against a plain-Python baseline.

    python bench/engine.py [--records N] [--repeat K]

A local aiohttp API in a separate process serves two bodies of N records (~300 bytes each):
/v1 and /v2, which differ in 1% of the records (one field each, spread over the list). syncd's
real engine (`syncd.engine.poll` with a real `Store` and a `Source` on `poll_session()`) polls them:

  initial    first run: every record is new (N events written to the outbox)
  unchanged  same bytes as the previous run (median of K)
  1% changed alternating /v2, /v1, ... : each run modifies 1% of the records (median of K)

The baseline is the minimum any implementation must do on the same bytes, in this process, after
syncd's runs: orjson.loads + dict extraction + orjson.dumps(OPT_SORT_KEYS) + xxh3_128 + a dict diff
against the previous fingerprints, on the same v1 -> v2 -> v1 ... alternation (median of K). It does
no HTTP and no SQLite; syncd's runs do both. It runs twice, with the cyclic GC on (plain code) and
off (what syncd itself does while it parses and diffs); the target compares against the FASTER of
the two, so syncd gets no credit for a trick the baseline could use too.

Measured per run: wall time; per-stage times, from thin wrappers put around syncd's functions at run
time (one extra call per stage; nothing in syncd is modified); time in the cyclic GC (gc.callbacks,
any thread); RSS at the start and peak RSS (ru_maxrss, its high-water mark reset through
/proc/self/clear_refs before each run). Exit status 0 when every run did what it should (targets
met or not); non-zero when a run failed or produced the wrong events.

Then, in separate runs (a ticker task would slow the timed ones): the longest event-loop stall, i.e.
how late a task sleeping 5 ms wakes up while a poll runs -- what the daemon's health checks and
webhook deliveries would wait.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import orjson
from xxhash import xxh3_128_digest

from _child import peak_rss_mib, reset_peak_rss

TARGET_RATIO = 0.70  # syncd 1%-changed throughput / baseline throughput, at least
TARGET_UNCHANGED = 0.05  # unchanged-run time / 1%-changed-run time, below
LIST_PATH = "$.response.payload.employees"
ID_PATH = "$.employee.id"
SYNC_ID = "bench"

# -- data ------------------------------------------------------------------------------------

FIRST = ["Olivia", "Liam", "Emma", "Noah", "Ava", "Elijah", "Sophia", "James", "Mia", "Lucas", "Amelia", "Mateo"]
LAST = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Martinez", "Lopez"]
DEPTS = ["Engineering", "Sales", "Marketing", "Finance", "Operations", "Support", "People"]
TAGS = ["remote", "full-time", "part-time", "contractor", "manager", "on-call", "python", "oncall-lead"]
CITIES = ["Springfield", "Riverside", "Franklin", "Greenville", "Bristol", "Clinton", "Fairview"]
STREETS = ["Maple Avenue", "Oak Street", "Pine Road", "Cedar Lane", "Elm Street", "Lakeview Drive"]


def changed_indices(n: int) -> range:
    """1% of the records, spread evenly over the list."""
    return range(50 % max(n, 1), n, 100)


def make_bodies(n: int) -> tuple[bytes, bytes]:
    """Two serialized bodies of `n` records; the second differs in one field of 1% of them."""
    rnd = random.Random(20260101)
    employees = []
    for i in range(n):
        first, last = rnd.choice(FIRST), rnd.choice(LAST)
        employees.append({"employee": {
            "id": i,
            "name": f"{first} {last}",
            "email": f"{first.lower()}.{last.lower()}.{i}@example.com",
            "dept": rnd.choice(DEPTS),
            "title": "Senior Software Engineer",
            "salary": rnd.randrange(40_000, 250_000),
            "active": rnd.random() < 0.9,
            "hired": f"20{rnd.randrange(10, 26)}-{rnd.randrange(1, 13):02d}-{rnd.randrange(1, 29):02d}",
            "tags": rnd.sample(TAGS, 3),
            "address": {"street": f"{rnd.randrange(1, 9999)} {rnd.choice(STREETS)}", "city": rnd.choice(CITIES),
                        "zip": f"{rnd.randrange(10000, 99999)}", "country": "US"},
        }})
    v1 = orjson.dumps({"response": {"payload": {"employees": employees}}})
    for k, i in enumerate(changed_indices(n)):
        emp = employees[i]["employee"]
        field = k % 4
        if field == 0:
            emp["salary"] += 1000
        elif field == 1:
            emp["address"] = {**emp["address"], "city": "Changed City"}
        elif field == 2:
            emp["tags"] = [*emp["tags"][:-1], "changed"]
        else:
            emp["name"] = emp["name"] + " Jr."
    v2 = orjson.dumps({"response": {"payload": {"employees": employees}}})
    return v1, v2


# -- the API, in its own process ----------------------------------------------------------------


def serve(directory: Path, n: int) -> None:
    """Child process: make the bodies, write them to `directory`, serve /v1 and /v2 until stdin closes."""
    from aiohttp import web

    from _child import serve_until_parent_exits

    v1, v2 = make_bodies(n)
    (directory / "v1.json").write_bytes(v1)
    (directory / "v2.json").write_bytes(v2)
    bodies = {"/v1": v1, "/v2": v2}

    async def handle(request: web.Request) -> web.Response:
        body = bodies.get(request.path)
        if body is None:
            return web.Response(status=404)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    serve_until_parent_exits(app)


def start_server(directory: Path, n: int) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(directory), "--records", str(n)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        stop_server(proc)
        raise SystemExit(f"the API process did not start (exit status {proc.returncode})")
    return proc, int(line)


def stop_server(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()


# -- timing helpers -------------------------------------------------------------------------------

#: Per-stage durations of the current run, filled by the wrappers below.
STAGES: dict[str, float] = defaultdict(float)


def _timed(label, func):
    if asyncio.iscoroutinefunction(func):
        @functools.wraps(func)
        async def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return await func(*args, **kwargs)
            finally:
                STAGES[label] += time.perf_counter() - t0
    else:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                STAGES[label] += time.perf_counter() - t0
    return wrapper


def instrument() -> list[str]:
    """Wrap syncd's stages (in memory only) and return the stage labels in pipeline order."""
    import syncd.diff
    import syncd.engine
    from syncd.source.fetcher import Fetch
    from syncd.store import Store

    stages = [
        (Fetch, "_exchange", "fetch (HTTP GET, body read)"),
        (Store, "sync_state", "Store.sync_state"),
        (Store, "fingerprints", "Store.fingerprints"),
        (syncd.engine, "parse_document", "parse (scan + orjson.loads)"),
        (syncd.diff.SnapshotBuilder, "add", "SnapshotBuilder.add (extract+fp)"),
        (syncd.diff.SnapshotBuilder, "finish", "SnapshotBuilder.finish"),
        (syncd.diff, "changes", "diff.changes"),
        (syncd.diff, "apply", "diff.apply"),
        (Store, "commit_run", "Store.commit_run"),
        (Store, "record_run", "Store.record_run"),
    ]
    stages += [
        (syncd.engine, "split_list", "split_list (msgspec: raw items)"),
        (syncd.diff.SnapshotBuilder, "add_raw", "SnapshotBuilder.add_raw (parse+fp each)"),
    ]
    stages = [(owner, name, label) for owner, name, label in stages if hasattr(owner, name)]
    for owner, name, label in stages:
        setattr(owner, name, _timed(label, getattr(owner, name)))
    return [label for _, _, label in stages]


class GcClock:
    """Time spent in the cyclic garbage collector (any thread), through gc.callbacks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0  # generation-2 collections
        self._start = 0.0
        self.on()

    def on(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def off(self) -> None:
        # A callback is Python code run inside a collection, i.e. inside orjson.loads: it lets other
        # threads take the GIL there, so it is off while the event loop's stalls are measured.
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.full += info["generation"] == 2

    def reset(self) -> None:
        self.seconds, self.full = 0.0, 0


GC = GcClock()


def median(values: list[float]) -> float:
    return statistics.median(values)


def fail(message: str) -> None:
    raise SystemExit(f"bench: FAILED: {message}")


# -- baseline ---------------------------------------------------------------------------------------


def baseline(body: bytes, previous: dict) -> tuple[dict, list, list, list]:
    """Parse, extract, fingerprint and diff with no framework around it."""
    document = orjson.loads(body)
    dumps, sort = orjson.dumps, orjson.OPT_SORT_KEYS
    fingerprints = {}
    for record in document["response"]["payload"]["employees"]:
        fingerprints[record["employee"]["id"]] = xxh3_128_digest(dumps(record, option=sort))
    get = previous.get
    new, modified = [], []
    for rid, fp in fingerprints.items():
        before = get(rid)
        if before is None:
            new.append(rid)
        elif before != fp:
            modified.append(rid)
    deleted = [rid for rid in previous if rid not in fingerprints]
    return fingerprints, new, modified, deleted  # `document` is freed on return: inside the timing


class Sample:
    """One timed run: wall time, per-stage times, cyclic-GC time, peak RSS."""

    __slots__ = ("seconds", "stages", "gc_seconds", "gc_full", "rss", "rss_start", "stall")

    def __init__(self, seconds: float, stages: dict, rss: float, rss_start: float, stall: float = 0.0) -> None:
        self.seconds, self.stages, self.rss, self.rss_start, self.stall = seconds, stages, rss, rss_start, stall
        self.gc_seconds, self.gc_full = GC.seconds, GC.full


async def watch_loop(stalls: list[float], tick: float = 0.005) -> None:
    """Record how late the event loop wakes a 5 ms sleeper: how long a poll blocks the daemon's loop."""
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(tick)
        stalls.append(time.perf_counter() - t0 - tick)


def measure_baseline(body: bytes, previous: dict, n_changed: int, *, gc_off: bool) -> tuple[Sample, dict]:
    gc.collect()
    reset_peak_rss()
    rss_start = peak_rss_mib()
    GC.reset()
    t0 = time.perf_counter()
    if gc_off:
        gc.disable()
    try:
        fingerprints, new, modified, deleted = baseline(body, previous)
    finally:
        gc.enable()
    sample = Sample(time.perf_counter() - t0, {}, peak_rss_mib(), rss_start)
    if (len(modified), len(new), len(deleted)) != (n_changed, 0, 0):
        fail(f"baseline: new={len(new)} modified={len(modified)} deleted={len(deleted)}, expected modified={n_changed}")
    return sample, fingerprints


# -- the run ------------------------------------------------------------------------------------------


def write_definition(conf_dir: Path, port: int, path: str, name: str = SYNC_ID) -> None:
    (conf_dir / f"{name}.toml").write_text(
        'webhook_url = "http://127.0.0.1:9/hook"\n'
        f'list_identifier = "{LIST_PATH}"\n'
        f'record_identifier = "{ID_PATH}"\n'
        "\n[api_details]\n"
        f'base_url = "http://127.0.0.1:{port}"\n'
        f'path = "{path}"\n'
    )


async def bench(args, tmp: Path, port: int) -> dict:
    from syncd.config import load_dir
    from syncd.engine import poll
    from syncd.http import poll_session
    from syncd.settings import load_settings
    from syncd.source.fetcher import Source
    from syncd.store import Store

    n, k = args.records, args.repeat
    n_changed = len(changed_indices(n))
    conf_dir = tmp / "conf.d"
    conf_dir.mkdir()
    settings = load_settings({"config_dir": conf_dir, "state_path": tmp / "state" / "state.db"})
    max_bytes = int(settings.max_response_bytes)
    # One Sync per body: same id and same shape, so /v1 <-> /v2 is a delta, never a re-baseline.
    # A second sync ("stall") only serves the event-loop stall pass of an initial run.
    syncs = {}
    for version in ("v1", "v2"):
        write_definition(conf_dir, port, f"/{version}")
        write_definition(conf_dir, port, f"/{version}", name="stall")
        loaded, problems = load_dir(settings)
        if problems:
            fail("; ".join(map(str, problems)))
        syncs[version, SYNC_ID], syncs[version, "stall"] = loaded[SYNC_ID], loaded["stall"]
    labels = instrument()
    out: dict = {"labels": labels, "n_changed": n_changed, "rss_reset": reset_peak_rss()}
    out["body_bytes"] = (tmp / "v1.json").stat().st_size

    async with poll_session() as session:
        source = Source(session, max_bytes=max_bytes)
        # Fetch alone: what the HTTP GET of this body costs (plain aiohttp, same kind of session).
        fetch_times = []
        for i in range(k + 2):  # the first two warm the connection and the server up
            gc.collect()
            t0 = time.perf_counter()
            async with session.get(syncs["v1", SYNC_ID].url) as resp:
                body = await resp.read()
            if i >= 2:
                fetch_times.append(time.perf_counter() - t0)
            if len(body) != out["body_bytes"]:
                fail("the API did not return the body it wrote")
        del body
        out["fetch"] = median(fetch_times)

        store = await Store.open(settings.state_path)
        try:
            async def run(version: str, expect: str, *, watch: bool = False, sync_id: str = SYNC_ID) -> tuple[object, Sample]:
                gc.collect()
                STAGES.clear()
                reset_peak_rss()
                rss_start = peak_rss_mib()
                GC.reset()
                stalls: list[float] = [0.0]
                if watch:  # a task of its own competes for the GIL: only in the stall pass
                    GC.off()
                    watcher = asyncio.create_task(watch_loop(stalls))
                    await asyncio.sleep(0)
                t0 = time.perf_counter()
                result = await poll(syncs[version, sync_id], store, source)
                elapsed = time.perf_counter() - t0
                if watch:
                    watcher.cancel()
                    GC.on()
                sample = Sample(elapsed, dict(STAGES), peak_rss_mib(), rss_start, max(stalls))
                if not result.ok:
                    fail(f"{expect} run on /{version}: {result.error}")
                return result, sample

            result, out["initial"] = await run("v1", "initial")
            if result.new != n or result.modified or result.deleted or result.sync_type != "initial_sync":
                fail(f"initial run: new={result.new} modified={result.modified} deleted={result.deleted}")
            del result

            out["unchanged"] = []
            for _ in range(k):
                result, sample = await run("v1", "unchanged")
                if result.outcome != "unchanged" or result.events:
                    fail(f"unchanged run: outcome={result.outcome} events={len(result.events)}")
                out["unchanged"].append(sample)

            out["changed"] = []
            for i in range(k):
                version = "v2" if i % 2 == 0 else "v1"
                result, sample = await run(version, "1%-changed")
                if (result.modified, result.new, result.deleted) != (n_changed, 0, 0):
                    fail(f"1%-changed run: new={result.new} modified={result.modified} deleted={result.deleted}, "
                         f"expected modified={n_changed}")
                del result
                out["changed"].append(sample)

            out["db_mib"] = sum(p.stat().st_size for p in settings.state_path.parent.iterdir()) / 2**20

            # Event-loop stalls (a separate pass: the watcher task would slow the timed runs).
            out["stall_changed"] = []
            for i in range(k, k + 2):
                version = "v2" if i % 2 == 0 else "v1"
                result, sample = await run(version, "1%-changed", watch=True)
                if result.modified != n_changed:
                    fail(f"1%-changed run (stall pass): modified={result.modified}, expected {n_changed}")
                out["stall_changed"].append(sample.stall)
            result, sample = await run(version, "unchanged", watch=True)
            if result.outcome != "unchanged":
                fail(f"unchanged run (stall pass): outcome={result.outcome}")
            out["stall_unchanged"] = sample.stall
            result, sample = await run("v1", "initial", watch=True, sync_id="stall")
            if result.new != n:
                fail(f"initial run (stall pass): new={result.new}, expected {n}")
            out["stall_initial"] = sample.stall
            del result

            # Store.fingerprints as after a daemon restart (the cache above is warm on every run).
            cold = await Store.open(settings.state_path)
            try:
                state = await cold.sync_state(SYNC_ID)
                STAGES.clear()
                fps = await cold.fingerprints(state)
                if len(fps) != n:
                    fail(f"stored fingerprints: {len(fps)}, expected {n}")
                out["cold_fingerprints"] = STAGES["Store.fingerprints"]
                del fps
            finally:
                await cold.close()
        finally:
            await store.close()

    # The baseline, on the same bytes, after syncd's runs (so that syncd's RSS figures hold only
    # syncd's own memory): the same alternation v1 -> v2 -> v1 ..., each a 1% change.
    bodies = {"v1": (tmp / "v1.json").read_bytes(), "v2": (tmp / "v2.json").read_bytes()}
    previous, *_ = baseline(bodies["v1"], {})
    out["baseline"], out["baseline_nogc"] = [], []
    for i in range(k):
        body = bodies["v2" if i % 2 == 0 else "v1"]
        sample, _ = measure_baseline(body, previous, n_changed, gc_off=True)
        out["baseline_nogc"].append(sample)
        sample, previous = measure_baseline(body, previous, n_changed, gc_off=False)
        out["baseline"].append(sample)
    return out


def report(args, out: dict) -> None:
    n, k = args.records, args.repeat
    init: Sample = out["initial"]
    columns = {"initial": [init], "1% changed": out["changed"], "unchanged": out["unchanged"]}

    def med(samples: list[Sample], attr: str = "seconds") -> float:
        return median([getattr(s, attr) for s in samples])

    base_gc, base_nogc = med(out["baseline"]), med(out["baseline_nogc"])
    base = min(base_gc, base_nogc)
    changed, unchanged = med(out["changed"]), med(out["unchanged"])
    ratio, un_ratio = base / changed, unchanged / changed
    mark = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
    peak = max(s.rss for group in columns.values() for s in group)

    print(f"syncd engine benchmark: {n:,} records, {out['body_bytes'] / 2**20:.1f} MiB body "
          f"({out['body_bytes'] / n:.0f} B/record), {out['n_changed']:,} records changed per delta, "
          f"median of {k}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print()
    print(f"  {'run':<40}{'time':>10}{'records/s':>12}{'cyclic GC':>11}{'RSS start -> peak':>21}")
    rows = [
        ("baseline (loads+extract+fp+diff), GC on", out["baseline"]),
        ("baseline, GC off", out["baseline_nogc"]),
        ("syncd initial (1 run)", [init]),
        ("syncd 1% changed", out["changed"]),
        ("syncd unchanged", out["unchanged"]),
    ]
    for name, samples in rows:
        t = med(samples)
        print(f"  {name:<40}{t * 1000:>8.1f}ms{n / t:>12,.0f}{med(samples, 'gc_seconds') * 1000:>9.1f}ms"
              f"{median([s.rss_start for s in samples]):>9.0f} ->{max(s.rss for s in samples):>5.0f} MiB")
    print(f"  {'plain aiohttp GET of the body':<40}{out['fetch'] * 1000:>8.1f}ms{n / out['fetch']:>12,.0f}")
    print()
    print(f"  syncd 1%-changed / faster baseline      {ratio:6.2f}   (target >= {TARGET_RATIO:.2f})  {mark(ratio >= TARGET_RATIO)}")
    print(f"  syncd 1%-changed / GC-on baseline       {base_gc / changed:6.2f}   (for reference)")
    print(f"  unchanged time / 1%-changed time        {un_ratio:6.1%}   (target <  {TARGET_UNCHANGED:.0%})   {mark(un_ratio < TARGET_UNCHANGED)}")
    scope = ("max over syncd's runs; high-water mark reset before each run" if out["rss_reset"]
             else "whole process, up to the end of syncd's runs")
    print(f"  peak RSS (ru_maxrss)                    {peak:6.0f} MiB   ({scope})")
    print(f"  state database on disk (db + WAL)       {out['db_mib']:6.1f} MiB")
    print()

    labels = out["labels"]
    print(f"  syncd time breakdown, ms (median){'':<7}" + "".join(f"{c:>12}" for c in columns))
    stage_sums = [0.0] * len(columns)
    for label in labels:
        values = [median([s.stages.get(label, 0.0) for s in samples]) for samples in columns.values()]
        stage_sums = [a + b for a, b in zip(stage_sums, values, strict=True)]
        if any(v >= 0.00005 for v in values):
            print(f"    {label:<38}" + "".join(f"{v * 1000:>12.1f}" for v in values))
    totals = [med(samples) for samples in columns.values()]
    print(f"    {'rest (envelopes, free, body hash)':<38}" + "".join(f"{(t - s) * 1000:>12.1f}" for t, s in zip(totals, stage_sums, strict=True)))
    print(f"    {'total':<38}" + "".join(f"{t * 1000:>12.1f}" for t in totals))
    print(f"    {'  of which cyclic GC, in any stage':<38}" + "".join(f"{med(s, 'gc_seconds') * 1000:>12.1f}" for s in columns.values()))
    print(f"    {'  full (gen 2) collections':<38}" + "".join(f"{med(s, 'gc_full'):>12.0f}" for s in columns.values()))
    first_delta = out["changed"][0].stages.get("Store.fingerprints", 0.0)
    print(f"  Store.fingerprints, cold cache: {out['cold_fingerprints'] * 1000:.1f} ms after a restart, "
          f"{first_delta * 1000:.1f} ms in the first delta after the initial run (median above: warm)")
    print(f"  longest event-loop stall (5 ms ticker, separate runs): initial {out['stall_initial'] * 1000:.0f} ms, "
          f"1% changed {max(out['stall_changed']) * 1000:.0f} ms, unchanged {out['stall_unchanged'] * 1000:.0f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="records per body (default 100000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per median (default 5)")
    parser.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)  # internal: the API process
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve), args.records)
        return 0
    if args.records < 100 or args.repeat < 1:
        parser.error("--records must be >= 100 and --repeat >= 1")

    from syncd.logs import configure

    configure("json", "warning", stream=sys.stderr)  # keep per-poll info lines out of the table
    with tempfile.TemporaryDirectory(prefix="syncd-bench-") as tmp_name:
        tmp = Path(tmp_name)
        proc, port = start_server(tmp, args.records)
        try:
            out = asyncio.run(bench(args, tmp, port))
        finally:
            stop_server(proc)
    report(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
