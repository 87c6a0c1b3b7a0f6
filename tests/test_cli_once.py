"""`syncd once` as a user runs it: the real CLI in a subprocess against a local API."""

from __future__ import annotations

import copy
import sqlite3

import orjson
from test_engine import SEED

from conftest import run_cli, write_sync


def events(out: str):
    return [orjson.loads(line) for line in out.splitlines()]


async def test_once_prints_events_and_commits(upstream, conf_dir, state_path):
    upstream.body = copy.deepcopy(SEED)
    write_sync(conf_dir, "employees", upstream.url)
    args = ("once", "employees", "--config-dir", str(conf_dir), "--state-path", str(state_path), "--log-format", "json")

    code, out, err = await run_cli(*args)
    assert code == 0, err
    first = events(out)
    assert sorted((e["eventType"], e["recordId"], e["syncType"]) for e in first) == [
        ("record.new", "1", "initial_sync"), ("record.new", "2", "initial_sync")]
    # Logs are JSON lines on stderr, bound to the sync and the run.
    logs = [orjson.loads(line) for line in err.splitlines()]
    assert any(l.get("event") == "poll done" and l["sync"] == "employees" and l["run"] == first[0]["syncRunId"] for l in logs)

    upstream.body["response"]["payload"]["employees"][1]["employee"]["name"] = "Janet"
    code, out, _ = await run_cli(*args)
    assert code == 0 and [(e["eventType"], e["recordId"]) for e in events(out)] == [("record.modified", "2")]

    code, out, _ = await run_cli(*args)
    assert code == 0 and out == ""

    with sqlite3.connect(state_path) as db:
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 3


async def test_once_dry_run_writes_nothing(upstream, conf_dir, state_path):
    upstream.body = copy.deepcopy(SEED)
    write_sync(conf_dir, "employees", upstream.url)
    args = ("once", "employees", "--dry-run", "--config-dir", str(conf_dir), "--state-path", str(state_path))
    code, out, err = await run_cli(*args)
    assert code == 0, err
    assert len(events(out)) == 2
    assert not state_path.exists()

    # With existing state, a dry run shows the delta against it and still changes nothing.
    code, _, _ = await run_cli("once", "employees", "--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert code == 0
    before = state_path.read_bytes()
    upstream.body["response"]["payload"]["employees"].pop(0)
    code, out, _ = await run_cli(*args)
    assert code == 0 and [(e["eventType"], e["recordId"]) for e in events(out)] == [("record.deleted", "1")]
    code, out, _ = await run_cli(*args)
    assert [(e["eventType"], e["recordId"]) for e in events(out)] == [("record.deleted", "1")]
    assert state_path.read_bytes() == before


async def test_once_failure_exit_code_and_message(upstream, conf_dir, state_path):
    upstream.status, upstream.body = 503, {"error": "maintenance"}
    write_sync(conf_dir, "employees", upstream.url)
    code, out, err = await run_cli("once", "employees", "--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert code == 1 and out == ""
    assert "503" in err and "employees" in err


async def test_once_unknown_or_invalid_sync(upstream, conf_dir, state_path):
    write_sync(conf_dir, "employees", upstream.url)
    (conf_dir / "broken.toml").write_text("webhook_url = 1\n")
    base = ("--config-dir", str(conf_dir), "--state-path", str(state_path))
    code, _, err = await run_cli("once", "nope", *base)
    assert code == 2 and "employees" in err
    code, _, err = await run_cli("once", "broken", *base)
    assert code == 78 and "broken.toml: webhook_url" in err
    (conf_dir / "named.toml").write_text('idempotency_id = "tickets"\nwebhook_url = 2\n')
    code, _, err = await run_cli("once", "tickets", *base)  # the file name is not the id
    assert code == 78 and "named.toml: webhook_url" in err
    (conf_dir / "named.toml").unlink()
    upstream.body = copy.deepcopy(SEED)
    code, out, err = await run_cli("once", "employees", *base)
    assert code == 0 and len(events(out)) == 2
    assert "broken.toml" in err  # the other file's problem is still reported
