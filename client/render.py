"""How the CLI prints what a command returns: one renderer, `render`, for every result, as text or as one
JSON document (--json).

A result is a wire record (proto/records/: ModelInfo, EvalResult, OptimizerState, CheckpointList,
ModelVersion) or one of the small result objects below for commands that add to what the server said
(the file names of predict, the several steps of train-step --repeat, the plots of grads, heads, history
and explain --plot, health).
`text` and `document` dispatch on the result's type (functools.singledispatch): the print_* functions
are the text of each, and a result's JSON is its as_dict() unless `document` has its own case.
"""
from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client import (
    AttributeResult,
    CheckpointInfo,
    CheckpointList,
    EvalResult,
    Explanation,
    GradientHistory,
    GraphNode,
    HeadImportanceResult,
    HeadScores,
    ModelInfo,
    ModelVersion,
    OptimizerState,
    ParameterGradientPath,
    PredictResult,
    Preprocessing,
    TrainStepResult,
)

from client.evaluate import Evaluation, FolderPredictions

if TYPE_CHECKING:
    from client.fit import FitResult
    from client.graphs import PathPicture


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
class TrainSteps:
    """train-step: its steps, which run as they are read (so text shows each step when it is done); the
    summaries of the last one unless they were omitted, `top` parameters of them, and its head importance
    when it was asked for (`heads`)."""
    steps: Iterable[TrainStepResult]
    summaries: bool
    top: int
    heads: bool = False


@dataclass
class Checkpointed:
    """checkpoint save or restore: what was done ("saved", "restored") and to which checkpoint."""
    verb: str
    checkpoint: CheckpointInfo


@dataclass
class Explained:
    """explain: the explanation, told parameter by parameter in `detail` (explain --parameter) or as a table,
    and the picture of the parameter's backward path when one was drawn (explain --plot)."""
    explanation: Explanation
    detail: bool
    picture: PathPicture | None = None


@dataclass
class Attributed:
    """attribute: the maps, the name of each image (file name, or "image i" of an .npz) and the overlay (--plot)."""
    result: AttributeResult
    names: list[str]
    plot: Path | None = None


@dataclass
class Heads:
    """heads: the head importance of one batch, and the heatmap written of it (heads --plot)."""
    result: HeadImportanceResult
    plot: Path | None = None


@dataclass
class History:
    """history: the kept steps, the parameter pattern asked for ("": every parameter) and the plot (--plot)."""
    history: GradientHistory
    pattern: str = ""
    plot: Path | None = None


@dataclass
class Fitted:
    """fit: the run's result, and the command that resumes it when a signal stopped it ("" otherwise)."""
    result: FitResult
    resume_command: str = ""


@dataclass
class GradientPlot:
    """grads: the train step and the gradient-flow figure written of it."""
    plot: Path
    step: TrainStepResult


def render(result: Any, as_json: bool) -> None:
    """Print `result` on stdout: text, or one JSON document."""
    if as_json:
        print(json.dumps(document(result), indent=2))
    else:
        text(result)


@functools.singledispatch
def document(result: Any) -> Any:
    """The JSON document of a result: its fields, unless registered below."""
    return result.as_dict()


@document.register
def _(result: Health) -> Any:
    return {"status": result.status}


@document.register
def _(result: Predictions) -> Any:
    return result.result.as_dict()


@document.register
def _(result: TrainSteps) -> Any:
    steps = [step.as_dict() for step in result.steps]
    return steps[0] if len(steps) == 1 else steps


@document.register
def _(result: Checkpointed) -> Any:
    return result.checkpoint.as_dict()


@document.register
def _(result: Explained) -> Any:
    doc = result.explanation.as_dict()
    if result.picture is not None:
        doc.update(plot=str(result.picture.path), renderer=result.picture.renderer, plotted_nodes=result.picture.nodes)
    return doc


@document.register
def _(result: Attributed) -> Any:
    return {**result.result.as_dict(), "images": result.names, **({"plot": str(result.plot)} if result.plot else {})}


@document.register
def _(result: Heads) -> Any:
    return {**result.result.as_dict(), **({"plot": str(result.plot)} if result.plot else {})}


@document.register
def _(result: History) -> Any:
    return {**result.history.as_dict(), **({"plot": str(result.plot)} if result.plot else {})}


@document.register
def _(result: Fitted) -> Any:
    return {**result.result.as_dict(), **({"resume_command": result.resume_command} if result.resume_command else {})}


@document.register
def _(result: GradientPlot) -> Any:
    return {"plot": str(result.plot), "step": result.step.as_dict()}


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


# ---------------------------------------------------------------- train-step, eval-step, grads

@text.register
def print_train_steps(result: TrainSteps) -> None:
    last = None
    for last in result.steps:
        print_step(last)
    if result.summaries and last is not None:
        print_gradients(last, result.top)
        print_attention(last)
    if result.heads and last is not None:
        print("\nhead importance |dL/d xi_h| (the weights before the update)")
        print_head_table(last.head_importance)


def print_step(r: TrainStepResult) -> None:
    clipped = f"  clipped x{r.clip_coefficient:.3g}" if 0 < r.clip_coefficient < 1 else ""
    print(f"step {r.step}  loss {r.loss:.4f}  lr {r.learning_rate:.3g}  "
          f"grad-norm {r.grad_norm:.4g}{clipped}  ({r.step_seconds * 1000:.1f} ms)  {r.status}")


def print_gradients(r: TrainStepResult, top: int) -> None:
    grads = sorted(r.gradients, key=lambda g: g.l2_norm, reverse=True)[:max(top, 0)]
    if grads:
        rows = [(g.name, "x".join(map(str, g.shape)) or "scalar", f"{g.l2_norm:.3e}",
                 f"{g.max_abs:.3e}", f"{g.zero_fraction * 100:.1f}", f"{g.update_ratio:.3e}")
                for g in grads]
        header = ("parameter", "shape", "grad L2", "max|g|", "zero %", "update ratio")
        print(f"\ntop {len(grads)} of {len(r.gradients)} parameters by gradient L2 norm")
        print_table(header, rows, right={2, 3, 4, 5})
    bad = [g.name for g in r.gradients if g.nonfinite_count]
    if bad:
        print(f"warning: non-finite gradients in {len(bad)} parameter(s): {', '.join(bad)}")


def print_attention(r: TrainStepResult) -> None:
    if not r.attention:
        return
    print("\nattention q/k/v gradients")
    for a in r.attention:
        print(f"  block {a.block}  q ||g|| {a.q_norm:.3e}  k ||g|| {a.k_norm:.3e}  "
              f"v ||g|| {a.v_norm:.3e}  ({a.heads} heads x {a.dim_head})")
        for part, norms in (("q", a.q_head_norms), ("k", a.k_head_norms), ("v", a.v_head_norms)):
            print(f"    {part} heads  " + "  ".join(f"{n:.3e}" for n in norms))
        if a.biases:
            print(f"    biases   q ||g|| {a.q_bias_norm:.3e}  k ||g|| {a.k_bias_norm:.3e}  v ||g|| {a.v_bias_norm:.3e}")


def head_cell(value: float) -> str:
    return f"{value:.3e}"


def print_head_table(heads: list[HeadScores]) -> None:
    """Head importance as a table: one row per attention module (block order), one column per head."""
    if not heads:
        print("  (no attention modules)")
        return
    width = max(len(h.importance) for h in heads)
    rows = [(str(h.block), h.module, *[head_cell(v) for v in h.importance],
             *[""] * (width - len(h.importance))) for h in heads]
    print_table(("block", "module", *[f"head {i}" for i in range(width)]), rows,
                right={0, *range(2, width + 2)})


@text.register
def print_heads(result: Heads) -> None:
    r = result.result
    width = max((len(h.importance) for h in r.heads), default=0)
    print(f"head importance |dL/d xi_h| at step {r.step}  loss {r.loss:.4f}  ({len(r.heads)} attention modules x "
          f"{width} heads)")
    print_head_table(r.heads)
    if result.plot is not None:
        print(f"wrote {result.plot}")


@text.register
def print_history(result: History) -> None:
    h = result.history
    if not h.capacity:
        print("the server keeps no gradient history (it runs with --gradient-history 0)")
    elif not h.steps:
        print(f"no kept steps in that range (the server keeps the last {h.capacity} applied steps)")
    else:
        print(f"{len(h.steps)} kept steps, {h.steps[0].step} to {h.steps[-1].step} (the server keeps the last "
              f"{h.capacity} applied steps)")
    if not h.steps:
        return
    names = h.parameters() if result.pattern else []
    if result.pattern:
        print(f"gradient L2 norms of the {len(names)} parameters matching {result.pattern!r}:"
              if names else f"no parameter matches {result.pattern!r}")
        for i, name in enumerate(names, 1):
            print(f"  [{i}] {name}")
    rows = []
    for step in h.steps:
        norms = {g.name: g.l2_norm for g in step.gradients}
        rows.append((str(step.step), f"{step.loss:.4f}", f"{step.learning_rate:.3g}", f"{step.grad_norm:.3e}",
                     *[f"{norms[n]:.3e}" if n in norms else "-" for n in names]))
    header = ("step", "loss", "lr", "grad norm", *[f"[{i}]" for i in range(1, len(names) + 1)])
    print_table(header, rows, right=set(range(len(header))))
    attention = [(step.step, a) for step in h.steps for a in step.attention] if result.pattern else []
    if not result.pattern:
        print("(--parameter PATTERN adds the gradient L2 norms of the matching parameters and their q/k/v)")
    if attention:
        biases = any(a.biases for _, a in attention)
        print("\nq/k/v gradient L2 norms of their attention modules" + (" (weights, then biases)" if biases else ""))
        rows = [(str(s), str(a.block), *[f"{v:.3e}" for v in (a.q_norm, a.k_norm, a.v_norm)],
                 *([f"{v:.3e}" for v in (a.q_bias_norm, a.k_bias_norm, a.v_bias_norm)] if biases else []))
                for s, a in attention]
        header = ("step", "block", "q", "k", "v", *(("q bias", "k bias", "v bias") if biases else ()))
        print_table(header, rows, right=set(range(len(header))))
    if result.plot is not None:
        print(f"wrote {result.plot}")


@text.register
def print_eval(r: EvalResult) -> None:
    print(f"step {r.step}  loss {r.loss:.4f}  accuracy {r.accuracy * 100:.1f}% ({r.correct}/{r.count})")


@text.register
def print_gradient_plot(result: GradientPlot) -> None:
    print_step(result.step)
    print(f"wrote {result.plot}")


# ---------------------------------------------------------------- fit, evaluate, predict DIR

def print_epoch(e: dict) -> None:
    """One finished epoch of a fit, as it finishes."""
    print(f"epoch {e['epoch']}  step {e['step']}  loss {e['train_loss']:.4f}  val loss {e['val_loss']:.4f}  "
          f"val acc {e['val_accuracy'] * 100:.1f}%  {e['images_per_s']:.0f} img/s" + ("  best" if e["best"] else ""),
          flush=True)


def print_skipped(skipped: dict[str, str]) -> None:
    if skipped:
        print(f"{len(skipped)} file(s) skipped (not decodable; --strict makes the first an error):")
        for path, reason in skipped.items():
            print(f"  {path}: {reason}")


@text.register
def print_fitted(fitted: Fitted) -> None:
    r = fitted.result
    print(f"fit {r.stopped}: {len(r.epochs)} epoch(s) in {r.out}, step {r.step}; {r.train_images} training and "
          f"{r.val_images} validation files" + (f"; {r.reconnects} reconnect(s)" if r.reconnects else ""))
    if r.best:
        print(f"best: epoch {r.best['epoch']}, validation accuracy {r.best['val_accuracy'] * 100:.1f}% "
              f"(checkpoint {r.best['checkpoint']}, step {r.best['step']})")
    print_skipped(r.skipped)
    if r.published is not None:
        print_published(r.published)
    if r.files:
        print(f"wrote {', '.join(r.files)}")
    if fitted.resume_command:
        p = r.position
        print(f"stopped in epoch {p['epoch']} after batch {p['batch']} (step {p['step']}); checkpoint fit-last saved")
        print(f"resume with: {fitted.resume_command}")


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


# ---------------------------------------------------------------- explain

@text.register
def print_explained(result: Explained) -> None:
    explanation = result.explanation
    print_loss(explanation)
    if result.detail:
        for p in explanation.parameters:
            print_parameter_story(explanation, p)
    else:
        print_parameter_table(explanation)
    if result.picture is not None:
        drawn = "graphviz dot" if result.picture.renderer == "graphviz" else "matplotlib: graphviz's dot is not on PATH"
        print(f"\nwrote {result.picture.path} ({drawn})")


def node_text(node: GraphNode | None) -> str:
    return f"`{node.name}` ({node.op_type})" if node is not None else "(not reported)"


def print_loss(e: Explanation) -> None:
    loss = e.loss
    print(f"loss           {node_text(loss)}")
    if loss is not None:
        print(f"               inputs: {', '.join(loss.inputs) or '-'}  ->  output: {', '.join(loss.outputs) or '-'}")
    print(f"loss gradient  {node_text(e.loss_gradient)}  (backpropagation starts here)")
    print(f"graph          {e.forward_nodes} forward nodes, {e.backward_nodes} backward (gradient) nodes")


def print_parameter_table(e: Explanation) -> None:
    rows = [(p.name, str(p.block) if p.block >= 0 else "-", p.sublayer,
             p.gradient_node.op_type if p.gradient_node else "?", str(p.ops_from_loss)) for p in e.parameters]
    print(f"\n{len(rows)} trainable parameters: where each gradient is computed")
    print_table(("parameter", "block", "sublayer", "gradient op", "ops from loss"), rows, right={1, 4})


def print_parameter_story(e: Explanation, p: ParameterGradientPath) -> None:
    """The answer to "where are the loss and this weight's gradient (and its q, k, v parts') computed?"."""
    shape = "x".join(map(str, p.shape)) or "scalar"
    where = f"block {p.block}, {p.sublayer}" if p.block >= 0 else p.sublayer
    kind = "bias" if len(p.shape) == 1 and p.qkv_parts else "weight"
    fused = len(p.qkv_parts) > 1
    print(f"\nparameter {p.name}  [{shape}]  ({where})")
    if e.loss is not None:
        print(f"  1. the loss is computed by {node_text(e.loss)} from {', '.join(e.loss.inputs)}")
    print(f"  2. backpropagation starts at {node_text(e.loss_gradient)}")
    if fused:
        what = f"fused q/k/v {kind}"
    elif p.qkv_parts:
        what = f"{p.qkv_parts[0].part} projection's {kind}"
    else:
        what, kind = "parameter", "parameter"
    print(f"  3. the gradient of the {what}, `{p.gradient_tensor}`, "
          f"is computed by {node_text(p.gradient_node)}, {p.ops_from_loss} ops from the loss gradient")
    if fused:
        print("  4. q, k and v get their gradients (the parts of the fused projection's output) at:")
    elif p.qkv_parts:
        print(f"  4. {p.qkv_parts[0].part} gets its gradient (the output of its own projection) at:")
    for part in p.qkv_parts:
        print(f"       {part.part}: {node_text(part.gradient_node)} computes `{part.gradient_tensor}` "
              f"(the gradient of `{part.tensor}`)")
    if fused and p.shape and p.shape[0] % len(p.qkv_parts) == 0:
        rows = p.shape[0] // len(p.qkv_parts)
        unit = "rows " if kind == "weight" else ""
        spans = ", ".join(f"{part.part} {unit}[{i * rows}, {(i + 1) * rows})" for i, part in enumerate(p.qkv_parts))
        print(f"     so the fused {kind}'s gradient holds {spans}")
    elif p.qkv_parts:
        print(f"     so the {kind}'s gradient is {p.qkv_parts[0].part}'s alone")
    print(f"\n  path from the loss gradient to the {kind}'s gradient node ({len(p.path)} ops):")
    width = max((len(node.op_type) for node in p.path), default=0)
    parts = {part.gradient_node.name: part.part for part in p.qkv_parts if part.gradient_node is not None}
    for i, node in enumerate(p.path, 1):
        mark = f"  <- {parts[node.name]} gradient" if node.name in parts else ""
        print(f"    {i:>3}  {node.op_type:<{width}}  {node.name}{mark}")


@text.register
def print_attribution(result: Attributed) -> None:
    r = result.result
    weights = f"training weights of step {r.step}" if r.step else f"model version {r.model_version}"
    rows, columns = r.grid
    print(f"{r.method} maps on a {rows}x{columns} grid of {r.patch[0]}x{r.patch[1]}-pixel cells ({weights})")
    for name, a in zip(result.names, r.attributions):
        flat = a.map.reshape(-1)
        top = np.argsort(-flat, kind="stable")[:3]
        cells = ", ".join(f"({i // columns},{i % columns}) {flat[i]:.3g}" for i in top)
        print(f"{name}: class {a.target} ({a.label}); strongest cells (row,col): {cells}")
        if columns <= 16:
            for row in a.map:
                print("    " + " ".join(f"{v:6.3f}" for v in row))
    if result.plot:
        print(f"wrote {result.plot}")
