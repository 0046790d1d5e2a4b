"""Gradient graphs in plain ONNX, built at export time from PyTorch's own autograd.

Training then runs on the maintained (stock) onnxruntime: `gradient_model.onnx` is an ordinary
inference graph whose outputs are the loss, the logits and one `<parameter>_grad` per trainable
parameter; `forward_model.onnx` is the eval-mode forward graph. Both take the trainable parameters
as graph inputs (named exactly as their PyTorch parameters), so an optimizer outside the graph
owns the weights; frozen parameters and buffers are initializers. What a graph computes is a `Recipe`
(`gradient_recipe`, `FORWARD_RECIPE`; model/attribution.py's attribution graph is a third), built by `graph_of`.

This module holds the recipes, the tracing and the entry points; model/gradgraph_onnx.py turns the traced graph
into the finished ONNX model (steps 2 and 3), model/gradgraph_errors.py words the errors.

How (one trace per graph; torch.onnx.export would trace it twice more, torch.export and run_decompositions):

1. `make_fx` traces `loss, logits, *torch.autograd.grad(loss, params)` of `torch.func.functional_call`
   over fake tensors whose batch axis alone is symbolic (tracing_mode="symbolic" on real tensors makes
   every parameter's shape symbolic too: ~3x the time, in sympy). The decomposition table is the one
   torch.onnx itself applies (every op without an ONNX translation decomposed into ops that have one), plus
   - `aten.convolution_backward` as convolutions (model/decompositions.py, as the next ones): torch.onnx has no
     translation for it (conv patch embeddings, every CNN);
   - `aten.nll_loss_forward` decomposed: torch.onnx's translation fakes its `total_weight` output, so the
     mean's batch size was lost and every gradient came out `batch` times too large;
   - in graphs that differentiate, exact GELU and its backward written over shared pieces, which the trace's
     common-subexpression pass then computes once, and LayerNorm's backward in fewer passes;
   - the safe softmax of F.scaled_dot_product_attention's math backend in fewer full-size passes.
   Attention runs under `sdpa_kernel(SDPBackend.MATH)`: F.scaled_dot_product_attention (timm's fused
   attention, Hugging Face's sdpa) becomes matmul/softmax, whose backward translates (the fused CPU
   kernel's backward does not). A model with in-place ops (`x += ...`, ReLU(inplace=True)) is traced again
   functionalized, below autograd as AOTAutograd does: ONNX has no mutation.
2. The traced graph is wrapped as a torch.export.ExportedProgram (frozen parameters and buffers as
   PARAMETER/BUFFER inputs, so torch.onnx makes them initializers under their own names) and handed to
   torch.onnx's translator directly. The FX node names and metadata are the trace's own: every ONNX node's
   `pkg.torch.onnx.fx_node` / `name_scopes` / `class_hierarchy` describe the traced node it came from
   (`pkg.torch.onnx.stack_trace` is empty: recording Python stack traces doubled the tracing time).
   Before translation, common subexpressions of the traced graph are merged (AOTAutograd's own FX pass):
   the backward's recomputations of forward values become reads of them.
3. Constant folding, dead code, CSE and a few of onnxscript's rewrite rules (`optimize`).

Every node also gets `vitserve.fx_node` (the FX node's name), `vitserve.phase` ("forward" or "backward")
and, on backward nodes, `vitserve.differentiates`: the module path ("" for the model itself) of the
forward op whose gradient formula emitted it (autograd's sequence number, as AOTAutograd records it).
The nodes of a forward op that our own decompositions wrote as several FX nodes (exact GELU) share
`vitserve.unit` (the op's first FX node) and `vitserve.op` (e.g. "gelu", "softmax").

An op with no ONNX translation is an ExportError naming it and the module it serves, e.g. "torch.onnx
cannot translate aten.avg_pool2d_backward.default (needed by the backward of pool (AvgPool2d))".
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from model import decompositions as own
from model.errors import ExportError
from model.gradgraph_errors import describe, first_line, translation_error
from model.gradgraph_onnx import (batch_axis_named, exported_program, finish, name_io, onnx_registry, optimize, quiet,
                                  to_onnx, untranslatable)

GRADIENT_MODEL = "gradient_model.onnx"  # train mode: loss, logits and every trainable parameter's gradient
FORWARD_MODEL = "forward_model.onnx"  # eval mode: logits
IMAGES, LABELS, LOSS, LOGITS = "images", "labels", "loss", "logits"
GRAD_SUFFIX = "_grad"

aten = torch.ops.aten


def merge_common_subexpressions(gm) -> None:
    """AOTAutograd's FX common-subexpression pass, in place: identical ops on identical inputs become one node (the
    first, a forward one, whose metadata it keeps)."""
    from torch._functorch.compile_utils import fx_graph_cse

    gm.graph = fx_graph_cse(gm.graph)
    gm.recompile()


# --------------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _decompositions(differentiates: bool) -> dict:
    """torch.onnx's decomposition table plus ours; `differentiates`: the graph has a backward (GELU's pieces shared
    with it; a forward-only graph keeps torch.onnx's GELU, which onnxruntime fuses into one kernel)."""
    from torch.onnx._internal.exporter import _decomp

    registry = onnx_registry()
    table = _decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(registry)))
    for op in (aten.nll_loss_forward.default, aten.nll_loss2d_forward.default):  # torch.onnx fakes total_weight
        table[op] = torch._decomp.decomposition_table[op]
    table[aten.convolution_backward.default] = own.convolution_backward
    table[aten._safe_softmax.default] = own.safe_softmax
    if differentiates:
        table[aten.gelu.default] = own.gelu
        table[aten.gelu_backward.default] = own.gelu_backward
        table[aten.native_layer_norm_backward.default] = own.native_layer_norm_backward
    return table


def logits_of(output):
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):  # transformers' ImageClassifierOutput (export.construct adds a hook for it)
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ExportError(f"{type(output).__name__} is not a logits tensor")


@dataclass(frozen=True)
class Recipe:
    """What one traced graph computes, from the images, `extra` per-image inputs and the model's tensors.

    step(forward, x, *extra, trainable=...) returns the graph's outputs; forward(x) is the model's logits at the
    traced tensors, `trainable` the trainable parameters' tensors (what autograd differentiates). With `seed`, the
    step's first output is the scalar backpropagation starts from (the loss): everything traced after it is the
    backward; `drop_seed` leaves it out of the ONNX graph's outputs.
    """
    what: str  # "gradient graph", in messages
    step: Callable
    outputs: tuple[str, ...]  # the ONNX graph's output names (the seed not included when dropped)
    extra: tuple[tuple[str, torch.dtype], ...] = ()  # per-image inputs after the images, shape (batch,)
    grad: bool = False  # autograd on while tracing
    images_grad: bool = False  # the images require grad
    params_grad: bool = False  # the trainable parameters require grad
    seed: bool = False
    drop_seed: bool = False
    batch_outputs: tuple[int, ...] = (0,)  # outputs (ONNX indices) whose first axis is the batch
    module_stack: bool = True  # record each node's module (node names, ExplainGradients); a third of the tracing


def mark_backward(seed: torch.Tensor) -> None:
    """Backward ops traced from `seed` get the seq_nr of the forward op they differentiate (node.meta["seq_nr"]), as
    in AOTAutograd: call it before torch.autograd.grad inside a recipe's step."""
    from torch._functorch._aot_autograd.logging_utils import setup_stacktrace_preservation_hooks

    setup_stacktrace_preservation_hooks([seed.grad_fn])


def _train_step(forward, x, y, trainable):
    logits = forward(x)
    loss = F.cross_entropy(logits, y)
    mark_backward(loss)
    grads = torch.autograd.grad(loss, trainable, allow_unused=True, materialize_grads=True)
    return (loss, logits, *grads)


def _eval_step(forward, x, trainable):
    return (forward(x),)


def gradient_recipe(trainable: list[str]) -> Recipe:
    return Recipe("gradient graph", _train_step, (LOSS, LOGITS, *(n + GRAD_SUFFIX for n in trainable)),
                  extra=((LABELS, torch.int64),), grad=True, params_grad=True, seed=True, batch_outputs=(1,))


FORWARD_RECIPE = Recipe("forward graph", _eval_step, (LOGITS,))


def _trace(model: torch.nn.Module, example: torch.Tensor, names: list[str], n_trainable: int, recipe: Recipe,
           functionalize: bool = False):
    """(the traced FX graph, its shape environment, the batch symbol). Inputs: images, the recipe's extra inputs,
    then the tensors `names`. functionalize=True turns in-place ops into out-of-place ones (it doubles the tracing
    time)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx import traceback as fx_traceback
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    tensors = [state[n].detach() for n in names]
    n_extra = len(recipe.extra)

    def step(x, *rest):
        extra, ts = rest[:n_extra], rest[n_extra:]

        def forward(images):
            return logits_of(torch.func.functional_call(model, dict(zip(names, ts)), (images,), strict=False))

        return recipe.step(forward, x, *extra, trainable=ts[:n_trainable])

    def stop_at_mutation(step):
        def run(*inputs):
            with _StopAtMutation():
                return step(*inputs)

        return run

    def functional(step):
        """`step` functionalized below autograd, as AOTAutograd does: in-place ops (vit-pytorch's
        `x += pos_embedding`, ReLU(inplace=True)) become out-of-place ones."""
        from torch._functorch._aot_autograd.functional_utils import from_fun, to_fun
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        def run(*inputs):
            with FunctionalTensorMode():
                outputs = step(*[to_fun(t) for t in inputs])
                return tuple(from_fun(o) for o in outputs)

        return run

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())

    def fake(t: torch.Tensor, dynamic_batch: bool, requires_grad: bool = False):
        sizes = [DimDynamic.DYNAMIC if dynamic_batch and i == 0 else DimDynamic.STATIC for i in range(t.dim())]
        return fake_mode.from_tensor(t.requires_grad_(requires_grad),
                                     symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    batch = max(2, int(example.shape[0]))  # 0 and 1 would be specialized
    x = fake(torch.zeros((batch, *example.shape[1:]), dtype=torch.float32), True, recipe.images_grad)
    args = [x, *(fake(torch.zeros(batch, dtype=dtype), True) for _, dtype in recipe.extra)]
    args += [fake(t.detach(), False, requires_grad=recipe.params_grad and i < n_trainable and t.is_floating_point())
             for i, t in enumerate(tensors)]
    fn = functional(step) if functionalize else stop_at_mutation(step)
    fn._orig_mod = model  # make_fx's module-stack tracer records nn_module_stack against it
    grad_mode = contextlib.nullcontext() if recipe.grad else torch.no_grad()
    # Python stack traces per node (node.meta["stack_trace"]) would double the tracing time: not recorded
    stack_traces, torch.fx.config.do_not_emit_stack_traces = torch.fx.config.do_not_emit_stack_traces, True
    try:
        with sdpa_kernel(SDPBackend.MATH), grad_mode, fx_traceback.preserve_node_meta():
            gm = make_fx(fn, decomposition_table=_decompositions(recipe.grad), tracing_mode="symbolic",
                         record_module_stack=recipe.module_stack)(*args)
    finally:
        torch.fx.config.do_not_emit_stack_traces = stack_traces
    symbol = x.shape[0].node.expr
    return gm, fake_mode.shape_env, symbol


class _Mutation(Exception):
    pass


class _StopAtMutation(TorchDispatchMode):
    """Stops a plain trace at its first in-place op (copy_, add_, relu_, ...), which ONNX cannot express."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.is_mutable:
            raise _Mutation(str(func))
        return func(*args, **(kwargs or {}))


def _traced(model, example, names, n_trainable, recipe: Recipe, mutates: list[bool]):
    """_trace, functionalized only when the model mutates a tensor (functionalization doubles the tracing time).
    mutates: [whether it does], learnt by the first graph's trace and reused by the second's."""
    if not mutates[0]:
        try:
            return _trace(model, example, names, n_trainable, recipe)
        except _Mutation:
            mutates[0] = True
    return _trace(model, example, names, n_trainable, recipe, functionalize=True)


def _check_batch_stays_dynamic(gm, shape_env, symbol) -> None:
    resolved = shape_env.replace(symbol)
    if not resolved.free_symbols:
        raise ExportError(f"the model's forward fixes the batch size to {resolved} (it must work for any batch)")


def _phase_metadata(gm, seed: bool) -> None:
    """vitserve.phase / vitserve.differentiates on every FX node (they become ONNX node metadata).

    make_fx records ops in execution order: the forward up to the seed (the loss, the first output), then
    autograd's backward. A backward op carries the seq_nr of the forward op whose gradient formula emitted it
    (torch.fx.traceback).
    """
    output = next(n for n in gm.graph.nodes if n.op == "output")
    loss = output.args[0][0] if seed else None
    module_of_seq, backward = {}, False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            backward = backward or node is loss
            continue
        seq = node.meta.get("seq_nr")
        if not backward:
            node.meta["vitserve.phase"] = "forward"
            stack = node.meta.get("nn_module_stack") or {}
            if stack and seq is not None:  # the first node of a seq_nr is the op that created that autograd node
                module_of_seq.setdefault(seq, list(stack.values())[-1][0])
        else:
            node.meta["vitserve.phase"] = "backward"
            if seq in module_of_seq:
                node.meta["vitserve.differentiates"] = module_of_seq[seq]
        backward = backward or node is loss


# --------------------------------------------------------------------------------------------------
# One graph: traced here, translated and finished by model/gradgraph_onnx.py
# --------------------------------------------------------------------------------------------------

def graph_of(model: torch.nn.Module, example: torch.Tensor, trainable: list[str], recipe: Recipe,
             mutates: list[bool]) -> "onnx.ModelProto":  # noqa: F821
    """One ONNX graph (ModelProto) of `recipe`: inputs the images, the recipe's extra inputs and the trainable
    parameters (named as in PyTorch); frozen parameters and buffers are initializers. mutates: [whether the model
    mutates a tensor], learnt by a first trace and reused by the next (see _traced)."""
    params = [n for n, _ in model.named_parameters()]
    frozen = [n for n in params if n not in set(trainable)]
    names = trainable + frozen + [n for n, _ in model.named_buffers()]
    n_user = 1 + len(recipe.extra)
    what = f"{recipe.what} of {type(model).__name__}"
    with quiet():
        try:
            gm, shape_env, symbol = _traced(model, example, names, len(trainable), recipe, mutates)
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001 - a model the tracer cannot follow: one line
            raise ExportError(f"cannot trace the {what}: {first_line(e)}") from None
        try:
            _check_batch_stays_dynamic(gm, shape_env, symbol)
            _phase_metadata(gm, recipe.seed)
            merge_common_subexpressions(gm)
            missing = untranslatable(gm)
            if missing:
                op, node = missing
                raise ExportError(f"torch.onnx cannot translate {op} ({describe(node, model)})")
            ep = exported_program(gm, model, n_user, names, len(trainable), shape_env, symbol)
            try:
                onnx_model = to_onnx(ep)
            except Exception as e:  # noqa: BLE001
                raise ExportError(translation_error(e, gm, model, what)) from None
            if recipe.drop_seed:
                onnx_model.graph.outputs.pop(0)
            optimize(onnx_model, set(names[len(trainable):]))
            name_io(onnx_model, [IMAGES, *(name for name, _ in recipe.extra), *trainable], list(recipe.outputs))
            batch_axis_named(onnx_model, n_user, recipe.batch_outputs)
            return finish(onnx_model, gm)
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"cannot build the {what}: {first_line(e)}") from None


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

def check_trainable(model: torch.nn.Module, example: torch.Tensor, trainable: list[str]) -> None:
    """ExportError unless `trainable` names distinct floating-point parameters of `model` and `example` is batched."""
    params = dict(model.named_parameters())
    unknown = [n for n in trainable if n not in params]
    if unknown:
        raise ExportError(f"not parameters of the model: {unknown[:5]}")
    if not trainable:
        raise ExportError("no trainable parameters: nothing to differentiate")
    if len(set(trainable)) != len(trainable):
        raise ExportError("trainable parameters listed twice")
    non_float = [n for n in trainable if not params[n].is_floating_point()]
    if non_float:
        raise ExportError(f"trainable parameters must be floating point: {non_float[:5]}")
    if example.dim() < 2:
        raise ExportError(f"the example input needs a batch axis, got shape {tuple(example.shape)}")


def export_gradient_graphs(model: torch.nn.Module, example: torch.Tensor, trainable: list[str], folder: Path) -> None:
    """Write folder/gradient_model.onnx (train mode) and folder/forward_model.onnx (eval mode).

    gradient_model.onnx: inputs images (batch, c, h, w) float32, labels (batch,) int64, then every parameter
    of `trainable` (in that order, named as in PyTorch); outputs loss (mean cross-entropy), logits, then
    `<name>_grad` per trainable parameter. forward_model.onnx: inputs images then the trainable parameters;
    output logits. Frozen parameters and buffers are initializers. The weights of `model` are not changed.
    Raises ExportError (one line) when a graph cannot be built.
    """
    from model import verify  # lazily: verify imports the engines, which may import this module

    folder = Path(folder)
    check_trainable(model, example, trainable)
    folder.mkdir(parents=True, exist_ok=True)
    import onnx

    mutates = [False]
    verify.train_mode(model)
    gradient = graph_of(model, example, list(trainable), gradient_recipe(list(trainable)), mutates)
    model.eval()
    forward = graph_of(model, example, list(trainable), FORWARD_RECIPE, mutates)
    onnx.save(gradient, folder / GRADIENT_MODEL)
    onnx.save(forward, folder / FORWARD_MODEL)
