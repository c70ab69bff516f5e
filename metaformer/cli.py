"""The `metaformer` command: train, eval, export, compare, demo and predict subcommands."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    """Argument parser of all subcommands."""
    p = argparse.ArgumentParser(prog="metaformer", description="Few-shot meta-learning: train, evaluate, demo.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="episodic meta-training from a YAML config")
    t.add_argument("--config", required=True, help="YAML config, e.g. training/configs/glyph_demo.yaml")
    t.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE", default=[],
                   help="override config keys, e.g. --set train.steps=100 optim.lr=3e-4")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    t.add_argument("--data-root", default=None, help="data folder (default: data.root, $METAFORMER_DATA_ROOT, ../shared/data)")

    e = sub.add_parser("eval", help="evaluate checkpoints on fixed episodes (mean and 95%% CI)")
    e.add_argument("--checkpoint", required=True, nargs="+", help="run folders or step folders; several give one table")
    e.add_argument("--config", default=None, help="config fixing the episodes (default: the first checkpoint's)")
    e.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE", default=[], help="override config keys")
    e.add_argument("--episodes", type=int, default=None,
                   help="number of evaluation episodes (default: eval.episodes of --config, else of the first "
                   "checkpoint's config)")
    e.add_argument("--which", choices=("latest", "best"), default="latest",
                   help="checkpoint of a run folder to use; best (the best validation step, best.json) is refused for a "
                   "run that recorded none")
    e.add_argument("--out", default=None,
                   help="folder for eval.json and eval.md (an earlier report there is replaced). Default: RUN/eval for one run "
                   "folder, runs/eval/NAME for one step folder or exported model, runs/eval/comparison for several "
                   "checkpoints; a default folder that already holds a report is kept, and the report goes to the "
                   "next free FOLDER-2, FOLDER-3, ... (the command says where)")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    e.add_argument("--data-root", default=None)
    e.add_argument("--no-progress", action="store_true")

    x = sub.add_parser("export", help="a weights-only copy of a checkpoint (weights, config, manifest) to share")
    x.add_argument("--checkpoint", required=True, help="a run folder (its latest or best checkpoint) or a step folder")
    x.add_argument("--which", choices=("latest", "best"), default="latest",
                   help="checkpoint of a run folder to use; best is refused for a run that recorded no validation result")
    x.add_argument("--out", required=True, help="new folder for the export (refused when it exists and is not empty)")

    c = sub.add_parser("compare", help="one table, with paired differences, from eval.json files of the same episodes")
    c.add_argument("reports", nargs="+", help="eval.json files (or their folders) written by `metaformer eval`; the "
                   "first is the reference of the paired differences")
    c.add_argument("--out", default=None, help="also write the combined eval.json and eval.md here")

    d = sub.add_parser("demo", help="offline glyph demo: Meta-Transformer vs ProtoNet vs FOMAML on Conv-4")
    d.add_argument("--out", default="runs/demo", help="output folder (tables, PNGs, runs) (default: %(default)s)")
    d.add_argument("--budget-seconds", type=float, default=120.0,
                   help="total training time in seconds, split over the 3 methods (default: %(default)s)")
    d.add_argument("--quick", action="store_true", help="a few steps and 40 episodes: a smoke test in seconds")
    d.add_argument("--episodes", type=int, default=None,
                   help="test episodes (default: eval.episodes of training/configs/glyph_demo.yaml, 600; 40 with "
                   "--quick)")
    d.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE", default=[], help="override demo config keys")
    d.add_argument("--no-progress", action="store_true")

    r = sub.add_parser("predict", help="few-shot predictions from a checkpoint, a labelled support set and queries")
    r.add_argument("--checkpoint", required=True,
                   help="folder written by scripts/finetune_encoder.py / FewShotModel.save_pretrained, or a `metaformer "
                   "train` run folder, step folder or export (e.g. pretrained/omniglot_meta_transformer)")
    r.add_argument("--which", choices=("latest", "best"), default="latest",
                   help="checkpoint of a run folder to use (as for eval); best is refused for a run that recorded no "
                   "validation result")
    r.add_argument("--support", required=True, help="folder with one subfolder per class, or a CSV/JSONL of text and label")
    r.add_argument("--query", required=True, help="folder or file of unlabelled examples (images, .txt, .csv, .jsonl)")
    r.add_argument("--out", default=None, help="output file (.csv or .json); default: CSV on stdout")
    r.add_argument("--format", choices=("csv", "json"), default=None, help="output format (default: from --out's extension)")
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    r.add_argument("--batch-size", type=int, default=64, help="examples per encoder forward pass (>= 1)")
    r.add_argument("--inner-steps", type=int, default=None,
                   help="MAML-family checkpoints only: inner steps on the support set (>= 0)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a subcommand; user errors print one clear line and exit with status 2."""
    args = _parser().parse_args(argv)
    from training.checkpoint import CheckpointError, NonFiniteStateError
    from training.config import ConfigError
    from training.cpu_allocator import tune_cpu_allocator
    from training.interrupts import TrainingInterrupted
    from training.trainer import NonFiniteLossError

    tune_cpu_allocator()  # batched CPU steps re-fault their activations otherwise (see the module)

    try:
        if args.command == "train":
            from training.config import load_config
            from training.trainer import train

            cfg = load_config(args.config, args.set)
            res = train(cfg, resume=args.resume, data_root=args.data_root)
            if res.rank != 0:
                return 0
            shown = {k: round(v, 4) for k, v in res.metrics.items() if k in ("loss", "accuracy", "mse", "val_accuracy")}
            print(f"done: step {res.step}, {res.seconds:.1f} s, {res.episodes_per_s:.1f} episodes/s, {shown}; "
                  f"run folder {res.run_dir}", flush=True)
            return 0
        if args.command == "eval":
            from training.eval_cli import run_eval

            args.set = args.set or []
            return run_eval(args)
        if args.command == "export":
            from training.checkpoint import export_checkpoint

            out = export_checkpoint(args.checkpoint, args.out, which=args.which)
            size = sum(p.stat().st_size for p in out.iterdir())
            print(f"exported {args.checkpoint} -> {out} ({size / 2**20:.1f} MiB, weights only: evaluate it or "
                  "warm-start from it with train.init_from)")
            return 0
        if args.command == "compare":
            from training.eval_cli import run_compare

            try:
                return run_compare(args)
            except ValueError as exc:  # an OSError goes to the handler below, which names the path
                print(f"metaformer compare: error: {exc}", file=sys.stderr)
                return 2
        if args.command == "demo":
            from training.demo import run_demo

            run_demo(args.out, args.budget_seconds, args.quick, args.episodes, args.set, progress=not args.no_progress)
            return 0
        if args.command == "predict":
            from metaformer.predict_cli import InputError, run_predict

            try:
                return run_predict(args)
            except (InputError, ValueError) as exc:  # an OSError goes to the handler below, which names the path
                print(f"metaformer predict: error: {exc}", file=sys.stderr)
                return 2
    except TrainingInterrupted as exc:
        res = exc.result
        if res.rank != 0:
            # Rank 0 reports the stop. A non-zero status here would make torchrun SIGTERM rank 0 at once, before
            # it has printed (every rank has passed the final barrier, so the checkpoint is already written).
            return 0
        where = f"checkpoint {res.checkpoint}" if res.checkpoint else "no checkpoint written"
        hint = "; continue exactly from there with the same command plus --resume" if args.command == "train" else ""
        print(f"metaformer {args.command}: training stopped by {exc.signal_name} at step {res.step} ({where}){hint}",
              file=sys.stderr, flush=True)
        return exc.exit_status
    except (NonFiniteLossError, NonFiniteStateError) as exc:
        print(f"metaformer {args.command}: training stopped: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        # Ctrl-C outside the trainer's own handler (start-up, data loading, a second Ctrl-C): no traceback;
        # whatever was written already is complete (every file is written atomically)
        print(f"metaformer {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, CheckpointError) as exc:
        print(f"metaformer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"metaformer {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    return 1


def describe_os_error(exc: OSError) -> str:
    """One line for a failed file operation: the path(s) and the system's reason (no errno noise)."""
    if exc.filename is None:
        return str(exc)
    paths = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    return f"{paths}: {exc.strerror or exc}; check that path (an existing file where a folder is needed, permissions, space)"


def entry() -> NoReturn:
    """Console entry point: run `main` and exit with its status."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun rank leaves without interpreter finalization: everything is written and the process group
        # is gone, but a Gloo thread still holding a tensor can abort the rank while Python tears down
        # (pytorch/pytorch#179291), turning a finished job into a failed one.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
