"""Short meta-training runs: the Meta-Transformer learns in context on glyphs and on sinusoids.

Both runs use a plain generic loop (``loss, metrics = model.loss(batch)``; backward; step), the same
loop the trainer uses, and evaluate on held-out tasks drawn with a different seed.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from metaformer.data import EpisodeBatch, EpisodeSampler, GlyphFamily, SinusoidFamily
from metaformer.models import MetaTransformer, MetaTransformerConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def meta_train(model: MetaTransformer, next_batch: Callable[[int], EpisodeBatch], steps: int, lr: float) -> list[dict[str, float]]:
    """Generic meta-training loop: AdamW on ``model.loss`` for ``steps`` batches."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    history = []
    model.train()
    for step in range(steps):
        loss, metrics = model.loss(next_batch(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(metrics)
    return history


# Measured (torch.manual_seed(0), sampler seeds 0 / 123, 200 steps of 8 tasks, 16x16 glyphs, one thread):
# held-out 5-way 1-shot accuracy 0.704 over 200 test-split episodes (train accuracy 0.73); chance is 0.20.
# With 120 steps it was 0.54, so 0.50 still fails a model that stops learning, and leaves room for
# CPU-dependent numerics.
GLYPH_STEPS = 200
GLYPH_THRESHOLD = 0.50


def test_meta_training_on_glyphs_beats_chance_on_held_out_classes() -> None:
    torch.manual_seed(0)
    cfg = MetaTransformerConfig(backbone="conv4", backbone_kwargs={"hidden": 16}, d_model=32, n_layers=2, n_heads=4,
                                max_way=5, label_code="fixed")
    model = MetaTransformer(cfg)
    train = EpisodeSampler(GlyphFamily("train", image_size=16), n_way=5, k_shot=1, q_query=5, seed=0)
    history = meta_train(model, lambda i: train.batch(8 * i, 8), steps=GLYPH_STEPS, lr=3e-3)
    test = EpisodeSampler(GlyphFamily("test", image_size=16), n_way=5, k_shot=1, q_query=5, seed=123)
    model.eval()
    with torch.no_grad():
        accs = [model.loss(test.batch(50 * j, 50))[1]["accuracy"] for j in range(4)]
    acc = sum(accs) / len(accs)
    print(f"glyph held-out 5-way 1-shot accuracy: {acc:.3f} (train acc last 10 steps: "
          f"{sum(h['accuracy'] for h in history[-10:]) / 10:.3f})")
    assert acc > GLYPH_THRESHOLD, f"held-out accuracy {acc:.3f} not above {GLYPH_THRESHOLD} (chance 0.20)"


def test_meta_training_on_sinusoids_beats_the_support_mean() -> None:
    torch.manual_seed(0)
    cfg = MetaTransformerConfig(task="regression", backbone="mlp", backbone_kwargs={"hidden": 32}, d_model=32,
                                n_layers=2, n_heads=4, d_in=1, d_out=1)
    model = MetaTransformer(cfg)
    train = SinusoidFamily(k_shot=10, q_query=10, seed=0)
    meta_train(model, lambda i: train.batch(16 * i, 16), steps=SINE_STEPS, lr=3e-3)
    test = SinusoidFamily(k_shot=10, q_query=10, seed=999).batch(0, 200)
    model.eval()
    with torch.no_grad():
        mse = model.loss(test)[1]["mse"]
    mean_pred = test.support_y.mean(dim=1, keepdim=True)  # every task is unpadded here (K=10, Q=10)
    baseline = float(((test.query_y - mean_pred) ** 2).mean())
    print(f"sinusoid held-out MSE: model {mse:.3f}, support-mean baseline {baseline:.3f}")
    assert mse < SINE_RATIO * baseline, f"model MSE {mse:.3f} not below {SINE_RATIO} x support-mean MSE {baseline:.3f}"


# Measured (torch.manual_seed(0), train seed 0, test seed 999, 150 steps of 16 tasks, K=10): held-out MSE
# 0.529 against 4.606 for predicting the support mean (ratio 0.11); the test asks for a ratio below 0.5.
SINE_STEPS = 150
SINE_RATIO = 0.5
