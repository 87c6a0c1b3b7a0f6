"""Pagination strategies: from one page to the request for the next, or None at the end.

Every way a list can end is explicit (an empty page, a missing cursor or link, `stop_path`, the
total); every way it can loop (a cursor or URL seen before, the same page twice, `max_pages`) fails
the run. A partial list must never look like a whole one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from xxhash import xxh3_64_intdigest
from yarl import URL

from syncd.errors import FetchError
from syncd.jsonpath import MISSING, JsonPath, compile_path
from syncd.records import ExactNumber


@dataclass
class PageRequest:
    """What to change in the sync's base request to ask for one page."""

    url: URL | None = None  # None: the sync's own URL
    params: dict[str, Any] = field(default_factory=dict)  # sent where `param_in` says


class PageView:
    """What a strategy may look at: the page's headers, URL, parsed document and items."""

    def __init__(self, number: int, url: URL, headers: Any, body: bytes, document: Any, items: list | None) -> None:
        self.number, self.url, self.headers, self.body = number, url, headers, body
        self.document, self.items = document, items


_LINK = re.compile(r'<([^>]*)>\s*((?:;\s*[^;,]*)*)')
_REL = re.compile(r';\s*rel\s*=\s*"?([^";,]*)"?', re.IGNORECASE)


def link_next(header: str | None) -> str | None:
    """The target of rel="next" in an RFC 8288 Link header."""
    if not header:
        return None
    for match in _LINK.finditer(header):
        rel = _REL.search(match.group(2))
        if rel and "next" in rel.group(1).lower().split():
            return match.group(1).strip()
    return None


def _truthy(value: Any) -> bool:
    """Present: not missing, null, false or an empty string (stop_path: "false, null or missing")."""
    return value is not MISSING and value is not None and value is not False and value != ""


def _get(path: JsonPath | None, document: Any) -> Any:
    if path is None:
        return MISSING
    try:
        return path.get(document)
    except ValueError:  # several matches
        return MISSING


class Paginator:
    """One run's walk through the pages of a sync's list."""

    def __init__(self, spec: Any, list_path: JsonPath | None) -> None:
        self.spec = spec
        self.kind = spec.type
        self.list_path = list_path
        self.stop = spec.stop_path and compile_path(spec.stop_path)
        self.cursor_path = spec.cursor_path and compile_path(spec.cursor_path)
        self.last_record_path = spec.cursor_from_last_record and compile_path(spec.cursor_from_last_record)
        self.next_url_path = spec.next_url_path and compile_path(spec.next_url_path)
        self.total_path = spec.total_path and compile_path(spec.total_path)
        self.number = spec.start if spec.start is not None else (1 if self.kind == "page" else 0)
        self.seen: set[Any] = set()
        self.previous_body_hash: int | None = None

    def first(self) -> PageRequest:
        if self.kind == "page":
            return PageRequest(params=self._sized({self.spec.param_name: self.number}))
        if self.kind == "offset":
            return PageRequest(params=self._sized({self.spec.param_name: self.number}))
        return PageRequest()

    def _sized(self, params: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec
        if spec.size_param and spec.size is not None:
            params[spec.size_param] = spec.size
        if self.kind == "offset" and spec.limit is not None:
            params[spec.limit_param or "limit"] = spec.limit
        return params

    def next(self, page: PageView) -> PageRequest | None:
        """The request for the page after `page`, or None when `page` was the last."""
        spec = self.spec
        document = page.document
        where = f"page {page.number}"
        if self.stop is not None and not _truthy(_get(self.stop, document)):
            return None
        request = self._more(page)
        if request is None:
            if self.stop is not None:
                raise FetchError(f"{where}: stop_path {spec.stop_path} says there are more pages, but the response "
                                 f"gives no {self._what_next()}; refusing a partial list")
            return None
        if page.number >= spec.max_pages:
            raise FetchError(f"{where}: still more pages after max_pages ({spec.max_pages}); the list may be "
                             "endless (check the pagination settings) or longer: raise max_pages")
        return request

    def _what_next(self) -> str:
        return {"page": "records on this page", "offset": "records on this page", "next_url": "next_url_path value",
                "link_header": 'Link rel="next"'}.get(self.kind, "cursor")

    def _more(self, page: PageView) -> PageRequest | None:
        kind, spec = self.kind, self.spec
        items = page.items or []
        if kind in ("page", "offset"):
            if not items:
                return None
            body_hash = xxh3_64_intdigest(page.body)
            if body_hash == self.previous_body_hash:
                raise FetchError(f"page {page.number} is identical to the page before it: the API ignores "
                                 f"{spec.param_name!r}? (check param and param_in)")
            self.previous_body_hash = body_hash
            if kind == "page":
                self.number += 1
            else:
                self.number += len(items)
                total = _get(self.total_path, page.document)
                if self.total_path is not None:
                    if type(total) is not int:
                        raise FetchError(f"page {page.number}: total_path {spec.total_path} is not a number "
                                         f"in the response ({_show(total)})")
                    if self.number >= total:
                        return None
            return PageRequest(params=self._sized({spec.param_name: self.number}))
        if kind == "cursor":
            if self.last_record_path is not None:
                if not items:
                    return None
                cursor = _get(self.last_record_path, items[-1])
            else:
                cursor = _get(self.cursor_path, page.document)
            if not _truthy(cursor):
                return None
            if isinstance(cursor, dict | list):
                raise FetchError(f"page {page.number}: the cursor is {_show(cursor)}, not a string or number")
            self._once(cursor, page.number, "cursor")
            return PageRequest(params={spec.param_name: cursor})
        # next_url, link_header
        target = _get(self.next_url_path, page.document) if kind == "next_url" else link_next(page.headers.get("Link"))
        if not _truthy(target):
            return None
        if not isinstance(target, str):
            raise FetchError(f"page {page.number}: next_url_path {spec.next_url_path} is {_show(target)}, not a URL")
        try:
            url = page.url.join(URL(target))
        except ValueError:
            raise FetchError(f"page {page.number}: the next page's URL {target[:100]!r} is not a valid URL") from None
        if (url.scheme, url.host, url.port) != (page.url.scheme, page.url.host, page.url.port):
            raise FetchError(f"page {page.number}: the next page is on another origin ({url.scheme}://{url.host}:{url.port}); "
                             "not followed so that credentials stay with the API's host")
        self._once(str(url), page.number, "next page URL")
        return PageRequest(url=url)

    def _once(self, value: Any, number: int, what: str) -> None:
        if value in self.seen:
            raise FetchError(f"page {number}: the {what} {_show(value)} was already used in this run: "
                             "the API is going round in circles (check the pagination settings)")
        self.seen.add(value)


def _show(value: Any) -> str:
    if value is MISSING:
        return "missing"
    text = str.__str__(value) if type(value) is ExactNumber else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- hints that a list has more pages than were read ---------------------------------------------

_HINT_KEYS = (
    ("has_more", "cursor", 'type = "cursor", cursor_from_last_record = "$.id", param = "starting_after", stop_path = "$.has_more"'),
    ("next", "next_url", 'type = "next_url", next_url_path = "$.next"'),
    ("next_url", "next_url", 'type = "next_url", next_url_path = "$.next_url"'),
    ("next_cursor", "cursor", 'type = "cursor", cursor_path = "$.next_cursor"'),
    ("nextPageToken", "cursor", 'type = "cursor", cursor_path = "$.nextPageToken", param = "pageToken"'),
)


def next_page_hint(headers: Any, document: Any) -> str | None:
    """Why a response without pagination configured looks like the first page of several, with the
    settings that would read them all; None when nothing hints at more."""
    if link_next(headers.get("Link") if headers is not None else None):
        return 'the Link header has rel="next": set [api_details.pagination] type = "link_header"'
    if type(document) is not dict:
        return None
    for key, _, settings in _HINT_KEYS:
        value = document.get(key)
        if key == "has_more":
            if value is True:
                return f"the response has {key} = {_show(value)}: set [api_details.pagination] {settings}"
            continue
        # Any non-null value (DESIGN §7), a link object too ({"href": ...}, as HAL writes it); an
        # empty object or list says nothing.
        if _truthy(value) and not (isinstance(value, dict | list) and not value):
            if isinstance(value, dict) and isinstance(value.get("href"), str):
                settings = settings.replace(f'"$.{key}"', f'"$.{key}.href"')
            return f"the response has {key} = {_show(value)}: set [api_details.pagination] {settings}"
    links, meta = document.get("links"), document.get("meta")
    if type(links) is dict and _truthy(links.get("next")):
        return 'the response has links.next: set [api_details.pagination] type = "next_url", next_url_path = "$.links.next"'
    if type(meta) is dict and _truthy(meta.get("next_cursor")):
        return 'the response has meta.next_cursor: set [api_details.pagination] type = "cursor", cursor_path = "$.meta.next_cursor"'
    return None
