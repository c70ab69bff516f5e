"""`metaformer eval`: load checkpoints, evaluate each on the same fixed episodes, write one comparison table."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Optional, Sequence

import torch

from training import checkpoint as ckpt_io
from training.config import Config, load_config, max_ways
from training.evaluation import EvalResult, combine_reports, evaluate, report_markdown, write_report
from training.registry import build_episodes, build_model


def load_model(path: str | Path, cfg: Optional[Config] = None, which: str = "latest",
               device: torch.device = torch.device("cpu")) -> tuple[torch.nn.Module, ckpt_io.Checkpoint]:
    """Build the model (from `cfg`, else the checkpoint's own config) and load the checkpoint's weights into it."""
    ckpt = ckpt_io.read_checkpoint(path, with_trainer_state=False, which=which)
    build_cfg = cfg if cfg is not None else ckpt.config
    if cfg is not None and cfg.data.source != "sinusoid":
        trained, asked = max_ways(ckpt.config.data), max_ways(cfg.data)
        if asked > trained:
            raise ckpt_io.CheckpointError(
                f"checkpoint {ckpt.path} was trained for at most {trained} ways, the evaluation asks for {asked}; "
                f"evaluate with data.n_way <= {trained}, or grow the model with train.init_from into a run with "
                f"data.n_way={asked} (the Meta-Transformer's learned label rows are kept) and train it there")
        # Fewer ways than the model was built for is fine (extra classes are masked per task): keep its size.
        build_cfg = copy.deepcopy(cfg)
        build_cfg.data.n_way, build_cfg.data.train_ways = ckpt.config.data.n_way, ckpt.config.data.train_ways
    model = build_model(build_cfg)
    ckpt_io.load_weights_into(model, ckpt, build_cfg.model.name)
    return model.to(device).eval(), ckpt


def evaluate_checkpoints(
    paths: Sequence[str | Path],
    cfg: Optional[Config] = None,
    which: str = "latest",
    data_root: Optional[str] = None,
    out_dir: Optional[str | Path] = None,
    device: str = "cpu",
    progress: bool = True,
) -> list[EvalResult]:
    """Evaluate every checkpoint on the episodes that `cfg` (or the first checkpoint's config) fixes.

    With a single checkpoint and a config, the model is built from the config, so a checkpoint of another
    model or architecture fails with a clear error; with several, each model comes from its own checkpoint.
    """
    if not paths:
        raise ValueError("pass at least one checkpoint folder to --checkpoint")
    dev = torch.device(device)
    results, episodes, episodes_cfg = [], None, cfg
    for path in paths:
        model, ckpt = load_model(path, cfg if (cfg is not None and len(paths) == 1) else None, which, dev)
        episodes_cfg = episodes_cfg or ckpt.config
        if episodes is None:
            episodes = build_episodes(episodes_cfg, episodes_cfg.eval.split, data_root)
        name = ckpt.config.name
        if name in [r.name for r in results]:
            name = f"{name} ({ckpt.path.parent.name})"  # same config name: tell the runs apart by folder
        res = evaluate(model, episodes, episodes_cfg.eval.episodes, episodes_cfg.eval.batch_tasks, dev, name=name,
                       progress=progress)
        res.step, res.checkpoint = ckpt.step, str(ckpt.path)
        results.append(res)
    if out_dir is not None:
        header = {"split": episodes_cfg.eval.split, "seed": episodes_cfg.eval.seed, "episodes": episodes_cfg.eval.episodes,
                  "n_way": episodes_cfg.data.n_way, "k_shot": episodes_cfg.data.k_shot, "q_query": episodes_cfg.data.q_query,
                  "source": episodes_cfg.data.source}
        write_report(results, Path(out_dir), header=header)
    return results


def run_eval(args: "argparse.Namespace") -> int:
    """Entry point of `metaformer eval` (argparse namespace in, exit code out)."""
    cfg = None
    overrides = list(args.set or [])
    if args.episodes is not None:
        overrides.append(f"eval.episodes={args.episodes}")
    if args.config is not None:
        cfg = load_config(args.config, overrides)
    elif overrides:
        first = ckpt_io.read_checkpoint(args.checkpoint[0], with_trainer_state=False, which=args.which)
        from training.config import config_from_dict

        cfg = config_from_dict(first.config.to_dict(), overrides)
    out = args.out or (Path(args.checkpoint[0]) / "eval" if len(args.checkpoint) == 1 else Path("runs") / "eval")
    results = evaluate_checkpoints(args.checkpoint, cfg, args.which, args.data_root, out, args.device,
                                   progress=not args.no_progress)
    print(report_markdown(results), end="")
    print(f"wrote {Path(out) / 'eval.json'} and {Path(out) / 'eval.md'}")
    return 0


def run_compare(args: "argparse.Namespace") -> int:
    """Entry point of `metaformer compare`: one table (and paired differences) from eval.json files of the same episodes."""
    header, results = combine_reports(args.reports)
    print(report_markdown(results), end="")
    if args.out:
        write_report(results, Path(args.out), header=header)
        print(f"wrote {Path(args.out) / 'eval.json'} and {Path(args.out) / 'eval.md'}")
    return 0
