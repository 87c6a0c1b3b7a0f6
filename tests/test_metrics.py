"""The /metrics exposition: the fast text path says what prometheus_client says, over real HTTP."""

from __future__ import annotations

import asyncio
import gzip

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from syncd import server
from syncd.metrics import Metrics


def samples(text: bytes) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def families(text: bytes) -> dict[str, tuple[str, str]]:
    return {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(text.decode())}


def busy_metrics(**kwargs) -> Metrics:
    m = Metrics(**kwargs)
    for sid in ("a", "b", 'odd "id"\\x', "gone"):
        m.add_sync(sid)
    m.interval.labels("a").set(300)
    m.sync_up.labels("a").set(1)
    m.polls.labels("a").inc()
    m.polls.labels("a").inc(2)
    m.last_success.labels("a").set(1764511234.1234567)
    m.records.labels("b").set(12345678901)
    m.events.labels("a", "record.modified").inc(7)
    m.skipped.labels('odd "id"\\x', "duplicate_id").inc(2)
    m.deliveries.labels("b").inc()
    m.queue_depth.labels("b").set(3)
    m.oldest_pending.labels("b").set(0.25)
    m.poll_histogram("a").observe(0.3)
    m.delivery_histogram("b").observe(0.02)
    m.reloads.inc()
    m.syncs.set(4)
    m.remove_sync("gone")
    return m


@pytest.mark.parametrize("per_sync_histograms", [False, True])
def test_render_says_what_prometheus_client_says(per_sync_histograms):
    m = busy_metrics(per_sync_histograms=per_sync_histograms)
    fast, reference = m.render(), generate_latest(m.registry)
    assert samples(fast) == samples(reference)
    assert families(fast) == families(reference)
    s = samples(fast)
    assert s[("syncd_sync_polls_total", (("sync", "a"),))] == 3
    assert s[("syncd_sync_last_success_timestamp_seconds", (("sync", "a"),))] == 1764511234.1234567
    assert s[("syncd_sync_records", (("sync", "b"),))] == 12345678901
    assert s[("syncd_sync_skipped_records_total", (("reason", "duplicate_id"), ("sync", 'odd "id"\\x')))] == 2
    assert s[("syncd_sync_events_total", (("sync", "b"), ("type", "record.deleted")))] == 0
    assert not [k for k in s if ("sync", "gone") in k[1]]
    per_sync = [k for k in s if k[0] == "syncd_sync_poll_duration_seconds_count"]
    assert per_sync == ([("syncd_sync_poll_duration_seconds_count", (("sync", sid),)) for sid in ("a", "b", 'odd "id"\\x')]
                        if per_sync_histograms else [("syncd_sync_poll_duration_seconds_count", ())])


def test_series_keep_prometheus_client_semantics():
    m = Metrics()
    m.add_sync("a")
    with pytest.raises(ValueError):
        m.polls.labels("a").inc(-1)
    m.queue_depth.labels(sync="a").set(5)
    m.queue_depth.labels("a").dec(2)
    assert m.queue_depth.labels("a").get() == 3
    with pytest.raises(ValueError):
        m.events.labels("a")  # the event type is missing


async def serve(metrics: Metrics):
    app = server.build_app(metrics, ready=lambda: (True, "ok"), syncs_status=lambda: asyncio.sleep(0, []))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"


async def test_metrics_endpoint_gzips_for_prometheus_and_not_for_curl():
    m = Metrics()
    for i in range(2000):
        m.add_sync(f"sync-{i}")
    m.polls.labels("sync-7").inc()
    runner, url = await serve(m)
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            async with session.get(url, headers={"Accept-Encoding": "gzip"}) as resp:
                assert resp.status == 200 and resp.headers["Content-Encoding"] == "gzip"
                assert resp.headers["Content-Type"].startswith("text/plain; version=")
                zipped = await resp.read()
            async with session.get(url, headers={"Accept-Encoding": "identity"}) as resp:
                assert "Content-Encoding" not in resp.headers
                plain = await resp.read()
        assert gzip.decompress(zipped) == plain and len(zipped) * 5 < len(plain)
        assert samples(plain)[("syncd_sync_polls_total", (("sync", "sync-7"),))] == 1
    finally:
        await runner.cleanup()


async def test_concurrent_scrapes_all_get_the_metrics_and_later_ones_see_changes():
    m = Metrics()
    for i in range(1000):
        m.add_sync(f"s{i}")
    runner, url = await serve(m)
    try:
        async with aiohttp.ClientSession() as session:
            async def scrape() -> dict:
                async with session.get(url) as resp:
                    assert resp.status == 200
                    return samples(await resp.read())

            results = await asyncio.gather(*(scrape() for _ in range(5)))
            assert all(len([k for k in r if k[0] == "syncd_sync_up"]) == 1000 for r in results)
            m.remove_sync("s0")
            m.polls.labels("s1").inc()
            after = await scrape()
            assert ("syncd_sync_up", (("sync", "s0"),)) not in after
            assert after[("syncd_sync_polls_total", (("sync", "s1"),))] == 1
    finally:
        await runner.cleanup()
