"""Run configuration: typed dataclasses loaded from YAML, with `--set key=value` overrides."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml

PRECISIONS = ("fp32", "bf16", "fp16")
NAN_POLICIES = ("stop", "skip")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adam", "sgd")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key and the fix."""


@dataclass
class DataConfig:
    """Where episodes come from: a named source and the episode shape."""

    source: str = "glyph"  # registry name, see training.registry.SOURCES
    root: Optional[str] = None  # data root for on-disk sources (Omniglot); see resolve_data_root
    n_way: int = 5
    k_shot: int = 1
    q_query: int = 15
    # Inclusive [low, high] ranges of N / K drawn per *training* episode (mixed sizes in one meta-batch,
    # padded); validation and test episodes keep n_way / k_shot. The model is sized for the larger N.
    train_ways: Optional[tuple] = None
    train_shots: Optional[tuple] = None
    image_size: int = 28
    # Omniglot also has "trainval" (train and val classes together) for a final model that needs no validation
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    options: dict = field(default_factory=dict)  # extra keyword arguments of the source
    num_workers: int = 0  # DataLoader workers producing meta-batches (0 = in the training process)


@dataclass
class ModelConfig:
    """Which learner to meta-train: a model or head name, its backbone and their keyword arguments."""

    name: str = "meta_transformer"  # registry name, see training.registry.MODELS
    backbone: str = "conv4"
    backbone_options: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # keyword arguments of the model / head


@dataclass
class OptimConfig:
    """Outer-loop optimiser and learning-rate schedule."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    momentum: float = 0.9  # sgd only
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0  # cosine/linear decay ends at lr * min_lr_ratio
    grad_clip: Optional[float] = 1.0  # max global gradient norm; null disables clipping
    decay_norm_and_bias: bool = False  # weight decay on 1-d parameters (norm scales, biases) too
    lr_scale: dict = field(default_factory=dict)  # lr multiplier by parameter-name prefix, e.g. {"backbone.": 0.1}; 0 freezes


@dataclass
class TrainConfig:
    """The meta-training loop: length, batch, precision, logging, checkpoints, failure policy."""

    steps: int = 1000
    meta_batch: int = 4  # tasks per optimiser step, summed over all ranks
    precision: str = "fp32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10
    val_every: int = 0  # 0 disables validation during training
    val_episodes: int = 100
    ckpt_every: int = 100  # a checkpoint is also written at the last step
    keep_last: int = 3
    nan_policy: str = "stop"
    max_skips: int = 10  # with nan_policy=skip: stop after this many skipped steps in a row
    num_threads: Optional[int] = None  # torch intra-op threads; null keeps torch's default
    max_minutes: Optional[float] = None  # wall-clock cap; training stops (with a checkpoint) when reached
    progress: bool = True  # tqdm bar on the main rank
    tensorboard: bool = True
    init_from: Optional[str] = None  # warm start: run or step folder of another `metaformer train` run
    init_rename: dict = field(default_factory=dict)  # prefix renames of the source's tensor names, e.g. {"net.": ""}
    # Train on features embedded once when the backbone is frozen (training.feature_cache): null = whenever
    # possible, true = required (an error says why not), false = never.
    feature_cache: Optional[bool] = None
    # With warped training images (data.options.train_augment) and a frozen backbone: embed this many warped copies
    # of every training image once and train on them (0: such runs train on images, fresh warps every step); the cache
    # holds items x V x feature-size floats in host memory (Omniglot train + val with mirrors, V=8, 128 features: 530 MB).
    feature_cache_views: int = 0


@dataclass
class EvalConfig:
    """Fixed evaluation episodes: the same seed gives the same episodes for every method compared."""

    episodes: int = 600
    seed: int = 2024
    split: str = "test"
    batch_tasks: int = 16  # tasks per forward pass during evaluation


@dataclass
class Config:
    """A complete run: seed, output folder and the sections above."""

    name: str = "run"
    seed: int = 0
    out_dir: Optional[str] = None  # default runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (tuples as lists), suitable for YAML/JSON."""
        return _plain(dataclasses.asdict(self))

    def run_dir(self) -> Path:
        """Output folder of this run."""
        return Path(self.out_dir) if self.out_dir else Path("runs") / self.name


# Keys that may differ between a checkpoint's config and the config it is resumed with: they control
# where and how long the run goes, not what it computes at a given step.
RESUME_MUTABLE_KEYS = frozenset(
    {
        "name", "out_dir", "data.root", "data.num_workers",
        "train.steps", "train.log_every", "train.val_every", "train.val_episodes", "train.ckpt_every",
        "train.keep_last", "train.max_minutes", "train.progress", "train.tensorboard", "train.device",
        "train.num_threads", "train.max_skips", "train.feature_cache",
    }
)
RESUME_MUTABLE_PREFIXES = ("eval.",)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if _is_dataclass_type(tp):
            keys.extend(_valid_keys(tp, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def valid_keys() -> list[str]:
    """Every settable dotted key of Config (dict-valued keys also accept sub-keys, e.g. model.options.depth)."""
    return _valid_keys(Config)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value or an override string to the field's declared type."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
            return None
        return _coerce(value, args[0], key)
    if isinstance(value, str) and tp is not str:
        # Override strings are parsed as YAML scalars/collections so "1e-3", "[0.9, 0.99]", "{a: 1}" work.
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config key '{key}': cannot parse {value!r} ({exc})") from None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise TypeError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
        if tp is tuple or origin is tuple:
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return tuple(value)
        if tp is dict or origin is dict:
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"config key '{key}': expected {name}, got {value!r}") from None
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)} in {where}; "
            f"valid keys: {', '.join(_valid_keys(cls, prefix))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if _is_dataclass_type(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """Read a YAML config, following `extends: other.yaml` (relative to the file) recursively."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} extends itself (cycle: {' -> '.join(map(str, seen))})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    parent = data.pop("extends", None)
    if parent is not None:
        base = _read_yaml(path.parent / parent, seen + (path.resolve(),))
        data = _merge(base, data)
    return data


def _apply_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value, e.g. train.steps=100")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override key {key!r} is malformed; valid keys: {', '.join(valid_keys())}")
    # Walk the dataclass schema so unknown keys fail here with the list of valid ones; below a dict-valued
    # field (options) any sub-key is accepted and its value parsed as YAML.
    cls: Any = Config
    node = data
    for i, part in enumerate(parts):
        is_last = i == len(parts) - 1
        if cls is dict:
            if is_last:
                node[part] = yaml.safe_load(raw) if raw.strip() else None
            else:
                node = node.setdefault(part, {})
            continue
        hints = _field_types(cls)
        if part not in hints:
            prefix = ".".join(parts[:i])
            raise ConfigError(
                f"unknown config key '{key}'; valid keys: {', '.join(_valid_keys(cls, prefix + '.' if prefix else ''))}"
            )
        tp = hints[part]
        if is_last:
            if _is_dataclass_type(tp):
                raise ConfigError(f"config key '{key}' is a section; set one of its keys, e.g. {_valid_keys(tp, key + '.')[0]}")
            node[part] = _coerce(raw, tp, key)
        else:
            if _is_dataclass_type(tp):
                cls = tp
            elif tp is dict or typing.get_origin(tp) is dict:
                cls = dict
            else:
                raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is not a section; cannot set '{key}'")
            sub = node.get(part)
            if not isinstance(sub, dict):
                sub = {}
                node[part] = sub
            node = sub


def config_from_dict(data: dict, overrides: Optional[list[str]] = None, check_unread: bool = True) -> Config:
    """Build and validate a Config from a nested dict plus `key=value` overrides (see check_unread_keys).

    ``check_unread`` False accepts settings the run never reads: configs stored by earlier versions, which did not
    refuse them, stay loadable."""
    data = copy.deepcopy(data)
    for assignment in overrides or []:
        _apply_override(data, assignment)
    cfg = _build(Config, data)
    validate(cfg)
    if check_unread:
        check_unread_keys(cfg)
    return cfg


def load_config(path: Union[str, Path, None], overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply overrides."""
    data = _read_yaml(Path(path)) if path is not None else {}
    return config_from_dict(data, overrides)


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    """Write the config as YAML."""
    Path(path).write_text(dump_config(cfg))


def dump_config(cfg: Config) -> str:
    """The config as a YAML string."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def unread_keys(cfg: Config) -> dict[str, str]:
    """Dotted keys that this config's source, optimiser or NaN policy never reads, each with the reason."""
    d, o, t = cfg.data, cfg.optim, cfg.train
    rules = (
        ("data.n_way", d.source == "sinusoid", "data.source=sinusoid: a sinusoid task is a regression, with no classes"),
        ("data.image_size", d.source == "sinusoid", "data.source=sinusoid: its inputs are scalars x, not images"),
        ("data.root", d.source in ("sinusoid", "glyph"), f"data.source={d.source}: the family is generated, not read "
                                                         "from disk"),
        ("optim.momentum", o.name != "sgd", f"optim.name={o.name}: only sgd has momentum ({o.name} uses optim.betas)"),
        ("optim.betas", o.name == "sgd", "optim.name=sgd: sgd has no betas (it uses optim.momentum)"),
        ("train.max_skips", t.nan_policy == "stop", "train.nan_policy=stop: max_skips limits consecutive skipped steps "
                                                    "under nan_policy=skip, and stop ends the run at the first one"),
    )
    return {key: why for key, unread, why in rules if unread}


def _value(cfg: Config, key: str) -> Any:
    """The plain value (tuples as lists) of a dotted section.key."""
    section, name = key.split(".")
    return _plain(getattr(getattr(cfg, section), name))


def check_unread_keys(cfg: Config, only: Optional[Iterable[str]] = None) -> None:
    """Refuse a setting the run would silently ignore: a key of unread_keys whose value is not its default.

    The default itself is accepted, so full config dumps (a run's config.yaml) and the shipped configs pass. ``only``
    limits the check to those keys (the ones a command sets on top of a stored config)."""
    defaults = Config()
    keys = None if only is None else set(only)
    bad = [(key, why) for key, why in unread_keys(cfg).items()
           if (keys is None or key in keys) and _value(cfg, key) != _value(defaults, key)]
    if bad:
        raise ConfigError("; ".join(f"{key}={_shown(_value(cfg, key))} is not used with {why}; remove it (its default "
                                    f"is {_shown(_value(defaults, key))})" for key, why in bad))


def _shown(value: Any) -> str:
    """A value as it would be written in a config or an override (YAML flow style: null, [0.9, 0.999])."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("options", "backbone_options"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(a: Config, b: Config, ignore_mutable: bool = True) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two configs (optionally ignoring run-control keys).

    Keys that neither config reads (unread_keys) are not differences: they change nothing either run computes."""
    fa, fb = _flatten(a.to_dict()), _flatten(b.to_dict())
    unread = set(unread_keys(a)) & set(unread_keys(b))
    diffs = {}
    for k in sorted(set(fa) | set(fb)):
        if ignore_mutable and (k in RESUME_MUTABLE_KEYS or k.startswith(RESUME_MUTABLE_PREFIXES)):
            continue
        if k in unread:
            continue
        if fa.get(k) != fb.get(k):
            diffs[k] = (fa.get(k), fb.get(k))
    return diffs


def max_ways(d: DataConfig) -> int:
    """The most classes an episode of this data config can have (what classifiers are sized for)."""
    return max(d.n_way, d.train_ways[1]) if d.train_ways is not None else d.n_way


def longest_prefix(name: str, prefixes: Iterable[str]) -> Optional[str]:
    """The longest of `prefixes` that `name` starts with (None if none): how prefix-keyed options resolve."""
    return max((p for p in prefixes if name.startswith(p)), key=len, default=None)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Range and choice checks; raises ConfigError naming the key and the allowed values."""
    d, t, o, e = cfg.data, cfg.train, cfg.optim, cfg.eval
    _check(d.n_way >= 1, f"data.n_way must be >= 1, got {d.n_way}")
    _check(d.k_shot >= 1, f"data.k_shot must be >= 1, got {d.k_shot}")
    _check(d.q_query >= 1, f"data.q_query must be >= 1, got {d.q_query}")
    for key, rng in (("train_ways", d.train_ways), ("train_shots", d.train_shots)):
        _check(rng is None or (len(rng) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in rng)
                               and 1 <= rng[0] <= rng[1]),
               f"data.{key} must be null or an inclusive range [low, high] of ints with 1 <= low <= high, got {rng!r}")
    _check(d.source != "sinusoid" or (d.train_ways is None and d.train_shots is None),
           "data.train_ways / data.train_shots: the sinusoid family draws a fixed K per run (and has no N); "
           "leave them null and set data.k_shot")
    _check(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    _check(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    _check(t.meta_batch >= 1, f"train.meta_batch must be >= 1, got {t.meta_batch}")
    _check(t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    _check(t.nan_policy in NAN_POLICIES, f"train.nan_policy must be one of {', '.join(NAN_POLICIES)}, got {t.nan_policy!r}")
    _check(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    _check(t.ckpt_every >= 0, f"train.ckpt_every must be >= 0 (0 = only at the end), got {t.ckpt_every}")
    _check(t.keep_last >= 1, f"train.keep_last must be >= 1, got {t.keep_last}")
    _check(t.val_every >= 0, f"train.val_every must be >= 0 (0 = never), got {t.val_every}")
    _check(t.val_episodes >= 1, f"train.val_episodes must be >= 1, got {t.val_episodes}")
    _check(t.max_skips >= 1, f"train.max_skips must be >= 1, got {t.max_skips}")
    _check(t.feature_cache_views >= 0, f"train.feature_cache_views must be >= 0 (0: no cached warped copies), "
                                       f"got {t.feature_cache_views}")
    _check(t.num_threads is None or t.num_threads >= 1, f"train.num_threads must be >= 1 or null, got {t.num_threads}")
    _check(t.max_minutes is None or t.max_minutes > 0, f"train.max_minutes must be > 0 or null, got {t.max_minutes}")
    _check(o.name in OPTIMIZERS, f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {o.name!r}")
    _check(o.schedule in SCHEDULES, f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}")
    # float32 weights cannot take a larger step size (it overflows when the optimizer converts it)
    _check(0 < o.lr < 3.4e38, f"optim.lr must be a finite number > 0 (below 3.4e38, float32's largest), got {o.lr}")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _check(len(o.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                     for b in o.betas), f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _check(all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in o.lr_scale.values()),
           f"optim.lr_scale values must be numbers >= 0 (0 freezes), got {o.lr_scale}")
    _check(o.grad_clip is None or o.grad_clip > 0, f"optim.grad_clip must be > 0 or null, got {o.grad_clip}")
    _check(e.episodes >= 1, f"eval.episodes must be >= 1, got {e.episodes}")
    _check(e.batch_tasks >= 1, f"eval.batch_tasks must be >= 1, got {e.batch_tasks}")


def default_data_root() -> Optional[Path]:
    """../shared/data relative to the repository, when that folder exists."""
    candidate = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def resolve_data_root(cfg: Config, cli_root: Optional[str] = None) -> Optional[Path]:
    """Data root by precedence: --data-root, then data.root, then $METAFORMER_DATA_ROOT, then ../shared/data."""
    for candidate in (cli_root, cfg.data.root, os.environ.get("METAFORMER_DATA_ROOT")):
        if candidate:
            return Path(candidate).expanduser()
    return default_data_root()
