"""BatchNorm + ReLU + 2x2 max-pool as one op (the tail of every Conv-4 block): wrapper, fake kernels, autograd.

``batch_norm_relu_pool(x, running_mean, running_var, weight, bias, training, momentum, eps)`` computes
``F.max_pool2d(F.relu(F.batch_norm(...)), 2)``. Where it can, it runs the fused C++ op
``metaformer::bn_relu_pool`` (CPU, float32/float64, NCHW, batch statistics, affine): one statistics pass and
one pooled pass forward, two passes backward, and a hand-written double backward so second-order MAML
differentiates through it. Elsewhere (evaluation with running statistics, GPU tensors, other dtypes,
no extension) it runs the three torch ops, which is also the reference the tests hold the op against.

The function dispatches through ``__torch_function__``, so the gradient heads' fast-weight mode can apply
its BatchNorm policy (per-task statistics, MAML++ per-step tables) to it like to ``F.batch_norm``.
Third-order gradients (differentiating the double backward) are not implemented and raise.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import handle_torch_function, has_torch_function

from ._extension import load_extension

OP = "metaformer::bn_relu_pool"
BACKWARD_OP = "metaformer::bn_relu_pool_backward"
DOUBLE_BACKWARD_OP = "metaformer::bn_relu_pool_double_backward"

_EXTENSION = load_extension()
_HAS_OP = _EXTENSION is not None and hasattr(torch.ops.metaformer, "bn_relu_pool")


def bn_relu_pool_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5) -> Tensor:
    """The composite the fused op replaces: batch-statistics BatchNorm, ReLU, 2x2 max-pool (torch ops)."""
    return F.max_pool2d(F.relu(F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)), 2)


def fused_available(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """Whether the fused op can take these arguments (else the composite runs)."""
    return (
        _HAS_OP
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.float64)
        and x.is_contiguous()
        and x.shape[0] > 0
        and x.shape[2] >= 2
        and x.shape[3] >= 2
        and weight is not None
        and bias is not None
        and weight.shape == (x.shape[1],)
        and bias.shape == (x.shape[1],)
        and weight.dtype == x.dtype
        and bias.dtype == x.dtype
    )


def batch_norm_relu_pool(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``max_pool2d(relu(batch_norm(x, ...)), 2)`` with F.batch_norm's arguments; fused where possible."""
    relevant = tuple(t for t in (x, weight, bias) if t is not None)
    if has_torch_function(relevant):
        return handle_torch_function(
            batch_norm_relu_pool, relevant, x, running_mean, running_var, weight, bias, training, momentum, eps
        )
    if not training or not fused_available(x, weight, bias):
        return F.max_pool2d(F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)), 2)
    if not eps > 0:
        raise ValueError(f"batch_norm_relu_pool: eps must be positive (as F.batch_norm's in training), got {eps}")
    out, mean, invstd, _ = torch.ops.metaformer.bn_relu_pool(x, weight, bias, float(eps))
    if running_mean is not None or running_var is not None:
        # the running-statistics update F.batch_norm makes in training mode (unbiased variance)
        with torch.no_grad():
            count = x.numel() // x.shape[1]
            var = (invstd.pow(-2) - eps) * (count / max(count - 1, 1))
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            if running_var is not None:
                running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)
    return out


def pair(v: object) -> object:
    """A module's int-or-tuple 2-D hyperparameter (kernel size, stride, ...) as a tuple."""
    return v if isinstance(v, tuple) else (v, v)


def fusable_block_tail(bn: nn.Module, act: nn.Module, pool: nn.Module) -> bool:
    """Whether modules (BatchNorm2d, ReLU, MaxPool2d) compute exactly what batch_norm_relu_pool does."""
    return (
        type(bn) is nn.BatchNorm2d
        and type(act) is nn.ReLU
        and type(pool) is nn.MaxPool2d
        and pair(pool.kernel_size) == (2, 2)
        and pair(pool.stride if pool.stride is not None else pool.kernel_size) == (2, 2)
        and pair(pool.padding) == (0, 0)
        and pair(pool.dilation) == (1, 1)
        and not pool.ceil_mode
        and not pool.return_indices
    )


def batch_norm_module_args(bn: nn.BatchNorm2d) -> tuple:
    """F.batch_norm's arguments after x for one forward of ``bn`` (counts the batch in num_batches_tracked)."""
    # the argument logic of torch.nn.modules.batchnorm._BatchNorm.forward, so buffers evolve identically
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_running = not bn.training or bn.track_running_stats
    return (
        bn.running_mean if use_running else None,
        bn.running_var if use_running else None,
        bn.weight,
        bn.bias,
        bn_training,
        factor,
        bn.eps,
    )


def batch_norm_module_relu_pool(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``max_pool2d(relu(bn(x)), 2)`` for an nn.BatchNorm2d module, with its running-statistics bookkeeping."""
    return batch_norm_relu_pool(x, *batch_norm_module_args(bn))


# ---------------------------------------------------------------------------------------------- registration
def _fake_forward(x, weight, bias, eps):  # noqa: ANN001, ANN202
    """Output shapes of the fused forward, for FakeTensor tracing."""
    n, c, h, w = x.shape
    return (
        x.new_empty((n, c, h // 2, w // 2)),
        x.new_empty((c,), dtype=torch.float64),
        x.new_empty((c,), dtype=torch.float64),
        x.new_empty((n, c, h // 2, w // 2), dtype=torch.int8),
    )


def _fake_backward(grad_out, x, weight, mean, invstd, code):  # noqa: ANN001, ANN202
    """Output shapes of the fused backward."""
    c = x.shape[1]
    return x.new_empty(x.shape), x.new_empty((c,)), x.new_empty((c,))


def _fake_double_backward(ggx, ggw, ggb, grad_out, x, weight, mean, invstd, code):  # noqa: ANN001, ANN202
    """Output shapes of the fused double backward."""
    return x.new_empty(code.shape), x.new_empty(x.shape), x.new_empty((x.shape[1],))


def _setup_forward(ctx, inputs, output) -> None:  # noqa: ANN001
    """Keep the input, weight and the forward's statistics and argmax code for the backward."""
    x, weight, _, _ = inputs
    _, mean, invstd, code = output
    ctx.mark_non_differentiable(mean, invstd, code)
    ctx.save_for_backward(x, weight, mean, invstd, code)


def _backward(ctx, grad_out, _gm, _gi, _gc):  # noqa: ANN001, ANN202
    """Gradients of input, weight and bias through the fused backward op (itself differentiable)."""
    x, weight, mean, invstd, code = ctx.saved_tensors
    gx, gw, gb = torch.ops.metaformer.bn_relu_pool_backward(grad_out.contiguous(), x, weight, mean, invstd, code)
    return gx, gw, gb, None


def _setup_backward(ctx, inputs, output) -> None:  # noqa: ANN001
    """Keep the backward's inputs for the double backward."""
    grad_out, x, weight, mean, invstd, code = inputs
    ctx.save_for_backward(grad_out, x, weight, mean, invstd, code)


def _double_backward(ctx, ggx, ggw, ggb):  # noqa: ANN001, ANN202
    """Vector-Jacobian product of the backward w.r.t. grad_out, input and weight (the Hessian terms of MAML)."""
    grad_out, x, weight, mean, invstd, code = ctx.saved_tensors
    d_go, d_x, d_w = torch.ops.metaformer.bn_relu_pool_double_backward(
        ggx, ggw, ggb, grad_out, x, weight, mean, invstd, code
    )
    return d_go, d_x, d_w, None, None, None


def _no_third_order(ctx, *grads):  # noqa: ANN001, ANN002, ANN202
    """Differentiating the double backward (a third-order gradient) is not implemented: say so instead of a
    silently wrong result (without a formula autograd would treat the op as constant)."""
    raise RuntimeError(
        "metaformer::bn_relu_pool: third-order gradients through the fused BatchNorm + ReLU + max-pool are not "
        "implemented; for them run the block as F.batch_norm, F.relu and F.max_pool2d (e.g. an nn.Sequential of the "
        "three layers), whose derivatives of every order PyTorch provides"
    )


def register_python_parts() -> None:
    """Attach fake kernels and autograd formulas to the C++ ops (once, after the extension loads)."""
    torch.library.register_fake(OP)(_fake_forward)
    torch.library.register_fake(BACKWARD_OP)(_fake_backward)
    torch.library.register_fake(DOUBLE_BACKWARD_OP)(_fake_double_backward)
    torch.library.register_autograd(OP, _backward, setup_context=_setup_forward)
    torch.library.register_autograd(BACKWARD_OP, _double_backward, setup_context=_setup_backward)
    torch.library.register_autograd(DOUBLE_BACKWARD_OP, _no_third_order, setup_context=lambda ctx, inputs, output: None)


if _HAS_OP:
    register_python_parts()
