"""Learning-rate policy of the training engine: a constant rate or a linear warmup/decay schedule.

Pure and serializable: the policy and its position go into every checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from engine.errors import InvalidArgument
from proto.records.training import LinearSchedule


def check_schedule(schedule: LinearSchedule) -> LinearSchedule:
    """A schedule as SetOptimizer may set it: a peak above 0, steps >= 0, and some steps that reach the peak."""
    s = schedule
    if not (math.isfinite(s.peak_lr) and s.peak_lr > 0 and math.isfinite(s.end_lr) and s.end_lr >= 0):
        raise InvalidArgument(f"schedule: peak_lr must be > 0 and end_lr >= 0, got {s.peak_lr} and {s.end_lr}")
    if s.warmup_steps < 0 or s.decay_steps < 0:
        raise InvalidArgument("schedule: warmup_steps and decay_steps must be >= 0")
    if s.warmup_steps + s.decay_steps == 0:
        raise InvalidArgument("schedule: warmup_steps + decay_steps is 0, so peak_lr would never be used; "
                              "set a constant learning_rate instead")
    return schedule


def scheduled_lr(s: LinearSchedule, k: int) -> float:
    """Learning rate of the k-th step (1-based) since the schedule was set."""
    if k <= s.warmup_steps:
        return s.peak_lr * k / s.warmup_steps
    k -= s.warmup_steps
    if k <= s.decay_steps:
        return s.peak_lr + (s.end_lr - s.peak_lr) * k / s.decay_steps
    return s.end_lr


@dataclass(frozen=True)
class LrPolicy:
    """What the next step's learning rate is: `constant`, or `schedule` started after step `start_step`."""

    constant: float
    schedule: LinearSchedule | None = None
    start_step: int = 0

    def lr(self, step: int) -> float:
        """Learning rate for step number `step` (1-based, the step about to be applied)."""
        return scheduled_lr(self.schedule, step - self.start_step) if self.schedule else self.constant

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
