"""How the CLI prints what a command returns: one renderer, `render`, for every result, as text or as one
JSON document (--json).

A result is a wire record (proto/records/: ModelInfo, EvalResult, OptimizerState, CheckpointList,
ModelVersion), a result of client/evaluate.py (Evaluation, FolderPredictions), or one of the small result
objects of the CLI for commands that add to what the server said: those of health, predict and checkpoint
below; the training commands' (train-step, grads, heads, history, fit) in client/render_training.py;
explain's and attribute's in client/render_explain.py.
`text` and `document` dispatch on the result's type (functools.singledispatch): the print_* functions
are the text of each, and a result's JSON is its as_dict() unless `document` has its own case.
The two other modules register their cases beside their result objects, so the cases are there whenever such
an object is; what the client library returns prints here, so render() knows it once this module is imported.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from client import (
    CheckpointInfo,
    CheckpointList,
    EvalResult,
    ModelInfo,
    ModelVersion,
    OptimizerState,
    PredictResult,
    Preprocessing,
)

from client.evaluate import Evaluation, FolderPredictions


@dataclass
class Health:
    """health: the standard gRPC health status ("SERVING", "NOT_SERVING", ...)."""
    status: str

    @property
    def serving(self) -> bool:
        return self.status == "SERVING"


@dataclass
class Predictions:
    """predict: the result and the files, as the user named them, in request order."""
    files: list[str]
    result: PredictResult


@dataclass
class Checkpointed:
    """checkpoint save or restore: what was done ("saved", "restored") and to which checkpoint."""
    verb: str
    checkpoint: CheckpointInfo


def render(result: Any, as_json: bool) -> None:
    """Print `result` on stdout: text, or one JSON document."""
    if as_json:
        print(json.dumps(document(result), indent=2))
    else:
        text(result)


@functools.singledispatch
def document(result: Any) -> Any:
    """The JSON document of a result: its fields, unless registered below (or in render_training.py and
    render_explain.py, beside their results)."""
    return result.as_dict()


@document.register
def _(result: Health) -> Any:
    return {"status": result.status}


@document.register
def _(result: Predictions) -> Any:
    return result.result.as_dict()


@document.register
def _(result: Checkpointed) -> Any:
    return result.checkpoint.as_dict()


@functools.singledispatch
def text(result: Any) -> None:
    """Print a result as text for people."""
    raise TypeError(f"no text for a {type(result).__name__}")


# ---------------------------------------------------------------- health, info

@text.register
def print_health(result: Health) -> None:
    print(result.status)


@text.register
def print_info(info: ModelInfo) -> None:
    pre = info.preprocessing
    total = sum(int(np.prod(p.shape)) for p in info.parameters)
    trainable = [p for p in info.parameters if p.trainable]
    n_trainable = sum(int(np.prod(p.shape)) for p in trainable)
    names = ", ".join(info.class_names[:10]) + (", ..." if info.num_classes > 10 else "")
    rows = [
        ("model", info.name),
        ("device", f"{info.device} ({', '.join(info.execution_providers) or 'no providers'})"),
        ("trainer", f"{info.trainer or 'none (inference only)'} on onnxruntime {info.onnxruntime_version}"),
        ("input", f"{info.input_name} {list(info.input_shape)} {info.input_dtype}"),
        ("preprocessing", preprocessing_text(pre)),
        ("classes", f"{info.num_classes} ({names})"),
        ("parameters", f"{len(info.parameters)} tensors, {total:,} elements"),
        ("trainable", f"{len(trainable)} tensors, {n_trainable:,} elements"),
        ("step", str(info.step)),
        ("learning rate", f"{info.learning_rate:g}"),
        ("optimizer", info.optimizer),
        ("loss node", f"{info.loss_node} ({info.loss_op_type})"),
        ("opset", str(info.opset)),
        ("max batch", str(info.max_batch_size)),
        ("model version", f"{info.model_version} (Predict)"),
        ("versions", ", ".join(f"{v.version} (step {v.step})" for v in info.versions) or "-"),
        ("auto checkpoint", auto_checkpoint_text(info)),
        ("auto publish", f"every {info.publish_every_steps} steps" if info.publish_every_steps else "off"),
    ]
    if info.role != "all":  # a replica of a fleet says which part it plays
        rows.insert(1, ("role", info.role + (" (inference only)" if info.role == "predict" else "")))
    for key, value in rows:
        print(f"{key:<15} {value}")


def preprocessing_text(pre: Preprocessing) -> str:
    """e.g. `224x224 (shorter side to 248, centre crop), bicubic, 3 channel(s), mean [...], std [...]`."""
    resize = f" (shorter side to {pre.resize_shorter}, centre crop)" if pre.resize_shorter else ""
    return (f"{pre.height}x{pre.width}{resize}, {pre.interpolation}, "
            f"{pre.channels} channel(s), mean {list(pre.mean)}, std {list(pre.std)}")


def auto_checkpoint_text(info: ModelInfo) -> str:
    parts = []
    if info.checkpoint_every_steps:
        parts.append(f"every {info.checkpoint_every_steps} steps")
    if info.checkpoint_every_seconds:
        parts.append(f"every {info.checkpoint_every_seconds:g} s")
    return ", ".join(parts) or "off"


# ---------------------------------------------------------------- predict

@text.register
def print_predictions(predictions: Predictions) -> None:
    result = predictions.result
    for i, (name, top) in enumerate(zip(predictions.files, result.predictions)):
        print(name)
        width = max((len(label) for _, label, _ in top), default=0)
        for _, label, prob in top:
            print(f"  {label:<{width}}  {prob * 100:5.1f}%")
        if result.logits is not None:
            print("  logits " + np.array2string(result.logits[i], precision=4, max_line_width=10**6))
    print(f"(model version {result.model_version})")


# ---------------------------------------------------------------- eval-step

@text.register
def print_eval(r: EvalResult) -> None:
    print(f"step {r.step}  loss {r.loss:.4f}  accuracy {r.accuracy * 100:.1f}% ({r.correct}/{r.count})")


# ---------------------------------------------------------------- evaluate, predict DIR

def print_skipped(skipped: dict[str, str]) -> None:
    if skipped:
        print(f"{len(skipped)} file(s) skipped (not decodable; --strict makes the first an error):")
        for path, reason in skipped.items():
            print(f"  {path}: {reason}")


@text.register
def print_evaluation(e: Evaluation) -> None:
    print(f"{e.data}: {e.count} images, model version {e.model_version}")
    print(f"accuracy        {e.accuracy * 100:.2f}%")
    print(f"top-{e.top_k} accuracy  {e.top_k_accuracy * 100:.2f}%")
    print(f"macro F1        {e.macro_f1:.4f}")
    rows = [(c.name, f"{c.precision:.3f}", f"{c.recall:.3f}", f"{c.f1:.3f}", str(c.support)) for c in e.classes]
    print_table(("class", "precision", "recall", "F1", "support"), rows, right={1, 2, 3, 4})
    print_skipped(e.skipped)
    if e.plot:
        print(f"wrote {e.plot}")


@text.register
def print_folder_predictions(p: FolderPredictions) -> None:
    if p.csv:
        print(f"classified {len(p.rows)} files (model version {p.model_version}); wrote {p.csv}")
    else:
        for path, top in p.rows:
            print(f"{path}  " + "  ".join(f"{label} {prob * 100:.1f}%" for label, prob in top))
        print(f"(model version {p.model_version})")
    print_skipped(p.skipped)


# ---------------------------------------------------------------- optimizer

@text.register
def print_optimizer(state: OptimizerState) -> None:
    sched = state.schedule
    if sched is None:
        schedule = "none (constant learning rate)"
    else:
        schedule = (f"linear warmup 0 -> {sched.peak_lr:g} over {sched.warmup_steps} steps, "
                    f"decay to {sched.end_lr:g} over {sched.decay_steps} steps (position {state.schedule_position})")
    rows = [
        ("optimizer", state.optimizer),
        ("learning rate", f"{state.learning_rate:.6g} (next step)"),
        ("schedule", schedule),
        ("clipping", f"global gradient norm {state.clip_grad_norm:g}" if state.clip_grad_norm else "off"),
        ("step", str(state.step)),
        ("accumulated", f"{state.accumulated_batches} batch(es) pending"),
    ]
    for key, value in rows:
        print(f"{key:<15} {value}")


# ---------------------------------------------------------------- checkpoint, publish

@text.register
def print_checkpointed(result: Checkpointed) -> None:
    info = result.checkpoint
    print(f"{result.verb} checkpoint {info.name}: step {info.step}, {human_size(info.size_bytes)}, "
          f"{info.reason}, written {local_time(info.created_unix)}")


@text.register
def print_checkpoints(listing: CheckpointList) -> None:
    if not listing.checkpoints:
        print("no checkpoints")
        return
    rows = [(c.name + (" *" if c.name == listing.latest else ""), str(c.step), local_time(c.created_unix),
             human_size(c.size_bytes), f"DAMAGED: {c.problem}" if c.problem else c.reason)
            for c in listing.checkpoints]
    print_table(("name", "step", "written", "size", "reason"), rows, right={1, 3})
    print(f"latest: {listing.latest} (*)")


@text.register
def print_published(version: ModelVersion) -> None:
    print(f"published model version {version.version} (weights of step {version.step}); Predict serves it now")


def local_time(unix: float) -> str:
    """Seconds since the epoch as local YYYY-MM-DD HH:MM:SS."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 ** 2:
        return f"{size / 1024:.1f} KiB"
    return f"{size / 1024 ** 2:.1f} MiB"


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int] = frozenset(),
                indent: str = "  ") -> None:
    """Columns padded to their widest cell; column indices in `right` are right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print((indent + "  ".join(cells)).rstrip())
