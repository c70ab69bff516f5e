"""The fused BatchNorm + ReLU + 2x2 max-pool op against its composite reference (F.batch_norm, relu, max_pool2d)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metaformer.heads import MAML
from metaformer.models import Conv4
from metaformer.ops import backend, batch_norm_relu_pool, bn_relu_pool_reference
from metaformer.ops.bn_relu_pool import batch_norm_module_relu_pool, fused_available, fusable_block_tail

pytestmark = pytest.mark.usefixtures("one_thread")

# even and odd sizes (odd rows/columns join the statistics but not the pooling), one image, one channel
SHAPES = [(3, 4, 6, 6), (2, 3, 7, 5), (5, 2, 3, 3), (1, 1, 4, 2), (4, 3, 2, 8)]
# rows of the AVX-512 kernels (the AVX2 ones: test_ops_avx2_kernels.py): Omniglot's 28 (14 pooled cells, one masked chunk), two chunks of 16 cells
# (40, and odd 41 whose last column is in no window), a third chunk (66), odd heights; plain loads where
# 32 floats fit in the plane, masked ones at its end
WIDE_SHAPES = [(2, 3, 28, 28), (2, 2, 9, 41), (1, 2, 6, 66), (3, 2, 7, 40)]


def affine(c: int, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    """A BatchNorm weight away from 0 and a bias, both requiring grad."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=g, dtype=dtype) + 0.5).requires_grad_(True)
    b = (torch.randn(c, generator=g, dtype=dtype) * 0.3).requires_grad_(True)
    return w, b


def fused(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """The fused path with batch statistics and no running buffers."""
    return batch_norm_relu_pool(x, None, None, w, b, True, 0.1, 1e-5)


def grads_to_second_order(fn, x: Tensor, w: Tensor, b: Tensor, go: Tensor) -> list[Tensor]:  # noqa: ANN001
    """First-order grads of <fn(x), go> and the grads of a scalar of them (exercises the double backward)."""
    gx, gw, gb = torch.autograd.grad(fn(x, w, b), (x, w, b), go, create_graph=True)
    scalar = (gx * torch.cos(x)).sum() + (gw * torch.arange(gw.numel(), dtype=gw.dtype)).sum() + gb.pow(2).sum()
    second = torch.autograd.grad(scalar, (x, w, b), allow_unused=True)
    return [gx, gw, gb] + [torch.zeros_like(t) if s is None else s for s, t in zip(second, (x, w, b))]


def test_extension_op_is_the_path_taken() -> None:
    assert backend() == "extension"
    x = torch.randn(2, 3, 4, 4)
    w, b = affine(3, torch.float32, 0)
    assert fused_available(x, w, b)
    assert fused(x, w, b).grad_fn.name().startswith("GeneratedBackwardFor_metaformer_bn_relu_pool")
    # what the op does not take falls back to the composite, with the same result
    assert not fused_available(x.to(memory_format=torch.channels_last), w, b)
    assert not fused_available(x.half(), w.half(), b.half())
    assert not fused_available(x, None, None)


@pytest.mark.parametrize("shape", SHAPES + WIDE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_matches_composite(shape: tuple, dtype: torch.dtype) -> None:
    x = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(1)) * 3 + 2
    w, b = affine(shape[1], dtype, 2)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(fused(x, w, b), bn_relu_pool_reference(x, w, b), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_and_gradgradcheck(shape: tuple) -> None:
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    w, b = affine(shape[1], torch.float64, 4)
    assert torch.autograd.gradcheck(fused, (x, w, b))
    assert torch.autograd.gradgradcheck(fused, (x, w, b))


@pytest.mark.parametrize("shape", SHAPES + WIDE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_first_and_second_order_gradients_match_composite(shape: tuple, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, dtype=dtype, generator=g).requires_grad_(True)
    w, b = affine(shape[1], dtype, 6)
    go = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, dtype=dtype, generator=g)
    got = grads_to_second_order(fused, x, w, b, go)
    ref = grads_to_second_order(bn_relu_pool_reference, x, w, b, go)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, atol=tol, rtol=tol)


def test_ties_go_to_the_first_window_position_as_in_max_pool2d() -> None:
    # weight 0 makes every value of a channel equal (all ties); integer-valued inputs make partial ties
    x = torch.randint(-2, 3, (3, 2, 6, 6), generator=torch.Generator().manual_seed(7)).double().requires_grad_(True)
    w = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.5, 0.25], dtype=torch.float64, requires_grad=True)
    go = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for a, r in zip(grads_to_second_order(fused, x, w, b, go), grads_to_second_order(bn_relu_pool_reference, x, w, b, go)):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10)


def test_nan_propagates_like_the_composite() -> None:
    x = torch.randn(2, 2, 4, 4)
    x[0, 1, 1, 2] = float("nan")
    w, b = affine(2, torch.float32, 9)
    out, ref = fused(x, w, b), bn_relu_pool_reference(x, w, b)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert bool(torch.isnan(out[:, 1]).all()) and not bool(torch.isnan(out[:, 0]).any())


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_form_updates_running_statistics_like_batchnorm(momentum: float | None) -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=momentum).double()
    ref_bn = copy.deepcopy(bn)
    for step in range(3):
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64) * (step + 1) + step
        torch.testing.assert_close(batch_norm_module_relu_pool(bn, x), F.max_pool2d(F.relu(ref_bn(x)), 2))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(ref_bn, name), atol=1e-12, rtol=1e-12)
    bn.eval()
    ref_bn.eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(batch_norm_module_relu_pool(bn, x), F.max_pool2d(F.relu(ref_bn(x)), 2))


def test_only_exact_block_tails_are_fused() -> None:
    assert fusable_block_tail(nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
    assert fusable_block_tail(nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d((2, 2), stride=2))
    assert not fusable_block_tail(nn.BatchNorm2d(4), nn.LeakyReLU(), nn.MaxPool2d(2))
    assert not fusable_block_tail(nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True))
    assert not fusable_block_tail(nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, stride=2))
    assert not fusable_block_tail(nn.SyncBatchNorm(4), nn.ReLU(), nn.MaxPool2d(2))


def unfused_copy(model: Conv4) -> nn.Module:
    """The same Conv-4 as a plain nn.Sequential run layer by layer (native BatchNorm, ReLU, max_pool2d)."""
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = copy.deepcopy(model.features)

        def forward(self, x: Tensor) -> Tensor:
            return self.features(x).mean(dim=(2, 3))

    return Plain()


@pytest.mark.parametrize("train", [True, False])
def test_conv4_equals_its_unfused_layers(train: bool) -> None:
    torch.manual_seed(0)
    model = Conv4(1, hidden=8, num_blocks=3).double()
    plain = unfused_copy(model)
    model.train(train)
    plain.train(train)
    x = torch.randn(6, 1, 20, 20, dtype=torch.float64)  # 20 -> 10 -> 5 -> 2: an odd map on the way
    torch.testing.assert_close(model(x), plain(x), atol=1e-12, rtol=1e-12)
    for (n, a), (_, r) in zip(model.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-12, msg=n)


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_meta_gradient_through_the_fused_op_matches_unfused_plain_loop(steps: int) -> None:
    """Second-order MAML (loop path, fused op) vs a per-task autograd loop over native layers, float64."""
    torch.manual_seed(0)
    t, n, k, q, lr = 3, 3, 2, 2, 0.3
    head = MAML(Conv4(1, hidden=6, num_blocks=2), n, inner_steps=steps, inner_lr=lr, path="loop").double()
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(t, n * k, 1, 10, 10, generator=g, dtype=torch.float64)
    xq = torch.randn(t, n * q, 1, 10, 10, generator=g, dtype=torch.float64)
    ys = torch.arange(n).repeat_interleave(k).expand(t, -1)
    yq = torch.arange(n).repeat_interleave(q).expand(t, -1)
    out = head.adapt_batch(xs, ys)(xq)
    got = torch.autograd.grad(F.cross_entropy(out.reshape(-1, n), yq.reshape(-1)), list(head.net.parameters()))

    plain = nn.Sequential()
    plain.add_module("backbone", unfused_copy(head.net.backbone))
    plain.add_module("classifier", copy.deepcopy(head.net.classifier))
    params = dict(plain.named_parameters())
    total = 0.0
    for i in range(t):
        fast = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(plain, fast, (xs[i],)), ys[i])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {name: p - lr * gr for (name, p), gr in zip(fast.items(), grads)}
        total = total + F.cross_entropy(functional_call(plain, fast, (xq[i],)), yq[i]) / t
    ref = torch.autograd.grad(total, list(params.values()))
    num = sum(((a - r) ** 2).sum() for a, r in zip(got, ref)).sqrt()
    assert float(num / sum((r**2).sum() for r in ref).sqrt()) < 1e-8
    # the Hessian term through BatchNorm is in there: first order differs
    head.first_order = True
    out = head.adapt_batch(xs, ys)(xq)
    fo = torch.autograd.grad(F.cross_entropy(out.reshape(-1, n), yq.reshape(-1)), list(head.net.parameters()))
    assert float(sum(((a - r) ** 2).sum() for a, r in zip(fo, ref)).sqrt()) > 1e-4


def test_opcheck() -> None:
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    w, b = affine(4, torch.float64, 10)
    torch.library.opcheck(torch.ops.metaformer.bn_relu_pool.default, (x, w, b, 1e-5))
    out, mean, invstd, code = torch.ops.metaformer.bn_relu_pool(x, w, b, 1e-5)
    go = torch.randn_like(out, requires_grad=True)
    torch.library.opcheck(torch.ops.metaformer.bn_relu_pool_backward.default,
                          (go, x, w, mean.detach(), invstd.detach(), code))


def test_bad_input_names_the_problem() -> None:
    w, b = affine(3, torch.float32, 11)
    with pytest.raises(RuntimeError, match=r"weight must be \[C=4\]"):
        torch.ops.metaformer.bn_relu_pool(torch.randn(2, 4, 4, 4), w, b, 1e-5)
    with pytest.raises(RuntimeError, match="too small"):
        torch.ops.metaformer.bn_relu_pool(torch.randn(2, 3, 1, 4), w, b, 1e-5)
    # the public function falls back to the composite for what the op does not take (here: 1-pixel rows)
    with pytest.raises(RuntimeError):
        batch_norm_relu_pool(torch.randn(2, 3, 1, 1), None, None, w, b, True)
