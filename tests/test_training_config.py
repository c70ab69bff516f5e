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


SINUSOID = REPO / "training" / "configs" / "sinusoid.yaml"


@pytest.mark.parametrize(("config", "override", "match"), [
    (SINUSOID, "data.n_way=20", r"data\.n_way=20 is not used with data\.source=sinusoid: .*no classes; remove it "
                                r"\(its default is 5\)"),
    (SINUSOID, "data.image_size=64", r"data\.image_size=64 is not used with data\.source=sinusoid: .*not images"),
    (SINUSOID, "data.root=/data", r"data\.root=/data is not used with data\.source=sinusoid: .*generated"),
    (TINY, "data.root=/data", r"data\.root=/data is not used with data\.source=glyph"),
    (TINY, "optim.momentum=0.5", r"optim\.momentum=0\.5 is not used with optim\.name=adamw: only sgd has momentum"),
    (TINY, "optim.name=sgd optim.betas=[0.8, 0.9]", r"optim\.betas=\[0\.8, 0\.9\] is not used with optim\.name=sgd"),
    (TINY, "train.max_skips=3", r"train\.max_skips=3 is not used with train\.nan_policy=stop"),
])
def test_a_setting_the_run_would_ignore_is_refused(config: Path, override: str, match: str) -> None:
    """Set to anything but its default, a key the source / optimiser / NaN policy never reads is an error (it was
    accepted and silently ignored: a sinusoid run with data.n_way=20 trained as if it were not set)."""
    overrides = override.split(" ", 1) if override.startswith("optim.name=") else [override]
    with pytest.raises(ConfigError, match=match):
        load_config(config, overrides)


def test_unread_keys_at_their_default_and_where_read_are_accepted() -> None:
    # the default value itself: full config dumps (a run's config.yaml) hold every key
    assert load_config(SINUSOID, ["data.n_way=5", "data.image_size=28"]).data.n_way == 5
    assert load_config(TINY, ["optim.name=sgd", "optim.momentum=0.5"]).optim.momentum == 0.5
    assert load_config(TINY, ["train.nan_policy=skip", "train.max_skips=3"]).train.max_skips == 3
    assert load_config(TINY, ["data.source=omniglot", "data.root=/data"]).data.root == "/data"


def test_a_stored_config_with_an_unread_setting_still_loads_and_resumes() -> None:
    """Checkpoints written before the check keep working: readable, and resumable with the setting removed."""
    from training.config import config_from_dict

    stored = load_config(SINUSOID).to_dict()
    stored["data"]["n_way"] = 20
    with pytest.raises(ConfigError, match="data.n_way=20"):
        config_from_dict(stored)
    old = config_from_dict(stored, check_unread=False)  # as read_checkpoint reads a stored config
    assert old.data.n_way == 20
    assert config_differences(old, load_config(SINUSOID)) == {}  # n_way changes nothing a sinusoid run computes
    glyph = load_config(TINY)
    assert set(config_differences(glyph, load_config(TINY, ["data.n_way=4"]))) == {"data.n_way"}


def test_a_checkpoint_whose_config_holds_an_unread_setting_is_still_readable(tmp_path: Path) -> None:
    from training.checkpoint import read_checkpoint, save_checkpoint
    from training.config import config_from_dict
    from training.registry import build_model

    stored = load_config(SINUSOID).to_dict()
    stored["data"]["n_way"] = 20
    cfg = config_from_dict(stored, check_unread=False)
    model = build_model(cfg)
    save_checkpoint(tmp_path, step=1, model_state=model.state_dict(), trainer_state={}, config=cfg,
                    model_name="meta_transformer", model_class=type(model).__name__)
    assert read_checkpoint(tmp_path, with_trainer_state=False).config.data.n_way == 20
