"""`syncd run`: the long-running service. Embeddable: `await Daemon(settings).run()`.

Signal handling lives in the CLI; it only calls `request_stop()` / `request_reload()`, which set
events that the main loop reacts to.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import structlog

from syncd import server
from syncd.config import Sync, definition_files, is_dir, load_dir, load_warnings
from syncd.delivery import Deliverer, Target
from syncd.engine import RunResult, poll
from syncd.http import poll_session, webhook_session
from syncd.metrics import Metrics
from syncd.registry import Registry
from syncd.scheduler import Scheduler
from syncd.settings import Settings
from syncd.source.fetcher import Source
from syncd.status import sync_view
from syncd.store import StateStore, StoreError, SyncState, default_instance_id, lock_instance, open_store
from syncd.systemd import Notifier

log = structlog.get_logger("syncd.daemon")

WATCH_INTERVAL = 0.5  # seconds between looks at config_dir
SETTLE = 0.3  # a changed file must stay unchanged this long before it is read (editors, half-written files)
STATS_INTERVAL = 2.0
FRESH = 1.0  # an invalid file changed less than this long ago is looked at again before it is reported
START_SETTLE = 1.0  # state_url: seconds from the first lease renewal at start to the second


class Daemon:
    def __init__(self, settings: Settings, *, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier({})
        self.metrics = Metrics(per_sync_histograms=settings.per_sync_histograms)
        self.registry = Registry()
        self._file_ids: dict[Path, str] = {}  # file -> id of its last good version
        self._targets: dict[str, Target] = {}  # every sync seen, removed ones included
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._recheck: asyncio.TimerHandle | None = None
        self._inotify = True  # until watchfiles turns out not to work here
        self._invalid_files: set[Path] = set()  # files whose last load failed (their last good sync may run)
        self._ready = False
        self._store: StateStore | None = None
        #: PostgreSQL: the syncs whose lease this instance holds (None: SQLite, every sync is ours).
        self._owned: set[str] | None = None
        #: Why the state database cannot be reached now, if it cannot (PostgreSQL).
        self._state_unreachable: str | None = None
        self._background: set[asyncio.Task] = set()
        #: This instance's name in leases and claims (state_url).
        self.instance_id = settings.instance_id or default_instance_id()
        self._lock_fd: int | None = None
        self._lease_ok_at = time.monotonic()
        #: Clear while a lease renewal runs: it may give back syncs, so no poll starts meanwhile.
        self._leases_settled = asyncio.Event()
        self._leases_settled.set()
        #: Why the state database cannot be trusted any more (deleted or replaced under us), if so.
        self._state_lost: str | None = None
        self._source: Source | None = None
        self._scheduler: Scheduler | None = None
        self._pending_total = 0
        self._dead_total = 0
        self.address: tuple[str, int] | None = None  # where /metrics listens once started

    @property
    def syncs(self) -> dict[str, Sync]:
        """Every valid sync, paused ones included."""
        return self.registry.syncs

    # -- control (safe to call from signal handlers) ------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    # -- main ---------------------------------------------------------------------------------

    async def run(self) -> None:
        settings = self.settings
        shared = settings.state_url is not None
        store: StateStore | None = None
        if not shared:
            self._lock_fd = lock_instance(settings.state_path)
            try:
                self._store = store = await open_store(state_path=settings.state_path)
            except BaseException:
                os.close(self._lock_fd)
                raise
        else:
            self._owned = set()  # no sync is ours before the first lease renewal
        self.metrics.instance_info.info({"instance_id": self.instance_id if shared else "",
                                         "backend": "postgresql" if shared else "sqlite"})
        poll_session_ = poll_session()
        source = Source(poll_session_, max_bytes=int(settings.max_response_bytes),
                        max_requests_per_host=settings.max_requests_per_host)
        self._source = source
        hook_session = webhook_session(settings.webhook_concurrency)
        runner = None
        tasks: list[asyncio.Task] = []
        deliver_stop = asyncio.Event()
        try:
            self._apply_config(startup=True)
            if shared:
                # Serve /healthz and /readyz (503) while PostgreSQL cannot be reached yet.
                runner = await self._serve()
                self._store = store = await self._open_shared()
                if store is None:
                    return  # stopped while waiting for the database
            states = await store.all_states()
            last_runs = {s.sync_id: s.last_run_at for s in states if s.last_run_at}
            not_before = {s.sync_id: s.next_run_at for s in states if s.next_run_at}
            self._seed_metrics(states)
            if runner is None:
                runner = await self._serve()

            async def run_poll(sync: Sync) -> RunResult | None:
                if self._owned is not None and not self._leases_settled.is_set():
                    await self._leases_settled.wait()  # the renewal under way may give this sync back
                    if sync.id not in self._owned:
                        return None  # it did: the instance that takes it polls it
                if self._owned is not None and time.monotonic() - self._lease_ok_at > settings.lease_ttl * 2 / 3:
                    # Our leases were last renewed too long ago to be trusted (this process was
                    # stopped, or the database is away): another instance may poll this sync now.
                    # The next renewal says whether it is still ours; its commit would be refused.
                    log.info("poll skipped: this instance's leases are not renewed yet", sync=sync.id)
                    return None
                result = await poll(sync, store, source)
                self._observe(result)
                return result

            self._scheduler = Scheduler(run_poll, max_concurrent=settings.max_concurrent_polls, last_runs=last_runs,
                                        not_before=not_before)
            self.registry.paused = await store.paused()
            if shared:
                store.start_leasing()
                await self._lease_tick()  # take a first share before scheduling anything
            self._scheduler.update(self._mine(self.registry.active), startup=True)
            self.registry.subscribe(self._schedule)
            deliverer = Deliverer(store, hook_session, concurrency=settings.webhook_concurrency,
                                  timeout=settings.webhook_timeout, schedule=settings.webhook_retry_schedule,
                                  target=self._target, metrics=self.metrics,
                                  drain_timeout=settings.shutdown_timeout)
            delivery_task = asyncio.create_task(deliverer.run(deliver_stop), name="delivery")
            tasks = [
                asyncio.create_task(self._watch_config(), name="config-watch"),
                asyncio.create_task(self._stats(), name="stats"),
            ]
            if self.notifier.watchdog_interval:
                tasks.append(asyncio.create_task(self._watchdog(self.notifier.watchdog_interval), name="watchdog"))
            if shared:
                tasks.append(asyncio.create_task(self._hold_leases(), name="leases"))
            await self._warn_about_orphans()
            self._ready = True
            log.info("syncd started", syncs=len(self.syncs), listen=f"{self.address[0]}:{self.address[1]}",
                     state=settings.state_location, config_dir=str(settings.config_dir),
                     **({"instance": store.instance_id, "leases": len(self._owned)} if shared else {}))
            self.notifier.ready(self._status_line())

            while not self._stop.is_set():
                await _wait_first(self._stop, self._reload, delivery_task)
                if delivery_task.done():
                    delivery_task.result()  # the deliverer never ends on its own: surface why it did
                    raise RuntimeError("webhook delivery stopped unexpectedly")
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    self.notifier.reloading()
                    try:
                        self._apply_config()
                    except Exception:  # the running syncs stay as they were
                        self.metrics.reload_failures.inc()
                        log.exception("reload failed with an internal error; the previous configuration keeps running")
                    self.notifier.ready(self._status_line())

            log.info("stopping: no new polls; finishing in-flight work", timeout=settings.shutdown_timeout)
            self.notifier.stopping()
            self._ready = False
            # Polls and deliveries wind down together within one shutdown_timeout. A cancelled poll
            # commits nothing; an unfinished delivery stays queued for the next start.
            deliver_stop.set()
            await asyncio.gather(self._scheduler.stop(timeout=settings.shutdown_timeout), delivery_task)
            log.info("syncd stopped", delivered=deliverer.delivered)
        finally:
            deliver_stop.set()
            if self._recheck is not None:
                self._recheck.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._scheduler is not None:
                await self._scheduler.stop(timeout=0)
            if runner is not None:
                await runner.cleanup()
            await poll_session_.close()
            await hook_session.close()
            if store is not None:
                await store.close()  # PostgreSQL: gives the leases back at once
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            self.notifier.close()

    async def _warn_about_orphans(self) -> None:
        stats = await self._store.outbox_stats()
        for sync_id, s in sorted(stats.items()):
            if sync_id not in self.syncs and s.pending:
                log.warning("queued webhooks of a sync that has no definition", sync=sync_id, pending=s.pending,
                            hint="they go to the URL they were created with, signed with the daemon's "
                                 "webhook_secret (a per-sync secret is not stored); restore the definition "
                                 "or purge them with 'syncd deliveries' once dead")

    # -- configuration ------------------------------------------------------------------------

    def _apply_config(self, *, startup: bool = False) -> None:
        """Load config_dir. Invalid files keep their last good version running."""
        settings = self.settings
        syncs, problems = load_dir(settings)
        # A file changed a moment ago may still be being written (an editor saving slowly, a
        # half-copied file): look again shortly instead of reporting it. Only a file that stays
        # broken is an error worth a log line and an alert.
        fresh = {p.source for p in problems if _modified_within(Path(p.source), FRESH)}
        if fresh:
            problems = [p for p in problems if p.source not in fresh]
            self._recheck_later()
        bad_files = {Path(p.source) for p in problems} | {Path(f) for f in fresh}
        self._invalid_files = {Path(p.source) for p in problems}
        if any(p.key == "config_dir" for p in problems):
            syncs = dict(self.syncs)  # the directory vanished or cannot be read: keep everything as it was
        else:
            if any(p.key == "api_config_dir" for p in problems):  # unreadable: its syncs stay as they were
                syncs.update({i: s for i, s in self.syncs.items() if s.origin == "api" and i not in syncs})
            present = set(definition_files(settings.config_dir)) | set(definition_files(settings.api_dir))
            for path in bad_files & present:
                old_id = self._file_ids.get(path)
                if old_id and old_id in self.syncs and old_id not in syncs:
                    syncs[old_id] = self.syncs[old_id]
        for problem in problems:
            kept = self._file_ids.get(Path(problem.source))
            log.error("invalid sync definition", file=problem.source, key=problem.key, reason=problem.reason,
                      kept_last_good=kept if kept in syncs else None)
        if not startup:
            self.metrics.reloads.inc()
            if problems:
                self.metrics.reload_failures.inc()
        self.metrics.config_problems.set(len(problems))

        added = syncs.keys() - self.syncs.keys()
        removed = self.syncs.keys() - syncs.keys()
        changed = [i for i in syncs.keys() & self.syncs.keys() if syncs[i].digest != self.syncs[i].digest]
        self._file_ids = {s.file: s.id for s in syncs.values()}
        self.registry.update(syncs)
        for sync in syncs.values():
            for warning in load_warnings(sync):
                log.warning("sync definition is insecure", sync=sync.id, file=str(sync.file), warning=warning)
        if self._source is not None:
            self._source.forget(set(syncs))
        for sync in syncs.values():
            self._targets[sync.id] = Target(sync.spec.webhook_url, self._secret(sync), sync.secrets)
            self.metrics.add_sync(sync.id)
            self.metrics.interval.labels(sync.id).set(sync.spec.interval)
            self.metrics.owned.labels(sync.id).set(1 if self._owned is None or sync.id in self._owned else 0)
        for sync_id in removed:
            self.metrics.remove_sync(sync_id)
        self.metrics.syncs.set(len(syncs))
        if not startup or syncs:
            log.info("configuration loaded", syncs=len(syncs), added=sorted(added), removed=sorted(removed),
                     changed=sorted(changed), problems=len(problems))

    def _schedule(self, active: dict[str, Sync]) -> None:
        if self._scheduler is not None and self._state_lost is None:
            self._scheduler.update(self._mine(active))

    def _mine(self, active: dict[str, Sync]) -> dict[str, Sync]:
        """The active syncs this instance polls: all of them, or (PostgreSQL) those it holds the lease of."""
        if self._owned is None:
            return active
        return {sid: sync for sid, sync in active.items() if sid in self._owned}

    async def _serve(self):
        settings = self.settings
        app = server.build_app(self.metrics, ready=self._readiness, syncs_status=self.syncs_status)
        app.middlewares.append(_needs_store(self))
        if settings.api_keys:
            from syncd.api import ControlAPI

            ControlAPI(self).routes(app)
        from syncd.web import WebPage

        WebPage(self).routes(app)
        host, port = settings.listen_address
        runner = await server.start(app, host, port)
        self.address = runner.addresses[0][:2] if runner.addresses else (host, port)
        return runner

    # -- several instances (PostgreSQL) ---------------------------------------------------------

    async def _open_shared(self) -> StateStore | None:
        """Connect to PostgreSQL, retrying until it answers (or stop): a database that is down
        when syncd starts is an outage to wait out, not a reason to exit."""
        settings = self.settings
        delay = 1.0
        while not self._stop.is_set():
            try:
                store = await open_store(state_path=settings.state_path, state_url=settings.state_url.get_secret_value(),
                                         instance_id=self.instance_id, lease_ttl=settings.lease_ttl,
                                         pool_size=settings.state_pool_size)
            except StoreError as exc:
                if exc.kind == "schema":
                    raise
                self._state_unreachable = f"cannot reach the state database {settings.state_location}: {exc}"
                log.error("cannot reach the PostgreSQL state database; retrying", state=settings.state_location,
                          error=str(exc), retry_in=delay,
                          hint="check that PostgreSQL runs and accepts this user (state_url); /readyz answers 503 meanwhile")
                self.notifier.status(self._state_unreachable)
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 30.0)
                continue
            self._state_unreachable = None
            return store
        return None

    async def _hold_leases(self) -> None:
        """Renew leases every third of lease_ttl, taking or giving back syncs to keep a fair share."""
        period = self.settings.lease_ttl / 3
        # Instances started together (systemd starting syncd@1..3) see each other a second after
        # start, while the first polls are still spread out: the first to look took every sync,
        # and gives back the ones it has not started polling.
        await asyncio.sleep(min(period, START_SETTLE))
        while True:
            self._leases_settled.clear()
            try:
                ok = await self._lease_tick()
            finally:
                self._leases_settled.set()
            # Below its share (it just started, or an instance died): look again soon, while the
            # others give back their extras at their own renewals.
            short = not ok or len(self._owned) < self._store.share
            delay = min(period, 1.0) if short else period
            expiry = self._store.next_expiry
            if ok and expiry is not None:
                # Another instance's lease runs out sooner: look right after (it may have died).
                delay = min(delay, max(0.05, expiry + 0.05))
            await asyncio.sleep(delay)

    async def _lease_tick(self) -> bool:
        store, ttl = self._store, self.settings.lease_ttl
        try:
            paused = await store.paused()
            self.registry.replace_paused(paused)  # paused or resumed through another instance
            busy = {sid for sid, at in self.next_polls().items() if at is None}
            held = set(await store.lease_tick(set(self.registry.active), busy))
            triggered = await store.take_triggers(sorted(held))
        except StoreError as exc:
            if time.monotonic() - self._lease_ok_at > ttl * 2 / 3 and self._owned:
                # Our leases may expire any moment: stop polling rather than poll for nothing.
                log.error("leases given up: the state database is unreachable", error=str(exc), syncs=len(self._owned))
                self._owned = set()
                self._schedule(self.registry.active)
            if self._state_unreachable is None:
                log.error("cannot renew leases; retrying", error=str(exc), state=self.settings.state_location)
            self._state_unreachable = f"cannot reach the state database {self.settings.state_location}: {exc}"
            return False
        self._lease_ok_at = time.monotonic()
        if self._state_unreachable is not None:
            log.info("state database reachable again", state=self.settings.state_location)
            self._state_unreachable = None
        if held != self._owned:
            gained, lost = held - self._owned, self._owned - held
            if gained and self._scheduler is not None:
                # Polled elsewhere until now: go on from when it was last polled, not from scratch.
                self._scheduler.remember({s.sync_id: s for s in await store.all_states() if s.sync_id in gained})
            self._owned = held
            for sync_id in gained | lost:
                if self.metrics.known(sync_id):
                    self.metrics.owned.labels(sync_id).set(1 if sync_id in held else 0)
            self._schedule(self.registry.active)
            log.info("leases changed", held=len(held), gained=sorted(gained)[:20], lost=sorted(lost)[:20],
                     instance=store.instance_id)
        for sync_id in triggered:  # asked through another instance's control API
            if self._scheduler is not None:
                self._scheduler.trigger(sync_id)
        return True

    def _recheck_later(self) -> None:
        if self._recheck is None or self._recheck.cancelled() or self._recheck.when() <= asyncio.get_running_loop().time():
            self._recheck = asyncio.get_running_loop().call_later(FRESH, self.request_reload)

    def _secret(self, sync: Sync) -> str | None:
        if sync.spec.webhook_secret:
            return sync.spec.webhook_secret
        default = self.settings.webhook_secret
        return default.get_secret_value() if default else None

    def _target(self, sync_id: str) -> Target:
        target = self._targets.get(sync_id)
        if target is None:
            default = self.settings.webhook_secret
            return Target(None, default.get_secret_value() if default else None)
        return target

    async def _watch_config(self) -> None:
        """Reload when a *.toml in config_dir (or api_config_dir) is added, changed or removed.

        inotify (watchfiles) where the filesystem has it: nothing is statted until something
        changes, however many files there are. Otherwise, or while a directory is missing, the
        files are statted every WATCH_INTERVAL in a worker thread, off the event loop."""
        while True:
            try:
                if self._inotify and await self._watch_inotify():
                    continue
                seen = await asyncio.to_thread(_snapshot, self.settings)
                await self._watch_once(seen)  # until one change: then inotify may take over again
            except Exception:  # never lose the watcher: log and keep watching
                log.exception("config_dir watcher failed; retrying")
                await asyncio.sleep(5)

    async def _watch_inotify(self) -> bool:
        """Watch with inotify until the set of watched directories changes (True), or say it
        cannot (False: config_dir is missing, or inotify is not to be had here)."""
        try:
            import watchfiles
        except ImportError:
            self._inotify = False
            return False
        settings = self.settings
        dirs = [d for d in (settings.config_dir, settings.api_dir) if is_dir(d)]
        if settings.config_dir not in dirs:
            return False
        stop = asyncio.Event()
        expected = set(dirs)

        def relevant(change, path: str) -> bool:
            name = Path(path).name
            return name.endswith(".toml") and not name.startswith(".")

        async def dirs_gone() -> None:
            # A directory created or removed (api.d appears with the first API sync): watch anew.
            while {d for d in (settings.config_dir, settings.api_dir) if is_dir(d)} == expected:
                await asyncio.sleep(WATCH_INTERVAL * 4)
            stop.set()

        guard = asyncio.create_task(dirs_gone())
        try:
            async for _ in watchfiles.awatch(*dirs, watch_filter=relevant, recursive=False, stop_event=stop,
                                             step=int(SETTLE * 1000), debounce=1500, rust_timeout=1000):
                log.info("config_dir changed; reloading")
                self.request_reload()
        except (OSError, RuntimeError) as exc:
            self._inotify = False
            log.warning(f"cannot watch config_dir with inotify; checking its files every {WATCH_INTERVAL:g}s instead",
                        error=str(exc))
            return False
        finally:
            guard.cancel()
        return True

    async def _watch_once(self, seen: dict) -> dict:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = await asyncio.to_thread(_snapshot, self.settings)
            if now == seen:
                continue
            # Wait until the directory settles: editors write temporaries and rename them into place.
            for _ in range(10):
                await asyncio.sleep(SETTLE)
                again = await asyncio.to_thread(_snapshot, self.settings)
                if again == now:
                    break
                now = again
            log.info("config_dir changed; reloading")
            self.request_reload()
            return now

    # -- observation ---------------------------------------------------------------------------

    def _seed_metrics(self, states) -> None:
        """Start each sync's gauges from its stored state: after a restart a healthy sync must not
        look failed (syncd_sync_up 0, last success in 1970) until its next poll."""
        m = self.metrics
        for state in states:
            sid = state.sync_id
            if not m.known(sid) or state.last_run_at is None:
                continue
            m.sync_up.labels(sid).set(0 if state.last_outcome == "failed" else 1)
            if state.last_success_at:
                m.last_success.labels(sid).set(state.last_success_at)
            if state.last_change_at:
                m.last_change.labels(sid).set(state.last_change_at)
            m.records.labels(sid).set(state.record_count)

    def _observe(self, result: RunResult) -> None:
        m, sid = self.metrics, result.sync_id
        if not m.known(sid):
            return
        m.polls.labels(sid).inc()
        m.poll_histogram(sid).observe(result.duration)
        if not result.ok:
            m.poll_failures.labels(sid).inc()
            m.sync_up.labels(sid).set(0)
            if result.deletes_held:
                m.deletes_held.labels(sid).inc(result.deletes_held)
            return
        now = time.time()
        m.sync_up.labels(sid).set(1)
        m.last_success.labels(sid).set(now)
        if result.records is not None:
            m.records.labels(sid).set(result.records)
        for event_type, count in (("record.new", result.new), ("record.modified", result.modified), ("record.deleted", result.deleted)):
            if count:
                m.events.labels(sid, event_type).inc(count)
        if result.queued:
            m.last_change.labels(sid).set(now)
        if result.invalid_ids:
            m.skipped.labels(sid, "invalid_id").inc(result.invalid_ids)
        if result.duplicate_ids:
            m.skipped.labels(sid, "duplicate_id").inc(result.duplicate_ids)

    async def _stats(self) -> None:
        while True:
            self._check_state_file()
            try:
                stats = await self._store.outbox_stats()
            except StoreError as exc:
                log.error("could not read outbox statistics", error=str(exc))
                stats = None
            except Exception:
                log.exception("could not read outbox statistics (internal error; please report it)")
                stats = None
            if stats is not None:
                now = time.time()
                self._pending_total = sum(s.pending for s in stats.values())
                self._dead_total = sum(s.dead for s in stats.values())
                for sync_id in self.syncs:
                    if not self.metrics.known(sync_id):
                        continue
                    s = stats.get(sync_id)
                    self.metrics.queue_depth.labels(sync_id).set(s.pending if s else 0)
                    self.metrics.dead_letters.labels(sync_id).set(s.dead if s else 0)
                    oldest = s.oldest_pending_created_at if s else None
                    self.metrics.oldest_pending.labels(sync_id).set(max(0.0, now - oldest) if oldest else 0)
                self.notifier.status(self._status_line())
            await asyncio.sleep(STATS_INTERVAL)

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself: a blocked loop stops the pings and systemd restarts us.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _status_line(self) -> str:
        if self._state_lost is not None:  # what `systemctl status` must keep showing until a restart
            return f"{self._state_lost}; restart syncd"
        running = self._scheduler.running_polls() if self._scheduler else 0
        return (f"{len(self.syncs)} syncs, {running} polling, {self._pending_total} webhooks pending, "
                f"{self._dead_total} dead")

    def _check_state_file(self) -> None:
        """Notice the state database being deleted or replaced under the daemon: its writes would
        go to a file nobody sees, and what happens meanwhile (deletes!) would be lost at restart."""
        if self._state_lost is not None:
            return
        problem = self._store.identity_problem()
        if problem is None:
            return
        self._state_lost = f"the state database {self.settings.state_path} was {problem} while syncd was running"
        log.error("state database lost; polling stopped", state=str(self.settings.state_path), problem=problem,
                  hint="restart syncd to open the file now at state_path (restore it from a backup first if it was "
                       "deleted by mistake); until then nothing is polled and /readyz answers 503")
        if self._scheduler is not None:
            self._scheduler.update({}, why="state database lost")
        self.notifier.status(self._state_lost)

    @property
    def state_lost(self) -> str | None:
        """Why the state database can no longer be written (deleted or replaced under the daemon)."""
        return self._state_lost

    def _readiness(self) -> tuple[bool, str]:
        if self._state_lost is not None:
            return False, f"not ready: {self._state_lost}; restart syncd"
        if self._state_unreachable is not None:
            return False, f"not ready: {self._state_unreachable}"
        if not self._ready:
            return False, "not ready: starting or stopping"
        return True, f"ready: {len(self.syncs)} syncs"

    # -- the control API's operations ---------------------------------------------------------

    def apply_config(self) -> None:
        """Load the definitions again now (the control API wrote or removed one)."""
        self._apply_config()

    async def set_paused(self, sync_id: str, paused: bool) -> None:
        """Pause or resume polling a sync; kept in the state database, so it survives restarts."""
        await self._store.set_paused(sync_id, paused)
        self.registry.set_paused(sync_id, paused)
        log.info("sync paused" if paused else "sync resumed", sync=sync_id)

    async def is_paused(self, sync_id: str) -> bool:
        """Whether a sync is paused now. With several instances the state database is the truth:
        a pause or resume through another instance reaches this one's registry only at its next
        lease renewal, so it is read afresh (and the registry follows it at once)."""
        if self.settings.state_url is not None:
            self.registry.replace_paused(await self._store.paused())
        return sync_id in self.registry.paused

    @property
    def store(self) -> StateStore:
        return self._store

    def next_polls(self) -> dict[str, float | None]:
        return self._scheduler.next_polls() if self._scheduler is not None else {}

    def trigger(self, sync_id: str) -> bool:
        """Poll a sync now. False when it is not being scheduled (paused, stopping, state lost).
        With several instances, a sync another instance holds is polled by that one, at its next
        lease renewal (within a third of lease_ttl)."""
        if self._scheduler is None or self._state_lost is not None or not self._ready:
            return False
        if self._scheduler.trigger(sync_id):
            return True
        if self._owned is not None and sync_id in self.registry.active:
            task = asyncio.create_task(self._store.request_trigger(sync_id), name=f"trigger:{sync_id}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return True
        return False

    async def sync_status(self, sync_id: str) -> dict:
        stats = await self._store.outbox_stats()
        return self._view(sync_id, await self._store.sync_state(sync_id), stats, await self._store.lease_owners())

    def _view(self, sync_id: str, state, stats, owners: dict[str, str]) -> dict:
        sync = self.syncs[sync_id]
        definition = "invalid" if sync.file in self._invalid_files else "ok"
        return sync_view(sync_id, sync=sync, state=state, stats=stats.get(sync_id), definition=definition,
                         paused=sync_id in self.registry.paused, owner=owners.get(sync_id))

    async def syncs_status(self) -> list[dict]:
        store = self._store
        stats = await store.outbox_stats()
        owners = await store.lease_owners()
        out = []
        states = {s.sync_id: s for s in await store.all_states()}
        for sync_id in sorted(self.syncs):
            out.append(self._view(sync_id, states.get(sync_id) or SyncState(sync_id), stats, owners))
        return out


def _modified_within(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime < seconds
    except OSError:
        return False


def _snapshot(settings: Settings) -> dict[str, tuple[int, int, int]]:
    try:
        files = definition_files(settings.config_dir) + definition_files(settings.api_dir)
    except OSError:
        return {}
    out = {}
    for path in files:
        try:
            st = path.stat()
        except OSError:
            continue
        out[str(path)] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return out


def _needs_store(daemon: Daemon):
    """A 503 for everything but the ops endpoints while the state database is not open yet."""
    from aiohttp import web

    @web.middleware
    async def middleware(request, handler):
        if daemon.store is None and request.path not in ("/healthz", "/readyz", "/metrics"):
            return web.json_response({"success": False, "error": {"msg": "syncd is starting: the state database "
                                                                          "is not reachable yet"}}, status=503)
        return await handler(request)

    return middleware


async def _wait_first(*waitables) -> None:
    futures = []
    for w in waitables:
        if isinstance(w, asyncio.Event):
            if w.is_set():
                return
            futures.append(asyncio.ensure_future(w.wait()))
        else:
            if w.done():
                return
            futures.append(w)
    try:
        await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in futures:
            if f not in waitables:
                f.cancel()
