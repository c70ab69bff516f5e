"""End to end through the `metaformer` command: train (glyph, tiny config), eval of several checkpoints
into one table, and the demo in --quick mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metaformer.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"


def test_train_then_eval_two_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    a, b = tmp_path / "mt", tmp_path / "proto"
    proc = subprocess.run(
        [sys.executable, "-m", "metaformer.cli", "train", "--config", str(TINY), "--set", f"out_dir={a}",
         "train.tensorboard=true", "train.progress=true", "train.steps=6"],
        env=env, capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "done: step 6" in proc.stdout
    assert "ep/s" in proc.stderr and "loss=" in proc.stderr  # the tqdm bar's postfix
    assert list((a / "tb").glob("events.out.tfevents.*")), "TensorBoard event file missing"
    rows = (a / "log.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and rows[-1].startswith("6,24,")

    assert main(["train", "--config", str(TINY), "--set", f"out_dir={b}", "model.name=protonet", "model.options={}",
                 "train.steps=6"]) == 0
    out = tmp_path / "cmp"
    assert main(["eval", "--checkpoint", str(a), str(b), "--episodes", "30", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = (out / "eval.md").read_text()
    assert report in printed
    table, paired = report.split("\n\n", 1)
    assert table.count("\n") == 3  # header, rule, two rows
    assert paired.startswith("Paired differences from tiny on the same 30 episodes")
    data = json.loads((out / "eval.json").read_text())
    assert data["episodes"] == 30 and data["seed"] == 2024
    assert [r["name"] for r in data["results"]] == ["tiny", "tiny (proto)"]
    for r in data["results"]:
        assert r["episodes"] == 30 and len(r["per_episode"]) == 30 and r["step"] == 6
        assert r["mean"] == pytest.approx(sum(r["per_episode"]) / 30)
        assert 0 <= r["ci95"] < 0.5
    ra, rb = data["results"]
    assert ra["episodes_digest"] == rb["episodes_digest"]
    (d,) = data["paired_vs_first"]
    diffs = [y - x for x, y in zip(ra["per_episode"], rb["per_episode"])]
    assert d["mean"] == pytest.approx(sum(diffs) / 30) and d["wins"] == sum(x > 0 for x in diffs)
    assert f"| tiny (proto) | {100 * d['mean']:+.2f} |" in paired

    # each run evaluated on its own, then `metaformer compare`: the same pairing from the two eval.json files
    for run in (a, b):
        assert main(["eval", "--checkpoint", str(run), "--episodes", "30", "--out", str(tmp_path / f"ev_{run.name}"),
                     "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "ev_mt"), str(tmp_path / "ev_proto" / "eval.json"), "--out",
                 str(tmp_path / "both")]) == 0
    both = json.loads((tmp_path / "both" / "eval.json").read_text())
    assert both["paired_vs_first"][0]["mean"] == pytest.approx(d["mean"])
    assert both["results"][0]["per_episode"] == ra["per_episode"]
    # other episodes are refused with the key that differs
    assert main(["eval", "--checkpoint", str(b), "--episodes", "20", "--out", str(tmp_path / "ev20"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "ev_mt"), str(tmp_path / "ev20")]) == 2
    assert "not evaluated on the same episodes (episodes: 30 vs 20)" in capsys.readouterr().err


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    code = main(["demo", "--quick", "--budget-seconds", "30", "--out", str(out), "--no-progress",
                 "--set", "data.image_size=16", "model.backbone_options={hidden: 8}", "train.num_threads=1",
                 "eval.batch_tasks=20"])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("Meta-Transformer", "ProtoNet", "FOMAML"):
        assert f"| {name} | accuracy (%) |" in printed
    data = json.loads((out / "demo_results.json").read_text())
    assert [r["name"] for r in data["results"]] == ["Meta-Transformer", "ProtoNet", "FOMAML"]
    assert all(r["episodes"] == 40 and r["step"] == 6 for r in data["results"])
    for png in ("demo_accuracy.png", "demo_episode.png"):
        blob = (out / png).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000


def test_demo_time_cap_names_no_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # every method stops at its time share: the trainer's note must not send the user to a --resume the demo lacks
    code = main(["demo", "--quick", "--budget-seconds", "0.03", "--episodes", "4", "--out", str(tmp_path / "demo"),
                 "--no-progress", "--set", "data.image_size=16", "model.backbone_options={hidden: 8}",
                 "train.num_threads=1", "eval.batch_tasks=4"])
    assert code == 0
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if line.startswith("train.max_minutes=")]
    assert len(notes) == 3, printed
    assert all("--resume" not in n and n.endswith("a larger metaformer demo --budget-seconds trains longer")
               for n in notes), notes
