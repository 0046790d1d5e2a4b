"""The attribution graph: which patches a prediction comes from, in plain ONNX ops built from PyTorch's autograd.

`write_attribution_graph` writes attribution_model.onnx next to the gradient graph and returns the manifest's
`Attribution` record. The graph (model/gradgraph.py's tracing and decompositions, model/gradgraph_onnx.py's
translation, eval mode):

    inputs   images (batch, c, h, w) float32, target (batch,) int64, then the trainable parameters by name
             (frozen parameters and buffers are initializers, as in gradient_model.onnx)
    outputs  logits; attention_<l> (batch, heads, tokens, tokens), block l's attention probabilities;
             attention_<l>_grad, the gradient of s = sum over the batch of logits[i, target[i]] with respect to it;
             images_grad, the gradient of s with respect to the images

Images are independent of each other, so each image's rows of a gradient are that image's own target logit's.

A_l is the output of the softmax inside each attention module the export places (model/layout.py), caught below
autograd (a TorchDispatchMode) while the module runs, so it is the tensor the module goes on to use, whatever calls
the softmax: nn.Softmax, Tensor.softmax, F.softmax, or F.scaled_dot_product_attention traced on its math backend (as
gradgraph.py traces it: timm's fused attention, Hugging Face's sdpa, nn.MultiheadAttention without weights).

How its maps are read comes from the model itself, measured once in PyTorch (`token_layout`): the token count and
heads from A_l; the patch grid from the image size and the token count, confirmed by perturbing single patches and
seeing exactly their token change at the first attention module's input; the readout from the gradient of the
logits with respect to the last attention module's output: one token (a class token) or a run of tokens (pooling
over them, read as their mean). A model without attention, or whose maps cannot be read, gets the input gradient
only (blocks 0 or a reason), summed over a grid of at most 8 x 8 cells.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import onnx
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from engine.graph.attribution import INPUT_GRAD, LOGITS, TARGET, attention_grad_name, attention_name
from engine.manifest import ATTRIBUTION_MODEL, Attribution, QkvLayout
from model import gradgraph
from model.errors import ExportError

aten = torch.ops.aten
SOFTMAXES = (aten._softmax.default, aten._safe_softmax.default)  # what every softmax reaches below autograd
MAX_EXTRA_TOKENS = 16  # class, distillation and register tokens: more than this and the grid guess is not trusted
MAX_CELLS = 8  # input x gradient of a model without a patch grid: at most 8 x 8 cells


class _Capture(TorchDispatchMode):
    """The softmax outputs computed inside each of the modules `paths`, in call order, while active."""

    def __init__(self, model: torch.nn.Module, paths: list[str]):
        super().__init__()
        self._stack: list[str] = []
        self.found: list[tuple[str, torch.Tensor]] = []
        self._hooks = []
        for path in paths:
            module = model.get_submodule(path)
            self._hooks.append(module.register_forward_pre_hook(lambda _m, _a, p=path: self._stack.append(p)))
            self._hooks.append(module.register_forward_hook(lambda _m, _a, _o: self._stack.pop() and None))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._stack and func in SOFTMAXES:
            self.found.append((self._stack[-1], out))
        return out

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def probabilities(self, paths: list[str]) -> list[torch.Tensor]:
        """One (batch, heads, tokens, tokens) softmax per module, in the order of `paths`; ValueError otherwise."""
        by_path = {p: [t for q, t in self.found if q == p] for p in paths}
        for path, tensors in by_path.items():
            if len(tensors) != 1:
                raise ValueError(f"attention module {path} computed {len(tensors)} softmaxes, not one")
            shape = tuple(tensors[0].shape)
            if len(shape) != 4 or shape[2] != shape[3]:
                raise ValueError(f"attention module {path}'s softmax is {list(shape)}, not (batch, heads, tokens, "
                                 "tokens)")
        return [by_path[p][0] for p in paths]


@contextlib.contextmanager
def captured(model: torch.nn.Module, paths: list[str]):
    """Inside: every softmax of the attention modules `paths` is recorded (`.probabilities(paths)`)."""
    capture = _Capture(model, paths)
    try:
        with capture:
            yield capture
    finally:
        capture.remove()


def target_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of logits[i, target[i]], by a one-hot mask (its gradient is the mask: plain ONNX ops)."""
    classes = torch.arange(logits.shape[1], device=logits.device)
    return (logits * (classes.unsqueeze(0) == target.unsqueeze(1)).to(logits.dtype)).sum()


def attribution_recipe(model: torch.nn.Module, paths: list[str]) -> gradgraph.Recipe:
    def step(forward, x, target, trainable):
        with captured(model, paths) as capture:
            logits = forward(x)
        try:
            probabilities = capture.probabilities(paths)
        except ValueError as e:
            raise ExportError(f"attribution graph: {e}") from None
        score = target_score(logits, target)
        gradgraph.mark_backward(score)
        grads = torch.autograd.grad(score, [*probabilities, x])
        return (score, logits, *probabilities, *grads)

    outputs = (LOGITS, *(attention_name(i) for i in range(len(paths))),
               *(attention_grad_name(i) for i in range(len(paths))), INPUT_GRAD)
    return gradgraph.Recipe("attribution graph", step, outputs, extra=((TARGET, torch.int64),), grad=True,
                            images_grad=True, seed=True, drop_seed=True, batch_outputs=tuple(range(len(outputs))),
                            module_stack=False)


# --------------------------------------------------------------------------------------------------
# How the maps are read, measured on the model
# --------------------------------------------------------------------------------------------------

def _cells(size: int) -> int:
    return max(d for d in range(1, MAX_CELLS + 1) if size % d == 0)


def _input_only(height: int, width: int, reason: str, blocks: int = 0, heads=(), tokens: int = 0) -> Attribution:
    grid = (_cells(height), _cells(width))
    return Attribution(blocks=blocks, heads=tuple(heads), tokens=tokens, grid=grid,
                       patch=(height // grid[0], width // grid[1]), reason=reason)


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    if isinstance(value, dict):
        return next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
    return None


def _tokens_first(t: torch.Tensor, batch: int, tokens: int) -> torch.Tensor | None:
    """(batch, tokens, dim) from a module's input or output, batch-first or sequence-first."""
    if t is None or t.dim() != 3:
        return None
    if tuple(t.shape[:2]) == (batch, tokens):
        return t
    if tuple(t.shape[:2]) == (tokens, batch):
        return t.transpose(0, 1)
    return None


class _Stop(Exception):
    pass


def _first_block_input(model, paths: list[str], images: torch.Tensor) -> torch.Tensor | None:
    """The first attention module's input (its first tensor argument), the forward stopped there."""
    seen = []

    def grab(_module, args, kwargs):
        seen.append(_first_tensor(args) if _first_tensor(args) is not None else _first_tensor(kwargs))
        raise _Stop

    hook = model.get_submodule(paths[0]).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # grad on: nn.MultiheadAttention's fast path is off
            model(images.detach().requires_grad_(True))
    except _Stop:
        pass
    finally:
        hook.remove()
    return seen[0].detach() if seen and seen[0] is not None else None


def _grids(height: int, width: int, tokens: int):
    """(grid, patch) candidates whose patch count leaves at most MAX_EXTRA_TOKENS other tokens, fewest first."""
    found = []
    for ph in (d for d in range(1, height + 1) if height % d == 0):
        for pw in (d for d in range(1, width + 1) if width % d == 0):
            count = (height // ph) * (width // pw)
            if count <= tokens and tokens - count <= MAX_EXTRA_TOKENS:
                found.append((tokens - count, ph != pw, (height // ph, width // pw), (ph, pw)))
    return [(grid, patch) for *_, grid, patch in sorted(found)]


def _patch_start(model, paths, example, tokens: int, grid, patch) -> int | None:
    """The index of the first patch token when perturbing a patch changes exactly its own token (patches row by row
    after it) at the first attention module's input, for the corner patches and their neighbours; else None."""
    (gh, gw), (ph, pw) = grid, patch
    cells = sorted({0, 1 % (gh * gw), gw % (gh * gw), gh * gw - 1})
    base = example[:1]
    images = [base]
    generator = torch.Generator().manual_seed(0)
    for cell in cells:
        r, c = divmod(cell, gw)
        image = base.clone()
        image[..., r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] += torch.randn(
            image[..., r * ph:(r + 1) * ph, c * pw:(c + 1) * pw].shape, generator=generator)
        images.append(image)
    features = _tokens_first(_first_block_input(model, paths, torch.cat(images)), len(images), tokens)
    if features is None:
        return None
    changed = (features[1:] - features[:1]).abs().amax(dim=-1)  # (cells, tokens)
    start = None
    for cell, row in zip(cells, changed):
        moved = (row > 1e-6 * max(float(row.max()), 1e-30)).nonzero().flatten().tolist()
        if len(moved) != 1:
            return None
        start = moved[0] - cell if start is None else start
        if moved[0] != start + cell:
            return None
    return start if 0 <= start <= tokens - gh * gw else None


def _readout(model, paths: list[str], example: torch.Tensor, tokens: int) -> tuple[str, tuple[int, int]] | str:
    """The tokens of the last attention module's output the logits depend on: ("cls", (i, i + 1)) for one token (a
    class token), ("mean", (s, e)) for a run of tokens s..e-1 (mean pooling, whose maps average the run's rows),
    else the reason the maps cannot be read."""
    outputs = []
    hook = model.get_submodule(paths[-1]).register_forward_hook(lambda _m, _a, out: outputs.append(_first_tensor(out)))
    try:
        x = example[:2].detach().clone().requires_grad_(True)  # grad on: nn.MultiheadAttention's fast path is off
        with sdpa_kernel(SDPBackend.MATH):
            logits = gradgraph.logits_of(model(x))
    finally:
        hook.remove()
    if _tokens_first(outputs[0] if outputs else None, x.shape[0], tokens) is None:
        return "the last attention module's output is not (batch, tokens, dim)"
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    grad = torch.autograd.grad((logits * weights).sum(), outputs[0])[0]
    norms = _tokens_first(grad, x.shape[0], tokens).norm(dim=-1).amax(dim=0)  # (tokens,), over both images
    read = (norms > 1e-6 * float(norms.max())).nonzero().flatten().tolist()
    if len(read) == 1:
        return "cls", (read[0], read[0] + 1)
    if read and read == list(range(read[0], read[-1] + 1)):
        return "mean", (read[0], read[-1] + 1)
    return f"the classifier reads tokens {read[:8]}, neither one class token nor a run of tokens it pools"


def token_layout(model: torch.nn.Module, example: torch.Tensor, attention: tuple[QkvLayout, ...]) -> Attribution:
    """The `Attribution` record of `model` (in eval mode) with the attention modules `attention`."""
    height, width = int(example.shape[-2]), int(example.shape[-1])
    paths = [a.module for a in attention if a.module]
    if not attention:
        return _input_only(height, width, "the model has no attention modules")
    if len(paths) != len(attention):
        return _input_only(height, width, "its attention modules have no module paths")
    x = example[:2].detach().clone().requires_grad_(True)
    try:
        with captured(model, paths) as capture, sdpa_kernel(SDPBackend.MATH):
            model(x)
        probabilities = capture.probabilities(paths)
    except ValueError as e:
        return _input_only(height, width, f"its attention probabilities cannot be read: {e}")
    heads = tuple(int(p.shape[1]) for p in probabilities)
    tokens = {int(p.shape[-1]) for p in probabilities}
    if len(tokens) != 1:
        return _input_only(height, width, "its attention blocks see different token counts", len(paths), heads)
    tokens = tokens.pop()
    found = next(((grid, patch, start) for grid, patch in _grids(height, width, tokens)
                  if (start := _patch_start(model, paths, example, tokens, grid, patch)) is not None), None)
    if found is None:
        return _input_only(height, width, "its tokens do not map one to one onto image patches", len(paths), heads,
                           tokens)
    grid, patch, start = found
    readout = _readout(model, paths, example, tokens)
    if isinstance(readout, str):
        return dataclasses.replace(_input_only(height, width, readout, len(paths), heads, tokens), grid=grid,
                                   patch=patch, patch_tokens=start)
    pooling, rows = readout
    extra = tuple(i for i in range(tokens) if not start <= i < start + grid[0] * grid[1])
    return Attribution(blocks=len(paths), heads=heads, tokens=tokens, pooling=pooling, readout=rows,
                       cls_token=rows[0] if pooling == "cls" else -1, patch_tokens=start, extra_tokens=extra,
                       grid=grid, patch=patch)


def write_attribution_graph(model: torch.nn.Module, example: torch.Tensor, trainable: list[str], folder: Path,
                            attention: tuple[QkvLayout, ...]) -> Attribution:
    """Write folder/attribution_model.onnx (eval mode; the module docstring says what it computes) and return the
    record of how its maps are read. `attention`: the attention modules the export placed (model/layout.py), in
    block order. The model is left in eval mode, its weights unchanged. ExportError (one line) when the graph
    cannot be built."""
    gradgraph.check_trainable(model, example, trainable)
    model.eval()
    record = token_layout(model, example, attention)
    paths = [a.module for a in attention] if record.blocks else []
    graph = gradgraph.graph_of(model, example, list(trainable), attribution_recipe(model, paths), [False])
    onnx.save(graph, Path(folder) / ATTRIBUTION_MODEL)
    return record
