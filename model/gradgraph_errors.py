"""The one-line ExportError texts of model/gradgraph.py: which op failed, and for which module's forward or backward.

E.g. "torch.onnx cannot translate aten.avg_pool2d_backward.default (needed by the backward of pool (AvgPool2d))":
`describe` reads the vitserve.phase / vitserve.differentiates metadata the trace put on the FX node, or its
nn_module_stack in the forward.
"""
from __future__ import annotations

import torch


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def describe(node: torch.fx.Node, model: torch.nn.Module) -> str:
    """'needed by the backward of block.pool (AvgPool2d)' / 'in the forward of ...': where an op comes from."""
    if node.meta.get("vitserve.phase") == "backward":
        path = node.meta.get("vitserve.differentiates")
        return f"needed by the backward of {_module_label(model, path)}"
    stack = node.meta.get("nn_module_stack") or {}
    return f"in the forward of {_module_label(model, list(stack.values())[-1][0] if stack else None)}"


def _module_label(model: torch.nn.Module, path: str | None) -> str:
    if path is None:
        return f"an op of {type(model).__name__}"
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return path or type(model).__name__
    return f"{path} ({type(module).__name__})" if path else f"{type(model).__name__}.forward"


def translation_error(error: BaseException, gm, model: torch.nn.Module, what: str) -> str:
    """One line for a failed translation: the op and where it comes from, when torch.onnx names the node."""
    import re

    text = str(error)
    found = re.search(r"translating node %(\S+) ", text)
    node = next((n for n in gm.graph.nodes if found and n.name == found.group(1)), None)
    cause, seen = error, set()
    while cause.__cause__ is not None and id(cause) not in seen:  # the innermost error says why
        seen.add(id(cause))
        cause = cause.__cause__
    reason = first_line(cause)
    if node is None:
        return f"torch.onnx cannot translate the {what}: {first_line(error)}"
    return f"torch.onnx cannot translate {node.target} ({describe(node, model)}): {reason}"
