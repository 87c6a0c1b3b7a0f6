"""`syncd run`: as a sysadmin runs it (a real subprocess on loopback) where the test is about the
process itself - signals, exit codes, systemd notifications, the CLI - and in-process
(`Daemon(settings).run()` on the test's event loop, `inproc_daemons`) where it is about what the
daemon does: hot reload, scheduling, metrics, deliveries. In-process, the config watcher's and the
statistics' timings are shortened by monkeypatching syncd.daemon's constants."""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import shutil
import signal
import socket
import subprocess
from types import SimpleNamespace

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

import syncd.daemon
import syncd.scheduler

from conftest import run_cli, serve, wait_for

LIST = {"items": [{"id": 1, "v": 1}, {"id": 2, "v": 1}]}


def sync_file(conf_dir, name, upstream, receiver, *, path=None, interval="300ms", extra=""):
    (conf_dir / f"{name}.toml").write_text(
        f'webhook_url = "{receiver.url}/hook"\nlist_identifier = "$.items"\nrecord_identifier = "$.id"\n'
        f'interval = "{interval}"\n{extra}\n[api_details]\nbase_url = "{upstream.url}"\npath = "{path or "/" + name}"\n'
    )


async def scrape(address: str) -> dict[str, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{address}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def fast_watch(monkeypatch):
    """The in-process daemon lets a change to config_dir settle for 100 ms, not 300 (with inotify
    and without), and without inotify looks at it every 100 ms, not 500: reloads come sooner."""
    monkeypatch.setattr(syncd.daemon, "WATCH_INTERVAL", 0.1)
    monkeypatch.setattr(syncd.daemon, "SETTLE", 0.1)


def polled(upstream, path: str) -> int:
    return len(upstream.hits(path))


def removed(d, sync_id: str) -> bool:
    return any(e.get("removed") == [sync_id] for e in d.events("configuration loaded"))


async def test_hot_reload_add_edit_break_delete(upstream, receiver, conf_dir, state_path, inproc_daemons, fast_watch,
                                               monkeypatch):
    monkeypatch.setattr(syncd.scheduler, "ADDED_SPREAD", 0.3)
    monkeypatch.setattr(syncd.daemon, "FRESH", 0.3)  # an invalid file is reported once it is 0.3 s old, not 1 s
    upstream.body = LIST
    fast = functools.partial(sync_file, interval="150ms")
    fast(conf_dir, "a", upstream, receiver)
    d = await inproc_daemons(conf_dir, state_path)
    await wait_for(lambda: polled(upstream, "/a") >= 2, timeout=5)

    # Added: polled within the reload plus its start spread (ADDED_SPREAD).
    fast(conf_dir, "b", upstream, receiver)
    await wait_for(lambda: polled(upstream, "/b") >= 1, timeout=4)
    await wait_for(lambda: len([e for e in receiver.delivered() if e["syncJobId"] == "b"]) == 2)

    # Edited: the new path is polled, the old one no longer. A sync's polls never overlap, so once
    # /b2 was requested no request to /b can still be on its way: /b must stay as it is while /b2
    # is polled three more times.
    fast(conf_dir, "b", upstream, receiver, path="/b2")
    await wait_for(lambda: polled(upstream, "/b2") >= 1, timeout=4)
    old, b2 = polled(upstream, "/b"), polled(upstream, "/b2")
    await wait_for(lambda: polled(upstream, "/b2") >= b2 + 3, timeout=4)
    assert polled(upstream, "/b") == old

    # Broken: the last good version keeps running and the failure is counted and logged.
    before = value(await scrape(d.address), "syncd_config_reload_failures_total") or 0
    (conf_dir / "b.toml").write_text("webhook_url = [broken\n")
    await wait_for(lambda: any(e.get("file", "").endswith("b.toml") for e in d.events("invalid sync definition")), timeout=4)
    hits = polled(upstream, "/b2")
    await wait_for(lambda: polled(upstream, "/b2") >= hits + 2, timeout=4)
    after = value(await scrape(d.address), "syncd_config_reload_failures_total")
    assert after > before
    logged = d.events("invalid sync definition")[-1]
    assert logged["file"].endswith("b.toml") and logged["key"] == "line 1"

    # Deleted: polling stops; the other sync was never interrupted. A poll of b already under way
    # at the reload may still reach the API: count once /a was polled again, then /b2 must stay
    # as it is while /a is polled three more times.
    (conf_dir / "b.toml").unlink()
    await wait_for(lambda: removed(d, "b"), timeout=4)
    a_hits = polled(upstream, "/a")
    await wait_for(lambda: polled(upstream, "/a") >= a_hits + 1, timeout=4)
    hits, a_hits = polled(upstream, "/b2"), polled(upstream, "/a")
    await wait_for(lambda: polled(upstream, "/a") >= a_hits + 3, timeout=4)
    assert polled(upstream, "/b2") == hits
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(upstream.hits("/a"))]
    assert max(gaps) < 1.0, gaps
    await d.stop()


async def test_sighup_reloads(upstream, receiver, conf_dir, state_path, daemons):
    upstream.body = LIST
    # 1 s, not 1 h: a never-polled sync's first poll is spread over min(interval, 10 s) after the start.
    sync_file(conf_dir, "a", upstream, receiver, interval="1s")
    d = await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path))
    await wait_for(lambda: len(upstream.hits("/a")) >= 1, timeout=5)
    reloads = len(d.events("configuration loaded"))
    d.proc.send_signal(signal.SIGHUP)
    await wait_for(lambda: len(d.events("configuration loaded")) > reloads, timeout=5)
    assert await d.stop() == 0


async def test_sigterm_exits_zero_and_nothing_is_lost(upstream, receiver, conf_dir, state_path, daemons):
    upstream.body = {"items": [{"id": i, "v": 1} for i in range(50)]}
    hold = asyncio.Event()

    async def slow(entry):
        await asyncio.wait_for(hold.wait(), 60)
        return None

    receiver.respond = slow
    sync_file(conf_dir, "a", upstream, receiver, interval="1s")  # a real `syncd run`: DESIGN's 1 s minimum
    d = await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path), "--shutdown-timeout", "500ms",
                      "--webhook-concurrency", "4")
    await wait_for(lambda: len(receiver.received) + len([r for r in receiver.attempts]) >= 4, timeout=10)
    assert await asyncio.wait_for(d.stop(signal.SIGTERM), 10) == 0
    assert d.events("syncd stopped")
    receiver.respond = None
    hold.set()
    # The next start delivers everything that was pending.
    d2 = await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path))
    await wait_for(lambda: {e["recordId"] for e in receiver.delivered()} >= {str(i) for i in range(50)}, timeout=15)
    assert await d2.stop(signal.SIGINT) == 0


async def test_metrics_health_and_status_endpoints(upstream, receiver, conf_dir, state_path, inproc_daemons, fast_watch,
                                                  monkeypatch):
    monkeypatch.setattr(syncd.daemon, "STATS_INTERVAL", 0.1)
    upstream.body = LIST
    sync_file(conf_dir, "a", upstream, receiver)
    sync_file(conf_dir, "bad", upstream, receiver, path="/x")
    upstream.bodies["/x"] = b"<html>oops</html>"
    d = await inproc_daemons(conf_dir, state_path)
    stats_rounds: list[str] = []  # the statistics task ends each round with a status line
    monkeypatch.setattr(d.daemon.notifier, "status", stats_rounds.append)
    await wait_for(lambda: len(receiver.delivered()) == 2 and len(upstream.hits("/x")) >= 2, timeout=10)

    async def pending_events() -> int:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{d.address}/v1/syncs") as resp:
                return sum(s["pending_events"] for s in (await resp.json())["syncs"])

    for _ in range(200):  # the two deliveries are committed...
        if await pending_events() == 0:
            break
        await asyncio.sleep(0.05)
    # ... and a whole statistics round ran after that.
    rounds = len(stats_rounds)
    await wait_for(lambda: len(stats_rounds) >= rounds + 2, timeout=5)
    samples = await scrape(d.address)
    assert value(samples, "syncd_build_info", version=__import__("syncd").__version__) == 1
    assert value(samples, "syncd_syncs") == 2
    assert value(samples, "syncd_sync_up", sync="a") == 1 and value(samples, "syncd_sync_up", sync="bad") == 0
    assert value(samples, "syncd_sync_polls_total", sync="a") >= 1
    assert value(samples, "syncd_sync_poll_failures_total", sync="bad") >= 1
    # The duration histograms count all syncs together unless per_sync_histograms is set.
    assert value(samples, "syncd_sync_poll_duration_seconds_count") >= 1
    assert value(samples, "syncd_sync_records", sync="a") == 2
    assert value(samples, "syncd_sync_events_total", sync="a", type="record.new") == 2
    assert value(samples, "syncd_sync_events_total", sync="a", type="record.deleted") == 0
    assert value(samples, "syncd_sync_last_success_timestamp_seconds", sync="a") > 1e9
    assert value(samples, "syncd_sync_last_change_timestamp_seconds", sync="a") > 1e9
    assert value(samples, "syncd_config_reloads_total") == 0
    assert value(samples, "syncd_config_reload_failures_total") == 0
    assert value(samples, "syncd_deliveries_total", sync="a") == 2
    assert value(samples, "syncd_delivery_failures_total", sync="a") == 0
    assert value(samples, "syncd_delivery_duration_seconds_count") == 2
    assert value(samples, "syncd_delivery_queue_depth", sync="a") == 0
    assert value(samples, "syncd_delivery_dead_letters", sync="a") == 0
    assert value(samples, "syncd_delivery_oldest_pending_age_seconds", sync="a") == 0

    async with aiohttp.ClientSession() as session:
        for path, status in (("/healthz", 200), ("/readyz", 200)):
            async with session.get(f"http://{d.address}{path}") as resp:
                assert resp.status == status
        async with session.get(f"http://{d.address}/v1/syncs") as resp:
            syncs = {s["id"]: s for s in (await resp.json())["syncs"]}
    assert syncs["a"]["records"] == 2 and syncs["a"]["last_outcome"] in ("changed", "unchanged")
    assert syncs["bad"]["last_outcome"] == "failed" and "JSON" in syncs["bad"]["last_error"]

    # A removed sync's series disappear.
    (conf_dir / "bad.toml").unlink()
    await wait_for(lambda: removed(d, "bad"), timeout=5)
    samples = await scrape(d.address)
    assert not [k for k in samples if ("sync", "bad") in k[1]]
    assert value(samples, "syncd_syncs") == 1

    code, out, err = await run_cli("status", "--json", "--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert code == 0, err
    status = {s["id"]: s for s in orjson.loads(out)["syncs"]}
    assert status["a"]["records"] == 2 and status["a"]["pending_events"] == 0
    assert status["bad"]["configured"] is False
    code, out, _ = await run_cli("status", "--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert code == 0 and "SYNC" in out and "bad (removed)" in out
    await d.stop()


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool (Debian package prometheus) not installed")
async def test_promtool_accepts_the_metrics(upstream, receiver, conf_dir, state_path, inproc_daemons):
    upstream.body = LIST
    sync_file(conf_dir, "a", upstream, receiver)
    d = await inproc_daemons(conf_dir, state_path)
    await wait_for(lambda: len(receiver.delivered()) == 2, timeout=10)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{d.address}/metrics") as resp:
            text = await resp.read()
    proc = await asyncio.create_subprocess_exec("promtool", "check", "metrics", stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(text), 30)
    assert proc.returncode == 0, out
    await d.stop()


async def test_removed_sync_still_delivers_its_pending_webhooks(upstream, receiver, conf_dir, state_path, inproc_daemons,
                                                                fast_watch):
    upstream.body = LIST
    down = True
    receiver.respond = lambda entry: (503, {}) if down else None
    sync_file(conf_dir, "a", upstream, receiver)
    d = await inproc_daemons(conf_dir, state_path, webhook_retry_schedule=["200ms"] * 8)
    await wait_for(lambda: len(receiver.received) >= 2, timeout=10)
    (conf_dir / "a.toml").unlink()
    await wait_for(lambda: removed(d, "a"), timeout=5)
    down = False
    await wait_for(lambda: len(receiver.delivered()) == 2, timeout=10)
    await d.stop()


async def test_reset_makes_the_next_run_initial(upstream, receiver, conf_dir, state_path):
    upstream.body = LIST
    sync_file(conf_dir, "a", upstream, receiver, interval="1s")
    base = ("--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert (await run_cli("once", "a", *base))[0] == 0
    code, out, _ = await run_cli("reset", "a", *base)
    assert code == 0 and "reset a" in out
    code, out, _ = await run_cli("once", "a", *base)
    assert code == 0 and {orjson.loads(line)["syncType"] for line in out.splitlines()} == {"initial_sync"}
    code, _, err = await run_cli("reset", "nope", *base)
    assert code == 2 and "nope" in err


async def test_systemd_notify_protocol(upstream, receiver, conf_dir, state_path, tmp_path, daemons):
    upstream.body = LIST
    sync_file(conf_dir, "a", upstream, receiver, interval="1s")  # a real `syncd run`: DESIGN's 1 s minimum
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.setblocking(False)
    messages: list[str] = []
    loop = asyncio.get_running_loop()

    def readable():
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                return

    loop.add_reader(sock.fileno(), readable)
    try:
        env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"}
        env = {k: v for k, v in env.items() if not k.startswith("SYNCD_")}
        d = await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path), env=env)
        await wait_for(lambda: any("READY=1" in m for m in messages), timeout=5)
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=" in ready and "syncs" in ready
        await wait_for(lambda: sum("WATCHDOG=1" in m for m in messages) >= 3, timeout=5)  # every 200 ms
        await wait_for(lambda: any(m.startswith("STATUS=") for m in messages), timeout=5)

        count = len(messages)
        d.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: any("READY=1" in m for m in messages[count:]), timeout=5)
        reloading = next(m for m in messages[count:] if "RELOADING=1" in m)
        usec = int(reloading.split("MONOTONIC_USEC=")[1].split()[0])
        assert abs(usec / 1e6 - __import__("time").monotonic()) < 30
        assert messages.index(reloading) < max(i for i, m in enumerate(messages) if "READY=1" in m)

        # The state file lost under the daemon: `systemctl status` keeps saying so (the periodic
        # status line must not cover it), and the log says why polling stopped.
        state_path.unlink()
        await wait_for(lambda: any("STATUS=" in m and "deleted" in m for m in messages), timeout=10)
        lost_at = len(messages)
        await wait_for(lambda: sum(m.startswith("STATUS=") for m in messages[lost_at:]) >= 1, timeout=10)
        assert "deleted" in [m for m in messages if m.startswith("STATUS=")][-1]
        assert d.events("polling stopped (state database lost); state and pending webhooks kept")

        assert await d.stop() == 0
        assert any("STOPPING=1" in m for m in messages)
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()


async def test_two_hundred_syncs_no_starvation_no_overlap(upstream, receiver, conf_dir, state_path, inproc_daemons):
    """200 syncs at a 1 s interval against one host, until every one was polled `polls` times: none is
    starved (each is polled about once a second throughout, never skipping an interval) and none
    overlaps itself (a 50 ms answer would show two polls of one sync in flight at once)."""
    polls, interval, jitter = 5, 1.0, 0.1  # interval ±10%; the first polls spread over one interval
    upstream.body = LIST
    upstream.delay = 0.05
    paths = [f"/s{n:03d}" for n in range(200)]
    for path in paths:
        sync_file(conf_dir, path[1:], upstream, receiver, interval="1s")
    # All 200 syncs poll one host: lift the per-host request limit (default 8) along with the poll limit.
    d = await inproc_daemons(conf_dir, state_path, max_concurrent_polls=64, max_requests_per_host=64)
    loop = asyncio.get_running_loop()
    started = loop.time()
    counts: dict[str, int] = {}

    def every_sync_polled_enough() -> bool:
        counts.clear()
        for r in upstream.requests:
            counts[r["path"]] = counts.get(r["path"], 0) + 1
        return len(counts) == len(paths) and min(counts.values()) >= polls

    await wait_for(every_sync_polled_enough, timeout=3 * polls * interval, interval=0.1)
    elapsed = loop.time() - started
    await d.stop()

    # Expected: the first poll within one interval, then one every 0.9-1.1 s: `polls` polls of every
    # sync within ~1 + (polls - 1) * 1.1 s; the slack allows for a busy machine.
    assert elapsed <= interval + (polls - 1) * interval * (1 + jitter) + 1.0, (elapsed, sorted(counts.values())[:10])
    assert max(counts.values()) <= elapsed / (interval * (1 - jitter)) + 2, sorted(counts.values())[-10:]
    gaps = {p: [b["at"] - a["at"] for a, b in itertools.pairwise(upstream.hits(p))] for p in paths}
    means = sorted((sum(g) / len(g), p) for p, g in gaps.items())
    assert means[-1][0] <= interval * (1 + jitter) + 0.15, means[-5:]  # no sync falls behind
    longest = max((max(g), p) for p, g in gaps.items())
    assert longest[0] < 2 * interval, longest  # ... nor ever misses an interval
    shortest = min((min(g), p) for p, g in gaps.items())
    assert shortest[0] > interval * (1 - jitter) / 2, shortest  # nor is polled twice in a row
    assert max(upstream.max_inflight.values()) == 1  # a poll never overlaps itself


async def test_a_slow_poll_delays_only_its_own_sync(receiver, conf_dir, state_path, inproc_daemons):
    # One API host for both syncs (as in production: they share its request limit); /slow answers
    # only at the end of the test, so its first poll hangs meanwhile.
    release, hits = asyncio.Event(), []

    async def api(request):
        hits.append(request.path)
        if request.path == "/slow":
            await asyncio.wait_for(release.wait(), 30)
        return web.json_response(LIST)

    runner, port = await serve(api)
    try:
        host = SimpleNamespace(url=f"http://127.0.0.1:{port}")
        sync_file(conf_dir, "slow", host, receiver, interval="200ms")
        sync_file(conf_dir, "fast", host, receiver, interval="200ms")
        d = await inproc_daemons(conf_dir, state_path, max_concurrent_polls=2)
        await wait_for(lambda: "/slow" in hits, timeout=5)
        loop = asyncio.get_running_loop()
        start, t0 = hits.count("/fast"), loop.time()
        await wait_for(lambda: hits.count("/fast") - start >= 8, timeout=2.5)  # ~12 expected at 200 ms in 2.5 s
        assert loop.time() - t0 >= 7 * 0.2 * 0.9  # and no more often than its own interval allows
        assert hits.count("/slow") == 1  # never overlapping itself
        release.set()
        await d.stop()
    finally:
        release.set()
        await runner.cleanup()


async def test_half_written_files_and_editor_renames_cause_no_errors(upstream, receiver, conf_dir, state_path, inproc_daemons,
                                                                    monkeypatch):
    # The real settle time (300 ms, longer than the slow writer's pause); without inotify, looked at
    # every 100 ms.
    monkeypatch.setattr(syncd.daemon, "WATCH_INTERVAL", 0.1)
    assert syncd.daemon.SETTLE > 0.1 * 2
    upstream.body = LIST
    sync_file(conf_dir, "a", upstream, receiver)
    d = await inproc_daemons(conf_dir, state_path)
    text = (conf_dir / "a.toml").read_text().replace('path = "/a"', 'path = "/a2"')
    for _ in range(3):
        # A slow writer: the first half, a pause shorter than the settle time, then the rest.
        with open(conf_dir / "b.toml", "w") as f:
            f.write(text[:40])
            f.flush()
            await asyncio.sleep(0.1)
            f.write(text[40:].replace("/a2", "/b"))
        # An editor: write a hidden temporary, then rename it over the file.
        (conf_dir / ".a.toml.tmp").write_text(text)
        os.replace(conf_dir / ".a.toml.tmp", conf_dir / "a.toml")
        await asyncio.sleep(0.5)
    await wait_for(lambda: len(upstream.hits("/a2")) >= 1 and len(upstream.hits("/b")) >= 1, timeout=5)
    assert d.events("invalid sync definition") == []
    await d.stop()
