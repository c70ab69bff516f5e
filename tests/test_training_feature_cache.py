"""A frozen backbone (model.options.freeze_backbone) and training on features embedded once (train.feature_cache)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import training.trainer as trainer_mod
from metaformer.data import EpisodeSampler, GlyphFamily, TensorClassSource
from metaformer.inference import feature_source
from metaformer.models import MetaTransformer, MetaTransformerConfig
from training.checkpoint import read_checkpoint
from training.config import ConfigError, load_config
from training.trainer import Trainer

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"
FROZEN = ["model.options={d_model: 16, n_layers: 1, n_heads: 2, dropout: 0.0, freeze_backbone: true}"]

# these runs freeze a random backbone on purpose (the trainer warns about it; tested in test_training_warm_start.py)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:model.options.freeze_backbone is true:UserWarning")]


def frozen_model(seed: int = 0) -> MetaTransformer:
    """A tiny Meta-Transformer with a frozen Conv-4 whose BatchNorm has non-default running statistics."""
    torch.manual_seed(seed)
    cfg = MetaTransformerConfig(backbone="conv4", backbone_kwargs={"hidden": 8}, d_model=16, n_layers=1,
                                n_heads=2, max_way=5, freeze_backbone=True)
    model = MetaTransformer(cfg)
    for m in model.backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def glyph_source(classes: int = 8, per_class: int = 6) -> TensorClassSource:
    """A small finite image source: `per_class` glyph images of each of `classes` classes at 16x16."""
    fam = GlyphFamily("train", image_size=16)
    idx = torch.arange(per_class).expand(classes, per_class)
    items = fam.get_items(torch.arange(classes), idx).reshape(classes * per_class, 1, 16, 16)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return TensorClassSource(items, labels, name="small glyph source")


def test_frozen_backbone_stays_in_eval_mode_and_gets_no_gradient() -> None:
    model = frozen_model().train()
    assert model.backbone_frozen and not model.backbone.training and model.proj.training
    assert not any(p.requires_grad for p in model.backbone.parameters())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    batch = EpisodeSampler(glyph_source(), 3, 1, 2, seed=0).batch(0, 4)
    loss, _ = model.loss(batch)
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.proj[1].weight.grad is not None and float(model.proj[1].weight.grad.abs().sum()) > 0
    # running statistics untouched by a train-mode forward: the backbone normalises as it was trained
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_feature_view_shares_parameters_and_matches_the_image_path(mode: str) -> None:
    model = frozen_model()
    model.train(mode == "train")
    view = model.feature_view()
    view.train(mode == "train")
    assert view.proj is model.proj and view.blocks is model.blocks and view.label_embedding is model.label_embedding
    assert model.backbone is not view.backbone and isinstance(model.backbone.features, nn.Module)  # the model keeps its backbone
    source = glyph_source()
    feats = feature_source(model.backbone, source)
    episodes, feat_episodes = (EpisodeSampler(s, 3, 2, 2, seed=5) for s in (source, feats))
    batch, fbatch = episodes.batch(3, 4), feat_episodes.batch(3, 4)
    assert torch.equal(batch.support_y, fbatch.support_y) and batch.class_names == fbatch.class_names
    assert fbatch.support_x.shape == (4, 6, model.backbone.out_dim)
    torch.testing.assert_close(view(fbatch), model(batch), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="frozen backbone"):
        MetaTransformer(MetaTransformerConfig(backbone_kwargs={"hidden": 8}, d_model=16, n_heads=2)).feature_view()


def small_source_episodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the trainer draw its episodes from a small finite glyph source (the glyph family is procedural)."""
    source = glyph_source()

    def fake_build_episodes(cfg, split, data_root=None):  # noqa: ANN001, ANN202
        return EpisodeSampler(source, cfg.data.n_way, cfg.data.k_shot, cfg.data.q_query, seed=11)

    monkeypatch.setattr(trainer_mod, "build_episodes", fake_build_episodes)


@pytest.mark.parametrize("readout", ["label", "residual"])
def test_training_on_cached_features_equals_training_on_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              readout: str) -> None:
    small_source_episodes(monkeypatch)
    options = FROZEN[0].replace("freeze_backbone: true}", f"freeze_backbone: true, readout: {readout}}}")
    common = ["train.steps=4", "train.ckpt_every=0", "optim.warmup_steps=0", options]
    runs = {}
    for cache in ("true", "false"):
        cfg = load_config(TINY, [f"out_dir={tmp_path / cache}", f"train.feature_cache={cache}", *common])
        tr = Trainer(cfg)
        assert (tr.step_model is not tr.model) == (cache == "true")
        if cache == "true":
            assert isinstance(tr.train_episodes.source, TensorClassSource)
            assert tr.train_episodes.source.items.shape[1:] == (tr.model.backbone.out_dim,)
        backbone0 = {k: v.clone() for k, v in tr.model.backbone.state_dict().items()}
        res = tr.run()
        assert res.step == 4 and math.isfinite(res.metrics["loss"])
        for k, v in tr.model.backbone.state_dict().items():
            assert torch.equal(v, backbone0[k]), k
        runs[cache] = read_checkpoint(tmp_path / cache, with_trainer_state=False).model_state
    assert runs["true"].keys() == runs["false"].keys()
    changed = 0
    for k in runs["true"]:
        torch.testing.assert_close(runs["true"][k], runs["false"][k], atol=1e-5, rtol=1e-4, msg=k)
        changed += not k.startswith("backbone.")
    assert changed > 0


def test_feature_cache_refusals_name_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"feature_cache=true.*more than"):
        Trainer(load_config(TINY, [f"out_dir={tmp_path / 'a'}", "train.feature_cache=true", *FROZEN]))
    small_source_episodes(monkeypatch)
    with pytest.raises(ConfigError, match=r"feature_cache=true.*backbone trains.*freeze_backbone=true"):
        Trainer(load_config(TINY, [f"out_dir={tmp_path / 'b'}", "train.feature_cache=true"]))
    # null: cache when possible; a trainable backbone simply trains on images
    assert Trainer(load_config(TINY, [f"out_dir={tmp_path / 'c'}"])).step_model.backbone.__class__.__name__ == "Conv4"
    with pytest.raises(ConfigError, match="train.feature_cache.*expected bool"):
        load_config(TINY, ["train.feature_cache=3"])
    with pytest.raises(ConfigError, match="freeze_backbone must be true or false"):
        Trainer(load_config(TINY, [f"out_dir={tmp_path / 'd'}", "model.options={freeze_backbone: 1}"]))


def test_a_cached_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_source_episodes(monkeypatch)
    # a constant schedule: a 2-step run must not decay the learning rate the 4-step run still uses
    common = ["train.ckpt_every=2", "optim.warmup_steps=0", "optim.schedule=constant", "train.feature_cache=true", *FROZEN]
    Trainer(load_config(TINY, [f"out_dir={tmp_path / 'straight'}", "train.steps=4", *common])).run()
    Trainer(load_config(TINY, [f"out_dir={tmp_path / 'split'}", "train.steps=2", *common])).run()
    resumed = Trainer(load_config(TINY, [f"out_dir={tmp_path / 'split'}", "train.steps=4", *common]), resume=True)
    assert resumed.step == 2 and resumed.step_model is not resumed.model
    resumed.run()
    a = read_checkpoint(tmp_path / "straight", with_trainer_state=False).model_state
    b = read_checkpoint(tmp_path / "split", with_trainer_state=False).model_state
    for k in a:
        assert torch.equal(a[k], b[k]), k
