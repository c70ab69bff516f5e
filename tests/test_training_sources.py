"""Other sources and precisions through the same trainer: sinusoid regression (MSE), Omniglot episodes from
the real data, bf16 autocast on CPU, and fp16 with a GradScaler (on CPU here, the same code as on GPU)."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

from training.checkpoint import read_checkpoint
from training.config import ConfigError, load_config
from training.eval_cli import evaluate_checkpoints
from training.registry import build_episodes
import training.trainer as trainer_module
from training.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"
TINY = CONFIGS / "tiny.yaml"


def _data_root() -> Path:
    root = Path(os.environ.get("METAFORMER_DATA_ROOT", REPO.parent / "shared" / "data"))
    assert (root / "omniglot" / "images_background.zip").is_file(), (
        f"Omniglot not found under {root}; set METAFORMER_DATA_ROOT to the folder holding omniglot/images_background.zip"
    )
    return root


def test_sinusoid_regression_trains_and_evaluates_mse(tmp_path: Path) -> None:
    out = tmp_path / "sin"
    cfg = load_config(CONFIGS / "sinusoid.yaml", [f"out_dir={out}", "train.steps=25", "train.meta_batch=8", "train.ckpt_every=0",
                                                  "train.val_every=0", "train.progress=false", "train.tensorboard=false",
                                                  "optim.warmup_steps=5", "optim.lr=0.003", "train.num_threads=1"])
    res = train(cfg)
    assert res.step == 25 and "mse" in res.metrics
    [before] = evaluate_checkpoints([out], load_config(CONFIGS / "sinusoid.yaml", ["eval.episodes=50"]), progress=False)
    assert before.metric == "mse" and before.episodes == 50
    # Sinusoid targets have variance E[A^2]/2 ~ 4.3; a model that learned anything is well below that.
    assert 0 < before.mean < 4.3


def test_omniglot_episodes_from_real_data() -> None:
    cfg = load_config(CONFIGS / "omniglot_5w1s_protonet.yaml",
                      [f"data.root={_data_root()}", "data.options={split_scheme: alphabets}"])
    train_eps, test_eps = build_episodes(cfg, "train"), build_episodes(cfg, "test")
    b = train_eps.batch(0, 2)
    assert tuple(b.support_x.shape) == (2, 5, 1, 28, 28) and tuple(b.query_x.shape) == (2, 75, 1, 28, 28)
    assert float(b.support_x.max()) <= 1.0 and float(b.support_x.mean()) < 0.5  # inverted: strokes are 1
    train_classes = set(train_eps.source.class_names)
    assert train_classes.isdisjoint(test_eps.source.class_names)  # split by alphabet
    bad = load_config(CONFIGS / "omniglot_5w1s_protonet.yaml", [f"data.root={_data_root()}", "data.options={split_scheme: random}"])
    with pytest.raises(ConfigError, match="split_scheme"):
        build_episodes(bad, "train")


def test_omniglot_trainval_part_is_train_and_val_and_never_test() -> None:
    over = [f"data.root={_data_root()}", "data.options={split_scheme: alphabets}"]
    cfg = load_config(CONFIGS / "omniglot_5w1s_protonet.yaml", over)
    names = {p: build_episodes(cfg, p).source.class_names for p in ("train", "val", "test", "trainval")}
    assert names["trainval"] == names["train"] + names["val"]  # train's classes first, then val's, as numbered
    assert set(names["trainval"]).isdisjoint(names["test"])
    # data.train_split=trainval trains on both; the test episodes stay those of the 20/5/5 split
    tv = load_config(CONFIGS / "omniglot_5w1s_protonet.yaml", [*over, "data.train_split=trainval"])
    assert build_episodes(tv, tv.data.train_split).source.class_names == names["trainval"]
    assert build_episodes(tv, "test").source.class_names == names["test"]
    with pytest.raises(ConfigError, match="no split 'validation'; valid parts: train, val, test, trainval, trainval_half0"):
        build_episodes(cfg, "validation")


def test_omniglot_train_mirrors_double_the_training_classes_only() -> None:
    over = [f"data.root={_data_root()}", "data.options={split_scheme: alphabets}"]
    cfg = load_config(CONFIGS / "omniglot_5w1s_protonet.yaml", over)
    mir = load_config(CONFIGS / "omniglot_5w1s_protonet.yaml",
                      [*over, "data.options={split_scheme: alphabets, train_mirrors: true}"])
    plain, mirrored = build_episodes(cfg, "train").source, build_episodes(mir, "train").source
    assert mirrored.num_classes == 2 * plain.num_classes
    assert mirrored.class_names[2 * 7] == plain.class_names[7] and mirrored.class_names[2 * 7 + 1] == plain.class_names[7] + "/mirror"
    assert mirrored.groups[2 * 7 + 1] == plain.groups[7]  # a split by alphabet stays one
    classes, idx = torch.tensor([7, 7, 30]), torch.tensor([0, 3, 5])
    orig = plain.get_items(classes, idx)
    got = mirrored.get_items(torch.tensor([14, 15, 61]), idx)
    assert torch.equal(got[0], orig[0]) and torch.equal(got[1], orig[1].flip(-1)) and torch.equal(got[2], orig[2].flip(-1))
    assert not torch.equal(orig[1], orig[1].flip(-1))  # the check above can tell a mirror image apart
    for part in ("val", "test"):  # held-out episodes never see a mirror image
        assert build_episodes(mir, part).source.class_names == build_episodes(cfg, part).source.class_names
    with pytest.raises(ConfigError, match="train_mirrors"):
        build_episodes(load_config(CONFIGS / "omniglot_5w1s_protonet.yaml",
                                   [*over, "data.options={split_scheme: alphabets, mirrors: true}"]), "train")


def test_omniglot_trainval_halves_split_its_alphabets_evenly() -> None:
    cfg = load_config(CONFIGS / "omniglot_5w1s_protonet.yaml",
                      [f"data.root={_data_root()}", "data.options={split_scheme: alphabets}"])
    tv = build_episodes(cfg, "trainval").source
    h0, h1 = (build_episodes(cfg, f"trainval_half{i}").source for i in (0, 1))
    assert sorted(h0.class_names + h1.class_names) == sorted(tv.class_names)  # every class once
    assert set(h0.groups).isdisjoint(h1.groups)  # never an alphabet in both halves
    sizes = {g: tv.groups.count(g) for g in set(tv.groups)}
    assert abs(h0.num_classes - h1.num_classes) <= max(sizes.values())  # the greedy split's bound
    assert len(set(h0.groups)) + len(set(h1.groups)) == 25


def test_bf16_autocast_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "bf16"
    cfg = load_config(TINY, [f"out_dir={out}", "train.precision=bf16", "train.steps=4", "model.name=protonet",
                             "model.options={}"])
    monkeypatch.setattr(trainer_module, "cpu_has_fast_bf16", lambda: True)  # this machine may lack it: see below
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no slow-bf16 warning where the CPU has native bf16
        res = train(cfg)
    assert res.step == 4 and torch.isfinite(torch.tensor(res.metrics["loss"]))
    weights = read_checkpoint(out, with_trainer_state=False).model_state
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())  # master weights stay fp32


def test_fp16_trains_with_a_grad_scaler_and_checkpoints_its_state(tmp_path: Path) -> None:
    """fp16 autocast + GradScaler (the GPU recipe) runs on CPU, so its logic is tested without a GPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = tmp_path / "fp16"
    with pytest.warns(UserWarning, match="fp16 on CPU") if device == "cpu" else contextlib.nullcontext():
        res = train(load_config(TINY, [f"out_dir={out}", "train.precision=fp16", f"train.device={device}",
                                       "train.steps=4", "model.name=protonet", "model.options={}"]))
    assert res.step == 4 and math.isfinite(res.metrics["loss"])
    ckpt = read_checkpoint(out)
    assert ckpt.trainer_state["scaler"]["scale"] > 0  # the GradScaler's state is checkpointed
    assert all(v.dtype == torch.float32 for v in ckpt.model_state.values() if v.is_floating_point())


def test_fp16_overflow_is_skipped_by_the_scaler_not_reported_as_nan(tmp_path: Path) -> None:
    """A scale so large that the fp16 gradients overflow: the scaler skips the step and backs off, no error."""
    cfg = load_config(TINY, [f"out_dir={tmp_path / 'o'}", "train.precision=fp16", "train.device=cpu",
                             "train.steps=3", "model.name=protonet", "model.options={}"])
    with pytest.warns(UserWarning, match="fp16 on CPU"):
        trainer = Trainer(cfg)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    before = [p.detach().clone() for p in trainer.params]
    batch = trainer.train_episodes.batch(0, cfg.train.meta_batch)
    metrics, skipped = trainer._train_step(batch)
    assert not skipped and math.isfinite(metrics["loss"])
    assert trainer.scaler.get_scale() == 2.0**119  # backed off once
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, trainer.params))  # the overflowing step was not applied


def test_bf16_on_a_cpu_without_native_bf16_warns_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without AVX-512 BF16/AMX, bf16 convolutions take ATen's slow fallback: the user is told, with the fix."""
    monkeypatch.setattr(trainer_module, "cpu_has_fast_bf16", lambda: False)
    cfg = load_config(TINY, [f"out_dir={tmp_path / 'b'}", "train.precision=bf16", "train.steps=1",
                             "model.name=protonet", "model.options={}"])
    with pytest.warns(UserWarning, match=r"without native bf16.*train\.precision=fp32"):
        Trainer(cfg)


def test_cpu_has_fast_bf16_is_onednn_s_answer() -> None:
    """The check is oneDNN's own (not a guess from CPU flags), so it follows what the kernels will do."""
    expected = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert trainer_module.cpu_has_fast_bf16() is bool(expected)


def _fp16_trainer(out: Path, *extra: str, resume: bool = False) -> Trainer:
    cfg = load_config(TINY, [f"out_dir={out}", "train.precision=fp16", "train.device=cpu", "train.log_every=2",
                             "model.name=protonet", "model.options={}", *extra])
    with pytest.warns(UserWarning, match="fp16 on CPU"):
        return Trainer(cfg, resume=resume)


def test_steps_the_grad_scaler_skips_are_counted_logged_and_kept_across_a_resume(tmp_path: Path) -> None:
    """A scale so large that every fp16 gradient overflows: no step updates the weights, and the run says so (it
    used to log a falling loss with skipped=0, as if it trained)."""
    out = tmp_path / "o"
    trainer = _fp16_trainer(out, "train.steps=4")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    before = [p.detach().clone() for p in trainer.params]
    res = trainer.run()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, trainer.params))  # the scaler skipped all 4
    assert res.scaler_skipped_steps == 4 and res.skipped_steps == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scaler_skipped_steps"] == 4 and summary["skipped_steps"] == 0
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [(r["step"], r["scaler_skipped"], float(r["loss_scale"])) for r in rows] == [
        ("2", "2", 2.0**118), ("4", "4", 2.0**116)]
    assert read_checkpoint(out).trainer_state["scaler_skipped"] == 4
    resumed = _fp16_trainer(out, "train.steps=6", resume=True).run()  # the scaler resumes at 2**116: still overflows
    assert resumed.scaler_skipped_steps == 6
    assert json.loads((out / "summary.json").read_text())["scaler_skipped_steps"] == 6


def _infinite_gradient(trainer: Trainer) -> None:
    """A gradient that is infinite at every loss scale (a diverged model), with a finite loss."""
    trainer.params[0].register_hook(lambda g: torch.full_like(g, math.inf))


def test_grad_scaler_overflowing_below_scale_1_is_a_non_finite_gradient(tmp_path: Path) -> None:
    """The scaler halves its scale 4 -> 2 -> 1 -> 0.5 (three skips: it may be the scale that overflows); an overflow
    at 0.5 scales the loss down, so the gradient itself is not finite: train.nan_policy=stop stops there instead of
    skipping every step while the scale falls towards 0."""
    trainer = _fp16_trainer(tmp_path / "o", "train.steps=20")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    _infinite_gradient(trainer)
    with pytest.raises(trainer_module.NonFiniteLossError,
                       match=r"non-finite gradient \(the fp16 GradScaler overflowed at loss scale 0\.5, below 1.* at step 4 "):
        trainer.run()
    assert trainer.scaler_skipped == 4 and trainer.skipped == 0


def test_grad_scaler_overflows_below_scale_1_count_as_nan_policy_skips(tmp_path: Path) -> None:
    trainer = _fp16_trainer(tmp_path / "o", "train.steps=20", "train.nan_policy=skip", "train.max_skips=2")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    _infinite_gradient(trainer)
    with pytest.raises(trainer_module.NonFiniteLossError, match=r"3 consecutive non-finite steps \(last: step 6\)"):
        trainer.run()
    assert trainer.scaler_skipped == 6 and trainer.skipped == 3  # steps 4-6 (scales 0.5, 0.25, 0.125)
