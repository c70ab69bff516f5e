"""The fused Conv-4 stem (conv 3x3 + batch-statistics BatchNorm + ReLU + 2x2 max-pool) against its composite,
its use in the MAML query pass, and the best block kernels (AVX-512 or AVX2) against the generic ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import metaformer.heads.functional as functional
from metaformer.heads import MAML
from metaformer.models import Conv4
from metaformer.ops import conv3x3_bn_relu_pool, conv_stem_bn_relu_pool, conv_stem_reference
from metaformer.ops.conv_bn_relu_pool import conv3x3_patches, fused_stem_available, is_conv_stem

pytestmark = pytest.mark.usefixtures("one_thread")

# (N, C_in, H, W): Omniglot's 28x28, RGB, odd sizes (a last row/column in no pooling window), tiny maps
SHAPES = [(3, 1, 28, 28), (2, 3, 9, 7), (4, 1, 5, 6), (2, 2, 2, 2), (2, 1, 13, 40)]


def params(c_in: int, c_out: int, dtype: torch.dtype, seed: int, bias: bool = True) -> list[Tensor]:
    """Conv weight, conv bias (or None), BatchNorm weight and bias, all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(c_out, c_in, 3, 3, generator=g, dtype=dtype) * 0.5).requires_grad_(True)
    b = (torch.randn(c_out, generator=g, dtype=dtype) * 0.3).requires_grad_(True) if bias else None
    gamma = (torch.rand(c_out, generator=g, dtype=dtype) + 0.5).requires_grad_(True)
    beta = (torch.randn(c_out, generator=g, dtype=dtype) * 0.3).requires_grad_(True)
    return [w, b, gamma, beta]


def images(shape: tuple, dtype: torch.dtype, seed: int) -> Tensor:
    """Inputs with a mean far from 0 (as image pixels), so the patch covariance has something to cancel."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 + 1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_composite(shape: tuple, dtype: torch.dtype, bias: bool) -> None:
    x = images(shape, dtype, 1)
    w, b, gamma, beta = params(shape[1], 5, dtype, 2, bias)
    got = conv3x3_bn_relu_pool(x, w, b, gamma, beta)
    ref = conv_stem_reference(x, w, b, gamma, beta)
    tol = 1e-11 if dtype == torch.float64 else 3e-5
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    wrt = [t for t in (w, b, gamma, beta) if t is not None]
    for a, r in zip(torch.autograd.grad(got, wrt, go), torch.autograd.grad(ref, wrt, go)):
        # the conv bias: exact zeros here, rounding noise around 0 in the composite
        torch.testing.assert_close(a, r, atol=tol * 10, rtol=tol * 10)
    if b is not None:
        assert torch.equal(torch.autograd.grad(conv3x3_bn_relu_pool(x, w, b, gamma, beta), b, go)[0], torch.zeros_like(b))


def test_gradcheck() -> None:
    x = images((3, 1, 6, 5), torch.float64, 4)
    w, b, gamma, beta = params(1, 3, torch.float64, 5)
    assert torch.autograd.gradcheck(lambda *p: conv3x3_bn_relu_pool(x, *p), (w, b, gamma, beta))


def test_once_differentiable_and_no_input_gradient() -> None:
    x = images((2, 1, 6, 6), torch.float64, 6)
    w, b, gamma, beta = params(1, 3, torch.float64, 7)
    out = conv3x3_bn_relu_pool(x, w, b, gamma, beta)
    with pytest.raises(RuntimeError, match="fused_query_stem = False"):
        torch.autograd.grad(out.sum(), w, create_graph=True)
    xg = x.clone().requires_grad_(True)
    assert not fused_stem_available(xg, w, b, gamma, beta)
    with pytest.raises(ValueError, match="requires_grad=True"):
        conv3x3_bn_relu_pool(xg, w, b, gamma, beta)
    # the overridable block function computes the composite, input gradient included
    got = conv_stem_bn_relu_pool(xg, w, b, None, None, gamma, beta, True, 0.1, 1e-5)
    torch.testing.assert_close(got, conv_stem_reference(xg, w, b, gamma, beta), atol=1e-12, rtol=1e-12)
    assert torch.autograd.grad(got.sum(), xg)[0].abs().sum() > 0


def test_opcheck() -> None:
    x = images((3, 2, 6, 5), torch.float64, 8)
    w, b, gamma, beta = params(2, 4, torch.float64, 9)
    torch.library.opcheck(torch.ops.metaformer.conv3x3_bn_relu_pool.default, (x, w, b, gamma, beta, 1e-5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, mean, invstd, code = torch.ops.metaformer.conv3x3_bn_relu_pool(x, w, b, gamma, beta, 1e-5)
    torch.library.opcheck(torch.ops.metaformer.conv3x3_bn_relu_pool_backward.default,
                          (torch.randn_like(out), x, w.detach(), gamma.detach(), mean, invstd, code))


def test_bad_input_names_the_problem() -> None:
    w, b, gamma, beta = (t.detach() for t in params(4, 3, torch.float32, 10))
    with pytest.raises(RuntimeError, match="at most 3 input channels"):
        torch.ops.metaformer.conv3x3_bn_relu_pool(torch.rand(2, 4, 6, 6), w, b, gamma, beta, 1e-5)
    with pytest.raises(RuntimeError, match=r"conv weight must be \[O, 1, 3, 3\]"):
        torch.ops.metaformer.conv3x3_bn_relu_pool(torch.rand(2, 1, 6, 6), w, b, gamma, beta, 1e-5)
    w1 = torch.randn(3, 1, 3, 3)
    with pytest.raises(RuntimeError, match=r"bn_weight must be \[O=3\]"):
        torch.ops.metaformer.conv3x3_bn_relu_pool(torch.rand(2, 1, 6, 6), w1, None, gamma[:2], beta, 1e-5)


def test_only_plain_3x3_convolutions_count_as_a_stem() -> None:
    assert is_conv_stem(torch.nn.Conv2d(1, 8, 3, padding=1))
    assert not is_conv_stem(torch.nn.Conv2d(1, 8, 3, padding=1, stride=2))
    assert not is_conv_stem(torch.nn.Conv2d(1, 8, 3, padding=0))
    assert not is_conv_stem(torch.nn.Conv2d(1, 8, 3, padding=1, padding_mode="reflect"))
    assert not is_conv_stem(torch.nn.Conv2d(1, 8, 5, padding=2))


def maml_meta_grad(fused: bool, dtype: torch.dtype) -> list[Tensor]:
    """Second-order MAML meta-gradient (Conv-4, loop path) with or without the fused query stem."""
    torch.manual_seed(0)
    t, n, k, q = 2, 3, 2, 3
    head = MAML(Conv4(1, hidden=6, num_blocks=2), n, inner_steps=2, inner_lr=0.3, path="loop").to(dtype)
    head.fused_query_stem = fused
    g = torch.Generator().manual_seed(1)
    xs = torch.rand(t, n * k, 1, 12, 12, generator=g, dtype=dtype)
    xq = torch.rand(t, n * q, 1, 12, 12, generator=g, dtype=dtype)
    ys = torch.arange(n).repeat_interleave(k).expand(t, -1)
    yq = torch.arange(n).repeat_interleave(q).expand(t, -1)
    out = head.adapt_batch(xs, ys)(xq)
    return list(torch.autograd.grad(F.cross_entropy(out.reshape(-1, n), yq.reshape(-1)), list(head.net.parameters())))


def test_the_heads_use_the_stem_where_it_is_the_faster() -> None:
    head = MAML(Conv4(1, hidden=6, num_blocks=2), 3)
    assert head.fused_query_stem is None
    assert head.query_stem_fused() == (torch.ops.metaformer.cpu_kernels() in ("avx512", "avx2"))
    head.fused_query_stem = False
    assert not head.query_stem_fused()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_maml_query_pass_runs_the_fused_stem_with_the_same_meta_gradient(dtype: torch.dtype, monkeypatch) -> None:  # noqa: ANN001
    calls = []

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args[0].shape)
        return conv3x3_bn_relu_pool(*args, **kwargs)

    monkeypatch.setattr(functional, "conv3x3_bn_relu_pool", counting)
    fused = maml_meta_grad(True, dtype)  # forced on: the op runs with either kernel set
    assert len(calls) == 2 and all(s == (9, 1, 12, 12) for s in calls)  # one query pass per task, never the support
    calls.clear()
    plain = maml_meta_grad(False, dtype)
    assert not calls
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for a, r in zip(fused, plain):
        torch.testing.assert_close(a, r, atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_patches_conv_and_its_double_backward_match_conv2d(shape: tuple, bias: bool) -> None:
    x = images(shape, torch.float64, 4)
    w, b, _, _ = params(shape[1], 5, torch.float64, 5, bias)
    wrt = [t for t in (w, b) if t is not None]
    v = torch.randn(shape[0], 5, *shape[2:], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    results = []
    for conv in (conv3x3_patches, lambda x_, w_, b_: F.conv2d(x_, w_, b_, padding=1)):
        y = conv(x, w, b)
        grads = torch.autograd.grad((y.tanh() * v).sum(), wrt, create_graph=True)  # as a MAML inner step
        step = [p - 0.1 * g for p, g in zip(wrt, grads)]
        y2 = conv(x, step[0], step[1] if b is not None else None)
        results.append([y, *torch.autograd.grad((y2 * y2).sum() + sum((g * g).sum() for g in grads), wrt)])
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, atol=1e-11, rtol=1e-11)


def test_patches_conv_rejects_what_it_cannot_compute() -> None:
    w = torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match="requires_grad=True"):
        conv3x3_patches(torch.randn(2, 1, 6, 6, requires_grad=True), w, None)
    with pytest.raises(ValueError, match=r"\(4, 1, 3, 3\)"):
        conv3x3_patches(torch.randn(2, 3, 6, 6), w, None)


def test_only_second_order_support_passes_run_the_stem_as_patches(monkeypatch) -> None:  # noqa: ANN001
    calls = []

    def counting(x, *args):  # noqa: ANN001, ANN002, ANN202
        calls.append(tuple(x.shape))
        return conv3x3_patches(x, *args)

    monkeypatch.setattr(functional, "conv3x3_patches", counting)
    maml_meta_grad(False, torch.float64)  # 2 tasks x 2 inner steps of 6 support images; the query passes: F.conv2d
    assert calls == [(6, 1, 12, 12)] * 4
    calls.clear()
    head = MAML(Conv4(1, hidden=6, num_blocks=2), 3, inner_steps=2, first_order=True, path="loop")
    head.adapt_batch(torch.rand(2, 6, 1, 12, 12), torch.arange(3).repeat(2).expand(2, -1))
    assert not calls  # first order: each support pass is differentiated once, where F.conv2d is as fast


# Run in a child with METAFORMER_SIMD=0 (the generic kernels) and in one with the best kernels the CPU has
# (AVX-512, else AVX2): statistics and argmax codes agree bit for bit (same arithmetic in the same order),
# BatchNorm+ReLU+max-pool outputs too; the stem's conv planes use fused multiply-adds, and the AVX-512
# pooled_grad_sums adds its cells in another order, so the stem's outputs and all gradients agree to rounding
# (the AVX2 kernels against the generic ones, bit for bit: test_ops_avx2_kernels.py).
CHILD = """
import sys, torch
import metaformer.ops  # noqa: F401  (registers the ops)
op = torch.ops.metaformer
res = {"kernels": op.cpu_kernels()}
for i, shape in enumerate([(3, 4, 28, 28), (2, 3, 9, 41), (2, 2, 7, 7), (1, 2, 6, 66)]):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(*shape, generator=g) * 2 + 1
    w = torch.rand(shape[1], generator=g) + 0.5
    b = torch.randn(shape[1], generator=g)
    out, mean, invstd, code = op.bn_relu_pool(x, w, b, 1e-5)
    go = torch.randn(out.shape, generator=g)
    u = torch.randn(shape, generator=g)
    res[f"bn{i}"] = (out, mean, invstd, code, *op.bn_relu_pool_backward(go, x, w, mean, invstd, code),
                     *op.bn_relu_pool_double_backward(u, w, b, go, x, w, mean, invstd, code))
    xi = torch.rand(shape[0], min(shape[1], 3), *shape[2:], generator=g) + 0.5
    cw = torch.randn(5, xi.shape[1], 3, 3, generator=g)
    gm = torch.rand(5, generator=g) + 0.5
    bt = torch.randn(5, generator=g)
    out, mean, invstd, code = op.conv3x3_bn_relu_pool(xi, cw, None, gm, bt, 1e-5)
    go = torch.randn(out.shape, generator=g)
    res[f"stem{i}"] = (out, mean, invstd, code, *op.conv3x3_bn_relu_pool_backward(go, xi, cw, gm, mean, invstd, code))
torch.save(res, sys.argv[1])
"""


def test_avx512_kernels_equal_the_generic_ones(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    results = {}
    for simd in ("1", "0"):
        path = tmp_path / f"simd{simd}.pt"
        env = {**os.environ, "METAFORMER_SIMD": simd, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, cwd=root, check=True)
        results[simd] = torch.load(path)
    assert results["0"]["kernels"] == "generic"
    assert results["1"]["kernels"] in ("avx512", "avx2", "generic")  # generic where the CPU lacks AVX2 + FMA
    for key, fast in results["1"].items():
        if key == "kernels":
            continue
        generic = results["0"][key]
        for j, (a, r) in enumerate(zip(fast, generic)):
            if j in (1, 2, 3) or (j == 0 and key.startswith("bn")):  # mean, invstd, code; fused outputs
                assert torch.equal(a, r), (key, j)
            else:
                torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5, msg=f"{key} output {j}")
