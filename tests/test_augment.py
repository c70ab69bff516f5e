"""Random affine training warps: the warp itself, episodes that stay a pure function of their index, and
Omniglot configs that warp the training split only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metaformer.data.augment import AffineAugment, AugmentedEpisodes, random_affine
from metaformer.data.episodes import EpisodeBatch
from metaformer.data.sampler import EpisodeSampler
from metaformer.data.source import TensorClassSource
from metaformer.models.meta_transformer import MetaTransformer, MetaTransformerConfig
from training.config import ConfigError, load_config
from training.feature_cache import cache_blocker
from training.registry import build_episodes

REPO = Path(__file__).resolve().parents[1]
PROTONET = REPO / "training" / "configs" / "omniglot_5w1s_protonet.yaml"


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_zero_ranges_leave_images_unchanged() -> None:
    x = _images(6)
    out = random_affine(x, AffineAugment(rotate=0, scale=0, shift=0), torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


def test_shift_moves_a_dot_by_at_most_the_range_and_keeps_its_ink() -> None:
    x = torch.zeros(200, 1, 20, 20)
    x[:, 0, 10, 10] = 1.0
    out = random_affine(x, AffineAugment(rotate=0, scale=0, shift=0.1), torch.Generator().manual_seed(3))
    ys, xs = torch.arange(20.0).view(1, 20, 1), torch.arange(20.0).view(1, 1, 20)
    mass = out[:, 0].sum((1, 2))
    cy, cx = (out[:, 0] * ys).sum((1, 2)) / mass, (out[:, 0] * xs).sum((1, 2)) / mass
    torch.testing.assert_close(mass, torch.ones(200), atol=1e-4, rtol=0)  # bilinear: ink spreads, none is lost
    assert float((cy - 10).abs().max()) <= 2.0 + 1e-4 and float((cx - 10).abs().max()) <= 2.0 + 1e-4  # 0.1 * 20 px
    assert float((cx - 10).abs().max()) > 1.5  # and it does move, close to the full range over 200 draws


def test_rotation_by_the_full_range_turns_the_image() -> None:
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 2:19] = 1.0  # a horizontal bar through the centre
    gen = torch.Generator().manual_seed(0)
    out = random_affine(x.expand(400, 1, 21, 21).contiguous(), AffineAugment(rotate=90, scale=0, shift=0), gen)
    # the bar's ink in the middle row shrinks the more it turns; over 400 draws some turn by more than 60 degrees
    assert float(out[:, 0, 10].sum(-1).min()) < 0.5 * float(x[0, 0, 10].sum())
    # bilinear resampling of a one-pixel line at oblique angles keeps its ink only roughly
    torch.testing.assert_close(out.sum((1, 2, 3)), x.sum().expand(400), rtol=0.15, atol=0)


def _sampler(shots: int | tuple[int, int] = 2) -> EpisodeSampler:
    src = TensorClassSource(_images(12 * 8), torch.arange(12).repeat_interleave(8), [f"c{i}" for i in range(12)])
    return EpisodeSampler(src, 4, shots, 3, seed=5)


@pytest.mark.parametrize("shots", [2, (1, 3)])
def test_a_batch_equals_its_episodes_warped_one_by_one(shots: int | tuple[int, int]) -> None:
    plain = _sampler(shots)
    aug = AugmentedEpisodes(plain, AffineAugment(), seed=11)
    batch = aug.batch(7, 4)
    one_by_one = EpisodeBatch.collate([aug[i] for i in range(7, 11)])
    for name in ("support_x", "query_x", "support_y", "query_y", "support_mask", "query_mask"):
        torch.testing.assert_close(getattr(batch, name), getattr(one_by_one, name), atol=1e-6, rtol=0)
    ref = plain.batch(7, 4)
    assert torch.equal(batch.support_y, ref.support_y) and torch.equal(batch.query_mask, ref.query_mask)
    assert not torch.allclose(batch.support_x, ref.support_x)  # the images are warped
    # the padding of mixed-shot tasks stays zero
    assert float(batch.support_x[~batch.support_mask].abs().sum()) == 0.0
    # a pure function of (seed, index): the same again, another seed gives other warps
    torch.testing.assert_close(aug.batch(7, 4).support_x, batch.support_x, atol=0, rtol=0)
    other = AugmentedEpisodes(plain, AffineAugment(), seed=12).batch(7, 4)
    assert not torch.allclose(other.support_x, batch.support_x)
    # the same images in two episodes get different warps
    imgs = _images(5)
    assert not torch.allclose(aug._map(7, imgs, imgs[:0])[0], aug._map(8, imgs, imgs[:0])[0])


def test_bad_options_name_the_problem() -> None:
    assert AffineAugment.from_option(False) is None and AffineAugment.from_option(True) == AffineAugment()
    assert AffineAugment.from_option({"rotate": 5}) == AffineAugment(rotate=5.0)
    with pytest.raises(ValueError, match=r"unknown train_augment keys \['rotation'\]"):
        AffineAugment.from_option({"rotation": 5})
    with pytest.raises(ValueError, match="out of bounds"):
        AffineAugment.from_option({"scale": 1.5})
    with pytest.raises(ValueError, match="true, false or a mapping"):
        AffineAugment.from_option("yes")


def _data_root() -> Path:
    root = Path(os.environ.get("METAFORMER_DATA_ROOT", REPO.parent / "shared" / "data"))
    assert (root / "omniglot" / "images_background.zip").is_file(), f"Omniglot not found under {root}"
    return root


def test_omniglot_train_augment_warps_the_training_split_only() -> None:
    over = [f"data.root={_data_root()}"]
    plain_cfg = load_config(PROTONET, [*over, "data.options={split_scheme: alphabets}"])
    cfg = load_config(PROTONET, [*over, "data.options={split_scheme: alphabets, train_augment: {rotate: 5, shift: 0, scale: 0}}"])
    train, plain = build_episodes(cfg, cfg.data.train_split), build_episodes(plain_cfg, plain_cfg.data.train_split)
    assert isinstance(train, AugmentedEpisodes) and train.aug == AffineAugment(rotate=5.0, shift=0.0, scale=0.0)
    a, b = train.batch(3, 2), plain.batch(3, 2)
    assert torch.equal(a.support_y, b.support_y) and not torch.allclose(a.support_x, b.support_x)
    # the same characters, turned a little: each warped image is nearest its own original
    d = torch.cdist(a.query_x.flatten(2)[0], b.query_x.flatten(2)[0])
    assert bool((d.argmin(-1) == torch.arange(d.shape[0])).float().mean() > 0.9)
    for part in ("val", "test"):  # held-out episodes are never warped
        ev = build_episodes(cfg, part)
        assert not isinstance(ev, AugmentedEpisodes)
        assert torch.equal(ev.batch(0, 1).query_x, build_episodes(plain_cfg, part).batch(0, 1).query_x)
    bad = load_config(PROTONET, [*over, "data.options={split_scheme: alphabets, train_augment: {shear: 0.1}}"])
    with pytest.raises(ConfigError, match=r"data.options.train_augment: unknown train_augment keys \['shear'\]"):
        build_episodes(bad, "test")
    # a frozen backbone cannot train on cached features of warped images: it says why
    model = MetaTransformer(MetaTransformerConfig(backbone="conv4", max_way=5, freeze_backbone=True))
    assert "augmented" in cache_blocker(model, train, 1) and cache_blocker(model, plain, 1) is None


def test_an_augmented_omniglot_run_resumes_exactly(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from training import checkpoint as ckpt_io
    from training.trainer import train

    sets = [f"data.root={_data_root()}", "data.options={split_scheme: alphabets, train_augment: true}",
            "train.steps=4", "train.ckpt_every=2", "train.val_every=0", "train.meta_batch=2", "data.q_query=2",
            "train.progress=false", "train.tensorboard=false", "train.num_threads=1", "optim.warmup_steps=0",
            "optim.schedule=constant"]  # the first part stops at step 2 of the same constant schedule
    whole = train(load_config(PROTONET, [*sets, f"out_dir={tmp_path / 'whole'}"]))
    assert whole.step == 4
    part = tmp_path / "part"
    train(load_config(PROTONET, [*sets, f"out_dir={part}", "train.steps=2"]))
    train(load_config(PROTONET, [*sets, f"out_dir={part}"]), resume=True)
    a = load_file(str(ckpt_io.list_checkpoints(tmp_path / "whole")[-1] / ckpt_io.WEIGHTS_FILE))
    b = load_file(str(ckpt_io.list_checkpoints(part)[-1] / ckpt_io.WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the warps reach training: without them the same steps give other weights
    plain = train(load_config(PROTONET, [*sets[:1], "data.options={split_scheme: alphabets}", *sets[2:],
                                         f"out_dir={tmp_path / 'plain'}"]))
    c = load_file(str(ckpt_io.list_checkpoints(tmp_path / "plain")[-1] / ckpt_io.WEIGHTS_FILE))
    assert plain.step == 4 and not all(torch.equal(a[k], c[k]) for k in a)
