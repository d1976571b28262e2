"""Prometheus metrics of the prediction service (GET /metrics when create_app(metrics=True)).

    stealguard_requests_total{outcome}        answered | refused | error
    stealguard_images_total{outcome}          answered | refused | refunded
    stealguard_refusals_total{reason}         one series per code of service.errors.REFUSALS
    stealguard_request_seconds                answered requests: arrival to answer (histogram)
    stealguard_request_images                 images per answered request (histogram)
    stealguard_model_batch_images             rows per model call of the micro-batcher (histogram)
    stealguard_key_budget_remaining{key}      images left per key with a budget (key ids only)

Each app has its own registry (two apps in one process do not share counters). The budget
gauge is read from the key store at scrape time. `NO_METRICS` stands in when metrics are off,
so the app calls the same methods either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from stealguard.service.errors import REFUSALS

if TYPE_CHECKING:
    from stealguard.service.store import KeyStore

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class ServiceMetrics:
    """The counters and histograms of one app, in their own CollectorRegistry."""

    def __init__(self, store: KeyStore) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("stealguard_requests", "Predict and info requests by outcome",
                                ["outcome"], registry=r)
        self.images = Counter("stealguard_images", "Images by outcome", ["outcome"], registry=r)
        self.refusals = Counter("stealguard_refusals", "Refused requests by reason (code)",
                                ["reason"], registry=r)
        self.latency = Histogram("stealguard_request_seconds", "Answered predict requests: "
                                 "seconds from arrival to answer", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.request_images = Histogram("stealguard_request_images", "Images per answered "
                                        "request", buckets=IMAGE_BUCKETS, registry=r)
        self.batch_images = Histogram("stealguard_model_batch_images", "Rows per model call "
                                      "(micro-batches)", buckets=IMAGE_BUCKETS, registry=r)
        for outcome in ("answered", "refused", "error"):
            self.requests.labels(outcome)
        for outcome in ("answered", "refused", "refunded"):
            self.images.labels(outcome)
        for reason in REFUSALS:
            self.refusals.labels(reason)
        r.register(_BudgetCollector(store))

    def answered(self, images: int, seconds: float) -> None:
        self.requests.labels("answered").inc()
        self.images.labels("answered").inc(images)
        self.latency.observe(seconds)
        self.request_images.observe(images)

    def refused(self, reason: str, images: int = 0) -> None:
        self.requests.labels("refused").inc()
        self.refusals.labels(reason).inc()
        if images:
            self.images.labels("refused").inc(images)

    def refunded(self, images: int) -> None:
        self.images.labels("refunded").inc(images)

    def error(self) -> None:
        self.requests.labels("error").inc()

    def model_batch(self, rows: int) -> None:
        self.batch_images.observe(rows)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _BudgetCollector:
    """stealguard_key_budget_remaining{key=<id>}, read from the store at each scrape."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store

    def describe(self) -> list[Any]:
        return []  # no fixed series: keys come and go

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily("stealguard_key_budget_remaining",
                              "Images left in each key's budget (keys with a budget; ids only)",
                              labels=["key"])
        for key in self.store.list_keys():
            if key.remaining is not None and key.revoked is None:
                g.add_metric([key.id], key.remaining)
        yield g


class _NoMetrics:
    """What the app calls when metrics are off."""

    def answered(self, images: int, seconds: float) -> None: ...
    def refused(self, reason: str, images: int = 0) -> None: ...
    def refunded(self, images: int) -> None: ...
    def error(self) -> None: ...
    def model_batch(self, rows: int) -> None: ...


NO_METRICS = _NoMetrics()
