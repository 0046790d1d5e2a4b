"""Transport security and bearer-token authorization.

* TLS: `server_credentials(settings)` builds grpc.ssl_server_credentials from tls_cert/tls_key, and requires
  client certificates signed by tls_client_ca when that is set (mutual TLS); None means plaintext.
* Tokens: `TokenAuth` is a grpc.ServerInterceptor. A VitServe call must carry `authorization: Bearer <token>`;
  read-only RPCs accept the read or the write token, everything else (unknown methods included) only the write
  token; the KServe v2 inference and read methods (metadata, configuration, statistics, repository index) need
  the read token. Health, reflection and v2 ServerLive/ServerReady stay open for probes. Token values are never
  logged.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from engine.errors import ConfigError
from server.config import Settings

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/vitserve.v1.VitServe/"
READ, WRITE = "read", "write"
ROLES: dict[str, str] = {
    SERVICE_PREFIX + name: role for name, role in (
        ("Predict", READ), ("GetModelInfo", READ), ("EvalStep", READ), ("ExplainGradients", READ),
        ("GetOptimizer", READ), ("ListCheckpoints", READ), ("HeadImportance", READ), ("GetGradientHistory", READ),
        ("Attribute", READ),
        ("TrainStep", WRITE), ("SetOptimizer", WRITE), ("SaveCheckpoint", WRITE), ("RestoreCheckpoint", WRITE),
        ("Publish", WRITE),
    )
}
"""Full method name -> the role it needs. A VitServe method missing here needs the write token (fail closed)."""

V2_PREFIX = "/inference.GRPCInferenceService/"
V2_ROLES: dict[str, str | None] = {
    V2_PREFIX + name: role for name, role in (
        ("ServerLive", None), ("ServerReady", None),  # open like grpc.health.v1: probes carry no token
        ("ModelReady", READ), ("ServerMetadata", READ), ("ModelMetadata", READ), ("ModelInfer", READ),
        ("ModelConfig", READ), ("ModelStatistics", READ), ("RepositoryIndex", READ),
    )
}
"""The KServe v2 methods served (server/kserve.py): inference and the reads read like Predict and ModelMetadata;
the unsupported ones (repository load/unload, shared memory...) need the write token, then answer UNIMPLEMENTED."""

UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')"


def required_role(method: str) -> str | None:
    """The role `method` needs, or None for open methods (health, reflection, v2 liveness/readiness)."""
    if method.startswith(SERVICE_PREFIX):
        return ROLES.get(method, WRITE)
    if method.startswith(V2_PREFIX):
        return V2_ROLES.get(method, WRITE)
    return None


# ---------------------------------------------------------------- loading secrets

def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} file {path}: {e.strerror or e}") from None


def _token(value: str, path: str, name: str) -> str:
    """The token from the env value or the file (stripped); '' when neither is set. Validates, never echoes it."""
    if value and path:
        raise ConfigError(f"set either VITSERVE_{name.upper()} or {name}_file, not both")
    if path:
        try:
            value = _read_file(path, name).decode("ascii")
        except UnicodeDecodeError:
            raise ConfigError(f"{name} in {path} must be printable ASCII") from None
        value = value.strip()
        if not value:
            raise ConfigError(f"{name} file {path} is empty")
    else:
        value = value.strip()
    if value and not all(33 <= ord(c) <= 126 for c in value):
        raise ConfigError(f"{name} must be printable ASCII without spaces")
    return value


@dataclass(frozen=True)
class Security:
    """What create_server needs: TLS credentials (None: plaintext) and the tokens ('' : not configured)."""
    credentials: grpc.ServerCredentials | None = None
    mutual_tls: bool = False
    read_token: str = field(default="", repr=False)
    write_token: str = field(default="", repr=False)

    @property
    def tls(self) -> bool:
        return self.credentials is not None

    @property
    def auth(self) -> bool:
        return bool(self.read_token or self.write_token)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Security":
        """Read and check the certificate, key and token files (ConfigError on any problem)."""
        read = _token(settings.read_token, settings.read_token_file, "read_token")
        write = _token(settings.write_token, settings.write_token_file, "write_token")
        if read and write and hmac.compare_digest(read, write):
            raise ConfigError("the read and write tokens must differ")
        credentials = server_credentials(settings)
        return cls(credentials, bool(settings.tls_client_ca), read, write)

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [TokenAuth(self.read_token, self.write_token)] if self.auth else []


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("tls_cert and tls_key go together: set both or neither")
    if not settings.tls_cert:
        if settings.tls_client_ca:
            raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return None
    cert = _read_file(settings.tls_cert, "tls_cert")
    key = _read_file(settings.tls_key, "tls_key")
    client_ca = _read_file(settings.tls_client_ca, "tls_client_ca") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def log_mode(security: Security, host: str) -> None:
    """One line about transport security (a WARNING for plaintext off loopback), one about tokens (never values)."""
    if security.tls:
        log.info("TLS on%s", " with client certificates required (mutual TLS)" if security.mutual_tls else "")
    elif is_loopback(host):
        log.info("insecure mode: plaintext gRPC (no TLS) on loopback host %s", host)
    else:
        log.warning("serving plaintext gRPC (no TLS) on non-loopback address %s: requests%s travel unencrypted; "
                    "set tls_cert and tls_key", host, " and bearer tokens" if security.auth else "")
    if security.auth:
        log.info("bearer-token authentication on (read token: %s, write token: %s)",
                 "set" if security.read_token else "not set", "set" if security.write_token else "not set")
        if not security.write_token:
            log.warning("no write token configured: every write RPC is refused")
    else:
        log.info("bearer-token authentication off (no read or write token configured)")


# ---------------------------------------------------------------- the interceptor

def _abort_handler(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str):
    """A handler of the same streaming kind as `handler` that fails every call with `code`."""
    def abort(request_or_iterator, context):
        context.abort(code, message)

    if handler is None or not (handler.request_streaming or handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(abort)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.unary_stream_rpc_method_handler(abort)


class TokenAuth(grpc.ServerInterceptor):
    """Checks `authorization: Bearer <token>` on every VitServe call against the method's role."""

    def __init__(self, read_token: str = "", write_token: str = "") -> None:
        self._read = read_token.encode()
        self._write = write_token.encode()

    def _matches(self, presented: bytes, expected: bytes) -> bool:
        return bool(expected) and hmac.compare_digest(presented, expected)

    def role_of(self, metadata) -> str | None:
        """WRITE, READ or None (no token, or a wrong one)."""
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else ""
                break
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        presented = token.strip().encode("ascii", "replace")
        # Compare with both tokens every time (no early exit on which one matched).
        is_write, is_read = self._matches(presented, self._write), self._matches(presented, self._read)
        return WRITE if is_write else READ if is_read else None

    def refusal(self, method: str, metadata) -> tuple[grpc.StatusCode, str] | None:
        """(status, message) when the call's token does not allow `method` (a full gRPC method name), else None.
        The HTTP door asks the same question with the same method names."""
        needed = required_role(method)
        if needed is None:
            return None
        role = self.role_of(metadata)
        if role is None:
            log.info("refused %s: missing or invalid bearer token", method)
            return grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE
        if needed == WRITE and role != WRITE:
            log.info("refused %s: read token on a write RPC", method)
            name = method.rsplit("/", 1)[-1]
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"{name} changes the model and needs the write token (got the read token)")
        return None

    def intercept_service(self, continuation, handler_call_details):
        refused = self.refusal(handler_call_details.method, handler_call_details.invocation_metadata)
        if refused is None:
            return continuation(handler_call_details)
        return _abort_handler(continuation(handler_call_details), *refused)
