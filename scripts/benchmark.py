#!/usr/bin/env python3
r"""The results suite: every method on the same backbone and the same fixed test episodes, one table.

For each setting (Omniglot on the alphabet-level split of the background alphabets, the procedural glyph
family, the sinusoid family) and each method (Meta-Transformer in-context, MAML, FOMAML, ANIL, Meta-SGD,
Reptile, LSTM meta-learner, ProtoNet, MatchingNet) one *cell* meta-trains the method with `training.trainer`
for the suite's budget, evaluates it on the setting's fixed test episodes (mean and 95% CI of the per-episode
accuracy, or MSE for the sinusoid) and measures meta-train throughput (tasks/s), inference throughput
(queries/s, adaptation to the support set included), peak memory and wall time. Each cell runs in its own
child process, so its peak RSS (``ru_maxrss``) is that cell alone. The training is cut into segments with
an evaluation after each, which gives the accuracy-versus-meta-training-time curve.

Writes ``<out>/RESULTS.md`` (tables beside the published Omniglot figures, the command, date, machine and
commit), ``<out>/results/<suite>.json`` (every cell with its per-episode scores) and PNG plots under
``<out>/results/``: accuracy versus shots, accuracy versus meta-training time, meta-train throughput against
the peer libraries (from a ``scripts/bench_meta_train.py --json-out`` file, or a small cell run here).

Suites:
  quick  Omniglot 5-way 1-shot, glyph 5-way 1-shot and 5-shot, sinusoid 10-shot; 15 / 15 / 10 s of
         meta-training per cell, 80 / 80 / 300 test episodes; two cells at a time with one thread each;
         under 15 minutes on an idle 2-core CPU. A smoke test of the pipeline, not converged accuracy.
  full   Omniglot 5/20-way x 1/5-shot, glyph 5-way 1/5-shot, sinusoid 5/10-shot with the configs' own
         hyper-parameters and step counts (30k steps for Omniglot) and 1000 / 600 / 600 test episodes:
         the real table, days on a CPU, hours on a GPU.

Panels (``--panels all`` or a subset): after the cells, the building-block and peer benchmarks run one at a time
as child processes and their printed tables become sections of RESULTS.md, with their commands: the fused
inner-loop update (scripts/bench_inner_update.py), the fused block ops (bench_block_ops.py), the MAML step against
learn2learn / higher / TorchOpt / a plain loop on Conv-4 and on the sinusoid MLP (bench_meta_train.py; their JSON
also feeds the throughput plot), the allocator tuning (bench_allocator.py), episode sampling
(bench_episodes.py), the Conv-4 MAML step's profile and bf16 timing (profile_conv4_maml.py) and the main job,
`metaformer demo`, sinusoid regression MSE per gradient head (sinusoid_heads_accuracy.py, 20000
meta-iterations) and frozen MiniLM + ProtoNet on CLINC150 and HuffPost (finetune_encoder.py). About 50 minutes
on the 2-core CPU in all. ``--from-json F --panels ...`` runs panels alone
and puts them into the report of an earlier run (replacing stored panels of the same name).

Recipes (``--recipe training/recipes/NAME.yaml``): the long runs behind docs/omniglot_runs.md as one resumable job,
stages warm-started from earlier stages (training.recipes), every listed stage evaluated on the same episodes and
paired; ``<out>/results/NAME.md`` gets the stages' and evaluations' exact commands, date, machine and commit.

Usage: .venv/bin/python scripts/benchmark.py --suite quick [--out docs] [--methods maml,protonet]
       [--settings omniglot-5w1s,glyph-5w1s] [--threads 1] [--jobs 2] [--peers-json results.json]
       [--panels all --peers-python /work/peers/venv/bin/python] [--data-root ../shared/data]
       .venv/bin/python scripts/benchmark.py --recipe training/recipes/omniglot_wide.yaml [--work DIR] [--jobs 2]
       .venv/bin/python scripts/benchmark.py --from-json docs/results/quick.json --gpu-json gpu_quick.json \
           [--fused-json gpu_fused_cuda.json] [--gpu-meta-train-json gpu_meta_train.json ...] --out docs
           (the GPU section from the files of scripts/gpu_session.sh, without rerunning the CPU cells)
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `training` is a folder of the repository, not an installed package

import torch  # noqa: E402

from training.config import Config, ConfigError, config_from_dict, load_config, resolve_data_root  # noqa: E402
from training.eval_cli import check_device  # noqa: E402
from training.evaluation import EvalResult, evaluate, paired_difference, same_episodes  # noqa: E402

CONFIG_DIR = ROOT / "training" / "configs"
PEERS_BENCH = ROOT / "scripts" / "bench_meta_train.py"

METHODS: dict[str, str] = {
    "meta_transformer": "Meta-Transformer",
    "maml": "MAML",
    "fomaml": "FOMAML",
    "anil": "ANIL",
    "metasgd": "Meta-SGD",
    "reptile": "Reptile",
    "lstm": "LSTM meta-learner",
    "protonet": "ProtoNet",
    "matchingnet": "MatchingNet",
    "probmaml": "Probabilistic MAML",
    "baseline": "Baseline (transfer)",
    "baselinepp": "Baseline++ (transfer)",
}
# Metric-based classifiers (and Baseline++'s cosine classifier) have no regression form: the sinusoid skips them.
CLASSIFICATION_ONLY = frozenset({"protonet", "matchingnet", "baselinepp"})
# The glyph family has 2**24 classes per split; a transfer baseline pre-trains a classifier over a finite class
# set, and capping the family (data.options.num_classes) would also change the test episodes of that cell.
FINITE_CLASSES_ONLY = frozenset({"baseline", "baselinepp"})


def skip_reason(setting: "Setting", method: str) -> Optional[str]:
    """Why a (setting, method) cell does not exist, or None when it runs."""
    if setting.source == "sinusoid" and method in CLASSIFICATION_ONLY:
        return f"{METHODS[method]} is a classifier; the sinusoid family is regression"
    if setting.source == "glyph" and method in FINITE_CLASSES_ONLY:
        return (f"{METHODS[method]} pre-trains over a finite class set; the glyph family has 2**24 classes per split "
                "and capping it would change the shared test episodes")
    return None

# Published Omniglot accuracies (%) on the Vinyals et al. split, 5w1s / 5w5s / 20w1s / 20w5s:
# MAML (Finn et al. 2017), ProtoNet (Snell et al. 2017), Meta-SGD (Li et al. 2017), MatchingNet (Vinyals et al. 2016).
PUBLISHED_OMNIGLOT: dict[str, dict[str, float]] = {
    "maml": {"5w1s": 98.7, "5w5s": 99.9, "20w1s": 95.8, "20w5s": 98.9},
    "protonet": {"5w1s": 98.8, "5w5s": 99.7, "20w1s": 96.0, "20w5s": 98.9},
    "metasgd": {"5w1s": 99.5, "5w5s": 99.9, "20w1s": 95.9, "20w5s": 99.0},
    "matchingnet": {"5w1s": 98.1, "5w5s": 98.9, "20w1s": 93.8, "20w5s": 98.5},
}


@dataclass(frozen=True)
class Setting:
    """One episode distribution of the suite: a source and the episode shape."""

    source: str  # omniglot | glyph | sinusoid
    n_way: int  # 0 for regression
    k_shot: int

    @property
    def key(self) -> str:
        """Name used in tables, JSON and --settings, e.g. omniglot-5w1s or sinusoid-10s."""
        return f"sinusoid-{self.k_shot}s" if self.source == "sinusoid" else f"{self.source}-{self.n_way}w{self.k_shot}s"


@dataclass(frozen=True)
class SourcePlan:
    """How long and on how many episodes the cells of one source run in a suite."""

    budget_s: Optional[float]  # meta-training wall-clock budget per cell (None: train the config's steps)
    eval_episodes: int  # fixed test episodes of the final evaluation
    curve_episodes: int  # the first episodes of those, evaluated after each earlier training segment
    segments: int  # points of the accuracy-versus-training-time curve


@dataclass(frozen=True)
class Suite:
    """A named list of settings with the budgets of each source."""

    name: str
    settings: tuple[Setting, ...]
    plans: dict[str, SourcePlan]
    time_boxed: bool  # quick: constant schedule, meta-batch 8, shorter inner loops (see quick_overrides)
    jobs: int  # cells run at the same time


SUITES: dict[str, Suite] = {
    "quick": Suite(
        "quick",
        # Omniglot 5-shot and 20-way cells cost 2-3x a 5w1s cell on a CPU; the 5-shot points come from glyph.
        (Setting("omniglot", 5, 1), Setting("glyph", 5, 1), Setting("glyph", 5, 5), Setting("sinusoid", 0, 10)),
        {"omniglot": SourcePlan(15.0, 80, 20, 3), "glyph": SourcePlan(15.0, 80, 20, 3),
         "sinusoid": SourcePlan(10.0, 300, 100, 3)},
        time_boxed=True, jobs=2,
    ),
    "full": Suite(
        "full",
        tuple(Setting("omniglot", n, k) for n in (5, 20) for k in (1, 5))
        + (Setting("glyph", 5, 1), Setting("glyph", 5, 5), Setting("sinusoid", 0, 5), Setting("sinusoid", 0, 10)),
        {"omniglot": SourcePlan(None, 1000, 200, 6), "glyph": SourcePlan(None, 600, 200, 6),
         "sinusoid": SourcePlan(None, 600, 200, 6)},
        time_boxed=False, jobs=1,
    ),
}
# Steps of the full suite where the config's own count is meant for a time cap (glyph_demo.yaml: 100k).
FULL_STEPS = {"glyph": 20000}

# Sinusoid inner loops (Finn et al. 2017: inner lr 0.01, 1 step in training; 10 steps at test time for MAML;
# Meta-SGD learns its per-parameter step for exactly one step; Reptile 5 steps, outer step 0.1 via SGD).
SINUSOID_METHOD_OVERRIDES: dict[str, tuple[str, ...]] = {
    "maml": ("model.options={inner_steps: 1, eval_inner_steps: 10, inner_lr: 0.01}",),
    "probmaml": ("model.options={inner_steps: 1, eval_inner_steps: 10, inner_lr: 0.01}",),
    "fomaml": ("model.options={inner_steps: 1, eval_inner_steps: 10, inner_lr: 0.01}",),
    "anil": ("model.options={inner_steps: 1, eval_inner_steps: 10, inner_lr: 0.01}",),
    "metasgd": ("model.options={inner_steps: 1, eval_inner_steps: 1, inner_lr: 0.01}",),
    "reptile": ("model.options={inner_steps: 5, eval_inner_steps: 10, inner_lr: 0.02}", "optim.name=sgd",
                "optim.lr=0.1", "optim.momentum=0.0", "optim.grad_clip=null", "optim.weight_decay=0.0"),
    "lstm": ("model.options={inner_steps: 1, eval_inner_steps: 1, inner_lr: 0.01}",),
}


def quick_overrides(source: str, method: str) -> list[str]:
    """Time-boxed settings (those of scripts/omniglot_time_boxed.sh): enough outer steps fit in seconds."""
    if source == "sinusoid":
        return ["optim.schedule=constant", "optim.warmup_steps=20"]
    out = ["train.meta_batch=8", "optim.schedule=constant", "optim.warmup_steps=20"]
    if method in ("maml", "fomaml"):
        out.append("model.options={inner_steps: 1, eval_inner_steps: 3, inner_lr: 0.4}")
    elif method == "probmaml":  # key by key: its config's own options (KL weight, samples) stay
        out += ["model.options.inner_steps=1", "model.options.eval_inner_steps=3", "model.options.inner_lr=0.4"]
    elif method == "metasgd":
        out.append("model.options={inner_steps: 1, eval_inner_steps: 1, inner_lr: 0.4}")
    elif method == "meta_transformer":
        out += ["model.options={d_model: 128, n_layers: 4, n_heads: 4, dropout: 0.0}", "optim.lr=0.001"]
    return out


@functools.lru_cache(maxsize=None)
def _config_dict(name: str) -> dict:
    """A config file of training/configs as a dict (parsed once: a suite builds dozens of cells from a few files)."""
    return load_config(CONFIG_DIR / name).to_dict()


def base_config(setting: Setting, method: str) -> dict:
    """The config dict a cell starts from: the method's Omniglot config, glyph_demo.yaml or sinusoid.yaml."""
    if setting.source == "omniglot":
        ways = 20 if setting.n_way >= 20 else 5
        return copy.deepcopy(_config_dict(f"omniglot_{ways}w1s_{method}.yaml"))
    if setting.source == "glyph":
        data = copy.deepcopy(_config_dict("glyph_demo.yaml"))
        # The glyph family has no per-method configs: take the method's model options and optimiser from its
        # Omniglot config (Reptile's SGD outer step, the Meta-Transformer's AdamW), keep glyph's backbone and data.
        omni = copy.deepcopy(_config_dict(f"omniglot_5w1s_{method}.yaml"))
        data["model"]["name"] = method
        data["model"]["options"] = omni["model"]["options"]
        data["optim"] = {**omni["optim"], "warmup_steps": data["optim"]["warmup_steps"],
                         "schedule": data["optim"]["schedule"]}
        data["train"]["meta_batch"] = omni["train"]["meta_batch"]
        return data
    if setting.source == "sinusoid":
        data = copy.deepcopy(_config_dict("sinusoid.yaml"))
        data["model"]["name"] = method
        if method != "meta_transformer":
            data["model"]["options"] = {}
        return data
    raise ValueError(f"unknown source {setting.source!r}; expected omniglot, glyph or sinusoid")


def cell_config(setting: Setting, method: str, suite: Suite, run_dir: Path, threads: int, device: str = "cpu",
                extra: Sequence[str] = ()) -> Config:
    """The full training/evaluation config of one (setting, method) cell."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    reason = skip_reason(setting, method)
    if reason:
        raise ValueError(f"no {setting.key} cell for {method}: {reason}")
    plan = suite.plans[setting.source]
    ov = [f"name={setting.key}_{method}", f"out_dir={run_dir}", f"data.k_shot={setting.k_shot}",
          f"train.num_threads={threads}", f"train.device={device}", "train.progress=false", "train.tensorboard=false",
          "train.val_every=0", "train.ckpt_every=0", "train.keep_last=1", f"eval.episodes={plan.eval_episodes}"]
    if setting.source != "sinusoid":
        ov.append(f"data.n_way={setting.n_way}")
    if setting.source == "omniglot":
        ov.append("data.options.split_scheme=alphabets")
    if setting.source == "sinusoid":
        ov += list(SINUSOID_METHOD_OVERRIDES.get(method, ()))
    if suite.time_boxed:
        ov += quick_overrides(setting.source, method)
    elif setting.source in FULL_STEPS:
        ov.append(f"train.steps={FULL_STEPS[setting.source]}")
    return config_from_dict(base_config(setting, method), ov + list(extra))


@dataclass
class CellSpec:
    """Everything a child process needs to run one cell (JSON round trip)."""

    setting: dict
    method: str
    config: dict  # Config.to_dict()
    budget_s: Optional[float]  # wall-clock training budget, or None: cfg.train.steps
    eval_episodes: int
    curve_episodes: int
    segments: int
    data_root: Optional[str] = None
    extra: list = field(default_factory=list)  # the user's --set overrides, for the report


def make_specs(suite: Suite, methods: Sequence[str], settings: Sequence[Setting], work: Path, threads: int,
               device: str = "cpu", minutes: Optional[float] = None, episodes: Optional[int] = None,
               extra: Sequence[str] = (), data_root: Optional[str] = None) -> list[CellSpec]:
    """The cells of a suite run: every method on every setting (classifiers skip the sinusoid)."""
    specs = []
    for s in settings:
        plan = suite.plans[s.source]
        budget = minutes * 60.0 if minutes is not None else plan.budget_s
        n_eval = episodes if episodes is not None else plan.eval_episodes
        for m in methods:
            if skip_reason(s, m):
                continue
            cfg = cell_config(s, m, suite, work / s.key / m, threads, device, [f"eval.episodes={n_eval}", *extra])
            specs.append(CellSpec(asdict(s), m, cfg.to_dict(), budget, n_eval, min(plan.curve_episodes, n_eval),
                                  plan.segments, data_root, list(extra)))
    return specs


def queries_per_episode(cfg: Config) -> int:
    """Query points of one test episode (every class of an episode gets q_query queries)."""
    return cfg.data.q_query if cfg.data.source == "sinusoid" else cfg.data.n_way * cfg.data.q_query


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_cell(spec: CellSpec) -> dict:
    """Meta-train one method in segments (an evaluation after each), evaluate it, return the measurements."""
    from training.registry import build_episodes
    from training.trainer import Trainer

    t_cell = time.perf_counter()
    cfg = config_from_dict(spec.config)
    run_dir = cfg.run_dir()
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a cell always starts fresh; its run folder is scratch
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    total_steps = cfg.train.steps
    trainer = Trainer(cfg, data_root=spec.data_root)
    episodes = build_episodes(cfg, cfg.eval.split, spec.data_root)
    curve: list[dict] = []
    train_s, result = 0.0, None
    for seg in range(1, spec.segments + 1):
        if spec.budget_s is not None:
            trainer.cfg.train.max_minutes = spec.budget_s / spec.segments / 60.0
        else:
            trainer.cfg.train.steps = max(1, round(total_steps * seg / spec.segments))
        result = trainer.run()
        trainer.resume = True  # later segments append to the run's log.csv instead of rewriting it
        train_s += result.seconds
        last = seg == spec.segments
        n = spec.eval_episodes if last else spec.curve_episodes
        res = evaluate(trainer.model, episodes, n, cfg.eval.batch_tasks, trainer.device, name=METHODS[spec.method])
        curve.append({"train_s": train_s, "step": trainer.step, "mean": res.mean, "ci95": res.ci95, "episodes": n})
    assert result is not None  # segments >= 1
    plot = plot_predictive(trainer.model, cfg, run_dir) if spec.method == "probmaml" and cfg.data.source == "sinusoid" \
        else None
    q = queries_per_episode(cfg)
    gpu_mib = torch.cuda.max_memory_allocated(trainer.device) / 2**20 if trainer.device.type == "cuda" else None
    return {
        "status": "ok", "setting": Setting(**spec.setting).key, "method": spec.method, "label": METHODS[spec.method],
        "metric": res.metric, "mean": res.mean, "ci95": res.ci95, "std": res.std, "episodes": res.episodes,
        "ece": getattr(res, "ece", None), "episodes_digest": res.episodes_digest,
        "per_episode": res.per_episode, "train_seconds": train_s, "train_steps": trainer.step,
        "meta_batch": cfg.train.meta_batch, "train_tasks_per_s": trainer.step * cfg.train.meta_batch / max(train_s, 1e-9),
        "eval_seconds": res.seconds, "queries_per_episode": q, "queries_per_s": res.episodes * q / max(res.seconds, 1e-9),
        "peak_rss_mib": peak_rss_mib(), "gpu_peak_mib": gpu_mib, "cell_seconds": time.perf_counter() - t_cell,
        "curve": curve, "plot": plot,
        "threads": torch.get_num_threads(), "device": str(trainer.device), "budget_s": spec.budget_s,
        "config_steps": total_steps, "model_options": cfg.model.options, "backbone": cfg.model.backbone,
        "backbone_options": cfg.model.backbone_options, "optim": f"{cfg.optim.name} lr {cfg.optim.lr:g} {cfg.optim.schedule}",
    }


def plot_predictive(model: Any, cfg: Config, run_dir: Path) -> Optional[str]:
    """Probabilistic MAML on the sinusoid: predictive mean and ±2 std on 4 test tasks (scripts/plot_probmaml_sinusoid.py)."""
    import argparse as _argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_probmaml_sinusoid", ROOT / "scripts" / "plot_probmaml_sinusoid.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = run_dir / "probmaml_sinusoid.png"
    mod.plot(model, _argparse.Namespace(shots=cfg.data.k_shot, samples=50, seed=0, out=str(out)))
    return str(out)


def _child_main(spec_path: str) -> int:
    """Child process: run the cell in `spec_path`, print its result as one `RESULT {json}` line."""
    from training.cpu_allocator import tune_cpu_allocator

    spec = CellSpec(**json.loads(Path(spec_path).read_text()))
    tune_cpu_allocator()  # as `metaformer train/eval` do, so a cell runs at the speed of the CLI
    try:
        res = run_cell(spec)
    except Exception as exc:  # noqa: BLE001 - the parent reports the failed cell in the table and goes on
        traceback.print_exc()  # the RESULT line has only the message; a failed cell's saved stderr has the traceback
        res = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def _failed(spec: CellSpec, error: str) -> dict:
    """The result row of a cell that did not finish."""
    return {"status": "failed", "setting": Setting(**spec.setting).key, "method": spec.method,
            "label": METHODS[spec.method], "error": error}


def cell_stderr_path(stderr_dir: Path, spec: CellSpec) -> Path:
    """Where run_cells keeps the stderr of a failed child cell."""
    return Path(stderr_dir) / f"{Setting(**spec.setting).key}_{spec.method}.stderr.log"


def run_cells(specs: Sequence[CellSpec], jobs: int = 1, in_process: bool = False, log: Any = print,
              timeout_s: Optional[float] = None, stderr_dir: Optional[Path] = None) -> list[dict]:
    """Run the cells, `jobs` child processes at a time (or all in this process); results in spec order. With
    ``stderr_dir``, the whole stderr of each failed child cell is kept there (cell_stderr_path)."""
    if in_process:
        results = []
        for spec in specs:
            t0 = time.perf_counter()
            try:
                r = run_cell(spec)
            except Exception as exc:  # noqa: BLE001 - one broken method must not lose the other rows
                r = _failed(spec, f"{type(exc).__name__}: {str(exc)[:400]}")
            r["child_wall_s"] = time.perf_counter() - t0
            r["rss_scope"] = "process (in-process run: peak of the whole process, not of the cell)"
            _log_cell(r, log)
            results.append(r)
        return results
    threads = str(specs[0].config["train"]["num_threads"] or 1) if specs else "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
    results: list[Optional[dict]] = [None] * len(specs)
    pending = list(enumerate(specs))
    running: list[tuple[int, subprocess.Popen, float, Any, Any]] = []
    with tempfile.TemporaryDirectory(prefix="metaformer_bench_") as tmp:
        while pending or running:
            while pending and len(running) < max(1, jobs):
                i, spec = pending.pop(0)
                path = os.path.join(tmp, f"cell{i}.json")
                Path(path).write_text(json.dumps(asdict(spec)))
                # Files, not pipes: a child that writes more than a pipe buffer must not block on it.
                out_f = open(os.path.join(tmp, f"cell{i}.out"), "w+")
                err = open(os.path.join(tmp, f"cell{i}.err"), "w+")
                p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--cell", path], cwd=ROOT, env=env,
                                     stdout=out_f, stderr=err, text=True)
                running.append((i, p, time.perf_counter(), out_f, err))
            time.sleep(0.2)
            for item in list(running):
                i, p, t0, out_f, err = item
                if p.poll() is None and not (timeout_s and time.perf_counter() - t0 > timeout_s):
                    continue
                if p.poll() is None:
                    p.kill()  # only this cell's own child
                p.wait()
                out_f.seek(0)
                out = out_f.read()
                out_f.close()
                running.remove(item)
                err.seek(0)
                err_text = err.read()
                err.close()
                lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
                if lines:
                    r = json.loads(lines[-1][len("RESULT "):])
                    if r.get("status") != "ok":
                        r = _failed(specs[i], r.get("error", "unknown error"))
                else:
                    tail = [x for x in err_text.strip().splitlines() if x.strip()][-1:] or [f"exit status {p.returncode}"]
                    r = _failed(specs[i], f"child exited with status {p.returncode}: {tail[0][:300]}")
                if stderr_dir is not None and r.get("status") != "ok":
                    # the temporary folder goes with this call; the traceback must outlive it
                    path = cell_stderr_path(stderr_dir, specs[i])
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(err_text)
                r["child_wall_s"] = time.perf_counter() - t0
                r["rss_scope"] = "cell (own child process)"
                _log_cell(r, log)
                results[i] = r
    return [r for r in results if r is not None]


def _log_cell(r: dict, log: Any) -> None:
    """One progress line per finished cell."""
    if r.get("status") != "ok":
        log(f"[bench] {r['setting']:15s} {r['label']:18s} FAILED: {r.get('error')}")
        return
    scale, unit = (100.0, "%") if r["metric"] == "accuracy" else (1.0, " MSE")
    log(f"[bench] {r['setting']:15s} {r['label']:18s} {scale * r['mean']:7.2f}{unit} ± {scale * r['ci95']:.2f}  "
        f"{r['train_steps']} steps in {r['train_seconds']:.0f} s ({r['train_tasks_per_s']:.1f} tasks/s), "
        f"{r['queries_per_s']:.0f} queries/s, {r['peak_rss_mib']:.0f} MiB, cell {r['child_wall_s']:.0f} s")


# ---------------------------------------------------------------------------------------------- peers
def run_peers_cell(out_json: Path, threads: int, configs: str = "sinusoid", orders: str = "so",
                   timeout_s: float = 1800.0) -> Optional[dict]:
    """Run scripts/bench_meta_train.py on a small cell (1 inner step); its JSON, or None on failure."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(PEERS_BENCH), "--configs", configs, "--steps-list", "1", "--orders", orders,
           "--threads", str(threads), "--warmup", "1", "--timed", "3", "--sine-timed", "10", "--json-out", str(out_json)]
    try:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=True, env=env)
        data = json.loads(out_json.read_text())
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        print(f"[bench] peer comparison failed: {exc}", flush=True)
        return None
    data["source"] = f"run by this script: `{' '.join(shlex.quote(c) for c in cmd[1:])}`"
    return data


def load_peers(path: Path) -> dict:
    """A scripts/bench_meta_train.py --json-out file, tagged with where it came from."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--peers-json {path}: cannot read a bench_meta_train.py JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise SystemExit(f"--peers-json {path}: expected the JSON of scripts/bench_meta_train.py --json-out "
                         "(an object with a 'results' list)")
    args = data.get("args", {})
    shown = {k: args[k] for k in ("configs", "steps_list", "orders", "threads", "warmup", "timed", "sine_timed") if k in args}
    data["source"] = (f"read from `{path}`, written by `scripts/bench_meta_train.py` ({shown}) in a separate run, "
                      "not by this command")
    return data


def peer_groups(peers: dict) -> dict[str, list[tuple[str, float]]]:
    """(setup, inner steps, order) -> [(implementation, tasks/s)] of the cells that ran."""
    groups: dict[str, list[tuple[str, float]]] = {}
    for r in peers.get("results", []):
        if r.get("status") != "ok" or "tasks_per_s" not in r:
            continue
        key = f"{r['config']} {r['steps']}-step {str(r['order']).upper()}"
        groups.setdefault(key, []).append((r["impl"], float(r["tasks_per_s"])))
    return groups


# ---------------------------------------------------------------------------------------------- panels
@dataclass(frozen=True)
class Panel:
    """A benchmark script that --panels runs after the suite's cells; its printed tables become a section of RESULTS.md."""

    name: str
    title: str
    script: str  # a file under scripts/, or a module run with `python -m` (the `metaformer` command)
    args: tuple[str, ...] = ()
    needs_data: bool = False  # gets --data-root
    needs_peers: bool = False  # gets --peers-python
    json_option: Optional[str] = None  # the script's option that also writes its rows as JSON
    scratch_option: Optional[str] = None  # the script's output-folder option: given a scratch folder, not kept
    env: tuple[tuple[str, str], ...] = ()  # extra environment of the child


_PEER_IMPLS = "plain,l2l,higher,torchopt_func"
PANELS = {p.name: p for p in (
    Panel("fused_op", "Fused inner-loop update (`metaformer.ops.inner_update`) against a per-tensor loop",
          "bench_inner_update.py", ("--device", "cpu"), json_option="--json"),
    Panel("block_ops", "Fused BatchNorm + ReLU + max-pool and Conv-4 stem against the torch ops",
          "bench_block_ops.py", ("--repeats", "20")),
    Panel("meta_train_conv4", "MAML meta-training step against the peer libraries: Conv-4, Omniglot-shaped 5-way "
          "1-shot, meta-batch 32", "bench_meta_train.py",
          ("--configs", "omniglot", "--steps-list", "1,5", "--orders", "so,fo", "--threads", "1", "--warmup", "0",
           "--timed", "3", "--impls", _PEER_IMPLS + ",metaformer_loop"), needs_peers=True, json_option="--json-out"),
    Panel("meta_train_sinusoid", "MAML meta-training step against the peer libraries: sinusoid MLP 1-40-40-1, "
          "K = 10, meta-batch 25", "bench_meta_train.py",
          ("--configs", "sinusoid", "--steps-list", "1,5", "--orders", "so", "--threads", "1",
           "--impls", _PEER_IMPLS + ",metaformer_batched"), needs_peers=True, json_option="--json-out"),
    Panel("allocator", "CPU allocator tuning: page faults of batched steps", "bench_allocator.py", needs_data=True),
    Panel("episodes", "Episode sampling throughput (Omniglot)", "bench_episodes.py", needs_data=True),
    Panel("profile", "Where a Conv-4 second-order MAML step spends its time, and bf16 autocast",
          "profile_conv4_maml.py", ("--threads", "1", "--timed", "3")),
    Panel("demo", "The main job: `metaformer demo` (glyph 5-way 1-shot, Conv-4, 40 s of training per method)",
          "metaformer.cli", ("demo", "--no-progress"), scratch_option="--out"),
    Panel("sinusoid_heads", "Sinusoid regression: MSE after 1 and 10 inner steps for MAML, FOMAML, Meta-SGD, Reptile "
          "(20000 meta-iterations)", "sinusoid_heads_accuracy.py",
          ("--iters", "20000", "--shots", "5,10", "--threads", "1")),
    *(Panel(f"encoder_{data}", f"Frozen all-MiniLM-L6-v2 + ProtoNet on {title}, 5-way 1/5-shot (no training)",
            "finetune_encoder.py", ("--data", data, "--head", "protonet", "--mode", "frozen", "--steps", "0",
                                    "--eval-episodes", "600", "--seed", "0", *extra),
            needs_data=True, scratch_option="--out", env=(("HF_HUB_OFFLINE", "1"),))
      for data, title, extra in (("clinc150", "CLINC150 (30 test intents)", ("--max-per-class", "60")),
                                 ("huffpost", "HuffPost (16 test categories)", ()))),
)}


def parse_panels(value: str) -> list[Panel]:
    """``all`` or a comma-separated subset of PANELS, in the order given."""
    names = list(PANELS) if value.strip() == "all" else [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in PANELS]
    if unknown:
        raise ValueError(f"unknown panel(s) {', '.join(unknown)}; choose from all, {', '.join(PANELS)}")
    return [PANELS[n] for n in names]


def run_panel(panel: Panel, res_dir: Path, prefix: str, data_root: Optional[str] = None,
              peers_python: Optional[str] = None, timeout_s: float = 3600.0, git: Optional[dict] = None) -> dict:
    """Run one panel's script as a child process; its command, status, wall time, printed output and JSON rows."""
    git = git or git_info()
    args = list(panel.args)
    if panel.needs_data and data_root:
        args += ["--data-root", str(data_root)]
    if panel.needs_peers and peers_python:
        args += ["--peers-python", str(peers_python)]
    json_path = res_dir / f"{prefix}_panel_{panel.name}.json" if panel.json_option else None
    if json_path is not None:
        res_dir.mkdir(parents=True, exist_ok=True)
        args += [panel.json_option, str(json_path)]
    shown_args = [shlex.quote(a) for a in args]
    scratch = None
    if panel.scratch_option:
        scratch = tempfile.mkdtemp(prefix=f"metaformer_panel_{panel.name}_")
        args += [panel.scratch_option, scratch]
        shown_args += [panel.scratch_option, "<scratch folder>"]
    if panel.script.endswith(".py"):
        argv, shown = [str(ROOT / "scripts" / panel.script)], ["scripts/" + panel.script]
    else:
        argv, shown = ["-m", panel.script], ["python", "-m", panel.script]
    out = {"name": panel.name, "title": panel.title, "command": " ".join(shown + shown_args),
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), **git}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, *argv, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                           env={**os.environ, **dict(panel.env), "METAFORMER_COMMIT": str(git["commit"]),
                                "METAFORMER_DIRTY": "1" if git["dirty"] else "0"})
    except (OSError, subprocess.SubprocessError) as exc:
        return {**out, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500],
                "seconds": time.perf_counter() - t0}
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    out["seconds"] = time.perf_counter() - t0
    out["output"] = p.stdout.strip() if scratch is None else p.stdout.strip().replace(scratch, "<scratch folder>")
    if p.returncode != 0:
        tail = (p.stderr.strip() or p.stdout.strip()).splitlines()[-1:] or [f"exit status {p.returncode}"]
        return {**out, "status": "failed", "error": f"exit status {p.returncode}: {tail[0][:400]}"}
    if json_path is not None:
        try:
            out["rows"] = json.loads(json_path.read_text())
        except (OSError, ValueError) as exc:
            return {**out, "status": "failed", "error": f"no JSON from {panel.json_option} ({exc})"}
    return {**out, "status": "ok"}


def run_panels(panels: Sequence[Panel], res_dir: Path, prefix: str, data_root: Optional[str],
               peers_python: Optional[str], log: Any = print, git: Optional[dict] = None) -> list[dict]:
    """Run the panels one at a time (each script times itself on an otherwise idle machine), logging each. ``git``:
    the commit and dirty flag read before this run wrote anything (its own outputs are tracked files under docs/,
    which would otherwise mark every later panel "uncommitted changes")."""
    git = git or git_info()
    runs = []
    for panel in panels:
        log(f"[bench] panel {panel.name}: {panel.script}")
        runs.append(run_panel(panel, res_dir, prefix, data_root, peers_python, git=git))
        r = runs[-1]
        log(f"[bench] panel {panel.name}: {r['status']} in {r.get('seconds', 0.0):.0f} s"
            + (f" ({r['error']})" if r.get("error") else ""))
    return runs


def peers_from_panels(panels: Sequence[dict]) -> Optional[dict]:
    """The meta-train panels' bench_meta_train.py JSON merged into one peer record (for the throughput plot)."""
    runs = [p for p in panels if p.get("status") == "ok" and p["name"].startswith("meta_train")
            and isinstance(p.get("rows"), dict)]
    if not runs:
        return None
    merged = dict(runs[0]["rows"])
    merged["results"] = [r for p in runs for r in p["rows"].get("results", [])]
    merged["source"] = "the meta-training panels of this run: " + "; ".join(f"`{p['command']}`" for p in runs)
    return merged


def _panel_body(lines: list[str]) -> list[str]:
    """A script's output from the paragraph above its first headed table on (progress lines before it dropped;
    the JSON keeps the whole output), or all of it when it prints no table."""
    heads = [i for i in range(len(lines) - 1) if lines[i].startswith("|") and lines[i + 1].startswith("|-")]
    if not heads:
        return lines
    j = heads[0] - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    while j >= 0 and lines[j].strip() and not lines[j].startswith("|"):
        j -= 1
    return lines[j + 1:]


def panels_section(panels: Sequence[dict]) -> list[str]:
    """RESULTS.md lines for the panels: per script its command, wall time and printed output (or why it failed)."""
    md = ["## Building blocks and peer libraries (`--panels`)", "",
          "Each subsection is one benchmark script that this command ran after the suite's cells, one at a time, "
          "with its output as printed (the scripts' own docstrings and docs/benchmarks.md explain the setups). "
          "Timings on a shared machine move between runs: compare rows within a table, not across runs.", ""]
    for p in panels:
        when = f", {p['date']} UTC, commit `{str(p['commit'])[:12]}`" if p.get("date") else ""
        md += [f"### {p['title']}", "", f"Command: `{p['command']}` ({p.get('seconds', 0.0):.0f} s{when}"
               + (", uncommitted changes" if p.get("dirty") else "") + ")", ""]
        if p.get("status") != "ok":
            md += [f"**Failed**: {p.get('error')}", ""]
            continue
        lines = _panel_body(p.get("output", "").splitlines())
        if not any(line.startswith("|") for line in lines):
            md += ["```", *lines, "```", ""]
            continue
        prev_table = False
        for line in lines:  # keep tables intact: a blank line before and after each one
            is_table = line.startswith("|")
            if is_table != prev_table and md[-1] != "":
                md.append("")
            # text lines end in a markdown line break, so that each printed line stays a line
            md.append(line if is_table or not line.strip() or line.endswith("  ") else line + "  ")
            prev_table = is_table
        md.append("")
    return md


# ---------------------------------------------------------------------------------------------- machine
def machine_info(device: str) -> dict:
    """Cores, CPU model, memory, GPU (or none), torch version, commit: the header of RESULTS.md."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), cpu)
    except (OSError, subprocess.SubprocessError):
        pass  # lscpu is optional; the platform string stays
    mem = ""
    try:
        kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        mem = f"{kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        from metaformer.ops import backend

        ops = backend()
    except Exception as exc:  # noqa: BLE001 - the report says which inner-update backend ran, or why it is unknown
        ops = f"unknown ({type(exc).__name__})"
    return {"cores": os.cpu_count(), "cpu": cpu, "memory": mem, "gpu": gpu, "device": device,
            "torch": torch.__version__, "python": platform.python_version(), "ops_backend": ops, **git_info()}


def git_info() -> dict:
    """The commit (git rev-parse HEAD, or $METAFORMER_COMMIT) and whether the working tree differed from it."""
    if os.environ.get("METAFORMER_COMMIT"):
        # a copy of the tree without its history (a remote GPU machine) is told which commit it came from
        return {"commit": os.environ["METAFORMER_COMMIT"], "dirty": os.environ.get("METAFORMER_DIRTY") == "1"}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10)
        return {"commit": head.stdout.strip() or "unknown", "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown (git not available)", "dirty": False}


# ---------------------------------------------------------------------------------------------- plots
def _pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(label: str) -> str:
    """The same matplotlib colour for a method in every plot."""
    labels = list(METHODS.values())
    return f"C{labels.index(label) % 10}" if label in labels else "black"


def _ok(results: Sequence[dict]) -> list[dict]:
    """The cells that finished."""
    return [r for r in results if r.get("status") == "ok"]


def plot_accuracy_vs_shots(results: Sequence[dict], path: Path) -> Optional[Path]:
    """Accuracy (95% CI) against shots, one line per method, one panel per (source, n-way); None if no data."""
    groups: dict[str, dict[str, list[tuple[int, float, float]]]] = {}
    for r in _ok(results):
        s = parse_setting(r["setting"])
        if s.source == "sinusoid":
            continue
        groups.setdefault(f"{s.source} {s.n_way}-way", {}).setdefault(r["label"], []).append(
            (s.k_shot, 100 * r["mean"], 100 * r["ci95"]))
    # a panel with a single shot count says nothing about shots; keep those only when no panel has two
    several = {k: v for k, v in groups.items() if len({p[0] for pts in v.values() for p in pts}) > 1}
    groups = several or groups
    if not groups:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.0), squeeze=False)
    for ax, (title, by_method) in zip(axes[0], sorted(groups.items())):
        shots = sorted({k for pts in by_method.values() for k, _, _ in pts})
        for label, pts in by_method.items():
            pts = sorted(pts)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=4,
                        label=label, color=_color(label))
        ax.set_xticks(shots)
        ax.set_xlabel("shots (support examples per class)")
        ax.set_ylabel("test accuracy (%), 95% CI")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_vs_time(results: Sequence[dict], path: Path) -> Optional[Path]:
    """Test accuracy (or MSE) after each training segment against meta-training seconds, one panel per setting."""
    by_setting: dict[str, list[dict]] = {}
    for r in _ok(results):
        by_setting.setdefault(r["setting"], []).append(r)
    if not by_setting:
        return None
    plt = _pyplot()
    n = len(by_setting)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (key, rs) in zip(axes.flat, by_setting.items()):
        regression = rs[0]["metric"] == "mse"
        scale = 1.0 if regression else 100.0
        for r in rs:
            c = r["curve"]
            ax.errorbar([p["train_s"] for p in c], [scale * p["mean"] for p in c], yerr=[scale * p["ci95"] for p in c],
                        marker="o", capsize=3, label=r["label"], color=_color(r["label"]))
        ax.set_xlabel("meta-training time (s)")
        ax.set_ylabel("test MSE (lower is better)" if regression else "test accuracy (%)")
        if regression:
            ax.set_yscale("log")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_peer_throughput(peers: Optional[dict], path: Path) -> Optional[Path]:
    """Meta-train tasks/s per implementation (metaformer and peers), one panel per setup; None without data."""
    groups = peer_groups(peers) if peers else {}
    if not groups:
        return None
    plt = _pyplot()
    cols = min(len(groups), 2)
    nrows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    for ax, (key, rows) in zip(axes.flat, groups.items()):
        names = [n for n, _ in rows]
        vals = [v for _, v in rows]
        colors = ["#C44E52" if n.startswith("metaformer") else "#4C72B0" for n in names]
        bars = ax.bar(range(len(rows)), vals, color=colors)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}" if v >= 10 else f"{v:.1f}", ha="center",
                    va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("meta-train tasks/s")
        ax.set_title(f"MAML, {key}", fontsize=9)
    fig.suptitle("meta-training throughput: metaformer (red) vs peer libraries (blue)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- report
def parse_setting(key: str) -> Setting:
    """omniglot-5w1s -> Setting('omniglot', 5, 1); sinusoid-10s -> Setting('sinusoid', 0, 10)."""
    source, _, shape = key.partition("-")
    try:
        if source == "sinusoid":
            setting = Setting(source, 0, int(shape.rstrip("s")))
        else:
            n, k = shape.rstrip("s").split("w")
            setting = Setting(source, int(n), int(k))
    except ValueError:
        raise ValueError(f"setting {key!r} must look like omniglot-5w1s, glyph-20w5s or sinusoid-10s") from None
    if setting.k_shot < 1 or (source != "sinusoid" and setting.n_way < 1):
        raise ValueError(f"setting {key!r}: the ways and shots must be at least 1, e.g. glyph-5w1s or sinusoid-10s")
    return setting


def _fmt_score(r: dict) -> str:
    """'97.53 ± 0.41' (accuracy in %) or '0.512 ± 0.034' (MSE)."""
    if r["metric"] == "accuracy":
        return f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}"
    return f"{r['mean']:.3f} ± {r['ci95']:.3f}"


def _loads(values: Sequence[float]) -> str:
    """'1.92 / 1.40 / 0.95' (a tuple here, a list after a JSON round trip)."""
    return " / ".join(f"{v:.2f}" for v in values)


def setting_table(rows: Sequence[dict]) -> str:
    """Markdown table of one setting: score with 95% CI, calibration, training, throughput, memory and time."""
    metric = next((r["metric"] for r in rows if r.get("status") == "ok"), "accuracy")
    head = "accuracy (%) ± 95% CI" if metric == "accuracy" else "MSE ± 95% CI (lower is better)"
    gpu = any(r.get("gpu_peak_mib") is not None for r in rows)
    ece = any(r.get("ece") is not None for r in rows)
    cols = (["method", head] + (["ECE (%)"] if ece else []) + ["episodes", "meta-train s", "steps", "meta-train tasks/s",
            "inference queries/s", "peak RSS (MiB)"] + (["peak GPU memory (MiB)"] if gpu else []) + ["cell wall s"])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | failed: {str(r.get('error', ''))[:120]} |" + " |" * (len(cols) - 2))
            continue
        ece_cell = ([f"{100 * r['ece']:.2f}" if r.get("ece") is not None else "–"] if ece else [])
        gpu_cell = ([f"{r['gpu_peak_mib']:.0f}" if r.get("gpu_peak_mib") is not None else "–"] if gpu else [])
        cells = ([r["label"], _fmt_score(r)] + ece_cell + [str(r["episodes"]), f"{r['train_seconds']:.0f}",
                 str(r["train_steps"]), f"{r['train_tasks_per_s']:.1f}", f"{r['queries_per_s']:.0f}",
                 f"{r['peak_rss_mib']:.0f}"] + gpu_cell + [f"{r['child_wall_s']:.0f}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _as_eval_result(r: dict) -> EvalResult:
    """A cell's scores as an EvalResult (for the paired comparison)."""
    return EvalResult(r["label"], r["metric"], r["mean"], r["ci95"], 0.0, r["episodes"],
                      per_episode=list(r.get("per_episode") or []), episodes_digest=r.get("episodes_digest"))


def paired_section(rows: Sequence[dict]) -> str:
    """Each method's per-episode difference from the Meta-Transformer (else the first method) on the setting's episodes."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("per_episode")]
    if len(ok) < 2:
        return ""
    ref = next((r for r in ok if r["method"] == "meta_transformer"), ok[0])
    base = _as_eval_result(ref)
    others = [r for r in ok if r is not ref and same_episodes(base, _as_eval_result(r))]
    if not others:
        return ""
    acc = ref["metric"] == "accuracy"
    scale, unit = (100.0, "points") if acc else (1.0, "MSE")
    lines = [f"Paired differences from {ref['label']} on the same {ref['episodes']} episodes ({unit}; 95% CI of the "
             "per-episode differences; an interval that excludes 0 is a real difference on these episodes):", "",
             f"| method | minus {ref['label']} | 95% CI | better / worse episodes | excludes 0 |", "|---|---|---|---|---|"]
    for r in others:
        d = paired_difference(base, _as_eval_result(r))
        lines.append(f"| {r['label']} | {d.mean * scale:+.{2 if acc else 3}f} | ± {d.ci95 * scale:.{2 if acc else 3}f} | "
                     f"{d.wins} / {d.losses} | {'yes' if d.significant else 'no'} |")
    return "\n".join(lines) + "\n"


def published_table(results: Sequence[dict]) -> str:
    """Our Omniglot accuracies next to the published Vinyals-split figures, for the settings that ran."""
    ours: dict[tuple[str, str], dict] = {}
    shapes = []
    for r in _ok(results):
        s = parse_setting(r["setting"])
        if s.source != "omniglot":
            continue
        shape = f"{s.n_way}w{s.k_shot}s"
        ours[(r["method"], shape)] = r
        if shape not in shapes:
            shapes.append(shape)
    if not shapes:
        return ""
    order = ["5w1s", "5w5s", "20w1s", "20w5s"]
    shapes.sort(key=lambda x: order.index(x) if x in order else len(order))
    head = "| method | " + " | ".join(f"{s} ours | {s} published" for s in shapes) + " |"
    lines = [head, "|---|" + "---|---|" * len(shapes)]
    methods = [m for m in METHODS if any((m, s) in ours for s in shapes)]
    for m in methods:
        cells = []
        for s in shapes:
            r = ours.get((m, s))
            cells.append(_fmt_score(r) if r else "not run")
            pub = PUBLISHED_OMNIGLOT.get(m, {}).get(s)
            cells.append(f"{pub:.1f}" if pub is not None else "–")
        lines.append(f"| {METHODS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def peers_table(peers: dict) -> str:
    """Markdown table of the peer comparison: tasks/s and ratio to the fastest peer per setup."""
    lines = ["| setup | implementation | meta-train tasks/s | x fastest peer | peak RSS (MiB) |", "|---|---|---|---|---|"]
    for key, rows in peer_groups(peers).items():
        peer_best = max((v for n, v in rows if not n.startswith("metaformer")), default=None)
        rss = {(r["impl"]): r.get("peak_rss_mib") for r in peers["results"]
               if f"{r['config']} {r['steps']}-step {str(r['order']).upper()}" == key}
        for name, v in rows:
            ratio = f"{v / peer_best:.2f}" if peer_best else "–"
            mib = f"{rss[name]:.0f}" if rss.get(name) is not None else "–"
            lines.append(f"| {key} | {name} | {v:.1f} | {ratio} | {mib} |")
    return "\n".join(lines) + "\n"


def describe_suite(suite: Suite, specs: Sequence[CellSpec]) -> list[str]:
    """Bullet lines saying exactly what the run covered and with which budgets."""
    lines = []
    for key in dict.fromkeys(Setting(**s.setting).key for s in specs):
        cell = [s for s in specs if Setting(**s.setting).key == key]
        s0 = cell[0]
        budget = f"{s0.budget_s:.0f} s of meta-training per method" if s0.budget_s is not None else \
            f"{s0.config['train']['steps']} meta-training steps per method"
        cfg = s0.config
        shape = f"{cfg['data']['q_query']} queries per class" if cfg["data"]["source"] != "sinusoid" else \
            f"{cfg['data']['q_query']} query points"
        lines.append(f"- **{key}**: {len(cell)} methods ({', '.join(METHODS[c.method] for c in cell)}); {budget} in "
                     f"{s0.segments} segments; {s0.eval_episodes} fixed test episodes (seed {cfg['eval']['seed']}), "
                     f"{shape}; curve points after earlier segments on the first {s0.curve_episodes} of them; backbone "
                     f"{cfg['model']['backbone']} {cfg['model']['backbone_options']}.")
    return lines


def method_settings_table(specs: Sequence[CellSpec]) -> str:
    """Per cell: meta-batch, optimiser and the method options, so every row can be reproduced."""
    lines = ["| setting | method | meta-batch | optimiser | model.options |", "|---|---|---|---|---|"]
    for s in specs:
        o = s.config["optim"]
        lines.append(f"| {Setting(**s.setting).key} | {METHODS[s.method]} | {s.config['train']['meta_batch']} | "
                     f"{o['name']} lr {o['lr']:g}, {o['schedule']}, warm-up {o['warmup_steps']} | "
                     f"`{json.dumps(s.config['model']['options'])}` |")
    return "\n".join(lines) + "\n"


def gpu_section(gpu: dict) -> list[str]:
    """The GPU section from a suite JSON that ran with --device cuda (on another machine, usually)."""
    m = gpu["machine"]
    lines = [f"From a separate run on a GPU machine: `{gpu['command']}`, {gpu['date']} (UTC); {m['gpu']}, "
             f"{m['cores']} CPU cores ({m['cpu']}), torch {m['torch']}, Python {m['python']}, inner-update backend "
             f"`{m.get('ops_backend', 'not recorded')}`; commit `{m['commit']}`"
             + (" with uncommitted changes" if m.get("dirty") else "") + f"; {gpu['threads']} CPU thread(s) per cell, "
             f"{gpu['jobs']} cell(s) at a time; total {gpu['total_seconds']:.0f} s. Suite `{gpu['suite']}` (its "
             "budgets and fixed test episodes, the same as the CPU tables of a run of that suite): in the same "
             f"meta-training seconds the GPU runs many more steps. Settings: "
             f"{', '.join(dict.fromkeys(r['setting'] for r in gpu['results']))}"
             + ("" if any(r["setting"].startswith("omniglot") for r in gpu["results"]) else
                " (no Omniglot: the data set was not on that machine)") + ".", ""]
    if m.get("ops_backend") not in (None, "extension"):
        lines += [f"The compiled extension was not built on that machine (backend `{m.get('ops_backend')}`): the "
                  "inner-loop update ran on the pure-PyTorch reference, so these rows measure the methods on the GPU, "
                  "not the fused CUDA kernels.", ""]
    fused = gpu.get("fused")
    if fused:
        lines += ["### Fused inner-loop update on the GPU", "",
                  f"`scripts/bench_inner_update.py --device cuda` on a GPU machine, rows read from `{fused['source']}` "
                  "(each row first checked against the Python loop by that script); see docs/benchmarks.md for what "
                  "the columns count.", "", fused_table(fused["rows"])]
    else:
        lines += ["The CUDA rows of the fused-op benchmark (`scripts/bench_inner_update.py --device cuda`) were not "
                  "measured with this run.", ""]
    meta_train = gpu.get("meta_train")
    if meta_train:
        lines += gpu_meta_train_lines(meta_train)
    else:
        lines += ["The MAML step against the peer libraries (`scripts/bench_meta_train.py --device cuda`) was not "
                  "measured on the GPU with this run.", ""]
    for key in dict.fromkeys(r["setting"] for r in gpu["results"]):
        lines += [f"### {key} on the GPU", "", setting_table([r for r in gpu["results"] if r["setting"] == key])]
    return lines


def gpu_meta_train_lines(data: dict) -> list[str]:
    """The MAML step on the GPU against the peers: one table and, per setup, our best speed over learn2learn's."""
    results = data["results"]
    lines = ["### MAML meta-training step against the peer libraries on the GPU", "",
             " and ".join(f"`{c}`" for c in data["commands"]) + f" on {data.get('device_name', 'a GPU')}, "
             f"{data.get('date', 'date not recorded')} (UTC), torch {data.get('torch', '?')}, commit "
             f"`{data.get('commit', 'not recorded')}`; rows read from "
             + " and ".join(f"`{x}`" for x in data["sources"]) + ". The peers run "
             "../shared/bench/peers_maml.py's own implementations on the GPU (scripts/peers_on_device.py); every "
             "meta-gradient is checked against the plain loop (float32 on the GPU) and against the float64 plain loop "
             "on the CPU; tasks/s is the median of the timed meta-train steps, the clock stopped after the GPU finished "
             "each.", "", *_bench_meta_train().table_rows(results, gpu=True)]
    ours = _bench_meta_train().OUR_IMPLS
    verdicts = []
    for key in dict.fromkeys((r.get("config"), r.get("steps"), r.get("order")) for r in results):
        ok = [r for r in results if (r.get("config"), r.get("steps"), r.get("order")) == key and r.get("status") == "ok"]
        l2l = [r["tasks_per_s"] for r in ok if r["impl"] == "l2l"]
        best = max((r for r in ok if r["impl"] in ours), key=lambda r: r["tasks_per_s"], default=None)
        if best is not None and l2l:
            verdicts.append(f"{key[0]} {key[1]}-step {str(key[2]).upper()}: {best['impl']} "
                            f"{best['tasks_per_s'] / l2l[0]:.1f}x learn2learn")
    lines += ["", "Our faster path against learn2learn (issue 5's GPU target: at least 10x on Conv-4): "
              + ("; ".join(verdicts) if verdicts else "no cell with both") + ".", ""]
    return lines


@functools.lru_cache(maxsize=None)
def _bench_meta_train() -> Any:
    """scripts/bench_meta_train.py as a module: its table of the MAML-step cells serves the GPU section too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_meta_train", ROOT / "scripts" / "bench_meta_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_gpu_meta_train(paths: Sequence[Path]) -> dict:
    """scripts/bench_meta_train.py --device cuda --json-out files (second and first order, say) as one, for the GPU
    section; the first file's command, date and machine head it, the others' commands are listed beside it."""
    parts = [_load_gpu_meta_train_file(Path(p)) for p in paths]
    merged = dict(parts[0])
    merged["results"] = [r for part in parts for r in part["results"]]
    merged["sources"] = [part["source"] for part in parts]
    merged["commands"] = list(dict.fromkeys(str(part.get("command", "scripts/bench_meta_train.py --device cuda"))
                                            for part in parts))
    return merged


def _load_gpu_meta_train_file(path: Path) -> dict:
    """One scripts/bench_meta_train.py --device cuda --json-out file."""
    try:
        data = json.loads(Path(path).read_text())
        device = str(data.get("device") or data["args"]["device"])
        rows = data["results"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SystemExit(f"--gpu-meta-train-json {path}: not a scripts/bench_meta_train.py --json-out file ({exc})") from None
    if not device.startswith("cuda") or not isinstance(rows, list):
        raise SystemExit(f"--gpu-meta-train-json {path}: that run used device {device!r}, not a GPU (run "
                         "scripts/bench_meta_train.py --device cuda on a GPU machine)")
    data["source"] = str(path)
    return data


def fused_table(rows: Sequence[dict]) -> str:
    """Markdown table of scripts/bench_inner_update.py --json rows, with the speed-up over the Python loop."""
    lines = ["| case | device | T | params | impl | us/call | GB/s | vs python loop |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next((x for x in rows if (x["case"], x["tasks"], x["device"]) == (r["case"], r["tasks"], r["device"])
                     and x["impl"] == "python loop"), None)
        speed = f"{base['us_per_call'] / r['us_per_call']:.2f}x" if base else "–"
        lines.append(f"| {r['case']} | {r['device']} | {r['tasks']} | {r['params']:,} | {r['impl']} | "
                     f"{r['us_per_call']:.1f} | {r['gb_per_s']:.1f} | {speed} |")
    return "\n".join(lines) + "\n"


def load_fused(path: Path) -> dict:
    """The CUDA rows of a scripts/bench_inner_update.py --json file, tagged with where they came from."""
    try:
        rows = json.loads(Path(path).read_text())
        cuda = [r for r in rows if r["device"] == "cuda"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--fused-json {path}: not a scripts/bench_inner_update.py --json file ({exc})") from None
    if not cuda:
        raise SystemExit(f"--fused-json {path}: no CUDA rows (run bench_inner_update.py --device cuda on a GPU)")
    return {"source": str(path), "rows": cuda}


def load_gpu_run(path: Path) -> dict:
    """A suite JSON written by a --device cuda run, for the GPU section."""
    try:
        data = json.loads(Path(path).read_text())
        device = data["machine"]["device"]
        data["results"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--gpu-json {path}: not a suite JSON written by scripts/benchmark.py ({exc})") from None
    if not str(device).startswith("cuda"):
        raise SystemExit(f"--gpu-json {path}: that run used device {device!r}, not a GPU (run it with --device cuda)")
    data.pop("gpu_run", None)  # one level: the GPU run's own GPU section is itself
    return data


def write_report(results: Sequence[dict], specs: Sequence[CellSpec], suite: Suite, out: Path, meta: dict,
                 peers: Optional[dict], gpu: Optional[dict] = None, panels: Sequence[dict] = ()) -> dict[str, Path]:
    """Write <out>/RESULTS.md, <out>/results/<suite>.json and the PNG plots; returns their paths."""
    from training.atomic import atomic_write_text

    res_dir = out / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    plots = {
        "accuracy_vs_shots": plot_accuracy_vs_shots(results, res_dir / f"{suite.name}_accuracy_vs_shots.png"),
        "accuracy_vs_time": plot_accuracy_vs_time(results, res_dir / f"{suite.name}_accuracy_vs_time.png"),
        "throughput_vs_peers": plot_peer_throughput(peers, res_dir / f"{suite.name}_throughput_vs_peers.png"),
    }
    paths.update({k: v for k, v in plots.items() if v is not None})
    for r in _ok(results):  # per-cell plots (probabilistic MAML's predictive band) move next to the others
        if r.get("plot"):
            dest = res_dir / f"{suite.name}_{r['setting']}_{r['method']}_predictive.png"
            if Path(r["plot"]).is_file() and Path(r["plot"]).resolve() != dest.resolve():
                shutil.copyfile(r["plot"], dest)
            if dest.is_file():
                paths[f"predictive_{r['setting']}_{r['method']}"] = dest
    payload = {**meta, "suite": suite.name, "time_boxed": suite.time_boxed, "cells": [asdict(s) for s in specs],
               "results": list(results), "peers": peers, "gpu_run": gpu, "panels": list(panels)}
    jpath = res_dir / f"{suite.name}.json"
    atomic_write_text(jpath, json.dumps(payload, indent=1))
    paths["json"] = jpath

    m = meta["machine"]
    gpu_name = m["gpu"] or "none (torch.cuda.is_available() is False)"
    md = [
        "# Results",
        "",
        f"Generated by `scripts/benchmark.py --suite {suite.name}`; do not edit by hand, rerun the command. The raw "
        f"numbers, with every per-episode score, are in [`results/{jpath.name}`](results/{jpath.name}).",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']} (UTC); total wall time {meta['total_seconds']:.0f} s "
        f"({meta['total_seconds'] / 60:.1f} min)",
        f"- Machine: {m['cores']} cores (os.cpu_count), CPU {m['cpu']}, {m['memory'] or 'memory unknown'} RAM; "
        f"GPU: {gpu_name}; cells ran on `{m['device']}`",
        f"- Software: torch {m['torch']}, Python {m['python']}; {meta['threads']} intra-op thread(s) per cell, "
        f"{meta['jobs']} cell(s) at a time, "
        + ("all in one process (peak RSS is then the whole process's)" if meta.get("in_process")
           else "each in its own child process"),
        f"- Commit: `{m['commit']}`" + (" (the working tree had uncommitted changes)" if m["dirty"] else ""),
        f"- Load average (1, 5, 15 min) at start {_loads(meta['load_start'])}, at end {_loads(meta['load_end'])}",
        "",
        "## What these numbers are (and are not)",
        "",
        "- **Omniglot split.** Ours is the alphabet-level split of the 30 *background* alphabets only "
        "(20 alphabets meta-train / 5 validation / 5 test, rotations by 90/180/270 degrees as extra classes, "
        "28x28). The published figures use the Vinyals et al. split, which also draws on the 20 evaluation "
        "alphabets (images_evaluation.zip, not on this machine) and splits by character. Test alphabets never "
        "seen in training make our split harder; the columns are side by side for orientation, not as a "
        "like-for-like comparison.",
    ]
    if suite.time_boxed:
        md.append("- **Budgets are seconds to minutes per method** on a CPU, against tens of thousands of steps in "
                  "the papers: the quick suite shows what each method learns in that time and that the pipeline "
                  "works end to end, not converged accuracy. Time-boxed settings (those of "
                  "`scripts/omniglot_time_boxed.sh`): meta-batch 8, constant learning rate after 20 warm-up steps, "
                  "MAML/FOMAML 1 inner step in training and 3 at evaluation, Meta-SGD 1/1. A training segment ends "
                  "after the step that crosses its share of the budget, so the meta-train seconds can exceed the "
                  "budget by up to one outer step per segment (seconds per step for the slower methods on Omniglot).")
    else:
        md.append("- **Full suite**: the configs' own hyper-parameters and step counts "
                  "(`training/configs/omniglot_*`, `glyph_demo.yaml` with 20k steps, `sinusoid.yaml`).")
    md += [
        "- All methods of one setting share the backbone, the data pipeline and the fixed test episodes (same "
        "seed, same episodes in the same order). 95% CI = 1.96 x sample std / sqrt(episodes) of the per-episode "
        "scores.",
        "- Meta-train tasks/s = meta-training steps x meta-batch / meta-training seconds (episode sampling "
        "included, evaluation excluded). Inference queries/s = test query points / evaluation seconds, with the "
        "adaptation to each support set included (inner loops for the gradient-based methods). Peak RSS is the "
        "child process's `ru_maxrss` (data set, model and interpreter included). Cell wall s includes "
        "interpreter start, data loading, training, the curve evaluations and the final evaluation.",
        "- ECE (classification only) is the expected calibration error of the softmax confidences, 15 equal-width "
        "bins, pooled over every query of the fixed test episodes: lower means the confidences match the "
        "accuracy. Probabilistic MAML averages the probabilities of its sampled adapted weights.",
        "- ProtoNet, MatchingNet and Baseline++ are classifiers: they have no sinusoid (regression) rows. The transfer "
        "baselines (Chen et al. 2019) pre-train with cross-entropy over all meta-training classes at once (the "
        "episodes only deliver the examples) and fit a new linear (Baseline) or cosine (Baseline++) classifier "
        "on the frozen support embeddings of each test episode. They have no glyph rows: the glyph family has "
        "2**24 classes per split, and a finite cap would change the shared test episodes.",
        "",
        "## What this run covered",
        "",
        *describe_suite(suite, specs),
        "",
    ]
    pub = published_table(results)
    if pub:
        md += ["## Omniglot beside the published figures", "",
               "Published: Vinyals et al. split, converged training (MAML: Finn et al. 2017; ProtoNet: Snell et al. "
               "2017; Meta-SGD: Li et al. 2017; MatchingNet: Vinyals et al. 2016). Ours: alphabet-level split of the "
               "background set, the budgets above.", "", pub]
    for key in dict.fromkeys(r["setting"] for r in results):
        rows = [r for r in results if r["setting"] == key]
        paired = paired_section(rows)
        md += [f"## {key}", "", setting_table(rows)] + ([paired] if paired else [])
    md += ["## Plots", ""]
    if "accuracy_vs_shots" in paths:
        md += [f"![accuracy vs shots](results/{paths['accuracy_vs_shots'].name})", "",
               "Accuracy against shots per method (95% CI)."
               + (" With one shot count per setting, each method is a single point." if len(
                   {parse_setting(r['setting']).k_shot for r in _ok(results) if r['metric'] == 'accuracy'}) < 2 else ""),
               ""]
    if "accuracy_vs_time" in paths:
        md += [f"![accuracy vs meta-training time](results/{paths['accuracy_vs_time'].name})", "",
               "Test accuracy (MSE for the sinusoid) after each training segment against cumulative meta-training "
               "seconds; earlier points use the first episodes of the fixed test set, the last point all of them.", ""]
    for key, png in paths.items():
        if key.startswith("predictive_"):
            md += [f"![predictive band]({'results/' + png.name})", "",
                   "Probabilistic MAML on 4 sinusoid test tasks after this run's training: support points, the true "
                   "function, the predictive mean and ±2 standard deviations over 50 sampled adapted weights.", ""]
    md += ["## Meta-training throughput against the peer libraries", ""]
    if peers and "throughput_vs_peers" in paths:
        md += [f"Source: {peers['source']}. MAML meta-train step on the same network, batch and initial weights in "
               "every library (see docs/benchmarks.md for the setup and the gradient check).", "",
               f"![throughput vs peers](results/{paths['throughput_vs_peers'].name})", "", peers_table(peers)]
        if not any(not impl.startswith("metaformer") for rows in peer_groups(peers).values() for impl, _ in rows):
            md += ["No peer library ran (their venv, `/tmp/peers/venv` from `../shared/bench/setup_venv.sh`, was "
                   "not found): these are metaformer's rows only.", ""]
    else:
        md += ["Not measured in this run: "
               + ("the peer benchmark produced no rows." if peers else "run without peers (`--no-peers`)."), ""]
    md += ["## GPU", ""]
    if m["gpu"] and m["device"].startswith("cuda"):
        md += [f"The cells above ran on {m['gpu']} (inner-update backend `{m.get('ops_backend', 'not recorded')}`). "
               "The CUDA rows of the fused-op benchmark come from `scripts/bench_inner_update.py --device cuda` and "
               "are not part of this file.", ""]
    elif gpu:
        md += gpu_section(gpu)
    elif m["gpu"]:
        md += [f"A GPU ({m['gpu']}) was present but this run used `{m['device']}`; rerun with `--device cuda` to fill "
               "this section.", ""]
    else:
        md += ["No GPU was available on the machine that produced this file, so there are no GPU rows: neither the "
               "suite on a GPU nor the CUDA rows of the fused-op benchmark. Nothing here is a GPU measurement.", ""]
    if panels:
        md += panels_section(panels)
    md += ["## Per-cell settings", "", method_settings_table(specs)]
    failed = [r for r in results if r.get("status") != "ok"]
    if failed:
        md += ["## Failed cells", ""] + [f"- {r['setting']} {r['label']}: {r.get('error')}" for r in failed] + [""]
    rpath = out / "RESULTS.md"
    atomic_write_text(rpath, "\n".join(md).rstrip() + "\n")
    paths["md"] = rpath
    return paths


# ---------------------------------------------------------------------------------------------- main
class SuiteFailed(RuntimeError):
    """Every cell of a suite run failed: no report was written (the message says where the errors are)."""


def default_work(suite: Suite) -> Path:
    """The scratch folder of the cells' run folders when --work is not given."""
    return Path(tempfile.gettempdir()) / "metaformer_benchmark" / suite.name


def write_failure_log(results: Sequence[dict], specs: Sequence[CellSpec], work: Path, in_process: bool) -> Path:
    """<work>/failed_cells.log: each failed cell's error and, for a child cell, the file holding its stderr."""
    lines = []
    for r, spec in zip(results, specs):
        if r.get("status") == "ok":
            continue
        lines.append(f"{r['setting']} {r['label']}: {r.get('error')}")
        if not in_process and cell_stderr_path(work, spec).is_file():
            lines.append(f"    stderr (traceback): {cell_stderr_path(work, spec)}")
    path = Path(work) / "failed_cells.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def run_suite(suite: Suite, out: Path, methods: Sequence[str], settings: Sequence[Setting], threads: int = 1,
              jobs: Optional[int] = None, work: Optional[Path] = None, device: str = "cpu",
              minutes: Optional[float] = None, episodes: Optional[int] = None, extra: Sequence[str] = (),
              peers: Optional[dict] = None, run_peers: bool = False, in_process: bool = False,
              data_root: Optional[str] = None, command: Optional[str] = None, log: Any = print,
              gpu: Optional[dict] = None, panels: Sequence[Panel] = (),
              peers_python: Optional[str] = None) -> dict[str, Path]:
    """Run every cell of the suite, then the panels and the peer cell if asked, and write the report; returns the
    paths written. Raises ValueError when there is no cell to run, and SuiteFailed (before any panel runs or any
    file under ``out`` is written) when every cell failed."""
    t0 = time.perf_counter()
    load_start = tuple(round(x, 2) for x in os.getloadavg())
    machine = machine_info(device)  # before any output is written: "dirty" must describe the code that ran
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    work = work or default_work(suite)
    jobs = suite.jobs if jobs is None else jobs
    specs = make_specs(suite, methods, settings, work, threads, device, minutes, episodes, extra, data_root)
    if not specs:
        raise ValueError(no_cells_message(methods, settings))
    log(f"[bench] suite {suite.name}: {len(specs)} cells, {jobs} at a time, {threads} thread(s) each; runs in {work}")
    results = run_cells(specs, jobs, in_process, log, stderr_dir=work)
    if not _ok(results):
        # a report of failed rows only would replace the last real one (docs/RESULTS.md by default) with nothing
        failures = write_failure_log(results, specs, work, in_process)
        raise SuiteFailed(f"all {len(results)} cell(s) failed, so no report was written (anything already in {out} "
                          f"is left as it was); the errors are in {failures}")
    panel_runs = run_panels(panels, out / "results", suite.name, data_root, peers_python, log,
                            git={"commit": machine["commit"], "dirty": machine["dirty"]})
    if peers is None:
        peers = peers_from_panels(panel_runs)
    if run_peers and peers is None:
        log("[bench] peer comparison: scripts/bench_meta_train.py (small cell)")
        # quick: the sinusoid MLP, second order only (under a minute); full: Conv-4 Omniglot too, SO and FO
        peers = run_peers_cell(out / "results" / f"{suite.name}_peers.json", threads,
                               "sinusoid" if suite.time_boxed else "sinusoid,omniglot",
                               "so" if suite.time_boxed else "so,fo")
    meta = {"command": command or " ".join(["scripts/benchmark.py", "--suite", suite.name]), "date": date,
            "machine": machine, "threads": threads, "jobs": jobs, "load_start": load_start,
            "load_end": tuple(round(x, 2) for x in os.getloadavg()), "total_seconds": time.perf_counter() - t0,
            "in_process": in_process}
    paths = write_report(results, specs, suite, out, meta, peers, gpu, panel_runs)
    log(f"[bench] wrote {', '.join(str(p) for p in paths.values())}; total {meta['total_seconds']:.0f} s")
    return paths


def report_from_json(path: Path, out: Path, panels: Sequence[Panel] = (), data_root: Optional[str] = None,
                     peers_python: Optional[str] = None, log: Any = print, gpu: Optional[dict] = None) -> dict[str, Path]:
    """Re-render RESULTS.md, the JSON and the plots from a suite JSON written earlier; no cell is rerun. ``panels``
    run now and replace the stored panels of the same name (the others are kept); ``gpu`` replaces the stored GPU
    section."""
    try:
        data = json.loads(Path(path).read_text())
        name, results, cells = data["suite"], data["results"], data["cells"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"--from-json {path}: not a JSON written by scripts/benchmark.py ({exc})") from None
    suite = SUITES.get(name) or Suite(name, (), {}, time_boxed=bool(data.get("time_boxed")), jobs=data.get("jobs", 1))
    meta = {k: data[k] for k in ("command", "date", "machine", "threads", "jobs", "load_start", "load_end",
                                 "total_seconds", "in_process") if k in data}
    stored = list(data.get("panels") or ())
    peers = data.get("peers")
    for run in run_panels(panels, out / "results", name, data_root, peers_python, log, git=git_info()):
        at = [i for i, p in enumerate(stored) if p["name"] == run["name"]]
        if at:
            stored[at[0]] = run
        else:
            stored.append(run)
    if panels and (peers is None or str(peers.get("source", "")).startswith("the meta-training panels")):
        peers = peers_from_panels(stored) or peers
    return write_report(results, [CellSpec(**c) for c in cells], suite, out, meta, peers,
                        gpu if gpu is not None else data.get("gpu_run"), stored)


def parse_methods(value: str) -> list[str]:
    """A comma-separated --methods value as a list of METHODS keys, first occurrence of each kept, in order."""
    # a repeated method would be two cells in the same run folder at once, and a paired row against itself
    methods = list(dict.fromkeys(m.strip() for m in value.split(",") if m.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not methods:
        raise ValueError(f"--methods is empty; give a comma-separated subset of {','.join(METHODS)}")
    return methods


def parse_settings(value: Optional[str], suite: Suite) -> list[Setting]:
    """A comma-separated --settings value (default: the suite's) as Settings, first occurrence of each kept."""
    if not value:  # --settings "" has always meant the suite's own
        return list(suite.settings)
    settings = list(dict.fromkeys(parse_setting(s.strip()) for s in value.split(",") if s.strip()))
    if not settings:
        raise ValueError("--settings is empty; give e.g. omniglot-5w1s,sinusoid-10s, or leave it out for the suite's")
    bad = [s.key for s in settings if s.source not in suite.plans]
    if bad:
        raise ValueError(f"unknown source in {', '.join(bad)}; sources: {', '.join(suite.plans)}")
    return settings


def no_cells_message(methods: Sequence[str], settings: Sequence[Setting]) -> str:
    """Why a choice of methods and settings has no cell, with each pair's reason."""
    reasons = [f"{METHODS[m]} on {s.key}: {skip_reason(s, m)}" for s in settings for m in methods if skip_reason(s, m)]
    return ("no cell to run: " + ("; ".join(reasons) if reasons else "no method or no setting given")
            + ". Choose --methods and --settings that have cells (classifiers skip the sinusoid, the transfer "
            "baselines skip glyph)")


def device_problem(device: str) -> Optional[str]:
    """Why --device cannot run the cells on this machine, or None when it can."""
    if device in ("cpu", "auto"):  # auto: the trainer picks CUDA when present, else the CPU
        return None
    try:
        dev = torch.device(device)
    except RuntimeError:
        return f"--device {device}: not a device; use cpu, cuda or cuda:N"
    if dev.type != "cuda":
        return f"--device {device}: the suite runs on cpu, cuda or cuda:N only"
    try:
        check_device(device)  # CUDA present, and the GPU number one of this machine's
    except ConfigError as exc:
        return str(exc)
    return None


def data_problem(specs: Sequence[CellSpec]) -> Optional[str]:
    """Why the cells that read Omniglot cannot find it (no data folder, or no background zip), or None."""
    from metaformer.data.omniglot import find_omniglot_dir, zip_candidates

    for spec in specs:
        cfg = config_from_dict(spec.config)
        if cfg.data.source != "omniglot":
            continue
        key = Setting(**spec.setting).key
        fix = ("pass --data-root DIR (the folder holding omniglot/images_background.zip) or set "
               f"$METAFORMER_DATA_ROOT, or leave {key} out of --settings")
        root = resolve_data_root(cfg, spec.data_root)
        if root is None:
            return f"the {key} cells need the Omniglot data folder and none was found: {fix}"
        if not root.is_dir():
            return f"data root {root} (needed by the {key} cells) is not a folder: {fix}"
        sets = ["background"] + (["evaluation"] if cfg.data.options.get("split_scheme", "vinyals") == "vinyals" else [])
        for image_set in sets:
            # the places the loader itself looks (the data folder, then its download cache)
            if not any(p.is_file() for p in zip_candidates(image_set, find_omniglot_dir(root))):
                return f"data root {root} (needed by the {key} cells) has no omniglot/images_{image_set}.zip: {fix}"
    return None


def recipe_main(a: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    """--recipe: train the recipe's stages, evaluate and pair them, write <out>/results/<name>.md and .json."""
    from training.checkpoint import CheckpointError
    from training.recipes import RecipeError, load_recipe, run_recipe, write_recipe_report

    if a.suite or a.from_json or a.panels:
        raise SystemExit("benchmark.py: --recipe runs alone; drop --suite, --from-json and --panels")
    if a.threads < 1 or (a.jobs is not None and a.jobs < 1):
        raise SystemExit("benchmark.py: --threads and --jobs must be >= 1")
    try:
        recipe = load_recipe(a.recipe)
    except RecipeError as exc:
        raise SystemExit(f"benchmark.py: {exc}") from None
    work = Path(a.work) if a.work else ROOT / "runs" / "recipes" / recipe.name
    command = "scripts/benchmark.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    meta = {**machine_info(a.device), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")}
    log = functools.partial(print, flush=True)
    try:
        report = run_recipe(recipe, work, data_root=a.data_root, threads=a.threads, jobs=a.jobs or 1, log=log)
    except (RecipeError, CheckpointError, RuntimeError) as exc:
        raise SystemExit(f"benchmark.py: {exc}") from None
    paths = write_recipe_report(report, meta, command, Path(a.out) / "results")
    print(f"[bench] wrote {', '.join(str(p) for p in paths)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse arguments; run the suite (or, with --cell, one cell as a child process)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), help="quick (<15 min on 2 CPU cores) or full (the real table)")
    ap.add_argument("--out", default="docs", help="folder of RESULTS.md; plots and JSON go to <out>/results")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--settings", default=None, help="comma-separated subset, e.g. omniglot-5w1s,sinusoid-10s "
                    "(default: the suite's); any source-NwKs works")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per cell")
    ap.add_argument("--jobs", type=int, default=None, help="cells at a time (default: quick 2, full 1)")
    ap.add_argument("--minutes", type=float, default=None, help="meta-training budget per cell in minutes "
                    "(default: quick's seconds, full's step counts)")
    ap.add_argument("--episodes", type=int, default=None, help="test episodes per cell (default: the suite's)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--work", default=None, help="scratch folder for the cells' run folders (default: $TMPDIR)")
    ap.add_argument("--data-root", default=None, help="folder holding omniglot/images_background.zip")
    ap.add_argument("--peers-json", default=None, help="scripts/bench_meta_train.py --json-out file for the peer plot "
                    "(default: run a small sinusoid cell of it, about a minute)")
    ap.add_argument("--no-peers", action="store_true", help="no peer comparison")
    ap.add_argument("--gpu-json", default=None, help="suite JSON of a --device cuda run (another machine) for the "
                    "GPU section")
    ap.add_argument("--fused-json", default=None, help="with --gpu-json: scripts/bench_inner_update.py --json file "
                    "from the same GPU machine (its CUDA rows go to the GPU section)")
    ap.add_argument("--gpu-meta-train-json", nargs="+", default=None, help="with --gpu-json: scripts/bench_meta_train.py "
                    "--device cuda --json-out file(s) from the same GPU machine (the MAML step against the peers there)")
    ap.add_argument("--panels", default="", help="after the cells, also run these benchmark scripts and put their "
                    f"tables in RESULTS.md: all, or a comma-separated subset of {','.join(PANELS)}")
    ap.add_argument("--peers-python", default=None, help="python of the peer libraries' venv for the meta_train "
                    "panels (default: scripts/bench_meta_train.py's)")
    ap.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE", default=[],
                    help="config overrides applied to every cell")
    ap.add_argument("--from-json", default=None, help="re-render RESULTS.md and the plots from a suite JSON "
                    "(<out>/results/<suite>.json) without running any cell; with --panels, those panels run now "
                    "and replace the stored ones of the same name")
    ap.add_argument("--recipe", default=None, help="instead of a suite, run a multi-stage recipe (training/recipes/*.yaml: "
                    "stages warm-started from earlier ones, then every listed stage evaluated and paired on the same "
                    "episodes); runs go to --work (default runs/recipes/<name>), the report to <out>/results/<name>.md; "
                    "rerunning keeps finished stages and evaluations")
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.cell:
        return _child_main(a.cell)
    if a.recipe:
        return recipe_main(a, argv)
    try:
        panels = parse_panels(a.panels) if a.panels else []
    except ValueError as exc:
        ap.error(str(exc))
    gpu = load_gpu_run(Path(a.gpu_json)) if a.gpu_json else None
    for opt, value, load, key in (("--fused-json", a.fused_json, load_fused, "fused"),
                                  ("--gpu-meta-train-json", a.gpu_meta_train_json, load_gpu_meta_train, "meta_train")):
        if value:
            if gpu is None:
                ap.error(f"{opt} goes with --gpu-json (the GPU run it belongs to)")
            gpu[key] = load(value if isinstance(value, list) else Path(value))
    if a.from_json:
        paths = report_from_json(Path(a.from_json), Path(a.out), panels, a.data_root, a.peers_python, gpu=gpu)
        print(f"[bench] wrote {', '.join(str(p) for p in paths.values())}")
        return 0
    if not a.suite:
        ap.error("--suite is required (quick or full)")
    suite = SUITES[a.suite]
    try:
        methods = parse_methods(a.methods)
        settings = parse_settings(a.settings, suite)
    except ValueError as exc:
        ap.error(str(exc))
    if a.threads < 1 or (a.jobs is not None and a.jobs < 1):
        ap.error("--threads and --jobs must be >= 1")
    if a.minutes is not None and not (math.isfinite(a.minutes) and a.minutes > 0):
        ap.error(f"--minutes must be a positive number of minutes of meta-training per cell, got {a.minutes:g} "
                 "(leave it out for the suite's own budget)")
    if a.episodes is not None and a.episodes < 1:
        ap.error(f"--episodes must be >= 1 test episodes per cell, got {a.episodes} (leave it out for the suite's)")
    problem = device_problem(a.device)
    if problem:
        ap.error(problem)
    # every check that the cells would otherwise fail one by one, made here before anything runs or is written
    work = Path(a.work) if a.work else None
    try:
        specs = make_specs(suite, methods, settings, work or default_work(suite), a.threads, a.device, a.minutes,
                           a.episodes, a.set, a.data_root)
    except ValueError as exc:  # ConfigError included: a --set override or a setting the configs reject
        ap.error(f"cannot build the cells: {exc}")
    if not specs:
        ap.error(no_cells_message(methods, settings))
    problem = data_problem(specs)
    if problem:
        ap.error(problem)
    peers = load_peers(Path(a.peers_json)) if a.peers_json else None
    command = "scripts/benchmark.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    try:
        run_suite(suite, Path(a.out), methods, settings, a.threads, a.jobs, work, a.device, a.minutes, a.episodes,
                  a.set, peers, not a.no_peers, data_root=a.data_root, command=command, gpu=gpu, panels=panels,
                  peers_python=a.peers_python)
    except SuiteFailed as exc:
        print(f"benchmark.py: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
