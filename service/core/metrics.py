"""Prometheus metrics, in a registry of the app's own (two apps in one process stay apart)."""

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

# The *_created series double the output and no dashboard reads them.
disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "alexnet_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )

        def seconds(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, documentation, labels, buckets=LATENCY_BUCKETS, registry=r)

        def gauge(name: str, documentation: str, mode: str = "livesum") -> Gauge:
            # Several processes (fronts and engine): each sets its own share, /metrics adds them.
            return Gauge(name, documentation, registry=r, multiprocess_mode=mode)

        self.request_seconds = seconds("alexnet_request_seconds", "HTTP request latency", ("route",))
        self.in_flight = gauge("alexnet_requests_in_flight", "HTTP requests being handled")
        self.decode_seconds = seconds("alexnet_decode_seconds", "image decode time per image")
        self.preprocess_seconds = seconds("alexnet_preprocess_seconds", "resize and ten-crop time per image")
        self.inference_seconds = seconds("alexnet_inference_seconds", "ONNX Runtime time per inference call")
        self.batch_images = Histogram(
            "alexnet_inference_batch_images",
            "images (x10 crops) per inference call",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_images = gauge(
            "alexnet_queue_images", "images admitted and not finished (decoding, queued, running)"
        )
        self.rejected = Counter(
            "alexnet_rejected", "requests refused by backpressure or cost", ["reason"], registry=r
        )
        # Admission by cost (service.admission, service.decoding)
        self.decodes_in_progress = gauge(
            "alexnet_decodes_in_progress", "images queued or decoding in the decode workers"
        )
        self.decode_workers_live = gauge(
            "alexnet_decode_workers_live", "decode worker processes running (the pool's size when whole)"
        )
        self.decode_bytes = gauge("alexnet_decode_bytes", "estimated memory reserved by decodes in progress")
        self.decode_budget = gauge("alexnet_decode_budget_bytes", "server-wide decode budget", "livemax")
        self.upload_bytes = gauge("alexnet_upload_bytes", "request body bytes held by requests in progress")
        self.upload_budget = gauge("alexnet_upload_budget_bytes", "server-wide upload budget", "livemax")
        self.images = Counter("alexnet_images", "images classified", registry=r)
        self.model_info = Gauge(
            "alexnet_model_info",
            "the model in service (value 1)",
            ["version", "providers"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_labels: tuple[str, str] | None = None

    def show_model(self, labels: tuple[str, str] | None) -> None:
        """``model_info`` for the model in service; 0 for the one before (in several processes a
        series cannot be removed, only set)."""
        if labels == self.model_labels:
            return
        if self.model_labels is not None:
            self.model_info.labels(*self.model_labels).set(0)
        if labels is not None:
            self.model_info.labels(*labels).set(1)
        self.model_labels = labels

    def exposition(self) -> bytes:
        """The text /metrics answers: this process's registry, or every process's of the server."""
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
