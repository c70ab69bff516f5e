"""GlyphFamily: procedurally generated handwritten-like glyph classes, offline and unlimited.

Each class is a random set of 2-4 cubic Bezier strokes (some chained pen-stroke style), fixed by
(seed, split, class index). Each example is a jittered rendering of its class: a random affine
transform (rotation, anisotropic scale, shear, shift), per-control-point wobble and stroke
thickness noise, fixed by (seed, split, class index, item index). Rendering splats Gaussian dots
along the strokes with two batched matrix products, so a 5-way 16-item episode takes about a
millisecond. Splits use disjoint class-index ranges, so train/val/test classes never coincide.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from metaformer.data._rng import hash_uniform
from metaformer.data.source import ClassSource

__all__ = ["GlyphFamily"]

_SPLITS = {"train": 0, "val": 1, "test": 2}
# Effectively unlimited, yet small enough for exact int64 arithmetic and 32-bit-safe class ids.
_DEFAULT_NUM_CLASSES = 1 << 24
_ITEMS_PER_CLASS = 1 << 31
_MAX_STROKES = 4
_POINTS_PER_STROKE = 48


class GlyphFamily(ClassSource):
    """Procedural glyph classes: 1 x image_size x image_size float images in [0, 1], strokes = 1.

    ``split`` picks a disjoint class range; ``num_classes`` caps how many classes the split has
    (default 2**24, i.e. unlimited in practice). Every class has 2**31 distinct renderings.
    Difficulty knobs: ``jitter`` scales all per-example noise (1.0 = default).
    """

    modality = "image"

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        image_size: int = 28,
        num_classes: int | None = None,
        jitter: float = 1.0,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"GlyphFamily: split must be one of {sorted(_SPLITS)}, got {split!r}")
        if image_size < 8:
            raise ValueError(f"GlyphFamily: image_size must be >= 8, got {image_size}")
        n = _DEFAULT_NUM_CLASSES if num_classes is None else int(num_classes)
        if not 1 <= n <= _DEFAULT_NUM_CLASSES:
            raise ValueError(f"GlyphFamily: num_classes must be in 1..{_DEFAULT_NUM_CLASSES}, got {num_classes}")
        if jitter < 0:
            raise ValueError(f"GlyphFamily: jitter must be >= 0, got {jitter}")
        self.split, self.seed, self.image_size, self.jitter = split, int(seed), int(image_size), float(jitter)
        self._num_classes = n
        self._split_id = _SPLITS[split]
        coords = (torch.arange(image_size, dtype=torch.float64) + 0.5) / image_size * 2.0 - 1.0
        self._grid = coords

    @property
    def num_classes(self) -> int:
        """Number of classes in this split."""
        return self._num_classes

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one image: (1, image_size, image_size)."""
        return (1, self.image_size, self.image_size)

    def class_name(self, c: int) -> str:
        """Name of class c, e.g. 'glyph-train-17'."""
        return f"glyph-{self.split}-{int(c)}"

    def sizes_of(self, classes: Tensor) -> Tensor:
        """Every class has 2**31 renderings."""
        return torch.full(classes.shape, _ITEMS_PER_CLASS, dtype=torch.int64)

    def _class_strokes(self, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Control points [N, S, 4, 2] and stroke-active mask [N, S] of each class."""
        keys = np.stack(
            [np.full_like(classes, self.seed), np.full_like(classes, self._split_id), classes,
             np.full_like(classes, 0x61C8)], axis=-1,
        )
        u = hash_uniform(keys, 2 + _MAX_STROKES * (8 + 1))
        n_strokes = 2 + np.floor(u[:, 0] * 3).astype(np.int64)  # 2..4 strokes
        active = np.arange(_MAX_STROKES)[None, :] < n_strokes[:, None]
        pts = (u[:, 2 : 2 + _MAX_STROKES * 8].reshape(-1, _MAX_STROKES, 4, 2) * 2.0 - 1.0) * 0.7
        chain = u[:, 2 + _MAX_STROKES * 8 :] < 0.5  # [N, S]: start where the previous stroke ended
        for s in range(1, _MAX_STROKES):
            pts[:, s, 0] = np.where(chain[:, s, None], pts[:, s - 1, 3], pts[:, s, 0])
        return pts, active

    def render(self, classes: Tensor, indices: Tensor) -> Tensor:
        """Rendering ``indices[n, m]`` of class ``classes[n]`` -> [N, M, 1, H, W] float32 in [0, 1]."""
        cls = classes.detach().cpu().numpy().astype(np.int64)
        idx = indices.detach().cpu().numpy().astype(np.int64)
        if cls.ndim != 1 or idx.ndim != 2 or idx.shape[0] != cls.shape[0]:
            raise ValueError(f"render: want classes [N] and indices [N, M], got {cls.shape} and {idx.shape}")
        n, m = idx.shape
        pts, active = self._class_strokes(cls)
        keys = np.stack(
            [np.full((n, m), self.seed), np.full((n, m), self._split_id), np.broadcast_to(cls[:, None], (n, m)),
             idx, np.full((n, m), 0x7E11)], axis=-1,
        )
        u = hash_uniform(keys, 8 + _MAX_STROKES * 8).reshape(n * m, -1)
        j = self.jitter
        angle = (u[:, 0] - 0.5) * 2 * 0.30 * j
        scale_x = 1.0 + (u[:, 1] - 0.5) * 2 * 0.15 * j
        scale_y = 1.0 + (u[:, 2] - 0.5) * 2 * 0.15 * j
        shear = (u[:, 3] - 0.5) * 2 * 0.20 * j
        shift = (u[:, 4:6] - 0.5) * 2 * 0.12 * j
        sigma = 0.05 * (1.0 + (u[:, 6] - 0.5) * 2 * 0.3 * min(j, 1.0))  # stroke thickness noise
        wobble = (u[:, 8:].reshape(-1, _MAX_STROKES, 4, 2) - 0.5) * 2 * 0.09 * j
        c, s = np.cos(angle), np.sin(angle)
        # Affine A = R(angle) @ [[sx, shear*sy], [0, sy]], applied to every (wobbled) control point.
        a00, a01 = c * scale_x, (c * shear - s) * scale_y
        a10, a11 = s * scale_x, (s * shear + c) * scale_y
        ctrl = np.repeat(pts, m, axis=0) + wobble  # [B, S, 4, 2]
        x, y = ctrl[..., 0], ctrl[..., 1]
        bshape = (-1, 1, 1)
        ctrl = np.stack(
            [a00.reshape(bshape) * x + a01.reshape(bshape) * y + shift[:, 0].reshape(bshape),
             a10.reshape(bshape) * x + a11.reshape(bshape) * y + shift[:, 1].reshape(bshape)], axis=-1,
        )
        act = np.repeat(active, m, axis=0)
        return self._splat(ctrl, act, sigma).reshape(n, m, 1, self.image_size, self.image_size)

    def _splat(self, ctrl: np.ndarray, active: np.ndarray, sigma: np.ndarray) -> Tensor:
        """Draw cubic Bezier strokes as sums of Gaussian dots; saturate to [0, 1] intensity."""
        t = np.linspace(0.0, 1.0, _POINTS_PER_STROKE)
        basis = np.stack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3], axis=1)  # [P, 4]
        curve = torch.matmul(torch.from_numpy(basis), torch.from_numpy(ctrl))  # [B, S, P, 2]
        # Weight each dot by its share of arc length so the density is ~1 along every stroke.
        seg = (curve[:, :, 1:] - curve[:, :, :-1]).norm(dim=-1)  # [B, S, P-1]
        w = torch.zeros(curve.shape[:3], dtype=torch.float64)
        w[:, :, :-1] += seg * 0.5
        w[:, :, 1:] += seg * 0.5
        w = w * torch.from_numpy(active.astype(np.float64))[:, :, None]
        b = curve.shape[0]
        curve, w = curve.reshape(b, -1, 2), w.reshape(b, -1)
        sig = torch.from_numpy(sigma)[:, None, None]
        neg_inv = -0.5 / sig**2
        # In-place passes: these [B, S*P, size] tensors dominate the rendering time.
        gx = curve[:, :, 0:1] - self._grid
        gx.mul_(gx).mul_(neg_inv).exp_()  # [B, SP, W]
        gy = curve[:, :, 1:2] - self._grid
        gy.mul_(gy).mul_(neg_inv).exp_().mul_((w / (math.sqrt(2 * math.pi) * sig[:, :, 0]))[:, :, None])
        density = torch.bmm(gy.transpose(1, 2), gx)  # [B, H, W]
        # float64 throughout, rounded once at the end: the matmul's summation order may vary with
        # BLAS threading, and rounding to float32 hides that, keeping bytes identical across workers.
        return density.mul_(-3.0).exp_().neg_().add_(1.0).clamp_(0.0, 1.0).to(torch.float32)

    def get_items(self, classes: Tensor, indices: Tensor) -> Tensor:
        """Renderings ``indices[n, m]`` of class ``classes[n]`` as [N, M, 1, H, W]."""
        if int(classes.max()) >= self._num_classes or int(classes.min()) < 0:
            raise IndexError(f"GlyphFamily: class index out of range 0..{self._num_classes - 1}")
        return self.render(classes, indices)
