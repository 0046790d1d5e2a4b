"""Analytic FLOP counts of the ViT in model/vit.py (a multiply-add is 2 FLOPs).

Counted: the patch embedding, q/k/v projection, the two attention matmuls
(q k^T and attn v), the output projection, the two feed-forward Linears and the
classifier. Not counted: LayerNorm, softmax, GELU, residual adds, the cls/pos
additions (elementwise, < 2% here). A training step is taken as 3x the forward
(backward = gradients w.r.t. activations + w.r.t. weights, each ~ the forward's
matmuls); the optimizer update is elementwise and not counted.
"""
from __future__ import annotations

from model.vit import ViTConfig


def forward_flops(c: ViTConfig) -> int:
    """FLOPs of one image's forward pass."""
    patches = (c.image_size // c.patch_size) ** 2
    tokens = patches + 1
    patch_dim = c.channels * c.patch_size ** 2
    inner = c.heads * c.dim_head
    project_out = not (c.heads == 1 and c.dim_head == c.dim)
    per_block = (
        2 * tokens * c.dim * 3 * inner  # to_qkv
        + 2 * c.heads * tokens * tokens * c.dim_head  # q k^T
        + 2 * c.heads * tokens * tokens * c.dim_head  # attn v
        + (2 * tokens * inner * c.dim if project_out else 0)  # to_out
        + 2 * 2 * tokens * c.dim * c.mlp_dim  # feed-forward: dim -> mlp -> dim
    )
    return 2 * patches * patch_dim * c.dim + c.depth * per_block + 2 * c.dim * c.num_classes


def train_flops(c: ViTConfig) -> int:
    """FLOPs of one image's training step (forward + backward ~ 3x forward)."""
    return 3 * forward_flops(c)
