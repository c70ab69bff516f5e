"""Config loading: overrides, typed coercion, unknown keys listing the valid ones, resume compatibility."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaformer.cli import main
from training.config import ConfigError, config_differences, load_config, valid_keys

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"
CONFIGS = sorted((REPO / "training" / "configs").glob("*.yaml"))


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(TINY, ["optim.lr=1e-2", "train.steps=7", "optim.betas=[0.8, 0.9]", "model.options.d_model=32",
                             "train.num_threads=null"])
    assert cfg.optim.lr == pytest.approx(0.01) and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.options["d_model"] == 32 and cfg.model.options["n_layers"] == 1  # merged, not replaced
    assert cfg.train.num_threads is None


def test_unknown_override_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["train.stepz=3"])
    msg = str(err.value)
    assert "train.stepz" in msg and "valid keys" in msg and "train.steps" in msg and "train.meta_batch" in msg


def test_unknown_yaml_key_lists_valid_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: " + str(TINY) + "\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "optim.learning_rate" in str(err.value) and "optim.lr" in str(err.value)
    assert all(k in str(err.value) for k in ("optim.warmup_steps", "optim.grad_clip"))


def test_bad_values_name_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"train\.precision must be one of fp32, bf16, fp16"):
        load_config(TINY, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"train\.steps.*expected int"):
        load_config(TINY, ["train.steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TINY, ["train.steps"])


def test_cli_reports_bad_key_with_valid_keys(capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--config", str(TINY), "--set", "optim.nme=sgd"])
    err = capsys.readouterr().err
    assert code == 2 and "optim.nme" in err and "optim.name" in err


def test_every_shipped_config_loads() -> None:
    names = {p.name for p in CONFIGS}
    for expected in ("glyph_demo.yaml", "sinusoid.yaml", "tiny.yaml", "omniglot_5w1s_protonet.yaml",
                     "omniglot_20w1s_maml.yaml", "omniglot_5w1s_meta_transformer.yaml"):
        assert expected in names
    for path in CONFIGS:
        if path.name.startswith("_"):
            continue
        cfg = load_config(path)
        assert cfg.model.name and cfg.train.steps >= 1, path


def test_config_differences_ignore_run_control_keys() -> None:
    a = load_config(TINY)
    b = load_config(TINY, ["train.steps=99", "out_dir=/elsewhere", "train.log_every=5"])
    c = load_config(TINY, ["optim.lr=0.5", "model.options.d_model=32"])
    assert config_differences(a, b) == {}
    diffs = config_differences(a, c)
    assert set(diffs) == {"optim.lr", "model.options"}
    assert "train.steps" in valid_keys()
