"""Every head meta-trains a few steps on a tiny problem and its loss goes down."""

from __future__ import annotations

import pytest
import torch

from metaformer.data import EpisodeSampler, GlyphFamily, SinusoidFamily
from metaformer.heads import HEADS, FewShotHead, Reptile, build_head
from metaformer.models import Conv4, build_backbone

HEAD_OPTIONS = {
    "maml": dict(inner_steps=1, inner_lr=0.4),
    "fomaml": dict(inner_steps=2, inner_lr=0.4),
    "anil": dict(inner_steps=2, inner_lr=0.4),
    "metasgd": dict(inner_steps=1, inner_lr=0.4),
    "reptile": dict(inner_steps=3, inner_lr=0.1, outer_lr=0.5),
    "lstm": dict(inner_steps=2, inner_lr=0.3, hidden=8),
    "protonet": dict(),
    "matchingnet": dict(fce=True, fce_steps=2, scale=5.0),
    "baseline": dict(num_classes=64),
    "baselinepp": dict(num_classes=64),
    "probmaml": dict(inner_steps=1, inner_lr=0.4),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def glyph_batches() -> list:
    """Four fixed meta-batches of 4 tasks, 3-way 1-shot 3-query 16x16 glyphs."""
    sampler = EpisodeSampler(GlyphFamily("train", seed=0, image_size=16), 3, 1, 3, seed=0)
    return [sampler.batch(4 * i, 4) for i in range(4)]


def mean_loss(head: FewShotHead, batches: list) -> float:
    """Mean query loss over the batches, no meta-gradient."""
    with torch.no_grad():
        return sum(float(head.loss(b)[0]) for b in batches) / len(batches)


def test_every_registered_head_is_trained_here() -> None:
    assert set(HEAD_OPTIONS) == set(HEADS)


@pytest.mark.parametrize("name", sorted(HEAD_OPTIONS))
def test_head_loss_decreases(name: str, glyph_batches: list) -> None:
    torch.manual_seed(0)
    head = build_head(name, Conv4(1, hidden=16, num_blocks=4), n_way=3, **HEAD_OPTIONS[name])
    before = mean_loss(head, glyph_batches)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for step in range(12):
        batch = glyph_batches[step % len(glyph_batches)]
        if isinstance(head, Reptile):
            head.reptile_step(batch)
            continue
        opt.zero_grad()
        loss, metrics = head.meta_backward(batch)
        assert torch.isfinite(loss) and 0.0 <= metrics["accuracy"] <= 1.0
        opt.step()
    after = mean_loss(head, glyph_batches)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("name", ["maml", "metasgd"])
def test_sinusoid_regression_loss_decreases(name: str) -> None:
    torch.manual_seed(0)
    family = SinusoidFamily(10, 10, seed=0)
    batches = [family.batch(8 * i, 8) for i in range(3)]
    head = build_head(name, build_backbone("mlp", in_dim=1, hidden=40, num_layers=2), kind="regression",
                      inner_steps=1, inner_lr=0.01)
    assert head.resolve_path(batches[0].support_x) == "batched"
    before = mean_loss(head, batches)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for step in range(30):
        opt.zero_grad()
        _, metrics = head.meta_backward(batches[step % 3])
        assert "mse" in metrics
        opt.step()
    assert mean_loss(head, batches) < 0.85 * before
