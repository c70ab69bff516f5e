"""The episodic meta-training loop: optimiser, schedule, clipping, mixed precision, NaN policy, logging,
checkpoints with exact resume, and data-parallel training under torchrun."""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from training import checkpoint as ckpt_io
from training.atomic import atomic_write_text
from training.config import Config, ConfigError, config_differences, dump_config
from training.distributed import (DistInfo, all_gather_objects, any_rank, cleanup, init_from_env, max_over_ranks,
                                  max_param_divergence, mean_over_ranks)
from training.interrupts import StopRequest, TrainingInterrupted, ignore_interrupts_in_worker
from training.logs import RunLogger
from training.optim import build_optimizer, build_scheduler
from training.registry import build_episodes, build_model
from training.seeding import rank_seed, rng_state, seed_everything, set_rng_state
from training.warm_start import warm_start

SUMMARY_FILE = "summary.json"
# Why a run stops early, as a number every rank can reduce with MAX: 1 = train.max_minutes is up, 2-3 = a signal.
_HALT_CODES = {"SIGINT": 2, "SIGTERM": 3}
_HALT_NAMES = {code: name for name, code in _HALT_CODES.items()}
# fp16: the GradScaler skips a step whose scaled gradients overflow and halves its scale (counted as scaler_skipped,
# a normal part of fp16 training). Below a scale of 1 the loss is scaled down, so an overflow there means the
# gradient is non-finite at its true size and no further back-off can help: such a step is a non-finite gradient
# for train.nan_policy, as in fp32. From the initial scale 2**16, 17 overflowing steps in a row are skipped (scales
# 2**16 .. 1) before the next one counts.
MIN_LOSS_SCALE = 1.0


class NonFiniteLossError(RuntimeError):
    """Training met a NaN/inf loss or gradient and the config says to stop (train.nan_policy=stop)."""


class LossModule(nn.Module):
    """Wraps a learner so that forward(batch) is its loss: DistributedDataParallel syncs on forward/backward."""

    def __init__(self, model: nn.Module) -> None:
        """Hold the learner as submodule `model`."""
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """The learner's (loss, metrics) of a meta-batch."""
        return self.model.loss(batch)


@dataclass
class TrainResult:
    """What a finished (or time-capped) run reports."""

    run_dir: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    episodes_per_s: float = 0.0
    checkpoint: Optional[Path] = None
    ddp_max_param_divergence: float = 0.0
    skipped_steps: int = 0
    scaler_skipped_steps: int = 0  # fp16: optimizer steps the GradScaler skipped because the gradients overflowed
    rank: int = 0
    interrupted: Optional[str] = None  # "SIGINT" / "SIGTERM" when a signal stopped the run before train.steps


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """auto -> CUDA when available (this rank's local GPU under torchrun), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name!r} but CUDA is not available; use train.device=cpu")
        if name == "cuda":
            name = f"cuda:{info.local_rank}"
        torch.cuda.set_device(torch.device(name))
    elif name != "cpu":
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device(name)


BF16_SLOW_CPU_WARNING = (
    "train.precision=bf16 on a CPU without native bf16 support (oneDNN reports none: no AVX-512 BF16 or AMX): "
    "bf16 convolutions fall back to ATen's slow reference kernel. Measured on a 2-core AVX2 EPYC: a Conv-4 "
    "second-order MAML step 7-8x slower than fp32, one 64-channel 3x3 convolution 17x slower. Use "
    "train.precision=fp32 on this machine")


FROZEN_RANDOM_BACKBONE_WARNING = (
    "model.options.freeze_backbone is true but train.init_from is not set: the {backbone} backbone stays at its "
    "random initialisation for the whole run. Set train.init_from to a trained run folder (e.g. a ProtoNet run, "
    "the recipe in docs/omniglot_runs.md), or drop freeze_backbone to train the backbone too"
)


def frozen_at_random_init(cfg: Config) -> bool:
    """Whether the config freezes a backbone that only a warm start could give trained weights (conv4, resnet12, mlp)."""
    from metaformer.models.backbones import registered_backbone_key

    return cfg.model.options.get("freeze_backbone") is True and registered_backbone_key(cfg.model.backbone) is not None


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions and matmuls natively on this CPU (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast path either
        return False


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 or fp16 autocast on CPU or GPU (fp16 goes with a GradScaler), nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _grad_norm(params: list[nn.Parameter]) -> float:
    """Global L2 norm of the gradients (inf/NaN propagate)."""
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def check_resume_config(saved: Config, cfg: Config, path: Path) -> None:
    """Refuse to resume when keys that change the computation differ between checkpoint and config."""
    diffs = config_differences(saved, cfg)
    if diffs:
        lines = "; ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, a, b in ((k, *v) for k, v in diffs.items()))
        raise ckpt_io.CheckpointError(
            f"cannot resume from {path}: the config does not match the one it was trained with ({lines}); "
            "resume with the same config (only run-control keys such as train.steps may change) or start a new run "
            "in another out_dir"
        )


# How `metaformer train` continues a run that train.max_minutes stopped; callers without --resume pass their own.
RESUME_HINT = "the same command plus --resume continues"


class Trainer:
    """Meta-trains the configured learner; `run()` trains to cfg.train.steps (or the time cap)."""

    def __init__(self, cfg: Config, resume: bool = False, data_root: Optional[str] = None,
                 time_cap_hint: Optional[str] = RESUME_HINT) -> None:
        """Set up the process group, device, model, optimiser, schedule, scaler and (on resume) their state.

        `time_cap_hint` ends the message of a run stopped by train.max_minutes (how to continue; None: no hint)."""
        self.cfg, self.resume, self.data_root = cfg, resume, data_root
        self.time_cap_hint = time_cap_hint
        t = cfg.train
        device_type = "cuda" if (t.device.startswith("cuda") or (t.device == "auto" and torch.cuda.is_available())) else "cpu"
        self.info = init_from_env(device_type)
        self.device = resolve_device(t.device, info=self.info)
        if t.num_threads is not None:
            torch.set_num_threads(t.num_threads)
        if t.meta_batch % self.info.world_size:
            raise ConfigError(
                f"train.meta_batch={t.meta_batch} (the global meta-batch) must be divisible by the number of "
                f"processes ({self.info.world_size}); each rank draws meta_batch / world_size tasks"
            )
        if t.precision == "fp16" and self.device.type == "cpu" and self.info.rank == 0:
            # allowed (the GradScaler runs on CPU too, which is how its logic is tested), but rarely useful
            warnings.warn("train.precision=fp16 on CPU: fp16 kernels are slow on most CPUs; bf16 is the CPU choice "
                          "where the CPU has native bf16 (AVX-512 BF16 or AMX)", stacklevel=2)
        if t.precision == "bf16" and self.device.type == "cpu" and self.info.rank == 0 and not cpu_has_fast_bf16():
            warnings.warn(BF16_SLOW_CPU_WARNING, stacklevel=2)
        self.tasks_per_rank = t.meta_batch // self.info.world_size
        self.run_dir = cfg.run_dir()
        if (self.run_dir / ckpt_io.META_FILE).is_file():
            # an exported checkpoint or one step folder of a run: training there would overwrite its config.yaml
            # and leave weights that no longer match their manifest
            raise ConfigError(
                f"{self.run_dir} is a checkpoint (it holds {ckpt_io.META_FILE}), not a run folder; train into another "
                f"out_dir/name, and to start from its weights set train.init_from={self.run_dir}"
            )
        # before the run folder's checkpoints are read (and reported on): a folder another trainer holds is refused
        # first; run() takes the lock for the whole training
        self._take_lock(keep=False)
        seed_everything(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        if self.info.rank:
            # Every rank builds the same initial weights (above), but the model's own randomness (dropout, ProbMAML's
            # weight samples) must differ between ranks: with one seed, ranks would draw the same masks and samples
            # for their different tasks. Rank 0 keeps the seed's stream, that of a single-process run.
            seed_everything(rank_seed(cfg.seed, self.info.rank))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.step = 0
        self.skipped = 0  # steps train.nan_policy=skip skipped (non-finite loss, buffers or gradient)
        self.consecutive_skips = 0  # in the checkpoint: train.max_skips counts across a resume
        self.scaler_skipped = 0  # fp16: steps the GradScaler skipped for overflow (see MIN_LOSS_SCALE); checkpointed
        self.best_value: Optional[float] = None
        # The logging window: this rank's per-key values of the non-skipped steps since the last log_every
        # boundary, and how many steps that is. Checkpointed (every rank's) so that the first row after a resume
        # averages the same steps as an uninterrupted run's.
        self.log_window: dict[str, list[float]] = {}
        self.log_window_steps = 0
        restored = False
        if resume:
            restored = self._load_latest()
        elif ckpt_io.list_checkpoints(self.run_dir):
            raise ConfigError(
                f"{self.run_dir} already holds checkpoints; pass --resume to continue that run, or set out_dir/name "
                "to start a new one"
            )
        if t.init_from and not restored:
            # a resumed run already holds the warm-started (and since trained) weights in its checkpoint
            report = warm_start(self.model, t.init_from, t.init_rename)
            if self.info.is_main:
                print(report.summary(), flush=True)
        elif not restored and self.info.is_main and frozen_at_random_init(cfg):
            warnings.warn(FROZEN_RANDOM_BACKBONE_WARNING.format(backbone=cfg.model.backbone), stacklevel=2)
        if self.info.enabled:
            self.wrapped: nn.Module = torch.nn.parallel.DistributedDataParallel(
                LossModule(self.model), device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        else:
            self.wrapped = LossModule(self.model)
        self.train_episodes = build_episodes(cfg, cfg.data.train_split, data_root)
        self._val_episodes = None
        # the module whose loss a training step differentiates: the model, or its view on cached features
        self.step_model: nn.Module = self.model
        self._setup_feature_cache()

    def _setup_feature_cache(self) -> None:
        """With a frozen backbone, embed the training split once and train on its features (train.feature_cache)."""
        from training.feature_cache import cache_blocker, cached_episodes

        wanted, views = self.cfg.train.feature_cache, self.cfg.train.feature_cache_views
        if wanted is False:
            if views:
                raise ConfigError(f"train.feature_cache=false contradicts train.feature_cache_views={views}; "
                                  "set one of them to its default (null / 0)")
            return
        blocker = cache_blocker(self.model, self.train_episodes, self.info.world_size, views=views)
        if blocker is not None:
            if wanted:
                raise ConfigError(f"train.feature_cache=true, but the training split cannot be cached: {blocker}; "
                                  "set train.feature_cache=null (cache when possible) or false")
            if views:  # asked for warped copies: not silently ignored
                raise ConfigError(f"train.feature_cache_views={views}, but the training split cannot be cached: "
                                  f"{blocker}")
            return
        self.train_episodes = cached_episodes(self.model, self.train_episodes, progress=self.info.is_main, views=views,
                                              bar=self.info.is_main and self.cfg.train.progress)
        self.step_model = self.model.feature_view()
        self.wrapped = LossModule(self.step_model)

    def _take_lock(self, keep: bool) -> Optional[ckpt_io.RunLock]:
        """Rank 0 takes the run folder's lock (held and returned when `keep`, else only checked); CheckpointError on
        every rank when another process holds it."""
        lock: Optional[ckpt_io.RunLock] = None
        refused: Optional[ckpt_io.CheckpointError] = None
        if self.info.is_main:
            lock = ckpt_io.RunLock(self.run_dir)
            try:
                lock.acquire() if keep else lock.check()
            except ckpt_io.CheckpointError as exc:
                refused, lock = exc, None
        # every rank stops when rank 0 found the folder taken (the others would wait in a collective)
        if any_rank(refused is not None, self.info, self.device):
            raise refused or ckpt_io.CheckpointError(f"{self.run_dir} is being trained by another process")
        return lock if keep else None

    # ------------------------------------------------------------------ checkpoints
    def _load_latest(self) -> bool:
        """Restore weights, optimiser, schedule, scaler, RNG states and position from the newest checkpoint.

        False when the run folder has no checkpoint yet (the run starts from step 0)."""
        if not ckpt_io.list_checkpoints(self.run_dir):
            if self.info.is_main:
                print(f"--resume: no checkpoint in {self.run_dir}; starting from step 0", flush=True)
            return False
        try:
            ckpt = ckpt_io.read_checkpoint(self.run_dir)
        except ckpt_io.CheckpointError as exc:
            ckpts = ckpt_io.list_checkpoints(self.run_dir)
            earlier = (f"move {ckpts[-1]} out of the run folder and --resume continues from {ckpts[-2].name}"
                       if len(ckpts) > 1 else "no earlier checkpoint is left: start a new run (another out_dir)")
            raise ckpt_io.CheckpointError(f"{exc}; --resume takes the newest step folder: {earlier}") from None
        check_resume_config(ckpt.config, self.cfg, ckpt.path)
        ckpt_io.load_weights_into(self.model, ckpt, self.cfg.model.name)
        state = ckpt.trainer_state or {}
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError) as exc:
            raise ckpt_io.CheckpointError(f"trainer state in {ckpt.path} does not fit this run: {exc}") from None
        rngs = state.get("rng_per_rank", [])
        if len(rngs) == self.info.world_size:
            set_rng_state(rngs[self.info.rank])
        elif rngs:
            # Another world size: episodes stay exact (they depend on the step only); model randomness reseeds.
            seed_everything(self.cfg.seed + 1000003 * (ckpt.step + 1) + self.info.rank)
        self.step = int(state.get("step", ckpt.step))
        self.skipped = int(state.get("skipped", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.scaler_skipped = int(state.get("scaler_skipped", 0))
        self.best_value = state.get("best_value")
        windows = state.get("log_window_per_rank")  # absent in older checkpoints: the window starts empty
        if windows:
            if len(windows) == self.info.world_size:
                own = windows[self.info.rank]
                self.log_window = {k: list(v) for k, v in own["values"].items()}
            elif self.info.is_main:
                # mean_over_ranks weights every rank's values alike (equal tasks per rank), so the logged mean of
                # the saved ranks' windows is the plain mean of all their values: rank 0 carries them all
                for w in windows:
                    for k, v in w["values"].items():
                        self.log_window.setdefault(k, []).extend(v)
            self.log_window_steps = int(windows[0]["steps"])  # every rank runs the same steps
        return True

    def save(self, metrics: dict[str, float]) -> Optional[Path]:
        """Write a checkpoint of the current step (main rank; every rank contributes its RNG state and logging
        window)."""
        per_rank = all_gather_objects((rng_state(), {"steps": self.log_window_steps, "values": self.log_window}),
                                      self.info)
        if not self.info.is_main:
            return None
        rngs = [rng for rng, _ in per_rank]
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_per_rank": rngs,
            "log_window_per_rank": [window for _, window in per_rank],
            "step": self.step,
            "episodes_seen": self.step * self.cfg.train.meta_batch,
            "skipped": self.skipped,
            "consecutive_skips": self.consecutive_skips,
            "scaler_skipped": self.scaler_skipped,
            "best_value": self.best_value,
            "world_size": self.info.world_size,
        }
        return ckpt_io.save_checkpoint(
            self.run_dir, step=self.step, model_state=self.model.state_dict(), trainer_state=state, config=self.cfg,
            model_name=self.cfg.model.name, model_class=type(self.model).__name__,
            metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
            keep_last=self.cfg.train.keep_last,
        )

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        """Mean accuracy (or MSE) on the fixed validation episodes, without touching any RNG state."""
        from training.evaluation import evaluate

        if self._val_episodes is None:
            self._val_episodes = build_episodes(self.cfg, self.cfg.data.val_split, self.data_root)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            res = evaluate(self.model, self._val_episodes, self.cfg.train.val_episodes, self.cfg.eval.batch_tasks,
                           self.device, name="val")
        self.model.train()
        self.step_model.train()
        return {f"val_{res.metric}": res.mean}

    # ------------------------------------------------------------------ loop
    def run(self) -> TrainResult:
        """Train from the current step to cfg.train.steps; returns the final step, metrics and timings.

        On SIGINT / SIGTERM it finishes the step, writes a checkpoint and raises TrainingInterrupted.
        """
        finished = False
        lock: Optional[ckpt_io.RunLock] = None
        try:
            lock = self._take_lock(keep=True)
            if self.resume and self.info.is_main:
                ckpt_io.reconcile_best(self.run_dir)  # a kill between a checkpoint and its best.json update
            result = self._run()
            finished = True
            if result.interrupted:
                raise TrainingInterrupted(result.interrupted, result)
            return result
        finally:
            if self.info.enabled:
                # Drop DDP (its reducer holds the process group and Gloo work objects that hold tensors) so that
                # cleanup's collection frees it while the interpreter is fully alive: freed during finalization
                # instead, a Gloo thread that needs the GIL aborts the rank ("terminate called without an active
                # exception", pytorch/pytorch#179291).
                self.wrapped = LossModule(self.step_model)
            if lock is not None:
                lock.release()
            cleanup(self.info, synchronize=finished)

    def _run(self) -> TrainResult:
        from metaformer.data import EpisodeStream

        cfg, t = self.cfg, self.cfg.train
        main = self.info.is_main
        if self.step >= t.steps and self.step > 0:
            return self._already_done()
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", dump_config(cfg))
        logger = (RunLogger(self.run_dir, t.tensorboard, self.step if self.resume else None,
                            partial_at_resume=self.log_window_steps > 0) if main else None)
        stream = EpisodeStream(self.train_episodes, self.tasks_per_rank, num_batches=max(0, t.steps - self.step),
                               start_batch=self.step, rank=self.info.rank, world_size=self.info.world_size)
        # A private generator: DataLoader otherwise draws its base seed from the global RNG when iteration
        # starts, which would shift the model's random stream between a fresh and a resumed run.
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.data.num_workers,
                                             generator=torch.Generator().manual_seed(cfg.seed),
                                             worker_init_fn=ignore_interrupts_in_worker if cfg.data.num_workers else None)
        bar = None
        if main and t.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.step, desc=cfg.name, unit="step", dynamic_ncols=True)
        self.model.train()
        self.step_model.train()
        t_start = time.perf_counter()
        t_window, steps_window = t_start, 0
        steps_done, last_ckpt, time_capped = 0, None, False
        metrics: dict[str, float] = {}
        interrupted: Optional[str] = None
        stop = StopRequest(announce=main).install()
        try:
            for batch in loader:
                batch = batch.to(self.device, non_blocking=True)
                metrics, skipped = self._train_step(batch)
                self.step += 1
                steps_done += 1
                steps_window += 1
                self.log_window_steps += 1
                if skipped:
                    self.skipped += 1
                    self.consecutive_skips += 1
                    if self.consecutive_skips > t.max_skips:
                        raise NonFiniteLossError(
                            f"{self.consecutive_skips} consecutive non-finite steps (last: step {self.step}); more than "
                            f"train.max_skips={t.max_skips}: lower optim.lr, enable optim.grad_clip or check the data"
                        )
                else:
                    self.consecutive_skips = 0
                    for k, v in metrics.items():
                        self.log_window.setdefault(k, []).append(v)
                if bar is not None:
                    bar.update(1)
                last = self.step >= t.steps
                # Every rank stops at the same step: the largest reason over the ranks (a signal may reach one rank).
                reason = max_over_ranks(_HALT_CODES[stop.signal_name] if stop.requested else
                                        int(t.max_minutes is not None and time.perf_counter() - t_start > 60.0 * t.max_minutes),
                                        self.info, self.device)
                halt = reason > 0
                if reason > 1 and not last:
                    interrupted = _HALT_NAMES[reason]
                time_capped = reason == 1 and not last
                boundary = self.step % t.log_every == 0
                if boundary or last or halt:
                    now = time.perf_counter()
                    # timing covers this process's steps only (a restored window's steps ran in another process)
                    eps = steps_window * t.meta_batch / max(now - t_window, 1e-9)
                    # the window's metrics over every rank's tasks, not rank 0's share alone
                    row = mean_over_ranks(self.log_window, self.tasks_per_rank, self.info)
                    row.update(episodes=self.step * t.meta_batch, lr=self.scheduler.get_last_lr()[0], episodes_per_s=eps,
                               skipped=self.skipped, scaler_skipped=self.scaler_skipped, wall_s=now - t_start,
                               grad_norm=metrics.get("grad_norm", float("nan")))
                    if self.scaler.is_enabled():
                        row["loss_scale"] = self.scaler.get_scale()
                    if logger is not None:
                        logger.log(self.step, row)
                    if bar is not None:
                        bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "accuracy", "mse") if k in row}
                                        | {"ep/s": f"{eps:.1f}"}
                                        | ({"amp_skipped": self.scaler_skipped} if self.scaler_skipped else {}))
                    metrics = row
                    # A halt (or the last step) off a log_every boundary still logs its partial window, so a run that
                    # stays stopped has its final metrics in log.csv, summary.json and the checkpoint; but the window
                    # stays open and is checkpointed as is: a resume drops that row (RunLogger's partial_at_resume)
                    # and logs the whole window at its boundary, as a run that was never stopped does.
                    if boundary:
                        self.log_window, self.log_window_steps = {}, 0
                    t_window, steps_window = now, 0
                do_val = t.val_every > 0 and (self.step % t.val_every == 0 or last)
                val: dict[str, float] = {}
                if do_val and main:
                    val = self.validate()
                    if logger is not None:
                        logger.log(self.step, val | {"episodes": self.step * t.meta_batch})
                if (t.ckpt_every and self.step % t.ckpt_every == 0) or last or halt or do_val:
                    last_ckpt = self.save({**metrics, **val}) or last_ckpt
                    if main and val:
                        key = next(iter(val))
                        higher = key.endswith("accuracy")
                        if ckpt_io.update_best(self.run_dir, self.step, key, val[key], higher):
                            self.best_value = val[key]
                if last or halt:
                    break
        finally:
            stop.uninstall()
            if bar is not None:
                bar.close()
            if logger is not None:
                logger.close()
        seconds = time.perf_counter() - t_start
        if main and time_capped:
            hint = f"; {self.time_cap_hint}" if self.time_cap_hint else ""
            print(f"train.max_minutes={t.max_minutes} reached at step {self.step} of train.steps={t.steps} (checkpoint "
                  f"{last_ckpt}){hint}", flush=True)
        result = TrainResult(
            run_dir=self.run_dir, step=self.step, metrics=metrics, seconds=seconds,
            episodes_per_s=steps_done * t.meta_batch / max(seconds, 1e-9), checkpoint=last_ckpt,
            ddp_max_param_divergence=max_param_divergence(self.model, self.info), skipped_steps=self.skipped,
            scaler_skipped_steps=self.scaler_skipped, rank=self.info.rank, interrupted=interrupted,
        )
        if main:
            self._write_summary(result)
        return result

    def _write_summary(self, result: TrainResult, timed: bool = True) -> None:
        """summary.json from a run's result; ``timed`` False (nothing trained in this process): timings null."""
        summary = {
            "step": result.step, "seconds": result.seconds if timed else None,
            "episodes_per_s": result.episodes_per_s if timed else None, "world_size": self.info.world_size,
            "ddp_max_param_divergence": result.ddp_max_param_divergence if timed else None,
            "skipped_steps": self.skipped, "scaler_skipped_steps": self.scaler_skipped,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "interrupted": result.interrupted,
            "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
        }
        atomic_write_text(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))

    def _already_done(self) -> TrainResult:
        """A resumed run already at (or past) train.steps: say so and leave its files (summary included) alone."""
        t = self.cfg.train
        if self.info.is_main:
            print(f"{self.run_dir} is already at step {self.step} (train.steps={t.steps}): nothing to train; raise "
                  "train.steps to continue it", flush=True)
        metrics: dict[str, float] = {}
        summary = self.run_dir / SUMMARY_FILE
        if summary.is_file():
            try:
                metrics = dict(json.loads(summary.read_text()).get("metrics") or {})
            except (ValueError, AttributeError, TypeError):
                metrics = {}  # an unreadable summary only loses the echo of the last metrics; the run is intact
        ckpts = ckpt_io.list_checkpoints(self.run_dir)
        result = TrainResult(run_dir=self.run_dir, step=self.step, metrics=metrics,
                             checkpoint=ckpts[-1] if ckpts else None, skipped_steps=self.skipped,
                             scaler_skipped_steps=self.scaler_skipped, rank=self.info.rank)
        if self.info.is_main and not summary.is_file():
            # killed after its last checkpoint, before the summary: write it now from that checkpoint's metrics
            meta = json.loads((ckpts[-1] / ckpt_io.META_FILE).read_text()) if ckpts else {}
            result.metrics = dict(meta.get("metrics") or {})
            self._write_summary(result, timed=False)
        return result

    def _uses_pseudo_gradient(self) -> bool:
        """True for heads whose meta_backward writes .grad directly (Reptile) instead of differentiating a loss."""
        try:
            from metaformer.heads.base import FewShotHead
        except ImportError:
            return False
        mb = getattr(type(self.model), "meta_backward", None)
        return isinstance(self.model, FewShotHead) and mb is not FewShotHead.meta_backward

    def _backward(self, batch: Any, scale: float) -> tuple[Tensor, dict[str, float]]:
        """Forward + backward of one meta-batch with the loss scaled by `scale`; returns (detached loss, metrics)."""
        model = self.step_model
        if self._uses_pseudo_gradient():
            loss, metrics = model.meta_backward(batch, scale=scale)
            if self.info.enabled:
                # DDP's hooks only see autograd-accumulated gradients; a pseudo-gradient is averaged by hand.
                import torch.distributed as dist

                for p in self.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.info.world_size)
            return loss.detach().float(), metrics
        if not self.info.enabled and hasattr(model, "meta_backward"):
            # Heads backpropagate in chunks of tasks (peak memory of one chunk); same gradient as one backward.
            loss, metrics = model.meta_backward(batch, scale=scale)
            return loss.detach().float(), metrics
        loss, metrics = self.wrapped(batch)
        # A non-finite loss is still backpropagated so every DDP rank finishes the reduction it started.
        (loss.float() * scale).backward()
        return loss.detach().float(), metrics

    def _train_step(self, batch: Any) -> tuple[dict[str, float], bool]:
        """One outer step; returns (metrics, skipped). Raises NonFiniteLossError under nan_policy=stop."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        # The heads run their own (chunked) backward with the loss multiplied by `scale`; scaling a unit tensor
        # through the scaler gives that factor and initialises the scaler's state as unscale_/step expect.
        one = torch.ones((), device=self.device)
        scale = float(self.scaler.scale(one)) if self.scaler.is_enabled() else 1.0
        # Forward passes update buffers (BatchNorm statistics); a skipped step must not keep those updates.
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        saved = [b.detach().clone() for b in buffers] if cfg.train.nan_policy == "skip" else None
        with autocast_context(cfg.train.precision, self.device):
            loss, metrics = self._backward(batch, scale)
        loss_value = float(loss)
        grad_norm = float("nan")
        if math.isfinite(loss_value):
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)
            if cfg.optim.grad_clip is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip))
            else:
                grad_norm = _grad_norm(self.params)
        bad_buffers = [n for n, b in self.model.named_buffers() if b.is_floating_point() and not bool(torch.isfinite(b).all())]
        bad_loss = any_rank(not math.isfinite(loss_value) or bool(bad_buffers), self.info, self.device)
        # With fp16 the GradScaler skips overflowing steps itself and lowers the scale; that is not a failure.
        bad_grad = not bad_loss and not self.scaler.is_enabled() and any_rank(not math.isfinite(grad_norm), self.info, self.device)
        if bad_loss or bad_grad:
            what = f"gradient norm {grad_norm}"
            if bad_loss:
                what = f"loss {loss_value}" if not bad_buffers else f"buffers {', '.join(bad_buffers[:3])} (loss {loss_value})"
            return self._skip_or_stop(what, buffers, saved, step_schedule=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with warnings.catch_warnings():
            # a step the GradScaler skipped for overflow still advances the schedule, by design
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        # The scaler lowers its scale exactly when it found inf/NaN in the gradients and so skipped the update; its
        # gradients are DDP-averaged, so every rank sees the same overflow and takes the same branch.
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale:
            self.scaler_skipped += 1
            if scale < MIN_LOSS_SCALE:
                return self._skip_or_stop(
                    f"gradient (the fp16 GradScaler overflowed at loss scale {scale:g}, below {MIN_LOSS_SCALE:g}: the "
                    f"gradient is not finite even unscaled; {self.scaler_skipped} steps skipped by the scaler so far)",
                    buffers, saved, step_schedule=False)  # stepped above
        return {**{k: float(v) for k, v in metrics.items()}, "grad_norm": grad_norm}, False

    def _skip_or_stop(self, what: str, buffers: list[Tensor], saved: Optional[list[Tensor]],
                      step_schedule: bool) -> tuple[dict[str, float], bool]:
        """A step with a non-finite `what` under train.nan_policy: raise (stop), or undo its buffer updates (skip)."""
        cfg = self.cfg
        if cfg.train.nan_policy == "stop":
            raise NonFiniteLossError(
                f"non-finite {what} at step {self.step + 1} (episodes {self.step * cfg.train.meta_batch}.."
                f"{(self.step + 1) * cfg.train.meta_batch - 1}); the weights were not updated and no checkpoint "
                "was written for it. Lower optim.lr, enable optim.grad_clip, use precision fp32, or set "
                "train.nan_policy=skip to skip such steps"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if saved is not None:
            with torch.no_grad():
                for b, old in zip(buffers, saved):
                    b.copy_(old)
        if step_schedule:
            self.scheduler.step()  # a skipped step still counts in the schedule, which follows the step number
        return {"loss": float("nan")}, True


def train(cfg: Config, resume: bool = False, data_root: Optional[str] = None,
          time_cap_hint: Optional[str] = RESUME_HINT) -> TrainResult:
    """Build a Trainer for cfg and run it (`time_cap_hint`: see Trainer)."""
    return Trainer(cfg, resume=resume, data_root=data_root, time_cap_hint=time_cap_hint).run()
