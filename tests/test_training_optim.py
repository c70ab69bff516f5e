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


def test_lr_scale_groups_freeze_and_schedule(tmp_path: Path) -> None:
    from training.config import ConfigError
    from training.trainer import Trainer

    cfg = load_config(TINY, [f"out_dir={tmp_path / 'scaled'}", "optim.lr_scale={'backbone.': 0.0, 'blocks.': 0.5}",
                             "train.steps=3", "optim.warmup_steps=2"])
    trainer = Trainer(cfg)
    model = trainer.model
    by_param = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        want = 0.0 if name.startswith("backbone.") else 0.5 if name.startswith("blocks.") else 1.0
        assert by_param[id(p)] == pytest.approx(cfg.optim.lr * want * lr_factor(0, 3, cfg.optim)), name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.run()
    for name, p in model.named_parameters():
        # scale 0 freezes exactly (AdamW's decay is scaled by the lr too); the others move
        assert torch.equal(p, before[name]) == name.startswith("backbone."), name
    with pytest.raises(ConfigError, match=r"match no trainable parameter.*backbone\."):
        build_optimizer(model, load_config(TINY, ["optim.lr_scale={'encoder.': 0.1}"]).optim)
    with pytest.raises(ConfigError, match="optim.lr_scale values must be numbers >= 0"):
        load_config(TINY, ["optim.lr_scale={'backbone.': -1}"])


def test_group_layout_without_lr_scale_is_unchanged() -> None:
    # checkpoints written before lr_scale hold [decayed, not decayed]; even with weight_decay 0 both groups exist
    cfg = load_config(TINY, ["optim.weight_decay=0.0"])
    groups = build_optimizer(build_model(cfg), cfg.optim).param_groups
    assert len(groups) == 2 and all(p.dim() > 1 for p in groups[0]["params"])
    assert all(p.dim() <= 1 for p in groups[1]["params"])
