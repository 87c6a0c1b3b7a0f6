"""The 100k-record poll on PostgreSQL against the same poll on SQLite, in one run.

    python bench/postgres.py [--records N] [--rounds R] [--repeat K] [--url URL]
    # defaults: 100000 records, 3 rounds, 4 runs of each kind per round,
    #           postgresql://postgres@127.0.0.1:5432/test (or $SYNCD_BENCH_PG_URL)

The API of bench/engine.py runs in a child process (N records of ~300 B; /v2 differs from /v1 in
1% of them). syncd's real engine (`syncd.engine.poll`, a `Source` on `poll_session()`) polls it into
two stores opened in this process: a `SqliteStore` on a temp file and a `PostgresStore` on a schema
of its own (created for the run, `?search_path=` in the URL, dropped at the end). The PostgreSQL
store holds the sync's lease, so its commits are fenced as in `syncd run`.

Each round uses a fresh sync and runs, each step on both backends back to back (the order flips
every step, so both see the same neighbours):

  initial        1 run   (every record new: N events queued)
  unchanged      K runs  (the same bytes again: the body-hash short cut, one record_run)
  1% changed     K runs  alternating /v2, /v1, ... (warm fingerprint cache, as in a running daemon)
  1% cold        2 runs  the same, each through a newly opened store (what an instance that just
                         took the sync over, or just started, does: it loads N fingerprints first)

After each initial run, and at the end of each round, the outbox is emptied outside the timing,
as delivery would; the round's records are deleted at its end.

Reported: per kind of run, the median wall time on each backend and PostgreSQL / SQLite (the ratio
of the medians, and the median of the per-step ratios); the store methods' time (thin wrappers put
around them at run time, as bench/engine.py does; nothing in syncd is edited) -- loading the stored
fingerprints (cold), `commit_run` and `record_run`; each SQL statement's time inside them; and CPU
per run: this process (user + system, threads included: SQLite works in aiosqlite's thread) and the
PostgreSQL server processes serving the store's connections (from /proc, found in
pg_stat_activity by application_name).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import resource
import secrets
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).parent))

from engine import changed_indices, fail, start_server, stop_server, write_definition  # noqa: E402

DEFAULT_URL = os.environ.get("SYNCD_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgres")
KINDS = ("initial", "unchanged", "1% changed", "1% cold")
COLD_RUNS = 2

# -- timing wrappers (in memory only) ------------------------------------------------------------

#: What the current run spent in store methods and in SQL statements, filled by the wrappers.
STAGES: dict[str, float] = defaultdict(float)
SQL: dict[str, float] = defaultdict(float)
_in_store: list[str] = []  # the store method under way (SQL is charged to it)


def _wrap_method(owner, name: str, label: str) -> None:
    func = getattr(owner, name)

    @functools.wraps(func)
    async def wrapper(*args, **kwargs):
        _in_store.append(label)
        t0 = time.perf_counter()
        try:
            return await func(*args, **kwargs)
        finally:
            STAGES[label] += time.perf_counter() - t0
            _in_store.pop()
    setattr(owner, name, wrapper)


def _sql_label(sql: str) -> str:
    words = sql.split()
    if words and words[0].upper() == "WITH":  # name the statement, not its CTE
        for i, w in enumerate(words):
            if w.upper() in ("UPDATE", "DELETE", "INSERT") and i > 2:
                words = words[i:]
                break
    return " ".join(words[:4])[:44]


def _wrap_sql(owner, name: str, backend: str, label=None) -> None:
    func = getattr(owner, name)

    @functools.wraps(func)
    async def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return await func(self, *args, **kwargs)
        finally:
            if _in_store:
                text = label(args) if label else _sql_label(args[0])
                SQL[f"{_in_store[-1]}|{backend}|{text}"] += time.perf_counter() - t0
    setattr(owner, name, wrapper)


def instrument() -> None:
    import aiosqlite
    import asyncpg.connection

    from syncd.store import SqliteStore
    from syncd.store.postgres import PostgresStore

    for cls in (SqliteStore, PostgresStore):
        for name in ("sync_state", "fingerprints", "commit_run", "record_run"):
            _wrap_method(cls, name, name)
    for name in ("execute", "executemany", "execute_fetchall"):
        _wrap_sql(aiosqlite.Connection, name, "sqlite")
    for name in ("execute", "executemany", "fetch", "fetchval", "fetchrow"):
        _wrap_sql(asyncpg.connection.Connection, name, "postgres")
    _wrap_sql(asyncpg.connection.Connection, "copy_records_to_table", "postgres", label=lambda a: f"COPY {a[0]}")


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process, from /proc (Linux); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_params(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


class Backends:
    """PostgreSQL backends serving a given application_name, and their CPU (from /proc)."""

    def __init__(self, admin, app: str) -> None:
        self.admin, self.app = admin, app

    async def snapshot(self) -> dict[int, float]:
        rows = await self.admin.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1", self.app)
        return {r[0]: cpu for r in rows if (cpu := proc_cpu(r[0])) is not None}

    @staticmethod
    def spent(before: dict[int, float], after: dict[int, float]) -> float:
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


class Sample:
    __slots__ = ("seconds", "stages", "sql", "cpu", "server_cpu")

    def __init__(self, seconds, stages, sql, cpu, server_cpu) -> None:
        self.seconds, self.stages, self.sql, self.cpu, self.server_cpu = seconds, stages, sql, cpu, server_cpu


# -- the run ---------------------------------------------------------------------------------------


async def bench(args, tmp: Path, port: int, url: str, schema: str) -> dict:
    import asyncpg

    from syncd.config import load_dir
    from syncd.engine import poll
    from syncd.http import poll_session
    from syncd.settings import load_settings
    from syncd.source.fetcher import Source
    from syncd.store import SqliteStore
    from syncd.store.postgres import PostgresStore

    n, k, rounds = args.records, args.repeat, args.rounds
    n_changed = len(changed_indices(n))
    conf_dir = tmp / "conf.d"
    conf_dir.mkdir()
    db_path = tmp / "state" / "state.db"
    db_path.parent.mkdir()
    settings = load_settings({"config_dir": conf_dir, "state_path": db_path})
    names = [f"bench{r}" for r in range(rounds)]
    syncs = {}
    for version in ("v1", "v2"):
        for name in names:
            write_definition(conf_dir, port, f"/{version}", name=name)
        loaded, problems = load_dir(settings)
        if problems:
            fail("; ".join(map(str, problems)))
        for name in names:
            syncs[version, name] = loaded[name]
    instrument()

    app = f"syncd-bench-{schema}"
    pg_url = with_params(url, application_name=app)
    admin = await asyncpg.connect(with_params(url, search_path=schema))
    backends = Backends(admin, app)
    out: dict = {"samples": {(b, kind): [] for b in BACKENDS for kind in KINDS}, "pairs": defaultdict(list),
                 "server_version": admin.get_server_version()}
    stores = {
        "sqlite": await SqliteStore.open(db_path),
        "postgres": await PostgresStore.open(pg_url, instance_id="bench", lease_ttl=600.0),
    }
    stores["postgres"].start_leasing()

    async def open_cold(backend: str):
        if backend == "sqlite":
            return await SqliteStore.open(db_path)
        return await PostgresStore.open(pg_url, instance_id=f"bench-cold-{secrets.token_hex(3)}", lease_ttl=600.0)

    async def empty_outbox() -> None:
        await stores["sqlite"]._conn.execute("DELETE FROM outbox")
        await admin.execute("DELETE FROM outbox")

    try:
        async with poll_session() as session:
            source = Source(session, max_bytes=int(settings.max_response_bytes))

            async def run(backend: str, store, version: str, name: str, kind: str) -> Sample:
                gc.collect()
                STAGES.clear()
                SQL.clear()
                server0 = await backends.snapshot() if backend == "postgres" else {}
                cpu0 = self_cpu()
                t0 = time.perf_counter()
                result = await poll(syncs[version, name], store, source)
                elapsed = time.perf_counter() - t0
                cpu = self_cpu() - cpu0
                server = Backends.spent(server0, await backends.snapshot()) if backend == "postgres" else 0.0
                if not result.ok:
                    fail(f"{backend} {kind} run on /{version}: {result.error}")
                if kind == "initial":
                    ok = result.new == n and not result.modified and not result.deleted
                elif kind == "unchanged":
                    ok = result.outcome == "unchanged" and not result.events
                else:
                    ok = (result.modified, result.new, result.deleted) == (n_changed, 0, 0)
                if not ok:
                    fail(f"{backend} {kind} run: outcome={result.outcome} new={result.new} modified={result.modified} "
                         f"deleted={result.deleted}")
                sample = Sample(elapsed, dict(STAGES), dict(SQL), cpu, server)
                out["samples"][backend, kind].append(sample)
                return sample

            step = 0

            async def both(version: str, name: str, kind: str, cold: bool = False) -> None:
                nonlocal step
                order = BACKENDS if step % 2 == 0 else BACKENDS[::-1]
                step += 1
                times = {}
                for backend in order:
                    store = await open_cold(backend) if cold else stores[backend]
                    try:
                        times[backend] = (await run(backend, store, version, name, kind)).seconds
                    finally:
                        if cold:
                            await store.close()
                out["pairs"][kind].append(times["postgres"] / times["sqlite"])

            for r, name in enumerate(names):
                await stores["postgres"].lease_tick({name})
                print(f"  round {r + 1}/{rounds} ...", file=sys.stderr, flush=True)
                await both("v1", name, "initial")
                await empty_outbox()
                for _ in range(k):
                    await both("v1", name, "unchanged")
                version = "v1"
                for i in range(k + COLD_RUNS):
                    version = "v2" if version == "v1" else "v1"
                    await both(version, name, "1% changed" if i < k else "1% cold", cold=i >= k)
                await empty_outbox()
                await stores["sqlite"]._conn.execute("DELETE FROM records")
                await admin.execute("DELETE FROM records")
        out["sizes"] = {
            "sqlite": sum(p.stat().st_size for p in db_path.parent.iterdir()) / 2**20,
            "postgres": await admin.fetchval("SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                                             "JOIN pg_namespace s ON s.oid = c.relnamespace "
                                             "WHERE s.nspname = $1 AND c.relkind = 'r'", schema) / 2**20,
        }
    finally:
        for store in stores.values():
            await store.close()
        await admin.close()
    out["body_bytes"] = (tmp / "v1.json").stat().st_size
    out["n_changed"] = n_changed
    return out


# -- report ----------------------------------------------------------------------------------------


def med(values) -> float:
    values = list(values)
    return statistics.median(values) if values else 0.0


def report(args, out: dict) -> None:
    samples, pairs = out["samples"], out["pairs"]
    n = args.records
    v = out["server_version"]
    print(f"syncd poll, PostgreSQL vs SQLite: {n:,} records, {out['body_bytes'] / 2**20:.1f} MiB body "
          f"({out['body_bytes'] / n:.0f} B/record), {out['n_changed']:,} changed per delta; {args.rounds} rounds x "
          f"{args.repeat} runs; {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, PostgreSQL {v.major}.{v.micro if v.major >= 10 else v.minor}")
    print()
    print(f"  {'run (median)':<24}{'runs':>5}{'SQLite':>11}{'PostgreSQL':>12}{'PG/SQLite':>11}{'pairwise':>10}"
          f"{'CPU here S / P':>18}{'PG server':>11}")
    for kind in KINDS:
        s, p = samples["sqlite", kind], samples["postgres", kind]
        ts, tp = med(x.seconds for x in s), med(x.seconds for x in p)
        print(f"  {kind:<24}{len(s):>5}{ts * 1000:>9.1f}ms{tp * 1000:>10.1f}ms{tp / ts:>10.2f}x"
              f"{med(pairs[kind]):>9.2f}x{med(x.cpu for x in s) * 1000:>9.0f} /{med(x.cpu for x in p) * 1000:>5.0f}ms"
              f"{med(x.server_cpu for x in p) * 1000:>9.0f}ms")
    print("  (pairwise: median of PG/SQLite over the steps, each pair run back to back; CPU here: this process,\n"
          "   user+system, threads included; PG server: the backends serving the store's connections)")
    print()
    rows = [
        ("fingerprints: load N (cold)", "fingerprints", "1% cold"),
        ("fingerprints (warm cache)", "fingerprints", "1% changed"),
        ("commit_run, initial", "commit_run", "initial"),
        ("commit_run, 1% changed", "commit_run", "1% changed"),
        ("record_run, unchanged", "record_run", "unchanged"),
        ("sync_state, unchanged", "sync_state", "unchanged"),
    ]
    print(f"  {'store method (median ms)':<34}{'SQLite':>10}{'PostgreSQL':>12}{'PG/SQLite':>11}")
    for label, stage, kind in rows:
        a = med(x.stages.get(stage, 0.0) for x in samples["sqlite", kind])
        b = med(x.stages.get(stage, 0.0) for x in samples["postgres", kind])
        print(f"    {label:<32}{a * 1000:>10.1f}{b * 1000:>12.1f}{(b / a if a else 0):>10.2f}x")
    for kind in ("initial", "1% changed"):
        for backend in BACKENDS:
            total = med(x.seconds for x in samples[backend, kind])
            store = med(sum(x.stages.values()) for x in samples[backend, kind])
            print(f"    {'rest of the run (' + kind + ', ' + backend + ')':<44}{(total - store) * 1000:>10.1f}  "
                  f"(fetch, parse, diff, envelopes: backend-independent)")
    print()
    print("  SQL statements inside commit_run / fingerprints (median ms per run):")
    for kind, stage in (("initial", "commit_run"), ("1% changed", "commit_run"), ("1% cold", "fingerprints")):
        for backend in BACKENDS:
            runs = samples[backend, kind]
            keys = sorted({key for x in runs for key in x.sql if key.startswith(f"{stage}|{backend}|")})
            rows = [(key.split("|", 2)[2], med(x.sql.get(key, 0.0) for x in runs)) for key in keys]
            rows = [r for r in rows if r[1] >= 0.0005]
            rows.sort(key=lambda r: -r[1])
            text = ", ".join(f"{sql} {t * 1000:.1f}" for sql, t in rows[:6])
            print(f"    {kind + ' ' + backend:<22}{text}")
    print()
    sizes = out["sizes"]
    print(f"  on disk at the end (rows deleted, space not reclaimed): SQLite file + WAL {sizes['sqlite']:.1f} MiB, "
          f"PostgreSQL tables + indexes {sizes['postgres']:.1f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="records per body (default 100000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each with a fresh sync and one initial run (default 3)")
    parser.add_argument("--repeat", type=int, default=4, help="unchanged and 1%%-changed runs per round (default 4)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"PostgreSQL server (default {DEFAULT_URL})")
    args = parser.parse_args()
    if args.records < 100 or args.repeat < 1 or args.rounds < 1:
        parser.error("--records must be >= 100, --repeat and --rounds >= 1")

    import asyncpg

    from syncd.logs import configure

    configure("json", "warning", stream=sys.stderr)
    schema = f"syncd_bench_{os.getpid()}_{secrets.token_hex(3)}"

    async def admin(statement: str) -> None:
        conn = await asyncpg.connect(args.url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(admin(f"CREATE SCHEMA {schema}"))
    try:
        with tempfile.TemporaryDirectory(prefix="syncd-bench-") as tmp_name:
            tmp = Path(tmp_name)
            proc, port = start_server(tmp, args.records)
            try:
                out = asyncio.run(bench(args, tmp, port, with_params(args.url, search_path=schema), schema))
            finally:
                stop_server(proc)
    finally:
        asyncio.run(admin(f"DROP SCHEMA {schema} CASCADE"))
    report(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
