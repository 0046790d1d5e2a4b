"""Training's records: a train step and its gradients, head importance, evaluation, the optimizer, checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from proto.records import Record


@dataclass(frozen=True)
class GradientSummary(Record):
    """One trainable parameter's gradient in one step; block and sublayer place the parameter (-1: outside
    the transformer blocks)."""
    name: str
    shape: tuple[int, ...]
    l2_norm: float
    mean: float
    std: float
    min: float
    max: float
    max_abs: float
    zero_fraction: float
    nonfinite_count: int
    param_norm: float
    update_ratio: float
    block: int = -1  # where the parameter sits (the manifest's placement)
    sublayer: str = "other"


@dataclass(frozen=True)
class QkvGradient(Record):
    """One attention module's q, k and v gradients, whole and head by head, for the weights and the biases
    (the bias fields are 0 / empty when the projections have no bias)."""
    name: str  # fused: the projection weight; separate: the attention module
    block: int
    heads: int
    dim_head: int
    q_norm: float  # L2 norm of the q part of the weight gradient
    k_norm: float
    v_norm: float
    q_head_norms: tuple[float, ...]  # each head's rows of the q part
    k_head_norms: tuple[float, ...]
    v_head_norms: tuple[float, ...]
    module: str = ""
    weights: tuple[str, ...] = ()  # the q, k and v weight parameters (one name three times when fused)
    biases: tuple[str, ...] = ()  # the q, k and v bias parameters; () without biases (then the bias norms are 0)
    q_bias_norm: float = 0.0
    k_bias_norm: float = 0.0
    v_bias_norm: float = 0.0
    q_bias_head_norms: tuple[float, ...] = ()
    k_bias_head_norms: tuple[float, ...] = ()
    v_bias_head_norms: tuple[float, ...] = ()


@dataclass(frozen=True)
class HeadScores(Record):
    """One attention module's head importance (Michel et al. 2019): per head, |dL/d xi_h| for a gate xi_h = 1
    multiplying that head's output, for the batch's mean loss."""
    block: int
    module: str
    importance: tuple[float, ...]  # one value per head


@dataclass(frozen=True)
class StepResult(Record):
    """TrainStep's answer: the loss, the update and, unless omitted, every trainable parameter's gradient summary
    (proto: TrainStepResponse)."""
    loss: float
    step: int
    learning_rate: float
    grad_norm: float
    step_seconds: float
    gradients: list[GradientSummary] = field(default_factory=list)
    attention: list[QkvGradient] = field(default_factory=list)
    applied: bool = True
    skipped_reason: str = ""
    accumulated_batches: int = 1
    clip_coefficient: float = 1.0
    head_importance: list[HeadScores] = field(default_factory=list)  # when the step was asked for it

    @property
    def status(self) -> str:
        """'applied', 'accumulated (n batches)' or 'SKIPPED: reason'."""
        if self.applied:
            return "applied"
        if self.skipped_reason:
            return f"SKIPPED: {self.skipped_reason}"
        n = self.accumulated_batches
        return f"accumulated ({n} batch{'es' if n != 1 else ''})"


@dataclass(frozen=True)
class HeadImportanceResult(Record):
    """HeadImportance's answer: the batch's loss, the step of the weights used, and each attention module's head
    importance in block order. Changes nothing on the server."""
    loss: float
    step: int
    heads: list[HeadScores] = field(default_factory=list)

    def matrix(self) -> np.ndarray:
        """The importance as a [modules, heads] float array in block order (NaN pads modules with fewer heads)."""
        width = max((len(h.importance) for h in self.heads), default=0)
        out = np.full((len(self.heads), width), np.nan)
        for row, h in enumerate(self.heads):
            out[row, :len(h.importance)] = h.importance
        return out


@dataclass(frozen=True)
class GradientHistory(Record):
    """GetGradientHistory's answer: the kept applied steps in the asked range, oldest first, each as TrainStep
    answered it (gradients and attention entries filtered by the parameter pattern), and how many steps the server
    keeps (proto: GradientHistoryResponse)."""
    steps: list[StepResult]
    capacity: int

    def parameters(self) -> list[str]:
        """The names of the parameters whose gradients the steps hold, in first-seen order."""
        return list(dict.fromkeys(g.name for step in self.steps for g in step.gradients))


@dataclass(frozen=True)
class EvalResult(Record):
    """EvalStep's answer: loss and accuracy of the training weights on one labelled batch."""
    loss: float
    correct: int
    count: int
    step: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0

    def as_dict(self) -> dict:
        return {"loss": self.loss, "accuracy": self.accuracy, "correct": self.correct, "count": self.count,
                "step": self.step}


@dataclass(frozen=True)
class LinearSchedule(Record):
    """Linear warmup from 0 to peak_lr over warmup_steps, then linear decay to end_lr over decay_steps
    (engine/train/schedule.py checks and applies it)."""
    peak_lr: float
    warmup_steps: int
    decay_steps: int
    end_lr: float = 0.0


@dataclass(frozen=True)
class OptimizerState(Record):
    """GetOptimizer/SetOptimizer's answer: what the next step will do. `schedule` is None for a constant rate."""
    optimizer: str
    learning_rate: float  # the next step's
    schedule: LinearSchedule | None
    schedule_position: int
    clip_grad_norm: float
    step: int
    accumulated_batches: int


@dataclass(frozen=True)
class CheckpointInfo(Record):
    """A checkpoint in the server's data directory; reason is "manual", "auto" or "shutdown"; problem says why a
    damaged one cannot be restored ("" when intact)."""
    name: str
    step: int
    created_unix: float
    size_bytes: int
    reason: str
    problem: str = ""


@dataclass(frozen=True)
class CheckpointList(Record):
    """ListCheckpoints' answer: the checkpoints, oldest first (damaged ones too, with their problem), and the newest
    intact one's name ("" if none). Unpacks like a pair: `checkpoints, latest = client.list_checkpoints()`."""
    checkpoints: list[CheckpointInfo]
    DERIVED = ("latest",)

    @property
    def latest(self) -> str:
        return next((c.name for c in reversed(self.checkpoints) if not c.problem), "")

    def __iter__(self):
        return iter((self.checkpoints, self.latest))
