"""Fixtures: a real aiohttp upstream API on loopback, sync definitions in tmp_path, the real CLI."""

from __future__ import annotations

import asyncio
import os
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
    runner = web.AppRunner(app, access_log=None)
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
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader:
            await asyncio.wait_for(self._reader, 5)
        return code

    async def kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.kill()
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
