"""The benchmark scripts refuse bad arguments before any work (argparse usage error, exit 2, naming the option and
the fix), and scripts/benchmark.py never replaces a report with one of nothing: no cells is a usage error, and a run
whose every cell failed exits non-zero, leaves the existing report as it was and says where the errors are."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"metaformer_args_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    return mod


def _usage_error(main: Callable[[Sequence[str]], Any], argv: Sequence[str], capsys: pytest.CaptureFixture) -> str:
    """Run ``main(argv)``, check it stops with argparse's usage error (exit 2) and return what it printed."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2, argv
    err = capsys.readouterr().err
    assert "error:" in err, argv
    return err


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """scripts/benchmark.py whose run_suite must not be reached (a refused invocation runs nothing)."""
    b = _script("benchmark")

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("run_suite reached: the invocation should have been refused first")

    monkeypatch.setattr(b, "run_suite", must_not_run)
    return b


def _suite_args(tmp_path: Path, *extra: str) -> list[str]:
    """A quick-suite command line that writes under tmp_path (never docs/)."""
    return ["--suite", "quick", "--no-peers", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *extra]


def test_benchmark_refuses_a_run_without_cells(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _usage_error(bench.main, _suite_args(tmp_path, "--methods", "protonet", "--settings", "sinusoid-10s"), capsys)
    assert "no cell to run" in err and "ProtoNet on sinusoid-10s" in err and "regression" in err
    err = _usage_error(bench.main, _suite_args(tmp_path, "--methods", ""), capsys)
    assert "--methods is empty" in err
    err = _usage_error(bench.main, _suite_args(tmp_path, "--settings", ","), capsys)
    assert "--settings is empty" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="no cell to run"):  # the library entry point refuses it too
        _script("benchmark").run_suite(bench.SUITES["quick"], tmp_path / "out", ["protonet"],
                                       [bench.Setting("sinusoid", 0, 10)], work=tmp_path / "work")
    assert not (tmp_path / "out").exists()


def test_benchmark_refuses_a_device_or_data_root_it_cannot_use(bench: ModuleType, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    err = _usage_error(bench.main, _suite_args(tmp_path, "--methods", "protonet", "--device", "cuda"), capsys)
    assert "--device cuda" in err and "no CUDA device" in err and "--device cpu" in err
    err = _usage_error(bench.main, _suite_args(tmp_path, "--device", "gpu"), capsys)
    assert "--device gpu" in err and "cuda:N" in err

    monkeypatch.setenv("METAFORMER_CACHE", str(tmp_path / "cache"))  # no downloaded zip to fall back on
    missing = tmp_path / "nonexistent"
    omniglot = ["--methods", "protonet", "--settings", "omniglot-5w1s"]
    err = _usage_error(bench.main, _suite_args(tmp_path, *omniglot, "--data-root", str(missing)), capsys)
    assert f"data root {missing}" in err and "not a folder" in err and "--data-root" in err
    (tmp_path / "empty").mkdir()
    err = _usage_error(bench.main, _suite_args(tmp_path, *omniglot, "--data-root", str(tmp_path / "empty")), capsys)
    assert "has no omniglot/images_background.zip" in err
    # only the Omniglot cells read the data folder: glyph and sinusoid cells run without one
    specs = bench.make_specs(bench.SUITES["quick"], ["protonet", "maml"], [bench.Setting("glyph", 5, 1)],
                             tmp_path / "work", 1, data_root=str(missing))
    assert specs and bench.data_problem(specs) is None
    assert not (tmp_path / "out").exists()


def test_benchmark_refuses_bad_budgets_and_settings(bench: ModuleType, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    for extra, words in ((["--minutes", "-1"], ("--minutes", "-1")), (["--minutes", "0"], ("--minutes",)),
                         (["--minutes", "nan"], ("--minutes", "nan")), (["--episodes", "0"], ("--episodes", "got 0")),
                         (["--settings", "glyph-0w1s"], ("glyph-0w1s", "at least 1")),
                         (["--settings", "glyph-5w0s"], ("glyph-5w0s",)), (["--settings", "sinusoid-0s"], ("sinusoid-0s",)),
                         (["--methods", "protonet,bogus"], ("unknown method(s) bogus",)),
                         (["--set", "train.steps=-3"], ("cannot build the cells", "train.steps"))):
        err = _usage_error(bench.main, _suite_args(tmp_path, *extra), capsys)
        assert "Traceback" not in err and all(w in err for w in words), (extra, err)
    with pytest.raises(ValueError, match="at least 1"):
        bench.parse_setting("glyph-0w1s")
    assert not (tmp_path / "out").exists()


def test_benchmark_runs_each_method_and_setting_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = _script("benchmark")
    calls: list[tuple] = []
    monkeypatch.setattr(b, "run_suite", lambda suite, out, methods, settings, *a, **k: calls.append((methods, settings)))
    assert b.main(_suite_args(tmp_path, "--methods", "protonet,maml,protonet", "--settings",
                              "glyph-5w1s,sinusoid-10s,glyph-5w1s")) == 0
    assert b.main(_suite_args(tmp_path, "--methods", "maml", "--settings", "")) == 0  # "": the suite's own settings
    assert calls == [(["protonet", "maml"], [b.Setting("glyph", 5, 1), b.Setting("sinusoid", 0, 10)]),
                     (["maml"], list(b.SUITES["quick"].settings))]


def test_all_failed_cells_leave_the_report_and_exit_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cell fails (options its head rejects, found only when the child builds the model): exit 1, the earlier
    report untouched, no panel run, and a log naming each failure with the child's traceback beside it."""
    b = _script("benchmark")
    panels_run: list[Sequence] = []
    # recorded, not run: a real panel is minutes of benchmarking
    monkeypatch.setattr(b, "run_panels", lambda panels, *a, **k: panels_run.append(panels) or [])
    out, work = tmp_path / "out", tmp_path / "work"
    (out / "results").mkdir(parents=True)
    (out / "RESULTS.md").write_text("the last real report\n")
    (out / "results" / "quick.json").write_text('{"kept": true}\n')
    rc = b.main(["--suite", "quick", "--no-peers", "--out", str(out), "--work", str(work), "--methods", "protonet",
                 "--settings", "glyph-5w1s", "--jobs", "1", "--set", "model.options={bogus_option: 1}",
                 "--panels", "fused_op"])
    assert rc == 1
    err = capsys.readouterr().err
    log = work / "failed_cells.log"
    assert "all 1 cell(s) failed" in err and "no report was written" in err and str(log) in err
    assert (out / "RESULTS.md").read_text() == "the last real report\n"
    assert json.loads((out / "results" / "quick.json").read_text()) == {"kept": True}
    assert sorted(p.name for p in (out / "results").iterdir()) == ["quick.json"]  # no plot written
    assert panels_run == []
    text = log.read_text()
    assert text.startswith("glyph-5w1s ProtoNet: ConfigError") and "bogus_option" in text
    stderr_log = b.cell_stderr_path(work, b.make_specs(b.SUITES["quick"], ["protonet"], [b.Setting("glyph", 5, 1)],
                                                       work, 1)[0])
    assert str(stderr_log) in text
    assert "Traceback" in stderr_log.read_text() and "bogus_option" in stderr_log.read_text()


def test_benchmark_usage_text_keeps_its_line_continuations() -> None:
    b = _script("benchmark")
    assert "--gpu-json gpu_quick.json \\\n           [--fused-json gpu_fused_cuda.json]" in b.__doc__
    assert "gpu_quick.json  " not in b.__doc__  # the two usage lines run together when the backslash is lost
    m = _script("bench_meta_train")
    assert "--peers-python python3 \\\n           --peers-script path/to/peers_maml.py" in m.__doc__


def test_bench_meta_train_refuses_bad_cells(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    m = _script("bench_meta_train")
    ran: list[Any] = []
    monkeypatch.setattr(m, "main_parent", ran.append)
    for argv, words in ((["--impls", "bogus"], ("--impls", "bogus", "metaformer_batched")),
                        (["--orders", "xx"], ("--orders", "xx", "so,fo")),
                        (["--configs", "bogus"], ("--configs", "bogus", "omniglot,sinusoid")),
                        (["--steps-list", "1,x"], ("--steps-list", "1,x")), (["--steps-list", "0"], ("--steps-list",)),
                        (["--threads", "0"], ("--threads", "got 0")), (["--timed", "0"], ("--timed",)),
                        (["--impls", "l2l", "--peers-python", str(tmp_path / "none")], ("peers are not found",))):
        err = _usage_error(m.main, argv, capsys)
        assert "Traceback" not in err and all(w in err for w in words), (argv, err)
    assert ran == []
    # what the suite's panels and gpu_session.sh pass is still accepted
    m.main(["--configs", "sinusoid", "--steps-list", "1,5", "--orders", "so", "--threads", "1", "--impls",
            "plain,l2l,higher,torchopt_func,metaformer_batched", "--peers-python", str(tmp_path / "none")])
    assert len(ran) == 1 and ran[0].configs == "sinusoid"


def test_bench_block_ops_checks_its_arguments_and_shows_a_failed_childs_stderr(capsys: pytest.CaptureFixture) -> None:
    m = _script("bench_block_ops")
    assert "--repeats must be >= 1" in _usage_error(m.main, ["--repeats", "0"], capsys)
    assert "--threads must be >= 1" in _usage_error(m.main, ["--threads", "0"], capsys)
    fail = [sys.executable, "-c", "import sys; print('no json'); sys.stderr.write('line 1\\nKernelError: boom\\n'); "
            "sys.exit(3)"]
    with pytest.raises(SystemExit, match=r"(?s)METAFORMER_SIMD=0 failed \(exit status 3\).*KernelError: boom"):
        m.run_child(fail, {}, "METAFORMER_SIMD=0")
    ok = [sys.executable, "-c", "print('progress'); print('{\"kernels\": \"generic\", \"rows\": []}')"]
    assert m.run_child(ok, {}, "METAFORMER_SIMD=0") == {"kernels": "generic", "rows": []}


def test_bench_allocator_checks_its_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    m = _script("bench_allocator")
    assert "--steps must be >= 1" in _usage_error(m.main, ["--steps", "0"], capsys)
    err = _usage_error(m.main, ["--methods", "protonet,bogus"], capsys)
    assert "unknown method(s) bogus" in err and "maml" in err and "--config" not in err
    assert "--methods is empty" in _usage_error(m.main, ["--methods", ","], capsys)
    assert "not a folder" in _usage_error(m.main, ["--data-root", str(tmp_path / "none")], capsys)
    assert {"protonet", "meta_transformer", "maml"} <= set(m.known_methods())  # the defaults are valid


def test_bench_episodes_and_inner_update_check_their_arguments(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    e = _script("bench_episodes")
    for argv, words in ((["--tasks", "0"], "--tasks must be >= 1"), (["--seconds", "0"], "--seconds must be > 0"),
                        (["--workers", "-1"], "--workers must be >= 0"), (["--threads", "0"], "--threads must be >= 1"),
                        (["--data-root", str(tmp_path / "none")], "is not a folder")):
        assert words in _usage_error(e.main, argv, capsys)
    i = _script("bench_inner_update")
    monkeypatch.setattr(i.torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in _usage_error(i.main, ["--device", "cuda"], capsys)


def test_curriculum_script_has_a_usage(tmp_path: Path) -> None:
    # positional arguments only: --help, missing or bad ones get argparse's usage, never a traceback
    script = REPO / "scripts" / "omniglot_mt_20way_curriculum.py"

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)

    shown = run("--help")
    assert shown.returncode == 0 and "RUN_5WAY MINUTES OUT.json [EPISODES]" in shown.stdout, shown.stderr
    for argv, says in (((), "the following arguments are required: RUN_5WAY, MINUTES, OUT.json"),
                       (("run", "soon", "out.json"), "argument MINUTES: invalid float value: 'soon'"),
                       (("run", "0", "out.json"), "MINUTES must be a positive number of minutes, got 0.0")):
        refused = run(*argv)
        assert refused.returncode == 2 and says in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    assert list(tmp_path.iterdir()) == []
