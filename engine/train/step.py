"""The training engine: one step function over either trainer (a TrainingBackend).

Two backends run forward + backward and the optimizer:
* `ort` (engine/train/graph_backend.py): PyTorch's autograd exported as plain ONNX ops, on any onnxruntime;
* `ort-training` (engine/train/ort_training.py): ONNX Runtime's deprecated training build and its artifacts.

Everything else is here, once, for both: gradient accumulation, a guard that refuses to apply NaN/Inf,
optional clipping by global norm, the learning rate of the policy, the update, the gradient summaries,
head importance, and the engine state a checkpoint keeps (step counter, learning-rate policy, clipping).
numpy in, numpy out; one call at a time (a lock serializes callers).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import onnxruntime as ort

from engine.graph import heads
from engine.train import gradients
from engine.errors import ConfigError, DeadlineExceeded, FailedPrecondition, InvalidArgument
from engine.manifest import Manifest
from engine.runtime import tune_process_for_training
from engine.train.schedule import LrPolicy, check_learning_rate, check_schedule
from proto.records.training import (EvalResult, HeadImportanceResult, HeadScores, LinearSchedule, OptimizerState,
                                    StepResult)

Trainer = Literal["ort", "ort-training"]
TRAINERS: tuple[str, ...] = ("ort", "ort-training")


class TrainingBackend(Protocol):
    """What a trainer does; the engine does the rest. Flat float32 vectors are in model order (FlatLayout)."""
    name: str  # "ort" or "ort-training"

    def load(self, checkpoint: Path | None) -> str | None:
        """Weights and optimizer state from a checkpoint (None: the export's); the engine state saved with it."""

    def save(self, path: Path, engine_state: str) -> None:
        """Weights, optimizer state and the engine's state to `path`."""

    def forward_backward(self, images: np.ndarray, labels: np.ndarray, head_importance: bool
                         ) -> tuple[float, np.ndarray, tuple[np.ndarray, ...]]:
        """This batch's mean loss, its flat gradient (valid until the next call) and, when asked for, each
        attention module's signed head sums (engine/graph/heads.py)."""

    def update(self, grads: np.ndarray, lr: float, fresh: bool) -> None:
        """One optimizer step with `grads`; `fresh`: they are the last forward_backward's, unchanged."""

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean loss and logits with dropout off; changes nothing."""

    def snapshot(self, slot: int) -> np.ndarray:
        """The trainable weights, flat (valid until the next snapshot into the same slot, 0 or 1)."""

    def parameter(self, name: str) -> np.ndarray: ...

    def parameter_names(self) -> list[str]: ...

    def head_outputs(self) -> list[heads.HeadOutput]: ...

    def export_inference_model(self, path: Path, output_name: str) -> None: ...


def open_backend(trainer: str, manifest: Manifest, device: str, options: ort.SessionOptions,
                 flat: gradients.FlatLayout) -> TrainingBackend:
    if trainer == "ort":
        from engine.train.graph_backend import GradientGraphBackend

        return GradientGraphBackend(manifest, device, options, flat)
    if trainer == "ort-training":
        from engine.train.ort_training import OrtTrainingBackend

        return OrtTrainingBackend(manifest, device, options, flat)
    raise ConfigError(f"trainer must be one of {', '.join(TRAINERS)}, got {trainer!r}")


@dataclass(frozen=True)
class ShardGradients:
    """Forward + backward of one shard of a batch on its own (data-parallel training, engine/train/parallel.py)."""
    loss: float  # the shard's mean loss (0.0 for an empty shard)
    gradients: np.ndarray  # flat float32 in model order: the gradient of the shard's mean loss (zeros when empty)
    head_sums: tuple[np.ndarray, ...]  # with head importance: per attention module, heads.head_sums of the shard


class TrainingEngine:
    def __init__(self, manifest: Manifest, device: str, options: ort.SessionOptions, learning_rate: float,
                 checkpoint: Path | None = None, trainer: str = "ort"):
        """`checkpoint`: resume from this checkpoint file instead of the export's initial weights."""
        tune_process_for_training()
        self._manifest = manifest
        self._trainable = manifest.trainable
        params = {p.name: p for p in manifest.parameters}
        self._shapes = [params[n].shape for n in self._trainable]
        self._flat = gradients.FlatLayout([params[n] for n in self._trainable])  # where each parameter lies
        self._size = int(self._flat.sizes.sum())
        trainable = set(self._trainable)  # q/k/v of trainable weights; biases only when all three are trainable
        self._qkv = [q if set(q.biases) <= trainable else dataclasses.replace(q, biases=())
                     for q in manifest.qkv if set(q.weights) <= trainable]
        self._lock = threading.RLock()  # reentrant: `lock` lets callers hold it around several calls
        self._policy = LrPolicy(check_learning_rate(learning_rate))
        self._clip = 0.0
        self._backend = open_backend(trainer, manifest, device, options, self._flat)
        self._load(checkpoint)

    def _load(self, checkpoint: Path | None) -> None:
        """The backend's state from a checkpoint (None: the export's), and the step and policy saved with it."""
        saved = self._backend.load(checkpoint)
        if saved is not None:
            saved = json.loads(saved)
            self._step, self._policy, self._clip = saved["step"], LrPolicy.from_dict(saved["policy"]), saved["clip"]
        else:  # the export's own weights: no step taken yet (the learning-rate policy stays as set)
            self._step = 0
        self._accumulated = 0
        self._pending = None  # the accumulated gradient sum (flat) while batches are being accumulated

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def trainer(self) -> str:
        """Which backend trains: "ort" or "ort-training"."""
        return self._backend.name

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
        with self._lock:
            return self._backend.parameter(name)

    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of every parameter (trainable and frozen)."""
        with self._lock:
            return {n: self._backend.parameter(n) for n in self._backend.parameter_names()}

    def weights_digest(self) -> bytes:
        """sha256 of every trainable weight, bit for bit (data-parallel ranks compare theirs)."""
        with self._lock:
            return hashlib.sha256(self._backend.snapshot(0)).digest()

    def optimizer_state(self) -> OptimizerState:
        with self._lock:
            return self._settings()

    def _settings(self) -> OptimizerState:
        return OptimizerState(self._manifest.optimizer["name"], self.learning_rate, self._policy.schedule,
                              self._policy.position(self._step), self._clip, self._step, self._accumulated)

    # -- changing the optimizer -------------------------------------------------------------------------

    def set_optimizer(self, learning_rate: float | None = None, schedule: LinearSchedule | None = None,
                      clip_grad_norm: float | None = None) -> OptimizerState:
        if schedule is not None:
            check_schedule(schedule)
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

    def head_scores(self, sums: tuple[np.ndarray, ...]) -> tuple[HeadScores, ...]:
        """Each attention module's head importance from its head sums (ShardGradients.head_sums, combined)."""
        if not sums:
            return ()
        return tuple(heads.scores(o, s) for o, s in zip(self._backend.head_outputs(), sums))

    def _views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """name -> that parameter's part of a flat vector, in its shape (views, no copies)."""
        return {n: flat[a:b].reshape(s) for n, (a, b), s in zip(self._trainable, self._flat.spans, self._shapes)}

    # -- the step's guards: each is checked here, once, for every wrapper (isolation, data-parallel) ---

    @staticmethod
    def check_deadline(deadline: float | None) -> None:
        """DEADLINE_EXCEEDED when `deadline` (time.monotonic()) passed while the call waited for the running step."""
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the deadline passed while the step waited for the running one; it was not applied")

    def check_not_accumulating(self, what: str) -> None:
        """FAILED_PRECONDITION while batches are being accumulated: `what` would read a gradient that is not whole."""
        if self._accumulated:
            raise FailedPrecondition(f"{self._accumulated} batches of gradients are being accumulated; apply them "
                                     f"with a TrainStep before asking for {what}")

    def gradients(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and every trainable parameter's gradient for one batch alone; nothing is updated or kept."""
        with self._lock:
            self.check_not_accumulating("the gradients of one batch")
            loss, grads, _ = self._backend.forward_backward(images, labels, False)
            return loss, self._views(grads.copy())

    def head_importance(self, images: np.ndarray, labels: np.ndarray) -> HeadImportanceResult:
        """Head importance of one batch at the current weights; nothing is updated or kept."""
        with self._lock:
            self.check_not_accumulating("head importance")
            loss, _, sums = self._backend.forward_backward(images, labels, True)
            return HeadImportanceResult(loss, self._step, self.head_scores(sums))

    def train_step(self, images: np.ndarray, labels: np.ndarray, summaries: bool = True,
                   accumulate_only: bool = False, deadline: float | None = None, head_importance: bool = False,
                   on_gradients: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> StepResult:
        """One forward/backward on a validated batch, then (unless accumulating) one guarded update.

        images float32 (b, c, h, w), labels int64 (b,). `deadline` (time.monotonic()): a step that
        is still waiting for the lock when it passes is not started at all. `on_gradients(step, grads)`
        gets every parameter's gradient of an applied step (views, valid during the call), e.g. for histograms.
        """
        with self._lock:
            self.check_deadline(deadline)
            start = time.perf_counter()
            loss, grads, sums = self._backend.forward_backward(images, labels, head_importance)
            return self._accumulate(loss, grads, self.head_scores(sums), start, summaries, accumulate_only,
                                    on_gradients, fresh=True)

    def shard_gradients(self, images: np.ndarray, labels: np.ndarray, head_importance: bool = False
                        ) -> ShardGradients:
        """Forward + backward of one shard alone (data-parallel training): its loss, gradient and head sums.

        Nothing is applied or counted: the ranks combine their shards' results and each hands the sum to
        apply_gradients. An empty shard (a batch smaller than the ranks) gives zeros without running ONNX Runtime.
        """
        with self._lock:
            if len(labels) == 0:
                sums = tuple(np.zeros(o.heads) for o in self._backend.head_outputs()) if head_importance else ()
                return ShardGradients(0.0, np.zeros(self._size, np.float32), sums)
            loss, grads, sums = self._backend.forward_backward(images, labels, head_importance)
            return ShardGradients(loss, grads, sums)

    def apply_gradients(self, loss: float, grads: np.ndarray, head_sums: tuple[np.ndarray, ...] = (), *,
                        summaries: bool = True, accumulate_only: bool = False, start: float | None = None,
                        on_gradients: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> StepResult:
        """The rest of a train step for a batch whose loss and gradient were combined elsewhere (the ranks'
        shard_gradients, weighted by shard size): exactly what train_step does after its own forward + backward."""
        with self._lock:
            start = time.perf_counter() if start is None else start
            return self._accumulate(loss, grads, self.head_scores(head_sums), start, summaries, accumulate_only,
                                    on_gradients, fresh=False)

    def _accumulate(self, loss: float, grads: np.ndarray, scores: tuple[HeadScores, ...], start: float,
                    summaries: bool, accumulate_only: bool,
                    on_gradients: Callable[[int, dict[str, np.ndarray]], None] | None, fresh: bool) -> StepResult:
        """Add the batch's gradient to a pending sum, then finish the step. `fresh`: `grads` is the backend's
        last forward_backward output, unchanged."""
        if self._pending is not None:
            grads, fresh = self._pending + grads, False  # the sum of every accumulated batch
        self._pending = None
        self._accumulated += 1
        result = self._finish(loss, grads, scores, start, summaries, accumulate_only, on_gradients, fresh)
        if self._accumulated:  # still accumulating: the next batch adds to this sum (a copy: backends reuse theirs)
            self._pending = grads.copy() if fresh else grads
        return result

    def _finish(self, loss: float, grads: np.ndarray, scores: tuple[HeadScores, ...], start: float,
                summaries: bool, accumulate_only: bool,
                on_gradients: Callable[[int, dict[str, np.ndarray]], None] | None, fresh: bool) -> StepResult:
        """A step after its forward + backward: `grads` is the accumulated sum."""
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
            fresh = False
            squares = self._flat.squares(grads)  # the summaries describe the gradient that was applied
        before = self._backend.snapshot(0) if summaries else None
        lr = self.learning_rate
        self._backend.update(grads, lr, fresh)
        self._step += 1
        self._accumulated = 0
        if on_gradients is not None:
            on_gradients(self._step, self._views(grads))
        return self._result(loss, grads, start, summaries, applied=True, before=before, batches=batches, lr=lr,
                            norm=norm, squares=squares, coefficient=coefficient, scores=scores)

    def _result(self, loss, grads, start, summaries, *, applied: bool, batches: int, before=None, skipped: str = "",
                norm: float, lr: float | None = None, squares: np.ndarray | None = None,
                coefficient: float = 1.0, scores: tuple[HeadScores, ...] = ()) -> StepResult:
        """The step's answer; `before` holds the flat weights before an applied update (for update ratios),
        `squares` each parameter's sum of squared gradients (FlatLayout.squares), `norm` the global norm."""
        summaries_out, attention = [], []
        if summaries:
            after = self._backend.snapshot(1)
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
        """Loss and top-1 hits with dropout off. Touches no gradient, weight or counter."""
        with self._lock:
            loss, logits = self._backend.evaluate(images, labels)
            return EvalResult(loss, int((logits.argmax(axis=-1) == labels).sum()), len(labels), self._step)

    # -- checkpoints and publishing -------------------------------------------------------------------

    def save_checkpoint(self, path: Path) -> int:
        """Write weights + optimizer state + step + policy to `path` (not atomic: the caller renames). Returns the step."""
        with self._lock:
            self._backend.save(path, json.dumps({"step": self._step, "policy": self._policy.to_dict(),
                                                 "clip": self._clip}))
            return self._step

    def restore_checkpoint(self, path: Path | None) -> int:
        """Replace the whole training state with a checkpoint's (None: the export's starting point). Returns the
        restored step."""
        with self._lock:
            self._load(path)
            return self._step

    def export_inference_model(self, path: Path, output_name: str) -> int:
        """Write an inference model holding the current weights. Returns the step of those weights."""
        with self._lock:
            self._backend.export_inference_model(path, output_name)
            return self._step
