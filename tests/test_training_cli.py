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
    table = (out / "eval.md").read_text()
    assert table in printed and table.count("\n") == 4  # header, rule, two rows
    data = json.loads((out / "eval.json").read_text())
    assert data["episodes"] == 30 and data["seed"] == 2024
    assert [r["name"] for r in data["results"]] == ["tiny", "tiny (proto)"]
    for r in data["results"]:
        assert r["episodes"] == 30 and len(r["per_episode"]) == 30 and r["step"] == 6
        assert r["mean"] == pytest.approx(sum(r["per_episode"]) / 30)
        assert 0 <= r["ci95"] < 0.5


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
