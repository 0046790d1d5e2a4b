"""The data plane: what the front doors (gRPC, KServe v2, HTTP) call, with no gRPC in sight.

It holds the two halves of the server, chosen by the role at startup:

* `registry` (server/registry.py): the models served for inference, by name, and the v2 views of them;
  every role has one.
* the trainer (server/trainer.py): the training queue, the step, checkpoints and publishing; only the
  training roles (`all`, `train`) have one. `trainer(what)` is the one place a training call is refused
  on an inference-only replica.

GetModelInfo, which describes both, and the shutdown order are here too. A rejected request raises before
it touches any state, so weights and the step counter stay exactly as they were.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from engine.errors import ConfigError, FailedPrecondition
from engine.manifest import INFERENCE_MODEL, TRAINER_FILES, Manifest
from engine.runtime import VERSION as ORT_VERSION
from engine.runtime import quiet_default_logger
from engine.store.files import VersionStore
from proto import vitserve_pb2 as pb
from proto.records.explain import AttributeResult
from proto.records.model import ModelInfo
from proto.records.training import CheckpointInfo
from server.config import Settings
from server.metrics import Metrics
from server.registry import ModelRegistry
from server.trainer import Trainer

log = logging.getLogger(__name__)


class DataPlane:
    def __init__(self, settings: Settings):
        self.settings = settings
        quiet_default_logger()
        self.metrics = Metrics()
        self.registry = ModelRegistry(settings, self.metrics)
        self._trainer: Trainer | None = None
        if settings.role == "predict" and settings.model_repository:
            self.registry.follow_repository(Path(settings.model_repository))
        else:
            self._open_artifacts(settings)
        self.metrics.watch(batcher_queue=self.registry.queued, model_version=lambda: self.registry.model_version,
                           train_queue=lambda: self._trainer.queued if self._trainer else 0,
                           step=lambda: self._trainer.step if self._trainer else 0,
                           learning_rate=lambda: self._trainer.engine.learning_rate if self._trainer else 0.0)
        if self._trainer is not None:
            self._trainer.start()

    def _open_artifacts(self, settings: Settings) -> None:
        """The model of --artifacts: trained here (role all/train), or only served (role predict)."""
        predict_only = settings.role == "predict"
        manifest = Manifest.load(settings.artifacts, (INFERENCE_MODEL, *(() if predict_only else
                                                                         TRAINER_FILES[settings.trainer])))
        try:
            if predict_only:  # writes nothing: serves the newest version a trainer published there, if any
                folder = settings.data_dir / manifest.name / "models"
                versions = VersionStore(folder) if folder.is_dir() else None
                newest = versions.versions()[-1] if versions and versions.versions() else None
            else:
                self._trainer = Trainer(settings, manifest, self.metrics, self.registry)
                versions = self._trainer.versions
                newest = versions.newest_intact()
            self.registry.serve_artifacts(manifest, versions, newest)
        except RuntimeError as e:  # e.g. a CUDA build of ORT on a machine without the CUDA libraries or a GPU
            raise ConfigError(f"cannot open the model on {settings.device}: {str(e).strip().splitlines()[0]}") from None
        model = self.registry.model()
        log.info("loaded %s from %s on %s (%s), model version %d; %s on onnxruntime %s", manifest.name,
                 settings.artifacts, settings.device, ", ".join(model.latest.engine.providers), model.latest.version,
                 f"trainer {self._trainer.engine.trainer} on {settings.trainer_device}" if self._trainer
                 else "no trainer", ORT_VERSION)

    def trainer(self, what: str) -> Trainer:
        """The trainer, for the call named `what`; FAILED_PRECONDITION on an inference-only replica."""
        if self._trainer is None:
            raise FailedPrecondition(f"{what} is not served by this replica (--role {self.settings.role}: inference "
                                     "only); send it to a trainer (--role train or all)")
        return self._trainer

    def attribute(self, model: str, images: pb.Images, targets: list[int] | None, method: str, heads: bool,
                  training_weights: bool) -> AttributeResult:
        """Attribution maps of a request's images: on the served version of `model` (predict replicas too), or with
        `training_weights` on the trainer's current weights. `method` "" is rollout; `targets` None the predicted
        classes."""
        method = method or "rollout"
        if training_weights:
            trainer = self.trainer("attribute with the training weights")
            return trainer.attribute(trainer.batches.images(images), targets, method, heads)
        return self.registry.attribute(model, lambda served: served.decoder.images(images), targets, method, heads)

    def model_info(self, name: str = "") -> ModelInfo:
        """The model `name` ("" for the only or the trainer's one): the export, the training state and the settings."""
        model, s, trainer = self.registry.model(name), self.settings, self._trainer
        m, own = model.manifest, self.registry.is_own(model)
        kind = trainer.engine.trainer if trainer else ""
        loss = m.gradient_loss if kind == "ort" and m.gradient_loss else m.loss  # the graph that trains
        return ModelInfo(
            name=model.name, config_json=json.dumps(m.source), input_name=m.input_name, input_shape=m.input_shape,
            input_dtype="FLOAT32", preprocessing=m.preprocessing, class_names=m.class_names, parameters=m.parameters,
            execution_providers=model.latest.engine.providers, device=s.device, opset=m.opset,
            optimizer=m.optimizer["name"], step=(trainer.step if trainer else 0) if own else model.latest.step,
            learning_rate=trainer.engine.learning_rate if trainer else 0.0,
            max_batch_size=s.max_batch_size, export_versions=m.versions, loss_node=loss.name,
            loss_op_type=loss.op_type, model_version=model.latest.version, versions=self.registry.model_versions(model),
            checkpoint_every_steps=s.checkpoint_every_steps, checkpoint_every_seconds=s.checkpoint_every_seconds,
            publish_every_steps=s.publish_every_steps, attention=m.attention, unplaced=m.unplaced, role=s.role,
            trainer=kind, onnxruntime_version=ORT_VERSION,
        )

    def close(self) -> CheckpointInfo | None:
        """Refuse new train steps and let running ones finish, stop the repository poll and the batchers, then
        write a final checkpoint if the training state changed since the last one (so it holds every applied step)."""
        try:
            if self._trainer is not None:
                self._trainer.stop_taking_steps()
            self.registry.close()
            return self._trainer.close() if self._trainer is not None else None
        finally:
            self.metrics.close()
