"""Random affine warps of training images, drawn per episode so that training stays exactly resumable.

``AugmentedEpisodes`` wraps an image episode sampler: every image of episode ``i`` (support and query) gets its
own random rotation, scale and shift, drawn from ``episode_generator(seed, i, stream)`` alone. So episode ``i``
is the same whichever batch, worker, rank or resumed run builds it, and a batch equals its episodes built one
by one. Validation and test episodes are never wrapped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from metaformer.data._rng import episode_generator
from metaformer.data.episodes import Episode, EpisodeBatch

__all__ = ["AffineAugment", "AugmentedEpisodes", "MappedEpisodes", "random_affine"]

# A stream of the episode generator that the sampler's own draws never use.
_AUGMENT_STREAM = 0xA06


@dataclasses.dataclass(frozen=True)
class AffineAugment:
    """Ranges of the random affine warp: rotation in degrees, scale and shift as fractions of the image size."""

    rotate: float = 10.0
    scale: float = 0.1
    shift: float = 0.1

    @classmethod
    def from_option(cls, value: Any) -> "AffineAugment | None":
        """Parse ``data.options.train_augment``: false / None (off), true (defaults) or a mapping of the ranges."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if not isinstance(value, Mapping):
            raise ValueError(f"train_augment must be true, false or a mapping such as {{rotate: 10, scale: 0.1, "
                             f"shift: 0.1}}, got {value!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"unknown train_augment keys {unknown}; valid: {sorted(fields)}")
        aug = cls(**{k: float(v) for k, v in value.items()})
        if not (0 <= aug.rotate <= 180 and 0 <= aug.scale < 1 and 0 <= aug.shift <= 1):
            raise ValueError(f"train_augment ranges out of bounds: {aug} (need 0 <= rotate <= 180, "
                             "0 <= scale < 1, 0 <= shift <= 1)")
        return aug


def random_affine(images: Tensor, aug: AffineAugment, gen: torch.Generator) -> Tensor:
    """Warp each image of ``images`` [B, C, H, W] by its own affine map drawn from ``gen`` (zeros outside)."""
    b = images.shape[0]
    if b == 0:
        return images
    u = torch.rand(b, 4, generator=gen, dtype=torch.float64) * 2 - 1  # uniform in [-1, 1]
    angle = u[:, 0] * math.radians(aug.rotate)
    scale = 1 + u[:, 1] * aug.scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid maps output coordinates in [-1, 1] to input ones, so a shift of f image widths is 2f there
    theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * 2 * aug.shift], 1),
                         torch.stack([sin, cos, u[:, 3] * 2 * aug.shift], 1)], 1).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class MappedEpisodes:
    """Episodes of a wrapped sampler whose support and query items pass through a map that depends on the episode
    index alone, so a batch equals its episodes built one by one (subclasses define ``_map``)."""

    def __init__(self, episodes: Any) -> None:
        """Wrap ``episodes`` (an EpisodeSampler or another MappedEpisodes)."""
        self.episodes = episodes

    def __getattr__(self, name: str) -> Any:
        """The wrapped sampler's attributes (source, n_range, k_range, q_query, seed, num_episodes)."""
        if name == "episodes":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.episodes, name)

    def _map(self, index: int, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """Episode ``index``'s support and query items, mapped."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> Episode:
        """Episode ``index`` of the wrapped sampler with its items mapped."""
        ep = self.episodes[index]
        sx, qx = self._map(int(index), ep.support_x, ep.query_x)
        return dataclasses.replace(ep, support_x=sx, query_x=qx)

    def batch(self, start: int, num_tasks: int) -> EpisodeBatch:
        """Episodes start .. start+num_tasks-1 as one batch, each mapped as in ``__getitem__``."""
        b = self.episodes.batch(start, num_tasks)
        sx = qx = None
        for t in range(num_tasks):
            # padded rows (mixed N or K) sit after the real ones and stay zero
            ns, nq = int(b.support_mask[t].sum()), int(b.query_mask[t].sum())
            s, q = self._map(start + t, b.support_x[t, :ns], b.query_x[t, :nq])
            if sx is None:  # the map may change an item's shape (a cached copy out of several)
                sx = s.new_zeros((num_tasks, b.support_x.shape[1], *s.shape[1:]))
                qx = q.new_zeros((num_tasks, b.query_x.shape[1], *q.shape[1:]))
            sx[t, :ns], qx[t, :nq] = s, q
        return b if sx is None else dataclasses.replace(b, support_x=sx, query_x=qx)


class AugmentedEpisodes(MappedEpisodes):
    """Image episodes whose every item is randomly warped, the warps a pure function of (seed, episode index)."""

    augmented = True

    def __init__(self, episodes: Any, aug: AffineAugment, seed: int) -> None:
        """Wrap ``episodes`` (an image EpisodeSampler); ``seed`` keys the warps."""
        if getattr(getattr(episodes, "source", None), "modality", "image") != "image":
            raise ValueError("train_augment warps images; these episodes are not images")
        super().__init__(episodes)
        self.aug, self.aug_seed = aug, int(seed)

    def _map(self, index: int, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """Episode ``index``'s support and query images, each warped; one generator, support first."""
        gen = episode_generator(self.aug_seed, index, _AUGMENT_STREAM)
        both = random_affine(torch.cat([support, query]), self.aug, gen)
        return both[: support.shape[0]], both[support.shape[0]:]
