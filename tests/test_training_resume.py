"""--resume after SIGKILL: the resumed run ends with exactly the weights of an uninterrupted run (CPU),
and every checkpoint published before the kill is complete (atomic writes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.checkpoint import list_checkpoints, read_checkpoint
from training.config import load_config
from training.trainer import train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"
STEPS = 160
# Dropout on (tiny.yaml) so the model's RNG stream matters; a checkpoint every 2 steps so the kill often
# lands in the middle of a checkpoint write.
OVERRIDES = [f"train.steps={STEPS}", "train.ckpt_every=2", "train.keep_last=3", "train.log_every=5"]


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "metaformer.cli", "train", "--config", str(TINY), "--set", f"out_dir={out}",
            *OVERRIDES, *extra]


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    killed_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_cli(killed_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            ckpts = list_checkpoints(killed_dir)
            if ckpts and int(ckpts[-1].name.split("-")[1]) >= 30:
                break
            assert proc.poll() is None, f"training exited early: {proc.stderr.read().decode()}"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    published = list_checkpoints(killed_dir)
    last_step = int(published[-1].name.split("-")[1])
    assert 30 <= last_step < STEPS, "the kill must land mid-run"
    for path in published:  # complete and verified (sizes + sha256 against meta.json)
        read_checkpoint(path)

    resumed = subprocess.run(_cli(killed_dir, "--resume"), env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"done: step {STEPS}" in resumed.stdout

    reference_dir = tmp_path / "reference"
    torch.set_num_threads(1)
    train(load_config(TINY, [f"out_dir={reference_dir}", *OVERRIDES]))

    a = load_file(str(killed_dir / f"step-{STEPS:08d}" / "model.safetensors"))
    b = load_file(str(reference_dir / f"step-{STEPS:08d}" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # The resumed CSV has each step once, with no rows from the killed process beyond its last checkpoint.
    steps = [int(r.split(",")[0]) for r in (killed_dir / "log.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
