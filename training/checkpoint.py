"""Checkpoints: a folder per step with safetensors weights, trainer state, config and a checksummed manifest.

Layout of a run folder::

    run_dir/step-00000100/model.safetensors   weights (state_dict, buffers included)
                          trainer_state.pt    optimizer, scheduler, scaler, RNG states of every rank, step
                          config.yaml         the run's config
                          meta.json           format, step, model name, metrics, size + sha256 of each file
    run_dir/best.json                         which step folder holds the best validation metric

Each step folder is published by one atomic rename (training.atomic), so after a crash every
`step-*` folder is complete; the newest one is the resume point.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .atomic import atomic_write_dir, atomic_write_text, remove_dir_safely, remove_stale_temporaries
from .config import Config, ConfigError, config_from_dict, dump_config

FORMAT = "metaformer-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
BEST_FILE = "best.json"
STEP_DIR_RE = re.compile(r"^step-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupted, or written for another model."""


class NonFiniteStateError(RuntimeError):
    """Refusal to write a checkpoint whose weights hold NaN or inf."""


def step_dir_name(step: int) -> str:
    """Folder name of the checkpoint written after `step` optimiser steps."""
    return f"step-{step:08d}"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file (the digest meta.json records for each checkpoint file)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def nonfinite_tensors(state: dict[str, Tensor]) -> list[str]:
    """Names of floating-point tensors in a state dict that hold NaN or inf."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def _weights_for_safetensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses tensors that share storage (tied weights); independent CPU copies are exact and
    # load_state_dict writes the value back into every alias.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(
    run_dir: Union[str, Path],
    *,
    step: int,
    model_state: dict[str, Tensor],
    trainer_state: dict[str, Any],
    config: Config,
    model_name: str,
    model_class: str,
    metrics: Optional[dict[str, float]] = None,
    keep_last: int = 3,
) -> Path:
    """Atomically write the checkpoint of `step` into run_dir, then prune to the last `keep_last` (plus best)."""
    from safetensors.torch import save_file

    bad = nonfinite_tensors(model_state)
    if bad:
        raise NonFiniteStateError(
            f"refusing to write checkpoint at step {step}: non-finite values in {', '.join(bad[:5])}"
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            + "; an optimizer step overflowed the weights (lower optim.lr or enable optim.grad_clip); the run's "
            "earlier checkpoints are intact and --resume continues from the last one"
        )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    final = run_dir / step_dir_name(step)
    if final.exists():
        # Only possible when a run is resumed from an older checkpoint than the newest one on disk and
        # re-reaches this step; the new state supersedes the old one.
        remove_dir_safely(final)

    def fill(tmp: Path) -> None:
        """Write every file of the checkpoint into the temporary folder, the manifest last."""
        save_file(_weights_for_safetensors(model_state), str(tmp / WEIGHTS_FILE),
                  metadata={"format": FORMAT, "model_name": model_name, "step": str(step)})
        buf = io.BytesIO()
        torch.save(trainer_state, buf)
        (tmp / STATE_FILE).write_bytes(buf.getvalue())
        (tmp / CONFIG_FILE).write_text(dump_config(config))
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir())}
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "model_name": model_name,
            "model_class": model_class,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "metrics": metrics or {},
            "files": files,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))

    atomic_write_dir(final, fill)
    prune_checkpoints(run_dir, keep_last)
    return final


def export_checkpoint(src: Union[str, Path], dest: Union[str, Path], *, which: str = "latest") -> Path:
    """Write a verified weights-only copy of a checkpoint (weights, config, manifest; no trainer state) to `dest`."""
    dest = Path(dest)
    if dest.is_dir() and any(dest.iterdir()):
        raise CheckpointError(f"{dest} exists and is not empty; pass a new folder (an export never overwrites)")
    problem = folder_problem(dest)
    if problem:
        raise CheckpointError(f"cannot create the export folder {dest}: {problem}; pass --out a new folder in a "
                              "writable place")
    ckpt = read_checkpoint(src, with_trainer_state=False, which=which)
    meta = json.loads((ckpt.path / META_FILE).read_text())

    def fill(tmp: Path) -> None:
        """Copy the verified weights and config, then write the manifest without the trainer state."""
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            (tmp / name).write_bytes((ckpt.path / name).read_bytes())
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir())}
        if files[WEIGHTS_FILE] != meta["files"][WEIGHTS_FILE]:  # the bytes changed between verification and copy
            raise CheckpointError(f"{ckpt.path / WEIGHTS_FILE} changed while it was exported; export it again")
        out = {**meta, "files": files, "weights_only": True, "exported_from": str(ckpt.path.resolve()),
               "exported": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / META_FILE).write_text(json.dumps(out, indent=2))

    if dest.exists():
        dest.rmdir()  # empty: atomic_write_dir renames the finished folder into place
    atomic_write_dir(dest, fill)
    return dest


def folder_problem(folder: Union[str, Path]) -> Optional[str]:
    """Why `folder` cannot be used or created as an output folder (a file in the way, no write access), or None."""
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            return f"{folder} is a file, not a folder"
        return None if os.access(folder, os.W_OK | os.X_OK) else f"{folder} is not writable"
    # the nearest existing ancestor decides whether the missing folders can be created
    parent = next((p for p in folder.parents if p.exists()), None)
    if parent is None:
        return None
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"{parent} is not writable"


def list_checkpoints(run_dir: Union[str, Path]) -> list[Path]:
    """Published step folders of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := STEP_DIR_RE.match(p.name))]
    return [p for _, p in sorted(steps)]


def read_best(run_dir: Union[str, Path]) -> Optional[dict]:
    """The best.json record of a run, or None."""
    path = Path(run_dir) / BEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def best_record(run_dir: Union[str, Path]) -> Optional[dict]:
    """best.json, checked against the validation results the run's step folders record in their meta.json: a
    process killed between publishing a checkpoint and updating best.json must not leave a stale best."""
    record = read_best(run_dir)
    record = record if isinstance(record, dict) and (Path(run_dir) / str(record.get("dir", "")) / META_FILE).is_file() else None
    for path in list_checkpoints(run_dir):
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (OSError, ValueError):
            continue  # an unreadable step folder is reported where it is read, not here
        metrics = meta.get("metrics") if isinstance(meta, dict) else None
        for key, value in (metrics or {}).items():
            if not key.startswith("val_") or (record is not None and record.get("metric") != key):
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            higher = key.endswith("accuracy")
            if record is None or (value > record["value"] if higher else value < record["value"]):
                record = {"step": int(meta.get("step", 0)), "dir": path.name, "metric": key, "value": value,
                          "higher_is_better": higher}
    return record


def reconcile_best(run_dir: Union[str, Path]) -> Optional[dict]:
    """Rewrite best.json where best_record finds it stale (the trainer calls this when it resumes)."""
    record = best_record(run_dir)
    if record is not None and record != read_best(run_dir):
        atomic_write_text(Path(run_dir) / BEST_FILE, json.dumps(record, indent=2))
    return record


class RunLock:
    """An exclusive lock on a run folder (``flock`` on ``run_dir/.lock``): two trainers writing one run would delete
    each other's checkpoints in progress and interleave the log. Held from the start of training to its end."""

    NAME = ".lock"

    def __init__(self, run_dir: Union[str, Path]) -> None:
        """A lock for ``run_dir`` (not yet taken)."""
        self.path = Path(run_dir) / self.NAME
        self._file: Optional[Any] = None

    def acquire(self) -> None:
        """Take the lock, or raise CheckpointError naming the process that holds it."""
        try:
            import fcntl
        except ImportError:  # no flock (Windows): unguarded, as before
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if not isinstance(exc, BlockingIOError):  # a file system without flock (some NFS mounts): unguarded
                f.close()
                warnings.warn(f"cannot lock {self.path} ({exc}); two trainers on this run folder would not be "
                              "stopped", stacklevel=2)
                return
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise CheckpointError(
                f"{self.path.parent} is being trained by {holder}; wait for it or stop it (a second trainer would "
                "delete its checkpoints in progress), or train into another out_dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        self._file = f

    def check(self) -> None:
        """Raise CheckpointError (as acquire) when another process holds the lock; it is not kept.

        A folder that does not exist is free, and is not created."""
        if not self.path.parent.is_dir():
            return
        self.acquire()
        self.release()

    def release(self) -> None:
        """Give the lock back (closing the file releases the flock)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def update_best(run_dir: Union[str, Path], step: int, metric: str, value: float, higher_is_better: bool) -> bool:
    """Record step as best if `value` beats the recorded best; returns whether it did."""
    current = read_best(run_dir)
    if current is not None and current.get("metric") == metric:
        prev = current["value"]
        if not (value > prev if higher_is_better else value < prev):
            return False
    record = {"step": step, "dir": step_dir_name(step), "metric": metric, "value": value,
              "higher_is_better": higher_is_better}
    atomic_write_text(Path(run_dir) / BEST_FILE, json.dumps(record, indent=2))
    return True


def prune_checkpoints(run_dir: Union[str, Path], keep_last: int) -> None:
    """Delete all but the newest `keep_last` step folders, never the best one."""
    ckpts = list_checkpoints(run_dir)
    best = read_best(run_dir)
    protected = {best["dir"]} if best else set()
    for path in ckpts[: max(0, len(ckpts) - keep_last)]:
        if path.name not in protected:
            remove_dir_safely(path)


def is_checkpoint_dir(path: Union[str, Path]) -> bool:
    """Whether `path` is one checkpoint (a step folder or an export), not a run folder that holds several."""
    path = Path(path)
    return (path / META_FILE).is_file() or (path / WEIGHTS_FILE).is_file()


def resolve_checkpoint(path: Union[str, Path], which: str = "latest") -> Path:
    """A step folder from a step folder or a run folder (its latest or best checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if is_checkpoint_dir(path):
        if which == "best":
            # "best" chooses among a run folder's step folders: on one checkpoint it would silently be that one
            run = (f"pass its run folder {path.parent} to choose among the run's checkpoints"
                   if STEP_DIR_RE.match(path.name) else "or pass a run folder")
            raise CheckpointError(f"which='best' (--which best) chooses the best validation checkpoint of a "
                                  f"`metaformer train` run folder, but {path} is one checkpoint (a step or export "
                                  f"folder): drop --which, {run}")
        return path
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise CheckpointError(
            f"{path} holds no checkpoint (no step-XXXXXXXX folder with {META_FILE}); "
            "pass a run folder written by `metaformer train` or one of its step folders"
        )
    if which == "best":
        # Refused rather than falling back to the latest: a report labelled "best" must not hold another step.
        best = best_record(path)
        if best is None:
            recorded = read_best(path)
            if isinstance(recorded, dict):
                raise CheckpointError(
                    f"--which best: {path / BEST_FILE} names {recorded.get('dir')!r}, which is not a checkpoint folder "
                    f"of the run, and no step folder records a validation result; pass --which latest, or a step "
                    f"folder such as {ckpts[-1]}")
            raise CheckpointError(
                f"--which best: {path} has no readable {BEST_FILE} (the run recorded no validation result: "
                f"train.val_every=0, or it stopped before its first validation); pass --which latest, or a step "
                f"folder such as {ckpts[-1]}")
        best_dir = path / best["dir"]  # best_record keeps only records whose folder holds a checkpoint
        return best_dir
    if which != "latest":
        raise CheckpointError(f"which must be 'latest' or 'best', got {which!r}")
    return ckpts[-1]


@dataclass
class Checkpoint:
    """A checkpoint read from disk and verified against its manifest."""

    path: Path
    step: int
    model_name: str
    model_class: str
    config: Config
    model_state: dict[str, Tensor]
    trainer_state: Optional[dict[str, Any]] = None
    metrics: dict[str, float] = field(default_factory=dict)


def _verify_files(path: Path, meta: dict) -> None:
    for name, info in meta.get("files", {}).items():
        fpath = path / name
        if not fpath.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        size = fpath.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint file {fpath} is truncated or altered: {size} bytes, the manifest says {info['bytes']}; "
                "use an earlier checkpoint of the run"
            )
        if file_sha256(fpath) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {fpath} is corrupted (sha256 differs from {META_FILE}); use an earlier checkpoint")


def read_checkpoint(path: Union[str, Path], *, with_trainer_state: bool = True, which: str = "latest") -> Checkpoint:
    """Read and verify a checkpoint (a step folder, or a run folder's latest/best); raises CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve_checkpoint(path, which)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path} has no {META_FILE}; it was not written by `metaformer train` (or the write did not finish)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON ({exc}); the checkpoint is damaged") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a metaformer training checkpoint (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses checkpoint format {meta['format_version']}; this metaformer reads up to {FORMAT_VERSION}")
    _verify_files(path, meta)
    try:
        weights = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read weights {path / WEIGHTS_FILE}: {exc}") from None
    import yaml

    try:
        # check_unread=False: a checkpoint written before unread settings were refused must stay readable
        config = config_from_dict(yaml.safe_load((path / CONFIG_FILE).read_text()) or {}, check_unread=False)
    except (ConfigError, yaml.YAMLError) as exc:
        raise CheckpointError(f"the config stored in {path / CONFIG_FILE} is not usable: {exc}") from None
    trainer_state = None
    if with_trainer_state:
        if meta.get("weights_only"):
            raise CheckpointError(f"{path} is a weights-only export (`metaformer export`, no optimizer or sampler "
                                  "state): evaluate it, or warm-start a new run from it with train.init_from; only a "
                                  "run's own checkpoints resume")
        try:
            trainer_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises several types for damaged files
            raise CheckpointError(f"cannot read trainer state {path / STATE_FILE}: {exc}") from None
    return Checkpoint(path=path, step=int(meta["step"]), model_name=meta["model_name"], model_class=meta.get("model_class", ""),
                      config=config, model_state=weights, trainer_state=trainer_state, metrics=meta.get("metrics", {}))


def load_weights_into(model: torch.nn.Module, ckpt: Checkpoint, model_name: str) -> None:
    """Copy checkpoint weights into `model`, with a clear error when they belong to another model."""
    if ckpt.model_name != model_name:
        raise CheckpointError(
            f"checkpoint {ckpt.path} holds a '{ckpt.model_name}' model but the config builds '{model_name}'; "
            f"use the checkpoint's own config (omit --config) or a checkpoint of '{model_name}'"
        )
    expected = model.state_dict()
    from metaformer.heads.batchnorm import trim_per_step_tables

    ckpt.model_state = trim_per_step_tables(ckpt.model_state, expected)  # tables of older versions had extra rows
    missing = sorted(set(expected) - set(ckpt.model_state))
    unexpected = sorted(set(ckpt.model_state) - set(expected))
    shape_bad = [
        f"{k}: checkpoint {tuple(ckpt.model_state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in ckpt.model_state and tuple(ckpt.model_state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {', '.join(unexpected[:3])})")
        if shape_bad:
            parts.append(f"{len(shape_bad)} shape mismatch(es) (e.g. {'; '.join(shape_bad[:3])})")
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not fit the model built from the config ({'; '.join(parts)}); "
            "the architecture settings (model.*, data.n_way, data.image_size) must match the ones it was trained with"
        )
    model.load_state_dict(ckpt.model_state, strict=True)


def metric_is_finite(value: Optional[float]) -> bool:
    """True for a finite float."""
    return value is not None and math.isfinite(value)
