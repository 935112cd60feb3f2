"""Prometheus metrics of one server (its own registry, so several servers in one process do not mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("mtp_queue_depth", "Images waiting for a batch", registry=r)
        self.batch_size = Histogram("mtp_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.batch_rows = Histogram(
            "mtp_batch_rows", "(image, task) rows per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "mtp_batch_seconds", "Seconds per forward pass (incl. post-processing)", buckets=LATENCY_BUCKETS, registry=r
        )
        self.task_latency = Histogram(
            "mtp_task_latency_seconds",
            "Seconds from arrival to result of predict requests, per requested task",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "mtp_http_requests", "HTTP requests by route and status code", ["route", "code"], registry=r
        )
        self.errors = Counter("mtp_http_errors", "HTTP error responses (4xx, 5xx) by status code", ["code"], registry=r)
        self.tasks_resident = Gauge("mtp_tasks_resident", "Tasks loaded in the model", registry=r)
        self.task_loads = Counter("mtp_task_loads", "Tasks loaded from disk (admin loads and reloads)", registry=r)
        self.task_evictions = Counter("mtp_task_evictions", "Tasks evicted (least recently used)", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
