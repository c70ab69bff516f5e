"""Warm start: initialise a new run from the weights of another run (`train.init_from`).

Used for curricula (a 20-way Meta-Transformer started from a 5-way one) and for transfer between
learners (a Meta-Transformer whose backbone starts from a ProtoNet run). Tensors are matched by name
after `train.init_rename` prefix renames; only the weights move, never the optimiser or the step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from training.checkpoint import CheckpointError, read_checkpoint
from training.config import longest_prefix


@dataclass
class WarmStartReport:
    """What a warm start copied: full tensors, partial ones (grown leading dimension) and what it left."""

    source: Path
    copied: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    not_in_source: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log: counts and the first names of each group."""
        def few(names: list[str]) -> str:
            return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")

        parts = [f"init_from {self.source}: copied {len(self.copied)} tensor(s)"]
        if self.partial:
            parts.append(f"{len(self.partial)} partially (first rows: {few(self.partial)})")
        if self.not_in_source:
            parts.append(f"{len(self.not_in_source)} kept at their initial values ({few(self.not_in_source)})")
        if self.unused:
            parts.append(f"{len(self.unused)} source tensor(s) unused ({few(self.unused)})")
        return "; ".join(parts)


def _rename(name: str, rename: dict[str, str]) -> str:
    # the longest matching prefix wins, so {"net.": "", "net.head.": "classifier."} is unambiguous
    old = longest_prefix(name, rename)
    return name if old is None else rename[old] + name[len(old):]


def _grow_rows(target: Tensor, source: Tensor) -> Tensor:
    """Source rows first; the target's extra rows kept but rescaled to the source rows' mean norm."""
    out = target.detach().clone()
    n = source.shape[0]
    out[:n] = source.to(out.dtype)
    if out.is_floating_point() and out.dim() >= 2 and n < out.shape[0]:
        # new label embeddings drawn at init scale would be drowned out by trained ones (or dominate them)
        src_norm = source.float().flatten(1).norm(dim=1).mean()
        new_norm = out[n:].float().flatten(1).norm(dim=1).mean().clamp_min(1e-12)
        out[n:] *= (src_norm / new_norm).to(out.dtype)
    return out


def warm_start(model: nn.Module, source: Union[str, Path], rename: dict[str, str] | None = None) -> WarmStartReport:
    """Copy matching weights of a `metaformer train` checkpoint (run folder or step folder) into `model`."""
    rename = dict(rename or {})
    try:
        ckpt = read_checkpoint(source, with_trainer_state=False)
    except CheckpointError as exc:
        raise CheckpointError(f"train.init_from: {exc}") from None
    src = {_rename(k, rename): v for k, v in ckpt.model_state.items()}
    target = model.state_dict()
    report = WarmStartReport(source=ckpt.path)
    new_state: dict[str, Tensor] = {}
    mismatched: list[str] = []
    # only tensors the model declares as indexed by class (label embeddings) may grow; a conv with more
    # filters is another architecture, not a superset
    growable = set(getattr(model, "warm_start_growable", ()))
    for name, value in target.items():
        if name not in src:
            report.not_in_source.append(name)
            continue
        s = src[name]
        if tuple(s.shape) == tuple(value.shape):
            new_state[name] = s.to(value.dtype)
            report.copied.append(name)
        elif (name in growable and s.dim() == value.dim() >= 1 and s.shape[0] < value.shape[0]
              and s.shape[1:] == value.shape[1:]):
            new_state[name] = _grow_rows(value, s)
            report.partial.append(name)
        else:
            mismatched.append(f"{name}: source {tuple(s.shape)} vs model {tuple(value.shape)}")
    report.unused = sorted(set(src) - set(target))
    if mismatched:
        raise CheckpointError(
            f"train.init_from={source}: {len(mismatched)} tensor(s) have incompatible shapes "
            f"({'; '.join(mismatched[:3])}); only equal shapes can be warm-started, or more label rows for the "
            f"tensors the model lists as growable ({', '.join(sorted(growable)) or 'none'}): change the architecture "
            "settings (model.options, backbone) to match, or rename the tensors away with train.init_rename"
        )
    if not report.copied and not report.partial:
        example = next(iter(ckpt.model_state), "<none>")
        raise CheckpointError(
            f"train.init_from={source}: no tensor name matches the model (source has e.g. {example!r}, the model e.g. "
            f"{next(iter(target), '<none>')!r}); map the prefixes with train.init_rename, e.g. {{'net.': ''}}"
        )
    with torch.no_grad():
        for name, value in new_state.items():
            target[name].copy_(value)
    return report
