"""The data plane: everything the server does, with no gRPC in sight.

Holds the manifest, the engines and the data directory; validates batches
against the model (shape, dtype, finiteness, labels, batch limits) before
anything runs, and answers in plain Python/numpy. A rejected request raises
before it touches any state, so weights and the step counter stay exactly as
they were. It also owns the lifecycle around the engines: resuming from the
latest checkpoint, automatic and final checkpoints, publishing versions. Every
inference request (Predict and ModelInfer alike) is timed for the statistics
(server/statistics.py); the v2 protocol's view of the model (its served version,
Triton configuration, repository index) is answered here too.
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
from engine.fusion import optimize_inference_model
from engine.inference import InferenceEngine, top_k
from engine.manifest import (
    ARTIFACT_FILES,
    CHECKPOINT,
    INFERENCE_MODEL,
    TRAINING_MODEL,
    Manifest,
    Parameter,
    Preprocessing,
    QkvLayout,
    Unplaced,
)
from engine.runtime import providers_for, quiet_default_logger, release_freed_memory, session_options
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
from server.batching import Answer, DynamicBatcher, Run, execute
from server.config import Settings
from server.decode import BatchValidator
from server.metrics import Metrics
from server.statistics import ModelStatisticsList, Statistics

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

DEFAULT_TOP_K = 5


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


@dataclass(frozen=True)
class GradientHistory:
    """GetGradientHistory's answer (proto: GradientHistoryResponse)."""
    steps: tuple[StepResult, ...]  # oldest first
    capacity: int  # applied steps the server keeps


@dataclass(frozen=True)
class Prediction:
    indices: np.ndarray  # (b, k) class indices, best first
    probabilities: np.ndarray  # (b, k)
    labels: list[list[str]]  # (b, k) class names
    logits: np.ndarray | None  # (b, classes) when asked for
    model_version: int


READY, UNAVAILABLE = "READY", "UNAVAILABLE"  # Triton's model states
UNLOADED = "unloaded"  # Triton's reason for a version it no longer serves


@dataclass(frozen=True)
class ModelIndex:
    """One version of the model in the repository index (proto: RepositoryIndexResponse.ModelIndex)."""
    name: str
    version: str
    state: str  # READY or UNAVAILABLE
    reason: str  # why it is not READY ("" when it is)


@dataclass(frozen=True)
class RepositoryIndex:
    """RepositoryIndex's answer (proto: RepositoryIndexResponse): the model's versions, oldest first."""
    models: tuple[ModelIndex, ...]


class InferenceRequest:
    """One inference request to the model, from DataPlane.inference_request: it runs the batch and keeps
    what the statistics need (the answer and the images)."""

    def __init__(self, plane: "DataPlane") -> None:
        self._plane = plane
        self.answer: Answer | None = None
        self.images = 0

    def logits(self, images: np.ndarray) -> tuple[int, np.ndarray]:
        """(model version, logits (b, classes)) through the dynamic batcher when it is on."""
        self.answer = self._plane._answer(images)
        self.images = len(images)
        return self.answer.version, self.answer.logits

    def predict(self, images: np.ndarray, k: int = 0, return_logits: bool = False) -> Prediction:
        """Top-k classes (and the logits when asked for) of the batch."""
        manifest = self._plane.manifest
        k = min(k or DEFAULT_TOP_K, manifest.num_classes)
        version, logits = self.logits(images)
        names = manifest.class_names
        indices, probs = top_k(logits, k)
        return Prediction(indices, probs, [[names[i] for i in row] for row in indices],
                          logits if return_logits else None, version)


def trainer_only(method):
    """A DataPlane method that needs the training engine: FAILED_PRECONDITION on an inference-only replica."""
    what = method.__name__.replace("_", " ")

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.training is None:
            raise FailedPrecondition(f"{what} is not served by this replica (--role {self.settings.role}: inference "
                                     "only); send it to a trainer (--role train or all)")
        return method(self, *args, **kwargs)

    return wrapper


class DataPlane:
    def __init__(self, settings: Settings):
        self.settings = settings
        predict_only = settings.role == "predict"
        self.manifest = m = Manifest.load(settings.artifacts, (INFERENCE_MODEL,) if predict_only else ARTIFACT_FILES)
        self.decoder = BatchValidator(m.input_shape, m.num_classes, settings.max_batch_size, m.preprocessing)
        quiet_default_logger()
        self._providers = providers_for(settings.device)
        self._options = session_options(settings.intra_op_threads, training=True)
        self._inference_options = session_options(settings.intra_op_threads, training=False)
        folder = settings.data_dir / m.name
        if predict_only:  # writes nothing: serves the newest intact version a trainer published there, if any
            self.checkpoints = None
            self.versions = VersionStore(folder / "models") if (folder / "models").is_dir() else None
            newest = self.versions.versions()[-1] if self.versions and self.versions.versions() else None
        else:
            for sub in ("checkpoints", "models", "quarantine"):  # every folder the server writes, checked up front
                check_writable(folder / sub)
            self.checkpoints = CheckpointStore(folder / "checkpoints", m.files[TRAINING_MODEL],
                                               settings.keep_checkpoints, quarantine=folder / "quarantine" / "checkpoints")
            self.versions = VersionStore(folder / "models", quarantine=folder / "quarantine" / "models")
            newest = self.versions.newest_intact()
        version = newest.version if newest else 0
        try:
            self.training, resumed = (None, None) if predict_only else self._resume(m, settings)
            if settings.data_parallel and self.training is not None:  # rank 0 of an MPI job: engine/parallel.py
                from engine.parallel import DataParallelEngine

                self.training = DataParallelEngine(self.training, settings.checksum_every_steps)
            self._serving = (version, self._inference_engine(version))  # swapped whole by publish()
        except RuntimeError as e:  # e.g. a CUDA build of ORT on a machine without the CUDA libraries or a GPU
            raise ConfigError(f"cannot open the model on {settings.device}: {str(e).strip().splitlines()[0]}") from None
        if resumed:
            log.info("resumed from checkpoint %s (step %d)", resumed.name, resumed.step)
        self.metrics = Metrics()
        self.statistics = Statistics()
        self.batcher = DynamicBatcher(self._run_serving, settings.max_dynamic_batch, settings.max_batch_delay_ms / 1000,
                                      on_batch=self._batched) if settings.dynamic_batching else None
        log.info("loaded %s from %s on %s (%s), model version %d", m.name, settings.artifacts, settings.device,
                 ", ".join(self.inference.providers), version)

        self._history = collections.deque(maxlen=settings.gradient_history) if settings.gradient_history else None
        self.board = None
        if settings.tensorboard_dir:
            from server.tensorboard import GradientBoard  # tensorboardX loads only when asked for

            self.board = GradientBoard(Path(settings.tensorboard_dir), settings.tensorboard_histogram_every)
        self._checkpoint_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._train_gate = threading.Condition()
        self._train_calls = 0  # TrainSteps running or waiting
        self._closing = False
        self._explainer = None  # built on first use: reading the training graph costs a moment
        self._dirty = False  # training state changed since the last checkpoint
        self._last_checkpoint = time.monotonic()
        self._stop = threading.Event()
        self.metrics.watch(batcher_queue=lambda: self.batcher.pending() if self.batcher else 0,
                           train_queue=lambda: self._train_calls, step=lambda: self.step,
                           learning_rate=lambda: self.training.learning_rate if self.training else 0.0,
                           model_version=lambda: self.model_version)
        self._autosave = None
        if settings.checkpoint_every_seconds > 0:
            self._autosave = threading.Thread(target=self._autosave_loop, name="vitserve-autosave", daemon=True)
            self._autosave.start()

    def _resume(self, m: Manifest, settings: Settings) -> tuple[TrainingEngine, CheckpointInfo | None]:
        """A training engine on the newest checkpoint that verifies and loads, else on the export's checkpoint.

        A checkpoint that fails its checksums, or that ONNX Runtime cannot read, is quarantined with a
        WARNING naming it and what is wrong, and the next older one is tried."""
        try:
            for info, path in self.checkpoints.resume_candidates():
                try:
                    return TrainingEngine(m, settings.device, self._options, settings.learning_rate,
                                          checkpoint=path), info
                except RuntimeError as e:
                    if "checkpoint" not in str(e).lower():
                        raise
                    self.checkpoints.quarantine(info.name, f"ONNX Runtime cannot load it ({describe_os_error(e)})")
        except InvalidArgument as e:
            raise ConfigError(f"{e}: use another --data-dir for these artifacts") from None
        return TrainingEngine(m, settings.device, self._options, settings.learning_rate), None

    def _inference_engine(self, version: int) -> InferenceEngine:
        path = self.versions.model_path(version) if version else self.manifest.path(INFERENCE_MODEL)
        return InferenceEngine(path, self.manifest.input_name, self.manifest.output_name, self._providers,
                               self._inference_options)

    @property
    def inference(self) -> InferenceEngine:
        return self._serving[1]

    # -- inference ------------------------------------------------------------------------------------

    def _run_serving(self, images: np.ndarray) -> tuple[int, np.ndarray]:
        version, engine = self._serving  # one read: a concurrent publish cannot mix versions
        return version, engine.logits(images)

    @property
    def ready(self) -> bool:
        """Inference calls are taken (false once shutdown began)."""
        return not self._closing

    @property
    def model_version(self) -> int:
        """The published version being served (0: the exported model)."""
        return self._serving[0]

    def _batched(self, run: Run) -> None:
        """Every run of the dynamic batcher: the batch-size histogram and the statistics."""
        self.metrics.batch_size.observe(run.batch_size)
        self.statistics.record_run(run)

    def _answer(self, images: np.ndarray) -> Answer:
        """This batch's logits through the dynamic batcher, or run alone (and timed) when batching is off."""
        if self.batcher:
            return self.batcher.answer(images)
        run, (logits,) = execute(self._run_serving, [images])
        self.statistics.record_run(run)
        return Answer(logits, run, 0)

    @contextlib.contextmanager
    def inference_request(self):
        """One inference request to the model, timed for the statistics from here to the end of the block:

            with plane.inference_request() as request:
                images = decode(...)  # an invalid request raises here: counted as a failure
                answer = convert(request.predict(images))  # or request.logits(images)

        A block that raises counts as a failed request of the version that ran it (else the one served)."""
        request = InferenceRequest(self)
        start = time.perf_counter_ns()
        try:
            yield request
        except BaseException:
            version = request.answer.version if request.answer else self.model_version
            self.statistics.record_failure(version, time.perf_counter_ns() - start)
            raise
        if request.answer is not None:
            self.statistics.record_success(request.answer, request.images, time.perf_counter_ns() - start)

    def logits(self, images: np.ndarray) -> tuple[int, np.ndarray]:
        """(model version, logits (b, classes)) through the dynamic batcher when it is on; one request."""
        with self.inference_request() as request:
            return request.logits(images)

    def predict(self, images: np.ndarray, k: int = 0, return_logits: bool = False) -> Prediction:
        """Top-k classes of a validated batch; one request."""
        with self.inference_request() as request:
            return request.predict(images, k, return_logits)

    # -- the v2 protocol's view of the model ----------------------------------------------------------

    def _unknown_model(self, name: str) -> NotFound:
        return NotFound(f"model '{name}' is not served here; this server serves '{self.manifest.name}'")

    def served_version(self, name: str, version: str) -> str:
        """The version being served, as a string, or NotFound naming what is served instead."""
        served = str(self.model_version)
        if name != self.manifest.name:
            raise self._unknown_model(name)
        if version not in ("", served):
            raise NotFound(f"model '{name}' version '{version}' is not served; the version being served is {served} "
                           "(leave the version empty for it)")
        return served

    def triton_config(self) -> model_config_pb2.ModelConfig:
        """The model's Triton configuration: what `python -m engine.triton` writes for it, with this server's
        batch limit and device (`make export-triton` with the defaults, for a server with the defaults)."""
        return model_config(self.manifest, self.settings.max_batch_size, gpu=self.settings.device.startswith("cuda"))

    def model_statistics(self, name: str = "", version: str = "") -> ModelStatisticsList:
        """The statistics of the model (name "": the one served) per version: the served one and every other
        that has statistics in this process (version "": all of them, oldest first)."""
        if name not in ("", self.manifest.name):
            raise self._unknown_model(name)
        known = sorted({self.model_version, *self.statistics.versions()})
        if version and version not in map(str, known):
            raise NotFound(f"model '{self.manifest.name}' version '{version}' has no statistics; the versions with "
                           f"statistics are {', '.join(map(str, known))} (leave the version empty for all)")
        wanted = [int(version)] if version else known
        return ModelStatisticsList(tuple(self.statistics.model_statistics(self.manifest.name, v) for v in wanted))

    def repository_index(self, repository_name: str = "", ready: bool = False) -> RepositoryIndex:
        """The model's versions with Triton's states: READY for the one served (until shutdown begins),
        UNAVAILABLE ("unloaded") for the others; `ready` keeps only the READY ones."""
        if repository_name:
            raise Unimplemented(f"repository_name '{repository_name}': naming a repository is not supported by "
                                "vitserve (it has one, the model's data directory): leave it empty")
        served, name = self.model_version, self.manifest.name
        models = []
        for v in self.model_versions():
            if v.version != served:
                models.append(ModelIndex(name, str(v.version), UNAVAILABLE, UNLOADED))
            elif self.ready:
                models.append(ModelIndex(name, str(v.version), READY, ""))
            else:
                models.append(ModelIndex(name, str(v.version), UNAVAILABLE, "the server is shutting down"))
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
                self.training.restore_checkpoint(self.checkpoints.path(previous) if previous else
                                                 self.manifest.path(CHECKPOINT))
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
        """Refuse new train steps, let running ones finish, stop the batcher and the timer, and write a final
        checkpoint if the training state changed since the last one (so it holds every applied step)."""
        with self._train_gate:
            self._closing = True
            self._train_gate.wait_for(lambda: self._train_calls == 0)
        if self.batcher:
            self.batcher.close()
            self.batcher = None
        self._stop.set()
        if self._autosave:
            self._autosave.join()
        try:
            return self.save_checkpoint("", reason="shutdown") if self._dirty else None
        finally:
            self.metrics.close()
            if self.board:
                self.board.close()

    # -- publishing -----------------------------------------------------------------------------------

    @trainer_only
    def publish(self) -> ModelVersion:
        """Export the current training weights as the next model version and switch Predict to it."""
        m = self.manifest

        def write(path) -> int:
            step = self.training.export_inference_model(path, m.output_name)
            optimize_inference_model(path, [q.heads for q in m.qkv], m.input_name, m.input_shape)
            return step

        with self._publish_lock:
            with write_errors("the next model version", self.versions.root):  # only the write is a write failure
                version = self.versions.publish(write)
            self._serving = (version.version, self._inference_engine(version.version))
        release_freed_memory()  # the dropped sessions' arenas, which glibc would otherwise keep
        log.info("published model version %d (step %d)", version.version, version.step)
        return version

    def model_versions(self) -> list[ModelVersion]:
        published = self.versions.versions() if self.versions else []
        return [ModelVersion(0, 0, self.manifest.path(INFERENCE_MODEL).stat().st_mtime), *published]

    # -- explaining ----------------------------------------------------------------------------------

    @trainer_only
    def explain(self, parameter: str = "") -> Explanation:
        if self._explainer is None:
            self._explainer = GradientExplainer(self.manifest.path(TRAINING_MODEL), self.manifest)
        return self._explainer.explain(parameter)

    @property
    def step(self) -> int:
        """Optimizer steps applied so far (0 on an inference-only replica)."""
        return self.training.step if self.training else 0

    def model_info(self) -> ModelInfo:
        m, s = self.manifest, self.settings
        return ModelInfo(
            name=m.name, config_json=json.dumps(m.source), input_name=m.input_name, input_shape=m.input_shape,
            input_dtype="FLOAT32", preprocessing=m.preprocessing, class_names=m.class_names, parameters=m.parameters,
            execution_providers=self.inference.providers, device=s.device, opset=m.opset,
            optimizer=m.optimizer["name"], step=self.step,
            learning_rate=self.training.learning_rate if self.training else 0.0,
            max_batch_size=s.max_batch_size, export_versions=m.versions, loss_node=m.loss.name,
            loss_op_type=m.loss.op_type, model_version=self.model_version, versions=self.model_versions(),
            checkpoint_every_steps=s.checkpoint_every_steps, checkpoint_every_seconds=s.checkpoint_every_seconds,
            publish_every_steps=s.publish_every_steps, attention=m.attention, unplaced=m.unplaced, role=s.role,
        )
