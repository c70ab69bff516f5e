"""The first Conv-4 block (3x3 conv, BatchNorm with batch statistics, ReLU, 2x2 max-pool) as one op.

``conv_stem_bn_relu_pool(x, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, training,
momentum, eps)`` computes ``batch_norm_relu_pool(F.conv2d(x, conv_weight, conv_bias, padding=1), ...)``. It
dispatches through ``__torch_function__``: the gradient heads' fast-weight mode replaces it, for the query
pass of a MAML-family head, by the fused C++ op ``metaformer::conv3x3_bn_relu_pool``, which never writes the
full-resolution conv output: the BatchNorm statistics come from the 9x9 (27x27 for RGB) covariance of the
image patches, and each conv-output plane is recomputed in cache where it is pooled (forward) and where the
weight gradient needs it (backward). Called directly, it runs the two-op composite, bit for bit what Conv4
computed before.

The fused op is differentiable once: it gives the gradients of the conv weight and of the BatchNorm affine
parameters (the conv bias gets exact zeros: with batch statistics it cancels), not of the input, and its
backward raises under ``create_graph=True``. That is all a MAML query pass needs (its graph meets one
backward, the meta-gradient's). The heads use it where ``stem_is_fast()`` (CPUs with the AVX-512 or the
AVX2 + FMA kernels; the generic loops are slower than ATen's convolution); ``head.fused_query_stem = True / False`` forces it on
or off (False for higher-order gradients through the query pass).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import handle_torch_function, has_torch_function

from ._extension import load_extension
from .bn_relu_pool import batch_norm_relu_pool, pair

OP = "metaformer::conv3x3_bn_relu_pool"
BACKWARD_OP = "metaformer::conv3x3_bn_relu_pool_backward"
MAX_IN_CHANNELS = 3

_EXTENSION = load_extension()
_HAS_OP = _EXTENSION is not None and hasattr(torch.ops.metaformer, "conv3x3_bn_relu_pool")


@lru_cache(maxsize=1)  # the extension picks its kernels once per process (METAFORMER_SIMD is read once)
def stem_is_fast() -> bool:
    """Whether the fused stem beats conv2d + the fused tail here: with the AVX-512 or AVX2 plane kernels.

    Measured (scripts/bench_block_ops.py, session 11): forward + backward on 75 28x28 images 8.5 ms fused
    against 16.2 ms unfused with the AVX-512 kernels, but 53 ms against 30 ms with the generic loops; with
    the AVX2 kernels (METAFORMER_SIMD=avx2 on the same AVX-512 CPU, docs/benchmarks.md) 8.3 ms against 11.2 ms.
    """
    return _HAS_OP and str(torch.ops.metaformer.cpu_kernels()) in ("avx512", "avx2")


def conv_stem_reference(x: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], bn_weight: Tensor,
                        bn_bias: Tensor, eps: float = 1e-5) -> Tensor:
    """The composite the fused stem replaces (torch ops): conv 3x3 pad 1, batch-statistics BN, ReLU, 2x2 max-pool."""
    y = F.conv2d(x, conv_weight, conv_bias, padding=1)
    return F.max_pool2d(F.relu(F.batch_norm(y, None, None, bn_weight, bn_bias, True, 0.0, eps)), 2)


def fused_stem_available(x: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], bn_weight: Optional[Tensor],
                         bn_bias: Optional[Tensor]) -> bool:
    """Whether ``conv3x3_bn_relu_pool`` can take these tensors (CPU, float32/64, NCHW, <= 3 channels, data input)."""
    return (
        _HAS_OP
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() == 4
        and x.shape[0] > 0
        and 1 <= x.shape[1] <= MAX_IN_CHANNELS
        and x.shape[2] >= 2
        and x.shape[3] >= 2
        and not x.requires_grad  # no input gradient: the stem's input is data
        and conv_weight.dim() == 4
        and tuple(conv_weight.shape[1:]) == (x.shape[1], 3, 3)
        and conv_weight.dtype == x.dtype
        and conv_weight.device.type == "cpu"
        and bn_weight is not None
        and bn_bias is not None
        and bn_weight.dtype == x.dtype
        and bn_bias.dtype == x.dtype
        and (conv_bias is None or conv_bias.dtype == x.dtype)
    )


def conv3x3_bn_relu_pool(x: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], bn_weight: Tensor,
                         bn_bias: Tensor, eps: float = 1e-5) -> Tensor:
    """The fused stem with batch statistics (no running buffers); raises where ``fused_stem_available`` is False."""
    if not fused_stem_available(x, conv_weight, conv_bias, bn_weight, bn_bias):
        raise ValueError(
            "conv3x3_bn_relu_pool needs the built extension, a CPU float32/float64 input [N, C<=3, H>=2, W>=2] "
            f"that does not require grad, a [O, C, 3, 3] conv weight and BatchNorm weight and bias of the same "
            f"dtype; got input {tuple(x.shape)} {x.dtype} on {x.device} (requires_grad={x.requires_grad}), "
            f"conv weight {tuple(conv_weight.shape)}; use conv_stem_reference instead"
        )
    if not eps > 0:
        raise ValueError(f"conv3x3_bn_relu_pool: eps must be positive (as F.batch_norm's in training), got {eps}")
    if conv_bias is not None and not bool(torch.isfinite(conv_bias).all()):
        # the fused op drops the bias (it cancels in batch statistics), which a NaN or inf bias does not: keep the
        # reference's propagation of it
        return conv_stem_reference(x, conv_weight, conv_bias, bn_weight, bn_bias, eps)
    out, _, _, _ = torch.ops.metaformer.conv3x3_bn_relu_pool(
        x.contiguous(), conv_weight, conv_bias, bn_weight, bn_bias, float(eps)
    )
    return out


def conv_stem_bn_relu_pool(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``batch_norm_relu_pool(F.conv2d(x, w, b, padding=1), ...)``: the first Conv-4 block, overridable as a whole."""
    relevant = tuple(t for t in (x, conv_weight, conv_bias, bn_weight, bn_bias) if t is not None)
    if has_torch_function(relevant):
        return handle_torch_function(
            conv_stem_bn_relu_pool, relevant, x, conv_weight, conv_bias, running_mean, running_var, bn_weight,
            bn_bias, training, momentum, eps,
        )
    y = F.conv2d(x, conv_weight, conv_bias, padding=1)
    return batch_norm_relu_pool(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)


def conv3x3_patches(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` as 3x3 patches of ``x`` times the weight, for an ``x`` without grad.

    For a pass that is differentiated twice (the support pass of second-order MAML) this is cheaper than
    ``F.conv2d``: the conv's double backward computes an input gradient (a transposed conv) even when the input is
    data, and the few-channel first layer runs at a poor oneDNN rate, while the batched matmuls here have
    neither cost. Once differentiated, ``F.conv2d`` is as fast or faster (``scripts/bench_block_ops.py``).
    """
    if x.requires_grad or x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(
            f"conv3x3_patches takes data [N, C, H, W] (no grad) and a [O, C, 3, 3] weight; got {tuple(x.shape)} "
            f"(requires_grad={x.requires_grad}) and {tuple(weight.shape)}; use F.conv2d"
        )
    n, _, h, w = x.shape
    o = weight.shape[0]
    patches = F.unfold(x, 3, padding=1)  # [N, C*9, H*W]
    w2 = weight.reshape(o, -1).expand(n, o, -1)
    if bias is None:
        y = torch.bmm(w2, patches)
    else:
        y = torch.baddbmm(bias.view(1, o, 1).expand(n, o, h * w), w2, patches)
    return y.view(n, o, h, w)


def is_conv_stem(conv: nn.Module) -> bool:
    """Whether ``conv`` is a plain 3x3, stride 1, padding 1 nn.Conv2d (what conv_stem_bn_relu_pool computes)."""
    return (
        type(conv) is nn.Conv2d
        and pair(conv.kernel_size) == (3, 3)
        and pair(conv.stride) == (1, 1)
        and pair(conv.padding) == (1, 1)
        and pair(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


# ---------------------------------------------------------------------------------------------- registration
def _fake_forward(x, conv_weight, conv_bias, bn_weight, bn_bias, eps):  # noqa: ANN001, ANN202
    """Output shapes of the fused forward, for FakeTensor tracing."""
    n, _, h, w = x.shape
    o = conv_weight.shape[0]
    return (
        x.new_empty((n, o, h // 2, w // 2)),
        x.new_empty((o,), dtype=torch.float64),
        x.new_empty((o,), dtype=torch.float64),
        x.new_empty((n, o, h // 2, w // 2), dtype=torch.int8),
    )


def _fake_backward(grad_out, x, conv_weight, bn_weight, mean, invstd, code):  # noqa: ANN001, ANN202
    """Output shapes of the fused backward."""
    o = conv_weight.shape[0]
    return conv_weight.new_empty(conv_weight.shape), x.new_empty((o,)), x.new_empty((o,))


def _setup_forward(ctx, inputs, output) -> None:  # noqa: ANN001
    """Keep the input, the weights and the forward's statistics and argmax code for the backward."""
    x, conv_weight, conv_bias, bn_weight, _, _ = inputs
    _, mean, invstd, code = output
    ctx.mark_non_differentiable(mean, invstd, code)
    ctx.has_conv_bias = conv_bias is not None
    ctx.save_for_backward(x, conv_weight, bn_weight, mean, invstd, code)


def _backward(ctx, grad_out, _gm, _gi, _gc):  # noqa: ANN001, ANN202
    """Gradients of the conv weight and the BatchNorm affine parameters (once differentiable)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "metaformer::conv3x3_bn_relu_pool (the fused Conv-4 stem of a MAML query pass) is differentiable "
            "once; this backward was asked to build a graph (create_graph=True). Set "
            "`head.fused_query_stem = False` for higher-order gradients through the query pass"
        )
    if ctx.needs_input_grad[0]:
        raise RuntimeError(
            "metaformer::conv3x3_bn_relu_pool has no input gradient (the stem's input is data); call "
            "conv_stem_reference for an input that requires grad"
        )
    x, conv_weight, bn_weight, mean, invstd, code = ctx.saved_tensors
    gw, gg, gb = torch.ops.metaformer.conv3x3_bn_relu_pool_backward(
        grad_out.contiguous(), x, conv_weight, bn_weight, mean, invstd, code
    )
    # the conv bias cancels in batch-statistics BatchNorm: its gradient is exactly zero
    g_bias = gw.new_zeros(gw.shape[0]) if ctx.has_conv_bias and ctx.needs_input_grad[2] else None
    return None, gw, g_bias, gg, gb, None


def register_python_parts() -> None:
    """Attach fake kernels and the autograd formula to the C++ ops (once, after the extension loads)."""
    torch.library.register_fake(OP)(_fake_forward)
    torch.library.register_fake(BACKWARD_OP)(_fake_backward)
    torch.library.register_autograd(OP, _backward, setup_context=_setup_forward)


if _HAS_OP:
    register_python_parts()
