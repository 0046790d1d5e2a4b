"""One error hierarchy for the engine and the server.

Engines and the data plane raise these (they never import grpc); server/grpc_errors.py
maps each one to its gRPC status code, by name, in one place.
"""


class VitServeError(Exception):
    """Base class. `code` is the name of a grpc.StatusCode member."""

    code = "INTERNAL"


class InvalidArgument(VitServeError):
    """The request cannot be used as sent (shape, dtype, bytes, labels, image...)."""

    code = "INVALID_ARGUMENT"


class FailedPrecondition(VitServeError):
    """The request is well formed but the server's state does not allow it."""

    code = "FAILED_PRECONDITION"


class NotFound(VitServeError):
    code = "NOT_FOUND"


class ResourceExhausted(VitServeError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(VitServeError):
    """The caller's deadline passed before the work started; nothing was done."""

    code = "DEADLINE_EXCEEDED"


class Unavailable(VitServeError):
    """The server is shutting down."""

    code = "UNAVAILABLE"


class Unimplemented(VitServeError):
    """The request asks for something vitserve does not do (a v2 method or option it does not serve)."""

    code = "UNIMPLEMENTED"


class ConfigError(VitServeError):
    """The server cannot start as configured (bad artifacts, unavailable device...)."""

    code = "FAILED_PRECONDITION"
