"""torch.distributed set-up for torchrun launches: rank, world size, gloo on CPU / nccl on GPU."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0, which logs and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj` (a one-item list without a process group)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True when `flag` is True on at least one rank, so every rank takes the same branch."""
    return max_over_ranks(int(flag), info, device) > 0


def max_over_ranks(value: int, info: DistInfo, device: torch.device) -> int:
    """The largest of every rank's small non-negative integer `value` (all ranks get the same answer)."""
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def max_param_divergence(model: torch.nn.Module, info: DistInfo) -> float:
    """Largest |param - rank-0 param| over all ranks; 0.0 when DDP kept the replicas in sync."""
    if not info.enabled:
        return 0.0
    worst = torch.zeros(1, dtype=torch.float64)
    for p in model.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        worst = torch.maximum(worst, (p.detach() - ref).abs().max().double().cpu().reshape(1))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst.item())


def cleanup(info: DistInfo, synchronize: bool = False) -> None:
    """Leave the process group (after a barrier when ``synchronize``: the normal end of a run)."""
    if info.enabled and dist.is_initialized():
        if synchronize:
            # Gloo can abort a rank ("terminate called without an active exception") whose peer tears the group
            # down while its last exchange is still in flight; on an error path a barrier could hang instead
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()  # free what still holds the group (a dropped DDP wrapper's cycle) now, not at finalization


def mean_over_ranks(window: dict[str, list[float]], weight: float, info: DistInfo) -> dict[str, float]:
    """Per-key mean of every rank's logged values, each value weighted by `weight` (its rank's tasks per step).

    One collective per call (all ranks must call it together); without a process group, the plain means."""
    if not info.enabled:
        return {k: sum(v) / len(v) for k, v in window.items() if v}
    local = {k: (weight * sum(v), weight * len(v)) for k, v in window.items()}
    totals: dict[str, list[float]] = {}
    for part in all_gather_objects(local, info):
        for key, (total, count) in part.items():
            acc = totals.setdefault(key, [0.0, 0.0])
            acc[0] += total
            acc[1] += count
    return {k: total / count for k, (total, count) in totals.items() if count > 0}
