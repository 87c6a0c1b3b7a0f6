"""Every CLI command against PostgreSQL (state_url), and what a user sees when it is unreachable."""

from __future__ import annotations

import copy

import aiohttp
import orjson
from test_engine import SEED

from conftest import cli_env, run_cli, wait_for, write_sync


def events(out: str):
    return [orjson.loads(line) for line in out.splitlines()]


async def test_every_command_works_against_postgres(upstream, conf_dir, tmp_path, pg_url):
    upstream.body = copy.deepcopy(SEED)
    write_sync(conf_dir, "employees", upstream.url)
    # The URL from the environment, as under systemd; state_path is never created.
    env = cli_env(SYNCD_STATE_URL=pg_url, SYNCD_CONFIG_DIR=str(conf_dir), SYNCD_STATE_PATH=str(tmp_path / "unused.db"))

    code, out, err = await run_cli("once", "employees", env=env)
    assert code == 0, err
    assert sorted((e["eventType"], e["recordId"]) for e in events(out)) == [("record.new", "1"), ("record.new", "2")]
    upstream.body["response"]["payload"]["employees"][1]["employee"]["name"] = "Janet"
    code, out, err = await run_cli("once", "employees", env=env)
    assert code == 0 and [(e["eventType"], e["recordId"]) for e in events(out)] == [("record.modified", "2")], err

    code, out, err = await run_cli("status", "--json", env=env)
    assert code == 0, err
    (view,) = orjson.loads(out)["syncs"]
    assert view["id"] == "employees" and view["records"] == 2 and view["pending_events"] == 3
    assert view["owner"] is None  # no daemon holds its lease
    code, out, err = await run_cli("status", env=env)
    assert code == 0 and "OWNER" in out.splitlines()[0], out

    code, out, err = await run_cli("deliveries", "list", "--json", env=env)
    assert code == 0, err
    listed = orjson.loads(out)
    rows = listed["deliveries"] if isinstance(listed, dict) else listed
    assert len(rows) == 3

    code, out, err = await run_cli("deliveries", "replay", "--sync", "employees", env=env)
    assert code == 0, err  # nothing dead: nothing replayed
    code, out, err = await run_cli("deliveries", "purge", "--dead", "--before", "1d", env=env)
    assert code == 0 and "purged 0" in out, (out, err)

    code, out, err = await run_cli("reset", "employees", env=env)
    assert code == 0, err
    code, out, err = await run_cli("once", "employees", "--dry-run", env=env)
    assert code == 0 and len(events(out)) == 2, err  # after a reset, every record is new again
    assert not (tmp_path / "unused.db").exists()


async def test_an_unreachable_server_is_one_line_without_the_password(conf_dir, tmp_path):
    # Port 1 on loopback: nothing listens there.
    url = "postgresql://syncd:hunter2hunter2@127.0.0.1:1/syncd"
    env = cli_env(SYNCD_STATE_URL=url, SYNCD_CONFIG_DIR=str(conf_dir))
    for args in (("status",), ("deliveries", "list"), ("reset", "x")):
        code, out, err = await run_cli(*args, env=env)
        assert code == 1 and "Traceback" not in err, err
        assert "hunter2" not in err + out
        lines = [line for line in err.splitlines() if line.startswith("syncd:")]
        assert len(lines) == 1 and "127.0.0.1:1" in lines[0] and "PostgreSQL" in lines[0], err


async def test_the_daemon_waits_for_an_unreachable_server(inproc_daemons, conf_dir, tmp_path, upstream):
    """A database down at start is an outage to wait out: /healthz answers, /readyz says why (503)."""
    write_sync(conf_dir, "employees", upstream.url)
    url = "postgresql://syncd:hunter2hunter2@127.0.0.1:1/syncd"
    import asyncio

    from syncd.daemon import Daemon
    from syncd.settings import Settings

    daemon = Daemon(Settings(config_dir=conf_dir, state_path=tmp_path / "s.db", state_url=url, listen="127.0.0.1:0"))
    task = asyncio.create_task(daemon.run())
    try:
        await wait_for(lambda: daemon.address is not None or task.done(), 10)
        assert not task.done()
        base = f"http://{daemon.address[0]}:{daemon.address[1]}"
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/healthz") as resp:
                assert resp.status == 200
            async with session.get(base + "/readyz") as resp:
                text = await resp.text()
                assert resp.status == 503 and "cannot reach" in text and "hunter2" not in text, text
            async with session.get(base + "/v1/syncs") as resp:
                assert resp.status == 503
        assert not task.done()  # still retrying
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 15)


def test_state_url_from_a_credential_never_shows(tmp_path, monkeypatch):
    from syncd.settings import load_settings

    (tmp_path / "state_url").write_text("postgresql://syncd:hunter2hunter2@db.example/syncd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.delenv("SYNCD_STATE_URL", raising=False)
    settings = load_settings({})
    assert settings.state_url.get_secret_value() == "postgresql://syncd:hunter2hunter2@db.example/syncd"
    assert settings.state_location == "postgresql://syncd:***@db.example/syncd"
    assert "hunter2" not in repr(settings)


def test_state_url_must_be_postgresql():
    import pytest
    from pydantic import ValidationError

    from syncd.settings import Settings

    with pytest.raises(ValidationError, match="PostgreSQL URL"):
        Settings(state_url="mysql://root@127.0.0.1/db")


async def test_a_schema_that_does_not_exist_says_what_to_do(pg_url, conf_dir):
    url = pg_url.rsplit("search_path=", 1)[0] + "search_path=no_such_schema_here"
    code, out, err = await run_cli("status", env=cli_env(SYNCD_STATE_URL=url, SYNCD_CONFIG_DIR=str(conf_dir)))
    assert code == 1 and "Traceback" not in err, err
    assert "CREATE SCHEMA" in err and "no_such_schema_here" in err, err
