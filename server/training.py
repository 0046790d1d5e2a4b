"""Training engine: ONNX Runtime's on-device training (Module + Optimizer over the exported artifacts).

Uses the pybind classes of onnxruntime.capi directly: the `onnxruntime.training.api`
wrappers import torch, and the serving path must not. numpy in, numpy out; one
step at a time (a lock serializes callers).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import _pybind_state as C
from onnxruntime.capi.onnxruntime_inference_collection import get_ort_device_type

from server import gradients
from server.manifest import CHECKPOINT, EVAL_MODEL, OPTIMIZER_MODEL, TRAINING_MODEL, Manifest
from server.runtime import parse_device


@dataclass(frozen=True)
class StepResult:
    loss: float
    step: int
    learning_rate: float
    grad_norm: float
    gradients: list[gradients.GradientSummary]
    attention: list[gradients.QkvGradient]
    step_seconds: float


class TrainingEngine:
    def __init__(self, manifest: Manifest, device: str, options: ort.SessionOptions, learning_rate: float):
        kind, index = parse_device(device)
        ort_device = C.OrtDevice(get_ort_device_type(kind, index), C.OrtDevice.default_memory(), index)
        self._state = C.load_checkpoint(str(manifest.path(CHECKPOINT)))
        self._module = C.Module(str(manifest.path(TRAINING_MODEL)), self._state, str(manifest.path(EVAL_MODEL)),
                                ort_device, options)
        self._optimizer = C.Optimizer(str(manifest.path(OPTIMIZER_MODEL)), self._state, ort_device, options)
        self._optimizer.set_learning_rate(learning_rate)
        self._trainable = manifest.trainable
        self._qkv = [q for q in manifest.qkv if q.name in set(self._trainable)]
        self._lock = threading.Lock()
        self._step = 0

    @property
    def step(self) -> int:
        return self._step

    @property
    def learning_rate(self) -> float:
        return float(self._optimizer.get_learning_rate())

    def parameter(self, name: str) -> np.ndarray:
        """A copy of one parameter's current value."""
        return self._state.get_parameter(name).data.numpy().copy()

    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of every parameter (trainable and frozen)."""
        return {n: self.parameter(n) for n in self._state.parameter_names()}

    def _forward_backward(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        self._module.lazy_reset_grad()  # gradients of this batch only
        fetches = C.OrtValueVector()
        self._module.train_step([images, labels], fetches)
        loss = float(fetches[0].numpy())  # copy now: the fetched value is freed with `fetches`
        return loss, {n: self._state.get_parameter(n).grad.numpy() for n in self._trainable}

    def gradients(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and every trainable parameter's gradient for a batch, without updating the weights."""
        with self._lock:
            return self._forward_backward(images, labels)

    def train_step(self, images: np.ndarray, labels: np.ndarray, summaries: bool = True) -> StepResult:
        """One forward/backward/update on a validated batch. images float32 (b,c,h,w), labels int64 (b,)."""
        with self._lock:
            start = time.perf_counter()
            before = {n: self.parameter(n) for n in self._trainable}
            lr = self.learning_rate
            loss, grads = self._forward_backward(images, labels)
            self._optimizer.optimizer_step()
            self._step += 1
            summaries_out, attention = [], []
            if summaries:
                for n in self._trainable:
                    summaries_out.append(gradients.summarize(n, grads[n], before[n], self.parameter(n)))
                attention = [gradients.qkv_breakdown(q, grads[q.name]) for q in self._qkv]
            return StepResult(
                loss=loss, step=self._step, learning_rate=lr, grad_norm=gradients.global_norm(grads),
                gradients=summaries_out, attention=attention, step_seconds=time.perf_counter() - start,
            )
