"""Training over mixed N and K (data.train_ways / data.train_shots) and evaluating at a fixed, smaller N."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from training.checkpoint import CheckpointError
from training.config import ConfigError, load_config, max_ways
from training.eval_cli import evaluate_checkpoints, load_model
from training.evaluation import predict
from training.registry import build_episodes
from training.trainer import Trainer, train

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"
MIXED = ["data.train_ways=[2, 5]", "data.train_shots=[1, 3]", "train.ckpt_every=0"]


def test_training_batches_mix_sizes_and_evaluation_keeps_the_fixed_shape(tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"out_dir={tmp_path}", *MIXED])
    assert max_ways(cfg.data) == 5  # n_way is 3; the model must hold the 5 ways training draws
    train_eps = build_episodes(cfg, cfg.data.train_split)
    batch = train_eps.batch(0, 16)
    ways = set(batch.n_way.tolist())
    shots = {int(m.sum()) // int(n) for m, n in zip(batch.support_mask, batch.n_way)}
    assert len(ways) > 1 and ways <= {2, 3, 4, 5}
    assert len(shots) > 1 and shots <= {1, 2, 3}
    assert int(batch.support_mask.sum()) < batch.support_mask.numel()  # padded, not silently truncated
    test = build_episodes(cfg, cfg.eval.split).batch(0, 8)
    assert set(test.n_way.tolist()) == {3} and bool(test.support_mask.all())


@pytest.mark.parametrize("model", ["meta_transformer", "maml"])
def test_a_mixed_size_run_trains_and_evaluates_at_fewer_ways(tmp_path: Path, model: str) -> None:
    opts = [] if model == "meta_transformer" else ["model.name=maml", "model.options={inner_steps: 1, inner_lr: 0.4}"]
    cfg = load_config(TINY, [f"out_dir={tmp_path}", "train.steps=3", *MIXED, *opts])
    trainer = Trainer(cfg)
    if model == "meta_transformer":
        assert trainer.model.config.max_way == 5
    else:
        assert trainer.model.n_out == 5
    res = train(cfg)
    assert res.step == 3 and math.isfinite(res.metrics["loss"])
    # Evaluated on 2-way episodes: the 5-way model is kept as trained, the unused classes masked per task.
    cfg2 = load_config(TINY, [*opts, "data.n_way=2", "eval.episodes=6"])
    [r] = evaluate_checkpoints([tmp_path], cfg2, progress=False)
    assert r.episodes == 6
    # Same weights as trained, and no prediction names one of the 3 classes these episodes do not have.
    model, _ = load_model(tmp_path)
    batch = build_episodes(cfg2, cfg2.eval.split).batch(0, 6)
    pred = predict(model, batch).argmax(-1)
    assert bool((pred[batch.query_mask] < 2).all())
    hand = ((pred == batch.query_y) & batch.query_mask).sum(1).double() / batch.query_mask.sum(1).double()
    assert r.per_episode == pytest.approx(hand.tolist(), abs=1e-12)
    with pytest.raises(CheckpointError, match=r"has 5 class outputs.*asks for 7 ways"):
        evaluate_checkpoints([tmp_path], load_config(TINY, [*opts, "data.n_way=7", "eval.episodes=6"]), progress=False)


@pytest.mark.parametrize("override,match", [
    ("data.train_ways=[5, 2]", r"data\.train_ways must be .*low <= high"),
    ("data.train_ways=[0, 3]", r"data\.train_ways must be"),
    ("data.train_shots=[1, 2, 3]", r"data\.train_shots must be"),
    ("data.train_shots=[1.5, 2]", r"data\.train_shots must be"),
])
def test_bad_ranges_are_refused(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, [override])


def test_sinusoid_refuses_size_ranges() -> None:
    sin = TINY.parent / "sinusoid.yaml"
    with pytest.raises(ConfigError, match="sinusoid family draws a fixed K"):
        load_config(sin, ["data.train_shots=[5, 10]"])
