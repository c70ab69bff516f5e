"""EpisodeSampler properties: disjointness, balance, relabelling, determinism (also across DataLoader workers)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from metaformer.data import (
    EpisodeBatch,
    EpisodeSampler,
    GlyphFamily,
    SinusoidFamily,
    TensorClassSource,
    TextClassSource,
    episode_loader,
)


def tagged_source(sizes: list[int]) -> TensorClassSource:
    """Items [M, 2] = (class, item id): lets a test trace every episode item back to its origin."""
    labels = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    ids = torch.arange(int(labels.numel()))
    items = torch.stack([labels, ids], 1).to(torch.float64)
    # Shuffle so the source must group by label itself.
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))
    return TensorClassSource(items[perm], labels[perm], [f"c{i}" for i in range(len(sizes))])


def check_episode(ep, n: int, k: int, q: int) -> None:
    """Assert the episode invariants for an N-way K-shot Q-query episode from tagged_source."""
    assert ep.support_y.dtype == torch.int64 and ep.query_y.dtype == torch.int64
    assert torch.equal(ep.support_y, torch.arange(n).repeat_interleave(k))
    assert torch.equal(ep.query_y, torch.arange(n).repeat_interleave(q))
    assert len(set(ep.class_names)) == n
    sx, qx = ep.support_x, ep.query_x
    # Every item of relabelled class j comes from the original class named class_names[j].
    for x, y in ((sx, ep.support_y), (qx, ep.query_y)):
        for item, label in zip(x.tolist(), y.tolist()):
            assert ep.class_names[label] == f"c{int(item[0])}"
    ids_s, ids_q = set(sx[:, 1].tolist()), set(qx[:, 1].tolist())
    assert len(ids_s) == n * k and len(ids_q) == n * q  # no repeats within support / query
    assert not ids_s & ids_q  # support and query disjoint


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(6, 12), min_size=2, max_size=12),
    n=st.integers(1, 12),
    k=st.integers(1, 3),
    q=st.integers(0, 3),
    seed=st.integers(0, 2**40),
    index=st.integers(0, 10**9),
)
def test_sampler_properties(sizes, n, k, q, seed, index):
    n = min(n, len(sizes))
    source = tagged_source(sizes)
    sampler = EpisodeSampler(source, n, k, q, seed=seed)
    ep = sampler[index]
    check_episode(ep, n, k, q)
    again = EpisodeSampler(source, n, k, q, seed=seed)[index]
    assert torch.equal(ep.support_x, again.support_x) and torch.equal(ep.query_x, again.query_x)
    assert ep.class_names == again.class_names


def test_sampler_covers_classes_and_items_uniformly():
    source = tagged_source([6] * 10)
    sampler = EpisodeSampler(source, 3, 1, 1, seed=7)
    class_counts = torch.zeros(10)
    item_counts = torch.zeros(60)
    for i in range(3000):
        ep = sampler[i]
        for x in torch.cat([ep.support_x, ep.query_x]):
            item_counts[int(x[1])] += 1
        for name in ep.class_names:
            class_counts[int(name[1:])] += 1
    # 9000 class draws over 10 classes: expect 900 each; 6 sigma ~ 170.
    assert (class_counts - 900).abs().max() < 170
    # Each item is drawn with prob 2/6 when its class is picked: 300 expected, 6 sigma ~ 100.
    assert (item_counts - 300).abs().max() < 100


def test_seeds_and_indices_give_different_episodes():
    sampler = EpisodeSampler(tagged_source([20] * 50), 5, 1, 5, seed=0)
    other = EpisodeSampler(tagged_source([20] * 50), 5, 1, 5, seed=1)
    eps = [sampler[i].support_x for i in range(20)]
    assert len({tuple(e[:, 1].tolist()) for e in eps}) == 20
    assert not torch.equal(sampler[3].support_x, other[3].support_x)
    assert torch.equal(torch.stack([e for e in eps[:4]]), torch.stack([sampler[i].support_x for i in range(4)]))


def test_iteration_and_batch_match_indexing():
    sampler = EpisodeSampler(tagged_source([8] * 6), 4, 2, 2, seed=3, num_episodes=5)
    listed = list(sampler)
    assert len(listed) == len(sampler) == 5
    batch = sampler.batch(1, 3)
    for t in range(3):
        e = batch.episode(t)
        assert torch.equal(e.support_x, listed[1 + t].support_x)
        assert torch.equal(e.query_y, listed[1 + t].query_y)
    with pytest.raises(IndexError):
        sampler[5]


def test_variable_way_and_shot_are_padded():
    sampler = EpisodeSampler(tagged_source([10] * 12), (2, 6), (1, 3), 2, seed=5)
    batch = sampler.batch(0, 16)
    ways = batch.n_way.tolist()
    assert len(set(ways)) > 1 and min(ways) >= 2 and max(ways) <= 6
    for t in range(16):
        e = sampler[t]
        assert batch.support_mask[t].sum() == e.support_y.numel()
        assert (batch.support_y[t][~batch.support_mask[t]] == -1).all()
        assert (batch.query_y[t][~batch.query_mask[t]] == -1).all()
        assert torch.equal(batch.episode(t).support_x, e.support_x)
        k = e.support_y.numel() // e.n_way
        check_episode(e, e.n_way, k, 2)


def _batches_equal(a: EpisodeBatch, b: EpisodeBatch) -> bool:
    """Byte equality of every tensor field and equal class names."""
    fields = ("support_x", "support_y", "support_mask", "query_x", "query_y", "query_mask", "n_way")
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields) and a.class_names == b.class_names


@pytest.mark.parametrize("kind", ["tagged", "glyph"])
def test_same_batches_for_any_worker_count(kind):
    if kind == "tagged":
        sampler = EpisodeSampler(tagged_source([9] * 30), 5, 2, 3, seed=11)
    else:
        sampler = EpisodeSampler(GlyphFamily("train", seed=2), 5, 1, 2, seed=11)
    runs = {w: list(episode_loader(sampler, tasks_per_batch=3, num_batches=6, num_workers=w)) for w in (0, 1, 2)}
    ref = [sampler.batch(3 * b, 3) for b in range(6)]
    for w, batches in runs.items():
        assert len(batches) == 6
        assert all(_batches_equal(x, y) for x, y in zip(batches, ref)), f"num_workers={w} differs"
    # Workers draw different episodes: no two batches repeat.
    sigs = {batches_sig(b) for b in runs[2]}
    assert len(sigs) == 6


def batches_sig(b: EpisodeBatch) -> bytes:
    """A byte signature of a batch's support images."""
    return b.support_x.numpy().tobytes()


def test_plain_dataloader_with_workers_and_rank_sharding():
    sampler = EpisodeSampler(tagged_source([9] * 30), 5, 1, 2, seed=4, num_episodes=12)
    loader = DataLoader(sampler, batch_size=4, num_workers=2, collate_fn=EpisodeBatch.collate)
    for b, batch in enumerate(loader):
        assert _batches_equal(batch, sampler.batch(4 * b, 4))
    # Two ranks of 2 tasks each cover the same episodes as one process with 4 tasks.
    r0 = list(episode_loader(sampler, 2, num_batches=2, rank=0, world_size=2))
    r1 = list(episode_loader(sampler, 2, num_batches=2, rank=1, world_size=2))
    for b in range(2):
        full = sampler.batch(4 * b, 4)
        assert torch.equal(torch.cat([r0[b].support_x, r1[b].support_x]), full.support_x)


def test_sinusoid_determinism_ranges_and_batches():
    fam = SinusoidFamily(5, 10, seed=3)
    ep = fam[7]
    assert ep.support_x.shape == (5, 1) and ep.query_y.shape == (10, 1) and ep.is_regression and ep.n_way == 0
    amp, ph = fam.task_params(7)
    assert 0.1 <= amp <= 5.0 and 0.0 <= ph <= torch.pi
    x = torch.cat([ep.support_x, ep.query_x])
    assert (x.abs() <= 5).all()
    torch.testing.assert_close(torch.cat([ep.support_y, ep.query_y]), amp * torch.sin(x.double() - ph).float())
    batch = fam.batch(0, 4)
    assert batch.is_regression and batch.support_x.shape == (4, 5, 1) and batch.n_way.tolist() == [0] * 4
    assert torch.equal(batch.episode(2).support_y, fam[2].support_y)
    assert torch.equal(SinusoidFamily(5, 10, seed=3)[7].query_x, ep.query_x)
    amps = torch.tensor([fam.task_params(i)[0] for i in range(2000)])
    assert amps.min() < 0.3 and amps.max() > 4.7  # uniform over [0.1, 5]
    loaded = list(episode_loader(fam, 4, num_batches=3, num_workers=2))
    assert all(_batches_equal(b, fam.batch(4 * i, 4)) for i, b in enumerate(loaded))


def test_glyph_family_splits_determinism_and_range():
    train, val = GlyphFamily("train", seed=0), GlyphFamily("val", seed=0)
    classes, idx = torch.tensor([0, 1, 5]), torch.arange(4).repeat(3, 1)
    a = train.get_items(classes, idx)
    assert a.shape == (3, 4, 1, 28, 28) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1 and a.mean() > 0.02  # strokes are drawn
    assert torch.equal(a, GlyphFamily("train", seed=0).get_items(classes, idx))
    assert not torch.equal(a, val.get_items(classes, idx))  # split changes the classes
    assert not torch.equal(a, GlyphFamily("train", seed=1).get_items(classes, idx))
    # Renderings of one class resemble each other more than renderings of different classes.
    flat = a.flatten(2)
    within = (flat[:, 0] - flat[:, 1]).pow(2).mean()
    across = (flat[0, 0] - flat[1, 0]).pow(2).mean() + (flat[1, 0] - flat[2, 0]).pow(2).mean()
    assert within < across / 2
    assert train.class_name(3) != val.class_name(3)
    ep = EpisodeSampler(train, 5, 1, 3, seed=0)[0]
    assert ep.support_x.shape == (5, 1, 28, 28) and ep.query_x.shape == (15, 1, 28, 28)


def test_text_source_episodes():
    texts = [f"text {c}-{i}" for c in range(4) for i in range(5)]
    labels = [c for c in range(4) for _ in range(5)]
    source = TextClassSource(texts, labels, ["a", "b", "c", "d"])
    ep = EpisodeSampler(source, 3, 2, 2, seed=0)[4]
    assert isinstance(ep.support_x, list) and len(ep.support_x) == 6 and len(ep.query_x) == 6
    for text, y in zip(ep.support_x + ep.query_x, ep.support_y.tolist() + ep.query_y.tolist()):
        assert "abcd"[int(text.split()[1].split("-")[0])] == ep.class_names[y]
    assert not set(ep.support_x) & set(ep.query_x)
    batch = EpisodeSampler(source, (2, 3), 1, 1, seed=0).batch(0, 6)
    assert isinstance(batch.support_x, list) and all(len(r) == batch.support_mask.shape[1] for r in batch.support_x)
    assert batch.episode(0).support_x == EpisodeSampler(source, (2, 3), 1, 1, seed=0)[0].support_x


def test_episode_to_device_and_validation():
    ep = EpisodeSampler(tagged_source([5] * 3), 2, 1, 1)[0]
    moved = ep.to("cpu")
    assert torch.equal(moved.support_x, ep.support_x) and moved.class_names == ep.class_names
    b = EpisodeBatch.collate([ep, ep]).to("meta")
    assert b.support_x.device.type == "meta" and b.support_mask.device.type == "meta"
    with pytest.raises(ValueError, match="one label per support item"):
        type(ep)(ep.support_x, ep.support_y[:1], ep.query_x, ep.query_y, ep.class_names)
    with pytest.raises(ValueError, match="at least one Episode"):
        EpisodeBatch.collate([])


def test_bad_sampler_inputs():
    source = tagged_source([6, 6, 2, 6])
    with pytest.raises(ValueError, match=r"n_way=5 .* only 4 classes"):
        EpisodeSampler(tagged_source([6] * 4), 5, 1, 1)
    with pytest.raises(ValueError, match=r"'c2' \(2 items\).*on_small_class='drop'"):
        EpisodeSampler(source, 2, 2, 2)
    with pytest.warns(UserWarning, match=r"dropping 1 of 4 classes.*'c2'"):
        sampler = EpisodeSampler(source, 3, 2, 2, on_small_class="drop")
    assert sampler.num_eligible == 3
    assert all("c2" not in sampler[i].class_names for i in range(50))
    with pytest.raises(ValueError, match="n_way=4 but the source has only 3 classes"):
        with pytest.warns(UserWarning):
            EpisodeSampler(source, 4, 2, 2, on_small_class="drop")
    with pytest.raises(ValueError, match="q_query"):
        EpisodeSampler(source, 2, 1, -1)
    with pytest.raises(ValueError, match="k_shot"):
        EpisodeSampler(source, 2, 0, 1)
    with pytest.raises(ValueError, match="empty"):
        TensorClassSource(torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.int64))


def test_fast_batch_path_equals_collated_episodes():
    images = torch.randint(0, 256, (7 * 9, 1, 5, 5), dtype=torch.uint8)
    source = TensorClassSource(images, torch.arange(7).repeat(9))
    sampler = EpisodeSampler(source, 4, 2, 3, seed=9)
    fast = sampler.batch(5, 6)
    slow = EpisodeBatch.collate([sampler[i] for i in range(5, 11)])
    assert _batches_equal(fast, slow)
    # Items are the stored bytes of the planned (class, item), scaled to [0, 1].
    classes, items, k = sampler.episode_plan(5)
    row = int(source.offsets[classes[1]] + items[1, 1])  # class 1's second support item
    torch.testing.assert_close(fast.support_x[0, 1 * k + 1], source.items[row].float() / 255)
    assert fast.class_names[0] == [source.class_name(int(c)) for c in classes]
    glyphs = EpisodeSampler(GlyphFamily("val", seed=3), 3, 1, 2, seed=1)
    assert _batches_equal(glyphs.batch(4, 3), EpisodeBatch.collate([glyphs[i] for i in range(4, 7)]))


def test_rotation_views_agree_with_materialised_rotations():
    from metaformer.data import RotatedClasses, with_rotations

    images = torch.randint(0, 256, (3 * 4, 1, 6, 6), dtype=torch.uint8)
    source = TensorClassSource(images, torch.arange(3).repeat_interleave(4), ["a", "b", "c"], groups=["g", "g", "h"])
    eager = with_rotations(source)
    lazy = RotatedClasses(source.subset([0, 1, 2]))
    assert eager.class_names == lazy.class_names and eager.groups == lazy.groups == ["g"] * 8 + ["h"] * 4
    classes, idx = torch.arange(12), torch.arange(4).repeat(12, 1)
    assert torch.equal(eager.get_items(classes, idx), lazy.get_items(classes, idx))
    x = eager.get_items(torch.tensor([4, 5, 6, 7]), torch.arange(4).repeat(4, 1))  # class "b", 4 angles
    for r in range(4):
        assert torch.equal(x[r], torch.rot90(x[0], r, dims=(-2, -1)))
    assert eager.class_name(6) == "b/rot180"
    with pytest.raises(ValueError, match="angles"):
        with_rotations(source, (0, 45))
    text = TextClassSource(["x", "y"], [0, 1])
    with pytest.raises(ValueError, match="text cannot be rotated"):
        with_rotations(text)
