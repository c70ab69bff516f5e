#!/usr/bin/env python3
"""Probabilistic MAML on the sinusoid family: predictive mean and ±2 std on 4 held-out tasks, as a PNG.

Meta-trains a :class:`metaformer.heads.ProbabilisticMAML` (MLP 1-40-40-1, 1 inner step of lr 0.01, Adam 1e-3,
meta-batch 25) for ``--iters`` meta-iterations (default 5000: about a minute on one CPU thread; use 30000+
for a converged model), or loads a run of ``metaformer train`` with ``--run``, e.g. one with this script's
settings (the sinusoid config's model.options are the Meta-Transformer's, so a head needs its own)::

    metaformer train --config training/configs/sinusoid.yaml --set out_dir=runs/sinusoid_probmaml \\
        model.name=probmaml \\
        "model.options={inner_steps: 1, eval_inner_steps: 10, inner_lr: 0.01, init_logvar: -5.0, kl_weight: 0.0001}"

Then adapts to 4 test tasks (another seed) from their K support points with ``--samples`` sampled
initialisations and plots, per task, the support points, the true function A sin(x - phase), the predictive
mean and the ±2 std band over a dense grid of x in [-5, 5].

Usage: .venv/bin/python scripts/plot_probmaml_sinusoid.py [--iters 5000] [--shots 5] [--out runs/probmaml_sinusoid.png]
       .venv/bin/python scripts/plot_probmaml_sinusoid.py --run runs/sinusoid_probmaml [--which best]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from metaformer.data import SinusoidFamily  # noqa: E402
from metaformer.heads import ProbabilisticMAML  # noqa: E402
from metaformer.models import build_backbone  # noqa: E402

TEST_SEED = 12345


def meta_train(args: argparse.Namespace) -> ProbabilisticMAML:
    """Meta-train a probabilistic MAML on K-shot sinusoid tasks for args.iters iterations."""
    torch.manual_seed(args.seed)
    family = SinusoidFamily(args.shots, 10, seed=args.seed)
    head = ProbabilisticMAML(build_backbone("mlp", in_dim=1, hidden=40, num_layers=2), kind="regression", inner_steps=1,
                             inner_lr=0.01, init_logvar=args.init_logvar, kl_weight=args.kl_weight,
                             num_samples=args.train_samples)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for i in range(args.iters):
        opt.zero_grad()
        _, metrics = head.meta_backward(family.batch(i * args.meta_batch, args.meta_batch))
        opt.step()
        if (i + 1) % max(1, args.iters // 10) == 0 or i + 1 == args.iters:
            print(f"iter {i + 1:6d}/{args.iters}  query mse {metrics['mse']:.3f}  kl {metrics['kl']:.0f}  "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return head


def load_run(args: argparse.Namespace) -> ProbabilisticMAML:
    """The model of a `metaformer train` run directory (it must be a probmaml head on sinusoid data)."""
    from training.eval_cli import load_model

    model, ckpt = load_model(args.run, which=args.which)
    if not isinstance(model, ProbabilisticMAML) or model.kind != "regression":
        raise SystemExit(f"{args.run} holds a {type(model).__name__} ({ckpt.config.model.name}, {ckpt.config.data.source}); "
                         "this script plots a probmaml head trained on data.source=sinusoid")
    args.shots = ckpt.config.data.k_shot
    print(f"loaded {ckpt.path} (step {ckpt.step}, {args.shots}-shot)")
    return model


def plot(head: ProbabilisticMAML, args: argparse.Namespace) -> Path:
    """Adapt to 4 test tasks and draw support, truth, predictive mean and ±2 std into args.out."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    head.eval()
    test = SinusoidFamily(args.shots, 1, seed=TEST_SEED)
    grid = torch.linspace(-5.0, 5.0, 300).unsqueeze(1)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    mses = []
    for i, ax in enumerate(axes.flat):
        ep = test[i]
        amp, phase = test.task_params(i)
        truth = SinusoidFamily.function(grid.double(), amp, phase).float()
        mean, std = head.predict_with_std(ep.support_x, ep.support_y, grid, generator=head.sample_generator(args.seed + i),
                                          num_samples=args.samples)
        m, s = mean[:, 0].numpy(), std[:, 0].numpy()
        x = grid[:, 0].numpy()
        mses.append(float(((mean - truth) ** 2).mean()))
        ax.plot(x, truth[:, 0].numpy(), color="black", lw=1.2, label="true function")
        ax.plot(x, m, color="#4C72B0", lw=1.6, label="predictive mean")
        ax.fill_between(x, m - 2 * s, m + 2 * s, color="#4C72B0", alpha=0.25, label="±2 std")
        ax.scatter(ep.support_x[:, 0].numpy(), ep.support_y[:, 0].numpy(), color="#C44E52", zorder=3, s=22,
                   label=f"{args.shots} support points")
        ax.set_title(f"A={amp:.2f}, phase={phase:.2f}: grid mse {mses[-1]:.3f}, mean std {float(s.mean()):.3f}", fontsize=9)
    axes[0, 0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Probabilistic MAML, {args.shots}-shot sinusoid, {args.samples} weight samples", fontsize=11)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"grid mse of the predictive mean on the 4 tasks: {sum(mses) / len(mses):.3f}")
    return out


def main() -> None:
    """Parse arguments, train or load, plot."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a `metaformer train` run directory of a probmaml sinusoid model (skips training)")
    ap.add_argument("--which", default="latest", help="checkpoint of --run: latest, best or a step (default latest)")
    ap.add_argument("--iters", type=int, default=5000, help="meta-iterations (default 5000, about a minute)")
    ap.add_argument("--shots", type=int, default=5, help="support points per task (default 5)")
    ap.add_argument("--meta-batch", type=int, default=25)
    ap.add_argument("--init-logvar", type=float, default=-5.0)
    ap.add_argument("--kl-weight", type=float, default=1e-4, help="KL weight (the MLP has ~1.8k coordinates)")
    ap.add_argument("--train-samples", type=int, default=1, help="weight samples per task in training")
    ap.add_argument("--samples", type=int, default=50, help="weight samples per task for the plot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/probmaml_sinusoid.png")
    args = ap.parse_args()
    for name in ("iters", "shots", "meta_batch", "train_samples", "samples", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    head = load_run(args) if args.run else meta_train(args)
    out = plot(head, args)
    print(f"wrote {out.resolve()}")


if __name__ == "__main__":
    main()
