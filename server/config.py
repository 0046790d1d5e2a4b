"""Server settings: defaults, overridden by VITSERVE_* environment variables, then by flags.

Each field's docstring is its documentation (`python -m server --help` shows them).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

from engine.errors import ConfigError

ENV_PREFIX = "VITSERVE_"
SECRET_FIELDS = frozenset({"read_token", "write_token"})
"""Settings that hold secrets: environment only (no command-line flag), never in repr or logs."""


@dataclass
class Settings:
    artifacts: Path = Path("artifacts/digits")
    """Folder written by `make export` (manifest.json, inference.onnx, training artifacts)."""

    host: str = "127.0.0.1"
    """Address to bind. Loopback by default; 0.0.0.0 to listen on every interface."""

    port: int = 50051
    """TCP port; 0 picks a free one (tests use this)."""

    device: str = "cpu"
    """Execution device: 'cpu', 'cuda' or 'cuda:N'. CUDA that is not available is a startup error."""

    data_dir: Path = Path("data")
    """Where checkpoints and published model versions live (one subfolder per model). A restart resumes from it."""

    checkpoint_every_steps: int = 0
    """Write an automatic checkpoint every N applied train steps (0: off)."""

    checkpoint_every_seconds: float = 0.0
    """Write an automatic checkpoint every T seconds when training moved on (0: off)."""

    keep_checkpoints: int = 5
    """Automatic (and shutdown) checkpoints to keep; manual ones are never deleted."""

    publish_every_steps: int = 0
    """Publish the training weights to Predict every N applied train steps (0: off)."""

    learning_rate: float = 1e-3
    """Initial learning rate of the optimizer."""

    max_batch_size: int = 256
    """Largest batch one Predict or TrainStep request may carry."""

    dynamic_batching: bool = True
    """Coalesce concurrent Predict calls into one ONNX Runtime run (each caller gets its own rows)."""

    max_dynamic_batch: int = 64
    """Most images in one dynamically batched run; a larger request runs on its own."""

    max_batch_delay_ms: float = 0.0
    """How long the batcher waits for more requests after the first one (0: only what is already queued)."""

    max_queued_train_steps: int = 8
    """Training calls allowed to wait for the one running; more get RESOURCE_EXHAUSTED."""

    max_message_mb: int = 64
    """Largest gRPC message, in MiB, either way."""

    workers: int = 32
    """gRPC worker threads: calls in flight at once (Predict calls waiting in the dynamic batcher count)."""

    intra_op_threads: int = 0
    """ONNX Runtime intra-op threads per session; 0 lets ONNX Runtime use every core."""

    log_level: str = "INFO"
    """Python logging level."""

    log_json: bool = False
    """Write every log line as one JSON object (for log collectors) instead of plain text."""

    metrics_port: int = 8002
    """HTTP port of the Prometheus endpoint (/metrics) on the same host as gRPC; 0 picks a free one, -1 turns it off."""

    tls_cert: str = ""
    """PEM file with the server's TLS certificate (chain); with tls_key it turns TLS on ('' = plaintext)."""

    tls_key: str = ""
    """PEM file with the private key of tls_cert."""

    tls_client_ca: str = ""
    """PEM file with the CA(s) that sign client certificates: mutual TLS, a client without a valid one is refused."""

    read_token_file: str = ""
    """File holding the read bearer token (Predict, info, listing); any token turns authentication on."""

    write_token_file: str = ""
    """File holding the write bearer token (training, optimizer, checkpoints, publish; it also grants read)."""

    read_token: str = field(default="", repr=False)
    """The read bearer token itself: environment (VITSERVE_READ_TOKEN) only, never a flag."""

    write_token: str = field(default="", repr=False)
    """The write bearer token itself: environment (VITSERVE_WRITE_TOKEN) only, never a flag."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Defaults <- VITSERVE_<FIELD> variables <- keyword overrides (None means 'not given')."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.artifacts = Path(settings.artifacts)
        return settings

def parse_bool(raw: str) -> bool:
    value = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
             "off": False}.get(raw.strip().lower())
    if value is None:
        raise ValueError(raw)
    return value


def _parse(f: dataclasses.Field, raw: str):
    kind = {"int": int, "float": float, "Path": Path, "bool": parse_bool}.get(str(f.type), str)
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {str(f.type)}") from None


def _read_field_docs() -> dict[str, str]:
    """Attribute docstrings of Settings, read from this file's source (no exec, no eval)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(Settings))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs


FIELD_DOCS = _read_field_docs()
