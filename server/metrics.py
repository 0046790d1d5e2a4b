"""Prometheus metrics of one server (prometheus-client), served over HTTP at /metrics.

Each server has a registry of its own, so several servers can live in one process (the tests do).
Per-RPC counts and latencies come from server/observability.py; the data plane reports batches,
train steps and reads its live state (queue depths, step, learning rate, model version) on scrape.

The endpoint serves /metrics only: every other path is 404. (prometheus-client's own server
answers every path with the metrics, so an HTTP health probe of another protocol, e.g.
tritonclient.http's is_server_ready() asking /v2/health/ready, took the port for a ready server.)
"""
from __future__ import annotations

import logging
import socket
import threading
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from engine.errors import ConfigError

log = logging.getLogger(__name__)

# Latency buckets (seconds): a digits Predict takes ~1 ms, a vit-small64 TrainStep ~0.5 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Rows per dynamically batched run: powers of two up to the largest --max-dynamic-batch people use.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
METRICS_PATH = "/metrics"


def metrics_only(app: Callable) -> Callable:
    """A WSGI app that is `app` at METRICS_PATH and 404 Not Found everywhere else."""
    body = f"404 Not Found: the metrics are at {METRICS_PATH}\n".encode()

    def wrapped(environ, start_response):
        if environ.get("PATH_INFO") == METRICS_PATH:
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                          ("Content-Length", str(len(body)))])
        return [body]

    return wrapped


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def start_metrics_server(host: str, port: int, registry: CollectorRegistry) -> ThreadingWSGIServer:
    """The registry's metrics at http://host:port/metrics (404 elsewhere), served by a daemon thread."""
    # IPv4 or IPv6, as the host resolves (what prometheus-client's start_http_server does)
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    httpd = make_server(address[0], port, metrics_only(make_wsgi_app(registry)), server_class,
                        handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="vitserve-metrics", daemon=True).start()
    return httpd


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
        self.model_weights = Gauge("vitserve_model_weights_bytes", "Size of a loaded model version's ONNX graph",
                                   ["model", "version"], registry=r)
        self.model_memory = Gauge("vitserve_model_memory_bytes", "How much the server's resident memory grew while "
                                  "it loaded a model version (its session, weights and arena)", ["model", "version"],
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

    def model_version_loaded(self, model: str, version: int, weights_bytes: int, memory_bytes: int) -> None:
        self.model_weights.labels(model, str(version)).set(weights_bytes)
        self.model_memory.labels(model, str(version)).set(memory_bytes)

    def forget_model_version(self, model: str, version: int) -> None:
        """A version that is no longer loaded leaves the gauges."""
        for gauge in (self.model_weights, self.model_memory):
            try:
                gauge.remove(model, str(version))
            except KeyError:
                pass

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
            self._http = start_metrics_server(host, port, self.registry)
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
