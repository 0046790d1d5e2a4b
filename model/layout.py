"""Where each parameter of a PyTorch ViT sits: its block and sub-layer, and the fused q/k/v projections.

Computed once, at export, into the manifest (engine/manifest.py: Parameter, QkvLayout); the server,
the client and the plots read it from there and never parse parameter names themselves.
"""
from __future__ import annotations

import re

import torch


def qkv_layouts(model: torch.nn.Module) -> list[dict]:
    """Every fused qkv projection: modules with a `to_qkv` Linear and a `heads` count (the lucidrains layout)."""
    layouts = []
    for prefix, module in model.named_modules():
        qkv = getattr(module, "to_qkv", None)
        if isinstance(qkv, torch.nn.Linear) and isinstance(getattr(module, "heads", None), int):
            heads = module.heads
            block = re.search(r"layers\.(\d+)\.", prefix + ".")
            layouts.append(dict(name=f"{prefix}.to_qkv.weight", block=int(block.group(1)) if block else -1,
                                heads=heads, dim_head=qkv.out_features // 3 // heads))
    return layouts


def parameter_place(name: str) -> tuple[int, str]:
    """(block, sublayer) from a lucidrains-layout name; both the PreNorm era and vit-pytorch >= 1.x."""
    m = re.search(r"layers\.(\d+)\.([01])\.(.+)$", name)
    if m:
        block, rest = int(m.group(1)), m.group(3)
        if m.group(2) == "0":  # attention: PreNorm(norm, fn=Attention) or Attention(norm, to_qkv, to_out)
            for key, sublayer in (("to_qkv", "attention.qkv"), ("to_out", "attention.out"), ("norm", "attention.norm")):
                if re.search(rf"(^|\.){key}\.", rest):
                    return block, sublayer
            return block, "other"
        return block, "feedforward.norm" if re.match(r"norm\.", rest) else "feedforward"
    if re.match(r"(to_patch_embedding\.|pos_embedding$|cls_token$)", name):
        return -1, "embedding"
    if name.startswith("mlp_head.0.") and name.count(".") == 2:
        return -1, "head.norm"
    if name.startswith("mlp_head."):
        return -1, "head"
    return -1, "other"
