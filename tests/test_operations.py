"""What an operator sees: logs, the demo, schedules that survive restarts."""

from __future__ import annotations

import asyncio
import io
import sys

import orjson
import structlog
from conftest import cli_env, run_cli, wait_for, write_sync

from syncd import logs


async def test_secrets_never_reach_logs_or_errors(upstream, conf_dir, state_path):
    upstream.status, upstream.body = 401, {"error": "invalid token"}
    write_sync(conf_dir, "hr", upstream.url, path="/v1?key=${HR_KEY}",
               api_extra='headers = { Authorization = "Bearer ${HR_TOKEN}", "X-Api-Key" = "${HR_KEY}" }')
    env = cli_env(HR_TOKEN="tok-very-secret-1", HR_KEY="key-very-secret-2")
    code, out, err = await run_cli("once", "hr", "--config-dir", str(conf_dir), "--state-path", str(state_path),
                                   "--log-level", "debug", "--log-format", "json", env=env)
    assert code == 1 and "401" in err
    assert "tok-very-secret-1" not in out + err and "key-very-secret-2" not in out + err
    # The request really carried them.
    assert upstream.requests[-1]["headers"]["Authorization"] == "Bearer tok-very-secret-1"
    lines = [orjson.loads(line) for line in err.splitlines() if line.startswith("{")]
    failed = next(line for line in lines if line["event"] == "poll failed")
    assert failed["sync"] == "hr" and failed["run"].startswith("run_") and failed["level"] == "warning"


def test_console_logs_on_a_terminal_json_otherwise():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    try:
        logs.configure("auto", "info", stream=tty)
        structlog.get_logger("t").info("hello", sync="a", headers={"Authorization": "x", "Accept": "y"})
        logs.configure("auto", "info", stream=pipe)
        structlog.get_logger("t").info("hello", sync="a", headers={"Authorization": "x", "Accept": "y"})
        structlog.get_logger("t").debug("hidden")
    finally:
        logs.configure("json", "info", stream=sys.stderr)
    assert "hello" in tty.getvalue() and not tty.getvalue().lstrip().startswith("{")
    line = orjson.loads(pipe.getvalue().splitlines()[0])
    assert line["event"] == "hello" and line["sync"] == "a" and line["level"] == "info"
    assert line["headers"] == {"Authorization": "***", "Accept": "y"}
    assert "hidden" not in pipe.getvalue()


async def test_demo_runs_and_stops_by_itself():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncd", "demo", "--duration", "5", "--interval", "500ms",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=cli_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, err.decode()
    hooks = [line for line in text.splitlines() if line.startswith("[hook]")]
    assert len([h for h in hooks if "initial_sync" in h]) == 3
    assert all("signature ok" in h for h in hooks)
    assert any("delta_sync" in h for h in hooks), text  # the fake API changed and syncd noticed
    assert "stopped" in text


async def test_next_poll_time_survives_a_restart(upstream, receiver, conf_dir, state_path, daemons):
    upstream.body = {"items": []}
    (conf_dir / "a.toml").write_text(
        f'webhook_url = "{receiver.url}/hook"\nlist_identifier = "$.items"\nrecord_identifier = "$.id"\n'
        f'interval = "5s"\n[api_details]\nbase_url = "{upstream.url}"\npath = "/a"\n')
    assert (await run_cli("once", "a", "--config-dir", str(conf_dir), "--state-path", str(state_path)))[0] == 0
    loop = asyncio.get_running_loop()
    polled_once_at = upstream.hits("/a")[0]["at"]
    await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path))
    await wait_for(lambda: len(upstream.hits("/a")) == 2, timeout=15)
    gap = upstream.hits("/a")[1]["at"] - polled_once_at
    # Polled 'once' just before the start: the daemon waits out the interval instead of polling at start.
    assert 4.0 <= gap <= 7.0, gap
    assert loop.time() - polled_once_at < 10
