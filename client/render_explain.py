"""The text and JSON documents of explain (where the loss and each parameter's gradient are computed in the
training graph, and the picture of a parameter's backward path) and of attribute (the attribution maps of images
and their overlay).

Their result objects are defined here, beside the `document` cases and print_* functions this module registers
with client/render.py's dispatch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client import AttributeResult, Explanation, GraphNode, ParameterGradientPath
from client.render import document, print_table, text

if TYPE_CHECKING:
    from client.graphs import PathPicture


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


@document.register
def _(result: Explained) -> Any:
    doc = result.explanation.as_dict()
    if result.picture is not None:
        doc.update(plot=str(result.picture.path), renderer=result.picture.renderer, plotted_nodes=result.picture.nodes)
    return doc


@document.register
def _(result: Attributed) -> Any:
    return {**result.result.as_dict(), "images": result.names, **({"plot": str(result.plot)} if result.plot else {})}


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
