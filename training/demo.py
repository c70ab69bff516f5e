"""`metaformer demo`: meta-train the Meta-Transformer, ProtoNet and first-order MAML on the same Conv-4
backbone on the procedural glyph family, evaluate all three on the same fixed test episodes, print the
comparison table and write the figures. Offline, a few minutes on a 2-core CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from training.config import Config, ConfigError, config_from_dict, load_config
from training.evaluation import EvalResult, evaluate, predict, report_markdown, write_report
from training.plots import plot_accuracy, plot_episode
from training.registry import build_episodes
from training.trainer import train

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEMO_CONFIG = CONFIG_DIR / "glyph_demo.yaml"

# (label, model.name, extra overrides). Every method shares the backbone and data settings of the config.
METHODS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Meta-Transformer", "meta_transformer", ("model.options={d_model: 64, n_layers: 2, n_heads: 4}",)),
    ("ProtoNet", "protonet", ()),
    ("FOMAML", "fomaml", ("model.options={inner_steps: 3, inner_lr: 0.4}",)),
)

# keys each method's run gets from the demo (its own run folder, which the demo deletes before training)
DEMO_OWNED_KEYS = frozenset({"name", "out_dir", "model.name"})


def run_demo(out_dir: str | Path = "runs/demo", budget_seconds: float = 120.0, quick: bool = False,
             episodes: Optional[int] = None, extra: Optional[list[str]] = None, progress: bool = True) -> list[EvalResult]:
    """Train each method for an equal share of `budget_seconds`, evaluate, print the table, write JSON/MD/PNGs."""
    owned = sorted({o.split("=", 1)[0].strip() for o in extra or []} & DEMO_OWNED_KEYS)
    if owned:
        # the demo names and places its own runs, and deletes them before each start: an out_dir from --set would
        # point that deletion at the user's folder
        raise ConfigError(f"metaformer demo sets {', '.join(owned)} itself; remove it from --set "
                          "(use --out DIR for where the demo writes)")
    if not budget_seconds > 0 or budget_seconds == float("inf"):
        raise ConfigError(f"--budget-seconds must be a positive number of seconds, got {budget_seconds}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = load_config(DEMO_CONFIG, extra).to_dict()
    share_min = budget_seconds / len(METHODS) / 60.0
    results: list[EvalResult] = []
    models = {}
    n_eval = episodes if episodes is not None else (40 if quick else base["eval"]["episodes"])
    for label, name, options in METHODS:
        overrides = [f"name={name}", f"model.name={name}", f"out_dir={out / 'runs' / name}",
                     f"train.max_minutes={share_min}", f"train.progress={progress}", f"eval.episodes={n_eval}", *options]
        if quick:
            overrides += ["train.steps=6", "train.log_every=2", "train.ckpt_every=0", "optim.warmup_steps=2"]
        cfg = config_from_dict(base, overrides + list(extra or []))
        runs = cfg.run_dir()
        if runs.exists():
            import shutil

            shutil.rmtree(runs)  # the demo always starts fresh; its outputs are throwaway
        print(f"[demo] training {label} ({name}) for up to {share_min * 60:.0f} s", flush=True)
        # the demo has no --resume (it restarts every run): a larger budget is how it trains longer
        result = train(cfg, time_cap_hint="a larger metaformer demo --budget-seconds trains longer")
        print(f"[demo] {label}: {result.step} steps in {result.seconds:.1f} s ({result.episodes_per_s:.1f} episodes/s)",
              flush=True)
        model = _trained_model(cfg)
        episodes_src = build_episodes(cfg, cfg.eval.split)
        res = evaluate(model, episodes_src, cfg.eval.episodes, cfg.eval.batch_tasks, torch.device("cpu"), name=label,
                       progress=progress)
        res.step, res.checkpoint = result.step, str(result.checkpoint) if result.checkpoint else None
        print(f"[demo] {label}: {100 * res.mean:.2f} ± {100 * res.ci95:.2f} % on {res.episodes} episodes "
              f"(evaluated in {res.seconds:.0f} s)", flush=True)
        results.append(res)
        models[label] = (model, episodes_src)
    # the comparison table, then each method's paired difference from the Meta-Transformer on the same episodes
    table = report_markdown(results)
    print()
    print(table, end="")
    header = {"source": "glyph", "n_way": base["data"]["n_way"], "k_shot": base["data"]["k_shot"],
              "q_query": base["data"]["q_query"], "seed": base["eval"]["seed"], "episodes": n_eval,
              "budget_seconds": budget_seconds, "quick": quick}
    write_report(results, out, stem="demo_results", header=header)
    plot_accuracy(results, out / "demo_accuracy.png",
                  title=f"glyph {base['data']['n_way']}-way {base['data']['k_shot']}-shot, {n_eval} test episodes, 95% CI")
    first_model, src = next(iter(models.values()))
    batch = src.batch(0, 1)
    preds = {label: predict(m, batch).argmax(-1)[0] for label, (m, _) in models.items()}
    ep = batch.episode(0)
    plot_episode(ep.support_x, ep.support_y, ep.query_x, ep.query_y, preds, out / "demo_episode.png")
    total = time.perf_counter() - t0
    (out / "demo_time.json").write_text(json.dumps({"total_seconds": total}, indent=2))
    print(f"[demo] wrote {out / 'demo_results.md'}, {out / 'demo_results.json'}, {out / 'demo_accuracy.png'}, "
          f"{out / 'demo_episode.png'}; total {total:.0f} s")
    return results


def _trained_model(cfg: Config) -> torch.nn.Module:
    """The final weights of a finished demo run, in eval mode."""
    from training.eval_cli import load_model

    model, _ = load_model(cfg.run_dir())
    return model
