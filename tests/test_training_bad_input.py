"""Training-side bad input: nothing of the user's is deleted or overwritten, and config mistakes are one clear
ConfigError (the CLI's one-line error) instead of a traceback from deep inside the data or model classes."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metaformer.cli import main
from metaformer.data import EpisodeSampler, GlyphFamily, SinusoidFamily
from metaformer.data.omniglot import load_omniglot
from test_data_omniglot import make_zip
from training.checkpoint import CheckpointError, RunLock, export_checkpoint, list_checkpoints, resolve_checkpoint
from training.config import ConfigError, load_config
from training.demo import run_demo
from training.registry import build_episodes, build_model
from training.trainer import NonFiniteLossError, Trainer, train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"
SINUSOID = REPO / "training" / "configs" / "sinusoid.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_refuses_to_be_pointed_at_a_folder_it_would_delete(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    for key in ("out_dir", "name", "model.name"):
        with pytest.raises(ConfigError, match=f"sets {key} itself"):
            run_demo(tmp_path / "demo", quick=True, extra=[f"{key}={precious}"], progress=False)
    assert (precious / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "demo").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="--budget-seconds"):
        run_demo(tmp_path / "demo", budget_seconds=0.0, quick=True, progress=False)


def test_training_into_a_checkpoint_folder_is_refused_and_a_finished_run_is_left_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    cfg = load_config(TINY, [f"out_dir={run}", "train.steps=4", "train.ckpt_every=2"])
    train(cfg)
    summary = (run / "summary.json").read_bytes()
    assert json.loads(summary)["metrics"]  # a real summary, which the resume below must not wipe
    again = train(cfg, resume=True)
    assert again.step == 4 and again.checkpoint is not None and again.metrics == json.loads(summary)["metrics"]
    assert "already at step 4" in capsys.readouterr().out
    assert (run / "summary.json").read_bytes() == summary
    lower = load_config(TINY, [f"out_dir={run}", "train.steps=2", "train.ckpt_every=2"])
    assert train(lower, resume=True).step == 4  # train.steps below the last checkpoint: nothing trained
    assert (run / "summary.json").read_bytes() == summary
    export = export_checkpoint(run, tmp_path / "export")
    config_before = (export / "config.yaml").read_bytes()
    for resume in (False, True):
        with pytest.raises(ConfigError, match="is a checkpoint.*train.init_from"):
            train(load_config(TINY, [f"out_dir={export}", "train.steps=2"]), resume=resume)
    assert (export / "config.yaml").read_bytes() == config_before


@pytest.mark.parametrize(("config", "overrides", "match"), [
    (SINUSOID, ["model.name=protonet", "model.options={}"], "is a classifier"),
    (SINUSOID, ["model.name=maml"], r"model.options=\{\}"),  # the Meta-Transformer's options left in place
    (TINY, ["model.backbone=nope"], "model.backbone"),
])
def test_model_config_mistakes_are_config_errors(config: Path, overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model(load_config(config, overrides))


def test_the_sinusoid_recipe_of_its_config_header_works() -> None:
    cfg = load_config(SINUSOID, ["model.name=maml", "model.options={}"])
    assert type(build_model(cfg)).__name__ == "MAML"


@pytest.mark.parametrize(("config", "overrides", "split", "match"), [
    (TINY, ["data.options={foo: 1}"], "train", "foo"),
    (TINY, ["data.image_size=4"], "train", "image_size"),
    (SINUSOID, ["data.options={train_mirrors: true}"], "train", "train_mirrors"),
    (SINUSOID, [], "tset", "no split 'tset'"),  # once evaluated silently on unnamed tasks
])
def test_data_config_mistakes_are_config_errors(config: Path, overrides: list[str], split: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_episodes(load_config(config, overrides), split)


@pytest.mark.parametrize(("override", "match"), [("optim.lr=inf", "finite"), ("optim.lr=1e300", "3.4e38"),
                                               ("optim.betas=[a, b]", "betas")])
def test_optimiser_values_that_cannot_train_are_refused(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, [override])


def test_numpy_ints_and_bad_family_arguments() -> None:
    sampler = EpisodeSampler(GlyphFamily("train", image_size=16), np.int64(3), np.int64(1), np.int64(2), seed=0)
    ref = EpisodeSampler(GlyphFamily("train", image_size=16), 3, 1, 2, seed=0)
    assert torch.equal(sampler[0].support_x, ref[0].support_x)
    assert SinusoidFamily(np.int64(4), 2)[0].support_x.shape == (4, 1)
    with pytest.raises(TypeError, match="k_shot must be an int"):
        SinusoidFamily(2.5, 2)
    with pytest.raises(ValueError, match="num_episodes must be >= 0"):
        SinusoidFamily(2, 2, num_episodes=-3)


def test_a_damaged_member_of_an_omniglot_zip_names_the_zip_and_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "omniglot"
    root.mkdir()
    path = make_zip(root, "background", {"Alpha": 2})
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[1]
        offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(path.read_bytes())
    data[offset + 40] ^= 0xFF  # inside the member's data: its CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"images_background.zip is damaged .*download it again"):
        load_omniglot(tmp_path, ("background",), 28, cache_dir=tmp_path / "cache", download=False)


def test_a_damaged_newest_checkpoint_tells_resume_how_to_go_on(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = load_config(TINY, [f"out_dir={run}", "train.steps=4", "train.ckpt_every=2"])
    train(cfg)
    newest = sorted(run.glob("step-*"))[-1]
    (newest / "model.safetensors").write_bytes(b"damaged")
    longer = load_config(TINY, [f"out_dir={run}", "train.steps=6", "train.ckpt_every=2"])
    with pytest.raises(CheckpointError, match=r"move .*step-00000004 out of the run folder and --resume continues "
                                              r"from step-00000002"):
        train(longer, resume=True)


def test_ctrl_c_before_the_trainer_runs_is_one_line_not_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture,
                                                                    tmp_path: Path) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("training.trainer.build_model", interrupted)  # Ctrl-C while the model is being built
    assert main(["train", "--config", str(TINY), "--set", f"out_dir={tmp_path / 'run'}"]) == 130
    assert capsys.readouterr().err.strip() == "metaformer train: interrupted"


def _diverging(run: Path, steps: int) -> list[str]:
    """A sinusoid run whose huge SGD step makes every loss after the first non-finite (skipped, not stopped)."""
    return [f"out_dir={run}", "optim.name=sgd", "optim.lr=1e30", "optim.grad_clip=null", "train.nan_policy=skip",
            f"train.steps={steps}", "train.ckpt_every=3", "train.max_skips=4", "train.meta_batch=4",
            "model.options={d_model: 16, n_layers: 1, n_heads: 2}", "data.k_shot=5", "data.q_query=5"]


def test_consecutive_skips_count_across_a_resume(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match=r"5 consecutive non-finite steps \(last: step 6\)"):
        train(load_config(SINUSOID, _diverging(tmp_path / "whole", 20)))
    split = tmp_path / "split"
    assert train(load_config(SINUSOID, _diverging(split, 4))).skipped_steps == 3  # steps 2-4 skipped, then saved
    with pytest.raises(NonFiniteLossError, match=r"5 consecutive non-finite steps \(last: step 6\)"):
        train(load_config(SINUSOID, _diverging(split, 20)), resume=True)


def test_weights_overflowed_by_a_step_stop_training_with_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real_step = Trainer._train_step

    def overflowing_step(self: Trainer, batch: object) -> tuple:
        """The real step, then a weight overflowed to inf (as a huge optim.lr does with large gradients)."""
        out = real_step(self, batch)
        with torch.no_grad():
            next(self.model.parameters()).view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(Trainer, "_train_step", overflowing_step)
    run = tmp_path / "run"
    args = ["train", "--config", str(TINY), "--set", f"out_dir={run}", "train.steps=6", "train.ckpt_every=3",
            "train.nan_policy=skip", "train.max_skips=30"]
    assert main(args) == 3  # was a NonFiniteStateError traceback (exit 1) at the first checkpoint
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to write checkpoint at step 3" in err[0] and "lower optim.lr" in err[0]
    assert not list_checkpoints(run)


def test_a_second_trainer_on_the_same_run_folder_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lock = RunLock(run)
    lock.acquire()  # as a trainer in another process holds it
    try:
        with pytest.raises(CheckpointError, match=rf"{run} is being trained by pid {os.getpid()}"):
            train(load_config(TINY, [f"out_dir={run}", "train.steps=2"]))
    finally:
        lock.release()
    assert train(load_config(TINY, [f"out_dir={run}", "train.steps=2"])).step == 2


@pytest.mark.parametrize("resume", [True, False])
def test_a_held_run_folder_is_refused_before_its_checkpoints_are_read(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                       resume: bool) -> None:
    # the refusal is all the user sees: no "--resume: no checkpoint ..., starting from step 0" (nor "pass --resume"
    # for a held folder with checkpoints) before it
    run = tmp_path / "run"
    if not resume:
        train(load_config(TINY, [f"out_dir={run}", "train.steps=2"]))
    capsys.readouterr()
    lock = RunLock(run)
    lock.acquire()
    try:
        args = ["train", *(["--resume"] if resume else []), "--config", str(TINY), "--set", f"out_dir={run}",
                "train.steps=2"]
        assert main(args) == 2
    finally:
        lock.release()
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [
        f"metaformer train: error: {run} is being trained by pid {os.getpid()}; wait for it or stop it (a second "
        "trainer would delete its checkpoints in progress), or train into another out_dir"]


def test_resume_repairs_a_best_json_left_stale_by_a_kill(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = load_config(SINUSOID, [f"out_dir={run}", "train.steps=6", "train.val_every=2", "train.val_episodes=8",
                                 "train.keep_last=5", "train.meta_batch=4",
                                 "model.options={d_model: 16, n_layers: 1, n_heads: 2}"])
    train(cfg)
    mse = {p.name: json.loads((p / "meta.json").read_text())["metrics"]["val_mse"] for p in list_checkpoints(run)}
    best = json.loads((run / "best.json").read_text())
    assert best["metric"] == "val_mse" and best["value"] == min(mse.values())  # continuous values: no ties
    worse = max(mse, key=mse.get)
    # as if killed after the best step's checkpoint, before its best.json update (and before the summary)
    (run / "best.json").write_text(json.dumps({**best, "dir": worse, "step": int(worse[5:]), "value": mse[worse]}))
    (run / "summary.json").unlink()
    assert resolve_checkpoint(run, "best").name == best["dir"]  # reading already sees through it
    train(cfg, resume=True)
    assert json.loads((run / "best.json").read_text())["dir"] == best["dir"]
    assert json.loads((run / "summary.json").read_text())["step"] == 6


def test_a_time_capped_run_says_how_to_continue(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    result = train(load_config(TINY, [f"out_dir={tmp_path / 'run'}", "train.steps=1000", "train.max_minutes=0.0001"]))
    assert result.step < 1000
    assert f"reached at step {result.step} of train.steps=1000" in capsys.readouterr().out


def test_the_log_is_rewritten_atomically_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after the new log's temporary file is written, before it replaces the old one, keeps the old one."""
    from training import atomic, logs

    path = tmp_path / "log.csv"
    rows = "".join(f"{s},{4 * s},0.5,,,,,,,,,\r\n" for s in range(1, 6))
    path.write_text(",".join(logs.CSV_FIELDS) + "\r\n" + rows, newline="")
    before = path.read_bytes()

    def crash(*args: object) -> None:
        raise OSError("killed before the rename")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError):
        logs.truncate_csv(path, 3)
    assert path.read_bytes() == before  # nothing lost when the rewrite fails
    monkeypatch.undo()
    logs.truncate_csv(path, 3)
    assert [line.split(",")[0] for line in path.read_text().splitlines()[1:]] == ["1", "2", "3"]


@pytest.mark.parametrize(("overrides", "match"), [
    # an unknown name: the option and every accepted one (the constructor's TypeError named neither list)
    (["model.name=protonet", "model.options={distance: cosine}"],
     r"model\.options do not fit head 'protonet': unknown option 'distance' for head 'protonet'; it accepts: n_way;"),
    (["model.name=maml", "model.options={inner_stepz: 2}"],
     r"unknown option 'inner_stepz' for head 'maml'; it accepts: batch_norm, .*inner_lr, inner_steps, .*path;"),
    (["model.name=maml", "model.options={adapt: head}"], r"unknown option 'adapt' for head 'maml'"),  # MAML fixes it
    # a wrong type: values that were accepted and silently meant something else, or failed deep inside torch
    (["model.name=matchingnet", "model.options={fce: maybe}"], r"option 'fce' of head 'matchingnet' must be true or false, got 'maybe'"),
    (["model.name=metasgd", "model.options={first_order: 3}"], r"option 'first_order' of head 'metasgd' must be true or false, got 3"),
    (["model.name=lstm", "model.options={hidden: wide}"], r"option 'hidden' of head 'lstm' must be an int, got 'wide'"),
    (["model.name=anil", "model.options={inner_lr: [0.1]}"], r"option 'inner_lr' of head 'anil' must be a number, got \[0\.1\]"),
    (["model.name=reptile", "model.options={first_order: false}"], r"Reptile is first order by definition"),
    (["model.options={d_modle: 16}"],
     r"model\.options: 'd_modle' is not an option of model\.name=meta_transformer; it accepts: .*d_model, .*n_layers"),
    (["model.backbone_options={hiden: 8}"],
     r"model\.backbone_options: 'hiden' is not an option of backbone 'conv4'; it accepts: hidden, in_channels, num_blocks"),
    (["model.name=maml", "model.options={}", "model.backbone_options={hiden: 8}"],
     r"model\.backbone_options: 'hiden' is not an option of backbone 'conv4'"),
])
def test_model_option_mistakes_name_the_option_and_the_accepted_ones(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model(load_config(TINY, overrides))


def test_head_options_of_the_right_type_still_build() -> None:
    """The checks accept what the constructors accept: ints for float options, null for optional ones, and numpy
    scalars from Python callers (left to the constructor)."""
    from metaformer.heads import build_head
    from metaformer.models import build_backbone

    backbone = build_backbone("conv4", in_channels=1, hidden=8)
    head = build_head("maml", backbone, n_way=3, inner_lr=1, eval_inner_steps=None, first_order=True)
    assert head.inner_lr == 1.0 and head.first_order is True
    assert build_head("maml", backbone, n_way=3, inner_lr=np.float32(0.5)).inner_lr == 0.5
    assert build_model(load_config(TINY, ["model.name=reptile", "model.options={first_order: true, outer_lr: 1}"]))
