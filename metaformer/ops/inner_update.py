"""The fused, batched, differentiable inner-loop update: thin wrapper, fake kernel and autograd formula."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._extension import extension_has_cuda, load_extension
from .reference import CLIP_EPS, inner_update_reference, task_rows
from .validation import Rate, normalize_inputs

OP_NAME = "metaformer::inner_update"

# Resolved once at import: a plain module constant keeps the hot path free of lookups and lets
# torch.compile trace the wrapper without a cached-function call.
_EXTENSION = load_extension()
# An extension built without its CUDA kernels (METAFORMER_BUILD_CUDA=0, or a CPU torch at build time) has no CUDA
# implementation of the op: tensors off the CPU then take the pure-PyTorch reference instead of a dispatcher error.
_EXTENSION_CUDA = _EXTENSION is not None and extension_has_cuda()


def inner_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    lr: Rate,
    decay: Optional[Rate] = None,
    *,
    max_grad_norm: Optional[float] = None,
) -> list[Tensor]:
    """One inner-loop step for every tensor and task: new[i][t] = decay*params[i][t] - lr*clip_t*grads[i][t]."""
    spec = normalize_inputs(params, grads, lr, decay, max_grad_norm)
    if not spec.params:
        return []
    if _EXTENSION is None or (not _EXTENSION_CUDA and spec.grads[0].device.type != "cpu"):
        return inner_update_reference(spec.params, spec.grads, spec.lr_tensors if spec.lr_tensors is not None else spec.lr_scalar,
                                      spec.decay_tensors if spec.decay_tensors is not None else spec.decay_scalar,
                                      max_grad_norm=spec.max_grad_norm)
    return list(
        torch.ops.metaformer.inner_update(
            spec.params, spec.grads, spec.lr_tensors, spec.lr_scalar, spec.decay_tensors, spec.decay_scalar, spec.max_grad_norm
        )
    )


def inner_update_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    lr: Rate,
    decay: Optional[Rate] = None,
    *,
    max_grad_norm: Optional[float] = None,
) -> None:
    """In-place inner_update for task-batched contiguous params outside autograd (Reptile, FOMAML, evaluation)."""
    spec = normalize_inputs(params, grads, lr, decay, max_grad_norm)
    for i, p in enumerate(spec.params):
        if p.shape != spec.grads[i].shape or not p.is_contiguous():
            raise ValueError(
                f"inner_update_: params[{i}] must be task-batched {tuple(spec.grads[i].shape)} and contiguous to be "
                "updated in place; use inner_update (out of place) or expand(...).contiguous() it first"
            )
        if torch.is_grad_enabled() and p.requires_grad:
            raise ValueError(
                f"inner_update_: params[{i}] requires grad; an in-place update would break autograd. Use inner_update, "
                "or run under torch.no_grad()"
            )
    if not spec.params:
        return
    if _EXTENSION is None or (not _EXTENSION_CUDA and spec.grads[0].device.type != "cpu"):
        new = inner_update_reference(spec.params, spec.grads, spec.lr_tensors if spec.lr_tensors is not None else spec.lr_scalar,
                                     spec.decay_tensors if spec.decay_tensors is not None else spec.decay_scalar,
                                     max_grad_norm=spec.max_grad_norm)
        for p, n in zip(spec.params, new):
            p.copy_(n)
        return
    torch.ops.metaformer.inner_update_(
        spec.params, spec.grads, spec.lr_tensors, spec.lr_scalar, spec.decay_tensors, spec.decay_scalar, spec.max_grad_norm
    )


def _fake_inplace(params, grads, lr, lr_scalar, decay, decay_scalar, max_grad_norm):  # noqa: ANN001, ANN202
    """The in-place op returns nothing; its outputs are its mutated inputs."""
    return None


def _fake(params, grads, lr, lr_scalar, decay, decay_scalar, max_grad_norm):  # noqa: ANN001, ANN202
    """Shapes and dtypes of the outputs, for FakeTensor tracing under torch.compile."""
    return [g.new_empty(g.shape, dtype=p.dtype) for p, g in zip(params, grads)]


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    """Save what the backward formula needs: nothing but shapes and dtypes for plain steps; otherwise the
    inputs themselves, so that double backward stays connected."""
    params, grads, lr, lr_scalar, decay, decay_scalar, max_grad_norm = inputs
    n = len(params)
    ctx.n = n
    ctx.has_lr = lr is not None
    ctx.has_decay = decay is not None
    ctx.lr_scalar = lr_scalar
    ctx.decay_scalar = decay_scalar
    ctx.max_grad_norm = max_grad_norm
    ctx.acc = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    # Scalar lr and decay without clipping: the gradient is linear in grad_out with constant coefficients, so
    # keeping the inner gradients alive until the meta-backward (one copy per step) would be wasted memory.
    ctx.plain = lr is None and decay is None and max_grad_norm is None
    if ctx.plain:
        ctx.meta = [(p.shape, p.dtype, g.dtype) for p, g in zip(params, grads)]
    else:
        ctx.save_for_backward(*params, *grads, *(lr or ()), *(decay or ()))


def _reduce_to(t: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """Sum a broadcast gradient back to the shape and dtype of the input it belongs to."""
    if t.shape != shape:
        t = t.sum_to_size(shape)
    return t.to(dtype)


def _plain_backward(ctx, grad_outs):  # noqa: ANN001, ANN202
    """Gradients of new = d*p - lr*g for scalar d and lr (no clipping), from shapes and dtypes alone."""
    acc = ctx.acc
    if all(go is not None and go.dtype == acc for go in grad_outs) and all(
        pd == acc and gd == acc for _, pd, gd in ctx.meta
    ):
        # multi-tensor ops instead of a Python loop of per-tensor ops, which cost ~0.5 ms per inner step of a
        # Conv-4 (18 tensors); same arithmetic
        gos = list(grad_outs)
        scaled = gos if ctx.decay_scalar == 1.0 else list(torch._foreach_mul(gos, ctx.decay_scalar))
        d_params = [s_i if s_i.shape == shape else _reduce_to(s_i, shape, acc)
                    for s_i, (shape, _, _) in zip(scaled, ctx.meta)]
        return d_params, list(torch._foreach_mul(gos, -ctx.lr_scalar)), None, None, None, None, None
    d_params, d_grads = [], []
    for go, (shape, p_dtype, g_dtype) in zip(grad_outs, ctx.meta):
        if go is None:
            d_params.append(None)
            d_grads.append(None)
            continue
        go = go.to(acc)
        d_params.append(_reduce_to(go if ctx.decay_scalar == 1.0 else go * ctx.decay_scalar, shape, p_dtype))
        d_grads.append((go * -ctx.lr_scalar).to(g_dtype))
    return d_params, d_grads, None, None, None, None, None


def _backward(ctx, grad_outs):  # noqa: ANN001, ANN202
    """Gradients of new = d*p - lr*c*g, written with differentiable torch ops so that double backward works."""
    if ctx.plain:
        return _plain_backward(ctx, grad_outs)
    n = ctx.n
    saved = ctx.saved_tensors
    params, grads = saved[:n], saved[n : 2 * n]
    rest = saved[2 * n :]
    lrs = rest[:n] if ctx.has_lr else None
    decays = rest[n : 2 * n] if ctx.has_lr and ctx.has_decay else (rest[:n] if ctx.has_decay else None)
    num_tasks = grads[0].shape[0]
    acc = ctx.acc

    clip = norm = None
    if ctx.max_grad_norm is not None:
        sq = sum(task_rows(g.to(acc), num_tasks).pow(2).sum(dim=1) for g in grads)
        norm = sq.sqrt()
        clip = torch.clamp(ctx.max_grad_norm / (norm + CLIP_EPS), max=1.0)

    d_params, d_grads, d_lrs, d_decays = [], [], [], []
    dl_dclip = torch.zeros(num_tasks, dtype=acc, device=grads[0].device) if clip is not None else None
    for i in range(n):
        p, g = params[i], grads[i]
        go = grad_outs[i]
        if go is None:
            d_params.append(None)
            d_grads.append(None)
            d_lrs.append(None)
            d_decays.append(None)
            continue
        go = go.to(acc)
        view = (num_tasks,) + (1,) * (g.dim() - 1)
        lr_i = lrs[i].to(acc) if lrs is not None else ctx.lr_scalar
        d_i = decays[i].to(acc) if decays is not None else ctx.decay_scalar
        g_acc = g.to(acc)
        scaled = -go * lr_i  # dL/d(c * g)
        if clip is not None:
            c = clip.reshape(view)
            d_grads.append(scaled * c)
            dl_dclip = dl_dclip + task_rows(scaled * g_acc, num_tasks).sum(dim=1)
            d_lrs.append(_reduce_to(-go * c * g_acc, lrs[i].shape, lrs[i].dtype) if lrs is not None else None)
        else:
            d_grads.append(scaled)
            d_lrs.append(_reduce_to(-go * g_acc, lrs[i].shape, lrs[i].dtype) if lrs is not None else None)
        d_params.append(_reduce_to(go * d_i if isinstance(d_i, Tensor) or d_i != 1.0 else go, p.shape, p.dtype))
        d_decays.append(_reduce_to(go * p.to(acc), decays[i].shape, decays[i].dtype) if decays is not None else None)

    if clip is not None:
        # c = M / (n + eps) where that is below 1: dc/dg = -M / (n + eps)^2 * g / n; zero where no clipping happened.
        active = (ctx.max_grad_norm / (norm + CLIP_EPS)) < 1.0
        safe_norm = torch.where(active, norm, torch.ones_like(norm))
        coef = torch.where(active, -ctx.max_grad_norm / (safe_norm + CLIP_EPS).pow(2) / safe_norm, torch.zeros_like(norm))
        coef = dl_dclip * coef
        for i in range(n):
            if d_grads[i] is not None:
                view = (num_tasks,) + (1,) * (grads[i].dim() - 1)
                d_grads[i] = d_grads[i] + coef.reshape(view) * grads[i].to(acc)
    d_grads = [None if dg is None else dg.to(g.dtype) for dg, g in zip(d_grads, grads)]
    return (
        d_params,
        d_grads,
        d_lrs if ctx.has_lr else None,
        None,
        d_decays if ctx.has_decay else None,
        None,
        None,
    )


def register_python_parts() -> None:
    """Attach the fake kernel and autograd formula to the C++ op (called once, after the extension loads)."""
    torch.library.register_fake(OP_NAME)(_fake)
    torch.library.register_fake(OP_NAME + "_")(_fake_inplace)
    torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)


if _EXTENSION is not None:
    register_python_parts()
