"""Learning-rate policy of the training engine: a constant rate or a linear warmup/decay schedule.

Pure and serializable: the policy and its position go into every checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from engine.errors import InvalidArgument


@dataclass(frozen=True)
class LinearSchedule:
    peak_lr: float
    warmup_steps: int
    decay_steps: int
    end_lr: float

    def __post_init__(self):
        if not (math.isfinite(self.peak_lr) and self.peak_lr > 0 and math.isfinite(self.end_lr) and self.end_lr >= 0):
            raise InvalidArgument(f"schedule: peak_lr must be > 0 and end_lr >= 0, got {self.peak_lr} and {self.end_lr}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise InvalidArgument("schedule: warmup_steps and decay_steps must be >= 0")
        if self.warmup_steps + self.decay_steps == 0:
            raise InvalidArgument("schedule: warmup_steps + decay_steps is 0, so peak_lr would never be used; "
                                  "set a constant learning_rate instead")

    def lr(self, k: int) -> float:
        """Learning rate of the k-th step (1-based) since the schedule was set."""
        if k <= self.warmup_steps:
            return self.peak_lr * k / self.warmup_steps
        k -= self.warmup_steps
        if k <= self.decay_steps:
            return self.peak_lr + (self.end_lr - self.peak_lr) * k / self.decay_steps
        return self.end_lr


@dataclass(frozen=True)
class LrPolicy:
    """What the next step's learning rate is: `constant`, or `schedule` started after step `start_step`."""

    constant: float
    schedule: LinearSchedule | None = None
    start_step: int = 0

    def lr(self, step: int) -> float:
        """Learning rate for step number `step` (1-based, the step about to be applied)."""
        return self.schedule.lr(step - self.start_step) if self.schedule else self.constant

    def position(self, step: int) -> int:
        """Steps taken since the schedule was set (0 without a schedule)."""
        return step - self.start_step if self.schedule else 0

    def to_dict(self) -> dict:
        return {"constant": self.constant, "start_step": self.start_step,
                "schedule": asdict(self.schedule) if self.schedule else None}

    @classmethod
    def from_dict(cls, d: dict) -> "LrPolicy":
        return cls(d["constant"], LinearSchedule(**d["schedule"]) if d["schedule"] else None, d["start_step"])


def check_learning_rate(lr: float) -> float:
    if not (math.isfinite(lr) and lr >= 0):
        raise InvalidArgument(f"learning_rate must be a finite number >= 0, got {lr}")
    return lr
