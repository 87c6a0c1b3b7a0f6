"""What an operator sees: logs, the demo, schedules that survive restarts."""

from __future__ import annotations

import asyncio
import io
import sqlite3
import sys
import time

import orjson
import structlog

import syncd.scheduler
from syncd import logs

from conftest import cli_env, run_cli, wait_for, write_sync


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


async def test_demo_runs_and_stops_by_itself(upstream, tmp_path):
    # The real daemon's environment exported in the same shell (a state server, an API-created
    # sync) must not reach the demo: it has state of its own and polls only its fake API.
    api_dir = tmp_path / "api.d"
    api_dir.mkdir()
    write_sync(api_dir, "production", upstream.url)
    env = cli_env(SYNCD_STATE_URL="postgresql://root@127.0.0.1:1/production", SYNCD_API_CONFIG_DIR=str(api_dir))
    proc = await asyncio.create_subprocess_exec(
        # The fake API changes every 2 intervals (±30%): in 4.5 s at 1 s (the shortest interval)
        # there are one or two changes to notice.
        sys.executable, "-m", "syncd", "demo", "--duration", "4.5", "--interval", "1s",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, err.decode()
    hooks = [line for line in text.splitlines() if line.startswith("[hook]")]
    assert len([h for h in hooks if "initial_sync" in h]) == 3
    assert all("signature ok" in h for h in hooks)
    assert any("delta_sync" in h for h in hooks), text  # the fake API changed and syncd noticed
    assert "stopped" in text
    assert upstream.requests == []


async def test_next_poll_time_survives_a_restart(upstream, receiver, conf_dir, state_path, inproc_daemons, monkeypatch):
    """A sync polled (by `syncd once`) just before the daemon starts is next polled one interval
    after that poll, not at the start.

    The daemon runs in-process: it must be up before the interval has passed (else polling at once
    is right), and a subprocess's interpreter start-up on a busy machine is not reliably short
    enough for that. Without a stored time, a sync's first poll is spread over
    min(interval, STARTUP_SPREAD) after the start; at 0 the daemon would poll at once, so the test
    tells the two behaviours apart every time, not only when the random spread happens to be long.
    """
    monkeypatch.setattr(syncd.scheduler, "STARTUP_SPREAD", 0.0)
    interval = 2.5
    upstream.body = {"items": []}
    (conf_dir / "a.toml").write_text(
        f'webhook_url = "{receiver.url}/hook"\nlist_identifier = "$.items"\nrecord_identifier = "$.id"\n'
        f'interval = "{interval:g}s"\n[api_details]\nbase_url = "{upstream.url}"\npath = "/a"\n')
    assert (await run_cli("once", "a", "--config-dir", str(conf_dir), "--state-path", str(state_path)))[0] == 0
    db = sqlite3.connect(f"file:{state_path}?mode=ro", uri=True)
    try:
        (last_run_at,), = db.execute("SELECT last_run_at FROM syncs WHERE sync_id = 'a'").fetchall()
    finally:
        db.close()
    await inproc_daemons(conf_dir, state_path)
    started = time.time()
    assert started < last_run_at + interval - 0.5, \
        f"the daemon started {started - last_run_at:.1f}s after the last run: too late to tell a restored schedule apart"
    loop = asyncio.get_running_loop()
    await wait_for(lambda: len(upstream.hits("/a")) >= 2, timeout=interval + 5)  # >=: never miss a state
    polled_at = upstream.hits("/a")[1]["at"] + (time.time() - loop.time())  # loop clock -> wall clock
    # Due one interval after the run `once` recorded; allow for a busy machine on the late side only.
    assert last_run_at + interval - 0.05 <= polled_at <= last_run_at + interval + 1.5, (polled_at - last_run_at, started - last_run_at)
