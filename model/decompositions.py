"""Decompositions the gradient graphs are traced with, besides torch.onnx's own table (model/gradgraph.py):

- `convolution_backward`: aten.convolution_backward as convolutions. torch.onnx has no translation for it (conv patch
  embeddings, every CNN).
- `gelu`, `gelu_backward`: exact GELU and its backward over shared pieces, which the trace's common-subexpression
  pass then computes once (graphs that differentiate).
- `native_layer_norm_backward`: LayerNorm's backward in fewer full-size passes (graphs that differentiate).
- `safe_softmax`: F.scaled_dot_product_attention's softmax without torch's four extra full-size passes.

Each takes and returns what the aten op it replaces does, equal to it up to float rounding: tests/test_gradgraph.py
compares convolution_backward and safe_softmax with the aten op directly, and every model's gradient graph (so GELU
and LayerNorm too) with PyTorch autograd.
"""
from __future__ import annotations

import math

import torch

aten = torch.ops.aten


# --------------------------------------------------------------------------------------------------
# aten.convolution_backward as convolutions
# --------------------------------------------------------------------------------------------------

def _conv_weight_grad(x, grad_y, weight_shape, stride, padding, dilation, groups):
    """d(loss)/d(weight) of y = conv(x, weight) (not transposed), as one grouped convolution.

    grad_w[o, c, k] = sum_{n, p} grad_y[n, o, p] * x_padded[n, group(o) * Cg + c, p * stride + k * dilation]:
    a convolution over the batch axis, with x's channels (Cg per group) as its batch, grad_y as its weight
    (O filters over N channels), and stride and dilation swapped. The result can be longer than the kernel
    (input positions that no output reads): sliced off.
    """
    n, spatial = x.shape[0], x.dim() - 2
    cg, sizes = x.shape[1] // groups, list(x.shape[2:])
    # (N, G*Cg, *S) -> (Cg, G*N, *S): "batch" = the channel within its group, "channels" = (group, sample)
    xt = x.reshape(n, groups, cg, *sizes).permute(2, 1, 0, *range(3, 3 + spatial)).reshape(cg, groups * n, *sizes)
    wt = grad_y.transpose(0, 1)  # (N, G*Og, *So) -> (G*Og, N, *So)
    gw = aten.convolution.default(xt, wt, None, dilation, padding, stride, False, [0] * spatial, groups)
    gw = gw[(slice(None), slice(None), *(slice(0, k) for k in weight_shape[2:]))]  # (Cg, G*Og, *K)
    return gw.transpose(0, 1).reshape(grad_y.shape[1], cg, *weight_shape[2:])


def _spatial(values, spatial: int) -> list[int]:
    return [int(v) for v in (list(values) * spatial if len(values) == 1 else values)]


def convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                         output_padding, groups, output_mask):
    """aten.convolution_backward as convolutions: any stride, padding, dilation and groups, 1-3 spatial dims,
    transposed or not (registered into the decomposition table: torch.onnx cannot translate it)."""
    spatial = input.dim() - 2
    stride, padding, dilation = (_spatial(v, spatial) for v in (stride, padding, dilation))
    kernel = [int(k) for k in weight.shape[2:]]
    every = (slice(None), slice(None))
    grad_input = grad_weight = grad_bias = None
    if not transposed:
        if output_mask[0]:
            # conv's adjoint is a transposed convolution; output_padding gives back the input positions past the
            # last one an output reads
            read = [(int(grad_output.shape[2 + i]) - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1
                    for i in range(spatial)]
            extra = [int(input.shape[2 + i]) - read[i] for i in range(spatial)]
            grad_input = aten.convolution.default(grad_output, weight, None, stride, padding, dilation, True, extra,
                                                  groups)
        if output_mask[1]:
            grad_weight = _conv_weight_grad(input, grad_output, weight.shape, stride, padding, dilation, groups)
    else:
        # y = conv_transpose(x, w) is the adjoint of z = conv(y, w): x's gradient is that convolution, and w's is
        # conv's weight gradient with the roles of input and output exchanged.
        if output_mask[0]:
            grad_input = aten.convolution.default(grad_output, weight, None, stride, padding, dilation, False,
                                                  [0] * spatial, groups)
            # an output_padding >= stride (allowed below the dilation) adds outputs past the last input position
            grad_input = grad_input[(*every, *(slice(0, int(n)) for n in input.shape[2:]))]
        if output_mask[1]:
            grad_weight = _conv_weight_grad(grad_output, input, weight.shape, stride, padding, dilation, groups)
    if output_mask[2]:
        grad_bias = grad_output.sum(dim=[0, *range(2, grad_output.dim())])
    return grad_input, grad_weight, grad_bias


# --------------------------------------------------------------------------------------------------
# exact GELU, forward and backward over shared pieces
# --------------------------------------------------------------------------------------------------

SQRT2 = math.sqrt(2.0)
LOG_SQRT_PI = 0.5 * math.log(math.pi)


def _gelu_pieces(x):
    """a = x / sqrt 2 and cdf = Phi(x) = (1 + erf a) / 2: the same ops in both passes, so merged into one."""
    a = x / SQRT2
    return a, (torch.erf(a) + 1) * 0.5


def gelu(x, approximate="none"):
    """Exact GELU as x * Phi(x) (the tanh approximation: left to torch.onnx's translation)."""
    if approximate != "none":
        return NotImplemented
    return x * _gelu_pieces(x)[1]


def gelu_backward(grad, x, approximate="none"):
    """grad * (Phi(x) + x phi(x)) with x phi(x) = a exp(-a^2) / sqrt(pi) = a exp(-a^2 - ln sqrt(pi)).

    With the forward's a and Phi(x) reused, the backward is 6 elementwise passes where torch's decomposition
    makes 11 (it recomputes the erf); each pass reads and writes a (batch, tokens, mlp_dim) tensor: on
    vit-small64 b32 that took the gradient graph from 64 to ~35 ms of GELU a step (docs/performance.md).
    """
    if approximate != "none":
        return torch._decomp.decomposition_table[aten.gelu_backward.default](grad, x, approximate=approximate)
    a, cdf = _gelu_pieces(x)
    return grad * (cdf + a * torch.exp(-LOG_SQRT_PI - a * a))


def native_layer_norm_backward(grad_out, input, normalized_shape, mean, rstd, weight, bias, output_mask):
    """LayerNorm's backward in 13 elementwise passes and reductions where torch's decomposition makes 15: the input's
    gradient as rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = dy * weight, with means where torch scales g
    by N and rstd by 1 / N (a full-size pass). Not float32: torch's own decomposition."""
    if input.dtype != torch.float32 or grad_out.dtype != torch.float32:
        return torch._decomp.decomposition_table[aten.native_layer_norm_backward.default](
            grad_out, input, normalized_shape, mean, rstd, weight, bias, output_mask)
    axis = input.dim() - len(normalized_shape)
    inner, outer = list(range(axis, input.dim())), list(range(axis))
    mean = mean.reshape(*mean.shape, *[1] * (input.dim() - mean.dim()))
    rstd = rstd.reshape(*rstd.shape, *[1] * (input.dim() - rstd.dim()))
    x_hat = (input - mean) * rstd
    g = grad_out * weight if weight is not None else grad_out
    d_input = d_weight = d_bias = None
    if output_mask[0]:
        d_input = (g - g.mean(inner, keepdim=True) - x_hat * (g * x_hat).mean(inner, keepdim=True)) * rstd
    if output_mask[1] and weight is not None:
        d_weight = (grad_out * x_hat).sum(outer) if outer else grad_out * x_hat
    if output_mask[2] and bias is not None:
        d_bias = grad_out.sum(outer) if outer else grad_out.clone()
    return d_input, d_weight, d_bias


# --------------------------------------------------------------------------------------------------
# the safe softmax of F.scaled_dot_product_attention's math backend
# --------------------------------------------------------------------------------------------------

def safe_softmax(x, dim, dtype=None):
    """aten._safe_softmax (what the math backend of F.scaled_dot_product_attention calls): softmax, except that a row
    whose every entry is -inf (fully masked) gives zeros instead of NaN.

    torch's decomposition, where(all(x == -inf), zeros_like(x), softmax(x)), makes four full-size passes besides the
    softmax, and onnxruntime's Where is slow: on timm's ViT-S/16 at b8 (attention 8 x 6 x 197 x 197) they cost more
    than the softmax itself, ~7% of the gradient graph's step (docs/performance.md). Here the rows are found by their
    maximum (one reduction), and the full-size work is two broadcast elementwise ops: the input raised to at least 0
    in those rows only (so their softmax is finite, not NaN), and the softmax times 0 there, 1 elsewhere. Equal to
    torch's for every input: a row with a NaN has a NaN maximum, is not masked, and keeps its NaNs. Its gradient
    is autograd's formula for _safe_softmax (from its output), not this function's.
    """
    if dtype is not None and dtype != x.dtype:
        x = x.to(dtype)
    masked = x.amax(dim, keepdim=True) == float("-inf")  # (..., 1, ...): one entry per row
    floor = torch.where(masked, 0.0, float("-inf"))  # max(x, -inf) is x itself
    return torch.softmax(torch.maximum(x, floor), dim) * (~masked).to(x.dtype)


# aten op (by name: the trace records other instances of the op objects) -> its name in ExplainGradients' node names
OWN_FORWARD_DECOMPOSITIONS = {"aten.gelu.default": "gelu", "aten._safe_softmax.default": "softmax"}
