"""`metaformer eval`: load checkpoints, evaluate each on the same fixed episodes, write one comparison table."""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from training import checkpoint as ckpt_io
from training.config import Config, ConfigError, load_config, max_ways
from training.evaluation import EvalResult, combine_reports, evaluate, report_markdown, write_report
from training.registry import build_episodes, build_model, is_regression, way_limit


def check_device(name: str | torch.device, option: str = "--device") -> torch.device:
    """The torch device named by a --device option (auto, cpu, cuda, cuda:N); a ConfigError names an unusable one."""
    if isinstance(name, torch.device):
        name = str(name)
    name = str(name).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise ConfigError(f"{option} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"{option} {name}: CUDA is not available (torch {torch.__version__} sees no CUDA device on "
                          f"this machine: {why}); use {option} cpu")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise ConfigError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device(name)


def _task(cfg: Config) -> str:
    return "regression" if is_regression(cfg) else "classification"


def check_fits(ckpt: ckpt_io.Checkpoint, episodes_cfg: Config, episodes_from: str = "") -> None:
    """Refuse (CheckpointError) a checkpoint that cannot run on the episodes of `episodes_cfg` (task type, ways)."""
    trained_on = ckpt.config.data
    src = f" (from {episodes_from})" if episodes_from else ""
    if is_regression(ckpt.config) != is_regression(episodes_cfg):
        raise ckpt_io.CheckpointError(
            f"checkpoint {ckpt.path} is a {_task(ckpt.config)} model (data.source={trained_on.source}) but the "
            f"evaluation episodes{src} are {_task(episodes_cfg)} (data.source={episodes_cfg.data.source}); "
            "evaluate it separately, or together with checkpoints of the same task")
    if is_regression(episodes_cfg):
        return
    trained, asked = way_limit(ckpt.config), episodes_cfg.data.n_way
    if trained is not None and asked > trained:
        if ckpt.config.model.name == "meta_transformer":
            grow = (f"or grow the model with train.init_from into a run with data.n_way={asked} (its learned label "
                    "rows are kept) and train it there")
        else:
            grow = (f"or train a run with data.n_way={asked} (train.init_from can start it from this run; its "
                    f"{trained}-way classifier tensors do not fit, rename them away with train.init_rename)")
        raise ckpt_io.CheckpointError(
            f"checkpoint {ckpt.path} ({ckpt.config.model.name}) has {trained} class outputs, the evaluation{src} asks "
            f"for {asked} ways; evaluate with data.n_way <= {trained} (--set data.n_way={trained}), {grow}")
    if trained_on.image_size != episodes_cfg.data.image_size:
        # a size mismatch usually still runs, on inputs unlike the training ones: said, not refused
        print(f"metaformer eval: note: checkpoint {ckpt.path} was trained on {trained_on.image_size}x"
              f"{trained_on.image_size} images, the evaluation episodes{src} are {episodes_cfg.data.image_size}x"
              f"{episodes_cfg.data.image_size}", file=sys.stderr)


def _build(ckpt: ckpt_io.Checkpoint, cfg: Optional[Config], episodes_cfg: Optional[Config] = None) -> torch.nn.Module:
    """The model of a checkpoint (architecture from `cfg` when given, else its own config) with its weights, sized
    for the episodes of `episodes_cfg` (default `cfg`) when its weights fit any number of ways."""
    build_cfg = copy.deepcopy(ckpt.config if cfg is None else cfg)
    if cfg is not None and cfg.data.source != "sinusoid":
        # Fewer ways than the model was built for is fine (extra classes are masked per task): keep its size.
        build_cfg.data.n_way, build_cfg.data.train_ways = ckpt.config.data.n_way, ckpt.config.data.train_ways
    episodes_cfg = cfg if episodes_cfg is None else episodes_cfg
    if (episodes_cfg is not None and not is_regression(build_cfg) and way_limit(build_cfg) is None
            and episodes_cfg.data.n_way > max_ways(build_cfg.data)):
        # no per-way weights: the same ones load at the larger size (model.options' own n_way would win over data's)
        build_cfg.data.n_way = episodes_cfg.data.n_way
        if "n_way" in (build_cfg.model.options or {}):
            build_cfg.model.options = {**build_cfg.model.options, "n_way": episodes_cfg.data.n_way}
    model = build_model(build_cfg)
    ckpt_io.load_weights_into(model, ckpt, build_cfg.model.name)
    return model.eval()


def load_model(path: str | Path, cfg: Optional[Config] = None, which: str = "latest",
               device: torch.device = torch.device("cpu")) -> tuple[torch.nn.Module, ckpt_io.Checkpoint]:
    """Build the model (from `cfg`, else the checkpoint's own config) and load the checkpoint's weights into it."""
    ckpt = ckpt_io.read_checkpoint(path, with_trainer_state=False, which=which)
    if cfg is not None:
        check_fits(ckpt, cfg)
    return _build(ckpt, cfg).to(device), ckpt


def _prepare_out_dir(out_dir: Path) -> None:
    """Refuse an output folder that cannot be created or written (a ConfigError naming it)."""
    problem = ckpt_io.folder_problem(out_dir)
    if problem:
        raise ConfigError(f"cannot write the report to {out_dir}: {problem}; pass --out a folder in a writable place")


def evaluate_checkpoints(
    paths: Sequence[str | Path],
    cfg: Optional[Config] = None,
    which: str = "latest",
    data_root: Optional[str] = None,
    out_dir: Optional[str | Path] = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    *,
    episodes_from: str = "",
) -> list[EvalResult]:
    """Evaluate every checkpoint on the episodes that `cfg` (or the first checkpoint's config) fixes.

    With a single checkpoint and a config, the model is built from the config, so a checkpoint of another
    model or architecture fails with a clear error; with several, each model comes from its own checkpoint.
    Every checkpoint is read, checked against the episodes and built before the first one is evaluated (then
    read again for its evaluation, so one model is in memory at a time); `episodes_from` says where `cfg` came from,
    for those errors.
    """
    if not paths:
        raise ValueError("pass at least one checkpoint folder to --checkpoint")
    dev = check_device(device)
    if out_dir is not None:
        _prepare_out_dir(Path(out_dir))
    build_from = cfg if (cfg is not None and len(paths) == 1) else None
    # First every checkpoint is read, checked against the episodes and built (one at a time, then dropped): a
    # mistake in the last one must not surface after the first ones' evaluations, nor N models sit in memory.
    ckpts, episodes_cfg = [], cfg
    for p in paths:
        ckpt = ckpt_io.read_checkpoint(p, with_trainer_state=False, which=which)
        if episodes_cfg is None:
            episodes_cfg, episodes_from = ckpt.config, f"the config of the first checkpoint, {ckpt.path}"
        check_fits(ckpt, episodes_cfg, episodes_from)
        _build(ckpt, build_from, episodes_cfg)
        ckpt.model_state = {}
        ckpts.append(ckpt)
    episodes = build_episodes(episodes_cfg, episodes_cfg.eval.split, data_root)
    if out_dir is not None:
        try:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the report folder {out_dir}: {exc.strerror or exc}; pass --out a folder "
                              "in a writable place") from None
    results: list[EvalResult] = []
    for ckpt in ckpts:
        # read again (the weights were dropped above): one model in memory at a time
        model = _build(ckpt_io.read_checkpoint(ckpt.path, with_trainer_state=False), build_from, episodes_cfg).to(dev)
        name = ckpt.config.name
        if name in [r.name for r in results]:
            name = f"{name} ({ckpt.path.parent.name})"  # same config name: tell the runs apart by folder
        res = evaluate(model, episodes, episodes_cfg.eval.episodes, episodes_cfg.eval.batch_tasks, dev, name=name,
                       progress=progress)
        res.step, res.checkpoint = ckpt.step, str(ckpt.path)
        results.append(res)
        del model
    if out_dir is not None:
        header = {"split": episodes_cfg.eval.split, "seed": episodes_cfg.eval.seed, "episodes": episodes_cfg.eval.episodes,
                  "n_way": episodes_cfg.data.n_way, "k_shot": episodes_cfg.data.k_shot, "q_query": episodes_cfg.data.q_query,
                  "source": episodes_cfg.data.source}
        write_report(results, Path(out_dir), header=header)
    return results


def _holds_report(folder: Path) -> bool:
    """Whether `folder` is taken for a report: a file, or a folder with an eval.json or eval.md."""
    return folder.exists() and (not folder.is_dir() or (folder / "eval.json").exists() or (folder / "eval.md").exists())


def default_out_dir(paths: Sequence[str | Path]) -> tuple[Path, Optional[Path]]:
    """Where `metaformer eval` writes without --out, and the default folder skipped because it holds a report."""
    first = Path(paths[0])
    if len(paths) > 1:
        base = Path("runs") / "eval" / "comparison"
    elif ckpt_io.list_checkpoints(first):
        base = first / "eval"  # a run folder: its report lives beside its checkpoints
    else:
        # a checkpoint folder itself (a step folder, an export, a shipped model): writing into it would put
        # the report inside the checkpoint (or the repository), and pruning would delete a step folder's report
        resolved = first.resolve()
        name = f"{resolved.parent.name}-{resolved.name}" if ckpt_io.STEP_DIR_RE.match(resolved.name) else resolved.name
        base = Path("runs") / "eval" / name
    out, n = base, 1
    while _holds_report(out):  # an earlier report is never replaced without an explicit --out
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out, (base if out != base else None)


def run_eval(args: "argparse.Namespace") -> int:
    """Entry point of `metaformer eval` (argparse namespace in, exit code out)."""
    device = check_device(args.device)
    cfg, episodes_from = None, ""
    overrides = list(args.set or [])
    if args.episodes is not None:
        overrides.append(f"eval.episodes={args.episodes}")
    if args.config is not None:
        cfg = load_config(args.config, overrides)
    elif overrides:
        first = ckpt_io.read_checkpoint(args.checkpoint[0], with_trainer_state=False, which=args.which)
        from training.config import check_unread_keys, config_from_dict

        # the stored config may hold a setting earlier versions accepted and the run never read: refuse only the
        # ones this command sets
        cfg = config_from_dict(first.config.to_dict(), overrides, check_unread=False)
        check_unread_keys(cfg, only=[o.split("=", 1)[0].strip() for o in overrides])
        episodes_from = f"the config of the first checkpoint, {first.path}, with {' '.join(overrides)}"
    if args.out is not None:
        out = Path(args.out)
        replaced = out.is_dir() and _holds_report(out)
    else:
        (out, skipped), replaced = default_out_dir(args.checkpoint), False
        if skipped is not None:
            print(f"metaformer eval: {skipped} holds an earlier report (kept); this one goes to {out}", file=sys.stderr)
    results = evaluate_checkpoints(args.checkpoint, cfg, args.which, args.data_root, out, device,
                                   progress=not args.no_progress, episodes_from=episodes_from)
    print(report_markdown(results), end="")
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}" + (" (replacing the earlier report there)" if replaced else ""))
    return 0


def run_compare(args: "argparse.Namespace") -> int:
    """Entry point of `metaformer compare`: one table (and paired differences) from eval.json files of the same episodes."""
    out = Path(args.out) if args.out else None
    if out is not None:
        _prepare_out_dir(out)
    header, results = combine_reports(args.reports)
    print(report_markdown(results), end="")
    if out is not None:
        replaced = out.is_dir() and _holds_report(out)
        write_report(results, out, header=header)
        print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}" + (" (replacing the earlier report there)" if replaced else ""))
    return 0
