"""The trainer: the training queue, the step and what follows it, checkpoints and publishing, over one model.

It exists on the training roles (`all`, `train`) only. Every RPC that reads or changes the training state
is one method here, called by the servicer after the request is decoded by `batches` (the training-batch
validator). The step itself, for either trainer, is engine/train/step.py's TrainingEngine (or its isolated
or data-parallel wrapper); around it this class keeps:

* the queue: one step runs, at most --max-queued-train-steps wait, the rest are RESOURCE_EXHAUSTED;
* after an applied step: metrics, the gradient history, TensorBoard, the automatic checkpoint and publish;
* checkpoints (server/persistence.py: the store, resuming, the autosave timer, write failures as statuses);
* publishing: the next model version in the data directory, served at once by the registry and handed
  over to a fleet's model repository.
"""
from __future__ import annotations

import collections
import dataclasses
import fnmatch
import logging
import threading
from pathlib import Path

import numpy as np

from engine.errors import InvalidArgument, ResourceExhausted, Unavailable
from engine.graph.explain import GradientExplainer
from engine.graph.fusion import optimize_inference_model
from engine.graph.attribution import AttributionEngine
from engine.graph.graph_explain import GradientGraphExplainer
from engine.train.isolation import IsolatedTrainingEngine
from engine.manifest import GRADIENT_MODEL, TRAINING_MODEL, Manifest
from engine.store.repository import RepositoryWriter
from engine.runtime import release_freed_memory
from engine.store.files import VersionStore
from proto.records.explain import AttributeResult, Explanation
from proto.records.model import ModelVersion
from proto.records.training import (CheckpointInfo, CheckpointList, EvalResult, GradientHistory, HeadImportanceResult,
                                    LinearSchedule, OptimizerState, StepResult)
from server.config import Settings
from server.decode import TrainingBatchValidator
from server.metrics import Metrics
from server.persistence import Checkpoints, write_errors
from server.registry import ModelRegistry

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, settings: Settings, manifest: Manifest, metrics: Metrics, registry: ModelRegistry):
        self.settings, self.manifest = settings, manifest
        self._metrics, self._registry = metrics, registry
        folder = settings.data_dir / manifest.name
        self.checkpoints = Checkpoints(settings, manifest, folder)  # checks every folder it writes, up front
        self.versions = VersionStore(folder / "models", quarantine=folder / "quarantine" / "models")
        self.repository = (RepositoryWriter(Path(settings.model_repository), manifest,
                                             registry.artifacts_config(manifest))
                           if settings.model_repository else None)
        self.engine = self.checkpoints.open_engine()  # the newest intact checkpoint, else the export's weights
        self.batches = TrainingBatchValidator(manifest.input_shape, manifest.num_classes, settings.max_batch_size,
                                              manifest.preprocessing)
        self._history = collections.deque(maxlen=settings.gradient_history) if settings.gradient_history else None
        self.board = None
        if settings.tensorboard_dir:
            from server.tensorboard import GradientBoard  # tensorboardX loads only when asked for

            self.board = GradientBoard(Path(settings.tensorboard_dir), settings.tensorboard_histogram_every)
        self._publish_lock = threading.Lock()
        self._gate = threading.Condition()
        self._calls = 0  # TrainSteps running or waiting
        self._closing = False
        self._explainer = None  # built on first use: reading the training graph costs a moment
        self._attribution: AttributionEngine | None = None  # opened on the first Attribute of the training weights

    def start(self) -> None:
        """Once the registry serves the model: the autosave timer, and the hand-over to the model repository."""
        self.checkpoints.start_autosave(self.engine)
        if self.repository is not None:
            self._hand_over()

    @property
    def queued(self) -> int:
        """TrainSteps running or waiting."""
        return self._calls

    @property
    def step(self) -> int:
        return self.engine.step

    # -- the step ---------------------------------------------------------------------------------------

    def train_step(self, images: np.ndarray, labels: np.ndarray, summaries: bool = True,
                   accumulate_only: bool = False, deadline: float | None = None,
                   head_importance: bool = False) -> StepResult:
        """One train step (serialized); at most `max_queued_train_steps` may wait behind the running one.

        An applied step goes into the gradient history and, with --tensorboard-dir, the event files."""
        limit = self.settings.max_queued_train_steps
        with self._gate:
            if self._closing:
                raise Unavailable("the server is shutting down; no more train steps")
            if self._calls > limit:  # one running + `limit` waiting
                raise ResourceExhausted(f"training queue is full: {self._calls - 1} train steps are waiting "
                                        f"(max_queued_train_steps={limit}); retry later")
            self._calls += 1
        try:
            result = self.engine.train_step(images, labels, summaries=summaries, accumulate_only=accumulate_only,
                                            deadline=deadline, head_importance=head_importance,
                                            on_gradients=self.board.histograms if self.board else None)
        finally:
            with self._gate:
                self._calls -= 1
                self._gate.notify_all()
        self._metrics.observe_step(result.loss, result.grad_norm, result.applied,
                                   accumulated=not result.applied and not result.skipped_reason)
        if result.applied:
            self.checkpoints.changed()
            s = self.settings
            if s.checkpoint_every_steps and result.step % s.checkpoint_every_steps == 0:
                self.checkpoints.after_step(self.engine, result.step)  # rolls back and raises when not durable
            if self._history is not None:
                self._history.append(result)
            if self.board:
                self.board.record(result)
            if s.publish_every_steps and result.step % s.publish_every_steps == 0:
                self.publish()
        return result

    def eval_step(self, images: np.ndarray, labels: np.ndarray) -> EvalResult:
        return self.engine.eval_step(images, labels)

    def head_importance(self, images: np.ndarray, labels: np.ndarray) -> HeadImportanceResult:
        return self.engine.head_importance(images, labels)

    def gradient_history(self, first_step: int = 0, last_step: int = 0, parameter: str = "") -> GradientHistory:
        """The kept applied steps with first_step <= step <= last_step (0: open), oldest first; with `parameter`
        (a shell-style pattern) only the matching parameters' summaries and attention modules."""
        if first_step < 0 or last_step < 0 or (last_step and first_step > last_step):
            raise InvalidArgument(f"step range [{first_step}, {last_step}] is not valid: give 0 <= first_step <= "
                                  "last_step (0 leaves a side open)")
        kept = [r for r in (self._history or ()) if r.step >= first_step and (not last_step or r.step <= last_step)]
        if parameter:
            def wanted(name: str) -> bool:
                return fnmatch.fnmatchcase(name, parameter)

            kept = [dataclasses.replace(r, gradients=[g for g in r.gradients if wanted(g.name)],
                                        attention=[a for a in r.attention if any(map(wanted, {*a.weights, *a.biases}))])
                    for r in kept]
        return GradientHistory(kept, self.settings.gradient_history)

    def optimizer(self) -> OptimizerState:
        return self.engine.optimizer_state()

    def set_optimizer(self, learning_rate: float | None, schedule: LinearSchedule | None,
                      clip_grad_norm: float | None) -> OptimizerState:
        state = self.engine.set_optimizer(learning_rate, schedule, clip_grad_norm)
        self.checkpoints.changed()
        return state

    def explain(self, parameter: str = "") -> Explanation:
        if self._explainer is None:  # the graph the trainer runs
            self._explainer = (GradientGraphExplainer(self.manifest.path(GRADIENT_MODEL), self.manifest)
                               if self.engine.trainer == "ort"
                               else GradientExplainer(self.manifest.path(TRAINING_MODEL), self.manifest))
        return self._explainer.explain(parameter)

    def attribute(self, images: np.ndarray, targets: list[int] | None, method: str, heads: bool) -> AttributeResult:
        """Attribution maps of the current training weights (the attribution graph takes them as inputs)."""
        if self._attribution is None:
            self._attribution = AttributionEngine(self.manifest, self.settings.device)
        with self.engine.lock:  # the weights and their step, together
            weights, step = self.engine.parameters(), self.engine.step
        record = self._attribution.record
        return AttributeResult(self._attribution.attribute(images, targets, method, heads, weights), method, 0, step,
                               tuple(record.grid), tuple(record.patch))

    # -- checkpoints ------------------------------------------------------------------------------------

    def save_checkpoint(self, name: str = "") -> CheckpointInfo:
        return self.checkpoints.save(self.engine, name)

    def list_checkpoints(self) -> CheckpointList:
        return self.checkpoints.list()

    def restore_checkpoint(self, name: str) -> CheckpointInfo:
        return self.checkpoints.restore(self.engine, name)

    # -- publishing -------------------------------------------------------------------------------------

    def publish(self) -> ModelVersion:
        """Export the current training weights as the next model version and switch Predict to it; with a model
        repository the version is handed over there too (<repo>/<model>/<version>/), after the data directory."""
        m = self.manifest

        def write(path) -> int:
            step = self.engine.export_inference_model(path, m.output_name)
            optimize_inference_model(path, [q.heads for q in m.qkv], m.input_name, m.input_shape)
            return step

        with self._publish_lock:
            floor = max(self.repository.versions(), default=0) if self.repository else 0
            with write_errors("the next model version", self.versions.root):  # only the write is a write failure
                version = self.versions.publish(write, after=floor)
            self._registry.serve_published(version)
            if self.repository is not None:
                self._hand_over_version(version)
        release_freed_memory()  # the dropped sessions' arenas, which glibc would otherwise keep
        log.info("published model version %d (step %d)", version.version, version.step)
        return version

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

    # -- shutdown ---------------------------------------------------------------------------------------

    def stop_taking_steps(self) -> None:
        """Refuse new train steps (UNAVAILABLE) and wait for the running and queued ones to finish."""
        with self._gate:
            self._closing = True
            self._gate.wait_for(lambda: self._calls == 0)

    def close(self) -> CheckpointInfo | None:
        """After stop_taking_steps: stop the timer and write a final checkpoint if the training state changed since
        the last one (so it holds every applied step)."""
        self.stop_taking_steps()
        try:
            return self.checkpoints.close(self.engine)
        finally:
            if isinstance(self.engine, IsolatedTrainingEngine):  # its child process
                self.engine.close()
            if self.board:
                self.board.close()
