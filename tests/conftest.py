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
    url: str = ""
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append({
            "method": request.method,
            "path": request.path_qs,
            "headers": dict(request.headers),
            "body": await request.read(),
        })
        if self.delay:
            await asyncio.sleep(self.delay)
        body = self.body if isinstance(self.body, bytes) else orjson.dumps(self.body)
        return web.Response(body=body, status=self.status, content_type=self.content_type, headers=self.headers)


@pytest.fixture
async def upstream():
    api = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", api.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    api.port = runner.addresses[0][1]
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
               record_identifier: str | None = "$.employee.id", api_extra: str = "") -> Path:
    """Write conf.d/NAME.toml for a sync polling `upstream_url + path`."""
    lines = [f'webhook_url = "http://127.0.0.1:9/hook"']
    if list_identifier:
        lines.append(f"list_identifier = {orjson.dumps(list_identifier).decode()}")
    if record_identifier:
        lines.append(f"record_identifier = {orjson.dumps(record_identifier).decode()}")
    if extra:
        lines.append(extra)
    lines += ["", "[api_details]", f'base_url = "{upstream_url}"', f'path = "{path}"']
    if api_extra:
        lines.append(api_extra)
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
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hook.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
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
