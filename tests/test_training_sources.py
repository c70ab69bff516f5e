"""Other sources and precisions through the same trainer: sinusoid regression (MSE), Omniglot episodes from
the real data, bf16 autocast on CPU, and the fp16-needs-CUDA error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from training.checkpoint import read_checkpoint
from training.config import ConfigError, load_config
from training.eval_cli import evaluate_checkpoints
from training.registry import build_episodes
from training.trainer import train

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


def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    cfg = load_config(TINY, [f"out_dir={out}", "train.precision=bf16", "train.steps=4", "model.name=protonet",
                             "model.options={}"])
    res = train(cfg)
    assert res.step == 4 and torch.isfinite(torch.tensor(res.metrics["loss"]))
    weights = read_checkpoint(out, with_trainer_state=False).model_state
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())  # master weights stay fp32


def test_fp16_uses_grad_scaler_on_gpu_and_is_refused_on_cpu(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        out = tmp_path / "fp16"
        res = train(load_config(TINY, [f"out_dir={out}", "train.precision=fp16", "train.device=cuda", "train.steps=4"]))
        assert res.step == 4
        assert read_checkpoint(out).trainer_state["scaler"]["scale"] > 0  # the GradScaler's state is checkpointed
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        train(load_config(TINY, [f"out_dir={tmp_path / 'x'}", "train.precision=fp16", "train.device=cpu"]))
