"""Warm start: initialise a new run from the weights of another run (`train.init_from`).

Used for curricula (a 20-way Meta-Transformer started from a 5-way one) and for transfer between
learners (a Meta-Transformer whose backbone starts from a ProtoNet run). Tensors are matched by name
after `train.init_rename` prefix renames; only the weights move, never the optimiser or the step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

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


def _dotted_splits(name: str) -> Iterable[tuple[str, str]]:
    """(prefix, rest) at every dot boundary of a tensor name, from ("", name) on."""
    yield "", name
    for i, ch in enumerate(name):
        if ch == ".":
            yield name[: i + 1], name[i + 1:]


def suggest_rename(source: Iterable[str], target: Iterable[str]) -> Optional[tuple[dict[str, str], str, str, int]]:
    """The one prefix rename that maps the most source tensor names onto model names: (train.init_rename, a source
    name it maps, the model name it becomes, how many model names it reaches), or None when no rename maps any."""
    by_rest: dict[str, set[str]] = {}
    for name in target:
        for prefix, rest in _dotted_splits(name):
            by_rest.setdefault(rest, set()).add(prefix)
    reached: dict[tuple[str, str], set[str]] = {}
    example: dict[tuple[str, str], tuple[str, str]] = {}
    for name in source:
        for old, rest in _dotted_splits(name):
            for new in by_rest.get(rest, ()):
                if old == new:
                    continue
                key = (old, new)
                reached.setdefault(key, set()).add(new + rest)
                if key not in example or (name.endswith("weight") and not example[key][0].endswith("weight")):
                    example[key] = (name, new + rest)  # a weight says more than a BatchNorm step counter
    if not reached:
        return None
    # most names reached; on a tie the shorter prefixes (a MAML checkpoint holds its backbone as net.* and as
    # adapted_module.*: either maps, and net. is the shorter)
    best = min(reached, key=lambda k: (-len(reached[k]), len(k[0]) + len(k[1]), k))
    return {best[0]: best[1]}, example[best][0], example[best][1], len(reached[best])


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
        applied = f" with train.init_rename={rename}" if rename else ""
        # from the checkpoint's own names: the suggestion replaces a rename that matched nothing
        suggestion = suggest_rename(ckpt.model_state, target)
        if suggestion is None:
            raise CheckpointError(
                f"train.init_from={source}: no tensor name matches the model{applied}, nor does any prefix rename "
                f"(source has e.g. {next(iter(ckpt.model_state), '<none>')!r}, the model e.g. "
                f"{next(iter(target), '<none>')!r}); start from a run of a model that shares tensors with this one")
        fix, src_name, model_name, count = suggestion
        raise CheckpointError(
            f"train.init_from={source}: no tensor name matches the model{applied} (source has e.g. {src_name!r}, the "
            f"model e.g. {model_name!r}); map the prefixes with train.init_rename={fix}"
            f"{' instead' if rename else ''}, which matches {count} of the model's {len(target)} tensors"
        )
    with torch.no_grad():
        for name, value in new_state.items():
            target[name].copy_(value)
    return report
