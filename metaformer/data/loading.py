"""DataLoader support: batches of episodes in worker processes, identical for any worker count.

Every batch is ``episodes.batch(start, T)`` for a start index computed from the batch number alone,
so which worker computes it changes nothing. ``EpisodeStream`` shards batch numbers over DataLoader
workers (worker w makes batches w, w + W, ...; the DataLoader's round-robin collection restores the
order) and, for data-parallel training, over ranks (rank r takes tasks r*T .. r*T+T-1 of each global
meta-batch of world_size*T tasks).
"""

from __future__ import annotations

from typing import Iterator, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from metaformer.data.episodes import EpisodeBatch

__all__ = ["EpisodeStream", "episode_loader", "BatchableEpisodes"]


class BatchableEpisodes(Protocol):
    """Anything with ``batch(start, num_tasks) -> EpisodeBatch`` (EpisodeSampler, SinusoidFamily)."""

    def batch(self, start: int, num_tasks: int) -> EpisodeBatch:
        """Episodes start .. start+num_tasks-1 as one batch."""
        ...


class EpisodeStream(IterableDataset):
    """Iterable of EpisodeBatch: batch b holds episodes of the global meta-batch b.

    With ``world_size`` ranks, global batch b covers episodes
    [b*world_size*T, (b+1)*world_size*T) and rank r yields its slice of T of them, so the union
    over ranks equals a single-process run with meta-batch world_size*T.
    """

    def __init__(
        self,
        episodes: BatchableEpisodes,
        tasks_per_batch: int,
        num_batches: int | None = None,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        worker_threads: int | None = 1,
    ) -> None:
        if tasks_per_batch < 1:
            raise ValueError(f"tasks_per_batch must be >= 1, got {tasks_per_batch}")
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches must be >= 0 or None (unlimited), got {num_batches}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.episodes, self.tasks_per_batch = episodes, tasks_per_batch
        self.num_batches, self.start_batch = num_batches, start_batch
        self.rank, self.world_size, self.worker_threads = rank, world_size, worker_threads

    def batch_at(self, b: int) -> EpisodeBatch:
        """Batch number b (counted from 0, not from start_batch) of this rank."""
        t = self.tasks_per_batch
        return self.episodes.batch((b * self.world_size + self.rank) * t, t)

    def __iter__(self) -> Iterator[EpisodeBatch]:
        """Batches start_batch, start_batch+1, ... (this worker's share when in a DataLoader worker)."""
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None and self.worker_threads is not None:
            # Workers default to sharing the cores; more threads per worker only oversubscribes.
            torch.set_num_threads(self.worker_threads)
        end = None if self.num_batches is None else self.start_batch + self.num_batches
        b = self.start_batch + worker
        while end is None or b < end:
            yield self.batch_at(b)
            b += num_workers


def episode_loader(
    episodes: BatchableEpisodes,
    tasks_per_batch: int,
    num_batches: int | None = None,
    start_batch: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A DataLoader yielding EpisodeBatch objects, the same sequence for any ``num_workers``."""
    stream = EpisodeStream(episodes, tasks_per_batch, num_batches, start_batch, rank, world_size)
    kwargs = {} if num_workers == 0 or prefetch_factor is None else {"prefetch_factor": prefetch_factor}
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        **kwargs,
    )
