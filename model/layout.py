"""Where each parameter of a PyTorch image classifier sits, found from the model's structure, not its names.

At export, `place(model, graph)` finds every attention module and how it makes q, k and v:

* fused: one projection whose output rows are (3, heads, dim_head), with or without a bias
  (vit-pytorch's `to_qkv`, timm's `qkv`, nn.MultiheadAttention's `in_proj_weight`/`in_proj_bias`);
* separate: three projections of the same shape, q, k, v in the order the module defines them
  (Hugging Face's `q_proj`/`k_proj`/`v_proj`, or `query`/`key`/`value` before transformers 5).

A module is an attention module when it is an nn.MultiheadAttention, or when it has a head count
(an int attribute such as `heads`, `num_heads`, `num_attention_heads`) and Linear children that
make q, k and v. The blocks are the children of the one ModuleList/Sequential that holds each
attention module in a child of its own. Every parameter then gets its block index and sub-layer:
inside the attention module (attention.qkv, attention.q/k/v, attention.out, attention.norm), elsewhere
in its block by the order the exported graph first uses it (a norm belongs to the sub-layer it opens
in a pre-norm block, to the one it closes in a post-norm block; the rest is feedforward), and outside
the blocks embedding (used before them) or head and head.norm (after). What cannot be placed keeps
block -1 and sub-layer "other" and is listed with the reason. The result goes into the manifest
(engine/manifest.py: Parameter, QkvLayout, Unplaced); nothing downstream parses parameter names.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from torch import nn

from proto.records.model import Parameter, QkvLayout, Unplaced

HEAD_COUNTS = ("num_heads", "heads", "num_attention_heads", "n_heads", "n_head")  # head-count attributes
NORMS = tuple(getattr(nn, n) for n in ("LayerNorm", "GroupNorm", "RMSNorm", "BatchNorm1d", "BatchNorm2d",
                                       "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d") if hasattr(nn, n))


@dataclass(frozen=True)
class Placement:
    parameters: tuple[Parameter, ...]  # model order
    attention: tuple[QkvLayout, ...]  # block order
    unplaced: tuple[Unplaced, ...]


def _heads(module: nn.Module) -> int | None:
    for name in HEAD_COUNTS:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _attention(path: str, module: nn.Module) -> dict | str | None:
    """How `module` makes q, k and v (names relative to the model); a reason when it looks like an attention
    module (a head count) whose q, k and v projections are not recognized; None when it is no attention module."""
    prefix = f"{path}." if path else ""
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim:
            return "nn.MultiheadAttention with kdim/vdim other than embed_dim (separate q/k/v weights) is not supported"
        bias = f"{prefix}in_proj_bias" if module.in_proj_bias is not None else ""
        return dict(weights=(f"{prefix}in_proj_weight",) * 3, biases=(bias,) * 3 if bias else (),
                    heads=module.num_heads, dim_head=module.head_dim, out=f"{prefix}out_proj")
    heads = _heads(module)
    if heads is None:
        return None
    linears = [(name, child) for name, child in module.named_children() if isinstance(child, nn.Linear)]
    for name, linear in linears:  # one fused projection: rows (3, heads, dim_head)
        if linear.out_features % (3 * heads) == 0:
            bias = f"{prefix}{name}.bias" if linear.bias is not None else ""
            return dict(weights=(f"{prefix}{name}.weight",) * 3, biases=(bias,) * 3 if bias else (),
                        heads=heads, dim_head=linear.out_features // 3 // heads)
    same = [(n, lin) for n, lin in linears if lin.out_features % heads == 0
            and (lin.in_features, lin.out_features) == (linears[0][1].in_features, linears[0][1].out_features)]
    if len(same) >= 3:  # three separate projections, q, k, v in definition order
        qkv = same[:3]
        with_bias = all(lin.bias is not None for _, lin in qkv)
        return dict(weights=tuple(f"{prefix}{n}.weight" for n, _ in qkv),
                    biases=tuple(f"{prefix}{n}.bias" for n, _ in qkv) if with_bias else (),
                    heads=heads, dim_head=qkv[0][1].out_features // heads)
    if linears:
        return (f"it has {heads} heads but neither one Linear of 3 x heads x dim_head outputs nor three Linears of "
                "one shape among its children")
    return None


def _blocks(model: nn.Module, attention_paths: list[str]) -> str | None:
    """The ModuleList/Sequential each of whose children holds at most one attention module, all of them inside."""
    containers = [(path, m) for path, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))]
    best = None
    for path, _ in containers:
        prefix = f"{path}." if path else ""
        inside = [a for a in attention_paths if a.startswith(prefix)]
        if len(inside) != len(attention_paths):
            continue
        children = [a[len(prefix):].split(".", 1)[0] for a in inside]
        if all(c.isdigit() for c in children) and len(set(children)) == len(children):
            if best is None or len(path) > len(best):
                best = path
    return best


def _first_use(graph: onnx.GraphProto) -> dict[str, int]:
    """Initializer name -> index of the first node that reads it (the exporter writes nodes in execution order)."""
    first: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            first.setdefault(name, i)
    return first


def place(model: nn.Module, graph: onnx.GraphProto, trainable: set[str]) -> Placement:
    """Block, sub-layer and attention layout of every parameter of `model`, exported as `graph` (forward nodes
    first, in execution order, parameters under their state_dict names)."""
    modules = dict(model.named_modules())
    seen = {path: _attention(path, m) for path, m in modules.items()}
    found = {path: a for path, a in seen.items() if isinstance(a, dict)}
    unrecognized = {path: reason for path, reason in seen.items() if isinstance(reason, str)}
    # An attention module inside another (e.g. an nn.MultiheadAttention in a wrapper with a heads count) counts once.
    found = {p: a for p, a in found.items() if not any(p.startswith(f"{q}.") for q in found if q != p)}
    blocks = _blocks(model, list(found)) if found else None
    order = _first_use(graph)
    params = dict(model.named_parameters())
    owner = {name: name.rpartition(".")[0] for name in params}

    def block_of(name: str) -> int:
        if blocks is None or not name.startswith(f"{blocks}."):
            return -1
        return int(name[len(blocks) + 1:].split(".", 1)[0])

    first_block_use = min((order.get(n, 1 << 30) for n in params if block_of(n) >= 0), default=None)
    last_block_use = max((order.get(n, -1) for n in params if block_of(n) >= 0), default=None)
    attention_of = {}
    for path, a in found.items():
        for n in params:
            if n.startswith(f"{path}."):
                attention_of[n] = path

    roles: dict[str, str] = {}
    for path, a in found.items():
        fused = len(set(a["weights"])) == 1
        for role, w, b in zip("qkv", a["weights"], a["biases"] or ("", "", "")):
            for n in (w, b):
                if n:
                    roles[n] = "attention.qkv" if fused else f"attention.{role}"

    def is_norm(name: str) -> bool:
        return isinstance(modules.get(owner[name]), NORMS)

    sublayer: dict[str, str] = {}
    unplaced: list[Unplaced] = []
    for path, reason in unrecognized.items():
        for n in params:
            if n.startswith(f"{path}."):
                unplaced.append(Unplaced(n, f"attention module {path}: {reason}"))
    skipped = {u.name for u in unplaced}
    by_block: dict[int, list[str]] = {}
    for n in params:
        if n in skipped:
            continue
        if n in roles:
            sublayer[n] = roles[n]
        elif n in attention_of:
            sublayer[n] = "attention.norm" if is_norm(n) else "attention.out"
        elif block_of(n) >= 0:
            by_block.setdefault(block_of(n), []).append(n)
        elif blocks is None:
            unplaced.append(Unplaced(n, "no attention blocks were found in the model"))
        elif n not in order:
            unplaced.append(Unplaced(n, "the exported graph never reads it"))
        elif first_block_use is not None and order[n] < first_block_use:
            sublayer[n] = "embedding"
        elif last_block_use is not None and order[n] > last_block_use:
            sublayer[n] = "head.norm" if is_norm(n) else "head"
        else:
            unplaced.append(Unplaced(n, "used between the blocks, outside every block"))

    for names in by_block.values():
        # The block's parameters in the order the graph uses them, with its attention parameters as one marker.
        ordered = sorted({*names, *(n for n in params if n in attention_of and block_of(n) == block_of(names[0]))},
                         key=lambda n: order.get(n, 1 << 30))
        ordered = [n for n in ordered if n not in skipped]
        kinds = ["norm" if is_norm(n) else "attention" if n in attention_of else "feedforward" for n in ordered]
        pre_norm = bool(kinds) and kinds[0] == "norm"  # a norm inside the attention module counts here too
        kinds = ["attention" if n in attention_of else k for n, k in zip(ordered, kinds)]
        for i, n in enumerate(ordered):
            if kinds[i] != "norm":
                if kinds[i] == "feedforward":
                    sublayer[n] = "feedforward"
                continue
            neighbours = kinds[i + 1:] if pre_norm else kinds[:i][::-1]
            nearest = next((k for k in neighbours if k != "norm"), "feedforward")
            sublayer[n] = "attention.norm" if nearest == "attention" else "feedforward.norm"

    placed = tuple(Parameter(n, tuple(p.shape), n in trainable, block_of(n) if n in sublayer else -1,
                             sublayer.get(n, "other")) for n, p in params.items())
    layouts = tuple(sorted(
        (QkvLayout(name=a["weights"][0] if len(set(a["weights"])) == 1 else path, block=block_of(a["weights"][0]),
                   heads=a["heads"], dim_head=a["dim_head"], weights=a["weights"], biases=a["biases"], module=path)
         for path, a in found.items()), key=lambda q: (q.block, q.module)))
    return Placement(placed, layouts, tuple(unplaced))
