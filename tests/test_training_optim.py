"""Outer optimiser and schedule: warm-up + cosine values by hand, decay groups, optimiser choice, clipping."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from training.config import load_config
from training.optim import build_optimizer, build_scheduler, lr_factor
from training.registry import build_model

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"


def test_warmup_then_cosine_by_hand() -> None:
    o = load_config(TINY, ["optim.warmup_steps=4", "optim.min_lr_ratio=0.1", "optim.schedule=cosine"]).optim
    assert [lr_factor(s, 14, o) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # After warm-up: 0.1 + 0.9 * 0.5 * (1 + cos(pi * (s - 4) / 10))
    assert lr_factor(4, 14, o) == pytest.approx(1.0)
    assert lr_factor(9, 14, o) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(14, 14, o) == pytest.approx(0.1)
    lin = load_config(TINY, ["optim.warmup_steps=0", "optim.schedule=linear"]).optim
    assert lr_factor(5, 10, lin) == pytest.approx(0.5)


def test_optimizers_groups_and_scheduler_steps() -> None:
    for name, cls in (("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)):
        cfg = load_config(TINY, [f"optim.name={name}", "optim.weight_decay=0.1"])
        model = build_model(cfg)
        opt = build_optimizer(model, cfg.optim)
        assert type(opt) is cls
        decay, no_decay = opt.param_groups
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        assert all(p.dim() <= 1 for p in no_decay["params"]) and all(p.dim() > 1 for p in decay["params"])
        n = sum(len(g["params"]) for g in opt.param_groups)
        assert n == len([p for p in model.parameters() if p.requires_grad])
    sched = build_scheduler(opt, cfg.optim, total_steps=12)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([cfg.optim.lr * lr_factor(s, 12, cfg.optim) for s in range(5)])


def test_grad_clip_bounds_the_logged_update(tmp_path: Path) -> None:
    from training.trainer import Trainer

    cfg = load_config(TINY, [f"out_dir={tmp_path / 'clip'}", "optim.grad_clip=0.01", "train.steps=1", "model.name=protonet",
                             "model.options={}"])
    trainer = Trainer(cfg)
    batch = trainer.train_episodes.batch(0, cfg.train.meta_batch)
    metrics, skipped = trainer._train_step(batch)
    assert not skipped and metrics["grad_norm"] > 0.01  # the norm before clipping is logged
    clipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in trainer.params if p.grad is not None))
    assert clipped == pytest.approx(0.01, rel=1e-4)
