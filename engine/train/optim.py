"""The `ort` trainer's optimizers: torch.optim.AdamW and torch.optim.SGD, step for step, over flat float32 vectors.

numpy, in place, no temporaries beyond two scratch vectors: the weights, the gradients and the moments are
the trainer's flat buffers (engine/train/graph_backend.py binds the weights to ONNX Runtime without a copy).
The arithmetic follows torch's single-tensor implementations (`_single_tensor_adamw`, `_single_tensor_sgd`)
operation by operation, in float32 with Python-float scalars. ATen's vector kernels fuse some multiply-adds
(one rounding where numpy has two), so values agree to a bit or two, not bit for bit (tests/test_trainers.py).

The same arithmetic as an ONNX graph (update_graph, update_scalars) runs the update where the weights live
when they live on an execution provider's device (engine/train/buffers.py).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper


BLOCK = 1 << 15  # values per block of the AdamW update: four float32 vectors of it fit in a core's L2 cache


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
        block = min(size, BLOCK)
        self._scratch = np.empty(block, np.float32), np.empty(block, np.float32)

    def update(self, weights: np.ndarray, grads: np.ndarray, lr: float) -> None:
        """One step: `weights` changes in place; `grads` is read only.

        Every operation is elementwise, so the vectors are walked in blocks that stay in the CPU's cache while
        all fourteen operations run on them: bit for bit the whole-vector result, with one pass over memory
        instead of fourteen (2.7M values: 11 ms instead of 32 ms here)."""
        self.step += 1
        decay = np.float32(1.0 - lr * self.weight_decay)
        one_minus_beta1, beta2 = np.float32(1.0 - self.beta1), np.float32(self.beta2)
        one_minus_beta2, eps = np.float32(1.0 - self.beta2), np.float32(self.eps)
        bias_correction2_sqrt = np.float32(math.sqrt(1.0 - self.beta2 ** self.step))
        neg_step_size = np.float32(-(lr / (1.0 - self.beta1 ** self.step)))
        scratch, scratch2 = self._scratch
        for a in range(0, len(weights), BLOCK):
            b = min(a + BLOCK, len(weights))
            w, g, m, v = weights[a:b], grads[a:b], self.exp_avg[a:b], self.exp_avg_sq[a:b]
            tmp, denom = scratch[:b - a], scratch2[:b - a]
            w *= decay  # param.mul_(1 - lr * weight_decay)
            np.subtract(g, m, out=tmp)  # exp_avg.lerp_(grad, 1 - beta1)
            tmp *= one_minus_beta1
            m += tmp
            v *= beta2  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            np.multiply(g, one_minus_beta2, out=tmp)  # ATen's addcmul: self + (value * t1) * t2
            tmp *= g
            v += tmp
            np.sqrt(v, out=denom)  # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            denom /= bias_correction2_sqrt
            denom += eps
            np.multiply(m, neg_step_size, out=tmp)  # param.addcdiv_(exp_avg, denom, value=-step_size):
            tmp /= denom  # ATen computes self + (value * t1) / t2
            w += tmp

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


# -- the same update as an ONNX graph ----------------------------------------------------------------------

UPDATE_OPSET = 17  # plain arithmetic ops; every onnxruntime either trainer runs knows this opset
UPDATE_IR = 8


def update_scalars(optimizer: AdamW | SGD, lr: float) -> dict[str, np.ndarray]:
    """The per-step scalar inputs of update_graph for the step `optimizer.step` (already counted), computed in
    Python floats and rounded to float32 exactly as the numpy update rounds them."""
    if isinstance(optimizer, SGD):
        return {"neg_lr": np.array(-lr, np.float32)}
    step_size = lr / (1.0 - optimizer.beta1 ** optimizer.step)
    return {"decay": np.array(1.0 - lr * optimizer.weight_decay, np.float32),
            "bias_correction2_sqrt": np.array(math.sqrt(1.0 - optimizer.beta2 ** optimizer.step), np.float32),
            "neg_step_size": np.array(-step_size, np.float32)}


def update_graph(optimizer: AdamW | SGD) -> onnx.ModelProto:
    """One optimizer step over flat float32 vectors: inputs weights, grads, the moments and update_scalars';
    outputs new_weights and new_<moment>. Op for op the numpy update above."""
    vector = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n"])  # noqa: E731
    scalar = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [])  # noqa: E731
    const = lambda name, value: helper.make_tensor(name, TensorProto.FLOAT, [], [value])  # noqa: E731
    node = helper.make_node
    if isinstance(optimizer, SGD):
        nodes = [node("Mul", ["grads", "neg_lr"], ["tmp"]), node("Add", ["weights", "tmp"], ["new_weights"])]
        inputs = [vector("weights"), vector("grads"), scalar("neg_lr")]
        outputs, constants = [vector("new_weights")], []
    else:
        nodes = [
            node("Mul", ["weights", "decay"], ["decayed"]),  # param.mul_(1 - lr * weight_decay)
            node("Sub", ["grads", "exp_avg"], ["diff"]),  # exp_avg.lerp_(grad, 1 - beta1)
            node("Mul", ["diff", "one_minus_beta1"], ["lerp"]),
            node("Add", ["exp_avg", "lerp"], ["new_exp_avg"]),
            node("Mul", ["exp_avg_sq", "beta2"], ["kept"]),  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
            node("Mul", ["grads", "one_minus_beta2"], ["scaled"]),
            node("Mul", ["scaled", "grads"], ["square"]),
            node("Add", ["kept", "square"], ["new_exp_avg_sq"]),
            node("Sqrt", ["new_exp_avg_sq"], ["root"]),  # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt) + eps
            node("Div", ["root", "bias_correction2_sqrt"], ["corrected"]),
            node("Add", ["corrected", "eps"], ["denom"]),
            node("Mul", ["new_exp_avg", "neg_step_size"], ["numerator"]),  # param.addcdiv_(exp_avg, denom, -step_size)
            node("Div", ["numerator", "denom"], ["change"]),
            node("Add", ["decayed", "change"], ["new_weights"]),
        ]
        inputs = [vector("weights"), vector("grads"), vector("exp_avg"), vector("exp_avg_sq"),
                  scalar("decay"), scalar("bias_correction2_sqrt"), scalar("neg_step_size")]
        outputs = [vector("new_weights"), vector("new_exp_avg"), vector("new_exp_avg_sq")]
        constants = [const("one_minus_beta1", float(np.float32(1.0 - optimizer.beta1))),
                     const("beta2", float(np.float32(optimizer.beta2))),
                     const("one_minus_beta2", float(np.float32(1.0 - optimizer.beta2))),
                     const("eps", float(np.float32(optimizer.eps)))]
    graph = helper.make_graph(nodes, f"{optimizer.name}_update", inputs, outputs, initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", UPDATE_OPSET)],
                              producer_name="vitserve")
    model.ir_version = UPDATE_IR
    onnx.checker.check_model(model)
    return model
