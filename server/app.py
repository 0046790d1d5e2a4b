"""Server assembly: `create_server(settings) -> (server, port)`, reused by __main__ and the tests."""
from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from proto import vitserve_pb2, vitserve_pb2_grpc
from server import kserve, reflection
from server.auth import Security, log_mode
from server.config import Settings
from server.dataplane import DataPlane
from server.observability import RpcObserver
from server.servicer import VitServeServicer

log = logging.getLogger(__name__)
SERVICE = vitserve_pb2.DESCRIPTOR.services_by_name["VitServe"]
SERVICE_NAME = SERVICE.full_name  # "vitserve.v1.VitServe"


def create_server(settings: Settings, plane: DataPlane | None = None,
                  security: Security | None = None) -> tuple[grpc.Server, int]:
    """Build and start a server on settings.host:settings.port (port 0 picks one); returns it and its port.

    It serves vitserve.v1.VitServe, the KServe v2 inference.GRPCInferenceService, health and reflection (v1 and
    v1alpha, describing all of them) on that port, and Prometheus metrics over HTTP on settings.metrics_port (plane.metrics.port; -1: none).
    `security` (TLS credentials, tokens) defaults to Security.from_settings(settings); ConfigError when invalid.
    """
    security = security or Security.from_settings(settings)
    plane = plane or DataPlane(settings)
    limit = settings.max_message_mb * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="vitserve"),
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        interceptors=[RpcObserver(plane.metrics), *security.interceptors()],  # outermost first: refusals count
    )
    vitserve_pb2_grpc.add_VitServeServicer_to_server(VitServeServicer(plane), server)
    kserve.add_to_server(kserve.InferenceServicer(plane), server)

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    def health_follows(ready: bool) -> None:  # a replica with no model loaded is not ready for traffic
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME, kserve.SERVICE_NAME):
            health_servicer.set(name, status)

    plane.registry.watch_ready(health_follows)

    reflection.enable(server, (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"]))

    address = f"[{settings.host}]:{settings.port}" if ":" in settings.host else f"{settings.host}:{settings.port}"
    if security.credentials is not None:
        port = server.add_secure_port(address, security.credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    if settings.metrics_port >= 0:
        plane.metrics.serve(settings.host, settings.metrics_port)  # ConfigError when the port is taken
    server.start()
    log_mode(security, settings.host)
    log.info("serving %s and %s on %s:%d", SERVICE_NAME, kserve.SERVICE_NAME, settings.host, port)
    return server, port
