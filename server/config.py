"""Server settings: defaults, overridden by VITSERVE_* environment variables, then by flags.

`Settings` is a pydantic-settings model: one typed field per setting, whose description is its
documentation. The command-line flags of `python -m server` and the table in docs/settings.md are
generated from these fields (`python -m server.config --markdown` prints that table;
tests/test_settings.py fails when the committed file drifts from it).

Importing this module is cheap: it never imports torch, model/ or ONNX Runtime.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from engine import DEFAULT_MAX_BATCH_SIZE
from engine.errors import ConfigError

ENV_PREFIX = "VITSERVE_"


class Settings(BaseSettings):
    """Defaults <- VITSERVE_<FIELD> environment variables <- keyword arguments (the flags).

    `Settings(**values)` reads os.environ like any BaseSettings; `Settings.from_env(environ, **overrides)`
    reads the mapping it is given (`{}`: no environment at all) and raises ConfigError on a bad value.
    Fields with repr=False hold secrets: environment only (no flag), never in repr or logs.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    artifacts: Path = Field(Path("artifacts/digits"), description=(
        "Folder written by `make export` (manifest.json, inference.onnx, training artifacts)."))
    role: Literal["all", "train", "predict"] = Field("all", description=(
        "What this replica serves: 'all' (inference and training), 'train' (the trainer of a fleet: the same), or "
        "'predict' (inference only, from the inference graph and the manifest; training and checkpoint RPCs get "
        "FAILED_PRECONDITION)."))
    trainer: Literal["ort", "ort-training"] = Field("ort", description=(
        "What trains: 'ort' (PyTorch's autograd exported as a plain-ONNX gradient graph, on the maintained "
        "onnxruntime, any Python 3.11-3.13) or 'ort-training' (ONNX Runtime's deprecated training build 1.19.2 "
        "and its artifacts, Python <= 3.12). Ignored with --role predict."))
    host: str = Field("127.0.0.1", description=(
        "Address to bind. Loopback by default; 0.0.0.0 to listen on every interface."))
    port: int = Field(50051, description="TCP port; 0 picks a free one (tests use this).")
    device: str = Field("cpu", description=(
        "Execution device: 'cpu', 'cuda', 'cuda:N' or 'openvino' (OpenVINO's execution provider on the CPU, "
        "--trainer ort; pip install '.[openvino]'). A device that is not available is a startup error."))
    training_device: str = Field("", description=(
        "Execution device of the trainer alone (train and eval steps, checkpoints, Publish), if not --device. "
        "E.g. --device cpu --training-device openvino: OpenVINO trains 1.3-1.4x faster than the CPU provider "
        "here, while the CPU provider answers small Predict batches faster (docs/performance.md)."))
    data_dir: Path = Field(Path("data"), description=(
        "Where checkpoints and published model versions live (one subfolder per model). A restart resumes from it."))
    checkpoint_every_steps: int = Field(0, description=(
        "Write an automatic checkpoint every N applied train steps (0: off)."))
    checkpoint_every_seconds: float = Field(0.0, description=(
        "Write an automatic checkpoint every T seconds when training moved on (0: off)."))
    keep_checkpoints: int = Field(5, description=(
        "Automatic (and shutdown) checkpoints to keep; manual ones are never deleted."))
    publish_every_steps: int = Field(0, description=(
        "Publish the training weights to Predict every N applied train steps (0: off)."))
    gradient_history: int = Field(100, ge=0, description=(
        "Applied train steps whose gradient summaries the server keeps for GetGradientHistory (0: none)."))
    tensorboard_dir: str = Field("", description=(
        "Write TensorBoard event files of every applied train step to this folder ('': off); "
        "`tensorboard --logdir DIR` shows them."))
    tensorboard_histogram_every: int = Field(10, ge=1, description=(
        "Gradient histograms of every parameter go into the TensorBoard events every N applied steps."))
    model_repository: str = Field("", description=(
        "A Triton-layout model repository shared by a fleet ('': none). A trainer publishes every version into it "
        "(<repo>/<model>/<version>/model.onnx, config.pbtxt, labels.txt, manifest.json), atomically; a predict "
        "replica serves every model in it and follows it (Triton's poll mode)."))
    repository_poll_seconds: float = Field(5.0, gt=0, description=(
        "How often a predict replica scans --model-repository for new, changed and removed models and versions."))
    repository_versions: int = Field(1, ge=1, description=(
        "Versions of its model a trainer's config.pbtxt tells replicas (and Triton) to serve: version_policy "
        "latest num_versions."))
    data_parallel: bool = Field(False, description=(
        "Train data-parallel over MPI (start under `mpiexec --with-ft ulfm -n W`, W >= 2): rank 0 serves, every "
        "TrainStep's batch is split across the ranks and the gradients are all-reduced."))
    checksum_every_steps: int = Field(10, ge=0, description=(
        "With --data-parallel: the ranks compare a checksum of the weights every N applied steps and stop on "
        "divergence (0: never)."))
    learning_rate: float = Field(1e-3, description="Initial learning rate of the optimizer.")
    max_batch_size: int = Field(default=DEFAULT_MAX_BATCH_SIZE, description=(
        "Largest batch one Predict or TrainStep request may carry."))
    dynamic_batching: bool = Field(True, description=(
        "Coalesce concurrent Predict calls into one ONNX Runtime run (each caller gets its own rows)."))
    max_dynamic_batch: int = Field(64, description=(
        "Most images in one dynamically batched run; a larger request runs on its own."))
    max_batch_delay_ms: float = Field(0.0, description=(
        "How long the batcher waits for more requests after the first one (0: only what is already queued)."))
    max_queued_train_steps: int = Field(8, description=(
        "Training calls allowed to wait for the one running; more get RESOURCE_EXHAUSTED."))
    max_message_mb: int = Field(64, description="Largest gRPC message, in MiB, either way.")
    workers: int = Field(32, description=(
        "gRPC worker threads: calls in flight at once (Predict calls waiting in the dynamic batcher count)."))
    intra_op_threads: int = Field(0, description=(
        "ONNX Runtime intra-op threads per session; 0 lets ONNX Runtime use every core."))
    train_isolation: Literal["process", "thread"] = Field("process", description=(
        "Where a trainer runs its training engine: 'process' (a child process, so a train step never stalls "
        "Predict, ModelInfer, health or metrics) or 'thread' (in the server process: ONNX Runtime's train step "
        "holds the GIL for the whole step). With --data-parallel rank 0 trains in the server process."))
    train_threads: int = Field(0, ge=0, description=(
        "ONNX Runtime intra-op threads of the training sessions; 0: --intra-op-threads."))
    predict_threads: int = Field(0, ge=0, description=(
        "ONNX Runtime intra-op threads of each inference session; 0: --intra-op-threads."))
    log_level: str = Field("INFO", description="Python logging level.")
    log_json: bool = Field(False, description=(
        "Write every log line as one JSON object (for log collectors) instead of plain text."))
    http_port: int = Field(8000, ge=-1, le=65535, description=(
        "HTTP port of the KServe v2 REST API and vitserve.v1 over HTTP/JSON, on the same host and certificate as "
        "gRPC; 0 picks a free one, -1 turns it off."))
    metrics_port: int = Field(8002, description=(
        "HTTP port of the Prometheus endpoint (/metrics) on the same host as gRPC; 0 picks a free one, "
        "-1 turns it off."))
    tls_cert: str = Field("", description=(
        "PEM file with the server's TLS certificate (chain); with tls_key it turns TLS on ('' = plaintext)."))
    tls_key: str = Field("", description="PEM file with the private key of tls_cert.")
    tls_client_ca: str = Field("", description=(
        "PEM file with the CA(s) that sign client certificates: mutual TLS, a client without a valid one is refused."))
    read_token_file: str = Field("", description=(
        "File holding the read bearer token (Predict, info, listing); any token turns authentication on."))
    write_token_file: str = Field("", description=(
        "File holding the write bearer token (training, optimizer, checkpoints, publish; it also grants read)."))
    read_token: str = Field("", repr=False, description=(
        "The read bearer token itself: environment (VITSERVE_READ_TOKEN) only, never a flag."))
    write_token: str = Field("", repr=False, description=(
        "The write bearer token itself: environment (VITSERVE_WRITE_TOKEN) only, never a flag."))

    @property
    def training_threads(self) -> int:
        """Intra-op threads of the training sessions: --train-threads, else --intra-op-threads."""
        return self.train_threads or self.intra_op_threads

    @property
    def trainer_device(self) -> str:
        """The trainer's execution device: --training-device, else --device."""
        return self.training_device or self.device

    @property
    def inference_threads(self) -> int:
        """Intra-op threads of each inference session: --predict-threads, else --intra-op-threads."""
        return self.predict_threads or self.intra_op_threads

    @field_validator("*", mode="before")
    @classmethod
    def _strip_bool_text(cls, value: Any, info: ValidationInfo) -> Any:
        """' true ' is true, as it was before pydantic (which strips numbers but not booleans)."""
        if isinstance(value, str) and cls.model_fields[info.field_name].annotation is bool:
            return value.strip()
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments, then environment variables: no .env file and no secrets directory."""
        return init_settings, env_settings

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Defaults <- VITSERVE_<FIELD> variables of `environ` (os.environ when None) <- keyword overrides
        (None means 'not given'). A value that does not validate raises ConfigError naming its variable."""
        given = {name: value for name, value in overrides.items() if value is not None}
        environ = os.environ if environ is None else environ
        sources = (InitSettingsSource(cls, init_kwargs=given), _EnvironSource(cls, environ))  # first one wins
        try:
            return cls(_build_sources=(sources, given))
        except ValidationError as e:
            raise _config_error(e, given) from None


class _EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment source (prefix, case, parsing) over a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]):
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


def _config_error(error: ValidationError, given: Mapping[str, Any]) -> ConfigError:
    """One line for all that failed: `VITSERVE_PORT='x' is not a valid int` for a variable, `port='x' ...` for an
    override (a name in `given`)."""
    problems = []
    for e in error.errors():
        name = str(e["loc"][0]) if e["loc"] else ""
        if name not in Settings.model_fields:
            problems.append(f"{name!r} is not a setting")
            continue
        where = f"{name}={e['input']!r}" if name in given else f"{env_var(name)}={e['input']!r}"
        if e["type"].endswith(("_parsing", "_type", "_from_float")):
            problems.append(f"{where} is not a valid {type_name(name)}")
        else:
            problems.append(f"{where}: {e['msg']}")
    return ConfigError("; ".join(problems))


SECRET_FIELDS = frozenset(name for name, f in Settings.model_fields.items() if not f.repr)
"""Settings that hold secrets: environment only (no command-line flag), never in repr or logs."""


# ---------------------------------------------------------------- what flags and docs are made of

def env_var(name: str) -> str:
    """The environment variable of a setting: port -> VITSERVE_PORT."""
    return ENV_PREFIX + name.upper()


def flag(name: str) -> str:
    """The command-line flag of a setting: data_dir -> --data-dir."""
    return "--" + name.replace("_", "-")


def type_name(name: str) -> str:
    """The type of a setting as the docs and error messages name it: Path, int, float, bool or str."""
    return Settings.model_fields[name].annotation.__name__


def default_of(name: str) -> Any:
    """The default of a setting, with no environment (a default factory is called)."""
    return Settings.model_fields[name].get_default(call_default_factory=True)


def format_default(name: str) -> str:
    """A default as one would write it in the environment: true/false, "" for an empty string."""
    value = default_of(name)
    if isinstance(value, bool):
        return str(value).lower()
    return '""' if value == "" else str(value)


def render_markdown() -> str:
    """docs/settings.md: a header, then one table row per setting (flag, variable, type, default, description)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = []
    for name, f in Settings.model_fields.items():
        if name in SECRET_FIELDS:
            flags = "(environment only)"
        elif f.annotation is bool:
            flags = f"`{flag(name)}`, `--no-{flag(name)[2:]}`"
        else:
            flags = f"`{flag(name)}`"
        rows.append(f"| `{name}` | {flags} | `{env_var(name)}` | {type_name(name)} | `{format_default(name)}` "
                    f"| {cell(f.description or '')} |")
    return "\n".join([
        "# Server settings",
        "",
        "<!-- Generated from server/config.py: do not edit. Regenerate with `make docs`",
        "     (or `python -m server.config --markdown > docs/settings.md`). -->",
        "",
        "Every setting has a default, which its environment variable overrides, which its flag of",
        "`python -m server` (or `vitserve-server`) overrides. Variable names are matched without regard to case;",
        "booleans accept true/false, 1/0, yes/no and on/off. Secrets have no flag: set them in the environment,",
        "or give the server a file with the `*_file` setting. `--grace` is a flag only: how long in-flight calls",
        "may run on after SIGTERM.",
        "",
        "| Setting | Flag | Environment variable | Type | Default | Description |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m server.config", description="Print the server's settings.")
    p.add_argument("--markdown", action="store_true", required=True,
                   help="the settings table of docs/settings.md, as Markdown")
    p.parse_args(argv)
    print(render_markdown(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
