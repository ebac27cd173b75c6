"""Prometheus metrics, prefix selavpr_, in a registry per app (tests run several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.process_collector import ProcessCollector

STAGES = ("decode", "extract", "search", "rerank", "total")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends
        r = self.registry
        self.stage_seconds = Histogram(
            "selavpr_stage_seconds",
            "Latency of one localize stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "selavpr_request_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter("selavpr_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.batch_size = Histogram(
            "selavpr_batch_size",
            "Queries per model forward",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
            registry=r,
        )
        self.errors = Counter("selavpr_errors", "Errors by kind", ["kind"], registry=r)
        self.index_images = Gauge("selavpr_index_images", "Images in the served index version", registry=r)
        self.index_version = Info("selavpr_index", "The served index version", registry=r)
        self.rebuild_progress = Gauge(
            "selavpr_rebuild_progress", "Running rebuild: share done (0..1)", registry=r
        )
        self.rebuild_seconds = Histogram(
            "selavpr_rebuild_seconds",
            "Rebuild duration",
            buckets=(1, 5, 15, 60, 300, 900, 3600, 14400),
            registry=r,
        )
        self.rebuilds = Counter("selavpr_rebuilds", "Finished rebuilds", ["outcome"], registry=r)
        # Storage faults (app/verifier.py, index_builder/store/space.py)
        self.disk_full = Counter(
            "selavpr_disk_full", "Writes refused or failed for want of disk space", ["during"], registry=r
        )
        self.index_free_bytes = Gauge(
            "selavpr_index_disk_free_bytes", "Free bytes on the index folder's file system", registry=r
        )
        self.index_intact = Gauge(
            "selavpr_index_intact", "1: the served version verified intact; 0: damaged", registry=r
        )
        self.index_verified_at = Gauge(
            "selavpr_index_verified_timestamp_seconds", "End of the last verification pass", registry=r
        )
        self.index_verify_problems = Gauge(
            "selavpr_index_verify_problems",
            "Files missing, unreadable or changed in the served version",
            registry=r,
        )
        self.rollbacks = Counter("selavpr_index_rollbacks", "Automatic rollbacks", registry=r)
        # Location shards served by other processes (`serve --engine ray`): one series per shard.
        self.shard_seconds = Histogram(
            "selavpr_shard_call_seconds",
            "Latency of one call to a location shard that answered",
            ["shard", "call"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shard_failures = Counter(
            "selavpr_shard_failures",
            "Calls to a location shard that failed or passed their deadline (each try)",
            ["shard", "kind"],
            registry=r,
        )
        self.shard_partial = Counter(
            "selavpr_shard_partial_answers",
            "Answers given without this location shard (it failed its call and the retry)",
            ["shard"],
            registry=r,
        )
        self.partial_answers = Counter(
            "selavpr_partial_answers", "Answers flagged partial (some location shard missing)", registry=r
        )

    def observe_timings(self, timings_ms: dict[str, float]) -> None:
        for stage in STAGES:
            self.stage_seconds.labels(stage).observe(timings_ms[stage] / 1e3)
