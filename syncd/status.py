"""One status view of a sync, used by `syncd status` and the daemon's `/v1/syncs`.

Times are ISO 8601 UTC strings with milliseconds (`2026-11-30T11:43:53.123Z`), the format of the
webhook `timestamp`, in every JSON that syncd prints or serves.
"""

from __future__ import annotations

from typing import Any

from syncd.units import iso_time

__all__ = ["iso_time", "sync_view"]


#: definition: "ok" (polled as written), "invalid" (the file is broken: `syncd run` keeps polling
#: its last good version, if it had one), "removed" (no file: state and queued webhooks are kept).
DEFINITIONS = ("ok", "invalid", "removed")


def sync_view(sync_id: str, *, sync: Any = None, state: Any = None, stats: Any = None, definition: str = "ok",
              paused: bool = False, owner: str | None = None) -> dict:
    """The status of one sync: `sync` its definition (or None), `state` its SyncState, `stats` its
    OutboxStats, `owner` the instance holding its lease (PostgreSQL). `syncJobId` repeats `id` for
    Knit's clients."""
    view: dict[str, Any] = {
        "id": sync_id,
        "syncJobId": sync_id,
        "configured": definition != "removed",
        "definition": definition,
        "paused": paused,
    }
    if sync is not None:
        view.update(origin=sync.origin, file=str(sync.file), url=sync.display_url, interval_seconds=sync.spec.interval,
                    paginated=sync.spec.api_details.pagination is not None)
    view.update({
        "last_run_at": iso_time(state.last_run_at if state else None),
        "last_outcome": state.last_outcome if state else None,
        "last_error": state.last_error if state else None,
        "last_warning": state.last_warning if state else None,
        "last_success_at": iso_time(state.last_success_at if state else None),
        "last_change_at": iso_time(state.last_change_at if state else None),
        "records": state.record_count if state else 0,
        "pending_deletions": state.pending_deletes if state else 0,
        "deletes_held": state.deletes_held if state else 0,
        "pending_events": stats.pending if stats else 0,
        "dead_events": stats.dead if stats else 0,
        "owner": owner,
    })
    return view
