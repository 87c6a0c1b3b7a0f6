"""Pagination against local APIs that really paginate, in each of the five styles.

Every style is run over five pages with a record added, one changed and one removed across pages
between runs (newest first, so the new record pushes the others down a page): exactly those three
events. A page failing, a cursor going round in circles and an endless list fail the run quickly
and change nothing. Without pagination configured, a response that says there is more holds
deletes and warns.
"""

from __future__ import annotations

import asyncio
import base64
import time

import orjson
import pytest
from aiohttp import web

from syncd.config import load_dir
from syncd.engine import poll
from syncd.http import poll_session
from syncd.settings import load_settings
from syncd.source.fetcher import Source
from syncd.store import Store

from conftest import cli_env, run_cli, serve

PER_PAGE = 4


class PagedApi:
    """Records served newest first (highest id first) in five API styles."""

    def __init__(self) -> None:
        self.records = [{"id": i, "name": f"r{i}", "v": 1} for i in range(20, 0, -1)]
        self.requests: list[str] = []
        self.fail_page: int | None = None  # answer 500 for this page number (1-based)
        self.url = ""

    def set_records(self, records):
        self.records = sorted(records, key=lambda r: -r["id"])

    def _slice(self, start: int, size: int = PER_PAGE) -> list[dict]:
        return self.records[start:start + size]

    def _fail(self, number: int) -> web.Response | None:
        if self.fail_page == number:
            return web.json_response({"error": "database timeout"}, status=500)
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path_qs)
        q = request.query
        style = request.path.strip("/")
        if style == "page":  # ?page=N&per_page=S, an empty page after the last
            number = int(q.get("page", "1"))
            size = int(q.get("per_page", PER_PAGE))
            return self._fail(number) or web.json_response({"items": self._slice((number - 1) * size, size)})
        if style == "offset":  # ?offset=O&limit=L with a total
            offset, limit = int(q.get("offset", "0")), int(q.get("limit", PER_PAGE))
            return (self._fail(offset // limit + 1)
                    or web.json_response({"items": self._slice(offset, limit), "total": len(self.records)}))
        if style == "cursor":  # opaque cursor in meta.next_cursor
            start = int(base64.b64decode(q["cursor"])) if "cursor" in q else 0
            nxt = start + PER_PAGE
            cursor = base64.b64encode(str(nxt).encode()).decode() if nxt < len(self.records) else None
            return (self._fail(start // PER_PAGE + 1)
                    or web.json_response({"data": self._slice(start), "meta": {"next_cursor": cursor}}))
        if style == "stripe":  # has_more + starting_after=<last id>
            ids = [r["id"] for r in self.records]
            start = ids.index(int(q["starting_after"])) + 1 if "starting_after" in q else 0
            page = self._slice(start)
            return (self._fail(start // PER_PAGE + 1)
                    or web.json_response({"object": "list", "data": page, "has_more": start + PER_PAGE < len(ids)}))
        if style == "jsonapi":  # links.next, a relative URL
            number = int(q.get("page[number]", "1"))
            start = (number - 1) * PER_PAGE
            nxt = f"/jsonapi?page[number]={number + 1}" if start + PER_PAGE < len(self.records) else None
            return self._fail(number) or web.json_response({"data": self._slice(start), "links": {"next": nxt}})
        if style == "github":  # Link: <...>; rel="next", absolute URL
            number = int(q.get("page", "1"))
            start = (number - 1) * PER_PAGE
            headers = {}
            if start + PER_PAGE < len(self.records):
                headers["Link"] = (f'<{self.url}/github?page={number + 1}&per_page=4>; rel="next", '
                                   f'<{self.url}/github?page=5&per_page=4>; rel="last"')
            return self._fail(number) or web.json_response(self._slice(start), headers=headers)
        return web.json_response({"error": "no such style"}, status=404)


@pytest.fixture
async def api():
    paged = PagedApi()
    runner, port = await serve(paged.handle)
    paged.url = f"http://127.0.0.1:{port}"
    try:
        yield paged
    finally:
        await runner.cleanup()


STYLES = {
    "page": ('list_identifier = "$.items"', "/page",
             'type = "page"\nsize_param = "per_page"\nsize = 4'),
    "offset": ('list_identifier = "$.items"', "/offset",
               'type = "offset"\nlimit = 4\ntotal_path = "$.total"'),
    "cursor": ('list_identifier = "$.data"', "/cursor",
               'type = "cursor"\ncursor_path = "$.meta.next_cursor"'),
    "stripe": ('list_identifier = "$.data"', "/stripe",
               'type = "cursor"\ncursor_from_last_record = "$.id"\nparam = "starting_after"\nstop_path = "$.has_more"'),
    "next_url": ('list_identifier = "$.data"', "/jsonapi",
                 'type = "next_url"\nnext_url_path = "$.links.next"'),
    "link_header": ('list_identifier = "$"', "/github?per_page=4",
                    'type = "link_header"'),
}


def write(conf_dir, name, base_url, list_line, path, pagination: str | None, extra: str = "", api_extra: str = ""):
    text = (f'webhook_url = "http://127.0.0.1:9/hook"\n{list_line}\nrecord_identifier = "$.id"\n{extra}\n'
            f'[api_details]\nbase_url = "{base_url}"\npath = "{path}"\n{api_extra}\n'
            '[api_details.retry]\nretries = 0\n')
    if pagination:
        text += f"[api_details.pagination]\n{pagination}\n"
    (conf_dir / f"{name}.toml").write_text(text)


class Engine:
    """The engine as the daemon runs it: real store, real HTTP, one Source for every poll."""

    def __init__(self, conf_dir, state_path):
        self.settings = load_settings({"config_dir": conf_dir, "state_path": state_path})

    async def __aenter__(self):
        self.store = await Store.open(self.settings.state_path)
        self.session = poll_session()
        self.source = Source(self.session, max_bytes=10**8)
        return self

    async def __aexit__(self, *exc):
        await self.session.close()
        await self.store.close()

    async def poll(self, sync_id, **kwargs):
        syncs, problems = load_dir(self.settings)
        assert not problems, problems
        result = await poll(syncs[sync_id], self.store, self.source, **kwargs)
        result.parsed = [orjson.loads(b) for b in result.events]
        return result

    async def record_ids(self, sync_id):
        state = await self.store.sync_state(sync_id)
        return set(await self.store.fingerprints(state))


def kinds(result):
    return sorted((e["eventType"], e["recordId"]) for e in result.parsed)


@pytest.mark.parametrize("style", sorted(STYLES))
async def test_each_style_reads_every_page_and_reports_exactly_the_changes(style, api, conf_dir, state_path):
    list_line, path, pagination = STYLES[style]
    write(conf_dir, "s", api.url, list_line, path, pagination)
    async with Engine(conf_dir, state_path) as engine:
        first = await engine.poll("s")
        assert first.ok, first.error
        assert len(first.parsed) == 20 and {e["eventType"] for e in first.parsed} == {"record.new"}
        assert first.pages >= 5
        assert await engine.record_ids("s") == {str(i) for i in range(1, 21)}

        # Newest first: record 21 lands on page 1 and pushes every other record one place down;
        # record 9 (page 3) changes, record 2 (page 5) goes.
        records = [r for r in api.records if r["id"] != 2] + [{"id": 21, "name": "r21", "v": 1}]
        for r in records:
            if r["id"] == 9:
                r["v"] = 2
        api.set_records(records)
        second = await engine.poll("s")
        assert second.ok, second.error
        assert kinds(second) == [("record.deleted", "2"), ("record.modified", "9"), ("record.new", "21")]
        assert second.invalid_ids == 0 and second.duplicate_ids == 0

        third = await engine.poll("s")  # nothing changed: no events
        assert third.ok and third.parsed == [] and third.outcome == "unchanged"


@pytest.mark.parametrize("style", ["page", "stripe", "link_header"])
async def test_a_failing_page_fails_the_whole_run_and_changes_nothing(style, api, conf_dir, state_path):
    list_line, path, pagination = STYLES[style]
    write(conf_dir, "s", api.url, list_line, path, pagination)
    async with Engine(conf_dir, state_path) as engine:
        assert (await engine.poll("s")).ok
        before = await engine.record_ids("s")
        api.set_records([r for r in api.records if r["id"] not in (1, 3)] + [{"id": 30, "name": "new", "v": 1}])
        api.fail_page = 4
        failed = await engine.poll("s")
        assert not failed.ok and failed.parsed == []
        assert "500" in failed.error and "page 4" in failed.error and "database timeout" in failed.error
        assert await engine.record_ids("s") == before  # nothing deleted, nothing added
        assert await engine.store.outbox() == [e for e in await engine.store.outbox() if e.event_type == "record.new"]
        queued = len(await engine.store.outbox())

        api.fail_page = None
        good = await engine.poll("s")
        assert good.ok
        assert kinds(good) == [("record.deleted", "1"), ("record.deleted", "3"), ("record.new", "30")]
        assert len(await engine.store.outbox()) == queued + 3


async def test_a_cursor_that_repeats_fails_quickly(conf_dir, state_path):
    calls = []

    async def handler(request):
        calls.append(request.path_qs)
        return web.json_response({"data": [{"id": len(calls)}], "next": "same-cursor"})

    runner, port = await serve(handler)
    try:
        write(conf_dir, "s", f"http://127.0.0.1:{port}", 'list_identifier = "$.data"', "/",
              'type = "cursor"\ncursor_path = "$.next"')
        async with Engine(conf_dir, state_path) as engine:
            t0 = time.monotonic()
            result = await engine.poll("s")
            assert not result.ok and "already used" in result.error and "same-cursor" in result.error
            assert time.monotonic() - t0 < 5 and len(calls) == 2
            assert result.parsed == [] and await engine.store.outbox() == []
    finally:
        await runner.cleanup()


async def test_an_api_that_always_links_a_next_page_fails_quickly(conf_dir, state_path):
    async def same_link(request):
        return web.json_response([{"id": 1}], headers={"Link": f'<{request.url}>; rel="next"'})

    counter = iter(range(10**6))

    async def endless(request):
        n = next(counter)
        return web.json_response([{"id": n}], headers={"Link": f'</endless?page={n + 1}>; rel="next"'})

    async def handler(request):
        return await (endless(request) if request.path == "/endless" else same_link(request))

    runner, port = await serve(handler)
    try:
        url = f"http://127.0.0.1:{port}"
        write(conf_dir, "same", url, 'list_identifier = "$"', "/same", 'type = "link_header"')
        write(conf_dir, "endless", url, 'list_identifier = "$"', "/endless", 'type = "link_header"\nmax_pages = 50')
        write(conf_dir, "default", url, 'list_identifier = "$"', "/endless", 'type = "link_header"')
        async with Engine(conf_dir, state_path) as engine:
            same = await engine.poll("same")
            assert not same.ok and "already used" in same.error and same.pages == 2
            endless_run = await engine.poll("endless")
            assert not endless_run.ok and "max_pages (50)" in endless_run.error and endless_run.pages == 50
            t0 = time.monotonic()
            default = await engine.poll("default")  # the default bound of 1000 pages, still in seconds
            assert not default.ok and "max_pages (1000)" in default.error
            assert time.monotonic() - t0 < 30
            assert await engine.store.outbox() == []
    finally:
        await runner.cleanup()


async def test_stop_path_saying_more_without_a_cursor_fails(conf_dir, state_path):
    async def handler(request):
        return web.json_response({"data": [], "has_more": True})

    runner, port = await serve(handler)
    try:
        write(conf_dir, "s", f"http://127.0.0.1:{port}", 'list_identifier = "$.data"', "/",
              'type = "cursor"\ncursor_from_last_record = "$.id"\nparam = "starting_after"\nstop_path = "$.has_more"')
        async with Engine(conf_dir, state_path) as engine:
            result = await engine.poll("s")
            assert not result.ok and "stop_path" in result.error and "partial list" in result.error
    finally:
        await runner.cleanup()


async def test_params_in_body_and_header(conf_dir, state_path):
    seen = []

    async def handler(request):
        body = orjson.loads(await request.read())
        seen.append((request.method, body, request.headers.get("X-Page")))
        number = body.get("page") or int(request.headers.get("X-Page", "1"))
        items = [{"id": i} for i in range((number - 1) * 2, min(number * 2, 5))]
        return web.json_response({"items": items})

    runner, port = await serve(handler)
    try:
        url = f"http://127.0.0.1:{port}"
        write(conf_dir, "body", url, 'list_identifier = "$.items"', "/",
              'type = "page"\nparam_in = "body"', api_extra='method = "POST"\nbody = \'{"filter": "all"}\'')
        write(conf_dir, "header", url, 'list_identifier = "$.items"', "/",
              'type = "page"\nparam = "X-Page"\nparam_in = "header"', api_extra='method = "POST"\nbody = "{}"')
        async with Engine(conf_dir, state_path) as engine:
            result = await engine.poll("body")
            assert result.ok and len(result.parsed) == 5 and result.pages == 4
            assert [b for m, b, _ in seen] == [{"filter": "all", "page": n} for n in (1, 2, 3, 4)]
            seen.clear()
            result = await engine.poll("header")
            assert result.ok and len(result.parsed) == 5
            assert [h for _, _, h in seen] == ["1", "2", "3", "4"]
    finally:
        await runner.cleanup()


async def test_duplicates_and_invalid_ids_span_pages(conf_dir, state_path):
    pages = {1: [{"id": 1}, {"id": 2}], 2: [{"id": 2}, {"nope": 1}], 3: []}

    async def handler(request):
        return web.json_response({"items": pages[int(request.query.get("page", "1"))]})

    runner, port = await serve(handler)
    try:
        write(conf_dir, "s", f"http://127.0.0.1:{port}", 'list_identifier = "$.items"', "/", 'type = "page"')
        async with Engine(conf_dir, state_path) as engine:
            result = await engine.poll("s")
            assert result.ok and result.duplicate_ids == 1 and result.invalid_ids == 1
            assert result.invalid_examples == ["page 2 item 1: no id"]
            pages[1] = [{"id": 1}]  # record 2 still on page 2; record 1 alone now... and an invalid id holds deletes
            pages[2] = [{"nope": 1}]
            held = await engine.poll("s")
            assert held.ok and held.parsed == [] and held.deleted == 0
    finally:
        await runner.cleanup()


async def test_a_list_whose_every_record_lacks_an_id_fails(upstream, conf_dir, state_path):
    upstream.body = {"items": [{"ID": 1, "name": "a"}, {"ID": 2, "name": "b"}]}
    write(conf_dir, "s", upstream.url, 'list_identifier = "$.items"', "/api", None)
    async with Engine(conf_dir, state_path) as engine:
        result = await engine.poll("s")
        assert not result.ok
        assert "record_identifier $.id" in result.error and "ID, name" in result.error
        assert await engine.store.outbox() == []
        upstream.body = {"items": []}  # an empty list that is really there is fine
        assert (await engine.poll("s")).ok


@pytest.mark.parametrize("answer, headers, hint", [
    ({"items": [{"id": 1}], "has_more": True}, {}, "has_more"),
    ({"items": [{"id": 1}], "next": "https://api/x?page=2"}, {}, "next"),
    ({"items": [{"id": 1}], "next": {"href": "https://api/x?page=2"}}, {}, "$.next.href"),  # HAL's link object
    ({"items": [{"id": 1}], "nextPageToken": "abc"}, {}, "nextPageToken"),
    ({"items": [{"id": 1}], "links": {"next": "/x?page=2"}}, {}, "links.next"),
    ({"items": [{"id": 1}], "meta": {"next_cursor": "c2"}}, {}, "meta.next_cursor"),
    ({"items": [{"id": 1}]}, {"Link": '<http://127.0.0.1/x?page=2>; rel="next"'}, "Link"),
])
async def test_a_next_page_hint_without_pagination_holds_deletes_and_warns(answer, headers, hint, upstream, conf_dir, state_path):
    upstream.body = {"items": [{"id": 1}, {"id": 2}]}
    write(conf_dir, "s", upstream.url, 'list_identifier = "$.items"', "/api", None)
    async with Engine(conf_dir, state_path) as engine:
        assert (await engine.poll("s")).ok
        upstream.body, upstream.headers = answer, headers
        result = await engine.poll("s")
        assert result.ok and result.parsed == [] and result.deleted == 0  # record 2 is on page 2, not gone
        assert hint in result.warning and "pagination" in result.warning
        assert await engine.record_ids("s") == {"1", "2"}


async def test_hint_warning_reaches_once_stderr_and_status(upstream, conf_dir, state_path):
    upstream.body = {"items": [{"id": 1}, {"id": 2}], "has_more": True}
    write(conf_dir, "s", upstream.url, 'list_identifier = "$.items"', "/api", None)
    args = ("--config-dir", str(conf_dir), "--state-path", str(state_path))
    code, out, err = await run_cli("once", "s", *args, env=cli_env(SYNCD_LOG_LEVEL="error"))
    assert code == 0 and len(out.splitlines()) == 2
    assert "warning" in err and "has_more" in err and "[api_details.pagination]" in err
    code, out, _ = await run_cli("status", *args)
    assert code == 0 and "has_more" in out and "warning" in out
    code, out, _ = await run_cli("status", "--json", *args)
    assert "has_more" in orjson.loads(out)["syncs"][0]["last_warning"]


async def test_dry_run_prints_a_summary(api, conf_dir, state_path):
    list_line, path, pagination = STYLES["page"]
    write(conf_dir, "s", api.url, list_line, path, pagination)
    api.records.append({"name": "no id"})  # 21 items: six pages and an empty seventh
    code, out, err = await run_cli("once", "s", "--dry-run", "--config-dir", str(conf_dir), "--state-path",
                                   str(state_path), env=cli_env(SYNCD_LOG_LEVEL="error"))
    assert code == 0, err
    assert len(out.splitlines()) == 20
    assert "pages fetched:  7 (7 requests)" in err and "records:        20" in err
    assert "skipped ids:    1 (page 6 item 0: no id)" in err
    assert "would queue:    20 events (20 record.new, 0 record.modified, 0 record.deleted)" in err
    assert not state_path.exists()


async def test_conditional_requests_turn_a_304_into_an_unchanged_run(conf_dir, state_path):
    seen = []
    state = {"etag": '"v1"', "body": {"items": [{"id": 1}, {"id": 2}]}}

    async def handler(request):
        seen.append(request.headers.get("If-None-Match"))
        if request.headers.get("If-None-Match") == state["etag"]:
            return web.Response(status=304, headers={"ETag": state["etag"]})
        return web.json_response(state["body"], headers={"ETag": state["etag"]})

    runner, port = await serve(handler)
    try:
        url = f"http://127.0.0.1:{port}"
        write(conf_dir, "s", url, 'list_identifier = "$.items"', "/", None)
        write(conf_dir, "off", url, 'list_identifier = "$.items"', "/", None, extra="conditional_requests = false")
        async with Engine(conf_dir, state_path) as engine:
            assert len((await engine.poll("s")).parsed) == 2
            unchanged = await engine.poll("s")
            assert unchanged.ok and unchanged.outcome == "unchanged" and unchanged.parsed == []
            assert seen == [None, '"v1"']
            state.update(etag='"v2"', body={"items": [{"id": 1}]})
            changed = await engine.poll("s")
            assert kinds(changed) == [("record.deleted", "2")]
            assert seen[-1] == '"v1"'
            await engine.poll("s")
            assert seen[-1] == '"v2"'
            seen.clear()
            await engine.poll("off")
            await engine.poll("off")
            assert seen == [None, None]
    finally:
        await runner.cleanup()


async def test_empty_on_status(upstream, conf_dir, state_path):
    upstream.body = {"items": [{"id": 1}]}
    write(conf_dir, "s", upstream.url, 'list_identifier = "$.items"', "/api", None, extra="empty_on_status = [404]")
    async with Engine(conf_dir, state_path) as engine:
        assert (await engine.poll("s")).ok
        upstream.status, upstream.body = 404, {"error": "no such list"}
        result = await engine.poll("s")
        assert result.ok and kinds(result) == [("record.deleted", "1")]
        upstream.status = 410
        failed = await engine.poll("s")
        assert not failed.ok and "410" in failed.error


async def test_pages_share_the_size_cap(api, conf_dir, state_path):
    list_line, path, pagination = STYLES["page"]
    write(conf_dir, "s", api.url, list_line, path, pagination)
    async with Engine(conf_dir, state_path) as engine:
        one_page = len(orjson.dumps({"items": api.records[:4]}))
        engine.source.max_bytes = one_page * 3  # each page fits, all five do not
        result = await engine.poll("s")
        assert not result.ok and "max_response_bytes" in result.error and "all pages together" in result.error
        assert await engine.store.outbox() == []


async def test_the_next_page_must_stay_on_the_same_origin(conf_dir, state_path):
    async def handler(request):
        return web.json_response({"data": [{"id": 1}], "links": {"next": "http://127.0.0.2:1/steal"}})

    runner, port = await serve(handler)
    try:
        write(conf_dir, "s", f"http://127.0.0.1:{port}", 'list_identifier = "$.data"', "/",
              'type = "next_url"\nnext_url_path = "$.links.next"', api_extra='headers = { Authorization = "Bearer sekrit-token" }')
        async with Engine(conf_dir, state_path) as engine:
            result = await engine.poll("s")
            assert not result.ok and "another origin" in result.error
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("pagination, problem", [
    ('type = "cursor"', "cursor_path"),
    ('type = "cursor"\ncursor_path = "$.a"\ncursor_from_last_record = "$.id"', "cursor_from_last_record"),
    ('type = "next_url"', "next_url_path"),
    ('type = "page"\ncursor_path = "$.a"', "cursor_path is not used"),
    ('type = "link_header"\nparam = "p"', "param is not used"),
    ('type = "page"\nsize = 10', "size_param"),
    ('type = "scroll"', "type"),
    ('type = "page"\nmax_pages = 0', "max_pages"),
    ('type = "cursor"\ncursor_path = "$[["', "cursor_path"),
])
async def test_invalid_pagination_is_a_check_error(pagination, problem, conf_dir):
    write(conf_dir, "s", "http://127.0.0.1:1", 'list_identifier = "$.items"', "/", pagination)
    code, _, err = await run_cli("check", "--config-dir", str(conf_dir))
    assert code == 78 and "s.toml" in err and "api_details.pagination" in err and problem in err


async def test_polls_of_one_sync_use_only_its_own_pages_concurrently(api, conf_dir, state_path):
    # Two paginated syncs polled at once: each walks its own pages (no shared paginator state).
    write(conf_dir, "a", api.url, *STYLES["page"][:2], STYLES["page"][2])
    write(conf_dir, "b", api.url, *STYLES["stripe"][:2], STYLES["stripe"][2])
    async with Engine(conf_dir, state_path) as engine:
        a, b = await asyncio.gather(engine.poll("a"), engine.poll("b"))
        assert a.ok and b.ok and len(a.parsed) == len(b.parsed) == 20


async def test_a_mistyped_pagination_path_that_ends_early_holds_deletes(conf_dir, state_path):
    # cursor_path points at the wrong key: the walk ends after page 1 although the page says there is more.
    async def handler(request):
        start = int(request.query.get("cursor", "0"))
        nxt = start + 2 if start < 4 else None
        return web.json_response({"data": [{"id": start}, {"id": start + 1}], "meta": {"next_cursor": nxt}})

    runner, port = await serve(handler)
    try:
        url = f"http://127.0.0.1:{port}"
        write(conf_dir, "typo", url, 'list_identifier = "$.data"', "/", 'type = "cursor"\ncursor_path = "$.meta.nextCursor"')
        write(conf_dir, "right", url, 'list_identifier = "$.data"', "/", 'type = "cursor"\ncursor_path = "$.meta.next_cursor"')
        async with Engine(conf_dir, state_path) as engine:
            right = await engine.poll("right")
            assert right.ok and len(right.parsed) == 6 and right.warning is None
            first = await engine.poll("typo")
            assert first.ok and len(first.parsed) == 2 and first.pages == 1
            assert "meta.next_cursor" in first.warning and "pagination" in first.warning
    finally:
        await runner.cleanup()
