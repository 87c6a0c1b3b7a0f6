"""Fixtures: a real aiohttp upstream API on loopback, sync definitions in tmp_path, the real CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web


@dataclass
class Upstream:
    """A local API whose answer the test sets: `body` (JSON-able or bytes), `status`, `delay`."""

    body: Any = None
    status: int = 200
    delay: float = 0.0
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    #: Per-path answers that override `body` (path without query string).
    bodies: dict[str, Any] = field(default_factory=dict)
    #: Per-path delays that override `delay`.
    delays: dict[str, float] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)
    max_inflight: dict[str, int] = field(default_factory=dict)
    url: str = ""
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests.append({
            "method": request.method,
            "path": request.path_qs,
            "headers": dict(request.headers),
            "body": await request.read(),
            "at": asyncio.get_running_loop().time(),
        })
        self.inflight[path] = self.inflight.get(path, 0) + 1
        self.max_inflight[path] = max(self.max_inflight.get(path, 0), self.inflight[path])
        try:
            delay = self.delays.get(path, self.delay)
            if delay:
                await asyncio.sleep(delay)
            answer = self.bodies.get(path, self.body)
            body = answer if isinstance(answer, bytes) else orjson.dumps(answer)
            return web.Response(body=body, status=self.status, content_type=self.content_type, headers=self.headers)
        finally:
            self.inflight[path] -= 1

    def hits(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].split("?")[0] == path]


async def serve(handler) -> tuple[web.AppRunner, int]:
    """Serve `handler` for every method and path on 127.0.0.1 and a free port."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    # A short shutdown: a test's teardown need not wait for its server's idle keep-alive connections.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


@pytest.fixture
async def upstream():
    api = Upstream()
    runner, api.port = await serve(api.handle)
    api.url = f"http://127.0.0.1:{api.port}"
    try:
        yield api
    finally:
        await runner.cleanup()


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    path = tmp_path / "conf.d"
    path.mkdir()
    return path


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


def write_sync(conf_dir: Path, name: str, upstream_url: str, *, path: str = "/api", extra: str = "",
               list_identifier: str | None = "$.response.payload.employees",
               record_identifier: str | None = "$.employee.id", api_extra: str = "", retries: int | None = 0) -> Path:
    """Write conf.d/NAME.toml for a sync polling `upstream_url + path`. In-poll retries are off
    unless asked for (`retries=None`: the default of 3): a failing API then fails at once."""
    lines = ['webhook_url = "http://127.0.0.1:9/hook"']
    if list_identifier:
        lines.append(f"list_identifier = {orjson.dumps(list_identifier).decode()}")
    if record_identifier:
        lines.append(f"record_identifier = {orjson.dumps(record_identifier).decode()}")
    if extra:
        lines.append(extra)
    lines += ["", "[api_details]", f'base_url = "{upstream_url}"', f'path = "{path}"']
    if api_extra:
        lines.append(api_extra)
    if retries is not None:
        lines += ["", "[api_details.retry]", f"retries = {retries}"]
    file = conf_dir / f"{name}.toml"
    file.write_text("\n".join(lines) + "\n")
    return file


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    env.update(extra)
    return env


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """Run the real `syncd` CLI as a subprocess (without blocking the test's event loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncd", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env or cli_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


@dataclass
class Receiver:
    """A local webhook receiver. `respond(event, attempt)` returns (status, headers) or awaits."""

    url: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    respond: Any = None
    attempts: dict[str, int] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        event = orjson.loads(body) if body else None
        event_id = event["eventId"] if isinstance(event, dict) else ""
        self.attempts[event_id] = self.attempts.get(event_id, 0) + 1
        entry = {"at": asyncio.get_running_loop().time(), "path": request.path, "headers": dict(request.headers),
                 "body": body, "event": event, "attempt": self.attempts[event_id]}
        status, headers = 204, {}
        if self.respond is not None:
            answer = self.respond(entry)
            if asyncio.iscoroutine(answer):
                answer = await answer
            if answer is not None:
                status, headers = answer
        entry["status"] = status
        self.received.append(entry)
        return web.Response(status=status, headers=headers)

    def delivered(self) -> list[dict[str, Any]]:
        return [r["event"] for r in self.received if 200 <= r["status"] < 300 and r["path"] == "/hook"]


@pytest.fixture
async def receiver():
    hook = Receiver()
    runner, port = await serve(hook.handle)
    hook.url = f"http://127.0.0.1:{port}"
    try:
        yield hook
    finally:
        await runner.cleanup()


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:
    """Wait until `predicate()` is true; fail after `timeout` seconds (a bounded loop, never a sleep-and-hope)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


class DaemonProcess:
    """The real `syncd run` as a subprocess, with its JSON log lines collected from stderr."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args, self.env = args, env
        self.proc: asyncio.subprocess.Process | None = None
        self.logs: list[dict[str, Any]] = []
        self.address: str | None = None
        self._reader: asyncio.Task | None = None

    async def start(self, timeout: float = 20) -> DaemonProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "syncd", "run", "--log-format", "json", "--listen", "127.0.0.1:0", *self.args,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=self.env or cli_env(),
        )
        self._reader = asyncio.create_task(self._read())
        await wait_for(lambda: self.address is not None or self.proc.returncode is not None, timeout)
        assert self.address, f"syncd run did not start: {self.logs[-5:]}"
        return self

    async def _read(self) -> None:
        assert self.proc and self.proc.stderr
        async for line in self.proc.stderr:
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                entry = {"event": line.decode(errors="replace").rstrip(), "raw": True}
            self.logs.append(entry)
            if entry.get("event") == "syncd started":
                self.address = entry["listen"]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs if e.get("event") == name]

    async def stop(self, sig: int = 15, timeout: float = 30) -> int:
        assert self.proc
        send_signal(self.proc, sig)  # never reaps behind the child watcher's back (see send_signal)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader:
            await asyncio.wait_for(self._reader, 5)
        return code

    async def kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            send_signal(self.proc, signal.SIGKILL)
            await self.proc.wait()
        if self._reader:
            await asyncio.wait_for(self._reader, 5)


@pytest.fixture
async def daemons():
    """Start `syncd run` processes with `await daemons(*args)`; all are killed at the end."""
    started: list[DaemonProcess] = []

    async def start(*args: str, env: dict[str, str] | None = None) -> DaemonProcess:
        d = DaemonProcess(*args, env=env)
        started.append(d)
        return await d.start()

    try:
        yield start
    finally:
        for d in started:
            await d.kill()


# -- added for a fast suite: signalling subprocesses safely, `syncd run` in-process --------------


#: The shortest interval the suite's own daemons may use (in-process and forked ones).
FAST_INTERVAL = 0.05


def send_signal(proc: asyncio.subprocess.Process, sig: int) -> bool:
    """Send `sig` to an asyncio subprocess unless it is known to have exited; never reap it.

    Not `proc.send_signal()`/`kill()`/`terminate()`: they call `subprocess.Popen.send_signal`, which
    first calls `Popen.poll()`, i.e. `waitpid(pid, WNOHANG)`. On a child that has just died that
    reaps it behind the back of asyncio's child watcher (a thread blocked in `waitpid(pid)`), which
    then gets ECHILD, logs "Unknown child process pid N, will report returncode 255", and
    `proc.wait()` returns 255 instead of the real status (-9 after a SIGKILL). `os.kill` reaps
    nothing: a dead child stays a zombie, keeping its pid, until the watcher has collected it.
    Returns whether the signal was sent."""
    if proc.returncode is not None:
        return False
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:  # already collected by the watcher; `returncode` is about to be set
        return False
    return True


class LogTap:
    """Every structlog event of this process as a dict (contextvars merged in), while it is active.

    Prepended to the configured processors: the events are still rendered as before (and shown by
    pytest on a failure)."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._saved: list | None = None

    def _tap(self, logger, method_name: str, event_dict: dict) -> dict:
        import structlog

        entry = structlog.contextvars.merge_contextvars(logger, method_name, dict(event_dict))
        entry.setdefault("level", method_name)
        self.entries.append(entry)
        return event_dict

    def __enter__(self) -> LogTap:
        import structlog

        self._saved = list(structlog.get_config()["processors"])
        structlog.configure(processors=[self._tap, *self._saved])
        return self

    def __exit__(self, *exc) -> None:
        import structlog

        structlog.configure(processors=self._saved)


class InProcessDaemon:
    """`Daemon(settings).run()` as a task on the test's event loop: no interpreter start-up, and
    its timings can be shortened by monkeypatching syncd.daemon / syncd.scheduler constants.
    For what is about the process itself (signals, exit codes, kill -9, the CLI) use `daemons`."""

    def __init__(self, settings, tap: LogTap) -> None:
        from syncd.daemon import Daemon

        self.settings = settings
        self.daemon = Daemon(settings)
        self.tap = tap
        self.task: asyncio.Task | None = None
        self._first_log = 0

    @property
    def address(self) -> str | None:
        """HOST:PORT of /metrics once started, as `DaemonProcess.address`."""
        a = self.daemon.address
        return f"{a[0]}:{a[1]}" if a else None

    async def start(self, timeout: float = 10) -> InProcessDaemon:
        self._first_log = len(self.tap.entries)
        self.task = asyncio.create_task(self.daemon.run(), name="syncd-daemon")
        await wait_for(lambda: self.events("syncd started") or self.task.done(), timeout)
        if self.task.done():
            self.task.result()  # raise what stopped it
            raise AssertionError("the daemon returned during start-up")
        return self

    def events(self, name: str) -> list[dict[str, Any]]:
        """Log events named `name` logged since this daemon started (by anything in the process)."""
        return [e for e in self.tap.entries[self._first_log:] if e.get("event") == name]

    async def stop(self, timeout: float = 30) -> None:
        """As SIGTERM does: request a stop and wait for `run()` to return (it raises what it raised)."""
        assert self.task is not None
        self.daemon.request_stop()
        await asyncio.wait_for(asyncio.shield(self.task), timeout)

    async def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.daemon.request_stop()
            done, _ = await asyncio.wait([self.task], timeout=15)
            if not done:
                self.task.cancel()
                await asyncio.wait([self.task])


@pytest.fixture
async def inproc_daemons(monkeypatch):
    """Start in-process daemons with `await inproc_daemons(conf_dir, state_path, **settings)`
    (Settings fields; listen defaults to 127.0.0.1:0). All are stopped at the end. SYNCD_* and
    CREDENTIALS_DIRECTORY are cleared from the environment, as `cli_env()` does for subprocesses.
    Logging is set up as `syncd run` does by default (JSON lines, level info, to stderr)."""
    import structlog

    from syncd import logs
    from syncd.settings import Settings

    # Daemon tests poll every 150-300 ms to stay fast; users get DESIGN's 1 s minimum.
    monkeypatch.setattr("syncd.config.MIN_INTERVAL", FAST_INTERVAL)
    for key in list(os.environ):
        if key.startswith("SYNCD_"):
            monkeypatch.delenv(key)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    saved_logging = structlog.get_config()
    logs.configure("json", "info", stream=sys.stderr)
    started: list[InProcessDaemon] = []
    tap = LogTap()

    async def start(conf_dir: Path, state_path: Path, **settings: Any) -> InProcessDaemon:
        settings.setdefault("listen", "127.0.0.1:0")
        d = InProcessDaemon(Settings(config_dir=conf_dir, state_path=state_path, **settings), tap)
        started.append(d)
        return await d.start()

    try:
        with tap:
            try:
                yield start
            finally:
                for d in started:
                    await d.cancel()
    finally:
        structlog.configure(**saved_logging)
    for d in started:  # a daemon that failed is an error even if the test did not look
        if d.task is not None and d.task.done() and not d.task.cancelled() and d.task.exception():
            raise d.task.exception()


# -- a fork server for `syncd` commands: real processes without the interpreter start-up ----------

_FORK_SERVER = r'''
import ctypes, importlib, os, pkgutil, signal, sys, traceback
import orjson
import syncd, syncd.cli, syncd.config
syncd.config.MIN_INTERVAL = 0.05  # the tests' daemons poll faster than DESIGN's 1 s minimum (FAST_INTERVAL)

def _pdeathsig():  # Linux: die with the parent (the test process, or the fork server for a child)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

_pdeathsig()
for module in pkgutil.walk_packages(syncd.__path__, "syncd."):  # what commands import lazily, up front
    if module.name != "syncd.__main__":
        try:
            importlib.import_module(module.name)
        except Exception:
            pass
ctl_in, ctl_out = sys.stdin.buffer, sys.stdout.buffer
ctl_out.write(b"ready\n")
ctl_out.flush()
for line in ctl_in:
    cmd = orjson.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _pdeathsig()
            fds = [os.open(os.devnull, os.O_RDONLY)]
            fds += [os.open(cmd[k], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) for k in ("stdout", "stderr")]
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            sys.argv = [os.path.join(os.path.dirname(syncd.__file__), "__main__.py"), *cmd["argv"]]  # as python -m syncd
            try:
                code = syncd.cli.main(cmd["argv"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code if isinstance(code, int) else 1)
    ctl_out.write(b"pid %d\n" % pid)
    ctl_out.flush()
    _, status = os.waitpid(pid, 0)
    ctl_out.write(b"exit %d\n" % os.waitstatus_to_exitcode(status))
    ctl_out.flush()
'''


class ForkedProcess:
    """A `syncd` command forked by `ForkServer`: the part of asyncio.subprocess.Process the tests use
    (`pid`, `returncode`, `wait()`). Signal it with `send_signal(proc, sig)` (os.kill)."""

    def __init__(self, pid: int, exited: asyncio.Future) -> None:
        self.pid = pid
        self._exited = exited

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)


class ForkServer:
    """Runs `syncd` commands as real processes - SIGKILL, exit codes, their own stdout and stderr
    files - forked from a Python that has imported syncd already, instead of `python -m syncd`.

    A child starts in a few milliseconds instead of ~0.3 s (~0.6 s for `syncd run`) of interpreter
    start-up and imports: for tests that start hundreds of them, such as the kill -9 tests. What
    runs is the CLI's `main(argv)`, exactly as `python -m syncd` calls it; only the imports were
    done before the fork. One child at a time."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.child: ForkedProcess | None = None
        self._lines: asyncio.Queue[bytes] = asyncio.Queue()
        self._reader: asyncio.Task | None = None
        self._exited: asyncio.Future | None = None

    async def start(self, timeout: float = 30) -> ForkServer:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _FORK_SERVER, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=cli_env(),
        )
        self._reader = asyncio.create_task(self._read())
        assert await asyncio.wait_for(self._lines.get(), timeout) == b"ready", "the fork server did not start"
        return self

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        async for line in self.proc.stdout:
            if line.startswith(b"exit ") and self._exited is not None:
                self._exited.set_result(int(line.split()[1]))
            else:
                await self._lines.put(line.strip())
        if self._exited is not None and not self._exited.done():
            self._exited.set_exception(RuntimeError("the fork server ended before its child"))

    async def spawn(self, *argv: str, stdout: Path, stderr: Path, timeout: float = 30) -> ForkedProcess:
        """Fork `syncd ARGV...` with stdin /dev/null and stdout, stderr appended to these files."""
        assert self.proc and self.proc.stdin and self.proc.returncode is None, "the fork server is not running"
        assert self.child is None or self.child.returncode is not None, "one child at a time"
        self._exited = asyncio.get_running_loop().create_future()
        self.proc.stdin.write(orjson.dumps({"argv": list(argv), "stdout": str(stdout), "stderr": str(stderr)}) + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self._lines.get(), timeout)
        assert line.startswith(b"pid "), line
        self.child = ForkedProcess(int(line.split()[1]), self._exited)
        return self.child

    async def close(self) -> None:
        if self.proc is None:
            return
        import signal

        if self.child is not None and send_signal(self.child, signal.SIGKILL):
            await asyncio.wait_for(self.child.wait(), 30)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            send_signal(self.proc, signal.SIGKILL)
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)


@pytest.fixture
async def fork_server():
    """A started `ForkServer`; closed (its child killed) at the end."""
    server = ForkServer()
    try:
        yield await server.start()
    finally:
        await server.close()


# -- PostgreSQL: a fresh schema per test on the machine's server, or a skip that says why ----------

#: The server the PostgreSQL tests use (trust auth on loopback); SYNCD_TEST_PG_URL overrides it.
PG_SERVER = os.environ.get("SYNCD_TEST_PG_URL", "postgresql://root@127.0.0.1:5432/test")
_pg_absent: str | None = None


async def _pg_schema() -> str:
    """Create an empty schema on PG_SERVER and return a URL whose search_path is that schema."""
    global _pg_absent
    import secrets

    if _pg_absent is not None:
        pytest.skip(_pg_absent)
    try:
        import asyncpg
    except ImportError:
        _pg_absent = "asyncpg is not installed"
        pytest.skip(_pg_absent)
    try:
        conn = await asyncpg.connect(PG_SERVER, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        _pg_absent = f"no PostgreSQL server at {PG_SERVER} ({exc}); set SYNCD_TEST_PG_URL to run the PostgreSQL tests"
        pytest.skip(_pg_absent)
    schema = f"t_{secrets.token_hex(6)}"
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    sep = "&" if "?" in PG_SERVER else "?"
    return f"{PG_SERVER}{sep}search_path={schema}"


async def _drop_schema(url: str) -> None:
    import asyncpg

    schema = url.rsplit("search_path=", 1)[1]
    try:
        conn = await asyncpg.connect(PG_SERVER, timeout=5)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()
    except Exception:
        pass  # a leftover schema costs nothing


@pytest.fixture
async def pg_url():
    """A postgresql:// URL of an empty schema of its own (dropped afterwards); skips without a server."""
    url = await _pg_schema()
    try:
        yield url
    finally:
        await _drop_schema(url)


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request, tmp_path: Path):
    """Run a test once per state backend: yields Settings-style keyword arguments
    (state_path, and state_url for PostgreSQL)."""
    if request.param == "sqlite":
        yield {"state_path": tmp_path / "state" / "state.db"}
        return
    url = await _pg_schema()
    try:
        yield {"state_path": tmp_path / "state" / "state.db", "state_url": url}
    finally:
        await _drop_schema(url)


def outbox_body(event_id: str, sync_id: str, record_id: str, event_type: str, created_at: float, body: bytes,
                sync_type: str | None, sync_run_id: str | None, changed_fields: bytes | None) -> bytes:
    """The webhook body of an outbox row read with SQL (SQLite stores a run's record events as
    their parts: eventData in `body`, the rest in columns)."""
    from syncd.store import OutboxEvent

    return OutboxEvent(event_id, sync_id, record_id, event_type, "", created_at, body, None, sync_type, sync_run_id,
                       changed_fields).envelope()
