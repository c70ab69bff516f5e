"""The fused ops on legal but unusual input, against their pure-PyTorch references: non-finite values propagate as
the references propagate them, zero tasks, invalid eps, and third-order gradients that are refused, not wrong."""

from __future__ import annotations

import pytest
import torch

from metaformer.ops import backend, batch_norm_relu_pool, inner_update, inner_update_reference
from metaformer.ops.conv_bn_relu_pool import conv3x3_bn_relu_pool, conv_stem_reference, fused_stem_available

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_extension_is_what_these_tests_exercise() -> None:
    assert backend() == "extension", "metaformer._C did not load: rebuild with pip install --no-build-isolation -e ."


def test_a_nan_gradient_with_clipping_makes_its_whole_task_nan_as_the_reference() -> None:
    g = torch.ones(3, 4)
    g[0, 1] = float("nan")
    p = torch.zeros(4)
    got = inner_update([p], [g], 0.1, max_grad_norm=1.0)[0]
    ref = inner_update_reference([p], [g], 0.1, max_grad_norm=1.0)[0]
    assert torch.isnan(got[0]).all() and torch.equal(torch.isnan(got), torch.isnan(ref))
    torch.testing.assert_close(got[1:], ref[1:])


@pytest.mark.parametrize("fn", [inner_update, inner_update_reference])
def test_zero_tasks_with_clipping_forward_and_backward(fn) -> None:  # noqa: ANN001
    p = torch.randn(3, requires_grad=True)
    out = fn([p], [torch.randn(0, 3)], 0.1, max_grad_norm=1.0)[0]
    assert out.shape == (0, 3)
    out.sum().backward()
    assert torch.equal(p.grad, torch.zeros(3))


def test_third_order_gradients_through_the_fused_block_tail_raise() -> None:
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    y = batch_norm_relu_pool(x, None, None, w, b, True, 0.1, 1e-5)
    gx = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)[0]
    h = torch.autograd.grad(gx.pow(2).sum(), x, create_graph=True)[0]  # second order: supported (MAML)
    with pytest.raises(RuntimeError, match="third-order gradients"):
        torch.autograd.grad(h.pow(2).sum(), [x, w])


def test_non_positive_eps_is_refused_like_f_batch_norm() -> None:
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="eps must be positive"):
        batch_norm_relu_pool(x, None, None, torch.ones(1), torch.zeros(1), True, 0.1, 0.0)
    with pytest.raises(ValueError, match="eps must be positive"):
        conv3x3_bn_relu_pool(x, torch.randn(3, 1, 3, 3), torch.zeros(3), torch.ones(3), torch.zeros(3), -1.0)


def test_a_non_finite_conv_bias_reaches_the_stem_output_as_in_the_reference() -> None:
    x, cw, cb = torch.randn(2, 1, 6, 6), torch.randn(4, 1, 3, 3), torch.randn(4)
    cb[1] = float("nan")
    gamma, beta = torch.ones(4), torch.zeros(4)
    assert fused_stem_available(x, cw, cb, gamma, beta)
    got = conv3x3_bn_relu_pool(x, cw, cb, gamma, beta)
    ref = conv_stem_reference(x, cw, cb, gamma, beta)
    assert torch.isnan(got[:, 1]).all() and torch.equal(torch.isnan(got), torch.isnan(ref))
    torch.testing.assert_close(torch.nan_to_num(got), torch.nan_to_num(ref), atol=1e-5, rtol=1e-5)
