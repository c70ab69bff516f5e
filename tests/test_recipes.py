"""Recipes (training.recipes, scripts/benchmark.py --recipe): a ProtoNet stage, a frozen Meta-Transformer stage
warm-started from it, both evaluated and paired on the same glyph episodes; reruns keep finished work."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file

from training.evaluation import mean_ci95, read_report
from training.recipes import (RecipeError, load_recipe, parse_setting, recipe_markdown, run_recipe, stage_state,
                              training_seconds)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=16", "model.backbone_options={hidden: 8}", "data.q_query=2", "train.meta_batch=2",
        "train.log_every=1", "train.tensorboard=false", "eval.batch_tasks=5"]


def _recipe_file(tmp: Path, lr: str = "0.001", **extra) -> Path:
    """A two-stage glyph recipe: ProtoNet for 4 steps, then a frozen-backbone Meta-Transformer for 3 steps."""
    data = {
        "name": "tiny_chain",
        "title": "tiny chain",
        "stages": [
            {"name": "proto", "config": "training/configs/glyph_demo.yaml",
             "set": TINY + ["model.name=protonet", "train.steps=4", f"optim.lr={lr}"]},
            {"name": "mt", "config": "training/configs/glyph_demo.yaml", "init_from": "proto",
             "set": TINY + ["model.name=meta_transformer", "train.steps=3",
                            "model.options={d_model: 16, n_layers: 1, n_heads: 2, freeze_backbone: true, readout: prototype}"]},
        ],
        "evaluate": {"stages": ["proto", "mt"], "settings": ["5w1s", "3w2s"], "episodes": 10, "q_query": 3},
        **extra,
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_recipe_chains_stages_pairs_evaluations_and_keeps_finished_work(tmp_path: Path) -> None:
    """Stage 2 starts from stage 1's weights; every number of the report is recomputed from the eval files."""
    recipe = load_recipe(_recipe_file(tmp_path))
    work = tmp_path / "work"
    logs: list[str] = []
    report = run_recipe(recipe, work, threads=1, jobs=2, log=logs.append)

    assert [(s["name"], s["step"], s["init_from"]) for s in report["stages"]] == [("proto", 4, None), ("mt", 3, "proto")]
    assert all("--resume" in s["command"] and s["trained_now"] for s in report["stages"])
    # the frozen backbone of stage 2 is exactly stage 1's final backbone
    proto = load_file(str(work / "runs" / "proto" / "step-00000004" / "model.safetensors"))
    mt = load_file(str(work / "runs" / "mt" / "step-00000003" / "model.safetensors"))
    shared = [k for k in proto if k.startswith("backbone.") and k in mt]
    assert shared and all(torch.equal(proto[k], mt[k]) for k in shared)

    for st, setting in zip(report["settings"], [(5, 1), (3, 2)]):
        assert (st["header"]["n_way"], st["header"]["k_shot"]) == setting
        per = {}
        for name in ("proto", "mt"):
            header, (res,) = read_report(work / "eval" / st["setting"] / name)
            assert (header["n_way"], header["k_shot"], header["q_query"], header["episodes"]) == (*setting, 3, 10)
            per[name] = res.per_episode
            row = next(r for r in st["results"] if r["name"] == name)
            assert math.isclose(row["mean"], mean_ci95(res.per_episode)[0], abs_tol=1e-12)
            # the report keeps the per-episode scores, so later runs can be paired with it without the work folder
            assert row["per_episode"] == pytest.approx(res.per_episode, abs=1e-6) and len(row["per_episode"]) == 10
        diffs = [b - a for a, b in zip(per["proto"], per["mt"])]
        (d,) = st["paired_vs_first"]
        assert math.isclose(d["mean"], mean_ci95(diffs)[0], abs_tol=1e-12)
        assert math.isclose(d["ci95"], mean_ci95(diffs)[1], abs_tol=1e-12)
        assert d["wins"] == sum(x > 0 for x in diffs) and d["losses"] == sum(x < 0 for x in diffs)
        combined = json.loads((work / "eval" / st["setting"] / "eval.json").read_text())
        assert [r["name"] for r in combined["results"]] == ["proto", "mt"]
    assert training_seconds(work / "runs" / "proto") > 0

    # a rerun trains and evaluates nothing: every stage and evaluation is kept
    stamps = {p: p.stat().st_mtime_ns for p in (work / "eval").glob("*/*/eval.json")}
    assert len(stamps) == 4
    logs.clear()
    again = run_recipe(recipe, work, threads=1, log=logs.append)
    assert sum("kept" in line for line in logs) == 6 and not any("done in" in line for line in logs)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["settings"] == report["settings"]
    assert not any(s["trained_now"] for s in again["stages"])

    # the script renders the report from the finished work folder, with its command and both tables
    spec = importlib.util.spec_from_file_location("metaformer_benchmark_recipe", REPO / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "docs"
    assert bench.main(["--recipe", str(recipe.path), "--work", str(work), "--out", str(out)]) == 0
    md = (out / "results" / "tiny_chain.md").read_text()
    first = report["settings"][0]
    proto_row = first["results"][0]
    assert f"| proto | {100 * proto_row['mean']:.2f} ± {100 * proto_row['ci95']:.2f} |" in md
    assert "Paired differences against proto" in md and f"{100 * first['paired_vs_first'][0]['mean']:+.2f}" in md
    assert "scripts/benchmark.py --recipe" in md and "metaformer eval --checkpoint" in md
    assert "| proto | - | 4 |" in md and "kept (finished earlier)" in md  # this rendering trained nothing
    assert json.loads((out / "results" / "tiny_chain.json").read_text())["meta"]["commit"]

    # a run folder trained with another config is refused, naming the key, instead of being reused or overwritten
    other = load_recipe(_recipe_file(tmp_path, lr="0.01"))
    with pytest.raises(RecipeError, match="optim.lr"):
        stage_state(other, other.stage("proto"), work.resolve())

    # a stage restricted to some settings: evaluated and paired there only, shown as such elsewhere
    only = load_recipe(_recipe_file(tmp_path, evaluate={"stages": ["proto", {"name": "mt", "settings": ["3w2s"]}],
                                                        "settings": ["5w1s", "3w2s"], "episodes": 10, "q_query": 3}))
    assert only.evaluated_on((5, 1)) == ["proto"] and only.evaluated_on((3, 2)) == ["proto", "mt"]
    logs.clear()
    part = run_recipe(only, work, threads=1, log=logs.append)
    assert sum("kept" in line for line in logs) == 5  # 2 stages + 3 evaluations, nothing run
    five, three = part["settings"]
    assert [r["name"] for r in five["results"]] == ["proto"] and five["paired_vs_first"] == []
    assert three == report["settings"][1]
    md = recipe_markdown(part, {}, "cmd")
    mt_rows = [line for line in md.splitlines() if line.startswith("| mt | not evaluated |")]
    assert len(mt_rows) == 2  # the accuracy table and the paired table
    assert f"{100 * three['paired_vs_first'][0]['mean']:+.2f}" in mt_rows[1]


@pytest.mark.parametrize("change, message", [
    ({"evaluate": {"settings": ["5x1"]}}, "not of the form NwKs"),
    ({"evaluate": {"settings": ["5w1s"], "stages": ["nope"]}}, "nope are not in `stages`"),
    ({"evaluate": {"settings": []}}, "at least one setting"),
    ({"colour": "red"}, "unknown key"),
    ({"evaluate": {"settings": ["5w1s"], "stages": ["proto", {"name": "mt", "settings": ["3w2s"]}]}},
     "which `evaluate.settings` does not"),
    ({"evaluate": {"settings": ["5w1s"], "stages": [{"name": "proto", "settings": ["5w1s"]}, "mt"]}},
     "list it by name only"),
    ({"evaluate": {"settings": ["5w1s"], "stages": ["proto", {"name": "mt"}]}}, "non-empty `settings`"),
    ({"evaluate": {"settings": ["5w1s"], "stages": ["proto", {"name": "mt", "settings": ["5w1s"], "shots": 1}]}},
     "unknown key"),
    ({"evaluate": {"settings": ["5w1s"], "stages": ["proto", {"name": "mt", "settings": "5w1s"}]}}, "must be a list"),
    ({"evaluate": {"settings": ["5w1s"], "stages": ["proto", "mt", "mt"]}}, "mt listed more than once"),
])
def test_recipe_errors_name_the_problem(tmp_path: Path, change: dict, message: str) -> None:
    """Bad recipe keys and settings are refused with a message that names them."""
    with pytest.raises(RecipeError, match=message):
        load_recipe(_recipe_file(tmp_path, **change))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_recipe_stage_continues_from_a_folder(tmp_path: Path) -> None:
    """init_from with a `/` names a folder (a shipped model, another run): its weights seed the stage."""
    base = yaml.safe_load(_recipe_file(tmp_path).read_text())
    proto, mt = base["stages"]
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({**base, "stages": [proto], "evaluate": {"settings": ["3w2s"], "episodes": 4}}))
    run_recipe(load_recipe(one), tmp_path / "w1", threads=1, log=lambda _: None)
    source = tmp_path / "w1" / "runs" / "proto"

    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({**base, "stages": [{**mt, "init_from": str(source)}],
                                   "evaluate": {"settings": ["3w2s"], "episodes": 4}}))
    report = run_recipe(load_recipe(two), tmp_path / "w2", threads=1, log=lambda _: None)
    (stage,) = report["stages"]
    assert stage["init_from"] == str(source) and f"train.init_from={source}" in stage["command"]
    assert f"| mt | {source} |" in recipe_markdown(report, {}, "cmd")
    before = load_file(str(source / "step-00000004" / "model.safetensors"))
    after = load_file(str(tmp_path / "w2" / "runs" / "mt" / "step-00000003" / "model.safetensors"))
    shared = [k for k in before if k.startswith("backbone.") and k in after]
    assert shared and all(torch.equal(before[k], after[k]) for k in shared)
    # a rerun keeps the stage: the saved init_from is the same folder
    assert stage_state(load_recipe(two), load_recipe(two).stages[0], tmp_path / "w2") == ("done", 3)

    two.write_text(yaml.safe_dump({**base, "stages": [{**mt, "init_from": str(tmp_path / "no" / "such")}]}))
    with pytest.raises(RecipeError, match="neither an earlier stage nor a folder"):
        load_recipe(two)


def test_recipe_stage_errors(tmp_path: Path) -> None:
    """A warm start from a later stage, duplicate names, a runner-owned key and a broken config are refused."""
    path = _recipe_file(tmp_path)
    base = yaml.safe_load(path.read_text())

    def refused(stages: list, message: str) -> None:
        path.write_text(yaml.safe_dump({**base, "stages": stages}))
        with pytest.raises(RecipeError, match=message):
            load_recipe(path)

    a, b = base["stages"]
    refused([{**a, "init_from": "mt"}, b], "not an earlier stage")
    refused([a, {**b, "name": "proto"}], "share this name")
    refused([{**a, "set": a["set"] + ["out_dir=/tmp/x"]}, b], "set by the recipe runner")
    refused([{**a, "set": a["set"] + ["train.stepz=3"]}, b], "does not load")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    assert parse_setting("20w5s") == (20, 5)


def test_shipped_recipes_load() -> None:
    """Every recipe under training/recipes/ loads (its configs and overrides are valid)."""
    paths = sorted((REPO / "training" / "recipes").glob("*.yaml"))
    assert paths
    for p in paths:
        r = load_recipe(p)
        assert r.stages and r.settings


def test_ctrl_c_lets_the_stage_checkpoint_and_a_rerun_continues(tmp_path: Path) -> None:
    """Ctrl-C reaches the recipe runner and its training child: the runner waits while the child finishes its
    step and checkpoint (instead of killing it) and says how to continue; the stage is left resumable there."""
    import os
    import signal
    import subprocess

    from training_processes import wait_for_log_rows

    recipe = _recipe_file(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data["stages"][0]["set"] = [x for x in data["stages"][0]["set"] if not x.startswith("train.steps")] + [
        "train.steps=100000", "train.ckpt_every=1000"]
    data["stages"] = data["stages"][:1]
    data["evaluate"] = {"stages": ["proto"], "settings": ["5w1s"], "episodes": 4, "q_query": 3}
    recipe.write_text(yaml.safe_dump(data))
    work = tmp_path / "work"
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--recipe", str(recipe), "--work", str(work),
           "--out", str(tmp_path / "out"), "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        wait_for_log_rows(proc, work / "runs" / "proto" / "log.csv", rows=3, timeout=90)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert "stopped by SIGINT" in err and "rerun the same recipe command" in err, err[-3000:]
    state, step = stage_state(load_recipe(recipe), load_recipe(recipe).stages[0], work)
    assert state == "partial" and step is not None and step >= 3
    assert (work / "runs" / "proto" / f"step-{step:08d}").is_dir()  # the stop's own checkpoint (ckpt_every=1000)


def _variant(tmp: Path, name: str, change: Callable[[dict], None]) -> Path:
    """The tiny chain recipe, one evaluated setting of 4 episodes, edited by `change`, written to tmp/<name>.yaml."""
    data = yaml.safe_load(_recipe_file(tmp).read_text())
    data["evaluate"] = {"stages": ["proto", "mt"], "settings": ["3w2s"], "episodes": 4, "q_query": 3}
    change(data)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _set(stage: dict, key: str, value: str) -> None:
    """Replace (or add) `key=value` in a stage's `set` list."""
    stage["set"] = [o for o in stage["set"] if o.split("=", 1)[0] != key] + [f"{key}={value}"]


def _weights_sha(run: Path, step: int) -> str:
    """sha256 of a checkpoint's weights, as its meta.json records it."""
    meta = json.loads((run / f"step-{step:08d}" / "meta.json").read_text())
    return meta["files"]["model.safetensors"]["sha256"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_evaluations_run_again_for_another_checkpoint_or_command(tmp_path: Path) -> None:
    """An evaluation is kept only for the same checkpoint (weights sha256, not just the step) and the same command:
    a changed evaluate.set, or a stage retrained to the same step with another config, evaluates again."""
    work = tmp_path / "work"
    base = load_recipe(_variant(tmp_path, "base", lambda d: None))
    run_recipe(base, work, threads=1, log=lambda _: None)

    # evaluate.set changes the episodes: every evaluation runs again, and the report's numbers come from them
    seeded = load_recipe(_variant(tmp_path, "seeded", lambda d: d["evaluate"].update(set=["eval.seed=7"])))
    logs: list[str] = []
    report = run_recipe(seeded, work, threads=1, log=logs.append)
    assert sum("eval.seed=7" in line and "evaluating again" in line for line in logs) == 2, logs
    assert not any(line.startswith("[recipe] eval") and "kept" in line for line in logs)
    (st,) = report["settings"]
    assert st["header"]["seed"] == 7
    for name in ("proto", "mt"):
        header, (res,) = read_report(work / "eval" / "3w2s" / name)
        assert header["seed"] == 7 and next(r for r in st["results"] if r["name"] == name)["per_episode"] == \
            pytest.approx(res.per_episode, abs=1e-6)
    # each evaluation records the checkpoint it read and its command (the work folder written <work>)
    record = json.loads((work / "eval" / "3w2s" / "mt" / "recipe_eval.json").read_text())
    assert record["checkpoint"] == {"step": 3, "weights_sha256": _weights_sha(work / "runs" / "mt", 3)}
    assert "eval.seed=7" in record["command"] and "<work>/runs/mt" in record["command"]

    # stage mt retrained with another learning rate (moved away, as the refusal says): same step, other weights
    def faster(d: dict) -> None:
        d["evaluate"]["set"] = ["eval.seed=7"]
        _set(d["stages"][1], "optim.lr", "0.05")

    changed = load_recipe(_variant(tmp_path, "changed", faster))
    with pytest.raises(RecipeError, match="optim.lr"):
        run_recipe(changed, work, threads=1, log=lambda _: None)
    (work / "runs" / "mt").rename(tmp_path / "mt_old")
    logs.clear()
    report = run_recipe(changed, work, threads=1, log=logs.append)
    new_sha = _weights_sha(work / "runs" / "mt", 3)
    assert new_sha != _weights_sha(tmp_path / "mt_old", 3)
    assert any(line.startswith("[recipe] eval proto 3w2s: done at step 4") and "kept" in line for line in logs), logs
    assert any(line.startswith("[recipe] eval mt 3w2s: evaluating again") and new_sha[:12] in line for line in logs)
    record = json.loads((work / "eval" / "3w2s" / "mt" / "recipe_eval.json").read_text())
    assert record["checkpoint"] == {"step": 3, "weights_sha256": new_sha}
    _, (res,) = read_report(work / "eval" / "3w2s" / "mt")
    assert report["settings"][0]["results"][1]["per_episode"] == pytest.approx(res.per_episode, abs=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_stage_refused_when_its_steps_or_its_warm_start_source_changed(tmp_path: Path) -> None:
    """A changed train.steps is refused like any config change (not extended); a stage warm-started from a
    checkpoint its source no longer holds is refused, naming the stage and both checkpoints."""
    work = tmp_path / "work"
    v4 = load_recipe(_variant(tmp_path, "v4", lambda d: None))
    run_recipe(v4, work, threads=1, log=lambda _: None)

    v6 = load_recipe(_variant(tmp_path, "v6", lambda d: _set(d["stages"][0], "train.steps", "6")))
    with pytest.raises(RecipeError, match=r"train.steps: run 4 vs recipe 6.*move that folder away"):
        stage_state(v6, v6.stage("proto"), work)
    with pytest.raises(RecipeError, match="train.steps"):
        run_recipe(v6, work, threads=1, log=lambda _: None)
    assert sorted(p.name for p in (work / "runs" / "proto").glob("step-*")) == ["step-00000004"]  # not extended
    assert json.loads((work / "runs" / "mt" / "recipe_stage.json").read_text())["source"] == {
        "step": 4, "weights_sha256": _weights_sha(work / "runs" / "proto", 4)}

    # proto moved away: mt's source is gone, refused before anything trains (proto is not retrained for nothing)
    (work / "runs" / "proto").rename(tmp_path / "proto_v4")
    with pytest.raises(RecipeError, match=r"stage 'mt'.*warm-started from stage 'proto' at step 4.*no checkpoint"):
        run_recipe(v6, work, threads=1, log=lambda _: None)
    assert not list((work / "runs").glob("proto/step-*"))
    (work / "runs" / "mt").rename(tmp_path / "mt_v4")
    report = run_recipe(v6, work, threads=1, log=lambda _: None)
    proto6 = {"step": 6, "weights_sha256": _weights_sha(work / "runs" / "proto", 6)}
    assert [s["step"] for s in report["stages"]] == [6, 3] and report["stages"][1]["init_checkpoint"] == proto6

    # the recipe back at 4 steps with its old proto: mt (same config, trained from proto at step 6) is stale
    (work / "runs" / "proto").rename(tmp_path / "proto_v6")
    (tmp_path / "proto_v4").rename(work / "runs" / "proto")
    assert stage_state(v4, v4.stage("proto"), work) == ("done", 4)
    with pytest.raises(RecipeError, match=r"warm-started from stage 'proto' at step 6 .*now holds step 4"):
        stage_state(v4, v4.stage("mt"), work)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_moved_work_folder_keeps_finished_work_and_resumes(tmp_path: Path) -> None:
    """A moved --work folder keeps its finished stages and evaluations, and an interrupted stage continues there."""
    def often(d: dict) -> None:
        _set(d["stages"][1], "train.ckpt_every", "1")
        _set(d["stages"][1], "train.keep_last", "3")

    recipe = load_recipe(_variant(tmp_path, "often", often))
    run_recipe(recipe, tmp_path / "w3", threads=1, log=lambda _: None)
    (tmp_path / "w3").rename(tmp_path / "w3moved")
    logs: list[str] = []
    run_recipe(recipe, tmp_path / "w3moved", threads=1, log=logs.append)
    assert sum("kept" in line for line in logs) == 4 and not any("done in" in line for line in logs), logs

    # mt stopped at step 2 (its last checkpoint gone), then the folder moved again: the rerun continues mt
    shutil.rmtree(tmp_path / "w3moved" / "runs" / "mt" / "step-00000003")
    (tmp_path / "w3moved").rename(tmp_path / "w3again")
    work = tmp_path / "w3again"
    logs.clear()
    report = run_recipe(recipe, work, threads=1, log=logs.append)
    assert any("mt: continuing from step 2" in line for line in logs), logs
    assert [(s["step"], s["trained_now"]) for s in report["stages"]] == [(4, False), (3, True)]
    assert stage_state(recipe, recipe.stage("mt"), work.resolve()) == ("done", 3)

    # a run folder of an older runner (no warm-start record) is kept, and its source's checkpoint recorded from now on
    (work / "runs" / "mt" / "recipe_stage.json").unlink()
    logs.clear()
    run_recipe(recipe, work, threads=1, log=logs.append)
    assert any("mt: no record of the checkpoint it was warm-started from" in line for line in logs), logs
    assert sum("kept" in line for line in logs) == 4
    assert json.loads((work / "runs" / "mt" / "recipe_stage.json").read_text())["source"] == {
        "step": 4, "weights_sha256": _weights_sha(work / "runs" / "proto", 4)}


def _child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_killed_runner_leaves_no_trainer_behind(tmp_path: Path) -> None:
    """kill -9 of the recipe runner stops its training child too (SIGTERM: it checkpoints and exits), so a rerun
    never trains next to an orphan; elsewhere than Linux the child launch is unchanged."""
    import os
    import signal
    import subprocess

    from training import recipes
    from training_processes import wait_for_log_rows

    def long(d: dict) -> None:
        d["stages"] = d["stages"][:1]
        d["evaluate"] = {"stages": ["proto"], "settings": ["3w2s"], "episodes": 4, "q_query": 3}
        _set(d["stages"][0], "train.steps", "100000")
        _set(d["stages"][0], "train.ckpt_every", "1000")

    recipe = _variant(tmp_path, "long", long)
    work = tmp_path / "work"
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--recipe", str(recipe), "--work", str(work),
           "--out", str(tmp_path / "out"), "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # files, not pipes: an orphan writing into a full pipe nobody reads would block instead of running on
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=REPO, start_new_session=True)
    trainers: list[int] = []
    try:
        wait_for_log_rows(proc, work / "runs" / "proto" / "log.csv", rows=3, timeout=90)
        trainers = [p for p in _child_pids(proc.pid) if b"train" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(trainers) == 1, trainers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60
        while _running(trainers[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(trainers[0]), "the training child outlived its killed recipe runner"
    finally:
        for pid in [proc.pid, *trainers]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    state, step = stage_state(load_recipe(recipe), load_recipe(recipe).stages[0], work)
    assert state == "partial" and step is not None and step >= 3
    assert (work / "runs" / "proto" / f"step-{step:08d}").is_dir()  # the SIGTERM's own checkpoint

    assert callable(recipes._die_with_parent())
    original = sys.platform
    try:
        sys.platform = "darwin"
        assert recipes._die_with_parent() is None
    finally:
        sys.platform = original


def test_a_relative_saved_warm_start_is_read_from_the_repository_root(tmp_path: Path, monkeypatch) -> None:
    """A run's relative train.init_from (written by a trainer that ran from the repository root) is the same folder
    as the recipe's absolute source, whatever the runner's current folder is."""
    from training.recipes import ROOT, _same_init

    monkeypatch.chdir(tmp_path)
    assert _same_init("pretrained/omniglot_meta_transformer", str(ROOT / "pretrained" / "omniglot_meta_transformer"))
    assert not _same_init("pretrained/other", str(ROOT / "pretrained" / "omniglot_meta_transformer"))
