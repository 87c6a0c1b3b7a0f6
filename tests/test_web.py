"""The operator's web page, in a real headless Chromium: states, the last error, and hostile text
(an error with <script>, a record id with <img onerror>) rendered as text, never run."""

from __future__ import annotations

import asyncio
import base64
import re
import shutil

import aiohttp
import pytest

from syncd.daemon import Daemon
from syncd.settings import load_settings
from syncd.store import Store

from conftest import wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium (Debian package chromium) is not installed")
XSS_SCRIPT = "<script>document.title='PWNED'</script>"
XSS_IMG = "<img src=x onerror=\"document.title='PWNED'\">"


async def dom(url: str) -> str:
    """The page's DOM after load, as Chromium serialises it (scripts, had any run, would show)."""
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--virtual-time-budget=2000", "--dump-dom", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode()


def definition(name, upstream, receiver, path, extra=""):
    return (f'webhook_url = "{receiver.url}/hook"\nlist_identifier = "$.items"\nrecord_identifier = "$.id"\n'
            f'interval = "1h"\n{extra}\n[api_details]\nbase_url = "{upstream.url}"\npath = "{path}"\n'
            "[api_details.retry]\nretries = 0\n")


@pytest.fixture
async def site(upstream, receiver, conf_dir, state_path, monkeypatch):
    """A daemon (in-process) with a good sync, a failing one (hostile error text), a paused one
    and one whose receiver refuses a record with a hostile id (a dead letter)."""
    upstream.bodies["/good"] = {"items": [{"id": 1}, {"id": 2}]}
    upstream.bodies["/paused"] = {"items": [{"id": 1}]}
    upstream.bodies["/hostile"] = {"items": [{"id": XSS_IMG}]}
    upstream.bodies["/failing"] = f"{XSS_SCRIPT} database down".encode()
    for name in ("good", "failing", "paused", "hostile"):
        (conf_dir / f"{name}.toml").write_text(definition(name, upstream, receiver, f"/{name}"))
    receiver.respond = lambda entry: (410, {}) if entry["event"]["recordId"] == XSS_IMG else None
    monkeypatch.setattr("syncd.scheduler.STARTUP_SPREAD", 0.3)  # first polls at once, not over 10 s
    async with await Store.open(state_path) as store:
        await store.set_paused("paused", True)
    settings = load_settings({"config_dir": conf_dir, "state_path": state_path, "listen": "127.0.0.1:0"})
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run())
    await wait_for(lambda: daemon.address is not None or task.done(), timeout=10)
    await wait_for(lambda: len({r["path"].split("?")[0] for r in upstream.requests} & {"/good", "/failing", "/hostile"}) == 3,
                   timeout=20)
    await wait_for(lambda: any(r["status"] == 410 for r in receiver.received), timeout=20)

    async def settled():
        views = {v["id"]: v for v in await daemon.syncs_status()}
        return views["hostile"]["dead_events"] == 1 and views["failing"]["last_outcome"] == "failed" \
            and views["good"]["last_outcome"] == "changed"

    for _ in range(200):
        if await settled():
            break
        await asyncio.sleep(0.05)
    try:
        yield "http://{}:{}".format(*daemon.address)
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 15)


def row_of(html: str, sync_id: str) -> str:
    match = re.search(rf'<tr><td><a href="/syncs/{sync_id}">{sync_id}</a>.*?</tr>', html, re.S)
    assert match, f"no row for {sync_id}"
    return match.group(0)


@needs_chromium
async def test_overview_lists_every_sync_with_its_state(site):
    html = await dom(site + "/")
    assert "<title>syncd</title>" in html and "PWNED" not in html.split("<body>")[0]
    assert 'class="state up">up<' in row_of(html, "good")
    assert 'class="state failing">failing<' in row_of(html, "failing")
    assert 'class="state paused">paused<' in row_of(html, "paused")
    assert html.index('/syncs/failing"') < html.index('/syncs/paused"') < html.index('/syncs/good"')  # failing first
    # The hostile error text is shown as text: no element came out of it.
    assert "&lt;script&gt;document.title='PWNED'&lt;/script&gt;" in row_of(html, "failing")
    assert "<script" not in html and "<img" not in html


@needs_chromium
async def test_detail_pages_show_the_error_and_hostile_text_as_text(site):
    failing = await dom(site + "/syncs/failing")
    assert "<title>syncd: failing</title>" in failing
    assert "Last error" in failing and "database down" in failing
    assert "&lt;script&gt;document.title='PWNED'&lt;/script&gt;" in failing
    hostile = await dom(site + "/syncs/hostile")
    assert "<title>syncd: hostile</title>" in hostile and "Dead letters (1)" in hostile
    assert "&lt;img src=x onerror=\"document.title='PWNED'\"&gt;" in hostile
    for html in (failing, hostile):
        assert "<script" not in html and "<img" not in html and "PWNED</title>" not in html
    assert "<svg" in hostile


async def test_headers_escape_and_keys(site, conf_dir, state_path):
    async with aiohttp.ClientSession() as session:
        async with session.get(site + "/") as resp:
            assert resp.status == 200
            csp = resp.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "script-src" not in csp and "'unsafe-inline'" not in csp
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            text = await resp.text()
        assert "<script" not in text and "&lt;script&gt;" in text
        # An unknown sync is a 404 (a monitor or a bookmark must see it is gone), its name escaped.
        async with session.get(site + "/syncs/" + "%3Cscript%3E") as resp:
            text = await resp.text()
            assert resp.status == 404 and "<script>" not in text and "No sync &lt;script&gt;" in text
            assert resp.headers["Content-Security-Policy"] == csp


async def test_the_page_asks_for_a_key_when_api_keys_are_set(upstream, receiver, conf_dir, state_path):
    key = "web-key-0123456789abcdef"
    settings = load_settings({"config_dir": conf_dir, "state_path": state_path, "listen": "127.0.0.1:0",
                              "api_keys": [key]})
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run())
    await wait_for(lambda: daemon.address is not None or task.done(), timeout=10)
    url = "http://{}:{}/".format(*daemon.address)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as resp:
                assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Basic")
            for password, status in (("wrong", 401), (key, 200)):
                basic = base64.b64encode(f"anyone:{password}".encode()).decode()
                async with session.get(url, headers={"Authorization": f"Basic {basic}"}) as resp:
                    assert resp.status == status
            async with session.get(url, headers={"Authorization": f"Bearer {key}"}) as resp:
                assert resp.status == 200
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 15)
