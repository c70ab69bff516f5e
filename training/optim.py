"""Outer-loop optimiser (AdamW, Adam, SGD) and the warm-up + cosine/linear/constant learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import ConfigError, OptimConfig, longest_prefix


def _lr_scale(name: str, scales: dict) -> float:
    # the longest matching prefix wins, so {"backbone.": 0.1, "backbone.features.0.": 0.0} is unambiguous
    best = longest_prefix(name, scales)
    return 1.0 if best is None else float(scales[best])


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Groups by weight decay (1-d tensors without, unless configured) and by `optim.lr_scale` prefix."""
    scales = dict(cfg.lr_scale or {})
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    unmatched = [pre for pre in scales if not any(n.startswith(pre) for n in names)]
    if unmatched:
        raise ConfigError(
            f"optim.lr_scale prefix(es) {unmatched} match no trainable parameter; parameter names start with "
            f"{sorted({n.split('.')[0] + '.' for n in names})}"
        )
    # (scale, decayed?) -> params; scale 1.0 first, decayed before not, which is the layout (and so the
    # optimizer state_dict) of checkpoints written before lr_scale existed
    groups: dict[tuple[float, bool], list] = {(1.0, True): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = not (p.dim() <= 1 and not cfg.decay_norm_and_bias)
        groups.setdefault((_lr_scale(name, scales), decayed), []).append(p)
    order = sorted(groups, key=lambda k: (k[0] != 1.0, not k[1]))  # stable: other scales keep first-seen order
    # a scale of 0 keeps the group at lr 0: frozen exactly (AdamW's decay is lr * wd), resumable like the rest
    return [{"params": groups[k], "weight_decay": cfg.weight_decay if k[1] else 0.0, "lr": cfg.lr * k[0]}
            for k in order if groups[k] or k == (1.0, True)]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimiser over the model's trainable parameters."""
    groups = parameter_groups(model, cfg)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters; nothing to meta-train")
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=False)
    if cfg.name == "adam":
        # Adam's weight decay is L2 added to the gradient (the classic form), unlike AdamW's decoupled decay.
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=False)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=False)
    raise ValueError(f"optim.name must be adamw, adam or sgd, got {cfg.name!r}")


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the base learning rate at `step`: linear warm-up, then the configured decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying lr_factor; its state_dict (last_epoch) makes resume exact."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))
