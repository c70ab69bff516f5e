"""Omniglot from the official zips: counts, preprocessing, rotations, splits, cache, Vinyals split, errors."""

from __future__ import annotations

import io
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from metaformer.data import (
    EpisodeSampler,
    load_omniglot,
    omniglot_alphabet_split,
    omniglot_vinyals_split,
    with_rotations,
)
from metaformer.data.images import decode_stroke_image
from metaformer.data.omniglot import read_split_file


def data_root() -> Path:
    """../shared/data from the repo root, or $METAFORMER_DATA_ROOT; fail (never skip) when missing."""
    root = Path(os.environ.get("METAFORMER_DATA_ROOT") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
    if not (root / "omniglot" / "images_background.zip").is_file():
        pytest.fail(f"real data missing: {root}/omniglot/images_background.zip; set METAFORMER_DATA_ROOT to the shared data folder")
    return root


@pytest.fixture(scope="session")
def background():
    """Omniglot background set, decoded once (cached in the user cache dir across sessions)."""
    return load_omniglot(data_root(), download=False)


def test_background_counts_and_preprocessing(background):
    assert background.num_classes == 964
    assert background.items.shape == (19280, 1, 28, 28) and background.items.dtype == torch.uint8
    assert (background.class_sizes == 20).all()
    groups = background.groups
    assert len(set(groups)) == 30
    assert groups.count("Latin") == 26 and groups.count("Greek") == 24
    assert background.class_name(0) == "Alphabet_of_the_Magi/character01"
    # Strokes are 1 on a 0 background: mostly dark pixels, some fully lit.
    x = background.get_items(torch.tensor([0, 500]), torch.arange(20).repeat(2, 1))
    assert x.dtype == torch.float32 and x.min() == 0.0 and x.max() > 0.95
    assert 0.03 < x.mean() < 0.3
    assert (x[..., 0, :] < 0.1).float().mean() > 0.9  # image border is background


def test_cached_load_is_fast(background):
    t0 = time.perf_counter()
    again = load_omniglot(data_root(), download=False)
    assert time.perf_counter() - t0 < 1.0
    assert torch.equal(again.items, background.items) and again.class_names == background.class_names


def test_rotations_alphabet_split_and_episodes(background):
    rot = with_rotations(background)
    assert rot.num_classes == 4 * 964 and (rot.class_sizes == 20).all()
    assert rot.class_name(5) == "Alphabet_of_the_Magi/character02/rot090"
    base = background.get_items(torch.tensor([1]), torch.arange(20)[None])
    for r in range(4):
        got = rot.get_items(torch.tensor([4 + r]), torch.arange(20)[None])
        assert torch.equal(got, torch.rot90(base, r, dims=(-2, -1)))
    parts = omniglot_alphabet_split(rot)
    train_groups, val_groups = set(parts["train"].groups), set(parts["val"].groups)
    assert len(train_groups) == 25 and len(val_groups) == 5 and not train_groups & val_groups
    assert parts["train"].num_classes + parts["val"].num_classes == 3856
    ep = EpisodeSampler(parts["val"], 5, 1, 15, seed=0)[0]
    assert ep.support_x.shape == (5, 1, 28, 28) and ep.query_x.shape == (75, 1, 28, 28)
    assert {n.split("/")[0] for n in ep.class_names} <= val_groups


def _glyph_png(alpha: int, char: int, drawing: int, corrupt: bool = False) -> bytes:
    """A 105x105 black-on-white asymmetric drawing that identifies (alphabet, character)."""
    if corrupt:
        return b"\x89PNG not really"
    img = Image.new("1", (105, 105), 1)
    d = ImageDraw.Draw(img)
    d.rectangle([5 + 10 * char, 5 + 10 * alpha, 30 + 10 * char, 15 + 10 * alpha], fill=0)
    d.line([(60, 60 + drawing), (100, 90)], fill=0, width=3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_zip(folder: Path, image_set: str, alphabets: dict[str, int], drawings: int = 3, corrupt: str = "") -> Path:
    """An Omniglot-layout zip: images_<set>/<Alphabet>/characterNN/NNNN_DD.png."""
    path = folder / f"images_{image_set}.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for a, (alpha, n_chars) in enumerate(alphabets.items()):
            for c in range(1, n_chars + 1):
                for d in range(1, drawings + 1):
                    member = f"images_{image_set}/{alpha}/character{c:02d}/{a:02d}{c:02d}_{d:02d}.png"
                    zf.writestr(member, _glyph_png(a, c, d, corrupt=member.endswith(corrupt) and bool(corrupt)))
    return path


def test_vinyals_split_on_fixture(tmp_path):
    root = tmp_path / "data" / "omniglot"
    root.mkdir(parents=True)
    make_zip(root, "background", {"Alpha": 2, "Beta": 1})
    make_zip(root, "evaluation", {"Gamma": 2})
    split_dir = root / "splits" / "vinyals"
    split_dir.mkdir(parents=True)
    train = [f"{a}/character{c:02d}/rot{r:03d}" for a, c in (("Alpha", 1), ("Gamma", 2)) for r in (0, 90, 180, 270)]
    test = [f"Beta/character01/rot{r:03d}" for r in (0, 90, 180, 270)] + ["Alpha/character02/rot180"]
    (split_dir / "train.txt").write_text("\n".join(train) + "\n")
    (split_dir / "test.txt").write_text("\n".join(test) + "\n")
    cache = tmp_path / "cache"
    part = omniglot_vinyals_split(tmp_path / "data", "train", cache_dir=cache, download=False)
    assert part.class_names == train and part.groups == ["Alpha"] * 4 + ["Gamma"] * 4
    assert (part.class_sizes == 3).all()
    x0 = part.get_items(torch.tensor([4]), torch.arange(3)[None])
    x90 = part.get_items(torch.tensor([5]), torch.arange(3)[None])
    assert torch.equal(x90, torch.rot90(x0, 1, dims=(-2, -1))) and not torch.equal(x90, x0)
    test_part = omniglot_vinyals_split(tmp_path / "data", "test", cache_dir=cache, download=False)
    assert test_part.num_classes == 5 and read_split_file(split_dir / "test.txt") == test
    assert not set(test_part.class_names) & set(part.class_names)
    # Our rot090 class equals the drawing rotated by PIL's rotate(90) (counter-clockwise), then preprocessed.
    member = "images_evaluation/Gamma/character02/0002_01.png"
    pil = Image.open(io.BytesIO(zipfile.ZipFile(root / "images_evaluation.zip").read(member))).convert("L")
    buf = io.BytesIO()
    pil.rotate(90).save(buf, format="PNG")
    expected = torch.from_numpy(decode_stroke_image(buf.getvalue(), "rotated", 28).copy()).float() / 255
    got = part.get_items(torch.tensor([5]), torch.arange(1)[None])[0, 0]
    # Resizing does not commute exactly with rotation (105 -> 28), so compare with a tolerance that
    # the wrong direction (rot270) clearly exceeds.
    assert (got - expected).abs().max() < 0.1
    assert (torch.rot90(got, 2, dims=(-2, -1)) - expected).abs().max() > 0.5
    ep = EpisodeSampler(part, 8, 1, 2, seed=0)[0]
    assert sorted(ep.class_names) == sorted(train)
    (split_dir / "val.txt").write_text("Alpha/character09/rot000\n")
    with pytest.raises(ValueError, match=r"not in the Omniglot zips .*Alpha/character09/rot000"):
        omniglot_vinyals_split(tmp_path / "data", "val", cache_dir=cache, download=False)


def test_decode_once_then_cache(tmp_path):
    folder = tmp_path / "omniglot"
    folder.mkdir()
    zip_path = make_zip(folder, "background_small1", {"Alpha": 3, "Beta": 2}, drawings=4)
    cache = tmp_path / "cache"
    first = load_omniglot(tmp_path, sets="background_small1", cache_dir=cache, download=False)
    files = list((cache / "omniglot").glob("*.npz"))
    assert len(files) == 1 and first.num_classes == 5 and first.items.shape == (20, 1, 28, 28)
    zip_path.unlink()  # the cache key includes the zip, so keep a copy with a new mtime instead
    make_zip(folder, "background_small1", {"Alpha": 3, "Beta": 2}, drawings=4)
    os.utime(folder / "images_background_small1.zip", ns=(1, 1))
    second = load_omniglot(tmp_path, sets="background_small1", cache_dir=cache, download=False)
    assert len(list((cache / "omniglot").glob("*.npz"))) == 2  # changed mtime -> decoded again
    t0 = time.perf_counter()
    third = load_omniglot(tmp_path, sets="background_small1", cache_dir=cache, download=False)
    assert time.perf_counter() - t0 < 1.0
    assert torch.equal(third.items, second.items) and torch.equal(first.items, second.items)


def test_missing_zip_and_failed_download_name_data_root(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"images_background\.zip not found .*--data-root"):
        load_omniglot(tmp_path, cache_dir=tmp_path / "c", download=False)
    with pytest.raises(FileNotFoundError, match=r"downloading it from http://127\.0\.0\.1:9/.*--data-root"):
        load_omniglot(tmp_path, cache_dir=tmp_path / "c", download=True, url="http://127.0.0.1:9/{name}")
    assert not list(tmp_path.rglob("*.part"))  # no half-downloaded file left behind
    monkeypatch.delenv("METAFORMER_DATA_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="--data-root"):
        load_omniglot(None, download=False)


def test_corrupt_image_names_the_file(tmp_path):
    make_zip(tmp_path, "evaluation", {"Alpha": 2}, corrupt="character02/0002_02.png")
    with pytest.raises(ValueError, match=r"images_evaluation/Alpha/character02/0002_02\.png in .*images_evaluation\.zip"):
        load_omniglot(tmp_path, sets=["evaluation"], cache_dir=tmp_path / "c", download=False)


def test_overlapping_sets_and_bad_arguments(tmp_path):
    make_zip(tmp_path, "background_small1", {"Greek": 1, "Latin": 1})
    make_zip(tmp_path, "background_small2", {"Latin": 1})
    with pytest.raises(ValueError, match="share characters"):
        load_omniglot(tmp_path, sets=("background_small1", "background_small2"), cache_dir=tmp_path / "c", download=False)
    with pytest.raises(ValueError, match="unknown Omniglot set"):
        load_omniglot(tmp_path, sets=("images",), cache_dir=tmp_path / "c", download=False)
    with pytest.raises(ValueError, match="part must be"):
        omniglot_vinyals_split(tmp_path, "dev")
