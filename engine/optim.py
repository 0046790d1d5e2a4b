"""The `ort` trainer's optimizers: torch.optim.AdamW and torch.optim.SGD, step for step, over flat float32 vectors.

numpy, in place, no temporaries beyond two scratch vectors: the weights, the gradients and the moments are
the trainer's flat buffers (engine/graph_trainer.py binds the weights to ONNX Runtime without a copy).
The arithmetic follows torch's single-tensor implementations (`_single_tensor_adamw`, `_single_tensor_sgd`)
operation by operation, in float32 with Python-float scalars. ATen's vector kernels fuse some multiply-adds
(one rounding where numpy has two), so values agree to a bit or two, not bit for bit (tests/test_trainers.py).
"""
from __future__ import annotations

import math

import numpy as np


class AdamW:
    """torch.optim.AdamW (amsgrad off, maximize off) over one flat parameter vector."""

    name = "adamw"

    def __init__(self, size: int, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.step = 0  # torch's state["step"]: updates applied so far
        self.exp_avg = np.zeros(size, np.float32)
        self.exp_avg_sq = np.zeros(size, np.float32)
        self._scratch = np.empty(size, np.float32), np.empty(size, np.float32)

    def update(self, weights: np.ndarray, grads: np.ndarray, lr: float) -> None:
        """One step: `weights` changes in place; `grads` is read only."""
        self.step += 1
        m, v = self.exp_avg, self.exp_avg_sq
        tmp, denom = self._scratch
        weights *= np.float32(1.0 - lr * self.weight_decay)  # param.mul_(1 - lr * weight_decay)
        np.subtract(grads, m, out=tmp)  # exp_avg.lerp_(grad, 1 - beta1)
        tmp *= np.float32(1.0 - self.beta1)
        m += tmp
        v *= np.float32(self.beta2)  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        np.multiply(grads, np.float32(1.0 - self.beta2), out=tmp)  # ATen's addcmul: self + (value * t1) * t2
        tmp *= grads
        v += tmp
        step_size = lr / (1.0 - self.beta1 ** self.step)
        bias_correction2_sqrt = math.sqrt(1.0 - self.beta2 ** self.step)
        np.sqrt(v, out=denom)  # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        denom /= np.float32(bias_correction2_sqrt)
        denom += np.float32(self.eps)
        np.multiply(m, np.float32(-step_size), out=tmp)  # param.addcdiv_(exp_avg, denom, value=-step_size):
        tmp /= denom  # ATen computes self + (value * t1) / t2
        weights += tmp

    def state(self) -> dict[str, np.ndarray]:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}


class SGD:
    """torch.optim.SGD with its defaults (no momentum, no weight decay): w -= lr * g."""

    name = "sgd"

    def __init__(self, size: int):
        self.step = 0
        self._scratch = np.empty(size, np.float32)

    def update(self, weights: np.ndarray, grads: np.ndarray, lr: float) -> None:
        self.step += 1
        np.multiply(grads, np.float32(-lr), out=self._scratch)  # param.add_(grad, alpha=-lr)
        weights += self._scratch

    def state(self) -> dict[str, np.ndarray]:
        return {}


def build(optimizer: dict, size: int) -> AdamW | SGD:
    """The optimizer the manifest names ({"name": "adamw", betas, eps, weight_decay} or {"name": "sgd"})."""
    hyper = {k: v for k, v in optimizer.items() if k != "name"}
    if optimizer["name"] == "adamw":
        return AdamW(size, **hyper)
    if optimizer["name"] == "sgd":
        return SGD(size)
    raise ValueError(f"unknown optimizer {optimizer['name']!r}")
