"""Train on cached features when the backbone is frozen: embed the training split once, then every step
runs only the in-context learner.

With a frozen backbone (``model.options.freeze_backbone: true``; any model whose ``backbone_frozen``
is true and that has a ``feature_view()``) a training step's backbone forward recomputes the same features every time it meets an example. The
cache embeds every item of the training split once (eval mode, no gradient) and draws the training
episodes from those features with the same sampler settings and seed, so step ``i`` sees the same
episode as without the cache; the model trains through ``feature_view()``, which shares its parameters.
Validation, evaluation and checkpoints still use the full model on raw inputs.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
from torch import nn

# Above this many training items (a procedural family has 2**31 per class) there is nothing to cache.
MAX_CACHED_ITEMS = 5_000_000


def cache_blocker(model: nn.Module, episodes: Any, world_size: int) -> Optional[str]:
    """Why the training episodes of ``model`` cannot be cached (None when they can)."""
    if not hasattr(model, "feature_view"):
        return f"{type(model).__name__} has no feature view (only the Meta-Transformer trains on cached features)"
    if not getattr(model, "backbone_frozen", False):
        return "the backbone trains (set model.options.freeze_backbone=true to freeze it)"
    if world_size > 1:
        return "it is not implemented for multi-process training"
    if getattr(episodes, "augmented", False):
        return "the training images are augmented (data.options.train_augment): each step needs fresh features"
    source = getattr(episodes, "source", None)
    if source is None or not hasattr(source, "sizes_of"):
        return f"the training episodes ({type(episodes).__name__}) do not come from a class source"
    total = int(source.sizes_of(torch.arange(source.num_classes)).sum())
    if total > MAX_CACHED_ITEMS:
        return f"the training split has {total} items (a procedural family), more than {MAX_CACHED_ITEMS}"
    return None


def cached_episodes(model: nn.Module, episodes: Any, batch_size: int = 512, progress: bool = False) -> Any:
    """An EpisodeSampler over the frozen backbone's features of ``episodes.source``: same N, K, Q, seed and indices."""
    from metaformer.data.sampler import EpisodeSampler
    from metaformer.inference import feature_source

    source = episodes.source
    t0 = time.perf_counter()
    # on the backbone's device, in eval mode (a frozen backbone's only mode); the features land in host memory
    feats = feature_source(model.backbone, source, batch_size=batch_size)
    if progress:
        print(f"feature cache: {source.num_classes} classes, {int(feats.items.shape[0])} items embedded once "
              f"({tuple(feats.items.shape[1:])} features) in {time.perf_counter() - t0:.1f} s", flush=True)
    return EpisodeSampler(feats, episodes.n_range, episodes.k_range, episodes.q_query, seed=episodes.seed,
                          num_episodes=episodes.num_episodes)
