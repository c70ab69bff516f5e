"""Checkpoints: contents, pruning, clear errors for damaged / foreign checkpoints and configs, NaN handling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from metaformer.cli import main
from training.checkpoint import CheckpointError, NonFiniteStateError, list_checkpoints, read_checkpoint, save_checkpoint
from training.config import load_config
from training.registry import build_model
from training.trainer import NonFiniteLossError, train

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "tiny"
    cfg = load_config(TINY, [f"out_dir={out}", "train.steps=8", "train.ckpt_every=2", "train.keep_last=2",
                             "train.val_every=4", "train.val_episodes=6"])
    train(cfg)
    return out


def test_checkpoint_contents_and_pruning(tiny_run: Path) -> None:
    names = [p.name for p in list_checkpoints(tiny_run)]
    best = json.loads((tiny_run / "best.json").read_text())
    # keep_last=2 keeps steps 6 and 8, plus the best validation step (4 or 8).
    assert names[-2:] == ["step-00000006", "step-00000008"]
    assert best["dir"] in names and len(names) == (2 if best["dir"] in names[-2:] else 3)
    ckpt = read_checkpoint(tiny_run)
    assert ckpt.step == 8 and ckpt.model_name == "meta_transformer"
    state = ckpt.trainer_state
    assert set(state) >= {"optimizer", "scheduler", "scaler", "rng_per_rank", "step", "episodes_seen"}
    assert state["episodes_seen"] == 8 * 4 and state["scheduler"]["last_epoch"] == 8
    assert len(state["optimizer"]["state"]) > 0 and "torch" in state["rng_per_rank"][0]
    assert (ckpt.path / "model.safetensors").read_bytes()[:8]  # safetensors header length prefix
    assert not any(p.name.startswith(".tmp-") for p in tiny_run.iterdir())
    rows = (tiny_run / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,episodes,loss,accuracy") and any(r.startswith("8,32,") for r in rows)


def test_truncated_weights_give_clear_error(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run / "step-00000008", copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(copy)
    (copy / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json"):
        read_checkpoint(copy)


def test_checkpoint_of_another_model_gives_clear_error(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    # Same architecture name, different shape: the message names the mismatching tensors.
    code = main(["eval", "--checkpoint", str(tiny_run), "--config", str(TINY), "--set", "model.options.d_model=32",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit the model" in err and "shape mismatch" in err
    code = main(["eval", "--checkpoint", str(tiny_run), "--config", str(TINY), "--set", "model.name=protonet", "model.options={}",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "holds a 'meta_transformer' model" in err and "'protonet'" in err


def test_resume_with_mismatched_config_is_refused(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--config", str(TINY), "--resume", "--set", f"out_dir={tiny_run}", "optim.lr=0.5",
                 "train.steps=10"])
    err = capsys.readouterr().err
    assert code == 2 and "does not match" in err and "optim.lr: checkpoint 0.003 vs config 0.5" in err
    # Starting a fresh run over existing checkpoints is refused too (it would mix two runs).
    code = main(["train", "--config", str(TINY), "--set", f"out_dir={tiny_run}"])
    assert code == 2 and "--resume" in capsys.readouterr().err


def test_nan_loss_stops_naming_the_step_and_writes_no_nan_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "nan"
    # A huge SGD step blows the weights up within a few steps; clipping off so the gradient is not tamed.
    cfg = load_config(TINY, [f"out_dir={out}", "optim.name=sgd", "optim.lr=1e18", "optim.momentum=0", "optim.grad_clip=null",
                             "optim.warmup_steps=0", "optim.schedule=constant", "train.steps=30", "train.ckpt_every=1"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite (loss|gradient norm|buffers) .* at step (\d+)") as err:
        train(cfg)
    step = int(err.value.args[0].split(" at step ")[1].split()[0])
    ckpts = list_checkpoints(out)
    assert ckpts and int(ckpts[-1].name.split("-")[1]) == step - 1
    for path in ckpts:
        weights = read_checkpoint(path, with_trainer_state=False).model_state
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_nan_policy_skip_skips_and_counts(tmp_path: Path) -> None:
    out = tmp_path / "skip"
    cfg = load_config(TINY, [f"out_dir={out}", "optim.name=sgd", "optim.lr=1e18", "optim.momentum=0", "optim.grad_clip=null",
                             "optim.warmup_steps=0", "optim.schedule=constant", "train.steps=30", "train.nan_policy=skip",
                             "train.max_skips=3"])
    with pytest.raises(NonFiniteLossError, match="consecutive non-finite steps"):
        train(cfg)


def test_refuses_to_write_nonfinite_weights(tmp_path: Path) -> None:
    cfg = load_config(TINY)
    model = build_model(cfg)
    state = model.state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone().fill_(math.nan)
    with pytest.raises(NonFiniteStateError, match=key):
        save_checkpoint(tmp_path, step=1, model_state=state, trainer_state={}, config=cfg, model_name="meta_transformer",
                        model_class="MetaTransformer")
    assert list_checkpoints(tmp_path) == []


def test_export_is_weights_only_and_evaluates_like_its_source(tiny_run: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """`metaformer export` keeps weights, config and a verified manifest, drops the trainer state, and evaluates and
    warm-starts exactly like the run it came from; it refuses damaged sources and non-empty destinations."""
    from training.evaluation import read_report

    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(tiny_run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "meta.json", "model.safetensors"]
    src, exp = read_checkpoint(tiny_run, with_trainer_state=False), read_checkpoint(out, with_trainer_state=False)
    assert exp.step == src.step == 8 and exp.model_name == src.model_name and exp.config == src.config
    assert src.model_state.keys() == exp.model_state.keys()
    assert all(torch.equal(src.model_state[k], exp.model_state[k]) for k in src.model_state)
    with pytest.raises(CheckpointError, match="weights-only export"):
        read_checkpoint(out)  # a resume needs the trainer state; the error says what the export is good for

    scores = []
    for name, ckpt in (("src", tiny_run), ("exp", out)):
        assert main(["eval", "--checkpoint", str(ckpt), "--episodes", "6", "--no-progress",
                     "--out", str(tmp_path / name)]) == 0
        _, (res,) = read_report(tmp_path / name)
        scores.append(res.per_episode)
    assert len(scores[0]) == 6 and scores[0] == scores[1]

    from training.warm_start import warm_start

    fresh = build_model(load_config(TINY, []))
    report = warm_start(fresh, out)  # what train.init_from does with the export
    assert not report.not_in_source and not report.partial and not report.unused
    assert all(torch.equal(v, src.model_state[k]) for k, v in fresh.state_dict().items())

    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tiny_run), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_run / "step-00000008", damaged)
    (damaged / "model.safetensors").write_bytes((damaged / "model.safetensors").read_bytes()[:1000])
    assert main(["export", "--checkpoint", str(damaged), "--out", str(tmp_path / "never")]) == 2
    assert "truncated" in capsys.readouterr().err and not (tmp_path / "never").exists()
