"""Image folders, Lake runs, JSONL / CLINC150 text and the Hugging Face datasets path, with their bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from metaformer.data import (
    EpisodeSampler,
    clinc150_source,
    hf_class_source,
    image_folder_source,
    jsonl_text_source,
    lake_runs,
    load_hf_source,
    split_by_class,
    split_by_group,
)
from metaformer.data.source import TensorClassSource, TextClassSource

COLORS = {"ant": (250, 0, 0), "bee": (0, 200, 0), "cow": (0, 0, 150)}


def text_root() -> Path:
    """../shared/data/text from the repo root (or $METAFORMER_DATA_ROOT/text); fail (never skip) when missing."""
    root = Path(os.environ.get("METAFORMER_DATA_ROOT") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
    if not (root / "text" / "clinc150" / "data_full.json").is_file():
        pytest.fail(f"real data missing: {root}/text/clinc150/data_full.json; set METAFORMER_DATA_ROOT to the shared data folder")
    return root / "text"


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    """3 classes x 4 RGB 8x8 images; each image is its class colour with a brightness step per item."""
    root = tmp_path / "imgs"
    for name, rgb in COLORS.items():
        (root / name).mkdir(parents=True)
        for i in range(4):
            px = np.broadcast_to(np.array(rgb, np.uint8), (8, 8, 3)).copy()
            px[0, 0] = i  # item id, readable back from the tensor
            Image.fromarray(px).save(root / name / f"{i}.png")
    return root


def check_folder_source(source) -> None:
    """The fixture folder decoded exactly: class names, colours, item ids."""
    assert source.class_names == sorted(COLORS) and (source.class_sizes == 4).all()
    assert source.item_shape == (3, 8, 8)
    for c, name in enumerate(source.class_names):
        x = source.get_items(torch.tensor([c]), torch.arange(4)[None])[0]
        expected = torch.tensor(COLORS[name], dtype=torch.float32) / 255
        torch.testing.assert_close(x[:, :, 4, 4], expected.expand(4, 3))
        assert sorted((x[:, 0, 0, 0] * 255).round().tolist()) == [0, 1, 2, 3]


def test_image_folder_native_and_hf_imagefolder(image_folder, tmp_path):
    native = image_folder_source(image_folder)
    check_folder_source(native)
    hf = load_hf_source("imagefolder", data_dir=str(image_folder), cache_dir=str(tmp_path / "hf"))
    check_folder_source(hf)
    ep = EpisodeSampler(hf, 3, 1, 3, seed=0)[0]
    assert ep.support_x.shape == (3, 3, 8, 8) and ep.query_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    small = image_folder_source(image_folder, image_size=4, mode="L")
    assert small.item_shape == (1, 4, 4)


def test_image_folder_bad_inputs(image_folder, tmp_path):
    (image_folder / "bee" / "2.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"cannot read image .*bee/2\.png"):
        image_folder_source(image_folder)
    with pytest.raises(ValueError, match=r"bee/2\.png"):
        load_hf_source("imagefolder", data_dir=str(image_folder), cache_dir=str(tmp_path / "hf"))
    (image_folder / "bee" / "2.png").unlink()
    Image.new("RGB", (9, 8)).save(image_folder / "bee" / "9.png")
    with pytest.raises(ValueError, match=r"bee/9\.png has shape .*image_size="):
        image_folder_source(image_folder)
    assert image_folder_source(image_folder, image_size=8).class_sizes.tolist() == [4, 4, 4]
    (image_folder / "cow" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"notes\.txt is not an image file"):
        image_folder_source(image_folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        image_folder_source(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="data_dir .* does not exist"):
        load_hf_source("imagefolder", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="empty data set"):
        load_hf_source("imagefolder", data_dir=str(tmp_path / "empty"), cache_dir=str(tmp_path / "hf"))


def _drawing(k: int) -> Image.Image:
    """A 105x105 black-on-white drawing unique to k."""
    img = Image.new("L", (105, 105), 255)
    ImageDraw.Draw(img).rectangle([5 + 4 * k, 10, 20 + 4 * k, 60 + k], fill=0)
    return img


def test_lake_runs_fixture(tmp_path):
    root = tmp_path / "all_runs"
    perms = {1: [2, 0, 1, 3], 2: [3, 3, 1, 0, 2]}
    for r, perm in perms.items():
        run = root / f"run{r:02d}"
        (run / "training").mkdir(parents=True)
        (run / "test").mkdir()
        for c in range(4):
            _drawing(10 * r + c).save(run / "training" / f"class{c + 1:02d}.png")
        lines = []
        for i, c in enumerate(perm):
            _drawing(10 * r + c).save(run / "test" / f"item{i + 1:02d}.png")
            lines.append(f"run{r:02d}/test/item{i + 1:02d}.png run{r:02d}/training/class{c + 1:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")
    episodes = lake_runs(root)
    assert len(episodes) == 2
    for ep, perm in zip(episodes, perms.values()):
        assert ep.n_way == 4 and ep.support_x.shape == (4, 1, 28, 28) and ep.support_y.tolist() == [0, 1, 2, 3]
        assert ep.query_y.tolist() == perm
        # Each query is the same drawing as its class's training image (strokes = 1, background 0).
        assert torch.equal(ep.query_x, ep.support_x[ep.query_y])
        assert ep.support_x.max() == 1.0 and ep.support_x[..., -1, :].max() == 0.0
    assert episodes[0].class_names[0] == "run01/class01"
    (root / "run02" / "class_labels.txt").write_text("run02/test/item01.png run02/training/class09.png\n")
    with pytest.raises(ValueError, match=r"class09\.png not found"):
        lake_runs(root)
    (root / "run02" / "class_labels.txt").unlink()
    with pytest.raises(FileNotFoundError, match="class_labels.txt is missing"):
        lake_runs(root)


def test_jsonl_text_and_huffpost(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"text": f"about {lab} #{i}", "label": lab} for lab in ("sport", "food", "art") for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    source = jsonl_text_source(path)
    assert source.class_names == ["art", "food", "sport"] and (source.class_sizes == 5).all()
    ep = EpisodeSampler(source, 3, 2, 3, seed=1)[0]
    for text, y in zip(ep.query_x, ep.query_y.tolist()):
        assert text.split()[1] == ep.class_names[y]
    hf = load_hf_source("json", data_files=str(path), input_column="text", cache_dir=str(tmp_path / "hf"))
    assert hf.class_names == source.class_names and hf.texts == source.texts
    huff = jsonl_text_source(text_root() / "ds_text_fsl" / "huffpost.json")
    assert huff.num_classes == 41 and (huff.class_sizes == 900).all()
    parts = split_by_class(huff, {"train": range(20), "val": range(20, 25), "test": range(25, 41)})
    assert [p.num_classes for p in parts.values()] == [20, 5, 16]
    assert parts["val"].class_names == ["20", "21", "22", "23", "24"]


def test_clinc150_native_and_hf(tmp_path):
    path = text_root() / "clinc150" / "data_full.json"
    train = clinc150_source(path)
    assert train.num_classes == 150 and (train.class_sizes == 100).all()
    assert len(set(train.groups)) == 10 and train.groups[train.class_names.index("freeze_account")] == "banking"
    val = clinc150_source(path, "val", include_oos=True)
    assert val.num_classes == 151 and int(val.class_sizes[val.class_names.index("oos")]) == 100
    assert (clinc150_source(path, "test").class_sizes == 30).all()
    by_domain = split_by_group(train, {"train": 7, "val": 3}, seed=0)
    assert by_domain["train"].num_classes == 105 and by_domain["val"].num_classes == 45
    raw = json.loads(path.read_text())["train"]
    ds = datasets.Dataset.from_dict({"text": [r[0] for r in raw], "intent": [r[1] for r in raw]})
    hf = hf_class_source(ds, label_column="intent")
    assert hf.class_names == train.class_names and torch.equal(hf.class_sizes, train.class_sizes)
    assert sorted(hf.texts) == sorted(train.texts)
    ep = EpisodeSampler(hf, 5, 1, 2, seed=0)[3]
    want = {(t, i) for t, i in raw}
    for text, y in zip(ep.support_x + ep.query_x, ep.support_y.tolist() + ep.query_y.tolist()):
        assert (text, ep.class_names[y]) in want
    # Parquet round trip through the local builder gives the same source.
    pq = tmp_path / "clinc.parquet"
    ds.to_parquet(str(pq))
    from_pq = load_hf_source("parquet", data_files=str(pq), label_column="intent", cache_dir=str(tmp_path / "hf"))
    assert from_pq.texts == hf.texts


def test_text_and_hf_bad_inputs(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"label column 'intent' does not exist; columns are \['text', 'label'\]"):
        hf_class_source(ds, "text", "intent")
    with pytest.raises(ValueError, match="empty"):
        hf_class_source(ds.select([]), "text", "label")
    with pytest.raises(ValueError, match="DatasetDict"):
        hf_class_source(datasets.DatasetDict({"train": ds}), "text")
    with pytest.raises(ValueError, match="missing labels at rows \\[1\\]"):
        hf_class_source(datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["x", None]}), "text")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'label' is missing"):
        jsonl_text_source(path)
    path.write_text('{"text": "a", "label": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        jsonl_text_source(path)
    path.write_text("")
    with pytest.raises(ValueError, match="empty"):
        jsonl_text_source(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        jsonl_text_source(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="no split 'dev'"):
        clinc150_source(text_root() / "clinc150", "dev")


def test_importing_the_library_does_not_load_pil() -> None:
    """PIL is imported where an image is decoded, not by ``import metaformer`` (its ~2 MiB count in every
    process, the meta-training benchmark's peak memory included)."""
    import subprocess
    import sys

    code = ("import sys, metaformer, metaformer.data, metaformer.heads, metaformer.models, metaformer.ops; "
            "assert 'PIL' not in sys.modules, sorted(m for m in sys.modules if m.startswith('PIL'))")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("make", ["tensor", "text"])
def test_class_sources_name_bad_labels(make: str) -> None:
    """Negative, 2-D or miscounted labels and a wrong number of groups get an error naming the problem (both sources)."""

    def build(labels, groups=None):
        if make == "tensor":
            return TensorClassSource(torch.zeros(len(labels), 1, 2, 2), torch.as_tensor(labels), groups=groups)
        return TextClassSource([f"t{i}" for i in range(len(labels))], torch.as_tensor(labels), groups=groups)

    with pytest.raises(ValueError, match="labels must be >= 0, got -1"):
        build([0, -1])
    with pytest.raises(ValueError, match=r"labels must be 1-D .*shape \(2, 1\)"):
        build([[0], [1]])
    with pytest.raises(ValueError, match="3 group names for 2 classes"):
        build([0, 1], groups=["a", "b", "c"])
    src = build([1, 0, 1], groups=["a", "b"])
    assert src.sizes.tolist() == [1, 2] and src.num_classes == 2
    item_word = "item" if make == "tensor" else "text"
    with pytest.raises(ValueError, match=f"2 {item_word}s but 3 labels"):
        if make == "tensor":
            TensorClassSource(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1, 1]))
        else:
            TextClassSource(["a", "b"], [0, 1, 1])
