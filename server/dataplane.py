"""The data plane: everything the server does, with no gRPC in sight.

Holds the manifest and the two engines, validates batches against the model
(shape, dtype, finiteness, labels, batch limits) before anything runs, and
answers in plain Python/numpy. A rejected request raises before it touches any
state, so weights and the step counter stay exactly as they were.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from server import codec
from server.config import Settings
from server.errors import InvalidArgument
from server.inference import InferenceEngine, top_k
from server.manifest import INFERENCE_MODEL, Manifest
from server.runtime import providers_for, session_options
from server.training import StepResult, TrainingEngine

log = logging.getLogger(__name__)
DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class Prediction:
    indices: np.ndarray  # (b, k) class indices, best first
    probabilities: np.ndarray  # (b, k)
    labels: list[list[str]]  # (b, k) class names
    logits: np.ndarray | None  # (b, classes) when asked for


class DataPlane:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.manifest = Manifest.load(settings.artifacts)
        providers = providers_for(settings.device)
        options = session_options(settings.intra_op_threads)
        self.inference = InferenceEngine(self.manifest.path(INFERENCE_MODEL), self.manifest.input_name,
                                         self.manifest.output_name, providers, options)
        self.training = TrainingEngine(self.manifest, settings.device, options, settings.learning_rate)
        log.info("loaded %s from %s on %s (%s)", self.manifest.name, settings.artifacts, settings.device,
                 ", ".join(self.inference.providers))

    # -- inputs ---------------------------------------------------------------------------------------

    def images_from_tensor(self, dtype_name: str, shape, data: bytes) -> np.ndarray:
        """A raw FLOAT32 (b, c, h, w) tensor, checked against the model's input."""
        if dtype_name != "FLOAT32":
            raise InvalidArgument(f"images: dtype must be FLOAT32 (normalized pixels), got {dtype_name}")
        expected = self.manifest.input_shape[1:]
        if len(shape) != 4 or tuple(shape[1:]) != expected:
            raise InvalidArgument(f"images: shape must be [batch, {', '.join(map(str, expected))}], got {list(shape)}")
        images = codec.decode_tensor("images", dtype_name, shape, data)
        self._check_batch(len(images))
        if not np.isfinite(images).all():
            bad = int(np.count_nonzero(~np.isfinite(images)))
            raise InvalidArgument(f"images: {bad} pixel values are NaN or Inf")
        return images

    def images_from_files(self, encoded: list[bytes]) -> np.ndarray:
        self._check_batch(len(encoded))
        return codec.decode_images(encoded, self.manifest.preprocessing)

    def labels_from_tensor(self, dtype_name: str, shape, data: bytes, batch: int) -> np.ndarray:
        if dtype_name != "INT64":
            raise InvalidArgument(f"labels: dtype must be INT64, got {dtype_name}")
        labels = codec.decode_tensor("labels", dtype_name, shape, data)
        if labels.shape != (batch,):
            raise InvalidArgument(f"labels: shape must be [{batch}] (one per image), got {list(labels.shape)}")
        n = self.manifest.num_classes
        out_of_range = labels[(labels < 0) | (labels >= n)]
        if out_of_range.size:
            raise InvalidArgument(f"labels: must be in [0, {n}), got {int(out_of_range[0])}")
        return labels

    def _check_batch(self, size: int) -> None:
        if size == 0:
            raise InvalidArgument("images: the batch is empty")
        if size > self.settings.max_batch_size:
            raise InvalidArgument(f"images: batch of {size} is over the maximum of {self.settings.max_batch_size}")

    # -- operations -----------------------------------------------------------------------------------

    def predict(self, images: np.ndarray, k: int = 0, return_logits: bool = False) -> Prediction:
        k = min(k or DEFAULT_TOP_K, self.manifest.num_classes)
        logits = self.inference.logits(images)
        indices, probs = top_k(logits, k)
        names = self.manifest.class_names
        return Prediction(indices, probs, [[names[i] for i in row] for row in indices],
                          logits if return_logits else None)

    def train_step(self, images: np.ndarray, labels: np.ndarray, summaries: bool = True) -> StepResult:
        return self.training.train_step(images, labels, summaries=summaries)

    def model_info(self) -> dict:
        m = self.manifest
        return dict(
            name=m.name, config=m.raw["source"], input_name=m.input_name, input_shape=m.input_shape,
            preprocessing=m.preprocessing, class_names=m.class_names, parameters=m.parameters,
            execution_providers=self.inference.providers, device=self.settings.device, opset=m.raw["opset"],
            optimizer=m.raw["optimizer"]["name"], step=self.training.step,
            learning_rate=self.training.learning_rate, max_batch_size=self.settings.max_batch_size,
            export_versions=m.raw["versions"], loss_node=m.raw["loss"]["name"], loss_op_type=m.raw["loss"]["op_type"],
        )
