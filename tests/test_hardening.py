"""Defects found by trying syncd as users and attackers would: each test fails without its fix."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from syncd.config import load_dir
from syncd.settings import load_settings
from syncd.store import Store

from conftest import cli_env, run_cli, wait_for, write_sync
from test_delivery import Rig

SECRET_OK = "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="


# -- 1. replay never sends a dead letter after a later event of its record -----------------------

async def test_replay_skips_dead_letters_that_a_later_event_superseded(upstream, receiver, conf_dir, state_path):
    down = {"1"}
    receiver.respond = lambda entry: (500, {}) if entry["event"]["recordId"] in down else None
    async with Rig(upstream, receiver, conf_dir, state_path, schedule=[]) as rig:
        # record 1's record.new dies while its receiver is down; record 2's is fine.
        await rig.poll([{"id": 1, "v": 1}, {"id": 2, "v": 1}])
        await wait_for(lambda: len(receiver.delivered()) == 1, timeout=10)

        async def states():
            return {(d.record_id, d.event_type): d.state for d in await rig.outbox()}

        for _ in range(200):
            if (await states()).get(("1", "record.new")) == "dead":
                break
            await asyncio.sleep(0.02)
        # Record 1 is then deleted upstream, and the receiver is back: the record.deleted is delivered.
        down.clear()
        await rig.poll([{"id": 2, "v": 1}])
        await wait_for(lambda: any(e["eventType"] == "record.deleted" for e in receiver.delivered()), timeout=10)
        for _ in range(200):
            if (await states()).get(("1", "record.new")) == "superseded":
                break
            await asyncio.sleep(0.02)
        assert await states() == {("1", "record.new"): "superseded"}
    base = ("--state-path", str(state_path), "--config-dir", str(conf_dir))
    code, out, _ = await run_cli("deliveries", "list", "--dead", *base)
    assert code == 0 and "superseded" in out
    code, out, err = await run_cli("deliveries", "replay", *base)
    assert code == 0 and "replayed 0" in out and "skipped 1 superseded" in out, out + err
    async with Rig(upstream, receiver, conf_dir, state_path, schedule=[]) as rig:
        await asyncio.sleep(0.3)
    # The stale record.new was never sent after the record.deleted: the receiver does not hold record 1.
    got = [(e["eventType"], e["recordId"]) for e in receiver.delivered()]
    assert got[-1] == ("record.deleted", "1") and got.count(("record.new", "1")) == 0


async def test_replay_of_a_dead_letter_with_a_queued_later_event_is_skipped(upstream, receiver, conf_dir, state_path):
    receiver.respond = lambda entry: (500, {})
    async with Rig(upstream, receiver, conf_dir, state_path, schedule=[]) as rig:
        await rig.poll([{"id": 1, "v": 1}])
        for _ in range(200):
            if [d.state for d in await rig.outbox()] == ["dead"]:
                break
            await asyncio.sleep(0.02)
    # Without a deliverer: the record changes and its record.modified waits in the queue.
    async with await Store.open(state_path) as store:
        settings = load_settings({"config_dir": conf_dir, "state_path": state_path})
        from syncd.engine import poll
        from syncd.http import poll_session
        from syncd.source.fetcher import Source
        upstream.body = {"items": [{"id": 1, "v": 2}]}
        async with poll_session() as session:
            assert (await poll(load_dir(settings)[0]["people"], store, Source(session, max_bytes=10**6))).ok
        assert await store.replay(now=time.time()) == (0, 1)
        assert [d.state for d in await store.deliveries()] == ["superseded", "pending"]


async def test_replay_of_dead_letters_alone_keeps_their_order(upstream, receiver, conf_dir, state_path):
    receiver.respond = lambda entry: (500, {})
    async with Rig(upstream, receiver, conf_dir, state_path, schedule=[]) as rig:
        await rig.poll([{"id": 1, "v": 1}])
        await rig.poll([{"id": 1, "v": 2}])
        for _ in range(200):
            if [d.state for d in await rig.outbox()] == ["dead", "dead"]:
                break
            await asyncio.sleep(0.02)
        receiver.respond = None
        assert await rig.store.replay(now=time.time()) == (2, 0)
        await wait_for(lambda: len(receiver.delivered()) == 2, timeout=10)
    assert [e["eventData"]["v"] for e in receiver.delivered()] == [1, 2]


# -- 2. the state database deleted or replaced under a running daemon --------------------------

async def test_a_state_database_deleted_under_the_daemon_is_noticed(upstream, receiver, conf_dir, state_path, daemons):
    upstream.body = {"items": [{"id": 1}]}
    write_sync(conf_dir, "a", upstream.url, path="/a", list_identifier="$.items", record_identifier="$.id",
               extra='interval = "1s"')
    key = "k" * 24
    d = await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path), env=cli_env(SYNCD_API_KEYS=key))
    await wait_for(lambda: len(upstream.hits("/a")) >= 1, timeout=10)
    state_path.unlink()
    await wait_for(lambda: d.events("state database lost; polling stopped"), timeout=10)
    lost = d.events("state database lost; polling stopped")[0]
    assert lost["problem"] == "deleted" and str(state_path) in lost["state"]
    async with aiohttp.ClientSession() as session, session.get(f"http://{d.address}/readyz") as resp:
        assert resp.status == 503 and "deleted" in await resp.text()
    # A pause now would be written to the deleted file and be gone at the restart: refused.
    async with aiohttp.ClientSession() as session, session.post(
            f"http://{d.address}/v1.0/sync.custom.pause", json={"syncJobId": "a"},
            headers={"Authorization": f"Bearer {key}"}) as resp:
        answer = await resp.json()
        assert resp.status == 503 and "restart" in answer["error"]["msg"], answer
    polls = len(upstream.hits("/a"))
    await asyncio.sleep(1.6)  # more than the 1 s interval (with its 10% jitter)
    assert len(upstream.hits("/a")) <= polls + 1  # at most a poll already under way
    assert await d.stop() == 0


# -- 3. files 0600, directories 0700; 4. one daemon per SQLite database ---------------------------

async def test_state_files_are_private_and_a_second_daemon_is_refused(upstream, receiver, conf_dir, tmp_path, daemons):
    state_path = tmp_path / "new" / "state" / "state.db"
    write_sync(conf_dir, "a", upstream.url, path="/a", list_identifier="$.items", record_identifier="$.id")
    upstream.body = {"items": [{"id": 1}]}
    old = os.umask(0o022)  # a permissive umask: syncd must not depend on it
    try:
        d = await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path))
        code, out, err = await run_cli("run", "--config-dir", str(conf_dir), "--state-path", str(state_path),
                                       "--listen", "127.0.0.1:0", "--log-format", "json", timeout=20)
    finally:
        os.umask(old)
    assert code == 1
    assert "in use" in err and f"pid {d.proc.pid}" in err and str(state_path) in err
    for path in [state_path, *state_path.parent.glob("state.db*")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(state_path.parent.stat().st_mode) == 0o700
    assert await d.stop() == 0
    # The lock goes with the process: a new daemon starts.
    d2 = await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert await d2.stop() == 0


# -- 5. the default state path, and one line (never a traceback) for a bad database --------------

def test_default_state_path_for_a_user_who_cannot_write_var_lib(tmp_path, monkeypatch):
    import syncd.settings as settings_mod

    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setattr(settings_mod, "SYSTEM_STATE_DIR", tmp_path / "ro" / "syncd")
    (tmp_path / "ro").mkdir(mode=0o500)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    if os.access(tmp_path / "ro", os.W_OK):  # root writes anywhere: pretend it cannot
        monkeypatch.setattr(settings_mod.os, "access", lambda path, mode: False)
    assert settings_mod._default_state_path() == tmp_path / "xdg" / "syncd" / "state.db"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert settings_mod._default_state_path() == tmp_path / "home" / ".local" / "state" / "syncd" / "state.db"
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "sd"))
    assert settings_mod._default_state_path() == tmp_path / "sd" / "state.db"


@pytest.mark.parametrize("command", [("status",), ("deliveries", "list"), ("once", "a"), ("reset", "a")])
async def test_a_corrupt_database_is_one_line_not_a_traceback(command, upstream, conf_dir, state_path):
    write_sync(conf_dir, "a", upstream.url)
    state_path.parent.mkdir(parents=True)
    state_path.write_bytes(b"this is not an SQLite database, just text" * 100)
    code, out, err = await run_cli(*command, "--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert code == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("syncd:")]
    assert len(lines) == 1 and str(state_path) in lines[0] and "backup" in lines[0], err


def test_database_errors_say_what_to_do():
    from syncd.cli import state_error
    from syncd.settings import Settings
    from syncd.store.sqlite import store_error

    path = Path("/var/lib/syncd/state.db")
    settings = Settings(state_path=path)
    for exc in (store_error(sqlite3.OperationalError("attempt to write a readonly database")),
                store_error(sqlite3.OperationalError("unable to open database file")), PermissionError(13, "Permission denied")):
        text = state_error(settings, exc)
        assert str(path) in text and "permissions" in text and "move" not in text and "backup" not in text
    text = state_error(settings, store_error(sqlite3.DatabaseError("file is not a database")))
    assert "backup" in text and "move it away" in text
    assert "free disk space" in state_error(settings, store_error(sqlite3.OperationalError("database or disk is full")))


def test_postgres_errors_say_what_to_do_without_the_password():
    from syncd.cli import state_error
    from syncd.settings import Settings
    from syncd.store import StoreError

    settings = Settings(state_url="postgresql://syncd:hunter2hunter2@db.example:5432/syncd")
    text = state_error(settings, StoreError("cannot reach PostgreSQL: Connection refused", "unavailable"))
    assert "db.example" in text and "hunter2" not in text and "server runs" in text
    assert "hunter2" not in repr(settings) and "hunter2" not in settings.state_location


def _nobody_can_run_python() -> bool:
    import subprocess

    if os.geteuid() != 0:
        return False
    try:
        return subprocess.run([sys.executable, "-c", "pass"], user=65534, group=65534, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _nobody_can_run_python(), reason="needs root and a Python that user nobody may run")
async def test_a_read_only_database_gets_a_permission_hint_not_move_it_away(upstream, conf_dir, tmp_path):
    state_dir = tmp_path / "shared"
    state_dir.mkdir()
    state_path = state_dir / "state.db"
    write_sync(conf_dir, "a", upstream.url)
    upstream.body = {"response": {"payload": {"employees": [{"employee": {"id": 1}}]}}}
    assert (await run_cli("once", "a", "--config-dir", str(conf_dir), "--state-path", str(state_path)))[0] == 0
    for path in (tmp_path, conf_dir, *conf_dir.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    state_dir.chmod(0o755)
    for path in state_dir.iterdir():
        path.chmod(0o644)
    nobody = 65534

    def as_nobody():
        os.setgid(nobody)
        os.setuid(nobody)

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncd", "once", "a", "--config-dir", str(conf_dir), "--state-path", str(state_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=cli_env(HOME=str(tmp_path)),
        preexec_fn=as_nobody)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    err = err.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert "permission" in err.lower() or "cannot write" in err
    assert "move" not in err and "backup" not in err


# -- 6. disk full is reported as such ---------------------------------------------------------

async def test_a_failed_commit_reports_its_own_error_not_the_rollback(state_path):
    async with await Store.open(state_path) as store:
        with pytest.raises(sqlite3.IntegrityError):
            async with store._transaction() as conn:
                await conn.execute("INSERT INTO outbox (event_id, sync_id, record_id, event_type, webhook_url, "
                                   "created_at, body) VALUES ('e', 's', 'r', 't', 'u', 0, x'00')")
                await conn.execute("INSERT INTO outbox (event_id, sync_id, record_id, event_type, webhook_url, "
                                   "created_at, body) VALUES ('e', 's', 'r', 't', NULL, 0, x'00')")
        # SQLite rolls back on its own after SQLITE_FULL: ROLLBACK then fails with "no transaction
        # is active", which must not replace the real error.
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            async with store._transaction() as conn:
                await conn.execute("ROLLBACK")
                raise sqlite3.OperationalError("database or disk is full")


@pytest.mark.skipif(not Path("/dev/full").exists() or sys.platform != "linux", reason="needs Linux")
async def test_disk_full_during_a_run_says_disk_full(upstream, conf_dir, tmp_path):
    # A tiny tmpfs is not available unprivileged; SQLite's max_page_count gives a database that is "full".
    state_path = tmp_path / "state.db"
    write_sync(conf_dir, "a", upstream.url)
    upstream.body = {"response": {"payload": {"employees": [{"employee": {"id": i, "pad": "x" * 500}} for i in range(2000)]}}}
    async with await Store.open(state_path) as store:
        await store._conn.execute("PRAGMA max_page_count = 60")
        settings = load_settings({"config_dir": conf_dir, "state_path": state_path})
        from syncd.engine import poll
        from syncd.http import poll_session
        from syncd.source.fetcher import Source
        async with poll_session() as session:
            result = await poll(load_dir(settings)[0]["a"], store, Source(session, max_bytes=10**8))
    assert not result.ok and "full" in result.error and "rollback" not in result.error, result.error


# -- 7. dangling symlinks; 8. values that pass check and fail every poll -------------------------

async def test_a_dangling_or_looping_symlink_is_a_problem(conf_dir, upstream):
    write_sync(conf_dir, "a", upstream.url)
    (conf_dir / "gone.toml").symlink_to(conf_dir / "nowhere.toml")
    (conf_dir / "loop.toml").symlink_to(conf_dir / "loop.toml")
    code, _, err = await run_cli("check", "--config-dir", str(conf_dir))
    assert code == 78
    assert "gone.toml: file: a symbolic link to" in err and "loop.toml: file:" in err


@pytest.mark.parametrize("extra, api_extra, env, key", [
    ("", 'headers = { "X-Token" = "${TOKEN}" }', {"TOKEN": "abc\r\nX-Injected: 1"}, "api_details.headers.X-Token"),
    ("", 'headers = { "X-Token" = "${TOKEN}" }', {"TOKEN": "abc\ndef"}, "api_details.headers.X-Token"),
    ("", 'headers = { Authorization = "Bearer x" }', {}, "api_details.base_url"),
    ('interval = "500ms"', "", {}, "interval"),
    ('interval = "8d"', "", {}, "interval"),
    ('timeout = "50ms"', "", {}, "timeout"),
    ('timeout = "2h"', "", {}, "timeout"),
    ('webhook_secret = "whsec_"', "", {}, "webhook_secret"),
    ('webhook_secret = "whsec_AAAA"', "", {}, "webhook_secret"),
])
async def test_values_that_would_fail_every_poll_are_check_errors(extra, api_extra, env, key, conf_dir):
    base = "http://user:pw@127.0.0.1:1" if key == "api_details.base_url" else "http://127.0.0.1:1"
    write_sync(conf_dir, "a", base, extra=extra, api_extra=api_extra)
    code, _, err = await run_cli("check", "--config-dir", str(conf_dir), env=cli_env(**env))
    assert code == 78 and f"a.toml: {key}:" in err, err
    assert "X-Injected" not in err


async def test_a_good_whsec_secret_passes_and_a_plain_short_one_warns(conf_dir):
    write_sync(conf_dir, "a", "http://127.0.0.1:1", extra=f'webhook_secret = "{SECRET_OK}"')
    write_sync(conf_dir, "b", "http://127.0.0.1:1", extra='webhook_secret = "short"')
    code, _, err = await run_cli("check", "--config-dir", str(conf_dir))
    assert code == 0 and "b.toml: webhook_secret: warning" in err and "only 5 bytes" in err
    assert "a.toml" not in err


async def test_check_warns_when_events_will_go_out_unsigned(conf_dir):
    write_sync(conf_dir, "a", "http://127.0.0.1:1")
    code, _, err = await run_cli("check", "--config-dir", str(conf_dir))
    assert code == 0 and "unsigned" in err and "a.toml" in err
    code, _, err = await run_cli("check", "--config-dir", str(conf_dir), env=cli_env(SYNCD_WEBHOOK_SECRET=SECRET_OK))
    assert code == 0 and "unsigned" not in err


# -- 11. smaller ones -------------------------------------------------------------------------

async def test_status_of_an_invalid_file_is_not_removed_and_times_are_iso(upstream, conf_dir, state_path):
    write_sync(conf_dir, "a", upstream.url)
    upstream.body = {"response": {"payload": {"employees": [{"employee": {"id": 1}}]}}}
    base = ("--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert (await run_cli("once", "a", *base))[0] == 0
    (conf_dir / "a.toml").write_text((conf_dir / "a.toml").read_text() + "\ntypo = 1\n")
    code, out, _ = await run_cli("status", *base)
    assert code == 0 and "a (invalid file)" in out and "(removed)" not in out
    code, out, _ = await run_cli("status", "--json", *base)
    view = orjson.loads(out)["syncs"][0]
    assert view["definition"] == "invalid" and view["configured"] is True
    assert view["last_run_at"].endswith("Z") and "T" in view["last_run_at"]


async def test_pending_events_show_a_real_next_attempt_time(upstream, conf_dir, state_path):
    write_sync(conf_dir, "a", upstream.url)
    upstream.body = {"response": {"payload": {"employees": [{"employee": {"id": 1}}]}}}
    base = ("--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert (await run_cli("once", "a", *base))[0] == 0
    code, out, _ = await run_cli("deliveries", "list", *base)
    assert code == 0 and "1970" not in out and "pending" in out
    code, out, _ = await run_cli("deliveries", "list", "--json", *base)
    row = orjson.loads(out)[0]
    assert row["nextAttemptAt"].startswith(time.strftime("%Y-")) and row["createdAt"].endswith("Z")


async def test_subcommand_help_lists_only_what_matters(conf_dir):
    code, out, _ = await run_cli("status", "--help")
    assert code == 0 and "--state-path" in out and "--webhook-concurrency" not in out and "--listen" not in out
    code, out, _ = await run_cli("deliveries", "list", "--help")
    assert code == 0 and "--state-path" in out and "--webhook-timeout" not in out
    code, out, _ = await run_cli("check", "--help")  # check validates what run would use: every setting
    assert code == 0 and "--webhook-timeout" in out
    code, out, _ = await run_cli("run", "--help")
    assert code == 0 and "--webhook-concurrency" in out and "--listen" in out
