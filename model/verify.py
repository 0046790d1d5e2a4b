"""The export's self-check: ONNX Runtime (through the server's own engines) against PyTorch.

Inference: logits of inference.onnx vs PyTorch eval logits.
Training, for each trainer (the gradient graph, `ort`, and the training artifacts, `ort-training`): the
first step's loss and EVERY trainable parameter's gradient vs PyTorch autograd on the same weights and
batch; for `ort` also the eval-mode loss of its forward graph (what EvalStep and Publish use).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from engine.inference import InferenceEngine
from engine.manifest import INFERENCE_MODEL, Manifest
from engine.runtime import session_options
from engine.train.step import TrainingEngine

LOGITS_TOL = 1e-4  # relative to the largest |logit|
LOSS_TOL = 1e-4  # relative to max(1, |loss|)
GRAD_TOL = 1e-3  # max |g_ort - g_torch| relative to max |g_torch| of that parameter
GRAD_FLOOR = 1e-4  # ... but at least this fraction of the model's largest gradient (zero gradients are noise)


@dataclass
class CheckReport:
    logits_max_rel_err: float = 0.0
    loss_torch: float = 0.0
    loss_ort: float = 0.0  # the trainer with the worst gradient's
    grad_max_rel_err: float = 0.0  # the worst over both trainers
    worst_parameter: str = ""
    parameters_checked: int = 0
    trainers: dict[str, dict] = field(default_factory=dict)  # trainer -> loss_ort, grad_max_rel_err, worst_parameter
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "failures"}


def sample_batch(shape: tuple[int, ...], num_classes: int, batch: int = 4, seed: int = 0):
    """A fixed random batch: images (b, c, h, w) float32 and labels (b,) int64."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, *shape[1:]), dtype=np.float32)
    labels = rng.integers(0, num_classes, size=batch, dtype=np.int64)
    return images, labels


BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def batch_norms(model: torch.nn.Module) -> list[str]:
    """The BatchNorm modules of `model` (their running statistics stay frozen in training, see `train_mode`)."""
    return [name for name, m in model.named_modules() if isinstance(m, BATCH_NORMS)]


def train_mode(model: torch.nn.Module) -> torch.nn.Module:
    """Training mode as the export traces it and the oracle runs it: dropout on, BatchNorm on its running statistics.

    ORT 1.19.2's artifacts cannot hold a BatchNormalization in training mode (its eval graph keeps the
    running-statistics outputs: "number of op outputs should be 1 when Training_mode = False"), so
    the export freezes the statistics, says so, and checks the gradients of exactly that model.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, BATCH_NORMS):
            m.eval()
    return model


def torch_gradients(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, trainable: list[str]):
    """The oracle: mean cross-entropy and autograd gradients, dropout off, weights untouched."""
    model.zero_grad(set_to_none=True)
    train_mode(model)
    logits = model(torch.from_numpy(images))
    loss = F.cross_entropy(logits, torch.from_numpy(labels))
    loss.backward()
    params = dict(model.named_parameters())
    grads = {n: params[n].grad.detach().numpy().copy() for n in trainable}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def check_inference(manifest: Manifest, model: torch.nn.Module, report: CheckReport) -> None:
    images, _ = sample_batch(manifest.input_shape, manifest.num_classes, batch=3, seed=1)
    engine = InferenceEngine(manifest.path(INFERENCE_MODEL), manifest.input_name, manifest.output_name,
                             "cpu", session_options(training=False))
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    got = engine.logits(images)
    report.logits_max_rel_err = float(np.abs(got - expected).max() / (np.abs(expected).max() + 1e-12))
    if not report.logits_max_rel_err <= LOGITS_TOL:
        report.failures.append(f"inference logits differ from PyTorch: max rel err {report.logits_max_rel_err:.3g} > {LOGITS_TOL}")


def torch_eval_loss(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(torch.from_numpy(images)), torch.from_numpy(labels)))


def check_training(manifest: Manifest, model: torch.nn.Module, report: CheckReport, trainer: str) -> None:
    """`model` must be dropout-free and hold the same weights as the artifacts' checkpoint."""
    images, labels = sample_batch(manifest.input_shape, manifest.num_classes)
    trainable = manifest.trainable
    report.loss_torch, expected = torch_gradients(model, images, labels, trainable)
    engine = TrainingEngine(manifest, "cpu", session_options(), learning_rate=0.0, trainer=trainer)
    loss, got = engine.gradients(images, labels)
    if not abs(loss - report.loss_torch) <= LOSS_TOL * max(1.0, abs(report.loss_torch)):
        report.failures.append(f"{trainer}: training loss differs from PyTorch: ORT {loss:.6g} vs torch {report.loss_torch:.6g}")
    if trainer == "ort":  # the eval-mode forward graph: EvalStep's loss, Publish's model
        eval_loss, eval_expected = engine.eval_step(images, labels).loss, torch_eval_loss(model, images, labels)
        if not abs(eval_loss - eval_expected) <= LOSS_TOL * max(1.0, abs(eval_expected)):
            report.failures.append(f"{trainer}: eval loss differs from PyTorch: ORT {eval_loss:.6g} vs torch {eval_expected:.6g}")
    worst, worst_name = 0.0, ""
    largest = max((float(np.abs(g).max()) for g in expected.values()), default=0.0)
    for name in trainable:
        # A gradient that is zero in exact arithmetic (an attention key bias: softmax ignores it) is rounding noise
        # in both; it compares against GRAD_FLOOR of the model's largest gradient instead of against itself.
        scale = max(float(np.abs(expected[name]).max()), GRAD_FLOOR * largest, 1e-12)
        err = float(np.abs(got[name] - expected[name]).max() / scale) if got[name].shape == expected[name].shape else np.inf
        if err >= worst:
            worst, worst_name = err, name
        if not err <= GRAD_TOL:
            report.failures.append(f"{trainer}: gradient of {name} differs from PyTorch: max rel err {err:.3g} > {GRAD_TOL}")
    report.trainers[trainer] = {"loss_ort": loss, "grad_max_rel_err": worst, "worst_parameter": worst_name}
    if worst >= report.grad_max_rel_err:
        report.loss_ort, report.grad_max_rel_err, report.worst_parameter = loss, worst, worst_name
    report.parameters_checked = len(trainable)
