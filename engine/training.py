"""Training engine: ONNX Runtime's on-device training (Module + Optimizer over the exported artifacts).

Uses the pybind classes of onnxruntime.capi directly: the `onnxruntime.training.api`
wrappers import torch, and the serving path must not. numpy in, numpy out; one
call at a time (a lock serializes callers).

A step is: forward + backward (gradients add up while accumulating), a guard that
refuses to apply NaN/Inf, optional clipping by global norm, the learning rate of
the policy, one optimizer update. Checkpoints hold the weights, the optimizer
state and, as checkpoint properties, the step counter and the learning-rate policy.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import _pybind_state as C
from onnxruntime.capi.onnxruntime_inference_collection import get_ort_device_type

from engine import gradients, heads
from engine.errors import ConfigError, DeadlineExceeded, FailedPrecondition, InvalidArgument
from engine.explain import GradientExplainer
from engine.manifest import CHECKPOINT, EVAL_MODEL, OPTIMIZER_MODEL, TRAINING_MODEL, Manifest
from engine.runtime import parse_device, tune_process_for_training
from engine.schedule import LinearSchedule, LrPolicy, check_learning_rate

HEADS_MODEL = "heads_training_model.onnx"  # the training graph plus each head's output and its gradient
STATE_PROPERTY = "vitserve_state"  # JSON: step counter and learning-rate policy, saved inside the checkpoint


def require_training_build() -> None:
    """ConfigError unless this ONNX Runtime is a training build (onnxruntime-training-cpu or onnxruntime-training).

    Plain `onnxruntime` (the predict install, docs/deploy.md) imports this module fine but has no
    Module, Optimizer or checkpoint classes: without this check the first of them fails deep inside
    the engine with an AttributeError or a TypeError."""
    if not all(hasattr(C, name) for name in ("Module", "Optimizer", "load_checkpoint")):
        raise ConfigError(
            f"training needs ONNX Runtime's training build (onnxruntime-training-cpu==1.19.2, Python <= 3.12: "
            f"pip install .[serve]), but this environment has onnxruntime {ort.__version__}, which serves "
            f"inference only: start it with --role predict")


@dataclass(frozen=True)
class StepResult:
    loss: float
    step: int
    learning_rate: float
    grad_norm: float
    gradients: list[gradients.GradientSummary]
    attention: list[gradients.QkvGradient]
    step_seconds: float
    applied: bool
    skipped_reason: str
    accumulated_batches: int
    clip_coefficient: float
    head_importance: tuple[heads.HeadScores, ...] = ()  # when the step was asked for it


@dataclass(frozen=True)
class ShardGradients:
    """Forward + backward of one shard of a batch on its own (data-parallel training, engine/parallel.py)."""
    loss: float  # the shard's mean loss (0.0 for an empty shard)
    gradients: np.ndarray  # flat float32 in model order: the gradient of the shard's mean loss (zeros when empty)
    head_sums: tuple[np.ndarray, ...]  # with head importance: per attention module, heads.head_sums of the shard


@dataclass(frozen=True)
class HeadImportanceResult:
    """Head importance of one batch at the current weights (proto: HeadImportanceResponse)."""
    loss: float
    step: int
    heads: tuple[heads.HeadScores, ...]


@dataclass(frozen=True)
class EvalResult:
    loss: float
    correct: int
    count: int
    step: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.count


@dataclass(frozen=True)
class OptimizerState:
    optimizer: str
    learning_rate: float  # the next step's
    schedule: LinearSchedule | None
    schedule_position: int
    clip_grad_norm: float
    step: int
    accumulated_batches: int


class TrainingEngine:
    def __init__(self, manifest: Manifest, device: str, options: ort.SessionOptions, learning_rate: float,
                 checkpoint: Path | None = None):
        """`checkpoint`: resume from this checkpoint file instead of the export's initial one."""
        require_training_build()
        tune_process_for_training()
        kind, index = parse_device(device)
        self._device = C.OrtDevice(get_ort_device_type(kind, index), C.OrtDevice.default_memory(), index)
        self._options = options
        self._manifest = manifest
        self._trainable = manifest.trainable
        params = {p.name: p for p in manifest.parameters}
        self._placed = [params[n] for n in self._trainable]  # name, shape, block, sublayer
        self._shapes = [params[n].shape for n in self._trainable]
        self._flat = gradients.FlatLayout(self._placed)  # where each parameter lies in the flat vectors
        self._size = int(self._flat.sizes.sum())
        trainable = set(self._trainable)  # q/k/v of trainable weights; biases only when all three are trainable
        self._qkv = [q if set(q.biases) <= trainable else dataclasses.replace(q, biases=())
                     for q in manifest.qkv if set(q.weights) <= trainable]
        self._lock = threading.RLock()  # reentrant: `lock` lets callers hold it around several calls
        self._policy = LrPolicy(check_learning_rate(learning_rate))
        self._clip = 0.0
        self._step = 0
        self._accumulated = 0
        self._pending = None  # apply_gradients' accumulated sum (flat) while accumulating
        self._head_outputs = None  # where each attention module's head outputs are (engine/heads.py), on first use
        self._heads_folder = None  # holds the head-importance graph once written
        self._load(checkpoint or manifest.path(CHECKPOINT))
        self._snapshots = self._contiguous_snapshots() if kind == "cpu" else None

    def _load(self, checkpoint: Path) -> None:
        """(Re)build state, module and optimizer from a checkpoint file; restores step and policy if saved."""
        m = self._manifest
        state = C.load_checkpoint(str(checkpoint))
        module = C.Module(str(m.path(TRAINING_MODEL)), state, str(m.path(EVAL_MODEL)), self._device, self._options)
        optimizer = C.Optimizer(str(m.path(OPTIMIZER_MODEL)), state, self._device, self._options)
        self._state, self._module, self._optimizer = state, module, optimizer
        self._bound_heads = False  # `module` is the plain training graph (see _bind)
        if state.has_property(STATE_PROPERTY):
            saved = json.loads(state.get_property(STATE_PROPERTY))
            self._step, self._policy, self._clip = saved["step"], LrPolicy.from_dict(saved["policy"]), saved["clip"]
        else:  # the export's own checkpoint: no step taken yet (the learning-rate policy stays as set)
            self._step = 0
        self._accumulated = 0
        self._pending = None

    def _contiguous_snapshots(self):
        """Two float32 buffers ORT fills with all trainable weights in one copy each (before/after a step).

        ORT lays them out in model order; that is checked once here, and without it the engine
        falls back to copying parameter by parameter.
        """
        device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
        buffers = [np.empty(self._size, np.float32) for _ in range(2)]
        if self._module.get_parameters_size(True) != self._size:
            return None
        snapshots = [(b, C.OrtValue.ortvalue_from_numpy(b, device)) for b in buffers]
        self._module.copy_parameters_to_buffer(snapshots[0][1], True)
        for name, (a, b) in zip(self._trainable, self._flat.spans):
            if not np.array_equal(buffers[0][a:b], self.parameter(name).reshape(-1)):
                return None
        return snapshots

    def _snapshot(self, which: int) -> np.ndarray:
        """All trainable weights, flat in model order (valid until the next snapshot into the same slot)."""
        if self._snapshots:
            buffer, value = self._snapshots[which]
            self._module.copy_parameters_to_buffer(value, True)
            return buffer
        return np.concatenate([self.parameter(n).reshape(-1) for n in self._trainable])

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def gradient_size(self) -> int:
        """Trainable values: the length of the flat gradient and weight vectors."""
        return self._size

    @property
    def lock(self) -> threading.RLock:
        """Held by every call that reads or changes the training state; hold it to make several calls atomic."""
        return self._lock

    # -- reading state ----------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        return self._step

    @property
    def learning_rate(self) -> float:
        """The learning rate the next step will use."""
        return self._policy.lr(self._step + 1)

    def parameter(self, name: str) -> np.ndarray:
        """A copy of one parameter's current value."""
        return self._state.get_parameter(name).data.numpy().copy()

    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of every parameter (trainable and frozen)."""
        return {n: self.parameter(n) for n in self._state.parameter_names()}

    def weights_digest(self) -> bytes:
        """sha256 of every trainable weight, bit for bit (data-parallel ranks compare theirs)."""
        with self._lock:
            return hashlib.sha256(self._snapshot(0)).digest()

    def optimizer_state(self) -> OptimizerState:
        with self._lock:
            return self._settings()

    def _settings(self) -> OptimizerState:
        return OptimizerState(self._manifest.optimizer["name"], self.learning_rate, self._policy.schedule,
                                 self._policy.position(self._step), self._clip, self._step, self._accumulated)

    # -- changing the optimizer -------------------------------------------------------------------------

    def set_optimizer(self, learning_rate: float | None = None, schedule: LinearSchedule | None = None,
                      clip_grad_norm: float | None = None) -> OptimizerState:
        if learning_rate is not None and schedule is not None:
            raise InvalidArgument("give a constant learning_rate or a schedule, not both")
        if clip_grad_norm is not None and not (math.isfinite(clip_grad_norm) and clip_grad_norm >= 0):
            raise InvalidArgument(f"clip_grad_norm must be a finite number >= 0 (0 turns clipping off), got {clip_grad_norm}")
        with self._lock:
            if learning_rate is not None:
                self._policy = LrPolicy(check_learning_rate(learning_rate))
            if schedule is not None:
                self._policy = LrPolicy(self._policy.constant, schedule, start_step=self._step)
            if clip_grad_norm is not None:
                self._clip = clip_grad_norm
            return self._settings()

    # -- steps ------------------------------------------------------------------------------------------

    def _forward_backward(self, images: np.ndarray, labels: np.ndarray, head_importance: bool = False
                          ) -> tuple[float, np.ndarray, tuple[heads.HeadScores, ...]]:
        """Loss, the (accumulated) gradients flat in model order, and head importance when asked for.

        With head importance the step runs on the twin graph that also outputs each head's output and its
        gradient (engine/heads.py): same parameters, same state, same loss and gradients.
        """
        module = self._bind(head_importance)
        if self._accumulated == 0:
            module.lazy_reset_grad()  # a new sum starts with this batch
        loss, sums = self._run_train_step(module, images, labels, head_importance)
        self._accumulated += 1
        return loss, self._read_gradients(), self.head_scores(sums)

    def _run_train_step(self, module: C.Module, images: np.ndarray, labels: np.ndarray, head_importance: bool
                        ) -> tuple[float, tuple[np.ndarray, ...]]:
        """ORT's forward + backward: the loss, and with head importance each attention module's head sums."""
        fetches = C.OrtValueVector()
        module.train_step([images, labels], fetches)
        loss = float(fetches[0].numpy())  # copy now: the fetched value is freed with `fetches`
        sums = ()
        if head_importance:  # fetches: loss, logits, then (output, gradient) per attention module
            sums = tuple(heads.head_sums(o, fetches[2 + 2 * i].numpy(), fetches[3 + 2 * i].numpy(), len(labels))
                         for i, o in enumerate(self._head_outputs))
        return loss, sums

    def head_scores(self, sums: tuple[np.ndarray, ...]) -> tuple[heads.HeadScores, ...]:
        """Each attention module's head importance from its head sums (ShardGradients.head_sums, combined)."""
        return tuple(heads.scores(o, s) for o, s in zip(self._head_outputs or (), sums))

    def _read_gradients(self) -> np.ndarray:
        """A copy of ORT's gradient buffers, flat in model order."""
        grads = np.empty(self._size, np.float32)
        for name, (a, b) in zip(self._trainable, self._flat.spans):
            grads[a:b] = self._state.get_parameter(name).grad.numpy().reshape(-1)
        return grads

    def _write_gradients(self, grads: np.ndarray) -> None:
        """Write a flat gradient into ORT's gradient buffers, the ones the optimizer reads (see docs/design.md)."""
        for name, view in self._views(grads).items():
            self._state.get_parameter(name).grad.update_inplace(view)

    def _bind(self, head_importance: bool) -> C.Module:
        """The training module for this step: the plain graph, or its head-importance twin (engine/heads.py).

        A Module binds the state's gradient buffers when it is built (a second one on the same state takes
        them over), so the engine holds one at a time and rebuilds it, and the optimizer, when the kind
        asked for changes: head importance costs nothing until it is asked for. Accumulated gradients
        live in the bound module's buffers, so it is never switched while a sum is pending: a plain step
        keeps the twin (same loss and gradients), a head-importance step is refused.
        """
        if head_importance == self._bound_heads:
            return self._module
        if self._accumulated and not head_importance:
            return self._module
        if self._accumulated:
            raise FailedPrecondition(f"{self._accumulated} batches of gradients are being accumulated; apply them "
                                     "with a TrainStep before asking for head importance")
        m = self._manifest
        path = self._heads_graph() if head_importance else m.path(TRAINING_MODEL)
        self._module = C.Module(str(path), self._state, str(m.path(EVAL_MODEL)), self._device, self._options)
        self._optimizer = C.Optimizer(str(m.path(OPTIMIZER_MODEL)), self._state, self._device, self._options)
        self._bound_heads = head_importance
        return self._module

    def _heads_graph(self) -> Path:
        """The head-importance training graph, written once into a folder that lives as long as the engine."""
        m = self._manifest
        if self._heads_folder is None:
            if not m.qkv:
                raise FailedPrecondition("this model has no attention modules: there is no head importance")
            self._head_outputs = GradientExplainer(m.path(TRAINING_MODEL), m).head_outputs(m)
            self._heads_folder = tempfile.TemporaryDirectory(prefix="vitserve-heads-")
            heads.write_importance_graph(m.path(TRAINING_MODEL), self._head_outputs,
                                         Path(self._heads_folder.name) / HEADS_MODEL)
        return Path(self._heads_folder.name) / HEADS_MODEL

    def _views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """name -> that parameter's part of a flat vector, in its shape (views, no copies)."""
        return {n: flat[a:b].reshape(s) for n, (a, b), s in zip(self._trainable, self._flat.spans, self._shapes)}

    def gradients(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and every trainable parameter's gradient for one batch alone; nothing is updated or kept."""
        with self._lock:
            if self._accumulated:
                raise InvalidArgument("gradients are being accumulated; apply them with a TrainStep first")
            try:
                loss, grads, _ = self._forward_backward(images, labels)
                return loss, self._views(grads)
            finally:
                self._accumulated = 0

    def head_importance(self, images: np.ndarray, labels: np.ndarray) -> HeadImportanceResult:
        """Head importance of one batch at the current weights; nothing is updated or kept."""
        with self._lock:
            if self._accumulated:
                raise FailedPrecondition(f"{self._accumulated} batches of gradients are being accumulated; apply "
                                         "them with a TrainStep before asking for head importance")
            try:
                loss, _, scores = self._forward_backward(images, labels, head_importance=True)
                return HeadImportanceResult(loss, self._step, scores)
            finally:
                self._accumulated = 0

    def train_step(self, images: np.ndarray, labels: np.ndarray, summaries: bool = True,
                   accumulate_only: bool = False, deadline: float | None = None, head_importance: bool = False,
                   on_gradients: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> StepResult:
        """One forward/backward on a validated batch, then (unless accumulating) one guarded update.

        images float32 (b, c, h, w), labels int64 (b,). `deadline` (time.monotonic()): a step that
        is still waiting for the lock when it passes is not started at all. `on_gradients(step, grads)`
        gets every parameter's gradient of an applied step (views, valid during the call), e.g. for histograms.
        """
        with self._lock:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("the deadline passed while the step waited for the running one; "
                                       "it was not applied")
            start = time.perf_counter()
            loss, grads, scores = self._forward_backward(images, labels, head_importance)
            return self._finish(loss, grads, scores, start, summaries, accumulate_only, on_gradients)

    def shard_gradients(self, images: np.ndarray, labels: np.ndarray, head_importance: bool = False
                        ) -> ShardGradients:
        """Forward + backward of one shard alone (data-parallel training): its loss, gradient and head sums.

        Nothing is applied or counted: the ranks combine their shards' results and each hands the sum to
        apply_gradients. The module is bound as for a step (same rule on every rank, whatever its shard), so
        an empty shard (a batch smaller than the ranks) gives zeros without running ONNX Runtime.
        """
        with self._lock:
            module = self._bind(head_importance)
            if len(labels) == 0:
                sums = tuple(np.zeros(o.heads) for o in self._head_outputs) if head_importance else ()
                return ShardGradients(0.0, np.zeros(self._size, np.float32), sums)
            module.lazy_reset_grad()  # this shard alone: a pending sum is kept by apply_gradients, not by ORT
            loss, sums = self._run_train_step(module, images, labels, head_importance)
            return ShardGradients(loss, self._read_gradients(), sums)

    def apply_gradients(self, loss: float, grads: np.ndarray, head_sums: tuple[np.ndarray, ...] = (), *,
                        summaries: bool = True, accumulate_only: bool = False, start: float | None = None,
                        on_gradients: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> StepResult:
        """The rest of a train step for a batch whose loss and gradient were combined elsewhere (the ranks'
        shard_gradients, weighted by shard size): accumulation, the non-finite guard, clipping, the learning rate
        and one optimizer update, exactly as train_step does after its own forward + backward."""
        with self._lock:
            start = time.perf_counter() if start is None else start
            grads = grads if self._pending is None else self._pending + grads  # the sum ORT would have accumulated
            self._pending = None
            if not accumulate_only:
                self._write_gradients(grads)  # what the optimizer reads
            self._accumulated += 1
            result = self._finish(loss, grads, self.head_scores(head_sums), start, summaries, accumulate_only,
                                  on_gradients)
            if self._accumulated:  # still accumulating: the next batch adds to this sum
                self._pending = grads
            return result

    def _finish(self, loss: float, grads: np.ndarray, scores: tuple[heads.HeadScores, ...], start: float,
                summaries: bool, accumulate_only: bool,
                on_gradients: Callable[[int, dict[str, np.ndarray]], None] | None) -> StepResult:
        """A step after its forward + backward: ORT's gradient buffers hold `grads` (the accumulated sum)."""
        batches = self._accumulated
        squares = self._flat.squares(grads)  # per parameter, float64: the global norm and the summaries' norms
        norm = math.sqrt(float(squares.sum()))
        bad = self._nonfinite_reason(loss, grads, norm)
        if bad:  # like a gradient scaler: skip the update, drop the poisoned sum, keep the weights
            self._accumulated = 0
            return self._result(loss, grads, start, summaries, applied=False, skipped=bad, batches=batches,
                                norm=norm, squares=squares, scores=scores)
        if accumulate_only:
            return self._result(loss, grads, start, summaries, applied=False, batches=batches, norm=norm,
                                squares=squares, scores=scores)
        coefficient = 1.0
        if self._clip and norm > self._clip:  # torch.nn.utils.clip_grad_norm_'s rule
            coefficient = self._clip / (norm + 1e-6)
            grads *= np.float32(coefficient)
            self._write_gradients(grads)
            squares = self._flat.squares(grads)  # the summaries describe the gradient that was applied
        before = self._snapshot(0) if summaries else None
        lr = self.learning_rate
        self._optimizer.set_learning_rate(lr)
        self._optimizer.optimizer_step()
        self._step += 1
        self._accumulated = 0
        if on_gradients is not None:
            on_gradients(self._step, self._views(grads))
        return self._result(loss, grads, start, summaries, applied=True, before=before, batches=batches, lr=lr,
                            norm=norm, squares=squares, coefficient=coefficient, scores=scores)

    def _result(self, loss, grads, start, summaries, *, applied: bool, batches: int, before=None, skipped: str = "",
                norm: float, lr: float | None = None, squares: np.ndarray | None = None,
                coefficient: float = 1.0, scores: tuple[heads.HeadScores, ...] = ()) -> StepResult:
        """The step's answer; `before` holds the flat weights before an applied update (for update ratios),
        `squares` each parameter's sum of squared gradients (FlatLayout.squares), `norm` the global norm."""
        summaries_out, attention = [], []
        if summaries:
            after = self._snapshot(1)
            summaries_out = gradients.summarize_all(self._flat, grads, before if applied else after, after,
                                                    grad_squares=squares)
            views = self._views(grads)
            attention = [gradients.qkv_breakdown(q, views) for q in self._qkv]
        return StepResult(
            loss=loss, step=self._step, learning_rate=lr if lr is not None else self.learning_rate,
            grad_norm=norm, gradients=summaries_out,
            attention=attention, step_seconds=time.perf_counter() - start, applied=applied, skipped_reason=skipped,
            accumulated_batches=batches, clip_coefficient=coefficient, head_importance=scores,
        )

    def _nonfinite_reason(self, loss: float, grads: np.ndarray, norm: float) -> str:
        """Why the step must not be applied, or "". `norm` (float64 over float32 squares, which cannot overflow)
        is finite exactly when every gradient is."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if math.isfinite(norm):
            return ""
        for name, g in self._views(grads).items():
            if not np.isfinite(g).all():
                return f"the gradient of {name} has {int(np.count_nonzero(~np.isfinite(g)))} NaN/Inf values"
        return ""

    def eval_step(self, images: np.ndarray, labels: np.ndarray) -> EvalResult:
        """Loss and top-1 hits of the eval graph (dropout off). Touches no gradient, weight or counter."""
        with self._lock:
            fetches = C.OrtValueVector()
            self._module.eval_step([images, labels], fetches)
            loss = float(fetches[0].numpy())
            logits = fetches[1].numpy()
            return EvalResult(loss, int((logits.argmax(axis=-1) == labels).sum()), len(labels), self._step)

    # -- checkpoints and publishing -------------------------------------------------------------------

    def save_checkpoint(self, path: Path) -> int:
        """Write weights + optimizer state + step + policy to `path` (not atomic: the caller renames). Returns the step."""
        with self._lock:
            self._state.add_property(STATE_PROPERTY, json.dumps(
                {"step": self._step, "policy": self._policy.to_dict(), "clip": self._clip}))
            C.save_checkpoint(self._state, str(path), True)
            return self._step

    def restore_checkpoint(self, path: Path) -> int:
        """Replace the whole training state with a checkpoint's. Returns the restored step."""
        with self._lock:
            self._load(path)
            return self._step

    def export_inference_model(self, path: Path, output_name: str) -> int:
        """Write an inference model holding the current weights. Returns the step of those weights."""
        with self._lock:
            self._module.export_model_for_inferencing(str(path), [output_name])
            return self._step

