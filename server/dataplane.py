"""The data plane: everything the server does, with no gRPC in sight.

Holds the manifest, the engines and the data directory; validates batches
against the model (shape, dtype, finiteness, labels, batch limits) before
anything runs, and answers in plain Python/numpy. A rejected request raises
before it touches any state, so weights and the step counter stay exactly as
they were. It also owns the lifecycle around the engines: resuming from the
latest checkpoint, automatic and final checkpoints, publishing versions (and
handing them over to a fleet's model repository). Inference goes to the models
served by name (server/models.py): the own model of --artifacts, or, on a predict
replica over --model-repository, every model in the repository as a poll thread
finds them (engine/follower.py). The v2 protocol's view of the models (served
versions, Triton configurations, statistics, repository index) is answered here too.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import fnmatch
import functools
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from engine.explain import Explanation, GradientExplainer
from engine.graph_explain import GradientGraphExplainer
from engine.follower import READY, UNAVAILABLE, UNLOADED, LoadedVersion, ModelState, RepositoryFollower, poll_forever
from engine.fusion import optimize_inference_model
from engine.inference import InferenceEngine
from engine.isolation import IsolatedTrainingEngine
from engine.manifest import (
    GRADIENT_MODEL,
    TRAINER_FILES,
    INFERENCE_MODEL,
    TRAINING_MODEL,
    Manifest,
    Parameter,
    Preprocessing,
    QkvLayout,
    Unplaced,
)
from engine.repository import RepositoryWriter
from engine.runtime import VERSION as ORT_VERSION
from engine.runtime import providers_for, quiet_default_logger, release_freed_memory, resident_bytes, session_options
from engine.schedule import LinearSchedule
from engine.store import (
    CheckpointInfo,
    CheckpointList,
    CheckpointStore,
    ModelVersion,
    VersionStore,
    check_writable,
    describe_os_error,
    os_errno,
)
from engine.training import EvalResult, HeadImportanceResult, OptimizerState, StepResult, TrainingEngine
from engine.triton import model_config
from proto import model_config_pb2
from server.batching import DynamicBatcher
from server.config import Settings
from server.decode import BatchValidator
from server.metrics import Metrics
from server.models import Prediction, ServedModel
from server.statistics import ModelStatisticsList

log = logging.getLogger(__name__)


@contextlib.contextmanager
def write_errors(what: str, folder: Path):
    """OS (and ONNX Runtime) write failures as statuses naming the folder: a full disk is RESOURCE_EXHAUSTED,
    anything else (read-only, permissions, I/O errors) FAILED_PRECONDITION. The store left no partial entry."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        reason = describe_os_error(e)
        full = os_errno(e) in (errno.ENOSPC, errno.EDQUOT)
        message = f"{what} could not be written to {folder}: {reason}"
        if full:
            raise ResourceExhausted(f"{message} (the disk is full)") from None
        raise FailedPrecondition(message) from None

@dataclass(frozen=True)
class ModelInfo:
    """GetModelInfo's answer (proto: ModelInfo): the model, how to feed it, the training state and settings."""
    name: str
    config_json: str  # the export's source: preset and config, or module:Class and kwargs
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str  # a DataType name
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    parameters: tuple[Parameter, ...]
    execution_providers: list[str]
    device: str
    opset: int
    optimizer: str
    step: int
    learning_rate: float
    max_batch_size: int
    export_versions: dict[str, str]
    loss_node: str
    loss_op_type: str
    model_version: int
    versions: list[ModelVersion]
    checkpoint_every_steps: int
    checkpoint_every_seconds: float
    publish_every_steps: int
    attention: tuple[QkvLayout, ...]
    unplaced: tuple[Unplaced, ...]
    role: str  # all | train | predict
    trainer: str  # ort | ort-training; "" without a training engine
    onnxruntime_version: str


@dataclass(frozen=True)
class GradientHistory:
    """GetGradientHistory's answer (proto: GradientHistoryResponse)."""
    steps: tuple[StepResult, ...]  # oldest first
    capacity: int  # applied steps the server keeps


@dataclass(frozen=True)
class ModelIndex:
    """One version of a model in the repository index (proto: RepositoryIndexResponse.ModelIndex)."""
    name: str
    version: str  # "" for a model none of whose versions can be listed
    state: str  # READY or UNAVAILABLE
    reason: str  # why it is not READY ("" when it is)


@dataclass(frozen=True)
class RepositoryIndex:
    """RepositoryIndex's answer (proto: RepositoryIndexResponse): every model's versions, by name, oldest first."""
    models: tuple[ModelIndex, ...]


CHECKPOINT_FOLDERS = {"ort": "checkpoints", "ort-training": "checkpoints-ort-training"}  # under <data-dir>/<model>/


def not_served(what: str, role: str) -> FailedPrecondition:
    return FailedPrecondition(f"{what} is not served by this replica (--role {role}: inference only); send it to a "
                              "trainer (--role train or all)")


def trainer_only(method):
    """A DataPlane method that needs the training engine: FAILED_PRECONDITION on an inference-only replica."""
    what = method.__name__.replace("_", " ")

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.training is None:
            raise not_served(what, self.settings.role)
        return method(self, *args, **kwargs)

    return wrapper


class DataPlane:
    def __init__(self, settings: Settings):
        self.settings = settings
        quiet_default_logger()
        self._providers = providers_for(settings.device)
        self._options = session_options(settings.training_threads, training=True)
        self._inference_options = session_options(settings.inference_threads, training=False)
        self.metrics = Metrics()
        self._states: dict[str, ModelState] = {}  # the repository's models as last polled (a replica of one)
        self.training = self.checkpoints = self.versions = self.repository = self.follower = None
        self.manifest: Manifest | None = None  # the trainer's model (or the one model of --artifacts)
        self._models: dict[str, ServedModel] = {}  # by name; replaced whole
        self._closing = False
        self._stop = threading.Event()
        self._poller = None
        self._ready_watchers: list = []  # called with `ready` whenever it changes (the gRPC health service)
        predict_only = settings.role == "predict"
        if predict_only and settings.model_repository:
            self._follow_repository(Path(settings.model_repository))
        else:
            self._open_own_model(settings, predict_only)

        self._history = collections.deque(maxlen=settings.gradient_history) if settings.gradient_history else None
        self.board = None
        if settings.tensorboard_dir and self.training is not None:
            from server.tensorboard import GradientBoard  # tensorboardX loads only when asked for

            self.board = GradientBoard(Path(settings.tensorboard_dir), settings.tensorboard_histogram_every)
        self._checkpoint_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._train_gate = threading.Condition()
        self._train_calls = 0  # TrainSteps running or waiting
        self._explainer = None  # built on first use: reading the training graph costs a moment
        self._dirty = False  # training state changed since the last checkpoint
        self._last_checkpoint = time.monotonic()
        self.metrics.watch(batcher_queue=lambda: sum(m.batcher.pending() for m in self._models.values() if m.batcher),
                           train_queue=lambda: self._train_calls, step=lambda: self.step,
                           learning_rate=lambda: self.training.learning_rate if self.training else 0.0,
                           model_version=lambda: self.model_version)
        self._autosave = None
        if settings.checkpoint_every_seconds > 0 and self.training is not None:
            self._autosave = threading.Thread(target=self._autosave_loop, name="vitserve-autosave", daemon=True)
            self._autosave.start()
        if self.repository is not None:
            self._hand_over()

    def _open_own_model(self, settings: Settings, predict_only: bool) -> None:
        """The model of --artifacts: trained here (role all/train), or only served (role predict)."""
        trainer_files = TRAINER_FILES[settings.trainer]  # the trainer's own graph names its checkpoints
        self.manifest = m = Manifest.load(settings.artifacts, (INFERENCE_MODEL, *(() if predict_only else trainer_files)))
        folder = settings.data_dir / m.name
        if predict_only:  # writes nothing: serves the newest intact version a trainer published there, if any
            self.versions = VersionStore(folder / "models") if (folder / "models").is_dir() else None
            newest = self.versions.versions()[-1] if self.versions and self.versions.versions() else None
        else:
            checkpoints = CHECKPOINT_FOLDERS[settings.trainer]  # the two trainers' checkpoints differ in format
            for sub in (checkpoints, "models", "quarantine"):  # every folder the server writes, checked up front
                check_writable(folder / sub)
            self.checkpoints = CheckpointStore(folder / checkpoints, m.files[trainer_files[0]],
                                               settings.keep_checkpoints, quarantine=folder / "quarantine" / checkpoints)
            self.versions = VersionStore(folder / "models", quarantine=folder / "quarantine" / "models")
            newest = self.versions.newest_intact()
            if settings.model_repository:
                self.repository = RepositoryWriter(Path(settings.model_repository), m, self.triton_config())
        resumed = None
        try:
            if not predict_only:
                self.training, resumed = self._resume(m, settings)
            if settings.data_parallel and self.training is not None:  # rank 0 of an MPI job: engine/parallel.py
                from engine.parallel import DataParallelEngine

                self.training = DataParallelEngine(self.training, settings.checksum_every_steps)
            served = self._load_own_version(newest)
        except RuntimeError as e:  # e.g. a CUDA build of ORT on a machine without the CUDA libraries or a GPU
            raise ConfigError(f"cannot open the model on {settings.device}: {str(e).strip().splitlines()[0]}") from None
        if resumed:
            log.info("resumed from checkpoint %s (step %d)", resumed.name, resumed.step)
        self._models = {m.name: ServedModel(m.name, m, self.triton_config(), settings, self.metrics, (served,))}
        log.info("loaded %s from %s on %s (%s), model version %d; %s on onnxruntime %s", m.name, settings.artifacts,
                 settings.device, ", ".join(self.inference.providers), served.version,
                 f"trainer {self.training.trainer}" if self.training else "no trainer", ORT_VERSION)

    def _follow_repository(self, root: Path) -> None:
        """Serve every model of the repository; a thread polls it for new, changed and removed ones."""
        if not root.is_dir():
            raise ConfigError(f"model repository {root} is not a folder")
        self.follower = RepositoryFollower(root, self._open_repository_version)
        self._apply(self.follower.poll())
        log.info("serving %d models from the model repository %s (polled every %gs): %s", len(self._models), root,
                 self.settings.repository_poll_seconds, ", ".join(self._models) or "none yet")
        self._poller = threading.Thread(target=poll_forever, name="vitserve-repository", daemon=True,
                                        args=(self.follower, self.settings.repository_poll_seconds, self._stop,
                                              self._apply))
        self._poller.start()

    def _open_repository_version(self, path: Path, manifest: Manifest) -> InferenceEngine:
        """A session on a repository version, checked with one run of the manifest's input shape."""
        engine = InferenceEngine(path, manifest.input_name, manifest.output_name, self._providers,
                                 self._inference_options)
        logits = engine.logits(np.zeros((1, *manifest.input_shape[1:]), np.float32))
        if logits.shape != (1, manifest.num_classes):
            raise InvalidArgument(f"its output has shape {list(logits.shape)} for one image, the manifest says "
                                  f"[1, {manifest.num_classes}]")
        return engine

    def _apply(self, states: dict[str, ModelState]) -> None:
        """Swap in a poll's models: same manifest and configuration -> new versions; otherwise a new ServedModel."""
        old, models = self._models, {}
        for name, state in states.items():
            if not state.served:
                continue
            current = old.get(name)
            if current is not None and current.manifest == state.manifest and current.config == state.config:
                current.serve(state.served)
                models[name] = current
            else:
                models[name] = ServedModel(name, state.manifest, state.config, self.settings, self.metrics,
                                           state.served)
        was_ready = self.ready
        self._models = models
        self._states = states
        if self.ready != was_ready:
            for watcher in self._ready_watchers:
                watcher(self.ready)
        for name, model in old.items():
            if models.get(name) is not model:
                model.close()  # requests it already queued are answered first

    def _resume(self, m: Manifest, settings: Settings) -> tuple[TrainingEngine, CheckpointInfo | None]:
        """A training engine on the newest checkpoint that verifies and loads, else on the export's checkpoint.

        A checkpoint that fails its checksums, or that ONNX Runtime cannot read, is quarantined with a
        WARNING naming it and what is wrong, and the next older one is tried."""
        try:
            for info, path in self.checkpoints.resume_candidates():
                try:
                    return self._training_engine(m, path), info
                except RuntimeError as e:
                    if "checkpoint" not in str(e).lower():
                        raise
                    self.checkpoints.quarantine(info.name, f"ONNX Runtime cannot load it ({describe_os_error(e)})")
        except InvalidArgument as e:
            raise ConfigError(f"{e}: use another --data-dir for these artifacts") from None
        return self._training_engine(m, None), None

    def _training_engine(self, m: Manifest, checkpoint: Path | None) -> TrainingEngine | IsolatedTrainingEngine:
        """The training engine: in a child process (--train-isolation process, the default), else in this one."""
        s = self.settings
        if s.train_isolation == "process" and not s.data_parallel:
            return IsolatedTrainingEngine(m, s.device, s.training_threads, s.learning_rate, checkpoint=checkpoint,
                                          trainer=s.trainer)
        return TrainingEngine(m, s.device, self._options, s.learning_rate, checkpoint=checkpoint, trainer=s.trainer)

    def _load_own_version(self, version: ModelVersion | None) -> LoadedVersion:
        """A session on a published version of the own model (None: the export's inference graph)."""
        path = self.versions.model_path(version.version) if version else self.manifest.path(INFERENCE_MODEL)
        before = resident_bytes()
        engine = InferenceEngine(path, self.manifest.input_name, self.manifest.output_name, self._providers,
                                 self._inference_options)
        return LoadedVersion(version.version if version else 0, version.step if version else 0,
                             version.created_unix if version else path.stat().st_mtime, engine,
                             path.stat().st_size, max(0, resident_bytes() - before), ())

    # -- the models served ----------------------------------------------------------------------------

    def model(self, name: str = "") -> ServedModel:
        """The model served under `name`; "" is the only (or the trainer's) one. NotFound names those served."""
        models = self._models
        if name:
            found = models.get(name)
            if found is None:
                raise self._unknown_model(name)
            return found
        if self.manifest is not None and self.manifest.name in models:
            return models[self.manifest.name]
        if len(models) == 1:
            return next(iter(models.values()))
        if not models:
            raise Unavailable(f"no model is loaded yet from the model repository {self.settings.model_repository}")
        raise InvalidArgument(f"this replica serves {len(models)} models ({', '.join(sorted(models))}): name one "
                              "in the request's model field")

    def _unknown_model(self, name: str) -> NotFound:
        served = ", ".join(f"'{n}'" for n in sorted(self._models)) or "no model yet"
        return NotFound(f"model '{name}' is not served here; this server serves {served}")

    @property
    def decoder(self) -> BatchValidator:
        """The validator of labelled batches: the trainer's model's."""
        if self.manifest is None:
            raise not_served("training", self.settings.role)
        return self.model().decoder

    @property
    def inference(self) -> InferenceEngine:
        """The default model's newest engine."""
        return self.model().latest.engine

    @property
    def batcher(self) -> DynamicBatcher | None:
        """The default model's dynamic batcher (None when batching is off)."""
        return self.model().batcher

    # -- inference ------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Inference calls are taken: a model is served and shutdown has not begun."""
        return not self._closing and bool(self._models)

    def watch_ready(self, watcher) -> None:
        """Call `watcher(ready)` now and whenever readiness changes (a replica's first model arrives, its last
        one leaves)."""
        self._ready_watchers.append(watcher)
        watcher(self.ready)

    @property
    def model_version(self) -> int:
        """The newest version the default model serves (0: the exported model; 0 too with no model)."""
        try:
            return self.model().latest.version
        except (InvalidArgument, Unavailable):
            return 0

    def inference_request(self, model: str = "", version: str = ""):
        """One timed inference request to a model (see ServedModel.inference_request)."""
        return self.model(model).inference_request(version)

    def logits(self, images: np.ndarray, model: str = "") -> tuple[int, np.ndarray]:
        """(model version, logits (b, classes)) through the dynamic batcher when it is on; one request."""
        with self.inference_request(model) as request:
            return request.logits(images)

    def predict(self, images: np.ndarray, k: int = 0, return_logits: bool = False, model: str = "") -> Prediction:
        """Top-k classes of a validated batch; one request."""
        with self.inference_request(model) as request:
            return request.predict(images, k, return_logits)

    # -- the v2 protocol's view of the models ---------------------------------------------------------

    def v2_model(self, name: str, version: str = "") -> tuple[ServedModel, str]:
        """The model and version a v2 call names (the name is required; version "" is the newest), or NotFound."""
        model = self.model(name) if name else None
        if model is None:
            raise self._unknown_model(name)
        return model, str(model.version(version).version)

    def triton_config(self, name: str = "") -> model_config_pb2.ModelConfig:
        """A model's Triton configuration. The own model's is what `python -m engine.triton` writes for it, with this
        server's batch limit, device and --repository-versions; a repository model's is its config.pbtxt."""
        if self.manifest is not None and name in ("", self.manifest.name):
            return model_config(self.manifest, self.settings.max_batch_size,
                                gpu=self.settings.device.startswith("cuda"),
                                num_versions=self.settings.repository_versions)
        return self.model(name).config

    def model_statistics(self, name: str = "", version: str = "") -> ModelStatisticsList:
        """The statistics per model and version: the versions served and every other that has statistics in this
        process (name "": every model; version "": all of its versions, oldest first)."""
        if version and not name:
            raise InvalidArgument(f"version '{version}' needs a model name")
        models = [self.model(name)] if name else [self._models[n] for n in sorted(self._models)]
        out = []
        for model in models:
            known = sorted({*(v.version for v in model.served), *model.statistics.versions()})
            if version and version not in map(str, known):
                raise NotFound(f"model '{model.name}' version '{version}' has no statistics; the versions with "
                               f"statistics are {', '.join(map(str, known))} (leave the version empty for all)")
            wanted = [int(version)] if version else known
            out.extend(model.statistics.model_statistics(model.name, v) for v in wanted)
        return ModelStatisticsList(tuple(out))

    def repository_index(self, repository_name: str = "", ready: bool = False) -> RepositoryIndex:
        """Every model's versions with Triton's states, by name: READY for those served (until shutdown begins),
        UNAVAILABLE with the reason for the others; `ready` keeps only the READY ones."""
        if repository_name:
            raise Unimplemented(f"repository_name '{repository_name}': naming a repository is not supported by "
                                "vitserve (a server has one: its model's data directory, or its --model-repository): leave it empty")
        models = []
        if self.follower is not None:
            for name, state in sorted(self._states.items()):
                if not state.index:
                    models.append(ModelIndex(name, "", UNAVAILABLE, state.problem))
                for v in state.index:
                    models.append(ModelIndex(name, str(v.version), v.state, v.reason))
        else:
            served, name = self.model_version, self.manifest.name
            for v in self.model_versions():
                models.append(ModelIndex(name, str(v.version), READY if v.version == served else UNAVAILABLE,
                                         "" if v.version == served else UNLOADED))
        if self._closing:
            models = [dataclasses.replace(m, state=UNAVAILABLE, reason="the server is shutting down")
                      if m.state == READY else m for m in models]
        return RepositoryIndex(tuple(m for m in models if m.state == READY or not ready))

    # -- training -------------------------------------------------------------------------------------

    @trainer_only
    def train_step(self, images: np.ndarray, labels: np.ndarray, summaries: bool = True,
                   accumulate_only: bool = False, deadline: float | None = None,
                   head_importance: bool = False) -> StepResult:
        """One train step (serialized); at most `max_queued_train_steps` may wait behind the running one.

        An applied step goes into the gradient history and, with --tensorboard-dir, the event files."""
        limit = self.settings.max_queued_train_steps
        with self._train_gate:
            if self._closing:
                raise Unavailable("the server is shutting down; no more train steps")
            if self._train_calls > limit:  # one running + `limit` waiting
                raise ResourceExhausted(f"training queue is full: {self._train_calls - 1} train steps are waiting "
                                        f"(max_queued_train_steps={limit}); retry later")
            self._train_calls += 1
        try:
            result = self.training.train_step(images, labels, summaries=summaries, accumulate_only=accumulate_only,
                                              deadline=deadline, head_importance=head_importance,
                                              on_gradients=self.board.histograms if self.board else None)
        finally:
            with self._train_gate:
                self._train_calls -= 1
                self._train_gate.notify_all()
        self.metrics.observe_step(result.loss, result.grad_norm, result.applied,
                                  accumulated=not result.applied and not result.skipped_reason)
        if result.applied:
            self._dirty = True
            s = self.settings
            if s.checkpoint_every_steps and result.step % s.checkpoint_every_steps == 0:
                self._auto_checkpoint(result.step)  # raises after rolling the step back when it cannot be durable
            if self._history is not None:
                self._history.append(result)
            if self.board:
                self.board.record(result)
            if s.publish_every_steps and result.step % s.publish_every_steps == 0:
                self.publish()
        return result

    @trainer_only
    def eval_step(self, images: np.ndarray, labels: np.ndarray) -> EvalResult:
        return self.training.eval_step(images, labels)

    @trainer_only
    def head_importance(self, images: np.ndarray, labels: np.ndarray) -> HeadImportanceResult:
        return self.training.head_importance(images, labels)

    @trainer_only
    def gradient_history(self, first_step: int = 0, last_step: int = 0, parameter: str = "") -> GradientHistory:
        """The kept applied steps with first_step <= step <= last_step (0: open), oldest first; with `parameter`
        (a shell-style pattern) only the matching parameters' summaries and attention modules."""
        if first_step < 0 or last_step < 0 or (last_step and first_step > last_step):
            raise InvalidArgument(f"step range [{first_step}, {last_step}] is not valid: give 0 <= first_step <= "
                                  "last_step (0 leaves a side open)")
        capacity = self.settings.gradient_history
        kept = [r for r in (self._history or ()) if r.step >= first_step and (not last_step or r.step <= last_step)]
        if parameter:
            def wanted(name: str) -> bool:
                return fnmatch.fnmatchcase(name, parameter)

            kept = [dataclasses.replace(r, gradients=[g for g in r.gradients if wanted(g.name)],
                                        attention=[a for a in r.attention if any(map(wanted, {*a.weights, *a.biases}))])
                    for r in kept]
        return GradientHistory(tuple(kept), capacity)

    @trainer_only
    def optimizer(self) -> OptimizerState:
        return self.training.optimizer_state()

    @trainer_only
    def set_optimizer(self, learning_rate: float | None, schedule: LinearSchedule | None,
                      clip_grad_norm: float | None) -> OptimizerState:
        state = self.training.set_optimizer(learning_rate, schedule, clip_grad_norm)
        self._dirty = True
        return state

    # -- checkpoints ----------------------------------------------------------------------------------

    @trainer_only
    def save_checkpoint(self, name: str = "", reason: str = "manual") -> CheckpointInfo:
        """Atomically write the training state. Empty name: manual-<step> or step-<step> (automatic)."""
        with self._checkpoint_lock, self.training.lock:  # no step between naming and writing
            step = self.training.step
            name = name or (f"manual-{step:08d}" if reason == "manual" else f"step-{step:08d}")
            with write_errors(f"checkpoint {name!r}", self.checkpoints.root):
                info = self.checkpoints.save(name, reason, self.training.save_checkpoint)
            self._dirty, self._last_checkpoint = False, time.monotonic()
        log.info("checkpoint %s written (step %d, %s)", info.name, info.step, reason)
        return info

    def _auto_checkpoint(self, step: int) -> None:
        """The checkpoint after an applied step. With checkpoint_every_steps 1 a step is acknowledged only once it
        is durable: when its checkpoint cannot be written the step is rolled back to the previous checkpoint (the
        state before the call) and the call fails. With N > 1 the failure is logged and the step stays applied
        (the steps since the last checkpoint were never durable); the next checkpoint tries again."""
        try:
            self.save_checkpoint("", reason="auto")
        except (ResourceExhausted, FailedPrecondition) as e:
            if self.settings.checkpoint_every_steps != 1:
                log.error("automatic checkpoint after step %d failed: %s", step, e)
                return
            previous = next((c for c in reversed(self.checkpoints.list()) if c.step == step - 1 and not c.problem),
                            None)
            with self._checkpoint_lock:
                self.training.restore_checkpoint(self.checkpoints.path(previous) if previous else None)
            log.error("step %d rolled back to step %d: its checkpoint could not be written (%s)", step, step - 1, e)
            raise type(e)(f"{e}; the step was rolled back (weights, optimizer state and step as before the call)") \
                from None

    @trainer_only
    def list_checkpoints(self) -> CheckpointList:
        return CheckpointList(tuple(self.checkpoints.list()))

    @trainer_only
    def restore_checkpoint(self, name: str) -> CheckpointInfo:
        with self._checkpoint_lock:
            info = self.checkpoints.get(name)
            path = self.checkpoints.path(info)  # FailedPrecondition when damaged: nothing changes
            try:
                self.training.restore_checkpoint(path)
            except RuntimeError as e:  # ORT refused the file before touching the state
                raise FailedPrecondition(f"checkpoint {name!r} cannot be loaded by ONNX Runtime "
                                         f"({describe_os_error(e)}); nothing was restored") from None
            self._dirty = True  # a restart must resume from this state, not from a newer checkpoint
        log.info("restored checkpoint %s (step %d)", info.name, info.step)
        return info

    def _autosave_loop(self) -> None:
        every = self.settings.checkpoint_every_seconds
        while not self._stop.wait(min(every, 1.0)):
            if self._dirty and time.monotonic() - self._last_checkpoint >= every:
                try:
                    self.save_checkpoint("", reason="auto")
                except Exception:  # keep the timer alive; the next tick tries again
                    log.exception("automatic checkpoint failed")

    def close(self) -> CheckpointInfo | None:
        """Refuse new train steps, let running ones finish, stop the repository poll, the batchers and the timer,
        and write a final checkpoint if the training state changed since the last one (so it holds every
        applied step)."""
        with self._train_gate:
            self._closing = True
            self._train_gate.wait_for(lambda: self._train_calls == 0)
        self._stop.set()
        if self._poller:
            self._poller.join()
        for model in self._models.values():
            model.close()
        if self._autosave:
            self._autosave.join()
        try:
            return self.save_checkpoint("", reason="shutdown") if self._dirty and self.training else None
        finally:
            if isinstance(self.training, IsolatedTrainingEngine):
                self.training.close()
            self.metrics.close()
            if self.board:
                self.board.close()

    # -- publishing -----------------------------------------------------------------------------------

    @trainer_only
    def publish(self) -> ModelVersion:
        """Export the current training weights as the next model version and switch Predict to it; with a model
        repository the version is handed over there too (<repo>/<model>/<version>/), after the data directory."""
        m = self.manifest

        def write(path) -> int:
            step = self.training.export_inference_model(path, m.output_name)
            optimize_inference_model(path, [q.heads for q in m.qkv], m.input_name, m.input_shape)
            return step

        with self._publish_lock:
            floor = max(self.repository.versions(), default=0) if self.repository else 0
            with write_errors("the next model version", self.versions.root):  # only the write is a write failure
                version = self.versions.publish(write, after=floor)
            self._serve_own(version)
            if self.repository is not None:
                self._hand_over_version(version)
        release_freed_memory()  # the dropped sessions' arenas, which glibc would otherwise keep
        log.info("published model version %d (step %d)", version.version, version.step)
        return version

    def _serve_own(self, version: ModelVersion) -> None:
        own = self.model()
        own.serve((self._load_own_version(version),))

    def _hand_over_version(self, version: ModelVersion) -> None:
        with write_errors(f"model version {version.version}", self.repository.folder):
            self.repository.publish(self.versions.model_path(version.version), version.version, version.step,
                                    version.created_unix)
        log.info("model version %d handed over to the model repository %s", version.version, self.repository.folder)

    def _hand_over(self) -> None:
        """At startup: the repository gets the trainer's newest version if it lacks it (a crash between the data
        directory and the repository, or a new repository); with no version anywhere the trainer publishes one,
        so replicas have a model to serve from the start."""
        published, handed = self.versions.versions(), self.repository.versions()
        if not published and not handed:
            self.publish()
        elif published and published[-1].version > max(handed, default=0):
            self._hand_over_version(published[-1])

    def model_versions(self) -> list[ModelVersion]:
        published = self.versions.versions() if self.versions else []
        return [ModelVersion(0, 0, self.manifest.path(INFERENCE_MODEL).stat().st_mtime), *published]

    # -- explaining ----------------------------------------------------------------------------------

    @trainer_only
    def explain(self, parameter: str = "") -> Explanation:
        if self._explainer is None:  # the graph the trainer runs
            self._explainer = (GradientGraphExplainer(self.manifest.path(GRADIENT_MODEL), self.manifest)
                               if self.settings.trainer == "ort"
                               else GradientExplainer(self.manifest.path(TRAINING_MODEL), self.manifest))
        return self._explainer.explain(parameter)

    @property
    def step(self) -> int:
        """Optimizer steps applied so far (0 on an inference-only replica)."""
        return self.training.step if self.training else 0

    def model_info(self, name: str = "") -> ModelInfo:
        """The model `name` ("" for the only or the trainer's one): the export, the training state and the settings."""
        model, s = self.model(name), self.settings
        m, own = model.manifest, model.manifest is self.manifest
        versions = (self.model_versions() if own else
                    [ModelVersion(v.version, v.step, v.created_unix) for v in model.served])
        trainer = self.training.trainer if self.training else ""
        loss = m.gradient_loss if trainer == "ort" and m.gradient_loss else m.loss  # the graph that trains
        return ModelInfo(
            name=model.name, config_json=json.dumps(m.source), input_name=m.input_name, input_shape=m.input_shape,
            input_dtype="FLOAT32", preprocessing=m.preprocessing, class_names=m.class_names, parameters=m.parameters,
            execution_providers=model.latest.engine.providers, device=s.device, opset=m.opset,
            optimizer=m.optimizer["name"], step=self.step if own else model.latest.step,
            learning_rate=self.training.learning_rate if self.training else 0.0,
            max_batch_size=s.max_batch_size, export_versions=m.versions, loss_node=loss.name,
            loss_op_type=loss.op_type, model_version=model.latest.version, versions=versions,
            checkpoint_every_steps=s.checkpoint_every_steps, checkpoint_every_seconds=s.checkpoint_every_seconds,
            publish_every_steps=s.publish_every_steps, attention=m.attention, unplaced=m.unplaced, role=s.role,
            trainer=trainer, onnxruntime_version=ORT_VERSION,
        )
