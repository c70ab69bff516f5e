"""Train on cached features when the backbone is frozen: embed the training split once, then every step
runs only the in-context learner.

With a frozen backbone (``model.options.freeze_backbone: true``; any model whose ``backbone_frozen``
is true and that has a ``feature_view()``) a training step's backbone forward recomputes the same features every time it meets an example. The
cache embeds every item of the training split once (eval mode, no gradient) and draws the training
episodes from those features with the same sampler settings and seed, so step ``i`` sees the same
episode as without the cache; the model trains through ``feature_view()``, which shares its parameters.
Validation, evaluation and checkpoints still use the full model on raw inputs.

Warped training images (``data.options.train_augment``) need fresh features at every step, unless
``train.feature_cache_views`` is V >= 1: the cache then embeds V warped copies of every training image once (each
copy's warp a pure function of the sampler seed, the class and the copy) and every item of training episode ``i``
takes one of its V copies, drawn from ``(seed, i)`` alone, so a resumed run stays bit-identical. The learner then
meets warped training features as the backbone did in its own training, V draws of the warp per image.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
from torch import Tensor, nn

from metaformer.data._rng import episode_generator
from metaformer.data.augment import MappedEpisodes

# Above this many training items (a procedural family has 2**31 per class) there is nothing to cache.
MAX_CACHED_ITEMS = 5_000_000
# Streams of the episode generator: the warp of each cached copy, and each episode's choice of copies.
_VIEW_WARP_STREAM = 0xA07
_VIEW_PICK_STREAM = 0xA08


def cache_blocker(model: nn.Module, episodes: Any, world_size: int, views: int = 0) -> Optional[str]:
    """Why the training episodes of ``model`` cannot be cached (None when they can); ``views``: warped copies per image."""
    if not hasattr(model, "feature_view"):
        return f"{type(model).__name__} has no feature view (only the Meta-Transformer trains on cached features)"
    if not getattr(model, "backbone_frozen", False):
        return "the backbone trains (set model.options.freeze_backbone=true to freeze it)"
    if world_size > 1:
        return "it is not implemented for multi-process training"
    if getattr(episodes, "augmented", False) and views < 1:
        return ("the training images are augmented (data.options.train_augment): each step needs fresh features "
                "(or set train.feature_cache_views=V to embed V warped copies of every training image once)")
    source = getattr(episodes, "source", None)
    if source is None or not hasattr(source, "sizes_of"):
        return f"the training episodes ({type(episodes).__name__}) do not come from a class source"
    total = int(source.sizes_of(torch.arange(source.num_classes)).sum())
    if total > MAX_CACHED_ITEMS:
        return f"the training split has {total} items (a procedural family), more than {MAX_CACHED_ITEMS}"
    if views >= 1 and not getattr(episodes, "augmented", False):
        return ("train.feature_cache_views is set but the training images are not warped (data.options.train_augment "
                "is off): every copy would be the same; set train.feature_cache_views=0")
    return None


def cached_episodes(model: nn.Module, episodes: Any, batch_size: int = 512, progress: bool = False,
                    views: int = 0, bar: bool = False) -> Any:
    """Episodes over the frozen backbone's features of ``episodes.source``: same N, K, Q, seed and indices.

    Warped episodes (``AugmentedEpisodes``) need ``views`` >= 1: each item's V warped copies are embedded and every
    episode picks one copy per item (``ViewSampledEpisodes``). ``progress`` prints a summary line, ``bar`` shows a
    progress bar while warped copies are embedded (minutes for Omniglot).
    """
    from metaformer.data.sampler import EpisodeSampler
    from metaformer.inference import feature_source

    source = episodes.source
    augmented = getattr(episodes, "augmented", False)
    if augmented and views < 1:
        raise ValueError("these episodes warp their images: pass views >= 1 to cache warped copies")
    t0 = time.perf_counter()
    # on the backbone's device, in eval mode (a frozen backbone's only mode); the features land in host memory
    if augmented:
        feats = warped_feature_source(model.backbone, source, episodes.aug, episodes.seed, views,
                                      batch_size=batch_size, progress=bar)
    else:
        feats = feature_source(model.backbone, source, batch_size=batch_size)
    if progress:
        what = f"{views} warped copies of each of " if augmented else ""
        print(f"feature cache: {source.num_classes} classes, {what}{int(feats.items.shape[0])} items embedded once "
              f"({tuple(feats.items.shape[1:])} features) in {time.perf_counter() - t0:.1f} s", flush=True)
    sampler = EpisodeSampler(feats, episodes.n_range, episodes.k_range, episodes.q_query, seed=episodes.seed,
                             num_episodes=episodes.num_episodes)
    return ViewSampledEpisodes(sampler, views, episodes.seed) if augmented else sampler


def warped_feature_source(encoder: nn.Module, source: Any, aug: Any, seed: int, views: int, batch_size: int = 512,
                          progress: bool = False) -> Any:
    """A TensorClassSource whose items are the features [views, d] of ``views`` warped copies of each image of ``source``."""
    from metaformer.data.augment import random_affine
    from metaformer.inference import feature_source

    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")

    def warped_copies(c: int, items: Tensor) -> Tensor:
        # copy v of class c: its own generator, so the cache does not depend on the batch size or class order
        return torch.cat([random_affine(items, aug, episode_generator(seed, c, _VIEW_WARP_STREAM + v))
                          for v in range(views)])

    return feature_source(encoder, source, batch_size=batch_size, copies=warped_copies, progress=progress)


class ViewSampledEpisodes(MappedEpisodes):
    """Episodes over cached features [items, V, d] whose every item takes one of its V copies, drawn from (seed, index)."""

    def __init__(self, episodes: Any, views: int, seed: int) -> None:
        """Wrap ``episodes`` (an EpisodeSampler over a source whose items are [V, ...]); ``seed`` keys the draws."""
        super().__init__(episodes)
        self.views, self.view_seed = int(views), int(seed)

    def _map(self, index: int, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """Episode ``index``'s support and query items [n, V, ...] -> [n, ...], one copy each; support first."""
        both = torch.cat([support, query])
        gen = episode_generator(self.view_seed, index, _VIEW_PICK_STREAM)
        pick = torch.randint(self.views, (both.shape[0],), generator=gen)
        out = both[torch.arange(both.shape[0]), pick]
        return out[: support.shape[0]], out[support.shape[0]:]
