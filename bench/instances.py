"""Many syncs shared by several `syncd run` instances on one PostgreSQL database: intervals, shares, CPU.

    python bench/instances.py [--syncs N] [--instances I] [--interval D] [--seconds S] [--lease-ttl T] [--url URL]
    # defaults: 10000 syncs, 3 instances, 60s, 3 intervals + 30 s, syncd's lease_ttl (30s),
    #           postgresql://postgres@127.0.0.1:5432/test (or $SYNCD_BENCH_PG_URL)
    # quick run: --syncs 2000 --interval 20s --seconds 70

I real processes (`python -m syncd run`, an empty settings file, no SYNCD_* variables), started at
once with the same config directory of N definitions and the same state_url: a schema made for the
run (`?search_path=`, dropped at the end), each instance with its own `application_name` so its
PostgreSQL backends can be told apart. Each runs with max_concurrent_polls 64 and
max_requests_per_host 64 (as bench/many_syncs.py), logs at warning level to a file, and listens on
a port of its own. Every sync polls one local API in a child process (the many_syncs.py API: a tiny
JSON list that never changes, arrival times recorded per path; the first poll of each sync makes
one record.new, delivered to POST /hook on the same API, which records each body).

After S seconds from the spawn, the report gives:

  gap / interval   per sync, the gaps between consecutive polls over the interval, whichever
                   instance polled: p50, p99, max, min (target p99 <= 1.15; jitter alone gives
                   0.9-1.1; a gap well under 0.9 means two instances polled the sync close together)
  shares           syncs each instance holds: live leases (leases table) and `owner` in GET /v1/syncs;
                   how the leases spread over time (sampled every 2 s)
  CPU              each instance's user + system time (/proc/PID/stat) as a fraction of wall time,
                   over the window and over its part after the first interval (steady state, without
                   the first polls and their 10,000 webhooks); the PostgreSQL backends serving each
                   instance (pg_stat_activity by application_name, /proc); and the whole PostgreSQL
                   server (every postgres process plus the children the postmaster reaped: includes
                   anyone else's use of the server meanwhile)
  correctness      syncs never polled, syncs with more than one initial run (runs table), leases taken
                   more than once (token > 1), webhooks received / distinct, outbox left, exit statuses
                   after SIGTERM
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp

TARGET = 1.15
EARLY = 0.85  # a gap below this is not jitter: the sync was polled twice close together
BODY = b'{"items":[{"id":1,"name":"r1"}]}'
DEFAULT_URL = os.environ.get("SYNCD_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
SAMPLE_EVERY = 2.0
ACTIVITY_EVERY = 0.5  # pg_stat_activity samples: what the instances' backends are doing
ROOT = Path(__file__).resolve().parent.parent
_NOW = "extract(epoch from clock_timestamp())"


def serve() -> None:
    """Child process: GET /s{i} -> BODY (arrival time recorded), POST /hook -> 204 (body digest
    recorded), GET /__times, GET /__hooks."""
    from aiohttp import web

    from _child import serve_until_parent_exits

    arrivals: dict[str, list[float]] = {}
    hooks: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        arrivals.setdefault(request.path, []).append(time.monotonic())
        return web.Response(body=BODY, content_type="application/json")

    async def hook(request: web.Request) -> web.Response:
        hooks.append(hashlib.blake2b(await request.read(), digest_size=12).hexdigest())
        return web.Response(status=204)

    async def times(request: web.Request) -> web.Response:
        return web.Response(body=json.dumps(arrivals).encode(), content_type="application/json")

    async def hook_list(request: web.Request) -> web.Response:
        return web.Response(body=json.dumps(hooks).encode(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/__times", times)
    app.router.add_get("/__hooks", hook_list)
    app.router.add_post("/hook", hook)
    app.router.add_get("/{tail:.*}", answer)
    serve_until_parent_exits(app, backlog=1024)


# -- /proc -----------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process (its threads included); None once it is gone."""
    fields = _stat(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def postgres_server_cpu(postmaster: int | None) -> float | None:
    """CPU of the whole PostgreSQL server: every live postgres process, plus what the postmaster's
    reaped children (backends that exited) used."""
    if postmaster is None:
        return None
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.find("(") + 1:text.rfind(")")]
        if comm != "postgres":
            continue
        fields = text.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICK
        if int(entry.name) == postmaster:
            total += (int(fields[13]) + int(fields[14])) / TICK
    return total


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def with_params(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the run ---------------------------------------------------------------------------------------


class Instance:
    def __init__(self, index: int, proc: subprocess.Popen, port: int, app: str, log: Path) -> None:
        self.index, self.proc, self.port, self.app, self.log = index, proc, port, app, log
        self.name = f"bench-{index + 1}"
        self.ready_after: float | None = None
        self.cpu: list[tuple[float, float]] = []  # (t, cpu seconds)
        self.backends: dict[int, float] = {}  # backend pid -> last CPU seen
        self.exit_status: int | None = None
        self.stop_seconds = 0.0


async def main(args) -> int:
    import asyncpg

    from syncd.units import format_duration

    n, interval, seconds = args.syncs, args.interval, args.seconds
    tag = secrets.token_hex(3)
    schema = f"syncd_bench_{os.getpid()}_{tag}"
    admin = await asyncpg.connect(args.url)
    await admin.execute(f"CREATE SCHEMA {schema}")
    await admin.execute(f"SET search_path = {schema}")
    version = admin.get_server_version()
    postmaster = None
    child = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             cwd=Path(__file__).parent)
    instances: list[Instance] = []
    try:
        port = int(child.stdout.readline())
        api = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory(prefix="syncd-instances-") as tmp_name:
            tmp = Path(tmp_name)
            conf = tmp / "conf.d"
            conf.mkdir()
            for i in range(n):
                (conf / f"s{i:05d}.toml").write_text(
                    f'webhook_url = "{api}/hook"\nlist_identifier = "$.items"\nrecord_identifier = "$.id"\n'
                    f'interval = "{format_duration(interval)}"\n[api_details]\nbase_url = "{api}"\npath = "/s{i}"\n')
            (tmp / "settings.toml").write_text("")
            env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
            env["PYTHONPATH"] = str(ROOT)
            state_url = with_params(args.url, search_path=schema)

            wall0 = time.monotonic()
            for i in range(args.instances):
                app = f"syncdbench-{tag}-{i + 1}"
                listen = free_port()
                log = tmp / f"instance-{i + 1}.log"
                cmd = [sys.executable, "-m", "syncd", "run", "--settings", str(tmp / "settings.toml"),
                       "--config-dir", str(conf), "--state-path", str(tmp / "unused.db"),
                       "--state-url", with_params(state_url, application_name=app),
                       "--listen", f"127.0.0.1:{listen}", "--instance-id", f"bench-{i + 1}",
                       "--log-format", "json", "--log-level", "warning",
                       "--max-concurrent-polls", "64", "--max-requests-per-host", "64"]
                if args.lease_ttl is not None:
                    cmd += ["--lease-ttl", format_duration(args.lease_ttl)]
                with open(log, "wb") as f:
                    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                            env=env, cwd=ROOT)
                instances.append(Instance(i, proc, listen, app, log))
            server0 = None
            timeline: list[tuple[float, dict[str, int]]] = []

            async with aiohttp.ClientSession() as session:
                async def wait_ready(inst: Instance) -> None:
                    while inst.proc.poll() is None and time.monotonic() - wall0 < 120:
                        try:
                            async with session.get(f"http://127.0.0.1:{inst.port}/readyz") as resp:
                                if resp.status == 200:
                                    inst.ready_after = time.monotonic() - wall0
                                    return
                        except aiohttp.ClientError:
                            pass
                        await asyncio.sleep(0.1)

                async def sample() -> None:
                    nonlocal postmaster, server0
                    t = time.monotonic() - wall0
                    for inst in instances:
                        cpu = proc_cpu(inst.proc.pid)
                        if cpu is not None:
                            inst.cpu.append((t, cpu))
                    rows = await admin.fetch("SELECT pid, application_name FROM pg_stat_activity "
                                             "WHERE application_name LIKE $1", f"syncdbench-{tag}-%")
                    by_app = {inst.app: inst for inst in instances}
                    for pid, app in rows:
                        cpu = proc_cpu(pid)
                        if cpu is not None and app in by_app:
                            by_app[app].backends[pid] = cpu
                        if postmaster is None and (fields := _stat(pid)) is not None:
                            postmaster = int(fields[1])
                    if server0 is None and postmaster is not None:
                        server0 = (t, postgres_server_cpu(postmaster))
                    owners = await admin.fetch(f"SELECT owner, count(*) FROM leases WHERE owner IS NOT NULL AND "
                                               f"expires_at > {_NOW} GROUP BY owner") if await admin.fetchval(
                        "SELECT to_regclass('leases') IS NOT NULL") else []
                    timeline.append((t, {r[0]: r[1] for r in owners}))

                async def sampler() -> None:
                    while True:
                        await sample()
                        await asyncio.sleep(SAMPLE_EVERY)

                watcher = await asyncpg.connect(args.url)

                async def watch_activity() -> None:
                    # Each sample: the instances' backends that are running a statement or sit in an
                    # open transaction, by (state, wait event, statement): a profile of the database side.
                    while True:
                        rows = await watcher.fetch(
                            "SELECT state, wait_event_type, wait_event, left(query, 300) FROM pg_stat_activity "
                            "WHERE application_name LIKE $1 AND state <> 'idle'", f"syncdbench-{tag}-%")
                        activity["samples"] += 1
                        for state, wtype, wevent, query in rows:
                            wait = f"{wtype}:{wevent}" if wtype else "cpu"
                            activity[state, wait, " ".join((query or "").split())[:70]] += 1
                        await asyncio.sleep(ACTIVITY_EVERY)

                activity: Counter = Counter()
                sampling = asyncio.create_task(sampler())
                watching = asyncio.create_task(watch_activity())
                await asyncio.gather(*(wait_ready(inst) for inst in instances))
                dead = [inst.name for inst in instances if inst.proc.poll() is not None]
                if dead:
                    raise SystemExit(f"instances exited at start: {dead}; see their logs: "
                                     + "; ".join(inst.log.read_text()[-500:] for inst in instances))
                await asyncio.sleep(max(0.0, seconds - (time.monotonic() - wall0)))
                sampling.cancel()
                watching.cancel()
                for done in await asyncio.gather(sampling, watching, return_exceptions=True):
                    if isinstance(done, Exception):
                        print(f"  (a sampler failed: {done!r})", file=sys.stderr)
                await watcher.close()
                await sample()
                wall = time.monotonic() - wall0
                server1 = (wall, postgres_server_cpu(postmaster))
                rss = {inst.name: rss_mib(inst.proc.pid) for inst in instances}

                # After the window, instances still running.
                views = {}
                for inst in instances:
                    t0 = time.perf_counter()
                    async with session.get(f"http://127.0.0.1:{inst.port}/v1/syncs") as resp:
                        body = await resp.read()
                        status = resp.status
                    views[inst.name] = (time.perf_counter() - t0, status, json.loads(body) if status == 200 else None)
                async with session.get(api + "/__times") as resp:
                    arrivals: dict[str, list[float]] = await resp.json()
                # What the store's reads cost with this database, instances still running (median of 3).
                from syncd.store.postgres import PostgresStore

                reader = await PostgresStore.open(state_url, readonly=True)
                reads = {}
                try:
                    for label, call in (("all_states", reader.all_states), ("outbox_stats", reader.outbox_stats),
                                        ("lease_owners", reader.lease_owners), ("next_due", reader.next_due),
                                        ("due_events(100)", lambda: reader.due_events(time.time(), 100))):
                        times = []
                        for _ in range(3):
                            t0 = time.perf_counter()
                            await call()
                            times.append(time.perf_counter() - t0)
                        reads[label] = sorted(times)[1]
                finally:
                    await reader.close()
                leases = {r[0]: r[1] for r in await admin.fetch(
                    f"SELECT owner, count(*) FROM leases WHERE owner IS NOT NULL AND expires_at > {_NOW} GROUP BY owner")}
                handed = await admin.fetchval("SELECT count(*) FROM leases WHERE token > 1")
                max_token = await admin.fetchval("SELECT max(token) FROM leases")
                twice = await admin.fetchval("SELECT count(*) FROM (SELECT sync_id FROM runs WHERE sync_type = "
                                             "'initial_sync' GROUP BY sync_id HAVING count(*) > 1) t")
                failed = await admin.fetchval("SELECT count(*) FROM runs WHERE outcome = 'failed'")
                runs = await admin.fetchval("SELECT count(*) FROM runs")

                # Stop them all at once, as `systemctl stop` would.
                t_stop = time.monotonic()
                for inst in instances:
                    inst.proc.send_signal(signal.SIGTERM)
                for inst in instances:
                    try:
                        inst.exit_status = await asyncio.to_thread(inst.proc.wait, 60)
                    except subprocess.TimeoutExpired:
                        inst.proc.kill()
                        inst.exit_status = inst.proc.wait()
                    inst.stop_seconds = time.monotonic() - t_stop
                await asyncio.sleep(1.0)  # the last deliveries' hooks
                async with session.get(api + "/__hooks") as resp:
                    hooks: list[str] = await resp.json()
            outbox_left = await admin.fetchval("SELECT count(*) FROM outbox")
            problems = []
            for inst in instances:
                lines = [line for line in inst.log.read_text(errors="replace").splitlines() if line.strip()]
                levels = Counter(json.loads(line).get("level", "?") if line.startswith("{") else "text" for line in lines)
                firsts = [line[:300] for line in lines if '"error"' in line or not line.startswith("{")][:3]
                problems.append((inst.name, dict(levels), firsts))
    finally:
        for inst in instances:
            if inst.proc.poll() is None:
                inst.proc.kill()
                inst.proc.wait()
        child.stdin.close()
        child.wait(timeout=30)
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()

    # -- report --
    ratios, per_sync_max, firsts, early_first = [], [], [], 0
    polls = sum(len(v) for v in arrivals.values())
    for ts in arrivals.values():
        firsts.append(ts[0] - wall0)
        gaps = [(b - a) / interval for a, b in itertools.pairwise(ts)]
        early_first += bool(gaps) and gaps[0] < EARLY
        ratios.extend(gaps)
        if gaps:
            per_sync_max.append(max(gaps))
    polled = len(arrivals)
    ttl = f"{format_duration(args.lease_ttl)}" if args.lease_ttl is not None else "30s (default)"
    ready = max((inst.ready_after or 0.0) for inst in instances)
    print(f"syncd instances: {n} syncs every {format_duration(interval)} over {args.instances} `syncd run` instances, "
          f"PostgreSQL {version.major}.{version.micro if version.major >= 10 else version.minor}, lease_ttl {ttl}; "
          f"window {wall:.0f} s from spawn (all ready after {ready:.1f} s); {os.cpu_count()} CPUs")
    print(f"  polls         {polls} ({polls / wall:.1f}/s; expected ~{n / interval:.1f}/s), syncs polled {polled}/{n}, "
          f"gaps {len(ratios)}; first polls {pct(firsts, 0.5):.1f} s (p50) .. {max(firsts):.1f} s (max) after spawn")
    p99 = pct(ratios, 0.99) if ratios else float("nan")
    if ratios:
        print(f"  gap/interval  p50 {pct(ratios, 0.5):.3f}   p99 {p99:.3f}   max {max(ratios):.3f}   min {min(ratios):.3f}"
              f"   syncs with a gap > {TARGET}: {sum(1 for m in per_sync_max if m > TARGET)}"
              f"   gaps < {EARLY}: {sum(1 for r in ratios if r < EARLY)} ({early_first} between a sync's 1st and 2nd poll)")
    steady_from = interval + 15.0
    total_cpu = total_steady = total_backends = 0.0
    print(f"  {'instance':<10}{'leases':>8}{'/v1/syncs':>11}{'CPU window':>12}{'after ' + format_duration(steady_from):>12}"
          f"{'PG backends':>13}{'RSS':>9}{'GET /v1/syncs':>15}{'stop':>7}{'exit':>6}")
    owners_seen = Counter()
    first_view = next((v[2] for v in views.values() if v[2] is not None), None)
    if first_view is not None:
        owners_seen = Counter(s.get("owner") for s in first_view["syncs"])
    for inst in instances:
        t_end, c_end = inst.cpu[-1]
        cpu = c_end
        steady = [(t, c) for t, c in inst.cpu if t >= steady_from]
        steady_frac = (c_end - steady[0][1]) / (t_end - steady[0][0]) if len(steady) > 1 else float("nan")
        backends = sum(inst.backends.values())
        total_cpu += cpu
        total_steady += steady_frac
        total_backends += backends
        took, status, _ = views[inst.name]
        print(f"  {inst.name:<10}{leases.get(inst.name, 0):>8}{owners_seen.get(inst.name, 0):>11}{cpu / wall:>11.1%}"
              f"{steady_frac:>12.1%}{backends / wall:>12.1%}{rss[inst.name]:>6.0f} MiB{took * 1000:>10.0f} ms"
              f"{'' if status == 200 else f' ({status})'}{inst.stop_seconds:>6.1f}s{inst.exit_status:>6}")
    print(f"  {'total':<10}{sum(leases.values()):>8}{sum(v for k, v in owners_seen.items() if k):>11}{total_cpu / wall:>11.1%}"
          f"{total_steady:>12.1%}{total_backends / wall:>12.1%}   (CPU: fraction of one core; "
          f"{total_cpu * 1000 / max(polls, 1):.2f} ms of instance CPU per poll)")
    if server0 is not None and server1[1] is not None:
        spent = server1[1] - server0[1]
        span = server1[0] - server0[0]
        print(f"  PostgreSQL server, all processes: {spent:.1f} s over {span:.0f} s = {spent / span:.1%} of one core "
              f"(includes anyone else's use of the server; this run's backends: {total_backends:.1f} s)")
    marks = [t for t in (5, 10, 20, 30, 45, 60, 90) if t < wall] + [wall]
    shown = []
    for mark in marks:
        t, counts = min(timeline, key=lambda e: abs(e[0] - mark))
        shown.append(f"{t:.0f}s " + "/".join(str(counts.get(inst.name, 0)) for inst in instances))
    print(f"  leases held over time ({'/'.join(inst.name for inst in instances)}): " + ", ".join(shown))
    print(f"  leases taken more than once: {handed} (highest token {max_token}); syncs with more than one initial run: "
          f"{twice}; runs {runs}, failed {failed}")
    print(f"  webhooks: received {len(hooks)}, distinct {len(set(hooks))} (expected {n}: one record.new per sync), "
          f"outbox left {outbox_left}")
    print("  store reads from the bench, instances running (median of 3): "
          + ", ".join(f"{label} {t * 1000:.0f} ms" for label, t in reads.items()))
    samples = activity.pop("samples", 0)
    if samples:
        print(f"  the instances' PostgreSQL backends, {samples} samples of pg_stat_activity (every {ACTIVITY_EVERY} s): "
              f"busy backends on average {sum(activity.values()) / samples:.2f}; most seen (state, wait, statement):")
        for (state, wait, query), count in activity.most_common(8):
            print(f"    {count / samples:6.2f}  {state:<20} {wait:<24} {query}")
    for name, levels, firsts_ in problems:
        if set(levels) - {"info", "debug"}:
            print(f"  log of {name}: {levels}" + "".join(f"\n      {line}" for line in firsts_))
    ok = ratios and p99 <= TARGET
    print(f"  p99 gap/interval <= {TARGET}: {'PASS' if ok else 'MISS'}")
    return 0 if polled == n and twice == 0 else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        sys.path.insert(0, str(Path(__file__).parent))
        serve()
        sys.exit(0)
    sys.path.insert(0, str(ROOT))
    from syncd.units import parse_duration

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--syncs", type=int, default=10000)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--interval", type=parse_duration, default=60.0, help="at least 1s (default 60s)")
    parser.add_argument("--seconds", type=float, default=None, help="window from spawn (default 3 intervals + 30 s)")
    parser.add_argument("--lease-ttl", type=parse_duration, default=None, help="default: syncd's (30s)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"PostgreSQL server (default {DEFAULT_URL})")
    args = parser.parse_args()
    if args.interval < 1.0 or args.instances < 1 or args.syncs < 1:
        parser.error("--interval must be at least 1s, --instances and --syncs at least 1")
    if args.seconds is None:
        args.seconds = 3 * args.interval + 30.0
    sys.exit(asyncio.run(main(args)))
