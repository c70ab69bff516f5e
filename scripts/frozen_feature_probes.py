#!/usr/bin/env python3
"""Probes of the Meta-Transformer on the frozen features of a trained ProtoNet backbone (issue 4).

Embeds the train / val / test splits of the ProtoNet run's data once (cached in --cache; "train" is the run's
own data.train_split, e.g. trainval), then trains a Meta-Transformer (by default d_model 128, 4 layers, 4
heads, label readout; --d-model, --layers, --heads, --readout, --weight-decay change it) on 20-way (--ways) 1-shot
5-query episodes of the training features for --minutes (or --steps) on one thread, and evaluates it on 1000 fixed test episodes (eval seed 2024, 15
queries) in the four Omniglot settings. Variants, each a regulariser tried against the learner's gap
between training and held-out accuracy:

- ``--aug K``: K augmented copies of every training image (random affine: rotation up to 15 degrees,
  scale and shear up to 0.15, shift up to 0.15 of the image), embedded once; every 5 steps each item is
  drawn afresh from its clean view and its K copies.
- ``--rot``: each task's features, standardised with the training split's mean and std, are turned by a
  random orthogonal matrix (so the learner cannot key on particular feature directions).
- ``--flip-classes``: the horizontally mirrored training images join as new classes (twice the classes, as
  rotations do in the first place), embedded once by the same backbone, which never saw them.
- ``--protores``: the logits get ``- alpha * ||q - c_k||^2`` added (ProtoNet's rule on the backbone
  features, alpha learned, starting at 1), so the learner only learns a residual on top of ProtoNet.
- ``--centroid-probes``: no learner; ProtoNet's nearest class mean on the test features after fixed transforms
  (L2 normalisation, centring on the training mean then L2 (SimpleShot's CL2N), square root then L2, whitening by
  the training split's within-class covariance with shrinkage), paired against the raw features per episode.

    .venv/bin/python scripts/frozen_feature_probes.py --protonet RUN --data-root ../shared/data \
        --cache /tmp/feats.pt --out /tmp/probe_base
    .venv/bin/python scripts/frozen_feature_probes.py ... --out /tmp/probe_aug8 --aug 8

Writes OUT/results.json (accuracy mean and 95% CI half-width per setting, steps, validation log) and
OUT/model.pt. Not a library feature: the results are in docs/omniglot_runs.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaformer.data.episodes import EpisodeBatch
from metaformer.data.sampler import EpisodeSampler
from metaformer.data.source import TensorClassSource
from metaformer.heads.protonet import class_means
from metaformer.inference import feature_source
from metaformer.models.hf_encoder import FeatureIdentity
from metaformer.models.meta_transformer import MetaTransformer, MetaTransformerConfig
from training.config import Config
from training.eval_cli import load_model
from training.evaluation import evaluate, mean_ci95
from training.registry import build_episodes


class RandomAffine(nn.Module):
    """Seeded random affine warp of a batch of images [B, C, H, W] (zeros outside the image)."""

    def __init__(self, seed: int, strength: float = 1.0) -> None:
        """Draw from a generator seeded with ``seed``; ``strength`` scales every range."""
        super().__init__()
        self.gen = torch.Generator().manual_seed(seed)
        self.strength = strength

    def forward(self, x: Tensor) -> Tensor:
        """Warp each image by its own rotation, scale, shear and shift."""
        n, g, s = x.shape[0], self.gen, self.strength
        ang = (torch.rand(n, generator=g) * 2 - 1) * math.radians(15) * s
        scale = 1 + (torch.rand(n, generator=g) * 2 - 1) * 0.15 * s
        shear = (torch.rand(n, generator=g) * 2 - 1) * 0.15 * s
        shift = (torch.rand(n, 2, generator=g) * 2 - 1) * 0.15 * s
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = cos / scale
        theta[:, 0, 1] = (-sin + shear) / scale
        theta[:, 1, 0] = sin / scale
        theta[:, 1, 1] = cos / scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


class HorizontalFlip(nn.Module):
    """Mirror a batch of images [B, C, H, W] left to right."""

    def forward(self, x: Tensor) -> Tensor:
        """The images flipped along their width."""
        return x.flip(-1)


class ProtoResidualMT(MetaTransformer):
    """A Meta-Transformer whose logits add ProtoNet's ``-alpha * squared distance`` to the class means of its input features."""

    def __init__(self, config: MetaTransformerConfig, backbone: nn.Module) -> None:
        """Build the model with alpha = 1."""
        super().__init__(config, backbone=backbone)
        self.alpha = nn.Parameter(torch.ones(()))

    def forward(self, batch: EpisodeBatch) -> Tensor:
        """The Meta-Transformer's logits minus alpha times the squared distances to the class means."""
        logits = super().forward(batch)
        protos, _ = class_means(batch.support_x, batch.support_y, batch.support_mask, self.config.max_way)
        return logits - self.alpha * torch.cdist(batch.query_x, protos) ** 2


def split_features(backbone: nn.Module | None, cfg: Config | None, data_root: str, cache: Path) -> dict[str, tuple]:
    """Frozen backbone features, labels and class names of the run's train / val / test splits (cached)."""
    if cache.exists():
        return torch.load(cache)
    feats = {}
    # "train" holds the run's own training part (train, or trainval for a data.train_split=trainval run)
    for split, part in (("train", cfg.data.train_split), ("val", "val"), ("test", "test")):
        src = build_episodes(cfg, part, data_root).source
        fs = feature_source(backbone, src, batch_size=1024)
        labels = torch.repeat_interleave(torch.arange(fs.num_classes), fs.sizes)
        feats[split] = (fs.items, labels, [fs.class_name(c) for c in range(fs.num_classes)])
    torch.save(feats, cache)
    return feats


def augmented_copies(backbone: nn.Module | None, cfg: Config | None, data_root: str, clean: Tensor, k: int, strength: float,
                     cache: Path) -> Tensor:
    """[k + 1, N, D]: the clean training features and k embedded augmented copies (cached)."""
    if cache.exists():
        return torch.stack(torch.load(cache))
    src = build_episodes(cfg, "train", data_root).source
    copies = [clean]
    for i in range(k):
        enc = nn.Sequential(RandomAffine(1000 + i, strength), backbone)
        copies.append(feature_source(enc, src, batch_size=1024).items)
    torch.save(copies, cache)
    return torch.stack(copies)


def feature_transforms(train_x: Tensor, train_y: Tensor) -> dict[str, Callable[[Tensor], Tensor]]:
    """Fixed feature maps fitted on the training split: normalisations and within-class whitening."""
    mu = train_x.mean(0)
    n_cls = int(train_y.max()) + 1
    means = torch.zeros(n_cls, train_x.shape[1]).index_add_(0, train_y, train_x)
    means = means / torch.bincount(train_y, minlength=n_cls).unsqueeze(1)
    resid = train_x - means[train_y]
    evals, evecs = torch.linalg.eigh(resid.T @ resid / len(train_x))
    maps: dict[str, Callable[[Tensor], Tensor]] = {
        "raw": lambda x: x,
        "l2n": lambda x: F.normalize(x, dim=-1),
        "cl2n": lambda x: F.normalize(x - mu, dim=-1),
        "sqrt_l2n": lambda x: F.normalize(x.clamp_min(0).sqrt(), dim=-1),
    }
    for lam in (0.1, 0.3, 1.0, 3.0):
        # shrinkage toward the mean eigenvalue keeps the near-null directions of the covariance from exploding
        shrink = lam * evals.mean()
        w = evecs @ torch.diag((evals + shrink).rsqrt()) @ evecs.T
        maps[f"whiten{lam}"] = lambda x, w=w: x @ w
    return maps


def centroid_probes(train_x: Tensor, train_y: Tensor, test: TensorClassSource, out: Path) -> None:
    """Nearest-class-mean accuracy on the test features under each fixed transform, paired against raw features."""
    maps = feature_transforms(train_x, train_y)
    res: dict[str, dict] = {}
    for n, k in ((5, 1), (5, 5), (20, 1), (20, 5)):
        sampler = EpisodeSampler(test, n, k, 15, seed=2024)
        accs: dict[str, list[Tensor]] = {name: [] for name in maps}
        for start in range(0, 1000, 50):
            b = sampler.batch(start, 50)
            for name, fn in maps.items():
                protos, _ = class_means(fn(b.support_x), b.support_y, b.support_mask, n)
                hit = (torch.cdist(fn(b.query_x), protos).argmin(-1) == b.query_y).float() * b.query_mask
                accs[name].append(hit.sum(-1) / b.query_mask.sum(-1))
        raw = torch.cat(accs["raw"])
        for name, parts in accs.items():
            acc = torch.cat(parts)
            mean, ci, _ = mean_ci95(acc.tolist())
            paired, paired_ci, _ = mean_ci95((acc - raw).tolist())
            row = {"mean": round(100 * mean, 2), "ci95": round(100 * ci, 2), "paired": round(100 * paired, 3),
                   "paired_ci95": round(100 * paired_ci, 3)}
            res.setdefault(f"{n}w{k}s", {})[name] = row
            print(f"{n}w{k}s {name:10s} {row['mean']:.2f} ± {row['ci95']:.2f}  paired {row['paired']:+.3f} ± "
                  f"{row['paired_ci95']:.3f}", flush=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))


def main() -> None:
    """Train one probe and write its results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--protonet", required=True, help="run folder of a `metaformer train` ProtoNet run")
    p.add_argument("--data-root", required=True)
    p.add_argument("--cache", type=Path, required=True, help="file for the cached features")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=0, help="train this many steps instead of --minutes (load-independent)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--aug", type=int, default=0, help="augmented copies of the training images")
    p.add_argument("--aug-strength", type=float, default=1.0)
    p.add_argument("--rot", action="store_true", help="random orthogonal rotation of standardised features per task")
    p.add_argument("--flip-classes", action="store_true", help="mirrored training images as new classes")
    p.add_argument("--protores", action="store_true", help="add ProtoNet's logits (learned scale) to the learner's")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--layers", type=int, default=4, help="the learner's Transformer layers")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--readout", choices=("label", "prototype", "residual"), default="label")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ways", type=int, default=20, help="classes per training episode (evaluation stays 5- and 20-way)")
    p.add_argument("--centroid-probes", action="store_true",
                   help="no learner: nearest class mean after fixed feature transforms, paired against raw features")
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    a.out.mkdir(parents=True, exist_ok=True)
    aug_cache = a.cache.with_name(f"{a.cache.stem}_aug{a.aug}_s{a.aug_strength}.pt")
    flip_cache = a.cache.with_name(f"{a.cache.stem}_flip.pt")
    # the ProtoNet run is only read when a cache is missing
    if not a.cache.exists() or (a.aug and not aug_cache.exists()) or (a.flip_classes and not flip_cache.exists()):
        proto, ckpt = load_model(a.protonet)
        backbone, run_cfg = proto.backbone, ckpt.config
    else:
        backbone, run_cfg = None, None
    feats = split_features(backbone, run_cfg, a.data_root, a.cache)
    if a.flip_classes:
        if not flip_cache.exists():
            src = build_episodes(run_cfg, run_cfg.data.train_split, a.data_root).source
            torch.save(feature_source(nn.Sequential(HorizontalFlip(), backbone), src, batch_size=1024).items, flip_cache)
        items, labels, names = feats["train"]
        feats["train"] = (torch.cat([items, torch.load(flip_cache)]), torch.cat([labels, labels + len(names)]),
                          names + [f"{n}/flip" for n in names])
    srcs = {k: TensorClassSource(v[0], v[1], v[2], name=k) for k, v in feats.items()}
    if a.centroid_probes:
        centroid_probes(feats["train"][0], feats["train"][1], srcs["test"], a.out)
        return
    dim = int(srcs["train"].items.shape[1])
    copies = None
    if a.aug:
        copies = augmented_copies(backbone, run_cfg, a.data_root, srcs["train"].items, a.aug, a.aug_strength, aug_cache)
    mu, sd = srcs["train"].items.mean(0), srcs["train"].items.std(0) + 1e-6
    train = EpisodeSampler(srcs["train"], a.ways, 1, 5, seed=123)
    cfg = MetaTransformerConfig(backbone="identity", d_model=a.d_model, n_layers=a.layers, n_heads=a.heads,
                                max_way=max(20, a.ways),
                                readout=a.readout)
    model = (ProtoResidualMT if a.protores else MetaTransformer)(cfg, backbone=FeatureIdentity(dim))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    gen = torch.Generator().manual_seed(7)

    def accuracy(split: str, n: int, k: int, episodes: int = 1000, seed: int = 2024) -> tuple[float, float]:
        """Mean and 95% CI half-width (%) on fixed episodes of a split's features."""
        r = evaluate(model, EpisodeSampler(srcs[split], n, k, 15, seed=seed), episodes, batch_tasks=50)
        model.train()
        return round(100 * r.mean, 2), round(100 * r.ci95, 2)

    log, step, t0 = [], 0, time.time()
    while (step < a.steps) if a.steps else (time.time() - t0 < a.minutes * 60):
        if copies is not None and step % 5 == 0:
            n = copies.shape[1]
            pick = torch.randint(0, copies.shape[0], (n,), generator=gen)
            srcs["train"].items = copies[pick, torch.arange(n)]
        batch = train.batch(step * a.batch, a.batch)
        if a.rot:
            q, _ = torch.linalg.qr(torch.randn(len(batch), dim, dim, generator=gen))
            sx = ((batch.support_x - mu) / sd) @ q * sd + mu
            qx = ((batch.query_x - mu) / sd) @ q * sd + mu
            batch = dataclasses.replace(batch, support_x=sx, query_x=qx)
        loss, metrics = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        step += 1
        if step % 250 == 0:
            print(f"step {step} loss {metrics['loss']:.3f} acc {metrics['accuracy']:.3f} t {time.time() - t0:.0f}",
                  flush=True)
        if step % a.eval_every == 0:
            log.append({"step": step, "val20w1s": accuracy("val", 20, 1, 300, 7), "t": round(time.time() - t0)})
            print(log[-1], flush=True)
    torch.save(model.state_dict(), a.out / "model.pt")
    res = {"args": {k: str(v) for k, v in vars(a).items()}, "steps": step, "train_s": time.time() - t0, "log": log}
    for n in (5, 20):
        for k in (1, 5):
            res[f"mt_{n}w{k}s"] = accuracy("test", n, k)
            print(n, k, res[f"mt_{n}w{k}s"], flush=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
