"""The tools behind a GPU session, checked on the CPU: the peers' device child, the GPU rows of the report, the script.

scripts/peers_on_device.py must run ../shared/bench/peers_maml.py's own implementations unchanged (same meta-gradient
to the bit as the peers' child when both run on the CPU); scripts/benchmark.py's GPU section must hold the ratios of
the rows it reads; scripts/gpu_session.sh must refuse bad use and skip steps past its deadline instead of running them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO.parent / "shared" / "bench" / "peers_maml.py"


def _script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"metaformer_script_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _result(cmd: list[str]) -> dict:
    """Run a child and parse its RESULT line."""
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_device_child_runs_the_peers_code_unchanged(tmp_path: Path) -> None:
    if not PEERS.is_file():
        pytest.fail(f"{PEERS} missing: the peers' benchmark set-up (../shared/bench) is part of the shared folder")
    bench = _script("bench_meta_train")
    model, batch = bench.initial_setup("sinusoid", 0)
    shared = tmp_path / "shared.pt"
    torch.save({"init": model.state_dict(), "batch": batch}, shared)
    common = ["--config", "sinusoid", "--impl", "plain", "--steps", "2", "--order", "so", "--shared", str(shared),
              "--threads", "1", "--warmup", "0", "--timed", "2"]
    native = _result([sys.executable, str(PEERS), "--child", *common, "--grad-out", str(tmp_path / "native.pt")])
    device = _result([sys.executable, "scripts/peers_on_device.py", "--peers-script", str(PEERS), "--device", "cpu",
                      *common, "--grad-out", str(tmp_path / "device.pt")])
    assert native["status"] == device["status"] == "ok" and device["device"] == "cpu"
    assert device["meta_batch"] == 25 and len(device["times_s"]) == 2 and device["tasks_per_s"] > 0
    assert device["meta_loss"] == native["meta_loss"]
    g_native, g_device = torch.load(tmp_path / "native.pt"), torch.load(tmp_path / "device.pt")
    assert g_native.keys() == g_device.keys()
    for k in g_native:
        assert torch.equal(g_native[k], g_device[k]), k
    # the same cell through our head (bench_meta_train's child, --device cpu) agrees with the peers' loop
    ours = _result([sys.executable, "scripts/bench_meta_train.py", "--child", "--device", "cpu", *common[:2],
                    "--impl", "metaformer_batched", *common[4:], "--grad-out", str(tmp_path / "ours.pt")])
    assert ours["status"] == "ok" and ours["device"] == "cpu"
    g_ours = torch.load(tmp_path / "ours.pt")
    num = sum(float((g_ours[k].double() - g_native[k].double()).pow(2).sum()) for k in g_native) ** 0.5
    den = sum(float(g_native[k].double().pow(2).sum()) for k in g_native) ** 0.5
    assert num / den < 1e-5
    # a missing peers script is a failed row that names the option, not a crash of the parent
    missing = _result([sys.executable, "scripts/peers_on_device.py", "--peers-script", str(tmp_path / "nope.py"),
                       "--device", "cpu", *common, "--grad-out", str(tmp_path / "x.pt")])
    assert missing["status"] == "run failed" and "--peers-script" in missing["error"]


def _row(impl: str, tasks_per_s: float, **extra: object) -> dict:
    return {"config": "omniglot", "steps": 1, "order": "so", "impl": impl, "status": "ok", "tasks_per_s": tasks_per_s,
            "peak_device_mib": 100.0, "peak_rss_mib": 700.0, **extra}


def test_gpu_section_holds_the_ratios_it_reads(tmp_path: Path) -> None:
    b = _script("benchmark")
    rows = [_row("plain", 20.0), _row("l2l", 10.0, grad_rel_plain32=1e-7), _row("higher", 16.0),
            _row("metaformer_loop", 30.0), _row("metaformer_batched", 250.0, grad_rel_plain32=2e-7, grad_rel_plain64=3e-7),
            {"config": "omniglot", "steps": 1, "order": "so", "impl": "torchopt_func", "status": "import/setup failed",
             "error": "ModuleNotFoundError: No module named 'torchopt'"}]
    path = tmp_path / "mt.json"
    path.write_text(json.dumps({"results": rows, "device": "cuda", "device_name": "Test GPU", "commit": "abc",
                                "command": "scripts/bench_meta_train.py --device cuda", "args": {"device": "cuda"}}))
    text = "\n".join(b.gpu_meta_train_lines(b.load_gpu_meta_train([path])))
    assert "| omniglot | 1 | SO | metaformer_batched | 250.0 | 12.50 | 25.00 | 100.0 | 700 | 2.0e-07 | 3.0e-07 |" in text
    assert "| omniglot | 1 | SO | plain | 20.0 | 1.00 | 2.00 | 100.0 | 700 | (ref) | - |" in text
    assert "import/setup failed" in text and "No module named 'torchopt'" in text
    assert "omniglot 1-step SO: metaformer_batched 25.0x learn2learn" in text
    assert "Test GPU" in text and "`abc`" in text
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"results": rows, "device": "cpu", "args": {"device": "cpu"}}))
    with pytest.raises(SystemExit, match="not a GPU"):
        b.load_gpu_meta_train([cpu])
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(SystemExit, match="not a scripts/bench_meta_train.py"):
        b.load_gpu_meta_train([path, broken])


def test_gpu_session_script_refuses_bad_use_and_keeps_its_deadline(tmp_path: Path) -> None:
    script = REPO / "scripts" / "gpu_session.sh"
    p = subprocess.run(["bash", str(script), "nonsense"], capture_output=True, text=True)
    assert p.returncode == 2 and "usage" in p.stderr
    env = {**os.environ, "DEVICE": "cpu", "PY": sys.executable, "PEERS_PY": sys.executable, "SKIP_BUILD": "1",
           "OUT": str(tmp_path / "out"), "GPU_SESSION_SECONDS": "0"}
    p = subprocess.run(["bash", str(script), "checks"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    for name in ("environment", "peers", "build", "tests_gpu", "meta_train_so"):
        assert f"=== {name}: skipped, deadline reached" in p.stdout
        assert f"{name}=skipped" in p.stdout.splitlines()[-1]
    assert (tmp_path / "out" / "gpu_checks.log").read_text().count("skipped, deadline reached") == 5
    assert not (tmp_path / "out" / "gpu_meta_train.json").exists()


def test_a_copy_without_git_knows_its_commit_from_the_recorded_tree(tmp_path: Path) -> None:
    """The GPU machine may get the working tree without .git: `record-tree` (run by `prepare`) writes the commit and its
    blob ids; `tree-commit` there prints the commit and 1 when a tracked file's content differs or is missing."""
    script = REPO / "scripts" / "gpu_session.sh"
    carry = tmp_path / "carry"
    env = {**os.environ, "GPU_CARRY": str(carry), "PY": sys.executable}
    subprocess.run(["bash", str(script), "record-tree"], check=True, env=env, cwd=REPO)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
    assert (carry / "commit").read_text().strip() == head
    lines = (carry / "tree.txt").read_text().splitlines()
    assert any(line.endswith("\tscripts/gpu_session.sh") for line in lines) and len(lines) > 100
    # the copy: pyproject.toml as committed (compared), and the script under test (not compared)
    (carry / "tree.txt").write_text("".join(line + "\n" for line in lines if line.endswith("\tpyproject.toml")))
    copy = tmp_path / "copy"
    (copy / "scripts").mkdir(parents=True)
    (copy / "scripts" / "gpu_session.sh").write_bytes(script.read_bytes())
    (copy / "pyproject.toml").write_bytes(
        subprocess.run(["git", "show", "HEAD:pyproject.toml"], capture_output=True, cwd=REPO, check=True).stdout)

    def tree_commit() -> tuple[str, str]:
        p = subprocess.run(["bash", str(copy / "scripts" / "gpu_session.sh"), "tree-commit"], capture_output=True,
                           text=True, env=env, check=True)
        return p.stdout.strip(), p.stderr

    assert tree_commit() == (f"{head} 0", "")
    with open(copy / "pyproject.toml", "a") as f:
        f.write("# changed\n")
    out, err = tree_commit()
    assert out == f"{head} 1" and "pyproject.toml differs" in err
    (copy / "pyproject.toml").unlink()
    assert tree_commit()[0] == f"{head} 1"
