"""Per-RPC observability: one log line and the request metrics for every call, and the log format.

`RpcObserver` is the outermost gRPC interceptor, so it sees every unary call, including those that
authentication refuses. Each call gets a request id: the client's `x-request-id` metadata when sent
(so a caller can follow its call through the logs), else a new one; the server sends it back as
initial metadata `x-request-id`. Health and reflection calls are logged at DEBUG (probes would
flood INFO); everything else at INFO, failures at WARNING, INTERNAL at ERROR.
"""
from __future__ import annotations

import json
import logging
import time
import uuid

import grpc

from server.metrics import Metrics

log = logging.getLogger("vitserve.rpc")
REQUEST_ID = "x-request-id"
MAX_REQUEST_ID = 128  # longer client ids are cut (they go into every log line)
QUIET_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                  "grpc.reflection.v1.ServerReflection")


def request_id(metadata) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID and isinstance(value, str) and value.isprintable() and value.strip():
            return value.strip()[:MAX_REQUEST_ID]
    return uuid.uuid4().hex[:16]


class RpcObserver(grpc.ServerInterceptor):
    """Times each unary call, reads its status code, logs one line and updates the metrics."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler  # unknown methods (UNIMPLEMENTED) and streams (health Watch) pass through
        full = handler_call_details.method  # "/vitserve.v1.VitServe/Predict"
        service, _, method = full.lstrip("/").rpartition("/")
        rid = request_id(handler_call_details.invocation_metadata)
        level = logging.DEBUG if service in QUIET_SERVICES else logging.INFO
        inner = handler.unary_unary

        def observed(request, context):
            start = time.perf_counter()
            context.send_initial_metadata(((REQUEST_ID, rid),))
            try:
                response = inner(request, context)
            except BaseException:
                self._finish(context, service, method, rid, start, level, failed=True)
                raise
            self._finish(context, service, method, rid, start, level, failed=False)
            return response

        return grpc.unary_unary_rpc_method_handler(observed, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)

    def _finish(self, context, service: str, method: str, rid: str, start: float, level: int, failed: bool) -> None:
        seconds = time.perf_counter() - start
        code = context.code() or (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
        self._metrics.observe_rpc(method, code.name, seconds)
        if code is grpc.StatusCode.INTERNAL:
            level = logging.ERROR
        elif code is not grpc.StatusCode.OK:
            level = max(level, logging.WARNING)
        fields = {"method": method, "service": service, "code": code.name, "duration_ms": round(seconds * 1000, 3),
                  "request_id": rid, "peer": context.peer()}
        if code is not grpc.StatusCode.OK:
            details = context.details() or ""
            fields["error"] = details.decode("utf-8", "replace") if isinstance(details, bytes) else details
        text = " ".join(f"{k}={v}" if k != "error" else f"error={v!r}" for k, v in fields.items())
        log.log(level, "rpc %s", text, extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus the record's `fields` (RPC lines)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name}
        fields = getattr(record, "fields", None)
        entry["message"] = f"rpc {fields['method']} {fields['code']}" if fields else record.getMessage()
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str, json_lines: bool) -> None:
    """Root logging to stderr: plain text, or JSON lines with --log-json."""
    handler = logging.StreamHandler()
    if json_lines:
        formatter = JsonFormatter()
        formatter.converter = time.gmtime  # the "Z" in the timestamps
        handler.setFormatter(formatter)
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
