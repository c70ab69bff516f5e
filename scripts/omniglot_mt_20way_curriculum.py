#!/usr/bin/env python3
"""Curriculum for the 20-way Meta-Transformer: start from the 5-way 1-shot run, meta-train on 20-way
1-shot 5-query episodes for a wall-clock budget, then evaluate 20w1s and 20w5s (15 queries, 1000 fixed
episodes of the held-out alphabets) and the 5-way model on 5w5s.

Trained from scratch on 20-way episodes for minutes on a CPU, the Meta-Transformer stays at chance;
started from a 5-way model it learns 20-way quickly.

    .venv/bin/python scripts/omniglot_mt_20way_curriculum.py RUN_5WAY MINUTES OUT.json [EPISODES]
    .venv/bin/python scripts/omniglot_mt_20way_curriculum.py /tmp/acc/omni5w1s/runs/meta_transformer 15 /tmp/mt20.json 1000

RUN_5WAY is a run folder of `metaformer train` (e.g. from scripts/omniglot_time_boxed.sh).
"""
import argparse
import json
import time
from typing import Optional, Sequence

import torch

from training.config import Config, config_from_dict
from training.eval_cli import load_model
from training.evaluation import evaluate
from training.registry import build_episodes, build_model


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (positional arguments; --help shows the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_5way", metavar="RUN_5WAY", help="run folder of a 5-way Meta-Transformer `metaformer train` run")
    p.add_argument("minutes", metavar="MINUTES", type=float, help="wall-clock budget of the 20-way training, in minutes")
    p.add_argument("out", metavar="OUT.json", help="file the results are written to")
    p.add_argument("episodes", metavar="EPISODES", type=int, nargs="?", default=1000,
                   help="fixed evaluation episodes per setting (default: %(default)s)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Evaluate the 5-way model, grow it to 20 ways, train it for MINUTES, evaluate 20w1s and 20w5s."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.minutes > 0 or args.minutes == float("inf"):
        parser.error(f"MINUTES must be a positive number of minutes, got {args.minutes}")
    if args.episodes < 1:
        parser.error(f"EPISODES must be >= 1, got {args.episodes}")
    torch.set_num_threads(1)
    ep = args.episodes
    model5, ck = load_model(args.run_5way)
    base = ck.config
    res: dict = {}

    def cfg_with(**kw: object) -> Config:
        """The 5-way run's config with overrides given as data__n_way=20 (double underscore = dot)."""
        return config_from_dict(base.to_dict(), [f"{k.replace('__', '.')}={v}" for k, v in kw.items()])

    c = cfg_with(data__k_shot=5)
    r = evaluate(model5, build_episodes(c, c.eval.split), ep, 25, torch.device("cpu"), name="MT 5w5s (5-way model)")
    res["5w5s"] = (r.mean, r.ci95, r.seconds)
    print(res, flush=True)
    # the 5-way model has max_way=5: build the 20-way model and copy everything but the 15 new label rows
    ctrain = cfg_with(data__n_way=20, data__q_query=5)
    model = build_model(ctrain)
    sd5 = model5.state_dict()
    sd = model.state_dict()
    for k, v in sd5.items():
        if sd[k].shape == v.shape:
            sd[k] = v
        else:
            print("partial", k, tuple(v.shape), "->", tuple(sd[k].shape))
            new = sd[k].clone()
            new[: v.shape[0]] = v
            new[v.shape[0]:] *= v.norm(dim=-1).mean() / new[v.shape[0]:].norm(dim=-1).mean()
            sd[k] = new
    model.load_state_dict(sd)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    train_eps = build_episodes(ctrain, ctrain.data.train_split)
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.minutes * 60:
        batch = train_eps.batch(step * 8, 8)
        loss, m = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            print(f"step {step} loss {m['loss']:.3f} acc {m['accuracy']:.3f} t {time.perf_counter()-t0:.0f}s", flush=True)
    res["train20"] = dict(steps=step, seconds=time.perf_counter() - t0)
    for k in (1, 5):
        c = cfg_with(data__n_way=20, data__k_shot=k)
        r = evaluate(model, build_episodes(c, c.eval.split), ep, 10, torch.device("cpu"), name=f"MT 20w{k}s")
        res[f"20w{k}s"] = (r.mean, r.ci95, r.seconds)
        print(res, flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
