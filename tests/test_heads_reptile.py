"""Reptile's outer update equals its formula theta += eps * (mean_t theta_t - theta)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metaformer.data import Episode, EpisodeBatch
from metaformer.heads import Reptile
from metaformer.models import Conv4


pytestmark = pytest.mark.usefixtures("one_thread")


def batch_of(seed: int) -> EpisodeBatch:
    """Three float64 2-way 2-shot tasks of 8x8 images."""
    g = torch.Generator().manual_seed(seed)
    return EpisodeBatch.collate([
        Episode(torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 0, 1, 1]),
                torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0]), ["a", "b"])
        for _ in range(3)
    ])


def manual_adapted(head: Reptile, batch: EpisodeBatch, steps: int, lr: float) -> list[list[torch.Tensor]]:
    """Per task: plain SGD on the support cross-entropy with native BatchNorm."""
    out = []
    for t in range(len(batch)):
        fast = {n: p.detach().clone().requires_grad_() for n, p in head.net.named_parameters()}
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(head.net, fast, (batch.support_x[t],)), batch.support_y[t])
            g = torch.autograd.grad(loss, list(fast.values()))
            fast = {n: (p - lr * gi).detach().requires_grad_() for (n, p), gi in zip(fast.items(), g)}
        out.append([p.detach() for p in fast.values()])
    return out


def test_reptile_step_equals_formula() -> None:
    torch.manual_seed(0)
    head = Reptile(Conv4(1, hidden=4, num_blocks=2), 2, inner_steps=3, inner_lr=0.2, outer_lr=0.5, path="batched").double()
    batch = batch_of(0)
    theta = [p.detach().clone() for p in head.net.parameters()]
    adapted = manual_adapted(head, batch, 3, 0.2)
    head.reptile_step(batch)
    for i, p in enumerate(head.net.parameters()):
        mean = torch.stack([a[i] for a in adapted]).mean(0)
        want = theta[i] + 0.5 * (mean - theta[i])
        assert torch.allclose(p.detach(), want, atol=1e-10, rtol=0)
    # conv biases feed BatchNorm (zero gradient), so check that the step moved the network as a whole
    assert sum(float((p.detach() - t0).abs().sum()) for p, t0 in zip(head.net.parameters(), theta)) > 1e-3


def test_reptile_meta_backward_with_sgd_is_the_reptile_step() -> None:
    torch.manual_seed(0)
    a = Reptile(Conv4(1, hidden=4, num_blocks=2), 2, inner_steps=2, inner_lr=0.2, outer_lr=0.3, path="loop").double()
    b = Reptile(Conv4(1, hidden=4, num_blocks=2), 2, inner_steps=2, inner_lr=0.2, outer_lr=0.3, path="loop").double()
    b.load_state_dict(a.state_dict())
    batch = batch_of(1)
    a.reptile_step(batch)
    opt = torch.optim.SGD(b.parameters(), lr=0.3)
    loss, metrics = b.meta_backward(batch, chunk_size=2)
    opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-10)
    assert loss.requires_grad is False and "accuracy" in metrics


def test_diverged_inner_loop_raises_and_leaves_the_parameters() -> None:
    """An inner loop that blows up (here: a huge inner lr on regression) makes reptile_step raise a clear
    FloatingPointError instead of writing NaN into every weight; the parameters are unchanged."""
    from metaformer.data import SinusoidFamily
    from metaformer.models import build_backbone

    torch.manual_seed(0)
    head = Reptile(build_backbone("mlp", in_dim=1, hidden=8, num_layers=2), kind="regression", inner_steps=5,
                   inner_lr=1e6, outer_lr=0.1)
    before = [p.detach().clone() for p in head.parameters()]
    with pytest.raises(FloatingPointError, match="inner loop diverged.*inner_lr=1000000.0.*unchanged"):
        head.reptile_step(SinusoidFamily(10, 10, seed=0).batch(0, 4))
    assert all(torch.equal(p, b) for p, b in zip(head.parameters(), before))
    head.inner_lr = 0.01  # a sane step on the same head still works
    head.reptile_step(SinusoidFamily(10, 10, seed=0).batch(0, 4))
    assert all(torch.isfinite(p).all() for p in head.parameters())
