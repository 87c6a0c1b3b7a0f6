"""The syncs this daemon runs, from every source (config_dir files, control-API definitions), and
which of them are paused. The scheduler, metrics and status views follow it."""

from __future__ import annotations

from collections.abc import Callable

from syncd.config import Sync


class Registry:
    """Every valid sync by id, plus the paused ones. Listeners get the active syncs on each change."""

    def __init__(self) -> None:
        self.syncs: dict[str, Sync] = {}
        self.paused: set[str] = set()
        self._listeners: list[Callable[[dict[str, Sync]], None]] = []

    def subscribe(self, listener: Callable[[dict[str, Sync]], None]) -> None:
        self._listeners.append(listener)

    @property
    def active(self) -> dict[str, Sync]:
        """The syncs to poll: every sync but the paused ones."""
        return {sid: sync for sid, sync in self.syncs.items() if sid not in self.paused}

    def update(self, syncs: dict[str, Sync]) -> None:
        self.syncs = syncs
        self._notify()

    def replace_paused(self, paused: set[str]) -> None:
        """The paused set as another instance left it (a shared state database)."""
        if paused != self.paused:
            self.paused = set(paused)
            self._notify()

    def set_paused(self, sync_id: str, paused: bool) -> None:
        (self.paused.add if paused else self.paused.discard)(sync_id)
        self._notify()

    def _notify(self) -> None:
        active = self.active
        for listener in self._listeners:
            listener(active)
