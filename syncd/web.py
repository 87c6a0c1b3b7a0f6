"""The operator's web page on `listen`: every sync's health at a glance (`/`) and one sync in
detail (`/syncs/{id}`). Server-rendered HTML, no JavaScript, no external assets, read-only.

Rendered with f-strings and one escaping helper (`e`), not a template engine: two small pages do
not need a dependency, and every value that came from an API, a file or a request goes through
`e` on its way in. A strict Content-Security-Policy (no scripts at all; the one style block by
its hash) backs that up: even a missed escape could not run anything.
"""

from __future__ import annotations

import base64
import hashlib
import html
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from syncd.units import format_duration, iso_time

if TYPE_CHECKING:
    from syncd.daemon import Daemon

REFRESH = 30  # seconds between the overview's reloads
RUN_ROWS = 30  # runs listed on a sync's page (the charts use every kept run)

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5rem;color:#1d232a;background:#fbfbfc}
h1{font-size:1.3rem;margin:0 0 .2rem}h2{font-size:1.05rem;margin:1.6rem 0 .5rem}
p.sub{color:#5b6670;margin:0 0 1rem}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:.35rem .6rem;border-bottom:1px solid #e3e6ea;vertical-align:top}
th{font-weight:600;color:#44505c;background:#f3f5f7}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.state{font-weight:600}.up{color:#1a7f37}.failing{color:#c62828}.paused{color:#8a6d00}
.invalid{color:#c62828}.waiting{color:#5b6670}
.err{color:#c62828;white-space:pre-wrap;word-break:break-word;max-width:40rem}
.muted{color:#7a858f}a{color:#0b5cad}
pre{background:#fff;border:1px solid #e3e6ea;padding:.8rem;overflow:auto}
svg{background:#fff;border:1px solid #e3e6ea;margin-right:1rem}
""".strip()
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
HEADERS = {
    "Content-Security-Policy": (f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; img-src 'none'; "
                                "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


def e(value: Any) -> str:
    """Escape anything for HTML text and attribute values."""
    return html.escape("" if value is None else str(value), quote=True)


def ago(ts: float | None, now: float) -> str:
    """`3 min ago` / `in 2 min`, from a unix time."""
    if ts is None:
        return "never"
    delta = now - ts
    future = delta < 0
    delta = abs(delta)
    if delta < 60:
        text = f"{delta:.0f} s"
    elif delta < 3600:
        text = f"{delta / 60:.0f} min"
    elif delta < 86400:
        text = f"{delta / 3600:.1f} h"
    else:
        text = f"{delta / 86400:.1f} d"
    return f"in {text}" if future else f"{text} ago"


def when(ts: float | None, now: float) -> str:
    """A time as `2026-11-30 12:03:04Z` with its relative form beside it."""
    if ts is None:
        return '<span class="muted">never</span>'
    stamp = (iso_time(ts) or "")[:19].replace("T", " ") + "Z"
    return f'{e(stamp)} <span class="muted">({e(ago(ts, now))})</span>'


def page(title: str, body: str, *, refresh: int | None = None, status: int = 200) -> web.Response:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    text = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">{meta}'
            f"<style>{STYLE}</style></head><body>{body}</body></html>")
    return web.Response(text=text, status=status, content_type="text/html", headers=HEADERS)


def state_of(view: dict, invalid: bool) -> tuple[str, str]:
    """(css class, label) of a sync's state."""
    if view.get("paused"):
        return "paused", "paused"
    if invalid:
        return "invalid", "invalid definition (running its last good version)"
    if view.get("last_outcome") == "failed":
        return "failing", "failing"
    if view.get("last_run_at") is None:
        return "waiting", "waiting for its first poll"
    return "up", "up"


_ORDER = {"failing": 0, "invalid": 1, "paused": 2, "waiting": 3, "up": 4}


class WebPage:
    """The two pages, reading the daemon's registry, scheduler and state database."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._keys = [k.get_secret_value().encode() for k in daemon.settings.api_keys]

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.overview)
        app.router.add_get("/syncs/{sync_id}", self.detail)

    def _authorized(self, request: web.Request) -> bool:
        """With api_keys set the page asks for one too: HTTP Basic (any user name, the key as the
        password: the browser's own prompt, no JavaScript needed) or a Bearer header."""
        if not self._keys:
            return True
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        given = b""
        if scheme.lower() == "bearer":
            given = value.strip().encode()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except ValueError:
                given = b""
        from syncd.api import key_matches

        return key_matches(given, self._keys)

    def _deny(self) -> web.Response:
        return web.Response(status=401, text="syncd: an API key is needed (any user name, the key as password)\n",
                            headers={**HEADERS, "WWW-Authenticate": 'Basic realm="syncd", charset="UTF-8"'})

    async def overview(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._deny()
        daemon, now = self.daemon, time.time()
        views = await daemon.syncs_status()
        events = await daemon.store.events_since(now - 86400)
        nexts = daemon.next_polls()
        rows = []
        for view in views:
            css, label = state_of(view, view.get("definition") == "invalid")
            rows.append((_ORDER[css], view["id"], view, css, label))
        rows.sort(key=lambda r: (r[0], r[1]))
        counts: dict[str, int] = {}
        for r in rows:
            counts[r[3]] = counts.get(r[3], 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: _ORDER[kv[0]])) or "no syncs"
        body = [f"<h1>syncd</h1><p class=\"sub\">{len(rows)} syncs: {e(summary)}. Times in UTC. "
                f"This page reloads every {REFRESH} s.</p>",
                "<table><thead><tr><th>Sync</th><th>Origin</th><th>State</th><th>Last run</th><th>Outcome</th>"
                "<th>Records</th><th>Events, 24 h<br><span class=\"muted\">new / mod. / del.</span></th>"
                "<th>Pending</th><th>Dead</th><th>Next poll</th></tr></thead><tbody>"]
        for _, sync_id, view, css, label in rows:
            new, modified, deleted = events.get(sync_id, (0, 0, 0))
            last_run = _ts(view.get("last_run_at"))
            next_at = nexts.get(sync_id)
            next_text = ("paused" if view.get("paused") else "polling now" if sync_id in nexts and next_at is None
                         else e(ago(next_at, now)) if next_at else "-")
            error = view.get("last_error") if css == "failing" else None
            outcome = e(view.get("last_outcome") or "-") + (f'<div class="err">{e(error)}</div>' if error else "")
            body.append(
                f'<tr><td><a href="/syncs/{e(_path(sync_id))}">{e(sync_id)}</a></td>'
                f'<td>{e(view.get("origin", "-"))}</td><td class="state {css}">{e(label)}</td>'
                f"<td>{when(last_run, now)}</td><td>{outcome}</td><td class=\"n\">{e(view['records'])}</td>"
                f'<td class="n">{new} / {modified} / {deleted}</td><td class="n">{e(view["pending_events"])}</td>'
                f'<td class="n">{e(view["dead_events"])}</td><td>{next_text}</td></tr>')
        body.append("</tbody></table>")
        return page("syncd", "".join(body), refresh=REFRESH)

    async def detail(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._deny()
        from syncd.api import redact, scrub_definition

        daemon, now = self.daemon, time.time()
        sync_id = request.match_info["sync_id"]
        sync = daemon.syncs.get(sync_id)
        if sync is None:
            return page("syncd: no such sync", f"<h1>No sync {e(sync_id)}</h1><p><a href=\"/\">All syncs</a></p>",
                        status=404)
        view = await daemon.sync_status(sync_id)
        runs = await daemon.store.all_runs(sync_id)
        dead = await daemon.store.deliveries(sync_id=sync_id, dead_only=True, limit=50)
        css, label = state_of(view, view.get("definition") == "invalid")
        definition = orjson.dumps(redact(scrub_definition(sync)), option=orjson.OPT_INDENT_2).decode()
        body = [f'<p><a href="/">All syncs</a></p><h1>{e(sync_id)}</h1>'
                f'<p class="sub"><span class="state {css}">{e(label)}</span> · {e(view.get("origin"))} · '
                f'{e(view.get("url"))} · every {e(format_duration(sync.spec.interval))} · '
                f'{e(view["records"])} records · {e(view["pending_events"])} pending, {e(view["dead_events"])} dead</p>']
        if view.get("last_error"):
            body.append(f'<h2>Last error</h2><div class="err">{e(view["last_error"])}</div>')
        if view.get("last_warning"):
            body.append(f'<h2>Warning</h2><div class="err">{e(view["last_warning"])}</div>')
        body.append("<h2>Records and poll duration over the kept runs</h2>")
        body.append(chart([r.records for r in runs if r.records is not None], "records"))
        body.append(chart([r.finished_at - r.started_at for r in runs], "poll duration, s"))
        body.append("<h2>Last runs</h2><table><thead><tr><th>Finished</th><th>Duration</th><th>Outcome</th>"
                    "<th>Records</th><th>New / mod. / del.</th><th>Pages</th><th>Error</th></tr></thead><tbody>")
        for run in reversed(runs[-RUN_ROWS:]):
            body.append(
                f"<tr><td>{when(run.finished_at, now)}</td><td class=\"n\">{run.finished_at - run.started_at:.2f} s</td>"
                f"<td>{e(run.outcome)}</td><td class=\"n\">{e(run.records if run.records is not None else '-')}</td>"
                f'<td class="n">{run.new} / {run.modified} / {run.deleted}</td><td class="n">{run.pages}</td>'
                f'<td class="err">{e(run.error or run.warning or "")}</td></tr>')
        body.append("</tbody></table>")
        body.append(f"<h2>Dead letters ({len(dead)}{'+' if len(dead) == 50 else ''})</h2>")
        if dead:
            body.append("<table><thead><tr><th>Event</th><th>Record</th><th>Type</th><th>Died</th><th>Attempts</th>"
                        "<th>Last error</th></tr></thead><tbody>")
            for d in dead:
                body.append(f"<tr><td>{e(d.event_id)}</td><td>{e(d.record_id)}</td><td>{e(d.event_type)}"
                            f"{' (superseded)' if d.superseded else ''}</td><td>{when(d.dead_at, now)}</td>"
                            f'<td class="n">{d.attempts}</td><td class="err">{e(d.last_error)}</td></tr>')
            body.append("</tbody></table><p class=\"muted\">Replay with: syncd deliveries replay --sync "
                        f"{e(sync_id)}</p>")
        else:
            body.append('<p class="muted">None.</p>')
        body.append(f"<h2>Definition (secrets hidden)</h2><pre>{e(definition)}</pre>")
        return page(f"syncd: {sync_id}", "".join(body))


def chart(values: list[float], label: str, width: int = 420, height: int = 120) -> str:
    """A small inline SVG line chart (presentation attributes only: nothing for the CSP to allow)."""
    if len(values) < 2:
        return f'<svg width="{width}" height="{height}" role="img" aria-label="{e(label)}: not enough runs yet">' \
               f'<text x="8" y="20" font-size="12" fill="#7a858f">{e(label)}: not enough runs yet</text></svg>'
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    pad = 20
    step = (width - 2 * pad) / (len(values) - 1)
    points = " ".join(f"{pad + i * step:.1f},{height - pad - (v - low) / span * (height - 2 * pad):.1f}"
                      for i, v in enumerate(values))
    whole = all(float(v).is_integer() for v in values)
    fmt = (lambda v: f"{v:,.0f}") if whole or high >= 100 else (lambda v: f"{v:.2f}")
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="{e(label)}">'
            f'<polyline points="{points}" fill="none" stroke="#0b5cad" stroke-width="1.5"/>'
            f'<text x="4" y="14" font-size="11" fill="#44505c">{e(label)}: {e(fmt(high))} max, {e(fmt(low))} min, '
            f'{e(fmt(values[-1]))} last</text></svg>')


def _ts(text: str | None) -> float | None:
    """A status view's ISO time back to unix time."""
    if not text:
        return None
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _path(sync_id: str) -> str:
    from urllib.parse import quote

    return quote(sync_id, safe="")
