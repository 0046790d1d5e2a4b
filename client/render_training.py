"""The text and JSON documents of the CLI's training commands: train-step (its steps, gradient summaries, q/k/v
gradients and head importance), grads, heads, history and fit (and fit's line per epoch as it finishes).

Their result objects are defined here, beside the `document` cases and print_* functions this module registers
with client/render.py's dispatch; eval-step's EvalResult, a wire record, prints in client/render.py.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client import GradientHistory, HeadImportanceResult, HeadScores, TrainStepResult
from client.render import document, print_published, print_skipped, print_table, text

if TYPE_CHECKING:
    from client.fit import FitResult


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


@document.register
def _(result: TrainSteps) -> Any:
    steps = [step.as_dict() for step in result.steps]
    return steps[0] if len(steps) == 1 else steps


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


# ---------------------------------------------------------------- train-step, grads

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
def print_gradient_plot(result: GradientPlot) -> None:
    print_step(result.step)
    print(f"wrote {result.plot}")


# ---------------------------------------------------------------- heads, history

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


# ---------------------------------------------------------------- fit

def print_epoch(e: dict) -> None:
    """One finished epoch of a fit, as it finishes."""
    print(f"epoch {e['epoch']}  step {e['step']}  loss {e['train_loss']:.4f}  val loss {e['val_loss']:.4f}  "
          f"val acc {e['val_accuracy'] * 100:.1f}%  {e['images_per_s']:.0f} img/s" + ("  best" if e["best"] else ""),
          flush=True)


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
