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


# ---------------------------------------------------------------- warped copies (train.feature_cache_views)

def _augmented(source: TensorClassSource, aug: "AffineAugment", shots: int | tuple[int, int] = 2) -> "AugmentedEpisodes":
    from metaformer.data.augment import AugmentedEpisodes

    return AugmentedEpisodes(EpisodeSampler(source, 3, shots, 2, seed=5), aug, seed=5)


def test_warped_copies_without_a_warp_are_the_plain_cache() -> None:
    from metaformer.data.augment import AffineAugment
    from training.feature_cache import ViewSampledEpisodes, cached_episodes

    model, source = frozen_model(), glyph_source()
    plain = cached_episodes(model, EpisodeSampler(source, 3, (1, 2), 2, seed=5))
    # zero ranges: every copy is the image itself, so every episode must equal the plain cache's
    still = cached_episodes(model, _augmented(source, AffineAugment(0.0, 0.0, 0.0), (1, 2)), views=3)
    assert isinstance(still, ViewSampledEpisodes) and still.source.items.shape == (48, 3, model.backbone.out_dim)
    for v in range(3):
        torch.testing.assert_close(still.source.items[:, v], plain.source.items, atol=1e-5, rtol=1e-5)
    a, b = still.batch(2, 5), plain.batch(2, 5)
    for name in ("support_y", "query_y", "support_mask", "query_mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.support_x, b.support_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.query_x, b.query_x, atol=1e-5, rtol=1e-5)


def test_warped_copies_are_the_backbone_on_warped_images_and_episodes_draw_among_them() -> None:
    from metaformer.data._rng import episode_generator
    from metaformer.data.augment import AffineAugment, random_affine
    from training.feature_cache import _VIEW_WARP_STREAM, cached_episodes

    model, source = frozen_model(), glyph_source()
    episodes = cached_episodes(model, _augmented(source, AffineAugment(), (1, 2)), views=4)
    items = episodes.source.items  # [48, 4, d]
    # copy v of class c is the backbone's features of class c's images under warp generator (seed, c, stream + v)
    with torch.no_grad():
        imgs = source.get_items(torch.tensor([2]), torch.arange(6)[None])[0]
        ref = model.backbone(random_affine(imgs, AffineAugment(), episode_generator(5, 2, _VIEW_WARP_STREAM + 3)))
    torch.testing.assert_close(items[12:18, 3], ref, atol=1e-5, rtol=1e-5)
    assert float((items[:, 0] - items[:, 1]).abs().max()) > 1e-3  # the copies differ
    # a batch equals its episodes one by one, each item one of its own copies, padding zero
    batch = episodes.batch(3, 6)
    from metaformer.data.episodes import EpisodeBatch

    one_by_one = EpisodeBatch.collate([episodes[i] for i in range(3, 9)])
    for name in ("support_x", "query_x", "support_y", "support_mask", "query_mask"):
        torch.testing.assert_close(getattr(batch, name), getattr(one_by_one, name), atol=0, rtol=0)
    assert float(batch.support_x[~batch.support_mask].abs().sum()) == 0.0
    flat = items.reshape(-1, items.shape[-1])
    picked = torch.cat([batch.support_x[batch.support_mask], batch.query_x[batch.query_mask]])
    equal = (picked[:, None, :] == flat[None, :, :]).all(dim=-1)  # [picked, items * copies]
    assert bool((equal.sum(dim=1) == 1).all())  # every item is exactly one cached copy
    match = equal.float().argmax(dim=1)
    assert len(set((match % 4).tolist())) == 4  # and the episodes use all four copies
    plain = EpisodeSampler(episodes.source, 3, (1, 2), 2, seed=5).batch(3, 6)
    assert torch.equal(batch.support_y, plain.support_y)  # the same classes and items as the plain sampler
    plain_rows = (plain.support_x[plain.support_mask][:, None, 0] == items[None, :, 0]).all(dim=-1).float().argmax(dim=1)
    assert torch.equal(match[: int(batch.support_mask.sum())] // 4, plain_rows)


def _augmented_trainer_episodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the trainer draw warped training episodes (and plain evaluation ones) from a small glyph source."""
    from metaformer.data.augment import AffineAugment

    source = glyph_source()

    def fake_build_episodes(cfg, split, data_root=None):  # noqa: ANN001, ANN202
        if split == cfg.data.train_split:
            return _augmented(source, AffineAugment(), cfg.data.k_shot)
        return EpisodeSampler(source, cfg.data.n_way, cfg.data.k_shot, cfg.data.q_query, seed=11)

    monkeypatch.setattr(trainer_mod, "build_episodes", fake_build_episodes)


def test_a_run_on_warped_copies_trains_the_learner_and_resumes_exactly(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from training.feature_cache import ViewSampledEpisodes

    _augmented_trainer_episodes(monkeypatch)
    common = ["train.ckpt_every=2", "optim.warmup_steps=0", "optim.schedule=constant", *FROZEN]
    # warped images and no copies: the trainer trains on images (null) or says how to cache them (true)
    assert Trainer(load_config(TINY, [f"out_dir={tmp_path / 'img'}", *common])).step_model.backbone.__class__.__name__ == "Conv4"
    with pytest.raises(ConfigError, match="augmented.*train.feature_cache_views=V"):
        Trainer(load_config(TINY, [f"out_dir={tmp_path / 'x'}", "train.feature_cache=true", *common]))
    with pytest.raises(ConfigError, match="feature_cache=false contradicts train.feature_cache_views=2"):
        Trainer(load_config(TINY, [f"out_dir={tmp_path / 'y'}", "train.feature_cache=false",
                                   "train.feature_cache_views=2", *common]))
    with pytest.raises(ConfigError, match="feature_cache_views must be >= 0"):
        load_config(TINY, ["train.feature_cache_views=-1"])
    views = [*common, "train.feature_cache_views=3"]
    straight = Trainer(load_config(TINY, [f"out_dir={tmp_path / 'straight'}", "train.steps=4", *views]))
    assert isinstance(straight.train_episodes, ViewSampledEpisodes) and straight.step_model is not straight.model
    backbone0 = {k: v.clone() for k, v in straight.model.backbone.state_dict().items()}
    assert straight.run().step == 4
    assert all(torch.equal(v, backbone0[k]) for k, v in straight.model.backbone.state_dict().items())
    Trainer(load_config(TINY, [f"out_dir={tmp_path / 'split'}", "train.steps=2", *views])).run()
    resumed = Trainer(load_config(TINY, [f"out_dir={tmp_path / 'split'}", "train.steps=4", *views]), resume=True)
    assert resumed.step == 2
    resumed.run()
    a = read_checkpoint(tmp_path / "straight", with_trainer_state=False).model_state
    b = read_checkpoint(tmp_path / "split", with_trainer_state=False).model_state
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the copies reach training: one copy per image (views=1) trains other weights than three
    Trainer(load_config(TINY, [f"out_dir={tmp_path / 'one'}", "train.steps=4", *common, "train.feature_cache_views=1"])).run()
    c = read_checkpoint(tmp_path / "one", with_trainer_state=False).model_state
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # copies of unwarped images would all be equal: refused
    small_source_episodes(monkeypatch)
    with pytest.raises(ConfigError, match="feature_cache_views=3, but .*not warped"):
        Trainer(load_config(TINY, [f"out_dir={tmp_path / 'z'}", *views]))
