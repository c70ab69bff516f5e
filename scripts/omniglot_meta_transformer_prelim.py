"""Preliminary Omniglot run of the Meta-Transformer: time-boxed 5-way 1-shot meta-training, held-out alphabets.

Background set only (with 90/180/270 rotations as extra classes), split by alphabet (25 train / 5
held-out, ``omniglot_alphabet_split`` seed 0); evaluation on 1000 fixed episodes of the held-out
alphabets, mean accuracy and 95% confidence interval (1.96 * std / sqrt(episodes)).

    .venv/bin/python scripts/omniglot_meta_transformer_prelim.py --minutes 10 --out /tmp/omni_mt
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from metaformer.data import EpisodeSampler, load_omniglot, omniglot_alphabet_split
from metaformer.models import MetaTransformer, MetaTransformerConfig


def evaluate(model: MetaTransformer, sampler: EpisodeSampler, episodes: int, chunk: int = 50) -> tuple[float, float]:
    """Mean per-episode query accuracy and its 95% CI half-width over ``episodes`` fixed episodes."""
    model.eval()
    accs = []
    with torch.no_grad():
        for start in range(0, episodes, chunk):
            batch = sampler.batch(start, min(chunk, episodes - start))
            pred = model.predict(batch)
            correct = ((pred == batch.query_y) & batch.query_mask).sum(1) / batch.query_mask.sum(1)
            accs.append(correct.double())
    acc = torch.cat(accs)
    return float(acc.mean()), float(1.96 * acc.std() / math.sqrt(acc.numel()))


def main() -> None:
    """Train for a fixed wall-clock budget, then evaluate on held-out alphabets and write results.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget")
    ap.add_argument("--tasks-per-step", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-episodes", type=int, default=1000)
    ap.add_argument("--out", default="omniglot_mt_prelim")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    source = load_omniglot(args.data_root, sets=("background",), image_size=28, rotations=True, download=False)
    split = omniglot_alphabet_split(source, seed=0)
    print({k: v.num_classes for k, v in split.items()}, flush=True)
    cfg = MetaTransformerConfig(backbone="conv4", backbone_kwargs={"hidden": 64}, d_model=128, n_layers=4,
                                n_heads=4, max_way=20, label_code="fixed")
    model = MetaTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    train = EpisodeSampler(split["train"], n_way=5, k_shot=1, q_query=5, seed=0)
    budget = args.minutes * 60
    t0 = time.time()
    step = 0
    model.train()
    while time.time() - t0 < budget:
        # Warmup then cosine decay on elapsed time, because the run is time-boxed rather than step-boxed.
        frac = (time.time() - t0) / budget
        scale = min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = args.lr * scale
        loss, metrics = model.loss(train.batch(step * args.tasks_per_step, args.tasks_per_step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step} t={time.time() - t0:.0f}s {metrics}", flush=True)
        step += 1
    train_s = time.time() - t0
    out = Path(args.out)
    model.save_pretrained(out / "model")
    results = {"train_steps": step, "tasks_per_step": args.tasks_per_step, "train_seconds": round(train_s, 1),
               "threads": args.threads, "split": "Omniglot background, alphabet split 25/5 (seed 0), rotations"}
    for n, k in [(5, 1), (5, 5)]:
        t1 = time.time()
        sampler = EpisodeSampler(split["val"], n_way=n, k_shot=k, q_query=15, seed=1000)
        acc, ci = evaluate(model, sampler, args.eval_episodes)
        results[f"{n}-way {k}-shot"] = {"accuracy": round(acc, 4), "ci95": round(ci, 4),
                                        "episodes": args.eval_episodes, "eval_seconds": round(time.time() - t1, 1)}
        print(f"{n}-way {k}-shot held-out alphabets: {100 * acc:.2f} +- {100 * ci:.2f} %", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
