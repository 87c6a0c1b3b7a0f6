"""A paginated list against the same records in one page, same run.

    python bench/paginate.py [--records N] [--page-size P] [--runs K] [--profile]

A local aiohttp API in a separate process serves the records of bench/engine.py (N records of ~320
bytes; /v2 differs from /v1 in 1% of them, one field each) in two ways:

  /v1/all, /v2/all                        one page: every record in one body
  /v1/paged?page=I&per_page=P, /v2/...    pages of P records (I from 1); the page after the last one
                                          has an empty list, which is how type = "page" stops:
                                          N/P + 1 requests per run

Every body is serialized once, at start-up, so the API only sends bytes. Two syncs with the same
list_identifier and record_identifier -- "single" (no pagination) and "paged" ([api_details.
pagination] type = "page", size_param = "per_page", size = P) -- are polled by syncd's real engine
(`syncd.engine.poll`, a real `Store`, a `Source` on `poll_session()`), each with a state database of
its own. Each repetition starts both from fresh databases and runs, alternating single and paged
(the order flips from one repetition to the next):

  initial      first run: every record is new (N events written to the outbox)
  1% changed   /v2, then /v1: each run modifies 1% of the records (2 runs each per repetition)
  unchanged    the same bytes as the run before (2 runs each per repetition)

The report gives the medians over all repetitions and the ratio paginated / single for each kind of
run. Target: 1%-changed paginated time <= 1.5 x single page. Per-stage times come from the thin
wrappers of bench/engine.py (nothing in syncd is modified). Exit status 0 when every run did what
it should (target met or not); non-zero when a run failed or produced the wrong events.

--profile: afterwards, cProfile one more 1%-changed run of each sync and print the top functions
(own time) of each: the event loop and the engine's worker-thread calls (_analyse, _changes)
merged. The cyclic GC's time lands on whatever frame triggered it (mostly contextlib's __exit__ of
syncd.engine._gc_paused, when the collector comes back on after a page).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import gc
import io
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

from _child import peak_rss_mib, reset_peak_rss
from engine import GC, ID_PATH, LIST_PATH, STAGES, changed_indices, fail, instrument, make_bodies, stop_server

TARGET = 1.5  # 1%-changed paginated time / 1%-changed single-page time, at most
KINDS = ("initial", "1% changed", "unchanged")
MODES = ("single", "paged")
CHANGED_PER_REP = 2
UNCHANGED_PER_REP = 2

# -- the API, in its own process ------------------------------------------------------------------------


def envelope(employees: list) -> bytes:
    return orjson.dumps({"response": {"payload": {"employees": employees}}})


def serve(n: int, page_size: int) -> None:
    """Child process: serve /vX/all and /vX/paged?page=I&per_page=P until stdin closes."""
    from aiohttp import web

    from _child import serve_until_parent_exits

    bodies: dict[str, bytes] = {}
    pages: dict[str, list[bytes]] = {}
    for version, body in zip(("v1", "v2"), make_bodies(n), strict=True):
        bodies[f"/{version}/all"] = body
        employees = orjson.loads(body)["response"]["payload"]["employees"]
        pages[f"/{version}/paged"] = [envelope(employees[i:i + page_size]) for i in range(0, n, page_size)]
        del employees
    empty = envelope([])
    total = {version: (len(bodies[f"/{version}/all"]), sum(map(len, pages[f"/{version}/paged"]))) for version in ("v1", "v2")}

    async def handle(request: web.Request) -> web.Response:
        path = request.path
        body = bodies.get(path)
        if body is None:
            listing = pages.get(path)
            if listing is None:
                return web.Response(status=404)
            try:
                number, size = int(request.query["page"]), int(request.query["per_page"])
            except (KeyError, ValueError):
                return web.Response(status=400, text="page and per_page are required")
            if size != page_size or number < 1:
                return web.Response(status=400, text=f"per_page must be {page_size}, page >= 1")
            body = listing[number - 1] if number <= len(listing) else empty
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    # The parent reads one line of sizes before the port line.
    print(orjson.dumps(total).decode(), flush=True)
    serve_until_parent_exits(app)


def start_server(n: int, page_size: int) -> tuple[subprocess.Popen, int, dict]:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", "--records", str(n),
                             "--page-size", str(page_size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    sizes = proc.stdout.readline()
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        stop_server(proc)
        raise SystemExit(f"the API process did not start (exit status {proc.returncode})")
    return proc, int(line), orjson.loads(sizes)


# -- the runs -----------------------------------------------------------------------------------------------


def write_definition(conf_dir: Path, port: int, name: str, path: str, page_size: int | None) -> None:
    text = ('webhook_url = "http://127.0.0.1:9/hook"\n'
            f'list_identifier = "{LIST_PATH}"\n'
            f'record_identifier = "{ID_PATH}"\n'
            "\n[api_details]\n"
            f'base_url = "http://127.0.0.1:{port}"\n'
            f'path = "{path}"\n')
    if page_size is not None:
        text += ('\n[api_details.pagination]\n'
                 'type = "page"\n'
                 'size_param = "per_page"\n'
                 f'size = {page_size}\n')
    (conf_dir / f"{name}.toml").write_text(text)


#: While a profiled run is on: the profiles of the worker threads it used (merged into the report).
THREAD_PROFILES: list[cProfile.Profile] | None = None
_profiling = threading.local()


def profile_threads() -> None:
    """Profile the engine's worker-thread functions too (cProfile only sees the thread it is enabled
    in; the parse of a large page and the diff run in asyncio.to_thread). In memory only."""
    import syncd.engine

    def wrap(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            if THREAD_PROFILES is None or threading.current_thread() is threading.main_thread() \
                    or getattr(_profiling, "on", False):
                return func(*args, **kwargs)
            profile = cProfile.Profile()
            _profiling.on = True
            profile.enable()
            try:
                return func(*args, **kwargs)
            finally:
                profile.disable()
                _profiling.on = False
                THREAD_PROFILES.append(profile)
        return wrapper

    for name in ("_analyse", "_changes"):
        setattr(syncd.engine, name, wrap(getattr(syncd.engine, name)))


class Sample:
    __slots__ = ("seconds", "stages", "gc_seconds", "gc_full", "rss", "requests")

    def __init__(self, seconds: float, stages: dict, rss: float, requests: int) -> None:
        self.seconds, self.stages, self.rss, self.requests = seconds, stages, rss, requests
        self.gc_seconds, self.gc_full = GC.seconds, GC.full


async def bench(args, tmp: Path, port: int) -> dict:
    from syncd.config import load_dir
    from syncd.engine import poll
    from syncd.http import poll_session
    from syncd.settings import load_settings
    from syncd.source.fetcher import Source
    from syncd.store import Store

    n, page_size = args.records, args.page_size
    n_pages = -(-n // page_size)
    n_changed = len(changed_indices(n))
    conf_dir = tmp / "conf.d"
    conf_dir.mkdir()
    (tmp / "state").mkdir()
    settings = load_settings({"config_dir": conf_dir, "state_path": tmp / "state" / "unused.db"})
    syncs = {}
    for version in ("v1", "v2"):
        write_definition(conf_dir, port, "single", f"/{version}/all", None)
        write_definition(conf_dir, port, "paged", f"/{version}/paged", page_size)
        loaded, problems = load_dir(settings)
        if problems:
            fail("; ".join(map(str, problems)))
        for mode in MODES:
            syncs[mode, version] = loaded[mode]
    labels = instrument()
    if args.profile:
        profile_threads()
    samples: dict[tuple[str, str], list[Sample]] = {(kind, mode): [] for kind in KINDS for mode in MODES}
    out: dict = {"labels": labels, "samples": samples, "n_changed": n_changed, "db_mib": {}}
    expected_requests = {"single": 1, "paged": n_pages + 1}

    async with poll_session() as session:
        source = Source(session, max_bytes=int(settings.max_response_bytes),
                        max_requests_per_host=settings.max_requests_per_host)
        # Warm up the connection, the API process and the first-call costs of both paths.
        for mode in MODES:
            async with session.get(syncs[mode, "v1"].url, params={"page": "1", "per_page": str(page_size)}) as resp:
                await resp.read()

        async def run(store, mode: str, version: str, kind: str, profile: cProfile.Profile | None = None):
            global THREAD_PROFILES
            gc.collect()
            STAGES.clear()
            reset_peak_rss()
            GC.reset()
            if profile is not None:
                THREAD_PROFILES = []
                profile.enable()
            t0 = time.perf_counter()
            result = await poll(syncs[mode, version], store, source)
            elapsed = time.perf_counter() - t0
            if profile is not None:
                profile.disable()
                out["profiles"][mode] = (profile, THREAD_PROFILES)
                THREAD_PROFILES = None
            sample = Sample(elapsed, dict(STAGES), peak_rss_mib(), result.requests)
            what = f"{kind} run of {mode} on /{version}"
            if not result.ok:
                fail(f"{what}: {result.error}")
            if result.requests != expected_requests[mode]:
                fail(f"{what}: {result.requests} requests, expected {expected_requests[mode]}")
            if kind == "initial":
                if (result.new, result.modified, result.deleted, result.sync_type) != (n, 0, 0, "initial_sync"):
                    fail(f"{what}: new={result.new} modified={result.modified} deleted={result.deleted}")
            elif kind == "unchanged":
                if result.outcome != "unchanged" or result.events:
                    fail(f"{what}: outcome={result.outcome} events={len(result.events)}")
            elif (result.modified, result.new, result.deleted) != (n_changed, 0, 0):
                fail(f"{what}: new={result.new} modified={result.modified} deleted={result.deleted}, "
                     f"expected modified={n_changed}")
            return sample

        async def pair(stores: dict, version: str, kind: str, order: tuple[str, ...]) -> None:
            for mode in order:
                samples[kind, mode].append(await run(stores[mode], mode, version, kind))

        for rep in range(args.runs):
            order = MODES if rep % 2 == 0 else MODES[::-1]
            paths = {mode: tmp / "state" / f"{mode}-{rep}.db" for mode in MODES}
            stores = {mode: await Store.open(paths[mode]) for mode in MODES}
            try:
                await pair(stores, "v1", "initial", order)
                version = "v1"
                for i in range(CHANGED_PER_REP):
                    version = "v2" if version == "v1" else "v1"
                    await pair(stores, version, "1% changed", order[::-1] if i % 2 else order)
                for i in range(UNCHANGED_PER_REP):
                    await pair(stores, version, "unchanged", order[::-1] if i % 2 else order)
                if args.profile and rep == args.runs - 1:
                    out["profiles"] = {}
                    out["profile_samples"] = {}
                    for mode in MODES:
                        version = "v2" if version == "v1" else "v1"
                        sample = await run(stores[mode], mode, version, "1% changed", cProfile.Profile())
                        out["profile_samples"][mode] = sample
                        version = "v2" if version == "v1" else "v1"  # the other mode gets the same switch
            finally:
                for store in stores.values():
                    await store.close()
            for mode in MODES:
                files = list(paths[mode].parent.glob(paths[mode].name + "*"))
                out["db_mib"][mode] = sum(p.stat().st_size for p in files) / 2**20
                for p in files:
                    p.unlink()
            print(f"  repetition {rep + 1}/{args.runs} done", file=sys.stderr, flush=True)
    return out


# -- the report -------------------------------------------------------------------------------------------


def report(args, out: dict, sizes: dict) -> bool:
    n, page_size = args.records, args.page_size
    samples = out["samples"]

    def med(kind: str, mode: str, attr: str = "seconds") -> float:
        return statistics.median(getattr(s, attr) for s in samples[kind, mode])

    single_bytes, paged_bytes = sizes["v1"]
    print(f"syncd pagination benchmark: {n:,} records, one page of {single_bytes / 2**20:.1f} MiB vs "
          f"{-(-n // page_size)} pages of {page_size:,} ({paged_bytes / 2**20:.1f} MiB in all, "
          f"{-(-n // page_size) + 1} requests), {out['n_changed']:,} records changed per delta; "
          f"{args.runs} repetitions, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print()
    print(f"  {'run (median)':<16}{'runs':>6}{'single page':>14}{'paginated':>12}{'paged/single':>15}"
          f"{'GC single':>12}{'GC paged':>10}{'peak RSS s / p':>17}")
    ratios = {}
    for kind in KINDS:
        single, paged = med(kind, "single"), med(kind, "paged")
        ratios[kind] = paged / single
        print(f"  {kind:<16}{len(samples[kind, 'single']):>6}{single * 1000:>12.1f}ms{paged * 1000:>10.1f}ms"
              f"{ratios[kind]:>14.2f}x{med(kind, 'single', 'gc_seconds') * 1000:>10.1f}ms"
              f"{med(kind, 'paged', 'gc_seconds') * 1000:>8.1f}ms"
              f"{max(s.rss for s in samples[kind, 'single']):>9.0f} /{max(s.rss for s in samples[kind, 'paged']):>4.0f} MiB")
    print()
    ok = ratios["1% changed"] <= TARGET
    print(f"  1%-changed paginated / single page   {ratios['1% changed']:5.2f}x   (target <= {TARGET:.1f}x)  "
          f"{'PASS' if ok else 'FAIL'}")
    print(f"  initial paginated / single page      {ratios['initial']:5.2f}x   (for reference)")
    print(f"  unchanged paginated / single page    {ratios['unchanged']:5.2f}x   (for reference: a single page "
          f"that did not change is only hashed; every page of a paginated list is parsed, the next request depends on it)")
    print(f"  state database on disk, last repetition (db + WAL): single {out['db_mib']['single']:.1f} MiB, "
          f"paged {out['db_mib']['paged']:.1f} MiB")
    print()
    labels = out["labels"]
    cols = [(kind, mode) for kind in KINDS for mode in MODES]
    print(f"  time breakdown, ms (median){'':<13}" + "".join(f"{kind[:10] + (' s' if mode == 'single' else ' p'):>14}"
                                                             for kind, mode in cols))
    sums = [0.0] * len(cols)
    for label in labels:
        values = [statistics.median(s.stages.get(label, 0.0) for s in samples[col]) for col in cols]
        sums = [a + b for a, b in zip(sums, values, strict=True)]
        if any(v >= 0.00005 for v in values):
            print(f"    {label:<38}" + "".join(f"{v * 1000:>14.1f}" for v in values))
    totals = [med(*col) for col in cols]
    print(f"    {'rest (envelopes, hashing, glue)':<38}" + "".join(f"{(t - s) * 1000:>14.1f}" for t, s in zip(totals, sums, strict=True)))
    print(f"    {'total':<38}" + "".join(f"{t * 1000:>14.1f}" for t in totals))
    print(f"    {'  of which cyclic GC':<38}" + "".join(f"{med(*col, 'gc_seconds') * 1000:>14.1f}" for col in cols))
    print(f"    {'  full (gen 2) collections':<38}" + "".join(f"{med(*col, 'gc_full'):>14.0f}" for col in cols))
    print("  (s: single page, p: paginated; 'fetch' is the sum over the run's requests)")

    if "profiles" in out:
        for mode in MODES:
            stream = io.StringIO()
            main_profile, thread_profiles = out["profiles"][mode]
            stats = pstats.Stats(main_profile, stream=stream)
            for profile in thread_profiles:
                stats.add(profile)
            stats.sort_stats("tottime").print_stats(args.profile_top)
            sample = out["profile_samples"][mode]
            print()
            print(f"  cProfile, one more 1%-changed run, {mode}: {sample.seconds * 1000:.0f} ms under the profiler, "
                  f"cyclic GC {sample.gc_seconds * 1000:.0f} ms (not attributed below); event loop and "
                  f"{len(thread_profiles)} worker-thread call(s) merged; own time, top {args.profile_top}:")
            lines = stream.getvalue().splitlines()
            start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
            for line in lines[start:]:
                if line.strip():
                    print("    " + line.replace(str(Path.cwd()) + "/", "")[:150])
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="records in the list (default 100000)")
    parser.add_argument("--page-size", type=int, default=1_000, help="records per page (default 1000)")
    parser.add_argument("--runs", type=int, default=5, help="repetitions (default 5); each has 1 initial, "
                        f"{CHANGED_PER_REP} 1%%-changed and {UNCHANGED_PER_REP} unchanged runs of each sync")
    parser.add_argument("--profile", action="store_true", help="cProfile one more 1%%-changed run of each sync")
    parser.add_argument("--profile-top", type=int, default=25, help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # internal: the API process
    args = parser.parse_args()
    if args.serve:
        serve(args.records, args.page_size)
        return 0
    if args.records < 100 or args.runs < 1 or not 1 <= args.page_size <= args.records:
        parser.error("--records must be >= 100, --runs >= 1, 1 <= --page-size <= --records")
    if -(-args.records // args.page_size) + 1 > 1000:
        parser.error("more than 999 pages: over the default max_pages (1000)")

    from syncd.logs import configure

    configure("json", "warning", stream=sys.stderr)  # keep per-poll info lines out of the table
    with tempfile.TemporaryDirectory(prefix="syncd-bench-") as tmp_name:
        proc, port, sizes = start_server(args.records, args.page_size)
        try:
            out = asyncio.run(bench(args, Path(tmp_name), port))
        finally:
            stop_server(proc)
    report(args, out, sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
