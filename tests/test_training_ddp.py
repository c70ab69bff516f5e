"""Data-parallel meta-training with torchrun (2 processes, gloo, CPU): replicas stay identical and equal a
single-process run with the same global meta-batch (weights and logged metrics); every rank has its own random
stream; the MAML inner loop (fused inner_update) runs under DDP."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.checkpoint import read_checkpoint
from training.config import load_config
from training.trainer import train
from training_processes import wait_for_log_rows

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"
STEPS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(out: Path, model: str) -> list[str]:
    # SGD, not Adam: the conv biases before BatchNorm get a gradient that is rounding noise (~1e-9) whose
    # sign depends on the summation order, and Adam would scale that noise up to +-lr.
    return ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", f"out_dir={out}", f"model.name={model}", "model.options={inner_steps: 2, inner_lr: 0.3}", f"train.steps={STEPS}",
            "train.meta_batch=4", "train.ckpt_every=0", "optim.warmup_steps=1"]


def test_ddp_two_ranks_equal_single_process(tmp_path: Path) -> None:
    # Second-order MAML: every inner step goes through metaformer.ops.inner_update (the fused op when
    # metaformer.ops.backend() == "extension") inside DDP's forward, and the outer backward through it.
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "metaformer.cli", "train", "--config", str(TINY),
           "--set", *_overrides(ddp_dir, "maml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((ddp_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == STEPS
    # Measured across ranks inside the job (broadcast from rank 0, max |difference| all-reduced).
    assert summary["ddp_max_param_divergence"] == 0.0

    torch.set_num_threads(1)
    train(load_config(TINY, _overrides(single_dir, "maml")))
    a = load_file(str(ddp_dir / f"step-{STEPS:08d}" / "model.safetensors"))
    b = load_file(str(single_dir / f"step-{STEPS:08d}" / "model.safetensors"))
    for k in a:
        if not a[k].is_floating_point() or "running" in k:
            continue  # BatchNorm buffers are not parameters (MAML uses per-task batch statistics)
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), f"{k}: max diff {(a[k] - b[k]).abs().max()}"
    # The runs really trained (weights moved from the seed's initialisation).
    from training.registry import build_model

    torch.manual_seed(0)
    init = build_model(load_config(TINY, _overrides(single_dir, "maml"))).state_dict()
    moved = max(float((a[k] - init[k]).abs().max()) for k in a if k in init and a[k].is_floating_point())
    assert moved > 1e-3

    # The logged training metrics are the mean over both ranks' tasks, i.e. the single-process run's (they were
    # rank 0's share alone: the loss of 2 of the 4 tasks).
    def logged(run: Path) -> list[tuple[int, float, float]]:
        with open(run / "log.csv", newline="") as fh:
            return [(int(r["step"]), float(r["loss"]), float(r["accuracy"])) for r in csv.DictReader(fh)]

    ddp_rows, single_rows = logged(ddp_dir), logged(single_dir)
    assert [r[0] for r in ddp_rows] == [r[0] for r in single_rows] == [2, 4, 5]
    assert [r[1:] for r in ddp_rows] == [pytest.approx(r[1:], rel=1e-5) for r in single_rows]
    assert summary["metrics"]["loss"] == pytest.approx(single_rows[-1][1], rel=1e-5)

    # Each rank's own randomness (dropout, ProbMAML samples) has its own stream: with one seed for both, ranks drew
    # identical masks for different tasks. Rank 0 keeps the single-process stream.
    ddp_rngs = read_checkpoint(ddp_dir).trainer_state["rng_per_rank"]
    single_rng = read_checkpoint(single_dir).trainer_state["rng_per_rank"][0]
    assert len(ddp_rngs) == 2 and torch.equal(ddp_rngs[0]["torch"], single_rng["torch"])
    assert not torch.equal(ddp_rngs[0]["torch"], ddp_rngs[1]["torch"])
    assert not torch.equal(ddp_rngs[0]["numpy_keys"], ddp_rngs[1]["numpy_keys"])
    assert not torch.equal(ddp_rngs[0]["python_state"], ddp_rngs[1]["python_state"])


def _rank_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started (read from their environments)."""
    out: dict[int, int] = {}
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = int(child)
    return out


def test_ddp_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """SIGTERM that reaches rank 1 alone: both ranks stop after the same step (otherwise rank 0 would wait in the
    next all-reduce forever), rank 0 writes the checkpoint of that step, and --resume under torchrun finishes."""
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    overrides = [*_overrides(run, "maml"), "train.steps=100000", "train.log_every=1"]

    def cmd(*extra: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "metaformer.cli", "train",
                "--config", str(TINY), *extra, "--set", *overrides]

    proc = subprocess.Popen(cmd(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)  # its own process group: a failure below kills the ranks too
    try:
        wait_for_log_rows(proc, run / "log.csv", rows=3, timeout=120)
        ranks = _rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0  # torchrun reports rank 0's exit status 143 (rank 1 leaves with 0, see cli.main)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] == "SIGTERM" and summary["world_size"] == 2, summary
    assert summary["ddp_max_param_divergence"] == 0.0  # both ranks stopped after the same step
    step = summary["step"]
    assert (run / f"step-{step:08d}").is_dir() and f"stopped by SIGTERM at step {step}" in err, err[-3000:]

    overrides[-2] = f"train.steps={step + 2}"
    resumed = subprocess.run(cmd("--resume"), env=env, capture_output=True, text=True, cwd=REPO, timeout=150)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["step"] == step + 2


def test_ddp_log_window_survives_a_resume(tmp_path: Path) -> None:
    """Each rank's open logging window is checkpointed: a run that ends off a log_every boundary and is resumed
    to more steps logs the rows (and per-rank-averaged metrics) of a single-process run of those steps."""
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # a constant rate: the first run's 3 steps are then those of the 5-step runs
    overrides = [*_overrides(ddp_dir, "maml"), "train.log_every=4", "optim.schedule=constant"]

    def torchrun(steps: int, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "metaformer.cli", "train",
               "--config", str(TINY), *extra, "--set", *overrides, f"train.steps={steps}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=150)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    torchrun(3)
    windows = read_checkpoint(ddp_dir).trainer_state["log_window_per_rank"]
    assert [w["steps"] for w in windows] == [3, 3] and windows[0]["values"]["loss"] != windows[1]["values"]["loss"]
    torchrun(5, "--resume")

    torch.set_num_threads(1)
    train(load_config(TINY, [*_overrides(single_dir, "maml"), "train.log_every=4", "optim.schedule=constant",
                             "train.steps=5"]))

    def logged(run: Path) -> list[tuple[int, float, float]]:
        with open(run / "log.csv", newline="") as fh:
            return [(int(r["step"]), float(r["loss"]), float(r["accuracy"])) for r in csv.DictReader(fh)]

    ddp_rows, single_rows = logged(ddp_dir), logged(single_dir)
    # the first run's row at its last step 3 (steps 1-3) is dropped; the row at 4 averages steps 1-4 of both ranks
    assert [r[0] for r in ddp_rows] == [r[0] for r in single_rows] == [4, 5]
    assert [r[1:] for r in ddp_rows] == [pytest.approx(r[1:], rel=1e-5) for r in single_rows]
