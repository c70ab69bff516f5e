"""Episodes per second on Omniglot (background set, rotations as classes) from the decoded cache.

Usage: .venv/bin/python scripts/bench_episodes.py [--data-root DIR] [--workers 2] [--seconds 3]
Measures 5-way 1-shot 15-query and 20-way 5-shot 15-query, single process (``sampler[i]`` and
``sampler.batch``) and through ``episode_loader`` with DataLoader workers.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from metaformer.data import EpisodeSampler, episode_loader, load_omniglot, with_rotations


def rate_single(sampler: EpisodeSampler, seconds: float) -> float:
    """Episodes/s drawing ``sampler[i]`` one after another for about ``seconds``."""
    for i in range(20):  # warm-up
        sampler[i]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            sampler[n]
            n += 1
    return n / (time.perf_counter() - t0)


def rate_batched(sampler: EpisodeSampler, tasks: int, seconds: float) -> float:
    """Episodes/s drawing collated batches ``sampler.batch(start, tasks)``."""
    sampler.batch(0, tasks)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sampler.batch(n, tasks)
        n += tasks
    return n / (time.perf_counter() - t0)


def rate_loader(sampler: EpisodeSampler, tasks: int, workers: int, num_batches: int) -> tuple[float, float]:
    """(start-up seconds, steady episodes/s) through ``episode_loader`` with ``workers`` DataLoader workers."""
    t0 = time.perf_counter()
    it = iter(episode_loader(sampler, tasks, num_batches=num_batches, num_workers=workers))
    next(it)
    t1 = time.perf_counter()
    count = sum(len(b) for b in it)
    return t1 - t0, count / (time.perf_counter() - t1)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse arguments, load Omniglot from the cache and print episodes/s per setting."""
    default_root = os.environ.get("METAFORMER_DATA_ROOT") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=default_root, help="folder holding omniglot/images_background.zip")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader measurement")
    p.add_argument("--seconds", type=float, default=3.0, help="time per single-process measurement")
    p.add_argument("--tasks", type=int, default=32, help="tasks per batch for batched / loader measurements")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the main process")
    args = p.parse_args(argv)
    # checked before the data set loads: torch, the sampler and the loader would fail later with less to go on
    for opt, value, ok, need in (("--workers", args.workers, args.workers >= 0, ">= 0"),
                                 ("--seconds", args.seconds, args.seconds > 0, "> 0"),
                                 ("--tasks", args.tasks, args.tasks >= 1, ">= 1"),
                                 ("--threads", args.threads, args.threads >= 1, ">= 1")):
        if not ok:
            p.error(f"{opt} must be {need}, got {value}")
    if not Path(args.data_root).is_dir():
        p.error(f"--data-root {args.data_root} is not a folder; pass the folder holding omniglot/images_background.zip "
                "(or set $METAFORMER_DATA_ROOT)")
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    base = load_omniglot(args.data_root, download=False)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    source = with_rotations(base)
    t_rot = time.perf_counter() - t0
    print(f"torch {torch.__version__}, {os.cpu_count()} cpus, {args.threads} thread(s) in the main process")
    print(f"Omniglot background from cache: {t_load:.3f} s load + {t_rot:.3f} s rotations -> "
          f"{source.num_classes} classes, items {tuple(source.items.shape)} {source.items.dtype}")
    for n, k, q in ((5, 1, 15), (20, 5, 15)):
        sampler = EpisodeSampler(source, n, k, q, seed=0)
        single = rate_single(sampler, args.seconds)
        batched = rate_batched(sampler, args.tasks, args.seconds)
        print(f"{n}-way {k}-shot {q}-query, single process: {single:6.0f} episodes/s (sampler[i]), "
              f"{batched:6.0f} episodes/s (sampler.batch of {args.tasks})")
        for workers in sorted({0, args.workers}):
            num_batches = max(8, int(batched * args.seconds / args.tasks))
            startup, steady = rate_loader(sampler, args.tasks, workers, num_batches)
            print(f"    episode_loader, {workers} workers: {steady:6.0f} episodes/s steady "
                  f"({num_batches} batches of {args.tasks}; first batch after {startup:.2f} s)")


if __name__ == "__main__":
    main()
