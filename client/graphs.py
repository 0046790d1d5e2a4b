"""The backward path of one parameter's gradient as a picture (explain --parameter NAME --plot FILE).

The picture is ExplainGradients' answer drawn as a vertical chain: the loss node (forward), then every op of
ParameterGradientPath.path from the loss gradient node, where backpropagation starts, down to the node that
computes the parameter's gradient, then the gradient tensor itself. Each box names the node and its op type.
The q, k and v branches (qkv_parts) are marked in their colours: a part whose gradient node lies on the path
is that box; a part whose gradient node lies off it is a box of its own beside the path, with a dashed edge to
the path node where its branch joins (the first node after the on-path part that takes a gradient from off
the path, e.g. the Sum that assembles a fused projection's output gradient), since the ops in between are not
in the answer.

Graphviz's `dot` draws it when it is on PATH (the DOT text is written here and piped to `dot -Tpng` or
`-Tsvg`: no Python binding), else matplotlib draws the same chain of boxes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from client import Explanation, GraphNode, ParameterGradientPath, QkvPartGradient
from client.plots import PART_COLOURS, picture_suffix, save

PART_FILL = {"q": "#c6dbef", "k": "#fdd0a2", "v": "#c7e9c0"}
LOSS_FILL, START_FILL, GRADIENT_FILL, NODE_FILL = "#e0e0e0", "#fcbba1", "#fff2ae", "#f7f7f7"
OFF_PATH = "via ops off this path"
DOT_TIMEOUT = 120.0  # seconds for `dot` to lay the picture out


@dataclass
class Branch:
    """Where one q/k/v part's gradient node sits: on the path (its index) or beside it, joining at `joins`."""
    part: QkvPartGradient
    on_path: int | None
    joins: int | None  # index into the path of the node its branch joins (off-path parts only)


@dataclass
class PathPicture:
    """The picture written: its file, what drew it ("graphviz" or "matplotlib") and the node names it shows."""
    path: Path
    renderer: str
    nodes: list[str]


def branches(p: ParameterGradientPath) -> list[Branch]:
    """The q/k/v parts of `p`, each placed on the path or beside it with the path node its branch joins."""
    names = [node.name for node in p.path]
    placed = [(part, names.index(part.gradient_node.name) if part.gradient_node and part.gradient_node.name in names
               else None) for part in p.qkv_parts]
    after = max((i for _, i in placed if i is not None), default=-1)
    out = []
    for part, index in placed:
        joins = None if index is not None else _join(p.path, part, after)
        out.append(Branch(part, index, joins))
    return out


def _join(path: list[GraphNode], part: QkvPartGradient, after: int) -> int | None:
    """The path node an off-path part's gradient flows into: the one that reads its gradient tensor, else the
    first after index `after` that takes a gradient its predecessor on the path did not produce, else the last."""
    for i, node in enumerate(path):
        if part.gradient_tensor in node.inputs:
            return i
    for i in range(max(after, 0) + 1, len(path)):
        produced = set(path[i - 1].outputs)
        if any("_grad" in name and name not in produced for name in path[i].inputs):
            return i
    return len(path) - 1 if path else None


def shape_text(p: ParameterGradientPath) -> str:
    return "x".join(map(str, p.shape)) or "scalar"


def title(p: ParameterGradientPath) -> str:
    where = f"block {p.block}, {p.sublayer}" if p.block >= 0 else p.sublayer
    return (f"How {p.name} [{shape_text(p)}] ({where}) gets its gradient: "
            f"{p.ops_from_loss} ops from the loss gradient")


def part_label(part: QkvPartGradient) -> str:
    return f"{part.part} gradient ({part.gradient_tensor})"


def node_names(e: Explanation, p: ParameterGradientPath) -> list[str]:
    """Every node the picture names, loss first."""
    names = [e.loss.name] if e.loss is not None else []
    names += [node.name for node in p.path]
    if p.gradient_node is not None and p.gradient_node.name not in names:
        names.append(p.gradient_node.name)
    names += [b.part.gradient_node.name for b in branches(p) if b.on_path is None and b.part.gradient_node]
    return names


# ---------------------------------------------------------------- graphviz

def _quoted(text: str) -> str:
    """A DOT string literal: backslashes and quotes escaped, lines joined by DOT's centred line break."""
    lines = text.split("\n")
    return '"' + "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in lines) + '"'


def gradient_path_dot(e: Explanation, p: ParameterGradientPath) -> str:
    """The DOT text of the picture: one node per graph node named, edges along the path, q/k/v in colour."""
    on_path = {b.on_path: b.part for b in branches(p) if b.on_path is not None}
    lines = ["digraph gradient_path {",
             (f"  graph [rankdir=TB, labelloc=t, fontname=Helvetica, fontsize=14, nodesep=0.35, ranksep=0.22, "
              f"label={_quoted(title(p))}];"),
             f'  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=10, fillcolor="{NODE_FILL}"];',
             "  edge [arrowsize=0.7, fontname=Helvetica, fontsize=9];"]
    if e.loss is not None:
        loss_text = f"the loss (forward): {e.loss.op_type}\n{e.loss.name}"
        lines.append(f'  loss [label={_quoted(loss_text)}, fillcolor="{LOSS_FILL}"];')
    for i, node in enumerate(p.path):
        text = f"{i + 1}. {node.op_type}\n{node.name}"
        fill, extra = NODE_FILL, ""
        if i == 0:
            text += "\nbackpropagation starts here"
            fill = START_FILL
        if i in on_path:
            part = on_path[i]
            text = f"{part_label(part)}\n{text}"
            fill = PART_FILL.get(part.part, NODE_FILL)
            extra = f', color="{PART_COLOURS.get(part.part, "black")}", penwidth=2.5'
        if i == len(p.path) - 1:
            text += "\ncomputes the parameter's gradient"
            fill = GRADIENT_FILL if i not in on_path else fill
        lines.append(f'  n{i} [label={_quoted(text)}, fillcolor="{fill}"{extra}];')
    grad_text = f"{p.gradient_tensor}\n[{shape_text(p)}]"
    lines.append(f'  grad [shape=ellipse, label={_quoted(grad_text)}, fillcolor="{GRADIENT_FILL}"];')
    if e.loss is not None and p.path:
        lines.append('  loss -> n0 [style=dashed, label=" dL/dL = 1"];')
    lines += [f"  n{i} -> n{i + 1};" for i in range(len(p.path) - 1)]
    if p.path:
        lines.append(f"  n{len(p.path) - 1} -> grad [penwidth=1.5];")
    for j, b in enumerate(b for b in branches(p) if b.on_path is None):
        node = b.part.gradient_node
        colour = PART_COLOURS.get(b.part.part, "black")
        text = part_label(b.part) + (f"\n{node.op_type}\n{node.name}" if node else "\n(node not reported)")
        lines.append(f'  part{j} [label={_quoted(text)}, fillcolor="{PART_FILL.get(b.part.part, NODE_FILL)}", '
                     f'color="{colour}", penwidth=2.5];')
        if b.joins is not None:
            lines.append(f'  part{j} -> n{b.joins} [style=dashed, color="{colour}", label={_quoted(" " + OFF_PATH)}, '
                         f'fontcolor="{colour}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_dot(source: str, path: Path, dot: str) -> None:
    """Run graphviz's `dot` on `source`, writing `path` in its suffix's format."""
    fmt = picture_suffix(path)[1:]
    try:
        done = subprocess.run([dot, f"-T{fmt}", "-o", str(path)], input=source, text=True, capture_output=True,
                              timeout=DOT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise ValueError(f"graphviz dot took over {DOT_TIMEOUT:g} s to draw {path}") from None
    if done.returncode != 0:
        message = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise ValueError(f"graphviz dot could not draw {path}: {message}")


# ---------------------------------------------------------------- matplotlib

ROW = 0.62  # inches per box of the chain


def gradient_path_figure(e: Explanation, p: ParameterGradientPath) -> Figure:
    """The same picture without graphviz: the chain as boxes top to bottom, the off-path q/k/v parts beside it."""
    rows = len(p.path) + 2  # the loss, the path, the gradient tensor
    fig = Figure(figsize=(14, ROW * rows + 1.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - 0.7 / (ROW * rows + 1.2)))
    ax.set_xlim(0, 1)
    ax.set_ylim(-rows + 0.5, 0.5)
    ax.axis("off")
    fig.suptitle(title(p), fontsize=11, y=1.0 - 0.25 / (ROW * rows + 1.2), va="top")
    style = dict(ha="center", va="center", fontsize=7.5, family="monospace")
    x = 0.33

    def box(xy: tuple[float, float], text: str, fill: str, edge: str = "#555555", width: float = 1.0):
        return ax.text(*xy, text, **style, bbox=dict(boxstyle="round,pad=0.4", facecolor=fill, edgecolor=edge,
                                                       linewidth=width))

    def arrow(upper, lower):
        ax.annotate("", xy=(0.5, 1.0), xycoords=lower, xytext=(0.5, 0.0), textcoords=upper,
                    arrowprops=dict(arrowstyle="-|>", color="#333333", shrinkA=1, shrinkB=1))

    boxes = []
    if e.loss is not None:
        boxes.append(box((x, 0), f"the loss (forward): {e.loss.op_type}\n{e.loss.name}", LOSS_FILL))
    else:
        boxes.append(box((x, 0), "the loss (not reported)", LOSS_FILL))
    on_path = {b.on_path: b.part for b in branches(p) if b.on_path is not None}
    for i, node in enumerate(p.path):
        text, fill, edge, width = f"{i + 1}. {node.op_type}\n{node.name}", NODE_FILL, "#555555", 1.0
        if i == 0:
            text, fill = text + "   <- backpropagation starts here", START_FILL
        if i == len(p.path) - 1:
            text, fill = text + "   <- computes the parameter's gradient", GRADIENT_FILL
        if i in on_path:
            part = on_path[i]
            text = f"{part_label(part)}\n{text}"
            fill, edge, width = PART_FILL.get(part.part, NODE_FILL), PART_COLOURS.get(part.part, "black"), 2.5
        boxes.append(box((x, -(i + 1)), text, fill, edge, width))
    boxes.append(box((x, -(len(p.path) + 1)), f"{p.gradient_tensor}\n[{shape_text(p)}]", GRADIENT_FILL))
    for upper, lower in zip(boxes, boxes[1:]):
        arrow(upper, lower)
    off = [b for b in branches(p) if b.on_path is None]
    for j, b in enumerate(off):
        node = b.part.gradient_node
        colour = PART_COLOURS.get(b.part.part, "black")
        join_row = (b.joins if b.joins is not None else len(p.path) - 1) + 1
        row = join_row - len(off) + j  # stacked beside the path, above the node they join (below near the top)
        row = row if row > 0 else join_row + 1 + j
        text = part_label(b.part) + (f"\n{node.op_type}\n{node.name}" if node else "\n(node not reported)")
        text += f"\njoins op {join_row} {OFF_PATH}"
        part_box = ax.text(0.8, -row, text, **style, bbox=dict(boxstyle="round,pad=0.4", linewidth=2.5,
                                                                facecolor=PART_FILL.get(b.part.part, NODE_FILL),
                                                                edgecolor=colour))
        ax.annotate("", xy=(1.0, 0.5), xycoords=boxes[join_row], xytext=(0.0, 0.5), textcoords=part_box,
                    arrowprops=dict(arrowstyle="-|>", color=colour, linestyle="--", shrinkA=1, shrinkB=1))
    return fig


# ---------------------------------------------------------------- both

def renderer_available() -> str:
    """"graphviz" when `dot` is on PATH, else "matplotlib"."""
    return "graphviz" if shutil.which("dot") else "matplotlib"


def draw_gradient_path(e: Explanation, name: str, path: str | os.PathLike, renderer: str | None = None
                       ) -> PathPicture:
    """Draw parameter `name`'s backward path from `e` into `path` (.png or .svg) with graphviz's dot when it is
    on PATH (or `renderer` says which: "graphviz" or "matplotlib")."""
    path = Path(path)
    picture_suffix(path)
    p = e.parameter(name)
    renderer = renderer or renderer_available()
    if renderer == "graphviz":
        dot = shutil.which("dot")
        if dot is None:
            raise ValueError("graphviz's dot is not on PATH")
        render_dot(gradient_path_dot(e, p), path, dot)
    elif renderer == "matplotlib":
        save(gradient_path_figure(e, p), path)
    else:
        raise ValueError(f"unknown renderer {renderer!r}: graphviz or matplotlib")
    return PathPicture(path, renderer, node_names(e, p))
