"""Episode and EpisodeBatch: the typed containers every model, head and trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Episode", "EpisodeBatch", "IndexedEpisodes"]


class IndexedEpisodes:
    """Length and iteration for a family whose episode ``i`` is ``self[i]`` (infinite when num_episodes is None)."""

    num_episodes: Optional[int]

    def __getitem__(self, index: int) -> "Episode":
        """Episode ``index``."""
        raise NotImplementedError

    def __len__(self) -> int:
        """Number of episodes (only when ``num_episodes`` was given)."""
        if self.num_episodes is None:
            raise TypeError(f"{type(self).__name__} has no length: pass num_episodes=... to use it as a finite dataset")
        return self.num_episodes

    def __iter__(self) -> Iterator["Episode"]:
        """Episodes 0, 1, 2, ... (forever when num_episodes is None)."""
        i = 0
        while self.num_episodes is None or i < self.num_episodes:
            yield self[i]
            i += 1


def _move(x: Tensor | list, device: torch.device | str, non_blocking: bool) -> Tensor | list:
    """Move a tensor to a device; text (lists of str) stays where it is."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=non_blocking)
    return x


def _pin(x: Tensor | list) -> Tensor | list:
    """Pin a tensor's memory; text (lists of str) is returned unchanged."""
    return x.pin_memory() if isinstance(x, Tensor) else x


def _num_items(x: Tensor | list) -> int:
    """Number of examples held by an item container (tensor rows or list entries)."""
    return int(x.shape[0]) if isinstance(x, Tensor) else len(x)


@dataclass
class Episode:
    """One few-shot task: a labelled support set and a labelled query set.

    Classification: ``support_y``/``query_y`` are int64 labels 0..N-1 and ``class_names[label]``
    names the original class. Regression: ``*_y`` are ``[S, d_out]`` floats and ``class_names`` is
    empty. Images are ``[C, H, W]`` floats in [0, 1]; text items are plain strings in a list.
    """

    support_x: Tensor | list
    support_y: Tensor
    query_x: Tensor | list
    query_y: Tensor
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Cheap length checks only: episodes are built thousands of times per second.
        if _num_items(self.support_x) != int(self.support_y.shape[0]):
            raise ValueError(
                f"Episode: support_x has {_num_items(self.support_x)} items but support_y has "
                f"{int(self.support_y.shape[0])} labels; pass one label per support item"
            )
        if _num_items(self.query_x) != int(self.query_y.shape[0]):
            raise ValueError(
                f"Episode: query_x has {_num_items(self.query_x)} items but query_y has "
                f"{int(self.query_y.shape[0])} labels; pass one label per query item"
            )

    @property
    def n_way(self) -> int:
        """Number of classes in the episode (0 for regression)."""
        return len(self.class_names)

    @property
    def is_regression(self) -> bool:
        """True when the targets are real-valued vectors rather than class labels."""
        return self.support_y.is_floating_point()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Episode":
        """Return a copy with every tensor on ``device`` (text stays a list)."""
        return Episode(
            _move(self.support_x, device, non_blocking),
            self.support_y.to(device, non_blocking=non_blocking),
            _move(self.query_x, device, non_blocking),
            self.query_y.to(device, non_blocking=non_blocking),
            list(self.class_names),
        )

    def pin_memory(self) -> "Episode":
        """Return a copy with pinned tensors (used by DataLoader(pin_memory=True))."""
        return Episode(
            _pin(self.support_x), self.support_y.pin_memory(), _pin(self.query_x),
            self.query_y.pin_memory(), list(self.class_names),
        )


def _pad_items(items: list[Tensor | list], n_max: int, is_text: bool) -> Tensor | list:
    """Stack per-task item sets into [T, n_max, ...], zero-padding (text: "" padding) at the end."""
    if is_text:
        return [list(x) + [""] * (n_max - len(x)) for x in items]
    shapes = {tuple(x.shape[1:]) for x in items}
    if len(shapes) > 1:
        raise ValueError(
            f"EpisodeBatch.collate: episodes have different item shapes {sorted(shapes)}; "
            "resize the inputs to one shape (e.g. image_size=...) before batching"
        )
    if all(int(x.shape[0]) == n_max for x in items):
        return torch.stack(items)
    first = items[0]
    out = first.new_zeros((len(items), n_max, *first.shape[1:]))
    for t, x in enumerate(items):
        out[t, : x.shape[0]] = x
    return out


def _pad_targets(ys: list[Tensor], n_max: int, regression: bool) -> Tensor:
    """Stack per-task targets into [T, n_max(, d_out)]; padding is -1 (labels) or 0 (regression)."""
    if all(int(y.shape[0]) == n_max for y in ys):
        return torch.stack(ys)
    first = ys[0]
    fill = 0.0 if regression else -1
    out = torch.full((len(ys), n_max, *first.shape[1:]), fill, dtype=first.dtype, device=first.device)
    for t, y in enumerate(ys):
        out[t, : y.shape[0]] = y
    return out


def _mask(counts: list[int], n_max: int, device: torch.device) -> Tensor:
    """Boolean [T, n_max] mask, True for the first counts[t] positions of task t."""
    return torch.arange(n_max, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]


@dataclass
class EpisodeBatch:
    """T episodes stacked along a leading task dimension, padded to the largest S and Q.

    Padding sits at the end of each task's support/query set: items are zeros (text: ""),
    labels are -1 (regression targets: 0) and the masks are False there.
    """

    support_x: Tensor | list
    support_y: Tensor
    support_mask: Tensor
    query_x: Tensor | list
    query_y: Tensor
    query_mask: Tensor
    n_way: Tensor
    class_names: list[list[str]]

    @classmethod
    def collate(cls, episodes: Sequence[Episode]) -> "EpisodeBatch":
        """Stack episodes (possibly of different N, K, Q) into one padded batch."""
        episodes = list(episodes)
        if not episodes:
            raise ValueError("EpisodeBatch.collate: got no episodes; pass at least one Episode")
        is_text = not isinstance(episodes[0].support_x, Tensor)
        regression = episodes[0].is_regression
        for e in episodes[1:]:
            if (not isinstance(e.support_x, Tensor)) != is_text or e.is_regression != regression:
                raise ValueError(
                    "EpisodeBatch.collate: cannot mix text with tensor inputs or regression with "
                    "classification episodes in one batch; batch each kind separately"
                )
        s_counts = [_num_items(e.support_x) for e in episodes]
        q_counts = [_num_items(e.query_x) for e in episodes]
        s_max, q_max = max(s_counts), max(q_counts)
        device = episodes[0].support_y.device
        return cls(
            support_x=_pad_items([e.support_x for e in episodes], s_max, is_text),
            support_y=_pad_targets([e.support_y for e in episodes], s_max, regression),
            support_mask=_mask(s_counts, s_max, device),
            query_x=_pad_items([e.query_x for e in episodes], q_max, is_text),
            query_y=_pad_targets([e.query_y for e in episodes], q_max, regression),
            query_mask=_mask(q_counts, q_max, device),
            n_way=torch.tensor([e.n_way for e in episodes], dtype=torch.int64, device=device),
            class_names=[list(e.class_names) for e in episodes],
        )

    def __len__(self) -> int:
        """Number of tasks T."""
        return int(self.support_mask.shape[0])

    @property
    def is_regression(self) -> bool:
        """True when the targets are real-valued vectors rather than class labels."""
        return self.support_y.is_floating_point()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "EpisodeBatch":
        """Return a copy with every tensor on ``device`` (text stays a list)."""
        return EpisodeBatch(
            _move(self.support_x, device, non_blocking),
            self.support_y.to(device, non_blocking=non_blocking),
            self.support_mask.to(device, non_blocking=non_blocking),
            _move(self.query_x, device, non_blocking),
            self.query_y.to(device, non_blocking=non_blocking),
            self.query_mask.to(device, non_blocking=non_blocking),
            self.n_way.to(device, non_blocking=non_blocking),
            [list(c) for c in self.class_names],
        )

    def pin_memory(self) -> "EpisodeBatch":
        """Return a copy with pinned tensors (used by DataLoader(pin_memory=True))."""
        return EpisodeBatch(
            _pin(self.support_x), self.support_y.pin_memory(), self.support_mask.pin_memory(),
            _pin(self.query_x), self.query_y.pin_memory(), self.query_mask.pin_memory(),
            self.n_way.pin_memory(), [list(c) for c in self.class_names],
        )

    def episode(self, t: int) -> Episode:
        """Task t as an Episode, with its padding removed."""
        if not -len(self) <= t < len(self):
            raise IndexError(f"EpisodeBatch.episode: task {t} out of range for a batch of {len(self)} tasks")
        s_mask, q_mask = self.support_mask[t], self.query_mask[t]
        if isinstance(self.support_x, Tensor):
            sx, qx = self.support_x[t][s_mask], self.query_x[t][q_mask]
        else:
            sx = [x for x, m in zip(self.support_x[t], s_mask.tolist()) if m]
            qx = [x for x, m in zip(self.query_x[t], q_mask.tolist()) if m]
        return Episode(sx, self.support_y[t][s_mask], qx, self.query_y[t][q_mask], list(self.class_names[t]))
