"""Ctrl-C / SIGTERM during training: the trainer finishes the step, writes a checkpoint at that step and stops;
--resume from it ends with exactly the weights of an uninterrupted run; a second signal aborts at once."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import checkpoint as ckpt_io
from training.checkpoint import list_checkpoints, read_checkpoint
from training.config import load_config
from training.interrupts import TrainingInterrupted
from training.trainer import Trainer, train
from training_processes import wait_for_log_rows

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"
STEPS = 20
# A checkpoint every 6 steps, so a stop at step 7 or 9 can only be served by the stop's own checkpoint.
OVERRIDES = [f"train.steps={STEPS}", "train.ckpt_every=6", "train.keep_last=5", "train.log_every=2"]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / f"step-{step:08d}" / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after the interrupted run was resumed"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    torch.set_num_threads(1)
    train(load_config(TINY, [f"out_dir={out}", *OVERRIDES]))
    return out


def _signal_at(monkeypatch: pytest.MonkeyPatch, step: int, times: int) -> None:
    """Make the trainer send itself SIGINT `times` times during the step that ends at `step`."""
    original = Trainer._train_step

    def step_then_signal(self: Trainer, batch: object) -> object:
        out = original(self, batch)
        if self.step + 1 == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "_train_step", step_then_signal)


def test_sigint_checkpoints_the_current_step_and_resume_is_exact(tmp_path: Path, reference: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    cfg = load_config(TINY, [f"out_dir={run}", *OVERRIDES])
    _signal_at(monkeypatch, 7, times=1)
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg)
    assert info.value.signal_name == "SIGINT" and info.value.exit_status == 130
    assert info.value.result.step == 7
    assert [p.name for p in list_checkpoints(run)] == ["step-00000006", "step-00000007"]
    assert read_checkpoint(run).step == 7  # complete and verified
    assert json.loads((run / "summary.json").read_text())["interrupted"] == "SIGINT"
    # the handlers are given back: a Ctrl-C outside training is a plain KeyboardInterrupt again
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    monkeypatch.undo()
    done = train(load_config(TINY, [f"out_dir={run}", *OVERRIDES]), resume=True)
    assert done.step == STEPS and done.interrupted is None
    _assert_same_weights(_weights(run, STEPS), _weights(reference, STEPS))
    steps = [int(r.split(",")[0]) for r in (run / "log.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS


def test_second_sigint_aborts_without_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    _signal_at(monkeypatch, 9, times=2)
    with pytest.raises(KeyboardInterrupt) as info:
        train(load_config(TINY, [f"out_dir={run}", *OVERRIDES]))
    assert type(info.value) is KeyboardInterrupt, "the second signal must not wait for a checkpoint"
    assert [p.name for p in list_checkpoints(run)] == ["step-00000006"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_stops_cleanly_on_a_signal_to_its_process_group(tmp_path: Path, sig: int) -> None:
    """As a terminal's Ctrl-C does, the signal reaches the trainer and its DataLoader worker: the worker must
    not die of it under the batch being fetched, and the command says how to resume and exits with 128 + signal."""
    run = tmp_path / "run"
    # a constant rate, so the weights at step s do not depend on train.steps and a short reference run has them
    common = [*OVERRIDES, "train.ckpt_every=1000", "optim.schedule=constant"]
    cmd = [sys.executable, "-m", "metaformer.cli", "train", "--config", str(TINY), "--set", f"out_dir={run}",
           *common, "train.steps=100000", "data.num_workers=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        wait_for_log_rows(proc, run / "log.csv", rows=3, timeout=90)
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, err
    step = read_checkpoint(run).step
    assert step >= 6 and f"stopped by {name} at step {step}" in err and "--resume" in err, err
    assert [p.name for p in list_checkpoints(run)] == [f"step-{step:08d}"]  # ckpt_every=1000: the stop's own
    assert "Traceback" not in err, err
    # the checkpoint holds the state after exactly `step` steps: a run of `step` steps without a worker ends there
    torch.set_num_threads(1)
    train(load_config(TINY, [f"out_dir={tmp_path / 'short'}", *common, f"train.steps={step}"]))
    _assert_same_weights(_weights(run, step), _weights(tmp_path / "short", step))


# log.csv after a stop + resume: the same rows and metric values as an uninterrupted run. Rows every 4 steps, so
# the stops below (step 7, a crash with checkpoint 6 the newest) fall inside a logging window; validation at
# step 6 puts a row of its own at the crash's resume step, which must survive the resume.
LOG_OVERRIDES = [*OVERRIDES, "train.log_every=4", "train.val_every=6", "train.val_episodes=6"]
TIMING_COLUMNS = {"wall_s", "episodes_per_s"}  # not reproducible


def _log_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def log_reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    out = tmp_path_factory.mktemp("log_reference")
    torch.set_num_threads(1)
    train(load_config(TINY, [f"out_dir={out}", *LOG_OVERRIDES]))
    rows = _log_rows(out)
    assert [r["step"] for r in rows] == ["4", "6", "8", "12", "12", "16", "18", "20", "20"]
    return rows


def test_log_csv_after_sigint_and_resume_equals_an_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      log_reference: list[dict[str, str]]) -> None:
    run = tmp_path / "run"
    _signal_at(monkeypatch, 7, times=1)
    with pytest.raises(TrainingInterrupted):
        train(load_config(TINY, [f"out_dir={run}", *LOG_OVERRIDES]))
    # a run that stays stopped has the metrics of its last steps (5-7) in log.csv and summary.json
    halted = _log_rows(run)
    assert [r["step"] for r in halted] == ["4", "6", "7"]
    assert json.loads((run / "summary.json").read_text())["metrics"]["loss"] == float(halted[-1]["loss"])

    monkeypatch.undo()
    train(load_config(TINY, [f"out_dir={run}", *LOG_OVERRIDES]), resume=True)
    # the row at 7 is gone and the row at 8 averages steps 5-8, not 8 alone
    assert _log_rows(run) == log_reference


def test_log_csv_after_a_crash_and_resume_equals_an_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     log_reference: list[dict[str, str]]) -> None:
    run = tmp_path / "run"
    original = Trainer._train_step

    def crash_in_step_10(self: Trainer, batch: object) -> object:
        if self.step + 1 == 10:
            raise RuntimeError("simulated crash")
        return original(self, batch)

    monkeypatch.setattr(Trainer, "_train_step", crash_in_step_10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(load_config(TINY, [f"out_dir={run}", *LOG_OVERRIDES]))
    assert read_checkpoint(run).step == 6 and [r["step"] for r in _log_rows(run)] == ["4", "6", "8"]

    monkeypatch.undo()
    train(load_config(TINY, [f"out_dir={run}", *LOG_OVERRIDES]), resume=True)
    # the crashed run's row at 8 is truncated and rewritten from the window checkpointed at 6 (steps 5-6) onwards
    assert _log_rows(run) == log_reference


def test_a_checkpoint_without_a_logging_window_still_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             log_reference: list[dict[str, str]]) -> None:
    """Checkpoints written before the window was saved: the resume starts an empty window and keeps the row at
    the stop, as those versions did."""
    run = tmp_path / "run"
    save = ckpt_io.save_checkpoint

    def save_without_window(*args: object, trainer_state: dict, **kwargs: object) -> object:
        return save(*args, trainer_state={k: v for k, v in trainer_state.items() if k != "log_window_per_rank"},
                    **kwargs)

    monkeypatch.setattr(ckpt_io, "save_checkpoint", save_without_window)
    _signal_at(monkeypatch, 7, times=1)
    with pytest.raises(TrainingInterrupted):
        train(load_config(TINY, [f"out_dir={run}", *LOG_OVERRIDES]))
    assert "log_window_per_rank" not in read_checkpoint(run).trainer_state

    monkeypatch.undo()
    assert train(load_config(TINY, [f"out_dir={run}", *LOG_OVERRIDES]), resume=True).step == STEPS
    rows = _log_rows(run)
    assert [r["step"] for r in rows] == ["4", "6", "7", *(r["step"] for r in log_reference[2:])]
    assert rows[3]["loss"] != log_reference[2]["loss"]  # the row at 8: step 8 alone
    assert rows[4:] == log_reference[3:]
