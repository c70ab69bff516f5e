"""Recipes: a chain of training stages (each may warm-start from an earlier one) and their evaluation on fixed
episodes, run as one resumable job whose report says how every figure was made.

A recipe is a YAML file (examples in training/recipes/)::

    name: omniglot_wide
    title: Omniglot 20-way, wide Conv-4: ProtoNet, then the Meta-Transformer on its frozen backbone
    stages:
      - name: protonet
        config: training/configs/omniglot_20w1s_protonet.yaml
        set: ["model.backbone_options={hidden: 128}", train.steps=3000]
      - name: meta_transformer
        config: training/configs/omniglot_20w1s_meta_transformer_frozen.yaml
        init_from: protonet                 # an earlier stage: its final weights seed this one
        set: ["model.backbone_options={hidden: 128}"]
    evaluate:
      stages: [protonet, meta_transformer]  # the first is the reference of the paired differences
      settings: [5w1s, 5w5s, 20w1s, 20w5s]
      # a stage meant for some settings only: {name: protonet_5shot, settings: [5w5s, 20w5s]}
      episodes: 1000
      q_query: 15

`run_recipe` trains each stage with ``metaformer train --resume`` in ``<work>/runs/<stage>`` (a finished stage
whose saved config matches is skipped, an interrupted one continues where it stopped), evaluates every listed
stage on every setting's episodes with ``metaformer eval``, pairs them on the shared episodes and writes a markdown
report and a JSON file. Each stage and evaluation runs as a child process, and the report lists their exact
commands. A stage's ``init_from`` may also be a folder path (with a ``/``, relative to the repository root), e.g.
``pretrained/omniglot_meta_transformer``: a shipped model or another run's folder that the chain continues from.

What is kept on a rerun, and what is refused (the runner never deletes, overwrites or extends a run folder on its
own: a run that does not match the recipe is the user's to move away, since it may hold hours of training):

- A stage's run folder is refused when its saved config differs from the stage's, key by key, with the
  run-control keys aside -- except ``train.steps``: the learning-rate schedule spans ``train.steps``, so a run
  to 12 steps is not a run to 8 steps continued, and a changed ``train.steps`` is refused like any other change.
- Before a warm-started stage first trains, the runner writes ``<run>/recipe_stage.json`` with the identity of the
  checkpoint it starts from (its step and the sha256 of its weights, from the checkpoint's meta.json). A stage
  whose source now holds another checkpoint (the earlier stage was retrained or extended) is refused, naming
  both. Every stage is checked before anything trains. A run folder of an older runner, without that record,
  is kept and the source's current checkpoint recorded (said in the log).
- An evaluation is kept only when ``<eval>/recipe_eval.json`` names the checkpoint it evaluated (step and weights
  sha256) and its whole command (``--set`` and ``evaluate.set`` included), and both equal the current ones;
  otherwise it runs again (the log says why).
- Paths are compared relative to the work folder, so a moved ``--work`` folder resumes: a stage's warm start is
  the run folder ``runs/<stage>`` of whichever work folder holds it, and the evaluation commands recorded write the
  work folder as ``<work>`` (and leave out ``--data-root``).
- The children get SIGTERM when the runner dies (Linux ``PR_SET_PDEATHSIG``): a killed runner leaves no trainer
  behind (a trainer writes its checkpoint and stops, as on Ctrl-C), so a rerun does not train next to one.
"""

from __future__ import annotations

import csv
import ctypes
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml

from training.atomic import atomic_write_text
from training.config import ConfigError, config_differences, load_config
from training.evaluation import EvalResult, combine_reports, paired_vs_first, read_report, write_report

ROOT = Path(__file__).resolve().parent.parent
SETTING_RE = re.compile(r"^(\d+)w(\d+)s$")
RECIPE_KEYS = {"name", "title", "description", "stages", "evaluate"}
STAGE_KEYS = {"name", "title", "config", "init_from", "set"}
EVAL_KEYS = {"stages", "settings", "episodes", "q_query", "set"}


class RecipeError(ValueError):
    """A recipe file that cannot be run; the message names the key and the fix."""


@dataclass
class Stage:
    """One training run of a recipe: a config, its overrides and the earlier stage it warm-starts from."""

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    init_from: Optional[str] = None
    title: Optional[str] = None
    # a folder (run, step or `metaformer export`) that seeds this stage, instead of an earlier stage (init_from)
    init_path: Optional[str] = None

    def warm_start_source(self, work: Path) -> Optional[Path]:
        """The folder whose weights seed this stage: an earlier stage's run folder or `init_path` (None: cold start)."""
        if self.init_path:
            return _config_path(self.init_path)
        return work / "runs" / self.init_from if self.init_from else None


@dataclass
class Recipe:
    """Stages in training order and what to evaluate on which settings."""

    name: str
    title: str
    description: str
    stages: list[Stage]
    evaluate: list[str]
    settings: list[tuple[int, int]]
    episodes: int = 1000
    q_query: int = 15
    eval_overrides: list[str] = field(default_factory=list)
    path: Optional[str] = None
    # stages evaluated on some settings only (the others: every setting)
    stage_settings: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def stage(self, name: str) -> Stage:
        """The stage called `name`."""
        return next(s for s in self.stages if s.name == name)

    def evaluated_on(self, setting: tuple[int, int]) -> list[str]:
        """The stages evaluated on `setting`, in the order of `evaluate` (the reference first)."""
        return [n for n in self.evaluate if setting in self.stage_settings.get(n, self.settings)]


def parse_setting(text: str) -> tuple[int, int]:
    """(n_way, k_shot) of a setting written like 20w1s."""
    m = SETTING_RE.match(str(text).strip())
    if not m or int(m.group(1)) < 2 or int(m.group(2)) < 1:
        raise RecipeError(f"setting {text!r} is not of the form NwKs with N >= 2 and K >= 1 (e.g. 5w1s, 20w5s)")
    return int(m.group(1)), int(m.group(2))


def setting_key(setting: tuple[int, int]) -> str:
    """20w1s for (20, 1)."""
    return f"{setting[0]}w{setting[1]}s"


def _unknown(where: str, data: dict, allowed: set[str]) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")


def _str_list(where: str, value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{where} must be a list of KEY=VALUE strings, got {value!r}")
    return list(value)


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file: unique stage names, warm starts from earlier stages, configs that load."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist; pass a YAML file such as training/recipes/omniglot_wide.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping with name, stages and evaluate")
    _unknown(f"recipe {path}", data, RECIPE_KEYS)
    name = str(data.get("name") or path.stem)
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise RecipeError(f"recipe {path}: `stages` must be a non-empty list of {{name, config, ...}}")
    stages: list[Stage] = []
    for i, raw in enumerate(raw_stages):
        if not isinstance(raw, dict) or "name" not in raw or "config" not in raw:
            raise RecipeError(f"recipe {path}: stage {i} needs at least `name` and `config`")
        where = f"recipe {path}, stage {raw['name']!r}"
        _unknown(where, raw, STAGE_KEYS)
        sname = str(raw["name"])
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", sname):
            raise RecipeError(f"{where}: a stage name becomes a folder name; use letters, digits, '_', '-' or '.'")
        if sname in [s.name for s in stages]:
            raise RecipeError(f"{where}: two stages share this name; give each a unique name")
        init = None if raw.get("init_from") is None else str(raw["init_from"])
        init_path = None
        if init is not None and init not in [s.name for s in stages]:
            if "/" not in init:
                raise RecipeError(f"{where}: init_from {init!r} is not an earlier stage "
                                  f"(earlier: {', '.join(s.name for s in stages) or 'none'}); list that stage first, "
                                  "or give a folder path such as pretrained/omniglot_meta_transformer")
            folder = _config_path(init)
            if not folder.is_dir():
                raise RecipeError(f"{where}: init_from {init!r} is neither an earlier stage nor a folder (looked for "
                                  f"{folder}); give a run, step or `metaformer export` folder")
            init, init_path = None, init
        stage = Stage(sname, str(raw["config"]), _str_list(f"{where}: set", raw.get("set")), init, raw.get("title"),
                      init_path)
        for key in ("out_dir", "train.init_from"):
            if any(o.split("=", 1)[0].strip() == key for o in stage.overrides):
                raise RecipeError(f"{where}: `{key}` is set by the recipe runner (the run folder and init_from); "
                                  "remove it from `set`")
        try:
            stage_config(stage)
        except (ConfigError, OSError, ValueError) as exc:
            raise RecipeError(f"{where}: its config does not load ({exc})") from None
        stages.append(stage)
    ev = data.get("evaluate") or {}
    if not isinstance(ev, dict):
        raise RecipeError(f"recipe {path}: `evaluate` must be a mapping with stages and settings")
    _unknown(f"recipe {path}, evaluate", ev, EVAL_KEYS)
    settings = [parse_setting(s) for s in (ev.get("settings") or [])]
    if not settings:
        raise RecipeError(f"recipe {path}, evaluate: list at least one setting, e.g. settings: [5w1s, 20w1s]")
    evaluate, stage_settings = [], {}
    for item in ev.get("stages") or [s.name for s in stages]:
        if isinstance(item, dict):
            _unknown(f"recipe {path}, evaluate: stage {item.get('name')!r}", item, {"name", "settings"})
            if "name" not in item or not item.get("settings"):
                raise RecipeError(f"recipe {path}, evaluate: a stage given as a mapping needs `name` and a non-empty "
                                  "`settings` list, e.g. {name: protonet_5shot, settings: [5w5s, 20w5s]}")
            if not isinstance(item["settings"], list):
                raise RecipeError(f"recipe {path}, evaluate: stage {item['name']!r}: `settings` must be a list, "
                                  f"e.g. [5w5s, 20w5s], got {item['settings']!r}")
            own = [parse_setting(x) for x in item["settings"]]
            extra = [setting_key(x) for x in own if x not in settings]
            if extra:
                raise RecipeError(f"recipe {path}, evaluate: stage {item['name']!r} lists {', '.join(extra)}, which "
                                  "`evaluate.settings` does not; add it there")
            stage_settings[str(item["name"])] = own
            evaluate.append(str(item["name"]))
        else:
            evaluate.append(str(item))
    missing = [s for s in evaluate if s not in [t.name for t in stages]]
    if missing:
        raise RecipeError(f"recipe {path}, evaluate: stage(s) {', '.join(missing)} are not in `stages`")
    twice = sorted({s for s in evaluate if evaluate.count(s) > 1})
    if twice:
        raise RecipeError(f"recipe {path}, evaluate: stage(s) {', '.join(twice)} listed more than once; list each once")
    if evaluate and evaluate[0] in stage_settings:
        raise RecipeError(f"recipe {path}, evaluate: the first stage ({evaluate[0]}) is the reference of every paired "
                          "difference and is evaluated on every setting; list it by name only")
    episodes, q_query = int(ev.get("episodes", 1000)), int(ev.get("q_query", 15))
    if episodes < 2 or q_query < 1:
        raise RecipeError(f"recipe {path}, evaluate: episodes must be >= 2 and q_query >= 1")
    return Recipe(name, str(data.get("title") or name), str(data.get("description") or "").strip(), stages, evaluate,
                  settings, episodes, q_query, _str_list(f"recipe {path}, evaluate: set", ev.get("set")), str(path),
                  stage_settings)


def _config_path(config: str) -> Path:
    p = Path(config)
    return p if p.is_absolute() or p.exists() else ROOT / p


def stage_config(stage: Stage) -> "Config":  # noqa: F821 - training.config.Config
    """The stage's resolved training config (its file plus its overrides)."""
    return load_config(_config_path(stage.config), stage.overrides)


def stage_overrides(recipe: Recipe, stage: Stage, work: Path, threads: Optional[int],
                    init_from: Optional[str] = None) -> list[str]:
    """The stage's own overrides plus the run folder, the warm start (`init_from` instead of the source's folder when
    given) and the thread count the runner fixes."""
    extra = [f"out_dir={work / 'runs' / stage.name}"]
    source = init_from or stage.warm_start_source(work)
    if source is not None:
        extra.append(f"train.init_from={source}")
    if threads:
        extra.append(f"train.num_threads={threads}")
    return list(stage.overrides) + extra


def train_command(recipe: Recipe, stage: Stage, work: Path, threads: Optional[int], data_root: Optional[str],
                  init_from: Optional[str] = None) -> list[str]:
    """`metaformer train --resume ...` arguments (without the program) for one stage."""
    args = ["train", "--resume", "--config", stage.config, "--set",
            *stage_overrides(recipe, stage, work, threads, init_from)]
    return args + (["--data-root", data_root] if data_root else [])


def eval_command(recipe: Recipe, stage: Stage, setting: tuple[int, int], work: Path, data_root: Optional[str]) -> list[str]:
    """`metaformer eval ...` arguments (without the program) for one stage on one setting."""
    n, k = setting
    args = ["eval", "--checkpoint", str(work / "runs" / stage.name), "--episodes", str(recipe.episodes), "--no-progress",
            "--set", f"data.n_way={n}", f"data.k_shot={k}", f"data.q_query={recipe.q_query}", *recipe.eval_overrides,
            "--out", str(eval_dir(work, stage.name, setting))]
    return args + (["--data-root", data_root] if data_root else [])


def eval_dir(work: Path, stage: str, setting: tuple[int, int]) -> Path:
    """Folder of one stage's evaluation on one setting."""
    return work / "eval" / setting_key(setting) / stage


def shown(args: Sequence[str]) -> str:
    """A command line as a user would type it."""
    return "metaformer " + " ".join(shlex.quote(a) for a in args)


STAGE_RECORD = "recipe_stage.json"  # in a stage's run folder: the checkpoint it was warm-started from
EVAL_RECORD = "recipe_eval.json"  # in an evaluation's folder: the checkpoint it evaluated and its command
WORK_MARK = "<work>"  # how recorded commands write the work folder, so that a moved work folder still matches


def checkpoint_identity(folder: Path) -> Optional[dict]:
    """{"step", "weights_sha256"} of the checkpoint `folder` resolves to (a run's latest); None when it holds none."""
    from training import checkpoint as ckpt_io

    try:
        path = ckpt_io.resolve_checkpoint(folder)
    except ckpt_io.CheckpointError:
        return None
    meta_path = path / ckpt_io.META_FILE
    try:
        meta = json.loads(meta_path.read_text())
        step = int(meta["step"])
        digest = (meta.get("files") or {}).get(ckpt_io.WEIGHTS_FILE, {}).get("sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ckpt_io.CheckpointError(f"{meta_path} is unreadable or damaged ({exc}); move {path} out of its run "
                                      "folder (the run then continues from its previous checkpoint)") from None
    if not digest:
        digest = ckpt_io.file_sha256(path / ckpt_io.WEIGHTS_FILE)  # a manifest without file hashes (an early format)
    return {"step": step, "weights_sha256": digest}


def _describe(identity: Optional[dict]) -> str:
    """A checkpoint identity as the messages show it."""
    if identity is None:
        return "no checkpoint"
    return f"step {identity.get('step')} (weights sha256 {str(identity.get('weights_sha256'))[:12]})"


def _read_record(path: Path) -> Optional[dict]:
    """A JSON record written by this runner, or None when missing or unreadable (then it is not trusted)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _same_init(saved: Optional[str], wanted: Optional[str], stage_source: Optional[str] = None) -> bool:
    """Whether a run's saved train.init_from is the warm start the recipe asks for.

    With `stage_source` (the warm start is that earlier stage), any work folder's ``runs/<stage_source>`` matches:
    the run folders move with their work folder, and the weights themselves are checked by the stage record."""
    if not saved or not wanted:
        return saved == wanted
    # a relative saved path was read by a child trainer, which runs from the repository root, not from this cwd
    saved_path = Path(saved) if Path(saved).is_absolute() else ROOT / saved
    if saved_path.resolve() == Path(wanted).resolve():
        return True
    return stage_source is not None and Path(saved).parts[-2:] == ("runs", stage_source)


def stage_state(recipe: Recipe, stage: Stage, work: Path) -> tuple[str, Optional[int]]:
    """("done" | "partial" | "new", step) of a stage's run folder; refuses a folder trained with another config or
    warm-started from another checkpoint than its source holds now."""
    from training import checkpoint as ckpt_io

    run = work / "runs" / stage.name
    try:
        ckpt = ckpt_io.read_checkpoint(run, with_trainer_state=False)
    except ckpt_io.CheckpointError:
        if run.exists() and any(run.glob("step-*")):
            raise  # checkpoints that do not load: say so instead of training over them
        return "new", None
    cfg = load_config(_config_path(stage.config), stage_overrides(recipe, stage, work, None))
    diffs = config_differences(ckpt.config, cfg)
    if "train.init_from" in diffs and _same_init(*diffs["train.init_from"], stage_source=stage.init_from):
        del diffs["train.init_from"]  # the same folder reached through another path (a linked run, a moved work folder)
    why = ""
    if ckpt.config.train.steps != cfg.train.steps:
        # train.steps is a run-control key for `--resume`, but the cosine / linear schedule spans it: extending a
        # finished run restarts its decayed learning rate, and the result is not what the recipe's command trains
        diffs["train.steps"] = (ckpt.config.train.steps, cfg.train.steps)
        why = ("; the learning-rate schedule spans train.steps, so a run to another train.steps is not this one "
               "continued")
    if diffs:
        lines = "; ".join(f"{k}: run {a!r} vs recipe {b!r}" for k, (a, b) in diffs.items())
        raise RecipeError(f"{run} was trained with another config than stage {stage.name!r} of {recipe.path} ({lines}"
                          f"{why}); move that folder away (the stage then trains from scratch) or pass another --work "
                          "folder")
    source = stage.warm_start_source(work)
    record = _read_record(run / STAGE_RECORD)
    if source is not None and record is not None:
        now = checkpoint_identity(source)
        if record.get("source") != now:
            what = f"stage {stage.init_from!r}" if stage.init_from else f"the folder {stage.init_path!r}"
            raise RecipeError(
                f"{run} (stage {stage.name!r} of {recipe.path}) was warm-started from {what} at "
                f"{_describe(record.get('source'))}, but {source} now holds {_describe(now)}: {what} was moved, "
                f"retrained or changed since, and stage {stage.name!r} no longer continues from it; move {run} away "
                "(it is then retrained from the current weights) or pass another --work folder")
    return ("done" if ckpt.step >= cfg.train.steps else "partial"), ckpt.step


def _write_stage_record(stage: Stage, work: Path) -> Optional[dict]:
    """Record in the stage's run folder which checkpoint its warm start copies (None for a cold start)."""
    source = stage.warm_start_source(work)
    if source is None:
        return None
    identity = checkpoint_identity(source)
    run = work / "runs" / stage.name
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / STAGE_RECORD, json.dumps(
        {"init_from": stage.init_from or stage.init_path, "source": identity}, indent=2))
    return identity


def _adopt_stage_record(recipe: Recipe, stage: Stage, work: Path, log: Callable[[str], None]) -> None:
    """Give a warm-started run folder of an older runner (no record) its source's current checkpoint as its record."""
    run, source = work / "runs" / stage.name, stage.warm_start_source(work)
    if source is None or _read_record(run / STAGE_RECORD) is not None:
        return
    if checkpoint_identity(source) is None:
        raise RecipeError(f"{run} (stage {stage.name!r} of {recipe.path}) has no {STAGE_RECORD} (an older runner) and "
                          f"its warm-start source {source} holds no checkpoint, so nothing tells which weights it "
                          "started from; move that folder away (it is then retrained) or pass another --work folder")
    identity = _write_stage_record(stage, work)
    log(f"[recipe] stage {stage.name}: no record of the checkpoint it was warm-started from (an older runner); "
        f"recorded {source} at {_describe(identity)}, which it is checked against from now on")


def _saved_init_from(run: Path) -> Optional[str]:
    """train.init_from in the config of a run's latest checkpoint (None when unreadable or unset)."""
    from training import checkpoint as ckpt_io

    try:
        saved = yaml.safe_load((ckpt_io.resolve_checkpoint(run) / ckpt_io.CONFIG_FILE).read_text()) or {}
        return (saved.get("train") or {}).get("init_from")
    except (ckpt_io.CheckpointError, OSError, yaml.YAMLError, AttributeError):
        return None


def eval_record(recipe: Recipe, stage: Stage, setting: tuple[int, int], checkpoint: Optional[dict]) -> dict:
    """What an evaluation depends on: the checkpoint it evaluates and its command (the work folder written
    <work>, --data-root left out: moving either does not change the episodes, which the reports fingerprint)."""
    return {"checkpoint": checkpoint,
            "command": eval_command(recipe, stage, setting, Path(WORK_MARK), None)}


def _eval_stale(path: Path, recipe: Recipe, setting: tuple[int, int], wanted: dict) -> Optional[str]:
    """Why the evaluation in `path` cannot be kept for `wanted` (see eval_record), or None when it can."""
    try:
        header, results = read_report(path)
    except FileNotFoundError:
        return "not evaluated yet"
    except ValueError as exc:
        return f"its eval.json is unusable ({exc})"
    want = {"n_way": setting[0], "k_shot": setting[1], "q_query": recipe.q_query, "episodes": recipe.episodes}
    if not all(header.get(k) == v for k, v in want.items()) or len(results) != 1:
        return "its eval.json holds other settings"
    record = _read_record(path / EVAL_RECORD)
    if record is None:
        return "no record of the checkpoint it evaluated (an older runner, or the evaluation did not finish)"
    if record.get("checkpoint") != wanted["checkpoint"] or results[0].step != (wanted["checkpoint"] or {}).get("step"):
        return (f"it evaluated {_describe(record.get('checkpoint'))}, the run now holds "
                f"{_describe(wanted['checkpoint'])}")
    ran = record.get("command") or []
    if ran != wanted["command"]:
        added = [a for a in wanted["command"] if a not in ran]
        dropped = [a for a in ran if a not in wanted["command"]]
        changes = ([f"now with {' '.join(added)}"] if added else []) + (
            [f"no longer with {' '.join(dropped)}"] if dropped else [])
        return f"its command changed ({'; '.join(changes) or 'the order of its arguments'})"
    return None


# Linux prctl option: the signal a child gets when the thread that forked it exits (prctl(2))
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Optional[Callable[[], None]]:
    """A Popen preexec_fn that has the child get SIGTERM when the runner dies (Linux); None elsewhere (a no-op)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # resolved here, in the parent: between fork and exec the child should only make the call itself
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        """In the child before exec: ask for SIGTERM on the runner's death (a kill -9 included)."""
        # SIGTERM, not SIGKILL: the trainer then finishes its step and writes a checkpoint (as on Ctrl-C), so the
        # rerun continues from there; without it a killed runner leaves an orphan trainer, and a rerun starts a
        # second one on the same run folder. The signal follows the forking *thread*: Popen runs on the main one.
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the runner died before the prctl call: no signal will come
            os._exit(128 + int(signal.SIGTERM))

    return preexec


def _run(cmd: list[str], log: Callable[[str], None], cwd: Path) -> None:
    """Run `python -m metaformer CMD` as a child (inheriting stdout/stderr: the trainer's progress shows)."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "metaformer", *cmd], cwd=cwd, preexec_fn=_die_with_parent())
    while True:
        try:
            proc.wait()
            break
        except KeyboardInterrupt:
            # The child got the same Ctrl-C (one process group) and is writing its checkpoint; subprocess.run would
            # kill it after 0.25 s instead. A second Ctrl-C aborts the child, and then this wait returns.
            continue
    if proc.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        raise RuntimeError(f"`{shown(cmd)}` was stopped by {signal.Signals(proc.returncode - 128).name} after writing a "
                           "checkpoint; rerun the same recipe command to continue exactly from it")
    if proc.returncode != 0:
        raise RuntimeError(f"`{shown(cmd)}` failed with exit status {proc.returncode} (its output is above); fix the "
                           "cause and rerun the recipe: finished stages and evaluations are kept")
    log(f"[recipe] done in {time.time() - t0:.0f} s: {shown(cmd)}")


def _run_parallel(cmds: list[list[str]], jobs: int, log: Callable[[str], None], cwd: Path,
                  on_success: Optional[Callable[[int], None]] = None) -> None:
    """Run evaluation commands, `jobs` at a time (each child prints only its table); `on_success(i)` after the
    i-th succeeds, so that the finished ones are recorded even when another fails."""
    pending, running, failed = list(enumerate(cmds)), [], []
    # share the cores between the children instead of every one starting a thread per core
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, jobs)))}
    while pending or running:
        while pending and len(running) < max(1, jobs):
            i, cmd = pending.pop(0)
            running.append((i, cmd, time.time(), subprocess.Popen(
                [sys.executable, "-m", "metaformer", *cmd], cwd=cwd, stdout=subprocess.DEVNULL, env=env,
                preexec_fn=_die_with_parent())))
        time.sleep(0.2)
        for item in list(running):
            i, cmd, t0, proc = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode != 0:
                    failed.append(shown(cmd))
                else:
                    if on_success is not None:
                        on_success(i)
                    log(f"[recipe] done in {time.time() - t0:.0f} s: {shown(cmd)}")
    if failed:
        raise RuntimeError(f"{len(failed)} evaluation(s) failed (their errors are above): {'; '.join(failed)}; "
                           "fix the cause and rerun the recipe")


def training_seconds(run: Path) -> Optional[float]:
    """Wall time of a run from its log.csv, summed over resumed segments (each restarts wall_s); None without a log."""
    try:
        with open(run / "log.csv", newline="") as f:
            walls = [float(r["wall_s"]) for r in csv.DictReader(f) if r.get("wall_s")]
    except (OSError, KeyError, ValueError):
        return None
    if not walls:
        return None
    total, last = 0.0, 0.0
    for w in walls:
        if w < last:
            total += last
        last = w
    return total + last


def _result_dict(result: EvalResult) -> dict:
    """A result for the report's JSON with its per-episode scores (6 decimals).

    The scores let a later run be paired with this one on the same episodes after the work folder is gone (run
    folders do not outlive the machine that trained them; the report is committed)."""
    d = result.to_dict(with_episodes=True)
    d["per_episode"] = [round(v, 6) for v in d["per_episode"]]
    return d


def run_recipe(recipe: Recipe, work: Path, *, data_root: Optional[str] = None, threads: Optional[int] = 1, jobs: int = 1,
               log: Callable[[str], None] = print) -> dict:
    """Train every stage (resuming or skipping finished ones), evaluate, pair; returns the report's data."""
    work = Path(work).resolve()
    data_root = str(Path(data_root).resolve()) if data_root else None  # the children run from the repository root
    (work / "runs").mkdir(parents=True, exist_ok=True)
    # every stage is checked before anything trains: a refused later stage should not wait for hours of earlier ones
    for stage in recipe.stages:
        if stage_state(recipe, stage, work)[0] != "new":
            _adopt_stage_record(recipe, stage, work, log)
    stages_out = []
    for i, stage in enumerate(recipe.stages, 1):
        run = work / "runs" / stage.name
        state, step = stage_state(recipe, stage, work)
        init_from = None
        if state == "new":
            _write_stage_record(stage, work)  # before the trainer copies those weights: the source is finished now
        elif state == "partial" and stage.init_from:
            # A resumed run restores its own weights (the warm start is not applied again), but the trainer refuses a
            # train.init_from other than the saved one: after the work folder moved, pass the saved path unchanged.
            saved, source = _saved_init_from(run), str(stage.warm_start_source(work))
            if saved and saved != source and _same_init(saved, source, stage.init_from):
                init_from = saved
        cmd = train_command(recipe, stage, work, threads, data_root, init_from)
        trained_now = state != "done"
        if state == "done":
            log(f"[recipe] stage {i}/{len(recipe.stages)} {stage.name}: finished at step {step}, kept")
        else:
            log(f"[recipe] stage {i}/{len(recipe.stages)} {stage.name}: "
                + (f"continuing from step {step}" if state == "partial" else "training"))
            _run(cmd, log, ROOT)
            state, step = stage_state(recipe, stage, work)
            if state != "done":
                raise RuntimeError(f"stage {stage.name!r} stopped at step {step} before its train.steps (a time cap, "
                                   "train.max_minutes?); rerun the recipe to continue it")
        record = _read_record(run / STAGE_RECORD) or {}
        stages_out.append({"name": stage.name, "title": stage.title or stage.name, "config": stage.config,
                           "init_from": stage.init_from or stage.init_path, "step": step, "command": shown(cmd),
                           "trained_now": trained_now, "train_seconds": training_seconds(run),
                           "weights": checkpoint_identity(run), "init_checkpoint": record.get("source")})
    todo: list[list[str]] = []
    pending: list[tuple[Path, Stage, tuple[int, int]]] = []
    for setting in recipe.settings:
        for name in recipe.evaluated_on(setting):
            weights = next(s["weights"] for s in stages_out if s["name"] == name)
            folder = eval_dir(work, name, setting)
            reason = _eval_stale(folder, recipe, setting, eval_record(recipe, recipe.stage(name), setting, weights))
            if reason is None:
                log(f"[recipe] eval {name} {setting_key(setting)}: done at {_describe(weights)}, kept")
                continue
            if reason != "not evaluated yet":
                log(f"[recipe] eval {name} {setting_key(setting)}: evaluating again, {reason}")
            # the record goes first, so that an evaluation that stops halfway is never taken for the recorded one
            (folder / EVAL_RECORD).unlink(missing_ok=True)
            todo.append(eval_command(recipe, recipe.stage(name), setting, work, data_root))
            pending.append((folder, recipe.stage(name), setting))

    def record_eval(i: int) -> None:
        """Record which checkpoint the i-th evaluation read (its eval.json names the step folder) and its command."""
        folder, stage, setting = pending[i]
        try:
            (result,) = read_report(folder)[1]
            evaluated = checkpoint_identity(Path(result.checkpoint)) if result.checkpoint else None
        except (OSError, ValueError):
            return  # no record: the next run evaluates it again
        atomic_write_text(folder / EVAL_RECORD, json.dumps(eval_record(recipe, stage, setting, evaluated), indent=2))

    if todo:
        log(f"[recipe] {len(todo)} evaluation(s) of {recipe.episodes} episodes, {jobs} at a time")
        _run_parallel(todo, jobs, log, ROOT, on_success=record_eval)
    settings_out = []
    for setting in recipe.settings:
        names = recipe.evaluated_on(setting)
        header, results = combine_reports([eval_dir(work, name, setting) for name in names])
        for name, r in zip(names, results):
            r.name = name  # the stage names, not the configs' names (two stages may share a config)
        write_report(results, work / "eval" / setting_key(setting), header=header)
        settings_out.append({"setting": setting_key(setting), "header": header,
                             "results": [_result_dict(r) for r in results], "paired_vs_first": paired_vs_first(results),
                             "eval_commands": [shown(eval_command(recipe, recipe.stage(n), setting, work, data_root))
                                               for n in names]})
    return {"recipe": recipe.name, "title": recipe.title, "description": recipe.description, "path": recipe.path,
            "work": str(work), "stages": stages_out, "settings": settings_out, "episodes": recipe.episodes,
            "q_query": recipe.q_query}


def _metric_cell(r: dict) -> str:
    scale = 100.0 if r["metric"] == "accuracy" else 1.0
    return f"{scale * r['mean']:.2f} ± {scale * r['ci95']:.2f}"


def _paired_cell(d: dict, metric: str) -> str:
    scale = 100.0 if metric == "accuracy" else 1.0
    mark = "" if d["significant"] else " (n.s.)"
    lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
    return (f"{scale * d['mean']:+.2f} [{scale * lo:+.2f}, {scale * hi:+.2f}], "
            f"{d['wins']}/{d['losses']}{mark}")


def recipe_markdown(report: dict, meta: dict, command: str) -> str:
    """The recipe's report: how it was run, the stages, one row per evaluated stage, paired rows against the first."""
    stages = report["stages"]
    settings = report["settings"]
    metric = settings[0]["results"][0]["metric"]
    unit = "accuracy (%), mean ± 95% CI" if metric == "accuracy" else "MSE, mean ± 95% CI"
    md = [f"# {report['title']}", ""]
    if report["description"]:
        md += [report["description"], ""]
    md += [f"- Command: `{command}` (recipe `{report['path']}`)",
           f"- Date: {meta.get('date', '?')} UTC; machine: {meta.get('cores', '?')} cores, {meta.get('cpu', '?')}, "
           f"{meta.get('memory', '?')}, GPU: {meta.get('gpu') or 'none'}; torch {meta.get('torch', '?')}",
           f"- Commit: `{meta.get('commit', '?')}`" + (" (the working tree had uncommitted changes)" if meta.get("dirty") else ""),
           f"- Evaluation: {report['episodes']} test episodes per setting with {report['q_query']} queries per class, the "
           "same episodes for every stage (fingerprints checked); paired differences are the other stage minus "
           f"`{settings[0]['results'][0]['name']}`, per episode, with their 95% CI and episodes won / lost.", "",
           "## Stages", "", "| stage | warm start from | steps | training time | this run | command |",
           "|---|---|---:|---:|---|---|"]
    for s in stages:
        secs = s.get("train_seconds")
        t = "?" if secs is None else (f"{secs / 60:.0f} min" if secs >= 60 else f"{secs:.0f} s")
        ran = {True: "trained", False: "kept (finished earlier)"}.get(s.get("trained_now"), "?")
        md.append(f"| {s['name']} | {s['init_from'] or '-'} | {s['step']} | {t} | {ran} | `{s['command']}` |")
    md += ["", "Training time is the sum of the run's logged wall time over its resumed segments, on whatever "
           "machine trained it. A stage kept from an earlier run was trained by the same config (checked key by key, "
           "run-control keys such as the thread count aside, train.steps included) from the same warm-start weights "
           "(checkpoint step and sha256), not necessarily by the command shown; an evaluation is kept only for the "
           "same checkpoint (step and weights sha256) and the same command.", "",
           f"## Test {unit}", "",
           "| stage | " + " | ".join(st["setting"] for st in settings) + " |",
           "|---|" + "---:|" * len(settings)]
    names = list(dict.fromkeys(r["name"] for st in settings for r in st["results"]))

    def cell(st: dict, name: str) -> str:
        found = [r for r in st["results"] if r["name"] == name]
        return _metric_cell(found[0]) if found else "not evaluated"

    for name in names:
        md.append(f"| {name} | " + " | ".join(cell(st, name) for st in settings) + " |")
    if len(names) > 1:
        md += ["", f"## Paired differences against {names[0]} (points; [95% CI]; episodes won / lost; n.s. when the "
               "interval holds 0)", "", "| stage | " + " | ".join(st["setting"] for st in settings) + " |",
               "|---|" + "---|" * len(settings)]
        def paired_cell(st: dict, name: str) -> str:
            found = [d for d in st["paired_vs_first"] if d["name"] == name]
            if found:
                return _paired_cell(found[0], metric)
            return "not paired" if any(r["name"] == name for r in st["results"]) else "not evaluated"

        for name in names[1:]:
            md.append(f"| {name} | " + " | ".join(paired_cell(st, name) for st in settings) + " |")
    md += ["", "## Evaluation commands", ""]
    for st in settings:
        md += [f"- `{c}`" for c in st["eval_commands"]]
    return "\n".join(md) + "\n"


def write_recipe_report(report: dict, meta: dict, command: str, out: Path) -> tuple[Path, Path]:
    """Write <out>/<recipe>.md and <out>/<recipe>.json; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mpath, jpath = out / f"{report['recipe']}.md", out / f"{report['recipe']}.json"
    atomic_write_text(jpath, json.dumps({**report, "meta": meta, "command": command}, indent=2))
    atomic_write_text(mpath, recipe_markdown(report, meta, command))
    return mpath, jpath
