"""Names in configs -> data sources and learners. Imports metaformer.models / heads lazily so a config only
needs the parts it names."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path
from typing import Any, Optional

from torch import nn

from training.config import Config, ConfigError, max_ways, resolve_data_root

SOURCES = ("glyph", "sinusoid", "omniglot")
# Transfer baselines (Chen et al. 2019): their pre-training classifier needs the number of training classes.
PRETRAINED_HEADS = ("baseline", "baselinepp")
HEADS = ("maml", "fomaml", "anil", "metasgd", "reptile", "lstm", "protonet", "matchingnet", "probmaml") + PRETRAINED_HEADS
MODELS = ("meta_transformer",) + HEADS
# heads whose predictions are class scores only (no regression output)
CLASSIFIER_HEADS = ("protonet", "matchingnet", "baselinepp")


def _import(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{what} needs {module}, which cannot be imported: {exc}") from exc


def is_regression(cfg: Config) -> bool:
    """Whether the configured source gives regression episodes."""
    return cfg.data.source == "sinusoid"


def way_limit(cfg: Config) -> Optional[int]:
    """The most ways a model of `cfg` classifies with its trained weights; None: any number (regression, or a head
    without per-way parameters, which is rebuilt for the episodes' ways)."""
    if is_regression(cfg):
        return None
    options = cfg.model.options
    if cfg.model.name == "meta_transformer":
        return int(options.get("max_way", max_ways(cfg.data)))  # the options override what build_model derives
    if cfg.model.name in HEADS:
        heads = _import("metaformer.heads.registry", f"model.name={cfg.model.name}")
        if not heads.head_class(cfg.model.name).fixed_ways:
            return None
    return int(options.get("n_out", options.get("n_way", max_ways(cfg.data))))


def split_seed(cfg: Config, split: str) -> int:
    """Episode seed of a split: training episodes follow the run seed, evaluation splits the eval seed."""
    if split == cfg.data.train_split:
        return cfg.seed
    return cfg.eval.seed + (1 if split == cfg.data.val_split else 0) * 7919


def build_episodes(cfg: Config, split: str, data_root: Optional[str] = None) -> Any:
    """An indexable episode source with .batch(start, T) for one split (a fixed pure function of its seed)."""
    try:
        return _build_episodes(cfg, split, data_root)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        # the data classes check their arguments; for a config user the fix is a config key, not an argument
        msg = str(exc).replace("pass on_small_class='drop' to skip them", "drop those classes from the split")
        raise ConfigError(f"data ({cfg.data.source}, split {split!r}): {msg}; check data.n_way / k_shot / q_query / "
                          f"image_size / options") from None


# Splits of a task family differ by seed only; the offsets keep train, validation and test tasks apart.
FAMILY_SPLIT_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def _build_episodes(cfg: Config, split: str, data_root: Optional[str]) -> Any:
    """build_episodes without the translation of the data classes' errors."""
    data = _import("metaformer.data", "data")
    d = cfg.data
    seed = split_seed(cfg, split)
    if d.source == "sinusoid":
        named = {d.train_split: "train", d.val_split: "val", d.test_split: "test"}
        part = named.get(split, split)
        if part not in FAMILY_SPLIT_OFFSETS:
            raise ConfigError(f"the sinusoid family has no split {split!r}; valid: {d.train_split}, {d.val_split}, "
                              f"{d.test_split} (data.train_split / val_split / test_split)")
        return data.SinusoidFamily(d.k_shot, d.q_query, seed=seed + FAMILY_SPLIT_OFFSETS[part], **d.options)
    if d.source == "glyph":
        source = data.GlyphFamily(split=split, image_size=d.image_size, **d.options)
    elif d.source == "omniglot":
        source = _omniglot_source(cfg, split, data_root)
    else:
        raise ConfigError(f"data.source must be one of {', '.join(SOURCES)}, got {d.source!r}")
    ways, shots = d.n_way, d.k_shot
    if split == d.train_split:  # mixed-size training episodes where asked; evaluation keeps the fixed shape
        ways = tuple(d.train_ways) if d.train_ways is not None else ways
        shots = tuple(d.train_shots) if d.train_shots is not None else shots
    episodes = data.EpisodeSampler(source, ways, shots, d.q_query, seed=seed)
    if d.source == "omniglot":
        from metaformer.data.augment import AffineAugment, AugmentedEpisodes

        try:  # checked for every split, so that a bad option fails whichever split is built first
            augment = AffineAugment.from_option(d.options.get("train_augment"))
        except ValueError as exc:
            raise ConfigError(f"data.options.train_augment: {exc}") from None
        if augment is not None and split == d.train_split:
            # training images only: validation and test episodes stay the split's own images
            return AugmentedEpisodes(episodes, augment, seed)
    return episodes


OMNIGLOT_SCHEMES = ("vinyals", "alphabets")
# Parts of an Omniglot split; "trainval" is train and val together (the final model of a run that no
# longer needs its validation classes, e.g. data.train_split=trainval); "trainval_half0" / "_half1" split
# those alphabets in two halves of about equal class counts, for cross-fitted runs (a model trained on one
# half meets the other half's classes as new ones).
OMNIGLOT_PARTS = ("train", "val", "test", "trainval", "trainval_half0", "trainval_half1")


def _omniglot_source(cfg: Config, split: str, data_root: Optional[str]) -> Any:
    """Omniglot classes of one split.

    data.options.split_scheme: "vinyals" (the standard benchmark split, rotations as classes; needs
    images_background.zip and images_evaluation.zip) or "alphabets" (background alphabets only, split by
    alphabet 20/5/5 into train/val/test, with rotations unless data.options.rotations is false;
    data.options.train_mirrors adds each training class's mirror image as a new class;
    data.options.train_augment warps every training image by a random affine map, see
    metaformer.data.augment). ``split`` is a
    part name (one of OMNIGLOT_PARTS) or one of the config's data.*_split names.
    """
    root = resolve_data_root(cfg, data_root)
    if root is None or not Path(root).is_dir():
        raise ConfigError(
            "data.source=omniglot needs the data folder: pass --data-root, set data.root or $METAFORMER_DATA_ROOT "
            "(a folder holding omniglot/images_background.zip)"
        )
    opts = dict(cfg.data.options)
    scheme = opts.pop("split_scheme", "vinyals")
    rotations = bool(opts.pop("rotations", True))
    split_seed = int(opts.pop("split_seed", 0))
    train_mirrors = bool(opts.pop("train_mirrors", False))
    opts.pop("train_augment", None)  # parsed and applied by build_episodes
    if opts:
        raise ConfigError(f"unknown data.options for omniglot: {sorted(opts)}; "
                          "valid: split_scheme, rotations, split_seed, train_mirrors, train_augment")
    named = {cfg.data.train_split: "train", cfg.data.val_split: "val", cfg.data.test_split: "test"}
    part = split if split in OMNIGLOT_PARTS else named.get(split, split)
    if part not in OMNIGLOT_PARTS:
        raise ConfigError(f"Omniglot has no split {split!r}; valid parts: {', '.join(OMNIGLOT_PARTS)} "
                          "(set data.train_split / val_split / test_split to one of them)")
    source = _omniglot_part(cfg, root, part, scheme, rotations, split_seed)
    if train_mirrors and split == cfg.data.train_split:
        # mirror images join the training classes only: validation and test episodes stay the split's own
        from metaformer.data.source import MirroredClasses

        return MirroredClasses(source)
    return source


def _omniglot_part(cfg: Config, root: Any, part: str, scheme: str, rotations: bool, split_seed: int) -> Any:
    """The classes of one part (a name in OMNIGLOT_PARTS) of the configured split scheme."""
    data = _import("metaformer.data.omniglot", "data.source=omniglot")
    try:
        if scheme == "vinyals":
            return data.omniglot_vinyals_split(root, part=part, image_size=cfg.data.image_size, download=False)
        if scheme == "alphabets":
            source = _cached_background(str(root), cfg.data.image_size, rotations)
            parts = data.omniglot_alphabet_split(source, counts={"train": 20, "val": 5, "test": 5}, seed=split_seed)
            if part.startswith("trainval"):
                from metaformer.data.source import ClassSubset

                trainval = ClassSubset(source, parts["train"].index.tolist() + parts["val"].index.tolist())
                return trainval if part == "trainval" else _group_halves(trainval)[part]
            return parts[part]
    except (FileNotFoundError, ValueError, OSError) as exc:
        hint = ("; with the background zip only, use --set data.options.split_scheme=alphabets (split by alphabet)"
                if scheme == "vinyals" and "images_evaluation" in str(exc) else "")
        raise ConfigError(f"cannot load Omniglot ({scheme} split, part {part!r}) from {root}: {exc}{hint}") from None
    raise ConfigError(f"data.options.split_scheme must be one of {', '.join(OMNIGLOT_SCHEMES)}, got {scheme!r}")


def _group_halves(source: Any) -> dict[str, Any]:
    """The source's groups (alphabets) in two parts of about equal class counts, "trainval_half0" and "_half1"."""
    from collections import Counter

    from metaformer.data.source import split_by_group

    sizes = Counter(source.groups)
    halves: dict[str, list[str]] = {"trainval_half0": [], "trainval_half1": []}
    load = dict.fromkeys(halves, 0)
    # largest group first into the lighter half: deterministic, and the halves differ by at most one group's size
    for name in sorted(sizes, key=lambda g: (-sizes[g], g)):
        part = min(load, key=lambda h: (load[h], h))
        halves[part].append(name)
        load[part] += sizes[name]
    return split_by_group(source, groups=halves)


def _cached_background(root: str, image_size: int, rotations: bool) -> Any:
    """The background set (metaformer.data keeps a decoded cache on disk, so repeated loads are fast)."""
    from metaformer.data.omniglot import load_omniglot

    return load_omniglot(root, ("background",), image_size, rotations=rotations, download=False)


def in_channels(cfg: Config) -> int:
    """Image channels of the configured source."""
    return 1 if cfg.data.source in ("glyph", "omniglot") else 3


def backbone_kwargs(cfg: Config) -> dict[str, Any]:
    """Constructor arguments of the backbone: input size from the data source, then model.backbone_options."""
    if cfg.model.backbone.lower() == "mlp":
        base: dict[str, Any] = {"in_dim": 1} if is_regression(cfg) else {}
    else:
        base = {"in_channels": in_channels(cfg)}
    return {**base, **cfg.model.backbone_options}


def _refuse_unknown(section: str, given: Any, accepted: Any, owner: str) -> None:
    """ConfigError naming the keys of `given` that `owner` does not take, and those it does."""
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        verb = "is not an option" if len(unknown) == 1 else "are not options"
        raise ConfigError(f"{section}: {', '.join(map(repr, unknown))} {verb} of {owner}; it accepts: "
                          f"{', '.join(sorted(accepted))}")


def _check_backbone_options(cfg: Config, models: Any) -> None:
    """ConfigError for a model.backbone_options key that the registered backbone's constructor does not take."""
    key = models.backbones.registered_backbone_key(cfg.model.backbone)
    if key is None:
        return  # not a registered name: build_backbone says which names exist
    params = inspect.signature(models.backbones.BACKBONES[key]).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in params):  # a constructor taking **kwargs checks them itself
        _refuse_unknown("model.backbone_options", cfg.model.backbone_options,
                        [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)],
                        f"backbone {cfg.model.backbone!r}")


def build_backbone(cfg: Config) -> nn.Module:
    """The configured feature extractor (Conv4, ResNet12, MLP)."""
    models = _import("metaformer.models", "model.backbone")
    _check_backbone_options(cfg, models)
    try:
        return models.build_backbone(cfg.model.backbone, **backbone_kwargs(cfg))
    except ValueError as exc:
        raise ConfigError(f"model.backbone / model.backbone_options: {exc}") from None


# Above this many classes a split is procedural (the glyph family has 2**24): not one output per class.
MAX_PRETRAIN_CLASSES = 1_000_000


def training_classes(cfg: Config, data_root: Optional[str] = None) -> int:
    """Number of classes episodes of the training split are drawn from (the transfer baselines' num_classes)."""
    try:
        episodes = build_episodes(cfg, cfg.data.train_split, data_root)
    except ConfigError as exc:
        raise ConfigError(f"model.name={cfg.model.name} needs the number of training classes: {exc}; "
                          "or set model.options.num_classes") from None
    count = getattr(episodes, "num_eligible", None)
    if not isinstance(count, int):
        raise ConfigError(f"model.name={cfg.model.name}: data.source={cfg.data.source} does not tell its number of "
                          "classes; set model.options.num_classes")
    if count > MAX_PRETRAIN_CLASSES:
        raise ConfigError(
            f"model.name={cfg.model.name} pre-trains one output per training class, but data.source="
            f"{cfg.data.source} has {count} (procedurally unlimited) classes: set model.options.num_classes "
            "explicitly, and cap the training classes (glyph: data.options.num_classes) so that no more than "
            "that many distinct classes appear during training"
        )
    return count


def build_model(cfg: Config) -> nn.Module:
    """The configured learner: an nn.Module with loss(batch) -> (loss, metrics)."""
    name = cfg.model.name
    regression = is_regression(cfg)
    if name == "meta_transformer":
        models = _import("metaformer.models", "model.name=meta_transformer")
        kw: dict[str, Any] = {"task": "regression" if regression else "classification",
                              "backbone": cfg.model.backbone, "backbone_kwargs": backbone_kwargs(cfg)}
        if regression:
            kw.update(d_in=1, d_out=1)
        else:
            kw.update(max_way=max_ways(cfg.data))
        kw.update(cfg.model.options)
        _refuse_unknown("model.options", cfg.model.options,
                        [f.name for f in dataclasses.fields(models.MetaTransformerConfig)], "model.name=meta_transformer")
        _check_backbone_options(cfg, models)
        try:
            mcfg = models.MetaTransformerConfig(**kw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model.options do not fit MetaTransformerConfig: {exc}") from None
        try:
            return models.MetaTransformer(mcfg)
        except (TypeError, ValueError) as exc:  # the backbone is built here: model.backbone / backbone_options
            raise ConfigError(f"model.backbone / model.backbone_options: {exc}") from None
    if name in HEADS:
        if regression and name in CLASSIFIER_HEADS:
            raise ConfigError(f"model.name={name} is a classifier, but data.source={cfg.data.source} gives regression "
                              f"tasks; choose meta_transformer or one of "
                              f"{', '.join(h for h in HEADS if h not in CLASSIFIER_HEADS)}")
        heads = _import("metaformer.heads", f"model.name={name}")
        backbone = build_backbone(cfg)
        kw = {"kind": "regression", "n_out": 1} if regression else {"n_way": max_ways(cfg.data)}
        kw.update(cfg.model.options)
        if name in PRETRAINED_HEADS and not regression and "num_classes" not in kw:
            kw["num_classes"] = training_classes(cfg)
        try:
            return heads.build_head(name, backbone, **kw)
        except (TypeError, ValueError) as exc:
            # options of another model are the usual cause of unknown ones (--set model.name=... alone keeps them)
            hint = ("model.options are the options of the config's own model, so with --set model.name=... set them "
                    "too (model.options={} for the head's defaults)" if "unknown option" in str(exc) else
                    "set that option to a value of the type named in model.options")
            raise ConfigError(f"model.options do not fit head {name!r}: {exc}; {hint}") from None
    raise ConfigError(f"model.name must be one of {', '.join(MODELS)}, got {name!r}")
