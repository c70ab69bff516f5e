"""Warm start (`train.init_from`): which tensors move, label rows growing for a curriculum, resume, errors."""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest
import torch

from training.checkpoint import CheckpointError, read_checkpoint
from training.config import load_config
from training.trainer import Trainer, train

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"
PROTONET = ["model.name=protonet", "model.options={}"]
MAML = ["model.name=maml", "model.options={inner_steps: 1, inner_lr: 0.4}"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(out: Path, *overrides: str) -> Path:
    train(load_config(TINY, [f"out_dir={out}", "train.steps=3", "train.ckpt_every=0", *overrides]))
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Short runs to start from: ProtoNet, MAML, and a 3-way Meta-Transformer."""
    root = tmp_path_factory.mktemp("sources")
    return {"protonet": _run(root / "protonet", *PROTONET), "maml": _run(root / "maml", *MAML),
            "mt3": _run(root / "mt3")}


def _state(run: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run, with_trainer_state=False).model_state


def test_meta_transformer_backbone_from_protonet(sources: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"out_dir={tmp_path / 'mt'}", f"train.init_from={sources['protonet']}"])
    model = Trainer(cfg).model
    src, got = _state(sources["protonet"]), model.state_dict()
    backbone = [k for k in got if k.startswith("backbone.")]
    assert backbone and all(k in src for k in backbone)
    for k in backbone:
        assert torch.equal(got[k], src[k]), k
    # the transformer has no counterpart in ProtoNet: it keeps the seed's initial values
    fresh = Trainer(load_config(TINY, [f"out_dir={tmp_path / 'fresh'}"])).model.state_dict()
    others = [k for k in got if not k.startswith("backbone.")]
    assert others and all(torch.equal(got[k], fresh[k]) for k in others)
    assert not all(torch.equal(got[k], fresh[k]) for k in backbone)


def test_rename_maps_prefixes_and_no_match_is_an_error(sources: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="init_rename"):
        Trainer(load_config(TINY, [f"out_dir={tmp_path / 'a'}", *PROTONET, f"train.init_from={sources['maml']}"]))
    cfg = load_config(TINY, [f"out_dir={tmp_path / 'b'}", *PROTONET, f"train.init_from={sources['maml']}",
                             "train.init_rename={'net.': ''}"])
    got, src = Trainer(cfg).model.state_dict(), _state(sources["maml"])
    assert all(torch.equal(v, src["net." + k]) for k, v in got.items())


def test_no_match_suggests_the_rename_of_the_tensors_it_names(sources: dict[str, Path], tmp_path: Path) -> None:
    # a MAML checkpoint holds its backbone as net.* and as adapted_module.*: the example and the rename agree
    with pytest.raises(CheckpointError) as exc:
        Trainer(load_config(TINY, [f"out_dir={tmp_path / 'a'}", *PROTONET, f"train.init_from={sources['maml']}"]))
    msg = str(exc.value)
    named = re.search(r"source has e\.g\. '([^']+)', the model e\.g\. '([^']+)'\); .*train\.init_rename=(\{.*?\})", msg)
    assert named, msg
    src_name, model_name, rename = named.group(1), named.group(2), ast.literal_eval(named.group(3))
    ((old, new),) = rename.items()
    assert src_name.startswith(old) and new + src_name[len(old):] == model_name, msg
    assert rename == {"net.": ""} and "matches 28 of the model's 28 tensors" in msg
    # the other way round, a prefix to add: ProtoNet's backbone into MAML's net.
    with pytest.raises(CheckpointError, match=r"train\.init_rename=\{'': 'net\.'\}"):
        Trainer(load_config(TINY, [f"out_dir={tmp_path / 'b'}", *MAML, f"train.init_from={sources['protonet']}"]))


def test_curriculum_grows_label_rows(sources: dict[str, Path], tmp_path: Path) -> None:
    # 3-way model -> 5-way model (max_way follows data.n_way): the 3 trained label rows are kept
    cfg = load_config(TINY, [f"out_dir={tmp_path / 'mt5'}", "data.n_way=5", f"train.init_from={sources['mt3']}"])
    got, src = Trainer(cfg).model.state_dict(), _state(sources["mt3"])
    grown = [k for k, v in got.items() if k in src and v.shape != src[k].shape]
    assert grown == ["label_embedding"]
    lab, old = got["label_embedding"], src["label_embedding"]
    assert lab.shape[0] == 5 and torch.equal(lab[:3], old)
    torch.testing.assert_close(lab[3:].norm(dim=1).mean(), old.norm(dim=1).mean())
    train(cfg)  # and it trains from there
    assert read_checkpoint(tmp_path / "mt5").step == 12


def test_incompatible_shapes_name_the_tensor(sources: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"out_dir={tmp_path / 'wide'}", "model.backbone_options={hidden: 12}",
                             f"train.init_from={sources['protonet']}"])
    with pytest.raises(CheckpointError, match=r"backbone\.features\.0\.weight: source \(8, .* vs model \(12, "):
        Trainer(cfg)
    with pytest.raises(CheckpointError, match="init_from"):
        Trainer(load_config(TINY, [f"out_dir={tmp_path / 'missing'}", f"train.init_from={tmp_path / 'nowhere'}"]))
    # a fixed simplex code of 3 vertices is no prefix of a 5-vertex one: it must not grow
    fixed = ["model.options={d_model: 16, n_layers: 1, n_heads: 2, label_code: fixed}"]
    src = _run(tmp_path / "fixed3", *fixed)
    with pytest.raises(CheckpointError, match=r"label_embedding: source \(3, 16\) vs model \(5, 16\)"):
        Trainer(load_config(TINY, [f"out_dir={tmp_path / 'fixed5'}", *fixed, "data.n_way=5", f"train.init_from={src}"]))


def test_resume_keeps_the_checkpoint_not_the_source(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    over = [f"out_dir={out}", f"train.init_from={sources['protonet']}", "train.ckpt_every=2"]
    train(load_config(TINY, [*over, "train.steps=4"]))
    trained = _state(out)
    resumed = Trainer(load_config(TINY, [*over, "train.steps=6"]), resume=True)
    assert resumed.step == 4
    assert all(torch.equal(v, trained[k]) for k, v in resumed.model.state_dict().items())
    src = _state(sources["protonet"])
    assert not torch.equal(resumed.model.state_dict()["backbone.features.0.weight"], src["backbone.features.0.weight"])


def test_a_frozen_backbone_without_a_warm_start_warns(sources: dict[str, Path], tmp_path: Path) -> None:
    frozen = "model.options={freeze_backbone: true}"
    with pytest.warns(UserWarning, match=r"freeze_backbone is true but train.init_from is not set.*conv4"):
        Trainer(load_config(TINY, [f"out_dir={tmp_path / 'random'}", frozen]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(load_config(TINY, [f"out_dir={tmp_path / 'warm'}", frozen, f"train.init_from={sources['protonet']}"]))
        Trainer(load_config(TINY, [f"out_dir={tmp_path / 'trains'}"]))
