"""The `ort-training` trainer: ONNX Runtime's on-device training build (Module + Optimizer over the artifacts).

onnxruntime-training 1.19.2 is the last release of ORT's training packages (Python <= 3.12, CUDA 11.8);
the `ort` trainer (engine/train/graph_backend.py) runs on the maintained runtime instead. Uses the pybind classes
of onnxruntime.capi directly: the `onnxruntime.training.api` wrappers import torch, and the serving path
must not. A TrainingBackend (engine/train/step.py): numpy in, numpy out, no step logic of its own.

Checkpoints are ORT's own format, with the engine's state (step, learning-rate policy) as a property.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import _pybind_state as C
from onnxruntime.capi.onnxruntime_inference_collection import get_ort_device_type

from engine.graph import heads
from engine.train import gradients
from engine.errors import ConfigError, FailedPrecondition
from engine.graph.explain import GradientExplainer
from engine.manifest import CHECKPOINT, EVAL_MODEL, OPTIMIZER_MODEL, TRAINING_MODEL, Manifest
from engine.runtime import parse_device

HEADS_MODEL = "heads_training_model.onnx"  # the training graph plus each head's output and its gradient
STATE_PROPERTY = "vitserve_state"  # JSON: step counter and learning-rate policy, saved inside the checkpoint


def require_training_build() -> None:
    """ConfigError unless this ONNX Runtime is a training build (onnxruntime-training-cpu or onnxruntime-training).

    Plain `onnxruntime` imports this module fine but has no Module, Optimizer or checkpoint classes:
    without this check the first of them fails deep inside the engine with an AttributeError."""
    if not all(hasattr(C, name) for name in ("Module", "Optimizer", "load_checkpoint")):
        raise ConfigError(
            f"--trainer ort-training needs ONNX Runtime's deprecated training build (onnxruntime-training-cpu==1.19.2, "
            f"Python <= 3.12: pip install .[ort-training]), but this environment has onnxruntime {ort.__version__}: "
            f"use --trainer ort, which trains on it")


class OrtTrainingBackend:
    name = "ort-training"

    def __init__(self, manifest: Manifest, device: str, options: ort.SessionOptions, flat: gradients.FlatLayout):
        require_training_build()
        kind, index = parse_device(device)
        if kind == "openvino":
            raise ConfigError("the ort-training trainer runs on 'cpu' or 'cuda' only: OpenVINO's execution provider "
                              "runs the gradient graph (--trainer ort)")
        self._device = C.OrtDevice(get_ort_device_type(kind, index), C.OrtDevice.default_memory(), index)
        self._cpu = kind == "cpu"
        self._options = options
        self._manifest = manifest
        self._flat = flat
        self._names = [p.name for p in flat.params]
        self._size = int(flat.sizes.sum())
        self._head_outputs = None  # where each attention module's head outputs are (engine/graph/heads.py), on first use
        self._heads_folder = None  # holds the head-importance graph once written
        self._snapshots = None

    # -- state ------------------------------------------------------------------------------------------

    def load(self, checkpoint: Path | None) -> str | None:
        """(Re)build state, module and optimizer from a checkpoint (None: the export's); the saved engine state."""
        m = self._manifest
        state = C.load_checkpoint(str(checkpoint or m.path(CHECKPOINT)))
        module = C.Module(str(m.path(TRAINING_MODEL)), state, str(m.path(EVAL_MODEL)), self._device, self._options)
        optimizer = C.Optimizer(str(m.path(OPTIMIZER_MODEL)), state, self._device, self._options)
        self._state, self._module, self._optimizer = state, module, optimizer
        self._bound_heads = False  # `module` is the plain training graph (see _bind)
        if self._cpu and self._snapshots is None:
            self._snapshots = self._contiguous_snapshots()
        return state.get_property(STATE_PROPERTY) if state.has_property(STATE_PROPERTY) else None

    def save(self, path: Path, engine_state: str) -> None:
        self._state.add_property(STATE_PROPERTY, engine_state)
        C.save_checkpoint(self._state, str(path), True)

    def _contiguous_snapshots(self):
        """Two float32 buffers ORT fills with all trainable weights in one copy each (before/after a step).

        ORT lays them out in model order; that is checked once here, and without it the backend
        falls back to copying parameter by parameter.
        """
        device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
        buffers = [np.empty(self._size, np.float32) for _ in range(2)]
        if self._module.get_parameters_size(True) != self._size:
            return None
        snapshots = [(b, C.OrtValue.ortvalue_from_numpy(b, device)) for b in buffers]
        self._module.copy_parameters_to_buffer(snapshots[0][1], True)
        for name, (a, b) in zip(self._names, self._flat.spans):
            if not np.array_equal(buffers[0][a:b], self.parameter(name).reshape(-1)):
                return None
        return snapshots

    def snapshot(self, slot: int) -> np.ndarray:
        """All trainable weights, flat in model order (valid until the next snapshot into the same slot)."""
        if self._snapshots:
            buffer, value = self._snapshots[slot]
            self._module.copy_parameters_to_buffer(value, True)
            return buffer
        return np.concatenate([self.parameter(n).reshape(-1) for n in self._names])

    def parameter(self, name: str) -> np.ndarray:
        return self._state.get_parameter(name).data.numpy().copy()

    def parameter_names(self) -> list[str]:
        return list(self._state.parameter_names())

    # -- steps ------------------------------------------------------------------------------------------

    def forward_backward(self, images: np.ndarray, labels: np.ndarray, head_importance: bool
                         ) -> tuple[float, np.ndarray, tuple[np.ndarray, ...]]:
        """This batch's loss, gradient (flat, a new array) and, when asked for, each attention module's head sums.

        With head importance the step runs on the twin graph that also outputs each head's output and its
        gradient (engine/graph/heads.py): same parameters, same state, same loss and gradients."""
        module = self._bind(head_importance)
        module.lazy_reset_grad()  # this batch alone: the engine keeps an accumulated sum itself
        fetches = C.OrtValueVector()
        module.train_step([images, labels], fetches)
        loss = float(fetches[0].numpy())  # copy now: the fetched value is freed with `fetches`
        sums = ()
        if head_importance:  # fetches: loss, logits, then (output, gradient) per attention module
            sums = tuple(heads.head_sums(o, fetches[2 + 2 * i].numpy(), fetches[3 + 2 * i].numpy(), len(labels))
                         for i, o in enumerate(self._head_outputs))
        grads = np.empty(self._size, np.float32)
        for name, (a, b) in zip(self._names, self._flat.spans):
            grads[a:b] = self._state.get_parameter(name).grad.numpy().reshape(-1)
        return loss, grads, sums

    def update(self, grads: np.ndarray, lr: float, fresh: bool) -> None:
        """One optimizer step with `grads`; `fresh`: they are the last forward_backward's, unchanged, which ORT's
        gradient buffers (what its optimizer reads) already hold. Otherwise they are written there first."""
        if not fresh:
            for name, (a, b), p in zip(self._names, self._flat.spans, self._flat.params):
                self._state.get_parameter(name).grad.update_inplace(grads[a:b].reshape(p.shape))
        self._optimizer.set_learning_rate(lr)
        self._optimizer.optimizer_step()

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss and logits of the eval graph (dropout off)."""
        fetches = C.OrtValueVector()
        self._module.eval_step([images, labels], fetches)
        return float(fetches[0].numpy()), fetches[1].numpy()

    def head_outputs(self) -> list[heads.HeadOutput]:
        if self._head_outputs is None:
            m = self._manifest
            if not m.qkv:
                raise FailedPrecondition("this model has no attention modules: there is no head importance")
            self._head_outputs = GradientExplainer(m.path(TRAINING_MODEL), m).head_outputs(m)
        return self._head_outputs

    def _bind(self, head_importance: bool) -> C.Module:
        """The training module for this step: the plain graph, or its head-importance twin (engine/graph/heads.py).

        A Module binds the state's gradient buffers when it is built (a second one on the same state takes
        them over), so the backend holds one at a time and rebuilds it, and the optimizer, when head
        importance is first asked for: it costs nothing until then. A plain step keeps the twin (same loss
        and gradients)."""
        if not head_importance or self._bound_heads:
            return self._module
        m = self._manifest
        self._module = C.Module(str(self._heads_graph()), self._state, str(m.path(EVAL_MODEL)), self._device,
                                self._options)
        self._optimizer = C.Optimizer(str(m.path(OPTIMIZER_MODEL)), self._state, self._device, self._options)
        self._bound_heads = True
        return self._module

    def _heads_graph(self) -> Path:
        """The head-importance training graph, written once into a folder that lives as long as the backend."""
        m = self._manifest
        if self._heads_folder is None:
            outputs = self.head_outputs()
            self._heads_folder = tempfile.TemporaryDirectory(prefix="vitserve-heads-")
            heads.write_importance_graph(m.path(TRAINING_MODEL), outputs, Path(self._heads_folder.name) / HEADS_MODEL)
        return Path(self._heads_folder.name) / HEADS_MODEL

    def export_inference_model(self, path: Path, output_name: str) -> None:
        self._module.export_model_for_inferencing(str(path), [output_name])
