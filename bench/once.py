"""`syncd once` as a whole process, against the bare compute pipeline as a whole process.

    python bench/once.py [--records N] [--runs K] [--variants] [--profile FILE] [--no-breakdown]
                         [--syncd-root DIR] [--max-response-bytes SIZE]

The API is bench/engine.py's, in a process of its own on 127.0.0.1 (outside every measurement): it
builds the two bodies with engine.make_bodies(N) (N records of ~320 bytes; /v2 differs from /v1 in
1% of them, one field each), writes them to the temp dir, and serves them as /v1 and /v2.

syncd: a definition in a temp conf.d (list_identifier "$.response.payload.employees",
record_identifier "$.employee.id", path /v1 or /v2, rewritten between runs) and a temp state
database. Each measured run is a fresh process:

    python -m syncd once bench --config-dir DIR --state-path DB --log-level error   (stdout: /dev/null)

with SYNCD_* variables removed from its environment, SYNCD_SETTINGS_FILE pointing to an empty file
(no /etc/syncd/syncd.toml), PYTHONPATH set to the measured checkout, and byte-compiled modules as
after a pip install (PYTHONDONTWRITEBYTECODE dropped, PYTHONPYCACHEPREFIX in the temp dir, so nothing
is written into the checkout; the warm-up runs fill it). Each repetition starts from a fresh database:

    initial      /v1 into the fresh database (N record.new events queued)
    1% changed   /v2, then /v1 (each modifies 1% of the records): 2 per repetition
    unchanged    /v1 again (byte-identical: the body-hash short cut): 2 per repetition

Every run is checked afterwards in the database (exit status, then the run row: outcome, new,
modified, deleted). Wall time is from just before the spawn to the child's exit (os.wait4), so it
includes interpreter start-up, imports and interpreter shutdown; peak RSS is that child's ru_maxrss;
CPU is its user + system time (the aiosqlite and to_thread workers included). The children are
spawned (posix_spawn) by a small launcher process (python -S), not by this one: on Linux a child's
ru_maxrss includes the RSS high-water mark of the process it was forked from (exec folds the old
memory map's into it), and this one parses the bodies; `python -c pass` shows the floor (~11 MiB).

Baseline, a whole process too (a script written to the temp dir, run with the same interpreter), on
the same bytes and the same v2, v1, ... alternation, 2 per repetition interleaved with syncd's
1%-changed runs:

    gc.disable(); import orjson, xxhash, marshal
    previous = marshal.load(<fingerprints of the other body, precomputed; ints -> 16-byte digests>)
    body = <read the body file>                     (no HTTP: the bytes come from the page cache)
    document = orjson.loads(body)
    for record in document["response"]["payload"]["employees"]:
        fingerprints[record["employee"]["id"]] = xxh3_128_digest(orjson.dumps(record, option=OPT_SORT_KEYS))
    new / modified / deleted by dict look-ups against `previous`; print the three counts
    (normal interpreter exit, which frees everything)

It is bench/engine.py's `baseline()` (ids kept as the ints the JSON holds), plus its own interpreter
start, imports and exit; it writes nothing (syncd also commits to SQLite and queues 1,000 events).
The targets of the issue compare syncd with this one figure (the 1%-changed pipeline):

    1% changed  wall <= 2.0 x baseline, peak RSS <= 250 MiB (ru_maxrss / 1024)
    unchanged   wall <= 1.0 x baseline
    initial     wall <= 3.0 x baseline
    N = 1M      works with the default settings; 1%-changed peak RSS <= 1 GiB; time linear in N
                (compare the per-record figures of a 100k and a 1M report)

Also printed, each a whole process (median of K): `python -c pass` (interpreter floor) and the
import of the modules `syncd once` loads.

Breakdown (unless --no-breakdown), after the repetitions: 3 more initial runs (each into a fresh
database) and 3 more 1%-changed runs, each in a process started through a small wrapper that
imports what `once` imports (timed), wraps syncd's stages and aiosqlite's execute/executemany with
timers in memory (nothing in syncd is edited), runs syncd.cli.main([...]) and records timestamps,
also when syncd leaves through os._exit. Interpreter start-up is the spawn to the wrapper's first
line; shutdown is main() returning (or os._exit) to the process's exit. Stage times are medians of
the 3; 'peak' is the process's ru_maxrss when the stage last returned, i.e. where the peak is
reached. Then the import time by top-level package (python -X importtime, self times summed; the
tool inflates them, so the shares matter more).

--variants: whole-process 1%-changed runs (K each, interleaved) of what-ifs done from a `python -c`
wrapper around syncd.cli.main, nothing in syncd edited: gc.disable() first; gc.freeze() after the
imports; os._exit() after main() returns (stdout/stderr flushed); gc.disable() + os._exit(). (Since
e42e45a `syncd once` does both itself, so these show no gain there; run them against an older
export with --syncd-root to see what they were worth.)

--profile FILE: one more 1%-changed run under cProfile (the engine's worker-thread calls merged
in), written to FILE and its top functions printed.

--syncd-root DIR: measure DIR/syncd instead of this checkout's, e.g. a `git archive REV syncd | tar
-x -C DIR` export (other work in the tree then cannot change the code halfway through a run).
"""

from __future__ import annotations

import argparse
import json
import marshal
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import orjson
from xxhash import xxh3_128_digest

from engine import ID_PATH, LIST_PATH, SYNC_ID, changed_indices, fail, start_server, stop_server

ROOT = Path(__file__).resolve().parent.parent  # the checkout: `-m syncd` runs its syncd/
TARGETS = {"1% changed": 2.0, "unchanged": 1.0, "initial": 3.0}  # syncd wall / baseline wall, at most
TARGET_RSS_MIB = 250.0  # 1% changed, 100k records
TARGET_RSS_1M_MIB = 1024.0  # 1% changed, 1M records
CHANGED_PER_REP = 2
UNCHANGED_PER_REP = 2
BREAKDOWN_RUNS = 3

#: What `syncd once` imports (cli at start-up, the rest inside cmd_once/_once).
ONCE_MODULES = ("syncd.cli", "syncd.settings", "syncd.logs", "syncd.config", "syncd.engine", "syncd.http",
                "syncd.source.fetcher", "syncd.store")

BASELINE_SRC = '''\
import gc
gc.disable()
import marshal
import sys

import orjson
from xxhash import xxh3_128_digest


def main(body_path, previous_path):
    with open(previous_path, "rb") as f:
        previous = marshal.load(f)
    with open(body_path, "rb") as f:
        body = f.read()
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
    print(len(fingerprints), len(new), len(modified), len(deleted))


main(*sys.argv[1:])
'''

#: The breakdown wrapper: argv = OUT_JSON, then syncd's arguments.
BREAKDOWN_SRC = '''\
import time
_T = time.monotonic
T_START = _T()
import gc
import os
import resource
import sys
import threading

OUT, ARGV = sys.argv[1], sys.argv[2:]
marks = {"start": T_START}
gc_time = [0.0, 0, 0]  # seconds, collections, full collections
_gc_t0 = [0.0]


def _gc_cb(phase, info):
    if phase == "start":
        _gc_t0[0] = _T()
    else:
        gc_time[0] += _T() - _gc_t0[0]
        gc_time[1] += 1
        gc_time[2] += info["generation"] == 2


gc.callbacks.append(_gc_cb)
T_IMPORT = _T()
import syncd.cli
marks["import syncd.cli"] = _T()
MODULES
marks["imports"] = _T()
gc_imports = list(gc_time)
modules_before = set(sys.modules)

PAGE = os.sysconf("SC_PAGE_SIZE")
stages = {}  # label -> [seconds, calls, rss_mib_after, maxrss_mib_after]
lock = threading.Lock()


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def _note(label, dt):
    rss, peak = _rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with lock:
        s = stages.setdefault(label, [0.0, 0, 0.0, 0.0])
        s[0] += dt
        s[1] += 1
        s[2], s[3] = rss, peak


def timed(owner, name, label):
    import functools
    import inspect

    func = getattr(owner, name, None)
    if func is None:  # a stage that the measured syncd does not have (an older export)
        return
    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def wrapper(*args, **kwargs):
            t0 = _T()
            try:
                return await func(*args, **kwargs)
            finally:
                _note(label, _T() - t0)
    else:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            t0 = _T()
            try:
                return func(*args, **kwargs)
            finally:
                _note(label, _T() - t0)
    setattr(owner, name, wrapper)


import syncd.cli as cli
import syncd.config as config
import syncd.diff as diff
import syncd.engine as engine
import syncd.logs as logs
from syncd.source.fetcher import Fetch
from syncd.store import Store

STAGES


def _sql_timers():
    """Each SQL statement's time, by its first words (what a commit is made of)."""
    import aiosqlite

    def label(sql):
        return "sql: " + " ".join(sql.split()[:4])[:40]

    for name in ("execute", "executemany", "execute_fetchall"):
        func = getattr(aiosqlite.Connection, name)

        def make(func):
            async def wrapper(self, sql, *args, **kwargs):
                t0 = _T()
                try:
                    return await func(self, sql, *args, **kwargs)
                finally:
                    _note(label(sql), _T() - t0)
            return wrapper
        setattr(aiosqlite.Connection, name, make(func))


_sql_timers()
t_main = _T()
marks["main start"] = t_main
import json
_real_exit = os._exit


def _dump(rc):
    if "main end" in marks:
        return
    marks["main end"] = _T()
    with open(OUT, "w") as f:
        json.dump({"marks": marks, "stages": stages, "gc": gc_time, "gc_imports": gc_imports, "rc": rc,
                   "modules_in_main": sorted(set(sys.modules) - modules_before), "syncd": syncd.cli.__file__,
                   "os_exit": _exit_called[0],
                   "rss_end": _rss(), "maxrss_end": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)


_exit_called = [False]


def _exit_hook(code):  # syncd may leave through os._exit (skipping the interpreter's teardown)
    _exit_called[0] = True
    _dump(code)
    _real_exit(code)


os._exit = _exit_hook
rc = cli.main(ARGV)
_dump(rc)
sys.exit(rc)
'''

#: (owner expression, attribute, label), in pipeline order; evaluated inside the wrapper.
BREAKDOWN_STAGES = [
    ("cli", "_load_settings", "settings (pydantic, env, file)"),
    ("logs", "configure", "logs.configure (structlog)"),
    ("config", "load_dir", "config.load_dir"),
    ("cli", "_open_store", "Store.open (connect, WAL, migrate)"),
    ("Store", "sync_state", "Store.sync_state"),
    ("Fetch", "_exchange", "fetch (HTTP GET, body read)"),
    ("engine", "split_list", "split_list (msgspec: raw items)"),
    ("engine", "may_need_exact", "may_need_exact (scan)"),
    ("diff.SnapshotBuilder", "add_raw", "SnapshotBuilder.add_raw (parse+fp each)"),
    ("engine", "parse_document", "parse (scan + orjson.loads)"),
    ("diff.SnapshotBuilder", "add", "SnapshotBuilder.add (extract+fp)"),
    ("diff.SnapshotBuilder", "finish", "SnapshotBuilder.finish"),
    ("engine", "_extract", "  _extract (parse+add+finish+hint)"),
    ("Store", "fingerprints", "Store.fingerprints (load old)"),
    ("engine", "_plan", "_plan (diff)"),
    ("engine", "_build", "_build (envelopes)"),
    ("Store", "commit_run", "Store.commit_run"),
    ("Store", "close", "Store.close (checkpoint)"),
    ("engine", "poll", "  poll (total)"),
]

#: The profile wrapper: argv = OUT_PROF, then syncd's arguments. cProfile sees only the thread it is
#: enabled in, so the engine's worker-thread calls (_extract, _plan, _build) get a profile each,
#: merged into the main one when the process leaves (through os._exit too).
PROFILE_SRC = '''\
import cProfile
import functools
import os
import pstats
import sys
import threading

OUT, ARGV = sys.argv[1], sys.argv[2:]
main_profile = cProfile.Profile()
threads = []
_real_exit = os._exit


def _dump():
    main_profile.disable()
    stats = pstats.Stats(main_profile)
    for p in threads:
        stats.add(p)
    stats.dump_stats(OUT)


def _exit_hook(code):
    _dump()
    _real_exit(code)


os._exit = _exit_hook
main_profile.enable()
import syncd.cli
import syncd.engine


def _wrap(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            return func(*args, **kwargs)
        p = cProfile.Profile()
        p.enable()
        try:
            return func(*args, **kwargs)
        finally:
            p.disable()
            threads.append(p)
    return wrapper


for _name in ("_extract", "_plan", "_build"):
    setattr(syncd.engine, _name, _wrap(getattr(syncd.engine, _name)))
rc = syncd.cli.main(ARGV)
_dump()
sys.exit(rc)
'''

VARIANTS = {
    "-m syncd (as measured)": None,
    "gc.disable() first": "import gc; gc.disable(); import sys; from syncd.cli import main; sys.exit(main(sys.argv[1:]))",
    "gc.freeze() after imports": "import gc, sys; from syncd.cli import main; import syncd.engine, syncd.store, "
                                 "syncd.config, syncd.http; gc.freeze(); sys.exit(main(sys.argv[1:]))",
    "os._exit() after main": "import os, sys; from syncd.cli import main; rc = main(sys.argv[1:]); "
                             "sys.stdout.flush(); sys.stderr.flush(); os._exit(rc)",
    "gc.disable() + os._exit()": "import gc; gc.disable(); import os, sys; from syncd.cli import main; "
                                 "rc = main(sys.argv[1:]); sys.stdout.flush(); sys.stderr.flush(); os._exit(rc)",
}


#: The launcher (python -S -c): one JSON request a line on stdin, one JSON result a line on stdout.
#: time.monotonic is CLOCK_MONOTONIC, the same clock in every process (the breakdown relies on it).
LAUNCHER_SRC = '''\
import json, os, sys, time
for line in sys.stdin:
    r = json.loads(line)
    os.chdir(r["cwd"])
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, r["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
               (os.POSIX_SPAWN_OPEN, 2, r["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)]
    t0 = time.monotonic()
    pid = os.posix_spawn(r["argv"][0], r["argv"], r["env"], file_actions=actions)
    _, status, ru = os.wait4(pid, 0)
    t_exit = time.monotonic()
    sys.stdout.write(json.dumps({"t0": t0, "t_exit": t_exit, "rc": os.waitstatus_to_exitcode(status),
                                 "maxrss": ru.ru_maxrss, "cpu": ru.ru_utime + ru.ru_stime}) + "\\n")
    sys.stdout.flush()
'''


class Sample:
    __slots__ = ("wall", "rss", "cpu", "t0", "t_exit")

    def __init__(self, wall: float, rss: float, cpu: float, t0: float, t_exit: float) -> None:
        self.wall, self.rss, self.cpu, self.t0, self.t_exit = wall, rss, cpu, t0, t_exit


class Child:
    """Runs whole processes and measures them with os.wait4."""

    def __init__(self, tmp: Path, root: Path) -> None:
        self.tmp = tmp
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
        settings_file = tmp / "settings.toml"
        settings_file.write_text("")
        self.env["SYNCD_SETTINGS_FILE"] = str(settings_file)
        self.env["PYTHONPATH"] = str(root)  # its syncd/ before the installed (editable) one
        # Byte-compiled modules, as after a pip install, without writing into the checkout: every
        # child reads and writes .pyc files under a temp prefix (filled by the warm-up runs).
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
        #: The caller's environment as is (for the row that shows what a missing .pyc costs).
        self.env_as_is = {**self.env, "PYTHONPYCACHEPREFIX": os.environ.get("PYTHONPYCACHEPREFIX", "")}
        if "PYTHONDONTWRITEBYTECODE" in os.environ:
            self.env_as_is["PYTHONDONTWRITEBYTECODE"] = os.environ["PYTHONDONTWRITEBYTECODE"]
        if not self.env_as_is["PYTHONPYCACHEPREFIX"]:
            del self.env_as_is["PYTHONPYCACHEPREFIX"]
        self.root = root

    def start(self) -> None:
        # A process of its own, started small (-S: no site-packages), does the fork/exec and wait4:
        # on Linux a child's ru_maxrss counts the RSS high-water mark of the memory it was forked
        # from (exec folds the old mm's into it), so children of this process would all show at
        # least its own peak (the bodies it parsed, aiohttp, ...).
        self.launcher = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER_SRC], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, cwd=self.root)

    def stop(self) -> None:
        self.launcher.stdin.close()
        self.launcher.wait()
        self.launcher.stdout.close()

    def run(self, argv: list[str], what: str, *, stdout: Path | None = None, check: bool = True,
            env: dict | None = None) -> tuple[Sample, int, str]:
        err = self.tmp / "stderr.txt"
        request = {"argv": argv, "env": env or self.env, "cwd": str(self.root),
                   "stdout": str(stdout) if stdout else os.devnull, "stderr": str(err)}
        self.launcher.stdin.write(orjson.dumps(request) + b"\n")
        self.launcher.stdin.flush()
        line = self.launcher.stdout.readline()
        if not line:
            fail(f"{what}: the launcher process died")
        r = orjson.loads(line)
        stderr = err.read_text("utf-8", "replace")
        if check and r["rc"] != 0:
            fail(f"{what}: exit status {r['rc']}: {stderr.strip()[-2000:]}")
        return Sample(r["t_exit"] - r["t0"], r["maxrss"] / 1024, r["cpu"], r["t0"], r["t_exit"]), r["rc"], stderr


class Bench:
    def __init__(self, args, tmp: Path, port: int) -> None:
        self.args, self.tmp, self.port = args, tmp, port
        self.n = args.records
        self.n_changed = len(changed_indices(self.n))
        self.conf_dir = tmp / "conf.d"
        self.conf_dir.mkdir()
        (tmp / "state").mkdir()
        self.child = Child(tmp, Path(args.syncd_root).resolve())
        self.child.start()
        self.extra: list[str] = []
        if args.max_response_bytes:
            self.extra = ["--max-response-bytes", args.max_response_bytes]
        self.default_settings_problem: str | None = None
        self.samples: dict[str, list[Sample]] = defaultdict(list)
        self.db: Path | None = None
        self.version = "v1"  # what the database holds
        self.db_mib: float | None = None

    # -- syncd ------------------------------------------------------------------------------------

    def write_definition(self, version: str) -> None:
        (self.conf_dir / f"{SYNC_ID}.toml").write_text(
            'webhook_url = "http://127.0.0.1:9/hook"\n'
            f'list_identifier = "{LIST_PATH}"\n'
            f'record_identifier = "{ID_PATH}"\n'
            "\n[api_details]\n"
            f'base_url = "http://127.0.0.1:{self.port}"\n'
            f'path = "/{version}"\n')

    def once_args(self, *extra: str) -> list[str]:
        return ["once", SYNC_ID, "--config-dir", str(self.conf_dir), "--state-path", str(self.db),
                "--log-level", "error", *self.extra, *extra]

    def last_run(self) -> tuple:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT outcome, sync_type, new, modified, deleted, records, error FROM runs "
                                "WHERE sync_id = ? ORDER BY seq DESC LIMIT 1", (SYNC_ID,)).fetchone()
        finally:
            conn.close()

    def check(self, kind: str, version: str) -> None:
        outcome, sync_type, new, modified, deleted, records, error = self.last_run()
        what = f"{kind} run on /{version}"
        if outcome == "failed":
            fail(f"{what}: {error}")
        if records != self.n:
            fail(f"{what}: {records} records, expected {self.n}")
        if kind == "initial":
            ok = (new, modified, deleted, sync_type) == (self.n, 0, 0, "initial_sync")
        elif kind == "unchanged":
            ok = outcome == "unchanged" and (new, modified, deleted) == (0, 0, 0)
        else:
            ok = (new, modified, deleted) == (0, self.n_changed, 0)
        if not ok:
            fail(f"{what}: outcome={outcome} new={new} modified={modified} deleted={deleted}")

    def syncd(self, kind: str, version: str, prefix: list[str] | None = None, label: str | None = None,
              extra: tuple[str, ...] = ()) -> Sample:
        self.write_definition(version)
        argv = (prefix or [sys.executable, "-m", "syncd"]) + self.once_args(*extra)
        sample, _, stderr = self.child.run(argv, f"syncd {kind} on /{version}")
        if stderr.strip():
            fail(f"syncd {kind} on /{version} wrote to stderr: {stderr.strip()[-2000:]}")
        self.check(kind, version)
        self.version = version
        self.samples[label or kind].append(sample)
        return sample

    def fresh_db(self, name: str) -> None:
        self.drop_db()
        self.db = self.tmp / "state" / f"{name}.db"
        self.version = None

    def drop_db(self) -> None:
        if self.db is not None:
            for p in self.db.parent.glob(self.db.name + "*"):
                p.unlink()

    def flip(self) -> str:
        return "v2" if self.version == "v1" else "v1"

    # -- baseline ---------------------------------------------------------------------------------

    def prepare_baseline(self) -> None:
        """The baseline script, and each body's fingerprints (what the other body is diffed against)."""
        self.baseline_script = self.tmp / "once_baseline.py"
        self.baseline_script.write_text(BASELINE_SRC)
        for version in ("v1", "v2"):
            document = orjson.loads((self.tmp / f"{version}.json").read_bytes())
            fps = {r["employee"]["id"]: xxh3_128_digest(orjson.dumps(r, option=orjson.OPT_SORT_KEYS))
                   for r in document["response"]["payload"]["employees"]}
            del document
            with open(self.tmp / f"fp-{version}.marshal", "wb") as f:
                marshal.dump(fps, f)
            del fps

    def baseline(self, version: str, label: str = "baseline") -> Sample:
        other = "v1" if version == "v2" else "v2"
        argv = [sys.executable, str(self.baseline_script), str(self.tmp / f"{version}.json"),
                str(self.tmp / f"fp-{other}.marshal")]
        out = self.tmp / "stdout.txt"
        sample, _, stderr = self.child.run(argv, f"baseline on /{version}", stdout=out)
        counts = out.read_bytes().split()
        if [int(c) for c in counts] != [self.n, 0, self.n_changed, 0]:
            fail(f"baseline on /{version}: records, new, modified, deleted = {counts}")
        self.samples[label].append(sample)
        return sample

    # -- the runs ---------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Byte-compile and page-cache everything once; find out whether the default settings take the body."""
        out = self.tmp / "stdout.txt"
        self.child.run([sys.executable, "-c", "import syncd; print(syncd.__file__)"], "which syncd", stdout=out)
        self.syncd_file = out.read_text().strip()
        if not Path(self.syncd_file).resolve().is_relative_to(self.child.root):
            fail(f"the children import {self.syncd_file}, not the syncd under {self.child.root}")
        self.fresh_db("warm-up")
        self.write_definition("v1")
        argv = [sys.executable, "-m", "syncd"] + self.once_args()
        _, rc, stderr = self.child.run(argv, "warm-up", check=False)
        if rc != 0:
            if self.extra or "max_response_bytes" not in stderr and "too large" not in stderr.lower():
                fail(f"warm-up run: exit status {rc}: {stderr.strip()[-2000:]}")
            self.default_settings_problem = stderr.strip().splitlines()[-1]
            print(f"  the default settings cannot take this body: {self.default_settings_problem}\n"
                  "  continuing with --max-response-bytes 2GiB", file=sys.stderr, flush=True)
            self.extra = ["--max-response-bytes", "2GiB"]
            self.fresh_db("warm-up-2")
            self.child.run([sys.executable, "-m", "syncd"] + self.once_args(), "warm-up")
        self.version = "v1"
        self.write_definition("v2")
        self.child.run([sys.executable, "-m", "syncd"] + self.once_args(), "warm-up (1% changed)")
        self.baseline("v2", label="warm-up")
        for _ in range(2):
            self.child.run([sys.executable, "-c", "pass"], "python -c pass")
        self.drop_db()

    def repetitions(self) -> None:
        runs = self.args.runs
        imports = "import " + ", ".join(ONCE_MODULES)
        for rep in range(runs):
            self.fresh_db(f"rep-{rep}")
            self.syncd("initial", "v1")
            if rep == 0:
                self.db_mib = sum(p.stat().st_size for p in self.db.parent.glob(self.db.name + "*")) / 2**20
            for i in range(CHANGED_PER_REP):
                version = self.flip()
                # syncd and the baseline on the same body, in alternating order.
                if (rep + i) % 2:
                    self.baseline(version)
                    self.syncd("1% changed", version)
                else:
                    self.syncd("1% changed", version)
                    self.baseline(version)
            for _ in range(UNCHANGED_PER_REP):
                self.syncd("unchanged", self.version)
            self.samples["python -c pass"].append(self.child.run([sys.executable, "-c", "pass"], "python -c pass")[0])
            self.samples["import once's modules"].append(
                self.child.run([sys.executable, "-c", imports], "imports")[0])
            if os.environ.get("PYTHONDONTWRITEBYTECODE"):
                self.samples["import once's modules, env as is"].append(
                    self.child.run([sys.executable, "-c", imports], "imports", env=self.child.env_as_is)[0])
            self.samples["import orjson, xxhash"].append(
                self.child.run([sys.executable, "-c", "import gc, marshal, orjson, xxhash"], "imports")[0])
            print(f"  repetition {rep + 1}/{runs} done", file=sys.stderr, flush=True)

    def variants(self) -> None:
        runs = self.args.runs
        for rep in range(runs):
            names = list(VARIANTS)
            if rep % 2:
                names.reverse()
            for name in names:
                code = VARIANTS[name]
                prefix = [sys.executable, "-m", "syncd"] if code is None else [sys.executable, "-c", code]
                self.syncd("1% changed", self.flip(), prefix=prefix, label="variant: " + name)
            print(f"  variants {rep + 1}/{runs} done", file=sys.stderr, flush=True)

    def breakdown(self) -> dict[str, list[dict]]:
        """BREAKDOWN_RUNS instrumented initial runs (each into a fresh database), then as many
        1%-changed ones (on the last of those databases)."""
        modules = "\n".join(f"import {m}" for m in ONCE_MODULES)
        stages = "\n".join(f"timed({owner}, {name!r}, {label!r})" for owner, name, label in BREAKDOWN_STAGES)
        script = self.tmp / "once_breakdown.py"
        script.write_text(BREAKDOWN_SRC.replace("MODULES", modules).replace("STAGES", stages))
        out: dict[str, list[dict]] = {"1% changed": [], "initial": []}
        for i in range(2 * BREAKDOWN_RUNS):
            kind = "initial" if i < BREAKDOWN_RUNS else "1% changed"
            if kind == "initial":
                self.fresh_db(f"breakdown-{i}")
            path = self.tmp / f"breakdown-{i}.json"
            sample = self.syncd(kind, "v1" if kind == "initial" else self.flip(),
                                prefix=[sys.executable, str(script), str(path)], label="breakdown " + kind)
            data = json.loads(path.read_text())
            data["sample"] = sample
            out[kind].append(data)
        return out

    def profile(self, path: Path) -> None:
        """One 1%-changed run under cProfile (worker-thread calls merged in), written to `path`."""
        script = self.tmp / "once_profile.py"
        script.write_text(PROFILE_SRC)
        self.syncd("1% changed", self.flip(), prefix=[sys.executable, str(script), str(path)], label="cProfile")

    def import_profile(self) -> dict[str, float]:
        """Self import time by top-level package (python -X importtime), in seconds."""
        imports = "import " + ", ".join(ONCE_MODULES)
        _, _, stderr = self.child.run([sys.executable, "-X", "importtime", "-c", imports], "importtime")
        by_pkg: dict[str, float] = defaultdict(float)
        pattern = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")
        for line in stderr.splitlines():
            m = pattern.match(line)
            if m:
                by_pkg[m.group(4).split(".")[0]] += int(m.group(1)) / 1e6
        return dict(by_pkg)


# -- the report -------------------------------------------------------------------------------------


def med(samples: list[Sample], attr: str = "wall") -> float:
    return statistics.median(getattr(s, attr) for s in samples)


def report(bench: Bench, body_bytes: int, breakdown: list[dict] | None, imports: dict[str, float] | None) -> None:
    args, s, n = bench.args, bench.samples, bench.n
    base = med(s["baseline"])
    print(f"syncd once benchmark: {n:,} records, body {body_bytes / 2**20:.1f} MiB, {bench.n_changed:,} records "
          f"changed per delta; {args.runs} repetitions, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"  syncd measured: {Path(bench.syncd_file).parent}")
    if bench.default_settings_problem:
        print(f"  DEFAULT SETTINGS FAIL: {bench.default_settings_problem}")
        print(f"  (runs below use {' '.join(bench.extra)})")
    print()
    print(f"  {'whole process (median)':<30}{'runs':>5}{'wall':>10}{'min..max':>16}{'peak RSS':>11}{'CPU':>9}"
          f"{'us/record':>11}{'/ baseline':>12}   target")
    rows = [("syncd initial", "initial"), ("syncd 1% changed", "1% changed"), ("syncd unchanged", "unchanged"),
            ("baseline (1% changed)", "baseline"), ("python -c pass", "python -c pass"),
            ("import orjson, xxhash", "import orjson, xxhash"), ("import once's modules", "import once's modules"),
            ("  same, PYTHONDONTWRITEBYTECODE", "import once's modules, env as is")]
    verdicts = []
    for title, key in rows:
        samples = s[key]
        if not samples:
            continue
        wall, rss, cpu = med(samples), max(x.rss for x in samples), med(samples, "cpu")
        lo, hi = min(x.wall for x in samples), max(x.wall for x in samples)
        ratio = wall / base
        target = ""
        if key in TARGETS:
            ok = ratio <= TARGETS[key]
            target = f"<= {TARGETS[key]:.1f}x  {'PASS' if ok else 'MISS'}"
            verdicts.append((f"{title}: wall / baseline", f"{ratio:.2f}x", f"<= {TARGETS[key]:.1f}x", ok))
        print(f"  {title:<30}{len(samples):>5}{wall * 1000:>8.0f}ms{lo * 1000:>7.0f}..{hi * 1000:<5.0f}ms"
              f"{rss:>7.0f} MiB{cpu * 1000:>7.0f}ms{wall / n * 1e6:>11.2f}{ratio:>11.2f}x   {target}")
    rss_changed = max(x.rss for x in s["1% changed"])
    limit = TARGET_RSS_MIB if n <= 100_000 else TARGET_RSS_1M_MIB
    verdicts.append(("syncd 1% changed: peak RSS", f"{rss_changed:.0f} MiB", f"<= {limit:.0f} MiB", rss_changed <= limit))
    if bench.default_settings_problem:
        verdicts.append(("works with the default settings", "no", "yes", False))
    print()
    for what, value, target, ok in verdicts:
        print(f"  {what:<40}{value:>10}   (target {target})  {'PASS' if ok else 'MISS'}")
    print(f"  peak RSS is the largest of the runs; the baseline's is {max(x.rss for x in s['baseline']):.0f} MiB. "
          f"State database after the first initial run (db + WAL): {bench.db_mib:.1f} MiB")

    variants = [k for k in s if k.startswith("variant: ")]
    if variants:
        control = med(s["variant: -m syncd (as measured)"])
        print()
        print(f"  what-ifs, 1% changed, whole process ({args.runs} each, interleaved; nothing in syncd edited)")
        print(f"  {'variant':<34}{'wall':>10}{'saves':>10}{'peak RSS':>11}{'CPU':>9}{'/ baseline':>12}")
        for key in variants:
            wall = med(s[key])
            print(f"  {key[9:]:<34}{wall * 1000:>8.0f}ms{(control - wall) * 1000:>8.0f}ms"
                  f"{max(x.rss for x in s[key]):>7.0f} MiB{med(s[key], 'cpu') * 1000:>7.0f}ms{wall / base:>11.2f}x")

    if breakdown:
        kinds = [k for k in ("1% changed", "initial") if breakdown.get(k)]
        print()
        print("  where `syncd once` spends its time: median of "
              + ", ".join(f"{len(breakdown[k])} instrumented {k} runs (wall "
                          f"{statistics.median(b['sample'].wall for b in breakdown[k]) * 1000:.0f} ms)" for k in kinds)
              + "; stage timers in memory, nothing in syncd edited. 'peak' is ru_maxrss when the stage last returned.")
        print(f"  {'stage':<46}" + "".join(f"{k + ' ms':>16}{'peak':>9}" for k in kinds))

        def row(label: str, value, peak=None) -> None:
            cells = ""
            for k in kinds:
                runs = breakdown[k]
                values = [value(b) for b in runs]
                cells += f"{statistics.median(values) * 1000:>16.1f}"
                p = peak(runs[-1]) if peak else None
                cells += f"{p:>5.0f} MiB" if p is not None else " " * 9
            print(f"  {label:<46}{cells}")

        def stage(label: str):
            return lambda b: b["stages"].get(label, [0.0])[0]

        def stage_peak(label: str):
            return lambda b: b["stages"][label][3] if label in b["stages"] else None

        row("interpreter start (spawn -> first line)", lambda b: b["marks"]["start"] - b["sample"].t0)
        row("imports (what once loads)", lambda b: b["marks"]["imports"] - b["marks"]["start"])
        row("  of which syncd.cli", lambda b: b["marks"]["import syncd.cli"] - b["marks"]["start"])
        row("  of which cyclic GC", lambda b: b["gc_imports"][0])
        row("main() (arg parsing .. stdout flush)", lambda b: b["marks"]["main end"] - b["marks"]["main start"])
        for _, _, label in BREAKDOWN_STAGES:
            if any(label in b["stages"] for k in kinds for b in breakdown[k]):
                row("  " + label, stage(label), stage_peak(label))
        staged = {"settings (pydantic, env, file)", "logs.configure (structlog)", "config.load_dir",
                  "Store.open (connect, WAL, migrate)", "  poll (total)", "Store.close (checkpoint)"}
        row("  rest of main (argparse, loop, session, stdout)",
            lambda b: b["marks"]["main end"] - b["marks"]["main start"] - sum(v[0] for k, v in b["stages"].items() if k in staged))
        row("  cyclic GC in main (any thread)", lambda b: b["gc"][0] - b["gc_imports"][0])
        row("shutdown (main returns -> process exit)", lambda b: b["sample"].t_exit - b["marks"]["main end"],
            lambda b: b["maxrss_end"])
        print("  SQL statements (time awaited, all calls; >= 1 ms):")
        sql = sorted({label for k in kinds for b in breakdown[k] for label in b["stages"] if label.startswith("sql: ")})
        for label in sql:
            if max(statistics.median(stage(label)(b) for b in breakdown[k]) for k in kinds) >= 0.001:
                row("  " + label[5:], stage(label))
        for k in kinds:
            b = breakdown[k][-1]
            extra = b["modules_in_main"]
            print(f"  {k}: {b['gc'][1] - b['gc_imports'][1]} collections in main ({b['gc'][2] - b['gc_imports'][2]} full); "
                  f"left through os._exit: {b['os_exit']}; modules imported inside main(): {len(extra)}"
                  + (f" ({', '.join(extra[:8])}{', ...' if len(extra) > 8 else ''})" if extra else ""))
    if imports:
        total = sum(imports.values())
        top = sorted(imports.items(), key=lambda kv: -kv[1])[:14]
        wall = med(s["import once's modules"]) - med(s["python -c pass"])
        print()
        print(f"  import self time by top-level package (python -X importtime, {total * 1000:.0f} ms in all under the "
              f"tool; measured without it: {wall * 1000:.0f} ms over `python -c pass`):")
        print("   " + ", ".join(f"{name} {t * 1000:.0f} ms ({t / total:.0%})" for name, t in top))


def print_profile(path: Path, top: int = 25) -> None:
    import io
    import pstats

    stream = io.StringIO()
    stats = pstats.Stats(str(path), stream=stream)
    stats.sort_stats("tottime").print_stats(top)
    print()
    print(f"  cProfile of one more 1%-changed run ({path}; worker-thread calls merged), own time, top {top}:")
    lines = stream.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    for line in lines[start:]:
        if line.strip():
            print("    " + line.replace(str(ROOT) + "/", "")[:150])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="records per body (default 100000)")
    parser.add_argument("--runs", type=int, default=5, help="repetitions (default 5); each has 1 initial, "
                        f"{CHANGED_PER_REP} 1%%-changed, {UNCHANGED_PER_REP} unchanged and {CHANGED_PER_REP} baseline runs")
    parser.add_argument("--variants", action="store_true", help="also time what-if wrappers (gc off, os._exit, ...)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-stage and import breakdown")
    parser.add_argument("--profile", metavar="FILE", help="also write a cProfile of one 1%%-changed run to FILE")
    parser.add_argument("--syncd-root", metavar="DIR", default=str(ROOT),
                        help="the directory whose syncd/ package is measured (default: this checkout), e.g. a "
                             "`git archive HEAD syncd | tar -x -C DIR` export to compare with the committed code")
    parser.add_argument("--max-response-bytes", metavar="SIZE",
                        help="pass this to syncd (default: syncd's default; raised to 2GiB, and reported, if the body is larger)")
    args = parser.parse_args()
    if args.records < 100 or args.runs < 1:
        parser.error("--records must be >= 100 and --runs >= 1")

    with tempfile.TemporaryDirectory(prefix="syncd-bench-once-") as tmp_name:
        tmp = Path(tmp_name)
        print("  building the bodies and starting the API ...", file=sys.stderr, flush=True)
        proc, port = start_server(tmp, args.records)
        bench = None
        try:
            bench = Bench(args, tmp, port)
            bench.prepare_baseline()
            body_bytes = (tmp / "v1.json").stat().st_size
            bench.warm_up()
            bench.repetitions()
            breakdown = imports = None
            if args.variants:
                bench.variants()
            if not args.no_breakdown:
                breakdown = bench.breakdown()
                imports = bench.import_profile()
            if args.profile:
                bench.profile(Path(args.profile).resolve())
            bench.drop_db()
        finally:
            if bench is not None:
                bench.child.stop()
            stop_server(proc)
        shutil.rmtree(tmp / "state", ignore_errors=True)
    report(bench, body_bytes, breakdown, imports)
    if args.profile:
        print_profile(Path(args.profile).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
