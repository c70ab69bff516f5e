"""scripts/benchmark.py: the results suite on a tiny glyph configuration, in process and as a child cell.

The report must hold what the cells measured: the scores in RESULTS.md and the JSON are recomputed here
from the per-episode values, and those from the saved weights on the same fixed episodes."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from training.evaluation import evaluate, mean_ci95

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=16", "model.backbone_options={hidden: 8}", "data.q_query=2", "train.meta_batch=2",
        "eval.batch_tasks=6"]


def _bench() -> ModuleType:
    """scripts/benchmark.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("metaformer_benchmark_script", REPO / "scripts" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    return mod


def _tiny_suite(b: ModuleType, steps: int = 2) -> tuple:
    """A 2-setting glyph suite (3-way 1 and 2 shot), 6 test episodes, 2 training segments of `steps` in all."""
    suite = b.Suite("tiny", (b.Setting("glyph", 3, 1), b.Setting("glyph", 3, 2)), {"glyph": b.SourcePlan(None, 6, 3, 2)},
                    time_boxed=False, jobs=1)
    return suite, TINY + [f"train.steps={steps}"]


def _score(r: dict) -> str:
    """The score cell of a classification row, recomputed from its per-episode values."""
    mean, ci, _ = mean_ci95(r["per_episode"])
    return f"{100 * mean:.2f} ± {100 * ci:.2f}"


def _fake_peers(path: Path) -> Path:
    """A bench_meta_train.py JSON with two implementations of one setup and one failed cell."""
    rows = [{"config": "sinusoid", "impl": "l2l", "steps": 1, "order": "so", "status": "ok", "tasks_per_s": 10.0,
             "peak_rss_mib": 300.0},
            {"config": "sinusoid", "impl": "metaformer_batched", "steps": 1, "order": "so", "status": "ok",
             "tasks_per_s": 50.0, "peak_rss_mib": 310.0},
            {"config": "sinusoid", "impl": "higher", "steps": 1, "order": "so", "status": "crashed"}]
    path.write_text(json.dumps({"results": rows, "args": {"configs": "sinusoid", "threads": 1}}))
    return path


def test_suite_report_holds_the_measured_rows(tmp_path: Path) -> None:
    b = _bench()
    suite, extra = _tiny_suite(b)
    peers = b.load_peers(_fake_peers(tmp_path / "peers.json"))
    lines: list[str] = []
    paths = b.run_suite(suite, tmp_path / "docs", ["protonet", "fomaml"], list(suite.settings), extra=extra,
                        work=tmp_path / "work", in_process=True, peers=peers, command="scripts/benchmark.py --test",
                        log=lines.append)
    data = json.loads(paths["json"].read_text())
    md = paths["md"].read_text()
    results = data["results"]
    assert [(r["setting"], r["method"], r["status"]) for r in results] == [
        ("glyph-3w1s", "protonet", "ok"), ("glyph-3w1s", "fomaml", "ok"),
        ("glyph-3w2s", "protonet", "ok"), ("glyph-3w2s", "fomaml", "ok")]
    from training.eval_cli import load_model
    from training.registry import build_episodes

    for r in results:
        assert len(r["per_episode"]) == r["episodes"] == 6
        mean, ci, _ = mean_ci95(r["per_episode"])
        assert math.isclose(mean, r["mean"]) and math.isclose(ci, r["ci95"])
        assert r["train_steps"] == 2 and [p["step"] for p in r["curve"]] == [1, 2]
        assert [p["episodes"] for p in r["curve"]] == [3, 6] and r["curve"][-1]["mean"] == r["mean"]
        assert r["train_tasks_per_s"] == pytest.approx(2 * 2 / r["train_seconds"])
        assert r["queries_per_s"] == pytest.approx(6 * 3 * 2 / r["eval_seconds"])
        assert r["peak_rss_mib"] > 0
        # the table row of this cell, in its setting's section, from the measured values
        section = md.split(f"## {r['setting']}\n", 1)[1].split("\n## ", 1)[0]
        assert r["ece"] is not None and 0.0 <= r["ece"] <= 1.0  # classification cells carry their calibration
        assert (f"| {r['label']} | {100 * mean:.2f} ± {100 * ci:.2f} | {100 * r['ece']:.2f} | 6 | "
                f"{r['train_seconds']:.0f} | 2 | {r['train_tasks_per_s']:.1f} | {r['queries_per_s']:.0f} |") in section
        # the per-episode scores are those of the trained weights on the fixed test episodes
        model, _ = load_model(tmp_path / "work" / r["setting"] / r["method"])
        cfg = b.config_from_dict(next(c["config"] for c in data["cells"]
                                      if b.Setting(**c["setting"]).key == r["setting"] and c["method"] == r["method"]))
        again = evaluate(model, build_episodes(cfg, cfg.eval.split), 6, 6, torch.device("cpu"))
        assert again.per_episode == pytest.approx(r["per_episode"])
    # each setting's section pairs FOMAML with ProtoNet (the first method; no Meta-Transformer ran) per episode
    for key in ("glyph-3w1s", "glyph-3w2s"):
        ref, other = (r for r in results if r["setting"] == key)
        assert ref["episodes_digest"] == other["episodes_digest"]
        diffs = [y - x for x, y in zip(ref["per_episode"], other["per_episode"])]
        m, ci, _ = mean_ci95(diffs)
        section = md.split(f"## {key}\n", 1)[1].split("\n## ", 1)[0]
        assert "Paired differences from ProtoNet on the same 6 episodes" in section
        assert (f"| FOMAML | {100 * m:+.2f} | ± {100 * ci:.2f} | {sum(d > 0 for d in diffs)} / "
                f"{sum(d < 0 for d in diffs)} |") in section
    assert len(lines) == 4 + 2 and "glyph-3w2s" in lines[3]
    # header: command, commit, machine, GPU section
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert f"Commit: `{head}`" in md and "Command: `scripts/benchmark.py --test`" in md
    assert f"{os.cpu_count()} cores" in md and "## GPU" in md
    if not torch.cuda.is_available():
        assert "No GPU was available" in md
    assert "alphabet-level split" in md
    # the peer rows come from the JSON given, the failed peer cell is left out
    assert "| sinusoid 1-step SO | metaformer_batched | 50.0 | 5.00 | 310 |" in md
    assert "| sinusoid 1-step SO | l2l | 10.0 | 1.00 | 300 |" in md and "higher" not in md.split("## GPU")[0]
    for key in ("accuracy_vs_shots", "accuracy_vs_time", "throughput_vs_peers"):
        png = paths[key]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"(results/{png.name})" in md
    # the report can be re-rendered from its JSON alone, to the same text
    again = b.report_from_json(paths["json"], tmp_path / "again")
    assert again["md"].read_text() == md
    # a GPU run (here: this run relabelled) and fused-op rows fill the GPU section with their own rows
    gpu_run = json.loads(paths["json"].read_text())
    gpu_run["machine"].update(device="cuda", gpu="Test GPU", ops_backend="extension")
    (tmp_path / "gpu.json").write_text(json.dumps(gpu_run))
    fused = [{"case": "conv-4", "device": "cuda", "tasks": 32, "params": 1000, "impl": impl, "us_per_call": us,
              "gb_per_s": 1.0} for impl, us in (("fused op", 50.0), ("python loop", 200.0))]
    (tmp_path / "fused.json").write_text(json.dumps(fused))
    data["gpu_run"] = b.load_gpu_run(tmp_path / "gpu.json")
    data["gpu_run"]["fused"] = b.load_fused(tmp_path / "fused.json")
    (tmp_path / "with_gpu.json").write_text(json.dumps(data))
    gpu_md = b.report_from_json(tmp_path / "with_gpu.json", tmp_path / "gpu_report")["md"].read_text()
    section = gpu_md.split("## GPU\n", 1)[1].split("\n## ", 1)[0]
    assert "Test GPU" in section and "No GPU was available" not in section
    first = results[0]
    assert f"| {first['label']} | {_score(first)} | {100 * first['ece']:.2f} | 6 |" in section.split(
        "### glyph-3w1s on the GPU", 1)[1]
    assert "| conv-4 | cuda | 32 | 1,000 | fused op | 50.0 | 1.0 | 4.00x |" in section
    with pytest.raises(SystemExit, match="not a GPU"):
        b.load_gpu_run(paths["json"])


def test_child_process_cell_and_failed_cell(tmp_path: Path) -> None:
    b = _bench()
    suite, extra = _tiny_suite(b, steps=1)
    specs = b.make_specs(suite, ["protonet"], [b.Setting("glyph", 3, 1)], tmp_path / "work", threads=1, episodes=4,
                         extra=extra)
    [r] = b.run_cells(specs, jobs=1, log=lambda *_: None)
    assert r["status"] == "ok" and r["rss_scope"].startswith("cell") and r["episodes"] == 4
    assert math.isclose(mean_ci95(r["per_episode"])[0], r["mean"])
    # A cell that cannot run (no Omniglot folder here) becomes a failed row; the suite goes on.
    omni_suite = b.Suite("t", (), {"omniglot": b.SourcePlan(None, 4, 2, 1)}, time_boxed=False, jobs=1)
    omni = b.make_specs(omni_suite, ["protonet"], [b.Setting("omniglot", 5, 1)], tmp_path / "work", threads=1,
                        data_root=str(tmp_path / "missing"))
    [f] = b.run_cells(omni, in_process=True, log=lambda *_: None)
    assert f["status"] == "failed" and "omniglot" in f["error"].lower()
    assert "failed:" in b.setting_table([f])


def test_every_quick_and_full_cell_has_a_valid_config(tmp_path: Path) -> None:
    b = _bench()
    for name, suite in b.SUITES.items():
        specs = b.make_specs(suite, list(b.METHODS), list(suite.settings), tmp_path, threads=1)
        sinusoid = [s for s in specs if s.setting["source"] == "sinusoid"]
        assert {s.method for s in sinusoid} == set(b.METHODS) - b.CLASSIFICATION_ONLY
        glyph = [s for s in specs if s.setting["source"] == "glyph"]
        assert {s.method for s in glyph} == set(b.METHODS) - b.FINITE_CLASSES_ONLY
        assert len(specs) == len(suite.settings) * len(b.METHODS) - sum(
            len(b.CLASSIFICATION_ONLY) * (s.source == "sinusoid") + len(b.FINITE_CLASSES_ONLY) * (s.source == "glyph")
            for s in suite.settings)
        assert {"probmaml", "baseline", "baselinepp"} <= {s.method for s in specs}
        for s in specs:
            cfg = b.config_from_dict(s.config)
            assert cfg.data.k_shot == s.setting["k_shot"] and cfg.model.name == s.method
            if s.setting["source"] == "omniglot":
                assert cfg.data.options["split_scheme"] == "alphabets" and cfg.data.n_way == s.setting["n_way"]
    quick = b.make_specs(b.SUITES["quick"], list(b.METHODS), list(b.SUITES["quick"].settings), tmp_path, threads=1)
    assert all(s.budget_s is not None for s in quick)
    assert b.parse_setting("omniglot-20w5s") == b.Setting("omniglot", 20, 5)
    assert b.parse_setting("sinusoid-10s").key == "sinusoid-10s"
    with pytest.raises(ValueError, match="must look like"):
        b.parse_setting("omniglot-five")


def test_probabilistic_maml_sinusoid_cell_plots_its_predictive_band(tmp_path: Path) -> None:
    b = _bench()
    suite = b.Suite("tiny", (b.Setting("sinusoid", 0, 5),), {"sinusoid": b.SourcePlan(None, 4, 2, 1)},
                    time_boxed=False, jobs=1)
    paths = b.run_suite(suite, tmp_path / "docs", ["probmaml"], list(suite.settings), extra=["train.steps=2"],
                        work=tmp_path / "work", in_process=True, command="scripts/benchmark.py --test", log=lambda *_: None)
    png = paths["predictive_sinusoid-5s_probmaml"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
    md = paths["md"].read_text()
    assert f"(results/{png.name})" in md and "±2 standard deviations" in md
    [r] = json.loads(paths["json"].read_text())["results"]
    assert r["metric"] == "mse" and r["ece"] is None


def test_panels_put_each_scripts_tables_and_failures_in_the_report(tmp_path: Path) -> None:
    """--panels: each script's printed table lands in RESULTS.md under its command, a failing script becomes a
    'Failed' line without stopping the run, a meta-train panel's JSON feeds the peer table, and --from-json
    re-renders the same section."""
    b = _bench()
    suite, extra = _tiny_suite(b, steps=1)
    panels = [
        b.Panel("fused_op", "Fused update, quick", "bench_inner_update.py", ("--device", "cpu", "--quick"),
                json_option="--json"),
        b.Panel("meta_train_tiny", "Sinusoid MAML step, ours only", "bench_meta_train.py",
                ("--configs", "sinusoid", "--steps-list", "1", "--orders", "so", "--threads", "1", "--warmup", "0",
                 "--sine-timed", "2", "--impls", "metaformer_batched"), needs_peers=True, json_option="--json-out"),
        b.Panel("broken", "A script that rejects its arguments", "bench_inner_update.py", ("--no-such-option",)),
    ]
    paths = b.run_suite(suite, tmp_path / "docs", ["protonet"], list(suite.settings)[:1], extra=extra,
                        work=tmp_path / "work", in_process=True, command="scripts/benchmark.py --test", log=print,
                        panels=panels, peers_python=str(tmp_path / "no-peers-venv" / "python"))
    data = json.loads(paths["json"].read_text())
    runs = {p["name"]: p for p in data["panels"]}
    assert [runs[n]["status"] for n in ("fused_op", "meta_train_tiny", "broken")] == ["ok", "ok", "failed"]
    assert "exit status 2" in runs["broken"]["error"]
    fused_rows = runs["fused_op"]["rows"]
    assert {r["impl"] for r in fused_rows} >= {"fused op", "python loop"} and all(r["us_per_call"] > 0 for r in fused_rows)
    md = paths["md"].read_text()
    section = md[md.index("## Building blocks and peer libraries"):md.index("## Per-cell settings")]
    assert "### Fused update, quick" in section and "Command: `scripts/bench_inner_update.py --device cpu --quick" in section
    assert "| case | device | T | params | impl | us/call | GB/s | vs python loop |" in section
    for r in fused_rows:  # every JSON row is a table row of the report
        assert f"| {r['case']} | {r['device']} | {r['tasks']} | {r['params']:,} | {r['impl']} | {r['us_per_call']:.1f} |" in section
    assert "**Failed**: exit status 2" in section
    # the meta-train panel's JSON is the peer record: its metaformer row in the throughput table
    ours = [r for r in runs["meta_train_tiny"]["rows"]["results"] if r.get("status") == "ok"]
    assert ours and data["peers"]["source"].startswith("the meta-training panels of this run")
    assert f"{ours[0]['tasks_per_s']:.1f}" in md[md.index("## Meta-training throughput"):]
    assert all(runs[n]["commit"] and runs[n]["date"] for n in runs)  # each panel says when and on what it ran
    again = b.report_from_json(paths["json"], tmp_path / "again")
    md2 = again["md"].read_text()
    assert md2[md2.index("## Building blocks"):md2.index("## Per-cell settings")] == section
    # --from-json with --panels: a module panel (the `metaformer` command, given a scratch --out folder that is
    # removed afterwards) is added, a stored panel of the same name is replaced, the others are kept
    demo = b.Panel("broken", "The demo, quick", "metaformer.cli", ("demo", "--quick", "--no-progress"),
                   scratch_option="--out")
    refreshed = b.report_from_json(paths["json"], tmp_path / "refreshed", [demo], log=print)
    data3 = json.loads(refreshed["json"].read_text())
    assert [p["name"] for p in data3["panels"]] == ["fused_op", "meta_train_tiny", "broken"]
    new = data3["panels"][2]
    assert new["status"] == "ok", new.get("error")
    assert new["command"] == "python -m metaformer.cli demo --quick --no-progress --out <scratch folder>"
    assert "ProtoNet" in new["output"] and "Meta-Transformer" in new["output"]
    assert "metaformer_panel_" not in new["output"]  # the removed scratch folder is not quoted as a path
    md3 = refreshed["md"].read_text()
    assert "### The demo, quick" in md3 and "**Failed**" not in md3 and "### Fused update, quick" in md3


def test_panels_report_the_commit_read_before_the_run_wrote_anything(tmp_path: Path) -> None:
    """A suite writes its outputs (tracked files under docs/) before its panels run, so each panel is given the commit
    and dirty flag read at the start, and the scripts that print their own commit print that one."""
    b = _bench()
    panel = b.Panel("meta_train_tiny", "Sinusoid MAML step, ours only", "bench_meta_train.py",
                    ("--configs", "sinusoid", "--steps-list", "1", "--orders", "so", "--threads", "1", "--warmup", "0",
                     "--sine-timed", "2", "--impls", "metaformer_batched"), json_option="--json-out")
    for dirty in (False, True):
        [run] = b.run_panels([panel], tmp_path, "t", None, None, log=print,
                             git={"commit": "0123456789abcdef", "dirty": dirty})
        assert run["status"] == "ok", run.get("error")
        assert (run["commit"], run["dirty"]) == ("0123456789abcdef", dirty)
        assert ("git 0123456+dirty," if dirty else "git 0123456,") in run["output"]
        assert run["rows"]["commit"] == "0123456" + ("+dirty" if dirty else "")


def test_panel_names_are_checked() -> None:
    """--panels all is every panel in order; an unknown name is an error that lists the valid ones."""
    b = _bench()
    assert [p.name for p in b.parse_panels("all")] == list(b.PANELS)
    assert [p.name for p in b.parse_panels("episodes, fused_op")] == ["episodes", "fused_op"]
    with pytest.raises(ValueError, match="unknown panel.*fused_op"):
        b.parse_panels("fused_op,nope")
