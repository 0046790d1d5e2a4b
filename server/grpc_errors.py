"""The one place where engine errors become gRPC statuses, for every servicer (vitserve.v1 and KServe v2)."""
from __future__ import annotations

import functools
import logging

import grpc

from engine.errors import VitServeError

log = logging.getLogger("server.servicer")


def grpc_errors(method):
    """Map VitServeError to its status code and message; anything else to INTERNAL (logged with its traceback)."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except VitServeError as e:
            context.abort(grpc.StatusCode[e.code], str(e))
        except Exception:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed on the server; see its log")

    return wrapper
