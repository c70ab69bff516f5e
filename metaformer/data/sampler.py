"""EpisodeSampler: N-way K-shot Q-query episodes, episode i a pure function of (seed, i)."""

from __future__ import annotations

import numbers
import warnings

import torch
from torch import Tensor

from metaformer.data._rng import episode_generator
from metaformer.data.episodes import Episode, EpisodeBatch, IndexedEpisodes
from metaformer.data.source import ClassSource

__all__ = ["EpisodeSampler", "draw_distinct"]

# Above this many candidates a full random permutation costs more than rejection sampling.
_PERMUTE_LIMIT = 1 << 16
# Below this many candidates (or when drawing over a quarter of them) a permutation beats rejection.
_SMALL_POOL = 256


def _as_range(value: int | tuple[int, int], name: str, minimum: int) -> tuple[int, int]:
    """Normalise an int or an inclusive (low, high) range and validate it."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a (low, high) tuple, got a bool")
    if isinstance(value, numbers.Integral):  # numpy ints too
        lo = hi = int(value)
    else:
        try:
            lo, hi = (int(v) for v in value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be an int or a (low, high) tuple, got {value!r}") from None
    if lo < minimum or hi < lo:
        raise ValueError(f"{name} must be >= {minimum} (and low <= high for a range), got {value!r}")
    return lo, hi


def draw_distinct(gen: torch.Generator, high: int, count: int) -> Tensor:
    """``count`` distinct ints from [0, high) in random order, drawn from ``gen`` only."""
    if count > high:
        raise ValueError(f"cannot draw {count} distinct values from {high}")
    if high <= max(_SMALL_POOL, 4 * count):
        return torch.randperm(high, generator=gen)[:count]
    out: list[int] = []
    seen: set[int] = set()
    while len(out) < count:
        for v in torch.randint(0, high, (2 * (count - len(out)),), generator=gen).tolist():
            if v not in seen:
                seen.add(v)
                out.append(v)
                if len(out) == count:
                    break
    return torch.tensor(out, dtype=torch.int64)


def _draw_items(gen: torch.Generator, sizes: Tensor, count: int) -> Tensor:
    """For each class n, ``count`` distinct item indices in [0, sizes[n]) -> [N, count]."""
    max_size = int(sizes.max())
    if max_size <= _PERMUTE_LIMIT:
        keys = torch.rand(sizes.numel(), max_size, generator=gen)
        if int(sizes.min()) != max_size:
            keys.masked_fill_(torch.arange(max_size)[None, :] >= sizes[:, None], 2.0)
        return torch.argsort(keys, dim=1, stable=True)[:, :count]
    return torch.stack([draw_distinct(gen, int(s), count) for s in sizes.tolist()])


class EpisodeSampler(IndexedEpisodes, torch.utils.data.Dataset):
    """Few-shot episodes from a class source.

    ``sampler[i]`` draws N classes without replacement, then K + Q distinct items per class
    (support and query disjoint), relabels the classes 0..N-1 in draw order, and returns an
    Episode with support/query sorted by label. It depends only on (seed, i): the same bytes in
    any process, any DataLoader worker count, any machine. ``n_way``/``k_shot`` may be inclusive
    (low, high) ranges to draw N/K per episode (mixed-size batches are padded by collate).
    Classes with fewer than K_max + Q items raise an error, or are dropped with a warning when
    ``on_small_class="drop"``.
    """

    def __init__(
        self,
        source: ClassSource,
        n_way: int | tuple[int, int],
        k_shot: int | tuple[int, int],
        q_query: int,
        seed: int = 0,
        num_episodes: int | None = None,
        on_small_class: str = "error",
    ) -> None:
        self.source = source
        self.n_range = _as_range(n_way, "n_way", 1)
        self.k_range = _as_range(k_shot, "k_shot", 1)
        if isinstance(q_query, bool) or not isinstance(q_query, numbers.Integral) or q_query < 0:
            raise ValueError(f"q_query must be an int >= 0, got {q_query!r}")
        if num_episodes is not None and num_episodes < 0:
            raise ValueError(f"num_episodes must be >= 0 or None (unlimited), got {num_episodes}")
        if on_small_class not in ("error", "drop"):
            raise ValueError(f"on_small_class must be 'error' or 'drop', got {on_small_class!r}")
        self.q_query, self.seed = int(q_query), int(seed)
        self.num_episodes = None if num_episodes is None else int(num_episodes)
        self.eligible = self._eligible_classes(on_small_class)
        self._uniform_size = self._common_size()
        self._labels: dict[tuple[int, int], Tensor] = {}
        n_avail = self.num_eligible
        if self.n_range[1] > n_avail:
            raise ValueError(
                f"n_way={self.n_range[1]} but the source has only {n_avail} classes with at least "
                f"{self.k_range[1] + q_query} items; lower n_way or use a source with more classes"
            )

    @property
    def num_eligible(self) -> int:
        """Number of classes episodes are drawn from."""
        return self.source.num_classes if self.eligible is None else int(self.eligible.numel())

    def _eligible_classes(self, on_small_class: str) -> Tensor | None:
        """Classes with at least K_max + Q items (None means all classes, without materialising them)."""
        need = self.k_range[1] + self.q_query
        num = self.source.num_classes
        if num == 0:
            raise ValueError("EpisodeSampler: the source has no classes; check the data path or split")
        if num > _PERMUTE_LIMIT * 16:
            # Procedural sources with effectively unlimited classes declare a uniform size.
            if int(self.source.sizes_of(torch.zeros(1, dtype=torch.int64))[0]) < need:
                raise ValueError(f"EpisodeSampler: classes have fewer than K+Q={need} items; lower k_shot or q_query")
            return None
        sizes = self.source.sizes_of(torch.arange(num))
        small = torch.nonzero(sizes < need).flatten()
        if small.numel() == 0:
            return None
        names = [f"{self.source.class_name(int(c))!r} ({int(sizes[c])} items)" for c in small[:5]]
        more = f" and {small.numel() - 5} more" if small.numel() > 5 else ""
        msg = (
            f"{small.numel()} of {num} classes have fewer than K+Q={need} items: {', '.join(names)}{more}"
        )
        if on_small_class == "error":
            raise ValueError(
                f"EpisodeSampler: {msg}; lower k_shot/q_query or pass on_small_class='drop' to skip them"
            )
        warnings.warn(f"EpisodeSampler: dropping {msg}", stacklevel=3)
        return torch.nonzero(sizes >= need).flatten()

    def _common_size(self) -> int | None:
        """The size shared by every eligible class, or None when sizes differ (or are not enumerable)."""
        num = self.source.num_classes
        if num > _PERMUTE_LIMIT * 16:
            return None
        classes = torch.arange(num) if self.eligible is None else self.eligible
        sizes = self.source.sizes_of(classes)
        return int(sizes[0]) if bool((sizes == sizes[0]).all()) else None

    def _label_vector(self, n: int, repeats: int) -> Tensor:
        """[0]*repeats + [1]*repeats + ... + [n-1]*repeats, a fresh tensor (built once per shape)."""
        key = (n, repeats)
        if key not in self._labels:
            self._labels[key] = torch.arange(n).repeat_interleave(repeats)
        return self._labels[key].clone()

    def episode_plan(self, index: int) -> tuple[Tensor, Tensor, int]:
        """The (source classes [N], item indices [N, K+Q], K) that episode ``index`` uses."""
        if index < 0:
            if self.num_episodes is None:
                raise IndexError(f"negative episode index {index} needs num_episodes to be set")
            index += self.num_episodes
        if self.num_episodes is not None and not 0 <= index < self.num_episodes:
            raise IndexError(f"episode {index} out of range for num_episodes={self.num_episodes}")
        gen = episode_generator(self.seed, index)
        n = self.n_range[0]
        if self.n_range[0] != self.n_range[1]:
            n = int(torch.randint(self.n_range[0], self.n_range[1] + 1, (1,), generator=gen))
        k = self.k_range[0]
        if self.k_range[0] != self.k_range[1]:
            k = int(torch.randint(self.k_range[0], self.k_range[1] + 1, (1,), generator=gen))
        picked = draw_distinct(gen, self.num_eligible, n)
        classes = picked if self.eligible is None else self.eligible[picked]
        m, size = k + self.q_query, self._uniform_size
        if size is not None and size <= _PERMUTE_LIMIT:
            # Same draw as _draw_items for equal sizes, minus the per-episode size lookups.
            items = torch.argsort(torch.rand(n, size, generator=gen), dim=1, stable=True)[:, :m]
        else:
            items = _draw_items(gen, self.source.sizes_of(classes), m)
        return classes, items, k

    def _gather_split(self, classes: Tensor, items: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Support [N*K, ...] and query [N*Q, ...] items, from one gather ordered support-first.

        Both come out contiguous (views of one buffer), so no slicing copies follow the gather.
        """
        n, m = items.shape
        per_item_class = classes.view(n, 1).expand(n, m)
        order_c = torch.cat([per_item_class[:, :k].reshape(-1), per_item_class[:, k:].reshape(-1)])
        order_i = torch.cat([items[:, :k].reshape(-1), items[:, k:].reshape(-1)])
        data = self.source.get_items(order_c, order_i.view(-1, 1)).flatten(0, 1)
        return data[: n * k], data[n * k :]

    def __getitem__(self, index: int) -> Episode:
        """Episode ``index``."""
        classes, items, k = self.episode_plan(int(index))
        n, q = classes.numel(), self.q_query
        if self.source.modality == "image":
            support_x, query_x = self._gather_split(classes, items, k)
        else:
            data = self.source.get_items(classes, items)
            support_x = [row[j] for row in data for j in range(k)]
            query_x = [row[j] for row in data for j in range(k, k + q)]
        return Episode(
            support_x,
            self._label_vector(n, k),
            query_x,
            self._label_vector(n, q),
            [self.source.class_name(c) for c in classes.tolist()],
        )

    def batch(self, start: int, num_tasks: int) -> EpisodeBatch:
        """Episodes start .. start+num_tasks-1 collated into one EpisodeBatch."""
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        indices = range(start, start + num_tasks)
        fixed = self.n_range[0] == self.n_range[1] and self.k_range[0] == self.k_range[1]
        if not fixed or self.source.modality != "image":
            return EpisodeBatch.collate([self[i] for i in indices])
        # Fixed N and K: one gather for all tasks gives the same bytes as collating episode by episode.
        plans = [self.episode_plan(int(i)) for i in indices]
        n, k, q = self.n_range[0], self.k_range[0], self.q_query
        classes = torch.cat([p[0] for p in plans])
        support_x, query_x = self._gather_split(classes, torch.cat([p[1] for p in plans]), k)
        shape = support_x.shape[1:]
        support_y = self._label_vector(n, k).expand(num_tasks, n * k).clone()
        query_y = self._label_vector(n, q).expand(num_tasks, n * q).clone()
        names = [self.source.class_name(c) for c in classes.tolist()]
        return EpisodeBatch(
            support_x=support_x.view(num_tasks, n * k, *shape),
            support_y=support_y,
            support_mask=torch.ones(num_tasks, n * k, dtype=torch.bool),
            query_x=query_x.view(num_tasks, n * q, *shape),
            query_y=query_y,
            query_mask=torch.ones(num_tasks, n * q, dtype=torch.bool),
            n_way=torch.full((num_tasks,), n, dtype=torch.int64),
            class_names=[names[t * n : (t + 1) * n] for t in range(num_tasks)],
        )
