"""`metaformer predict` / FewShotPredictor on `metaformer train` checkpoints: run, step and export folders and the
shipped Omniglot model; image files preprocessed exactly as in training; refusals of non-image checkpoints."""

from __future__ import annotations

import csv
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from metaformer.cli import main
from metaformer.data import GlyphFamily
from metaformer.data.episodes import EpisodeBatch
from metaformer.inference import FewShotPredictor, ImagePreprocessing, TrainedFewShotModel, load_image_files
from training.checkpoint import export_checkpoint, list_checkpoints, read_checkpoint, save_checkpoint
from training.config import load_config
from training.eval_cli import load_model
from training.evaluation import predict as model_logits
from training.registry import build_episodes, build_model
from training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"
SINUSOID = REPO / "training" / "configs" / "sinusoid.yaml"
PRETRAINED = REPO / "pretrained" / "omniglot_meta_transformer"


def _data_root() -> Path:
    root = Path(os.environ.get("METAFORMER_DATA_ROOT", REPO.parent / "shared" / "data"))
    assert (root / "omniglot" / "images_background.zip").is_file(), f"Omniglot not found under {root}"
    return root


def _zip_members(character: str) -> list[str]:
    """The drawings of one 'Alphabet/characterNN' in the background zip, sorted as the loader sorts them."""
    with zipfile.ZipFile(_data_root() / "omniglot" / "images_background.zip") as zf:
        return sorted(n for n in zf.namelist() if n.startswith(f"images_background/{character}/") and n.endswith(".png"))


def _extract(members: list[str], folder: Path) -> list[Path]:
    """Write zip members as files into ``folder`` (their own names)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with zipfile.ZipFile(_data_root() / "omniglot" / "images_background.zip") as zf:
        for m in members:
            path = folder / Path(m).name
            path.write_bytes(zf.read(m))
            out.append(path)
    return out


# ---------------------------------------------------------------- (a) preprocessing == the training pipeline
def test_an_omniglot_file_gives_exactly_the_training_tensor(tmp_path: Path) -> None:
    cfg = read_checkpoint(PRETRAINED, with_trainer_state=False).config
    prep = ImagePreprocessing.from_config(cfg)
    assert (prep.source, prep.image_size, prep.num_channels) == ("omniglot", 28, 1)
    # the shipped model's own test split (held-out alphabets, rotations as classes) as the trainer builds it
    source = build_episodes(cfg, cfg.eval.split, str(_data_root())).source
    names = source.class_names
    for character, drawings in (("Grantha/character03", [0, 7]), ("N_Ko/character11", [19])):
        members = _zip_members(character)
        files = _extract([members[j] for j in drawings], tmp_path / character)
        c = names.index(f"{character}/rot000")
        want = source.get_items(torch.tensor([c]), torch.tensor([drawings]))[0]  # [len(drawings), 1, 28, 28]
        got = prep.load(files)
        assert got.dtype == want.dtype == torch.float32
        assert torch.equal(got, want), f"{character}: max difference {(got - want).abs().max()}"
    # the check has teeth: the FewShotModel image path (no inversion) is far from the training tensor
    plain = load_image_files(files, 1, (28, 28))
    assert (plain - want).abs().max() > 0.5


# ---------------------------------------------------------------- (b) predictor == the model on a hand-built episode
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two-step `metaformer train` runs of tiny.yaml (glyph 3-way, 16x16): Meta-Transformer, ProtoNet, first-order MAML."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name, extra in (("meta_transformer", []), ("protonet", ["model.name=protonet", "model.options={}"]),
                        ("fomaml", ["model.name=fomaml", "model.options={inner_steps: 2}"])):
        cfg = load_config(TINY, [f"out_dir={base / name}", "train.steps=2", "train.ckpt_every=2",
                                 "train.val_every=0", *extra])
        train(cfg)
        out[name] = base / name
    return out


def _glyph_files(folder: Path, classes: int, per_class: int, start: int) -> tuple[list[Path], list[str]]:
    """Glyph renderings of the test split saved as dark-on-light PNGs (as a user would draw them), with labels."""
    fam = GlyphFamily(split="test", image_size=16)
    x = fam.get_items(torch.arange(classes), torch.arange(start, start + per_class).expand(classes, per_class))
    folder.mkdir(parents=True, exist_ok=True)
    files, labels = [], []
    for c in range(classes):
        for j in range(per_class):
            path = folder / f"c{c}_{j}.png"
            Image.fromarray(255 - (x[c, j, 0].numpy() * 255).round().astype(np.uint8)).save(path)
            files.append(path)
            labels.append(f"c{c}")
    return files, labels


def _read_by_hand(files: list[Path]) -> torch.Tensor:
    """The reference decoding of 16x16 files: PIL grayscale, inverted, over 255 (no resize needed)."""
    return torch.stack([torch.from_numpy(255 - np.asarray(Image.open(f).convert("L"), dtype=np.uint8))[None]
                        for f in files]).float() / 255


def _episode_proba(model: torch.nn.Module, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, n: int) -> torch.Tensor:
    """Softmax of the model's own logits on one episode built by hand (support labels 0..n-1)."""
    q = qx.shape[0]
    batch = EpisodeBatch(sx[None], sy[None], torch.ones(1, len(sy), dtype=torch.bool), qx[None],
                         torch.zeros(1, q, dtype=torch.int64), torch.ones(1, q, dtype=torch.bool),
                         torch.tensor([n]), [[str(i) for i in range(n)]])
    return F.softmax(model_logits(model, batch)[0, :, :n].float(), dim=-1)


def _sub_episode(model, sx, sy, qx, classes: list[int]) -> torch.Tensor:
    """The episode over ``classes`` (support relabelled in that order) -> [Q, len(classes)]."""
    keep = torch.isin(sy, torch.tensor(classes))
    relabel = torch.tensor([classes.index(int(v)) for v in sy[keep]])
    return _episode_proba(model, sx[keep], relabel, qx, len(classes))


@pytest.mark.parametrize("name", ["meta_transformer", "protonet", "fomaml"])
def test_predictor_equals_the_trained_model_on_the_same_episode(runs: dict[str, Path], tmp_path: Path, name: str) -> None:
    run = runs[name]
    s_files, s_labels = _glyph_files(tmp_path / "support", 3, 2, start=0)
    q_files, _ = _glyph_files(tmp_path / "query", 3, 2, start=10)
    sx, qx = _read_by_hand(s_files), _read_by_hand(q_files)
    sy = torch.tensor([int(lab[1:]) for lab in s_labels])
    model, _ = load_model(run)  # what `metaformer eval` evaluates
    want = _episode_proba(model, sx, sy, qx, 3)

    step = list_checkpoints(run)[-1]
    export = export_checkpoint(run, tmp_path / "export")
    # MAML's transductive BatchNorm normalises the queries with their own batch's statistics (as in evaluation
    # episodes), so its reference holds for one query batch; the other two give each query its own logits
    batch_size = 64 if name == "fomaml" else 4
    for folder in (run, step, export):  # every kind of trainer folder loads the same model
        pred = FewShotPredictor.from_pretrained(folder, batch_size=batch_size)
        assert isinstance(pred.model, TrainedFewShotModel) and not pred.model.head.training
        got = pred.fit(s_files, s_labels).predict_proba(q_files)
        assert pred.classes_ == ["c0", "c1", "c2"]
        np.testing.assert_allclose(got, want.numpy(), atol=1e-6, rtol=0)
    assert pred.model.max_way == (None if name == "protonet" else 3)

    # more classes than the model was trained for (3 ways)
    s5, l5 = _glyph_files(tmp_path / "support5", 5, 1, start=0)
    q5, _ = _glyph_files(tmp_path / "query5", 5, 1, start=10)
    sx5, qx5, sy5 = _read_by_hand(s5), _read_by_hand(q5), torch.arange(5)
    got = FewShotPredictor.from_pretrained(run).fit(s5, l5).predict_proba(q5)
    if name == "protonet":
        # no way limit: one 5-way episode; reference from the backbone by hand (-squared distance to the means)
        with torch.no_grad():
            protos, emb = model.backbone(sx5), model.backbone(qx5)
        want = F.softmax(-torch.cdist(emb, protos).pow(2), dim=-1)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
    elif name == "meta_transformer":
        # max_way 3: the tournament, by hand. Chunks [0, 1, 2] and [3, 4]; per query the two chunk winners meet in a
        # 2-way episode; P(c) = P(chunk) * P(c | chunk)
        within = [_sub_episode(model, sx5, sy5, qx5, [0, 1, 2]), _sub_episode(model, sx5, sy5, qx5, [3, 4])]
        want = torch.zeros(5, 5)
        for i in range(5):
            reps = [int(within[0][i].argmax()), 3 + int(within[1][i].argmax())]
            final = _sub_episode(model, sx5, sy5, qx5[i:i + 1], reps)[0]
            want[i] = torch.cat([final[0] * within[0][i], final[1] * within[1][i]])
        np.testing.assert_allclose(got, want.numpy(), atol=1e-6, rtol=0)
    assert got.shape == (5, 5)
    np.testing.assert_allclose(got.sum(axis=1), 1, atol=1e-5)


# ---------------------------------------------------------------- (c) the CLI on the shipped model
def test_cli_predicts_unseen_omniglot_characters_with_the_shipped_model(tmp_path: Path) -> None:
    # The shipped model trained on the trainval background alphabets of the alphabet split (seed 0); Grantha is one of
    # the 5 held-out test alphabets (Anglo-Saxon_Futhorc, Futurama, Grantha, N_Ko, Syriac_(Estrangelo)).
    cfg = read_checkpoint(PRETRAINED, with_trainer_state=False).config
    trained_on = set(build_episodes(cfg, cfg.data.train_split, str(_data_root())).source.groups)
    assert "Grantha" not in trained_on and len(trained_on) == 25
    # 5-way 1-shot within one alphabet: characters 01-05, drawing 1 is the support, drawings 2-5 the queries.
    # Measured when written: 18 of 20 right (90%); chance is 20%.
    truth = {}
    for i in range(1, 6):
        members = _zip_members(f"Grantha/character{i:02d}")[:5]
        _extract(members[:1], tmp_path / "support" / f"character{i:02d}")
        for q in _extract(members[1:], tmp_path / "query"):
            truth[q.name] = f"character{i:02d}"
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--checkpoint", str(PRETRAINED), "--support", str(tmp_path / "support"),
                 "--query", str(tmp_path / "query"), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["id", "prediction"] + [f"p:character{i:02d}" for i in range(1, 6)]
    assert sorted(r["id"] for r in rows) == sorted(truth)
    probs = np.array([[float(v) for k, v in r.items() if k.startswith("p:")] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    accuracy = np.mean([r["prediction"] == truth[r["id"]] for r in rows])
    assert accuracy >= 0.75, accuracy


# ---------------------------------------------------------------- (d) clear errors
def _fake_checkpoint(config: Path, folder: Path, overrides: list[str]) -> Path:
    """A step folder of an untrained model of ``config`` (the loader only needs the layout, not training)."""
    cfg = load_config(config, overrides)
    model = build_model(cfg)
    return save_checkpoint(folder, step=1, model_state=model.state_dict(), trainer_state={}, config=cfg,
                           model_name=cfg.model.name, model_class=type(model).__name__)


def _error(capsys: pytest.CaptureFixture) -> str:
    """The one error line predict printed."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metaformer predict: error: "), lines
    return lines[0]


def test_non_image_checkpoints_and_other_folders_are_refused(runs: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    s_files, s_labels = _glyph_files(tmp_path / "support", 2, 1, start=0)
    for f, lab in zip(s_files, s_labels):  # a valid support folder, so that only the checkpoint is wrong
        (tmp_path / "sup" / lab).mkdir(parents=True)
        f.rename(tmp_path / "sup" / lab / f.name)
    args = ["--support", str(tmp_path / "sup"), "--query", str(tmp_path / "sup" / "c0")]

    sinusoid = _fake_checkpoint(SINUSOID, tmp_path / "sin", ["train.steps=1"]).parent
    with pytest.raises(ValueError, match="is a regression model .data.source=sinusoid"):
        FewShotPredictor.from_pretrained(sinusoid)
    assert main(["predict", "--checkpoint", str(sinusoid), *args]) == 2
    assert "regression model" in _error(capsys)

    text = _fake_checkpoint(TINY, tmp_path / "text", ["data.source=huffpost"])
    with pytest.raises(ValueError, match="data.source='huffpost', which is not an image source"):
        TrainedFewShotModel.from_checkpoint(text)
    assert main(["predict", "--checkpoint", str(text), *args]) == 2
    line = _error(capsys)
    assert "not an image source" in line and "scripts/finetune_encoder.py" in line

    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match="not a few-shot checkpoint.*no meta.json or step-XXXXXXXX"):
        FewShotPredictor.from_pretrained(neither)
    assert main(["predict", "--checkpoint", str(neither), *args]) == 2
    assert "or a `metaformer train` run folder" in _error(capsys)

    # the options are checked against a trainer checkpoint before anything is loaded
    assert main(["predict", "--checkpoint", str(runs["protonet"]), "--inner-steps", "2", *args]) == 2
    assert "applies to MAML-family checkpoints only" in _error(capsys)
    assert main(["predict", "--checkpoint", str(runs["protonet"]), "--which", "best", *args]) == 2
    assert "--which best" in _error(capsys)  # the run recorded no validation result (val_every=0)
    # text queries, or tensors of another size, for an image model
    (tmp_path / "q.txt").write_text("hello\n")
    assert main(["predict", "--checkpoint", str(runs["protonet"]), "--support", str(tmp_path / "sup"),
                 "--query", str(tmp_path / "q.txt")]) == 2
    assert "the support set holds image but the queries hold text" in _error(capsys)
    pred = FewShotPredictor.from_pretrained(runs["protonet"])
    with pytest.raises(ValueError, match=r"trained on \[N, 1, 16, 16\] images"):
        pred.fit(torch.zeros(2, 1, 28, 28), ["a", "b"])
    with pytest.raises(ValueError, match="reads images"):
        pred.fit(["a", "b"], ["a", "b"])


# ---------------------------------------------------------------- (e) image files as users save them
def test_drawings_in_other_file_formats_give_the_training_tensor(tmp_path: Path) -> None:
    prep = ImagePreprocessing("omniglot", 28)
    (orig,) = _extract(_zip_members("Grantha/character03")[:1], tmp_path)
    want = prep.load([orig])
    gray = np.asarray(Image.open(orig).convert("L"))  # 105x105, 0 = ink, 255 = paper
    ink = (255 - gray).astype(np.uint8)
    files = {
        "rgb.png": Image.fromarray(gray).convert("RGB"),
        "palette.png": Image.fromarray(gray).convert("P"),
        "16bit.png": Image.fromarray(gray.astype(np.uint16) * 257),
        # black ink on a transparent background (a drawing app's export): the paper is alpha 0 with RGB 0 = black,
        # which a plain grayscale conversion reads as ink everywhere
        "transparent.png": Image.fromarray(np.dstack([np.zeros_like(gray)] * 3 + [ink]), "RGBA"),
        "transparent_la.png": Image.fromarray(np.dstack([np.zeros_like(gray), ink]), "LA"),
    }
    for name, img in files.items():
        img.save(tmp_path / name)
        got = prep.load([tmp_path / name])
        assert torch.equal(got, want), f"{name}: max difference {(got - want).abs().max()}"

    # a non-square image is padded with paper to a centred square (aspect ratio kept), not stretched
    wide = np.full((105, 315), 255, np.uint8)
    wide[:, 105:210] = gray
    Image.fromarray(wide).save(tmp_path / "wide.png")
    square = np.full((315, 315), 255, np.uint8)
    square[105:210] = wide
    Image.fromarray(square).save(tmp_path / "square.png")
    assert torch.equal(prep.load([tmp_path / "wide.png"]), prep.load([tmp_path / "square.png"]))

    # light strokes on a dark background would be classified inverted (ink everywhere): refused, naming the file
    Image.fromarray(ink).save(tmp_path / "white_on_black.png")
    with pytest.raises(ValueError, match="white_on_black.png looks like light strokes on a dark background.*invert"):
        prep.load([tmp_path / "white_on_black.png"])


# ---------------------------------------------------------------- (f) checkpoints as users pass them
def test_baseline_checkpoint_loads_without_its_training_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the transfer baselines count their training classes from the data when model.options lack num_classes; the
    # checkpoint's own classifier has that many rows, and predict must not need the training set
    over = ["data.source=omniglot", "data.image_size=28", "data.options={split_scheme: alphabets}",
            "model.name=baseline"]
    model = build_model(load_config(TINY, [*over, "model.options={num_classes: 7}"]))
    cfg = load_config(TINY, [*over, "model.options={}"])
    step = save_checkpoint(tmp_path / "run", step=1, model_state=model.state_dict(), trainer_state={}, config=cfg,
                           model_name="baseline", model_class=type(model).__name__)
    monkeypatch.setenv("METAFORMER_DATA_ROOT", str(tmp_path / "no_data"))
    pred = FewShotPredictor.from_pretrained(step.parent)
    assert pred.model.head.classifier.weight.shape[0] == 7 and pred.model.max_way is None
    x = torch.rand(4, 1, 28, 28)
    p = pred.fit(x[:2], ["a", "b"]).predict_proba(x[2:])
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-5)


def test_which_best_on_one_checkpoint_and_a_run_without_checkpoints_are_refused(
        runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    s_files, _ = _glyph_files(tmp_path / "sup" / "c0", 1, 1, start=0)
    _glyph_files(tmp_path / "sup" / "c1", 1, 1, start=3)
    args = ["--support", str(tmp_path / "sup"), "--query", str(s_files[0])]
    step = list_checkpoints(runs["protonet"])[-1]
    # "best" would silently be this one checkpoint
    assert main(["predict", "--checkpoint", str(step), "--which", "best", *args]) == 2
    assert f"pass its run folder {runs['protonet']}" in _error(capsys)
    with pytest.raises(ValueError, match="is one checkpoint .a step or export folder.: drop --which"):
        FewShotPredictor.from_pretrained(step, which="best")
    # a run that has not written its first checkpoint yet (config.yaml only) is a run folder, not "no fewshot.json"
    fresh = tmp_path / "fresh_run"
    fresh.mkdir()
    (fresh / "config.yaml").write_bytes((runs["protonet"] / "config.yaml").read_bytes())
    assert main(["predict", "--checkpoint", str(fresh), *args]) == 2
    assert "run folder without a checkpoint yet" in _error(capsys)
