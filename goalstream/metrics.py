"""Prometheus metrics: the SPEC's five under CONTRACT 8's names, the rest prefixed `goalstream_`."""

from __future__ import annotations

import bisect

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def observe_many(histogram: Histogram, value: float, count: int) -> None:
    """Observe `value` `count` times at once (what a loop of observe() would record).

    prometheus-client has no weighted observe; one per entry was a visible share of the hot
    path. This reaches into its (long-stable) internals, and falls back to the loop.
    """
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    total = getattr(histogram, "_sum", None)
    if buckets is None or bounds is None or total is None or count == 1:
        for _ in range(count):
            histogram.observe(value)
        return
    total.inc(value * count)
    buckets[bisect.bisect_left(bounds, value)].inc(count)


class Metrics:
    """The worker's metrics, on a registry of its own (so several workers can share a process)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = False):
        self.registry = registry if registry is not None else CollectorRegistry()
        if process:
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                self.registry.register(collector)
        r = self.registry
        self.events_received = Counter(
            "goal_events_received",
            "Stream entries received, by stream and event type ('invalid' if undecodable).",
            ["stream", "type"],
            registry=r,
        )
        self.evaluations = Counter(
            "goal_evaluations", "Events evaluated against the goal index.", registry=r
        )
        self.achievements = Counter(
            "goal_achievements",
            "Goal achievements recorded, by goal type.",
            ["goal_type"],
            registry=r,
        )
        self.evaluation_latency = Histogram(
            "goal_evaluation_latency_seconds",
            "Time to evaluate a batch and commit its effects (match in memory, check in SQL).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.listeners_active = Gauge(
            "goal_listeners_active", "Active goals in this worker's config cache.", registry=r
        )
        self.end_to_end_latency = Histogram(
            "goalstream_end_to_end_latency_seconds",
            "From the stream entry's id time to the commit of its effects.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "goalstream_batch_size",
            "Entries per batch read from the streams.",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
            registry=r,
        )
        self.dead_letters = Counter(
            "goalstream_dead_letters",
            "Entries sent to the dead-letter stream, by reason.",
            ["reason"],
            registry=r,
        )
        self.announcements = Counter(
            "goalstream_announcements",
            "Achievements published on the output stream (at least once each).",
            registry=r,
        )
        self.exits = Counter(
            "goalstream_enrollment_exits", "Enrolments exited on a goal.", registry=r
        )
        self.cancelled_actions = Counter(
            "goalstream_cancelled_actions",
            "Pending actions and wait steps cancelled on a goal exit.",
            registry=r,
        )
        self.errors = Counter(
            "goalstream_errors",
            "Errors talking to a server, by component (redis, postgres).",
            ["component"],
            registry=r,
        )
        self.cache_loads = Counter(
            "goalstream_cache_loads",
            "Goal cache loads, by kind (full, partial) and result (ok, error).",
            ["kind", "result"],
            registry=r,
        )
        self.cache_load_seconds = Histogram(
            "goalstream_cache_load_seconds",
            "Time to load goals into the cache, by kind.",
            ["kind"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.consumer_pending = Gauge(
            "goalstream_consumer_pending",
            "Entries delivered to the consumer group but not yet acknowledged, per stream.",
            ["stream"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "goalstream_consumer_lag",
            "Entries in the stream not yet delivered to the consumer group, per stream.",
            ["stream"],
            registry=r,
        )
        self.ready = Gauge(
            "goalstream_ready", "1 when PostgreSQL and Redis answer, else 0.", registry=r
        )
