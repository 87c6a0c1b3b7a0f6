"""Prometheus metrics: `syncd_` names in base units, one registry per daemon.

The `sync` label is bounded by the number of definitions; a removed sync's series are removed.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from syncd import __version__

# `*_created` series double the output and no dashboard needs them.
prometheus_client.disable_created_metrics()

POLL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60, 120, 300)
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
EVENT_TYPES = ("record.new", "record.modified", "record.deleted")


class Metrics:
    """`per_sync_histograms`: the two duration histograms carry a `sync` label (13 series a sync
    each); off by default, they count every sync together, so 10,000 syncs stay a few MB."""

    def __init__(self, *, per_sync_histograms: bool = False) -> None:
        self.per_sync_histograms = per_sync_histograms
        hist_labels = ["sync"] if per_sync_histograms else []
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.build_info = Info("syncd_build", "syncd version", registry=r)
        self.build_info.info({"version": __version__})
        self.syncs = Gauge("syncd_syncs", "Valid sync definitions loaded", registry=r)
        self.sync_up = Gauge("syncd_sync_up", "1 if the last poll of the sync succeeded, else 0", ["sync"], registry=r)
        self.polls = Counter("syncd_sync_polls", "Polls run", ["sync"], registry=r)
        self.poll_failures = Counter("syncd_sync_poll_failures", "Polls that failed and changed nothing", ["sync"], registry=r)
        self.poll_duration = Histogram("syncd_sync_poll_duration_seconds", "Duration of a poll, fetch to commit",
                                       hist_labels, buckets=POLL_BUCKETS, registry=r)
        self.records = Gauge("syncd_sync_records", "Records tracked after the last successful poll", ["sync"], registry=r)
        self.events = Counter("syncd_sync_events", "Change events queued", ["sync", "type"], registry=r)
        self.skipped = Counter("syncd_sync_skipped_records", "Records skipped for a missing, invalid or duplicate id",
                               ["sync", "reason"], registry=r)
        self.last_success = Gauge("syncd_sync_last_success_timestamp_seconds", "Time of the last successful poll",
                                  ["sync"], registry=r)
        self.last_change = Gauge("syncd_sync_last_change_timestamp_seconds", "Time of the last poll that queued events",
                                 ["sync"], registry=r)
        self.deletes_held = Counter("syncd_sync_deletes_held", "Deletions held back by max_delete_fraction (the run failed instead)",
                                    ["sync"], registry=r)
        self.interval = Gauge("syncd_sync_interval_seconds", "The sync's poll interval (for alerts: stale after N intervals)",
                              ["sync"], registry=r)
        self.reloads = Counter("syncd_config_reloads", "Configuration reloads", registry=r)
        self.reload_failures = Counter("syncd_config_reload_failures",
                                       "Reloads that found an invalid file (the last good version keeps running)", registry=r)
        self.config_problems = Gauge("syncd_config_problems", "Problems found by the last configuration load", registry=r)
        self.deliveries = Counter("syncd_deliveries", "Webhook events delivered (2xx)", ["sync"], registry=r)
        self.delivery_failures = Counter("syncd_delivery_failures", "Failed delivery attempts", ["sync"], registry=r)
        self.delivery_duration = Histogram("syncd_delivery_duration_seconds", "Duration of one delivery attempt",
                                           hist_labels, buckets=DELIVERY_BUCKETS, registry=r)
        self.queue_depth = Gauge("syncd_delivery_queue_depth", "Events waiting for delivery (not dead)", ["sync"], registry=r)
        self.dead_letters = Gauge("syncd_delivery_dead_letters", "Events that exhausted their retries", ["sync"], registry=r)
        self.oldest_pending = Gauge("syncd_delivery_oldest_pending_age_seconds", "Age of the oldest undelivered event",
                                    ["sync"], registry=r)
        self._per_sync = [self.sync_up, self.polls, self.poll_failures, self.records,
                          self.last_success, self.last_change, self.interval, self.deletes_held, self.deliveries, self.delivery_failures,
                          self.queue_depth, self.dead_letters, self.oldest_pending]
        if per_sync_histograms:
            self._per_sync += [self.poll_duration, self.delivery_duration]
        self._known: set[str] = set()

    def add_sync(self, sync_id: str) -> None:
        """Create a sync's series at zero so dashboards and alerts see them before the first event."""
        if sync_id in self._known:
            return
        self._known.add(sync_id)
        for metric in self._per_sync:
            metric.labels(sync_id)
        for event_type in EVENT_TYPES:
            self.events.labels(sync_id, event_type)
        for reason in ("invalid_id", "duplicate_id"):
            self.skipped.labels(sync_id, reason)

    def remove_sync(self, sync_id: str) -> None:
        if sync_id not in self._known:
            return
        self._known.discard(sync_id)
        for metric in self._per_sync:
            metric.remove(sync_id)
        for event_type in EVENT_TYPES:
            self.events.remove(sync_id, event_type)
        for reason in ("invalid_id", "duplicate_id"):
            self.skipped.remove(sync_id, reason)

    def known(self, sync_id: str) -> bool:
        return sync_id in self._known

    def poll_histogram(self, sync_id: str) -> Histogram:
        return self.poll_duration.labels(sync_id) if self.per_sync_histograms else self.poll_duration

    def delivery_histogram(self, sync_id: str) -> Histogram:
        return self.delivery_duration.labels(sync_id) if self.per_sync_histograms else self.delivery_duration
