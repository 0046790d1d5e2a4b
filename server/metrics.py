"""Prometheus metrics of one server (prometheus-client), served over HTTP at /metrics.

Each server has a registry of its own, so several servers can live in one process (the tests do).
Per-RPC counts and latencies come from server/observability.py; the data plane reports batches,
train steps and reads its live state (queue depths, step, learning rate, model version) on scrape.
"""
from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from engine.errors import ConfigError

log = logging.getLogger(__name__)

# Latency buckets (seconds): a digits Predict takes ~1 ms, a vit-small64 TrainStep ~0.5 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Rows per dynamically batched run: powers of two up to the largest --max-dynamic-batch people use.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("vitserve_requests", "RPCs answered, by method and gRPC status code",
                                ["method", "code"], registry=r)
        self.errors = Counter("vitserve_request_errors", "RPCs answered with a status other than OK",
                              ["method", "code"], registry=r)
        self.latency = Histogram("vitserve_request_duration_seconds", "Time from an RPC's arrival to its answer",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("vitserve_batch_size", "Images per dynamically batched ONNX Runtime run",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batcher_queue = Gauge("vitserve_batcher_queue_depth", "Predict/ModelInfer requests waiting for the batcher",
                                   registry=r)
        self.train_queue = Gauge("vitserve_train_queue_depth", "Training calls running or waiting for the one running",
                                 registry=r)
        self.train_steps = Counter("vitserve_train_steps", "TrainStep calls, by outcome (applied, accumulated, skipped)",
                                   ["outcome"], registry=r)
        self.step = Gauge("vitserve_train_step", "The optimizer's step counter", registry=r)
        self.loss = Gauge("vitserve_train_loss", "Loss of the last TrainStep", registry=r)
        self.grad_norm = Gauge("vitserve_grad_norm", "Global gradient norm of the last TrainStep (before clipping)",
                               registry=r)
        self.learning_rate = Gauge("vitserve_learning_rate", "Learning rate the next applied step uses", registry=r)
        self.model_version = Gauge("vitserve_model_version", "Published model version that Predict and ModelInfer serve",
                                   registry=r)
        self._http = None
        self.port: int | None = None  # the HTTP port once serve() ran

    def watch(self, *, batcher_queue: Callable[[], float], train_queue: Callable[[], float],
              step: Callable[[], float], learning_rate: Callable[[], float], model_version: Callable[[], float]) -> None:
        """Gauges read from live state at scrape time (nothing to keep in sync)."""
        self.batcher_queue.set_function(batcher_queue)
        self.train_queue.set_function(train_queue)
        self.step.set_function(step)
        self.learning_rate.set_function(learning_rate)
        self.model_version.set_function(model_version)

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        if code != "OK":
            self.errors.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def observe_step(self, loss: float, grad_norm: float, applied: bool, accumulated: bool) -> None:
        self.train_steps.labels("applied" if applied else "accumulated" if accumulated else "skipped").inc()
        self.loss.set(loss)
        self.grad_norm.set(grad_norm)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint on host:port (0 picks a free port); returns the port."""
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {e.strerror or e} "
                              "(choose another --metrics-port, or -1 for none)") from None
        self.port = self._http.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
