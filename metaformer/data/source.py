"""The class-source protocol that EpisodeSampler draws from, and the in-memory sources behind it.

A class source is a set of classes, each with a number of items; the sampler asks it for
``get_items(classes [N], indices [N, M])`` once per episode, so gathering is one vectorised index
into a pre-decoded tensor for images and a list lookup for text.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "ClassSource",
    "TensorClassSource",
    "TextClassSource",
    "ClassSubset",
    "split_by_group",
    "MirroredClasses",
    "split_by_class",
    "RotatedClasses",
    "with_rotations",
]


class ClassSource:
    """Base class of every classification source (images or text).

    Subclasses set ``modality`` ("image" or "text") and implement ``num_classes``,
    ``class_name``, ``sizes_of`` and ``get_items``. ``groups`` (one group name per class, e.g. the
    Omniglot alphabet) is optional and used by ``split_by_group``.
    """

    modality: str = "image"

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        raise NotImplementedError

    def class_name(self, c: int) -> str:
        """Name of class c."""
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        """Names of all classes, in class-index order."""
        return [self.class_name(c) for c in range(self.num_classes)]

    def sizes_of(self, classes: Tensor) -> Tensor:
        """Number of items of each class in ``classes`` (int64 tensor, same shape)."""
        raise NotImplementedError

    @property
    def class_sizes(self) -> Tensor:
        """Number of items per class, in class-index order."""
        return self.sizes_of(torch.arange(self.num_classes))

    def get_items(self, classes: Tensor, indices: Tensor) -> Tensor | list[list[str]]:
        """Items ``indices[n, m]`` of class ``classes[n]``: a [N, M, *item_shape] tensor or N lists of M strings."""
        raise NotImplementedError

    @property
    def groups(self) -> list[str] | None:
        """Group name per class (e.g. alphabet), or None when the source has no groups."""
        return None

    def __len__(self) -> int:
        """Number of classes (so ``len(source)`` reads naturally)."""
        return self.num_classes

    def subset(self, classes: Sequence[int] | Tensor) -> "ClassSubset":
        """A view on some classes of this source, renumbered 0..len(classes)-1."""
        return ClassSubset(self, classes)


def _check_nonempty(n_items: int, what: str) -> None:
    """Raise a clear error for an empty data set."""
    if n_items == 0:
        raise ValueError(f"{what} is empty (no items); check the path, split or filter that produced it")


def _group_by_label(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Order of items sorted by label (stable), per-class offsets and per-class sizes."""
    order = torch.argsort(labels, stable=True)
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    sizes = torch.bincount(labels, minlength=num_classes)
    offsets = torch.zeros(num_classes, dtype=torch.int64)
    if num_classes > 1:
        offsets[1:] = torch.cumsum(sizes, 0)[:-1]
    return order, offsets, sizes


def _class_layout(
    labels: Tensor, n_items: int, class_names: Sequence[str] | None, groups: Sequence[str] | None, what: str, name: str
) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """Check one label per item (1-D, >= 0) and the names / groups per class; (order, offsets, sizes, names)."""
    _check_nonempty(n_items, name)
    if labels.dim() != 1:
        raise ValueError(f"{name}: labels must be 1-D (one class index per {what}), got shape {tuple(labels.shape)}")
    if n_items != labels.numel():
        raise ValueError(f"{name}: {n_items} {what}s but {labels.numel()} labels; pass one label per {what}")
    if int(labels.min()) < 0:
        raise ValueError(f"{name}: labels must be >= 0, got {int(labels.min())}")
    order, offsets, sizes = _group_by_label(labels)
    n = sizes.numel()
    if class_names is None:
        class_names = [str(c) for c in range(n)]
    if len(class_names) < n:
        raise ValueError(f"{name}: {len(class_names)} class names for {n} classes; pass one name per class")
    n = len(class_names)
    # named classes without items get empty slots, so a class index always means its name
    if sizes.numel() < n:
        sizes = torch.cat([sizes, sizes.new_zeros(n - sizes.numel())])
        offsets = torch.cat([offsets, offsets.new_full((n - offsets.numel(),), n_items)])
    if groups is not None and len(groups) != n:
        raise ValueError(f"{name}: {len(groups)} group names for {n} classes; pass one group per class")
    return order, offsets, sizes, list(class_names)


class _NamedClasses(ClassSource):
    """A source whose class names and groups are stored lists (``_class_names``, ``_groups``)."""

    _class_names: list[str]
    _groups: list[str] | None

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self._class_names)

    def class_name(self, c: int) -> str:
        """Name of class c."""
        return self._class_names[c]

    @property
    def class_names(self) -> list[str]:
        """Names of all classes, in class-index order."""
        return list(self._class_names)

    @property
    def groups(self) -> list[str] | None:
        """Group name per class, or None."""
        return list(self._groups) if self._groups is not None else None


class TensorClassSource(_NamedClasses):
    """Images (or any fixed-shape items) held in one tensor, grouped by class.

    ``items`` [num_items, *item_shape] may be uint8 (stored compactly, scaled to [0, 1] float on
    access) or float; ``labels`` [num_items] int64 in 0..num_classes-1.
    """

    modality = "image"

    def __init__(
        self,
        items: Tensor,
        labels: Tensor,
        class_names: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
        name: str = "tensor source",
    ) -> None:
        labels = torch.as_tensor(labels, dtype=torch.int64)
        order, offsets, sizes, class_names = _class_layout(labels, int(items.shape[0]) if items.dim() else 0,
                                                           class_names, groups, "item", name)
        self.items = items[order].contiguous() if not torch.equal(order, torch.arange(len(order))) else items
        self.offsets, self.sizes = offsets, sizes
        self._class_names = list(class_names)
        self._groups = list(groups) if groups is not None else None
        self.name = name

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one item, e.g. (1, 28, 28)."""
        return tuple(self.items.shape[1:])

    def sizes_of(self, classes: Tensor) -> Tensor:
        """Number of items of each class in ``classes``."""
        return self.sizes[classes]

    def get_items(self, classes: Tensor, indices: Tensor) -> Tensor:
        """Items ``indices[n, m]`` of class ``classes[n]`` as a float [N, M, *item_shape] tensor."""
        flat = self.offsets.index_select(0, classes).unsqueeze(1) + indices
        # index_select is several times faster than advanced indexing for a handful of rows.
        out = self.items.index_select(0, flat.reshape(-1)).view(*flat.shape, *self.items.shape[1:])
        if out.dtype == torch.uint8:
            return out.mul(1.0 / 255.0)  # promotes to float32 in one pass
        return out


class TextClassSource(_NamedClasses):
    """Text items (strings) grouped by class label."""

    modality = "text"

    def __init__(
        self,
        texts: Sequence[str],
        labels: Sequence[int] | Tensor,
        class_names: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
        name: str = "text source",
    ) -> None:
        labels = torch.as_tensor(list(labels) if not isinstance(labels, Tensor) else labels, dtype=torch.int64)
        order, offsets, sizes, class_names = _class_layout(labels, len(texts), class_names, groups, "text", name)
        self.texts = [str(texts[i]) for i in order.tolist()]
        self.offsets, self.sizes = offsets, sizes
        self._class_names = list(class_names)
        self._groups = list(groups) if groups is not None else None
        self.name = name

    def sizes_of(self, classes: Tensor) -> Tensor:
        """Number of items of each class in ``classes``."""
        return self.sizes[classes]

    def get_items(self, classes: Tensor, indices: Tensor) -> list[list[str]]:
        """Texts ``indices[n, m]`` of class ``classes[n]`` as N lists of M strings."""
        flat = (self.offsets[classes].unsqueeze(1) + indices).tolist()
        return [[self.texts[i] for i in row] for row in flat]


class ClassSubset(ClassSource):
    """Some classes of a parent source, renumbered 0..len(classes)-1 (a class split)."""

    def __init__(self, parent: ClassSource, classes: Sequence[int] | Tensor) -> None:
        idx = torch.as_tensor(list(classes) if not isinstance(classes, Tensor) else classes, dtype=torch.int64)
        if idx.numel() == 0:
            raise ValueError("ClassSubset: no classes selected; pass at least one class index")
        if int(idx.min()) < 0 or int(idx.max()) >= parent.num_classes:
            raise ValueError(
                f"ClassSubset: class indices must lie in 0..{parent.num_classes - 1}, "
                f"got {int(idx.min())}..{int(idx.max())}"
            )
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("ClassSubset: class indices repeat; pass each class once")
        self.parent, self.index = parent, idx
        self.modality = parent.modality

    @property
    def num_classes(self) -> int:
        """Number of classes in the subset."""
        return int(self.index.numel())

    def class_name(self, c: int) -> str:
        """Name of subset class c (the parent's name)."""
        return self.parent.class_name(int(self.index[c]))

    @property
    def groups(self) -> list[str] | None:
        """Group name per subset class, or None."""
        g = self.parent.groups
        return None if g is None else [g[i] for i in self.index.tolist()]

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one item (from the parent)."""
        return self.parent.item_shape  # type: ignore[attr-defined]

    def sizes_of(self, classes: Tensor) -> Tensor:
        """Number of items of each subset class in ``classes``."""
        return self.parent.sizes_of(self.index[classes])

    def get_items(self, classes: Tensor, indices: Tensor) -> Tensor | list[list[str]]:
        """Items of subset classes, fetched from the parent."""
        return self.parent.get_items(self.index[classes], indices)


def split_by_group(
    source: ClassSource,
    counts: dict[str, int] | None = None,
    groups: dict[str, Sequence[str]] | None = None,
    seed: int = 0,
) -> dict[str, ClassSubset]:
    """Split classes by group (e.g. Omniglot alphabet), never splitting a group across parts.

    Either ``counts`` (e.g. {"train": 25, "val": 5}: that many groups per part, drawn with ``seed``
    from the sorted group names) or ``groups`` (explicit group names per part).
    """
    class_groups = source.groups
    if class_groups is None:
        raise ValueError(
            f"split_by_group: {type(source).__name__} has no groups; use split_by_class or a source with groups"
        )
    names = sorted(set(class_groups))
    if (counts is None) == (groups is None):
        raise ValueError("split_by_group: pass exactly one of counts={part: n_groups} or groups={part: [names]}")
    if counts is not None:
        if any(n < 0 for n in counts.values()) or sum(counts.values()) > len(names):
            raise ValueError(
                f"split_by_group: asked for {sum(counts.values())} groups ({counts}) but the source has "
                f"{len(names)}; lower the counts"
            )
        shuffled = list(names)
        random.Random(seed).shuffle(shuffled)
        groups, start = {}, 0
        for part, n in counts.items():
            groups[part] = sorted(shuffled[start : start + n])
            start += n
    assert groups is not None
    seen: set[str] = set()
    for part, gs in groups.items():
        unknown = sorted(set(gs) - set(names))
        if unknown:
            raise ValueError(f"split_by_group: part {part!r} names unknown groups {unknown}; known groups: {names}")
        overlap = seen & set(gs)
        if overlap:
            raise ValueError(f"split_by_group: groups {sorted(overlap)} appear in more than one part")
        seen |= set(gs)
    out = {}
    for part, gs in groups.items():
        wanted = set(gs)
        out[part] = ClassSubset(source, [c for c, g in enumerate(class_groups) if g in wanted])
    return out


def split_by_class(source: ClassSource, ranges: dict[str, Sequence[int] | range]) -> dict[str, ClassSubset]:
    """Split classes by explicit class indices per part (e.g. HuffPost: train 0-19, val 20-24, test 25-40)."""
    seen: set[int] = set()
    for part, cs in ranges.items():
        overlap = seen & set(cs)
        if overlap:
            raise ValueError(f"split_by_class: classes {sorted(overlap)[:10]} appear in more than one part")
        seen |= set(cs)
    return {part: ClassSubset(source, list(cs)) for part, cs in ranges.items()}


_QUARTER_TURNS = {0: 0, 90: 1, 180: 2, 270: 3}


def _check_angles(angles: Sequence[int]) -> tuple[int, ...]:
    """Validate rotation angles (multiples of 90 degrees, distinct)."""
    angles = tuple(int(a) for a in angles)
    if not angles or any(a not in _QUARTER_TURNS for a in angles) or len(set(angles)) != len(angles):
        raise ValueError(f"rotation angles must be distinct values among 0, 90, 180, 270; got {angles}")
    return angles


def _rotated_names(parent: ClassSource, angles: tuple[int, ...]) -> tuple[list[str], list[str] | None]:
    """Class names '<name>/rotDDD' and groups for class c*R + r (rotations of one class adjacent)."""
    names = [f"{n}/rot{a:03d}" for n in parent.class_names for a in angles]
    g = parent.groups
    return names, None if g is None else [x for x in g for _ in angles]


class RotatedClasses(_NamedClasses):
    """Each parent class rotated by each angle is a new class: class c*R + r is class c rotated by angles[r].

    Rotation is counter-clockwise (as PIL's ``Image.rotate`` and the Omniglot ``rotDDD`` split names).
    """

    def __init__(self, parent: ClassSource, angles: Sequence[int] = (0, 90, 180, 270)) -> None:
        if parent.modality != "image":
            raise ValueError("rotations as classes need an image source; text cannot be rotated")
        self.parent, self.angles = parent, _check_angles(angles)
        self._class_names, self._groups = _rotated_names(parent, self.angles)
        self._turns = torch.tensor([_QUARTER_TURNS[a] for a in self.angles])

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one item (from the parent)."""
        return self.parent.item_shape  # type: ignore[attr-defined]

    def sizes_of(self, classes: Tensor) -> Tensor:
        """Number of items of each class."""
        return self.parent.sizes_of(torch.div(classes, len(self.angles), rounding_mode="floor"))

    def get_items(self, classes: Tensor, indices: Tensor) -> Tensor:
        """Items of the parent class, rotated by each class's angle."""
        r = len(self.angles)
        out = self.parent.get_items(torch.div(classes, r, rounding_mode="floor"), indices)
        turns = self._turns[classes % r]
        for k in torch.unique(turns).tolist():
            if k:
                sel = turns == k
                out[sel] = torch.rot90(out[sel], k, dims=(-2, -1))
        return out


class MirroredClasses(_NamedClasses):
    """Each parent class and its left-right mirror image: class 2c is class c, class 2c + 1 its mirror.

    For characters a mirror image is a new character (as a rotation is), so it doubles the classes a
    learner trains on; classes keep their parent's group, so a split by group stays one.
    """

    def __init__(self, parent: ClassSource) -> None:
        """Wrap ``parent``; only image sources can be mirrored."""
        if parent.modality != "image":
            raise ValueError("mirror images as classes need an image source; text cannot be mirrored")
        self.parent = parent
        self._class_names = [f"{n}{m}" for n in parent.class_names for m in ("", "/mirror")]
        g = parent.groups
        self._groups = None if g is None else [x for x in g for _ in range(2)]

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one item (from the parent)."""
        return self.parent.item_shape  # type: ignore[attr-defined]

    def sizes_of(self, classes: Tensor) -> Tensor:
        """Number of items of each class."""
        return self.parent.sizes_of(torch.div(classes, 2, rounding_mode="floor"))

    def get_items(self, classes: Tensor, indices: Tensor) -> Tensor:
        """Items of the parent class, flipped along the width for the odd (mirror) classes."""
        out = self.parent.get_items(torch.div(classes, 2, rounding_mode="floor"), indices)
        odd = classes % 2 == 1
        if bool(odd.any()):
            out[odd] = out[odd].flip(-1)
        return out


def with_rotations(source: ClassSource, angles: Sequence[int] = (0, 90, 180, 270)) -> ClassSource:
    """Rotations as new classes (class c*R + r = class c rotated by angles[r] counter-clockwise).

    A TensorClassSource is rotated once up front (R x the memory, no per-episode work); other
    image sources are rotated per episode by a RotatedClasses view.
    """
    angles = _check_angles(angles)
    if not isinstance(source, TensorClassSource):
        return RotatedClasses(source, angles)
    if source.modality != "image" or source.items.dim() < 3:
        raise ValueError("rotations as classes need image items [.., H, W]; this source holds something else")
    if source.items.shape[-1] != source.items.shape[-2] and any(a in (90, 270) for a in angles):
        raise ValueError(f"90/270-degree rotations need square images, got {tuple(source.items.shape[-2:])}")
    c, r = source.num_classes, len(angles)
    rotated = [torch.rot90(source.items, _QUARTER_TURNS[a], dims=(-2, -1)) for a in angles]
    # Interleave so all rotations of one class are adjacent: item order (class, rotation, item).
    chunks = []
    for cls in range(c):
        lo, hi = int(source.offsets[cls]), int(source.offsets[cls] + source.sizes[cls])
        chunks.extend(rot[lo:hi] for rot in rotated)
    items = torch.cat(chunks) if chunks else source.items[:0]
    labels = torch.arange(c * r).repeat_interleave(source.sizes.repeat_interleave(r))
    names, groups = _rotated_names(source, angles)
    return TensorClassSource(items, labels, names, groups, name=f"{source.name} with rotations {angles}")
