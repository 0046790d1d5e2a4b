"""The traced FX graph of model/gradgraph.py as a finished ONNX model: translated by torch.onnx, then cleaned up.

model/gradgraph.py traces a Recipe into an FX graph (make_fx) and calls, in this order:

1. `untranslatable`: the first op torch.onnx has no translation for, if any (model/gradgraph_errors.py says
   where it comes from).
2. `exported_program`: the traced graph wrapped as a torch.export.ExportedProgram (frozen parameters and
   buffers as PARAMETER/BUFFER inputs, so torch.onnx makes them initializers under their own names).
3. `to_onnx`: torch.onnx's translator, called directly (the public torch.onnx.export would trace twice more),
   after its type-promotion pass re-run on the changed nodes only (`_insert_type_promotion`).
4. `optimize`: constant folding, dead code, CSE and a few of onnxscript's rewrite rules.
5. `name_io`, `batch_axis_named`: inputs and outputs named as the API says, the batch axis called "batch".
6. `finish`: the vitserve.* node metadata from the FX graph, the IR version onnxruntime loads, a ModelProto.

`onnx_registry` and `quiet` are the torch.onnx pieces the tracing uses too (its decomposition table is built
from the registry; torch.export / torch.onnx / onnxscript log and warn).
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import operator
import warnings

import torch

from model import decompositions as own
from model.errors import ExportError

BATCH = "batch"
MAX_IR_VERSION = 10  # onnxruntime 1.19.2 loads IR <= 10 (and opset <= 21)


# --------------------------------------------------------------------------------------------------
# torch.onnx pieces (private API of the pinned torch; the public torch.onnx.export re-traces twice)
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def onnx_registry():
    from torch.onnx._internal.exporter import _registration

    with quiet():
        return _registration.ONNXRegistry.from_torchlib()


_QUIET_LOGGERS = ("torch", "torch.__trace", "torch.onnx", "torch.fx", "torch.export", "torch._export",
                  "torch._subclasses", "torch._functorch", "torch.utils._sympy", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def quiet():
    """No warnings, log lines or prints from torch.onnx / torch.export / onnxscript."""
    saved = {}
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = logger.level
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


# --------------------------------------------------------------------------------------------------
# FX graph -> ExportedProgram -> ONNX
# --------------------------------------------------------------------------------------------------

def untranslatable(gm) -> tuple[str, torch.fx.Node] | None:
    registry = onnx_registry()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if not registry.is_registered(node.target):
            return str(node.target), node
    return None


def exported_program(gm, model: torch.nn.Module, n_user: int, names: list[str], n_trainable: int, shape_env, symbol):
    """Wrap the traced graph: the first n_user + n_trainable placeholders are graph inputs, the other tensors
    (frozen parameters, buffers) and any constant the trace captured become initializers."""
    from torch.export import graph_signature as gs
    from torch.export.exported_program import ExportedProgram
    from torch.utils._sympy.numbers import int_oo
    from torch.utils._sympy.value_ranges import ValueRanges

    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    state_dict, constants, specs = {}, {}, []
    for i, node in enumerate(placeholders):
        arg = gs.TensorArgument(name=node.name)
        k = i - n_user
        if k < n_trainable:
            specs.append(gs.InputSpec(gs.InputKind.USER_INPUT, arg, target=None))
        elif names[k] in params:
            state_dict[names[k]] = params[names[k]]
            specs.append(gs.InputSpec(gs.InputKind.PARAMETER, arg, target=names[k]))
        else:
            state_dict[names[k]] = buffers[names[k]]
            specs.append(gs.InputSpec(gs.InputKind.BUFFER, arg, target=names[k], persistent=True))
    # Tensors the trace captured as attributes (torch.tensor(...) in a forward, plain tensor attributes):
    # lifted to placeholders, as torch.export does.
    last = placeholders[-1]
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        value = operator.attrgetter(node.target)(gm)
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"the traced graph holds a {type(value).__name__} attribute {node.target}")
        with graph.inserting_after(last):
            lifted = graph.placeholder(node.name + "_const")
        lifted.meta.update(node.meta)
        node.replace_all_uses_with(lifted)
        graph.erase_node(node)
        constants[node.target] = value.detach()
        specs.append(gs.InputSpec(gs.InputKind.CONSTANT_TENSOR, gs.TensorArgument(lifted.name), target=node.target))
        last = lifted
    output = next(n for n in graph.nodes if n.op == "output")
    outs = output.args[0]
    out_specs = [gs.OutputSpec(gs.OutputKind.USER_OUTPUT, gs.TensorArgument(o.name), target=None) for o in outs]
    graph.lint()
    gm.recompile()
    symbols = {s for s in shape_env.replace(symbol).free_symbols}
    ranges = {s: ValueRanges(2, int_oo) for s in symbols}
    return ExportedProgram(root=gm, graph=graph, graph_signature=gs.ExportGraphSignature(specs, out_specs),
                           state_dict=state_dict, range_constraints=ranges, module_call_graph=[],
                           constants=constants)


def to_onnx(ep):
    """torch.onnx's own translation of the program (an onnx_ir.Model), without its torch.export re-trace."""
    from torch.onnx._internal.exporter import _core, _fx_passes

    gm = ep.graph_module
    _insert_type_promotion(gm)
    ep._graph_module = _fx_passes.remove_assertion_nodes(gm)
    return _core._exported_program_to_onnx_program(ep, registry=onnx_registry()).model


def _insert_type_promotion(gm) -> None:
    """torch.onnx's InsertTypePromotion pass (explicit casts where ONNX needs one dtype), re-running only the
    nodes it changes: the stock pass re-executes every node on fake tensors, a quarter of the translation time.
    An unchanged node's value is the one the trace recorded (node.meta["val"])."""
    from torch.onnx._internal.fx.passes import type_promotion

    class Interpreter(type_promotion._TypePromotionInterpreter):
        def run_node(self, n):
            if n.op != "call_function" or "val" not in n.meta:
                return super().run_node(n)
            before = (n.target, n.args, n.kwargs)
            with self._set_current_node(n):
                if rule := type_promotion.get_type_promotion_rule(n, self.type_promotion_table):
                    self._maybe_promote_node(n, rule)
            if (n.target, n.args, n.kwargs) == before:
                return n.meta["val"]
            return torch.fx.Interpreter.run_node(self, n)

    promotion = type_promotion.InsertTypePromotion(gm)
    promotion.interpreter = Interpreter(gm, type_promotion.TypePromotionTable())
    promotion.run()


# --------------------------------------------------------------------------------------------------
# The translated graph, finished
# --------------------------------------------------------------------------------------------------

def optimize(model, state_names: set[str]) -> None:
    """Constant folding, dead code, CSE, plus the few onnxscript rewrite rules that pay off.

    digits, gradient graph (1962 translated nodes), ORT step at batch 64 on 2 cores:
      fold + dead code + CSE                 849 nodes, 0.5 s, 31 ms a step
      + the rules below, one round           724 nodes, 0.8 s, 18 ms (constant Reshape shapes matter)
      onnxscript's optimize_ir (torch.onnx)  661 nodes, 3.7 s, 20-22 ms (its pattern rewriter is the cost)
    Frozen parameters and buffers stay initializers under their own names: nothing that reads one is folded
    (onnxruntime folds those at session start), and initializers are not deduplicated (equal zero biases).
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import _constant_folding
    from onnxscript.rewriter import (RewritePass, _broadcast_to_matmul, _collapse_slices,
                                     _materialize_reshape_shape, _no_op)

    def cleanup():
        return [
            _constant_folding.FoldConstantsPass(
                shape_inference=True, input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT, should_fold=keep_state),
            common.RemoveUnusedNodesPass(),
        ]

    def keep_state(node):
        return False if any(v is not None and v.name in state_names for v in node.inputs) else None

    rules = [*_materialize_reshape_shape.rules, *_no_op.rules, *_broadcast_to_matmul.rules, *_collapse_slices.rules]
    ir.passes.Sequential(
        common.InlinePass(),
        *cleanup(),
        RewritePass(rules),
        *cleanup(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def name_io(model, input_names: list[str], output_names: list[str]) -> None:
    """Graph inputs and outputs named as the API says. An output that is a graph input, an initializer (a
    constant gradient, e.g. zeros for an unused parameter) or another output's value (two parameters with
    one gradient tensor) gets an Identity of its own."""
    import onnx_ir as ir

    graph = model.graph
    if len(graph.inputs) != len(input_names) or len(graph.outputs) != len(output_names):
        raise ExportError(f"internal: the graph has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs, "
                          f"expected {len(input_names)} and {len(output_names)}")
    wanted = set(input_names) | set(output_names)
    clash = sorted(wanted & set(graph.initializers))
    if clash:
        raise ExportError(f"a frozen parameter or buffer is named {clash[0]!r}, a name the graph needs for an input "
                          "or output")
    seen = set()
    for i, value in enumerate(list(graph.outputs)):
        if value.is_graph_input() or value.is_initializer() or id(value) in seen:
            identity = ir.node("Identity", [value])
            graph.append(identity)
            value = graph.outputs[i] = identity.outputs[0]
        seen.add(id(value))
    io = [*graph.inputs, *graph.outputs]
    ids = {id(v) for v in io}
    for node in graph:  # intermediate values that hold a name the inputs and outputs need: renamed out of the way
        for value in node.outputs:
            if id(value) not in ids and value.name in wanted:
                value.name = f"{value.name}__{node.name}"
    for k, value in enumerate(io):  # two steps: a new name may be an old name of another input or output
        value.name = f"__io_{k}"
    for value, name in zip(io, [*input_names, *output_names]):
        value.name = name


def batch_axis_named(model, n_user: int, batch_outputs: tuple[int, ...]) -> None:
    """The symbolic batch dim is called "batch" in the inputs and outputs (the trace calls it s<N>)."""
    import onnx_ir as ir

    graph = model.graph
    symbol = graph.inputs[0].shape[0] if graph.inputs[0].shape is not None else None
    old = symbol.value if isinstance(symbol, ir.SymbolicDim) else None
    batch = ir.SymbolicDim(BATCH)
    for value in list(graph.inputs[:n_user]) + [graph.outputs[i] for i in batch_outputs]:
        if value.shape is not None and len(value.shape) > 0:
            dims = list(value.shape)
            dims[0] = batch
            value.shape = ir.Shape(dims)
    if old is None:
        return
    for value in _all_values(graph):  # intermediate shapes: the same name for the same symbol
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value == old for d in value.shape):
            value.shape = ir.Shape([batch if isinstance(d, ir.SymbolicDim) and d.value == old else d
                                    for d in value.shape])


def _all_values(graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


def _decomposed_ops(fx_gm) -> dict[str, tuple[str, str]]:
    """FX node name -> (op, unit) for the forward ops our own decompositions trace as several nodes (exact GELU):
    `unit` is the op's first FX node, shared by all its nodes, so that ExplainGradients sees one op."""
    found, first = {}, {}
    for node in fx_gm.graph.nodes:
        op = own.OWN_FORWARD_DECOMPOSITIONS.get(str(node.meta.get("original_aten")))
        seq = node.meta.get("seq_nr")
        if op is None or seq is None or node.meta.get("vitserve.phase") != "forward":
            continue
        found[node.name] = (op, first.setdefault((op, seq), node.name))
    return found


def finish(model, fx_gm) -> "onnx.ModelProto":  # noqa: F821
    import onnx_ir as ir

    phases = {n.name: n.meta for n in fx_gm.graph.nodes if n.op == "call_function"}
    decomposed = _decomposed_ops(fx_gm)
    for node in model.graph:
        fx_node = node.metadata_props.get("pkg.torch.onnx.fx_node", "")
        name = fx_node[1:].split(" ", 1)[0] if fx_node.startswith("%") else ""
        if name in phases:
            node.metadata_props["vitserve.fx_node"] = name
            if name in decomposed:
                node.metadata_props["vitserve.op"], node.metadata_props["vitserve.unit"] = decomposed[name]
            meta = phases[name]
            node.metadata_props["vitserve.phase"] = meta.get("vitserve.phase", "forward")
            if "vitserve.differentiates" in meta:
                node.metadata_props["vitserve.differentiates"] = meta["vitserve.differentiates"]
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    proto = ir.serde.serialize_model(model)
    return proto
