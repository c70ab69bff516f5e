"""Evaluation: the 95% confidence interval against a hand computation, per-episode scores, reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from metaformer.data import EpisodeBatch
from training.config import load_config
from training.evaluation import (EvalResult, combine_reports, episode_scores, evaluate, markdown_table, mean_ci95,
                                 paired_difference, paired_table, write_report)
from training.registry import build_episodes, build_model

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"


def test_ci95_matches_hand_computation() -> None:
    values = [0.6, 0.8, 1.0, 0.4, 0.7]
    # mean = 3.5 / 5 = 0.7; deviations -0.1, 0.1, 0.3, -0.3, 0; sum of squares 0.2; sample var 0.05
    mean, ci, std = mean_ci95(values)
    assert mean == pytest.approx(0.7)
    assert std == pytest.approx(math.sqrt(0.05))
    assert ci == pytest.approx(1.959963984540054 * math.sqrt(0.05) / math.sqrt(5))  # = 0.19600
    assert ci == pytest.approx(0.19600, abs=1e-5)
    assert mean_ci95([0.5]) == (0.5, 0.0, 0.0)
    with pytest.raises(ValueError):
        mean_ci95([])


def test_episode_scores_ignore_padding() -> None:
    # Task 0: 3 real queries, 2 right. Task 1: 2 real queries (third is padding), 1 right.
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]], [[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]]])
    qy = torch.tensor([[0, 1, 1], [0, 1, -1]])
    qm = torch.tensor([[True, True, True], [True, True, False]])
    batch = EpisodeBatch(
        support_x=torch.zeros(2, 2, 1), support_y=torch.tensor([[0, 1], [0, 1]]), support_mask=torch.ones(2, 2, dtype=torch.bool),
        query_x=torch.zeros(2, 3, 1), query_y=qy, query_mask=qm, n_way=torch.tensor([2, 2]), class_names=[["a", "b"]] * 2,
    )
    assert episode_scores(logits, batch) == pytest.approx([2 / 3, 1 / 2])


def test_evaluate_real_model_on_fixed_episodes() -> None:
    cfg = load_config(TINY, ["eval.episodes=10", "eval.batch_tasks=4"])
    torch.manual_seed(0)
    model = build_model(cfg)
    episodes = build_episodes(cfg, "test")
    res = evaluate(model, episodes, 10, 4, torch.device("cpu"), name="mt")
    assert res.episodes == 10 and len(res.per_episode) == 10 and res.metric == "accuracy"
    # The per-episode values are the accuracies of each episode's own forward pass.
    model.eval()
    with torch.no_grad():
        for i in (0, 7):
            b = episodes.batch(i, 1)
            acc = float((model(b).argmax(-1) == b.query_y).float().mean())
            assert res.per_episode[i] == pytest.approx(acc)
    m, ci, _ = mean_ci95(res.per_episode)
    assert (res.mean, res.ci95) == (pytest.approx(m), pytest.approx(ci))
    # Fixed episodes: the same seed gives the same images.
    again = build_episodes(cfg, "test").batch(3, 2)
    assert torch.equal(again.query_x, episodes.batch(3, 2).query_x)


def test_cpu_passes_are_capped_by_input_size_and_change_no_score(monkeypatch: pytest.MonkeyPatch) -> None:
    from training import evaluation

    class Probe:
        def __init__(self, n_images: int, side: int = 28) -> None:
            self.support_x, self.query_x = torch.zeros(1, n_images // 2, 1, side, side), torch.zeros(1, n_images // 2, 1, side, side)

    cpu = torch.device("cpu")
    # Omniglot: 5-way 1-shot 15 queries = 80 images per task, 20-way 1-shot 15 queries = 320
    assert evaluation.tasks_per_forward(16, Probe(80), cpu) == 12
    assert evaluation.tasks_per_forward(16, Probe(320), cpu) == 3
    assert evaluation.tasks_per_forward(16, Probe(4000), cpu) == 1
    assert evaluation.tasks_per_forward(16, Probe(320), torch.device("meta")) == 16  # accelerators keep batch_tasks
    cfg = load_config(TINY)
    torch.manual_seed(0)
    model = build_model(cfg)
    episodes = build_episodes(cfg, "test")
    whole = evaluate(model, episodes, 9, 9, cpu)
    monkeypatch.setattr(evaluation, "CPU_INPUT_ELEMENTS_PER_FORWARD", 2 * 9 * 16 * 16)  # 2 tasks of 9 images
    split = evaluate(model, episodes, 9, 9, cpu)
    assert split.per_episode == pytest.approx(whole.per_episode, abs=0) and split.ece == pytest.approx(whole.ece)


def test_report_json_and_markdown(tmp_path: Path) -> None:
    a = EvalResult("A", "accuracy", 0.5, 0.04, 0.1, 600, step=10, per_episode=[0.5] * 3)
    b = EvalResult("B", "accuracy", 0.625, 0.0312, 0.1, 600, step=20)
    jpath, mpath = write_report([a, b], tmp_path, header={"episodes": 600})
    table = mpath.read_text()
    assert "| A | accuracy (%) | 50.00 | ± 4.00 | 600 | 10 |" in table
    assert "| B | accuracy (%) | 62.50 | ± 3.12 | 600 | 20 |" in table
    data = json.loads(jpath.read_text())
    assert data["episodes"] == 600 and [r["name"] for r in data["results"]] == ["A", "B"]
    assert markdown_table([a]).count("\n") == 3


@pytest.mark.parametrize("name", ["maml", "probmaml", "lstm"])
def test_predict_builds_no_meta_graph_and_matches_a_tracked_adaptation(name: str) -> None:
    """evaluation.predict adapts without a graph to the meta-parameters, with the same predictions as a tracked run."""
    from metaformer.data import EpisodeSampler, GlyphFamily
    from metaformer.heads import build_head
    from metaformer.models import build_backbone
    from training.evaluation import predict

    torch.manual_seed(0)
    head = build_head(name, build_backbone("conv4", in_channels=1, hidden=8), n_way=3, inner_steps=2).eval()
    batch = EpisodeSampler(GlyphFamily(seed=0, image_size=16), 3, 2, 2, seed=0).batch(0, 2)
    saved: dict[str, int] = {"predict": 0, "tracked": 0}

    def counting(key: str) -> torch.autograd.graph.saved_tensors_hooks:
        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[key] += 1
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    with counting("predict"):
        out = predict(head, batch)
    assert not out.requires_grad and all(p.grad is None for p in head.parameters())
    with counting("tracked"), torch.enable_grad():  # as meta-training runs it (second order for MAML)
        tracked = head.adapt_batch(batch.support_x, batch.support_y, batch.support_mask, batch.n_way)(
            batch.query_x, batch.query_mask)
    assert tracked.requires_grad
    # not bit-identical: a second-order support pass runs the Conv-4 stem's conv as patches @ weight
    # (metaformer.ops.conv_bn_relu_pool.conv3x3_patches), the no-graph adaptation as F.conv2d
    tol = dict(rtol=1e-5, atol=1e-5) if name in ("maml", "probmaml") else dict(rtol=0, atol=0)
    torch.testing.assert_close(out, tracked.detach(), **tol)
    # the inner loop still saves tensors for its own gradients, but far fewer than a graph kept for the meta-gradient
    assert 0 < saved["predict"] < saved["tracked"]


def test_paired_difference_matches_hand_computation_and_refuses_other_episodes(tmp_path: Path) -> None:
    a = [0.9, 0.8, 1.0, 0.7, 0.95, 0.85]
    b = [0.95, 0.8, 1.0, 0.75, 0.9, 0.95]
    ra = EvalResult("A", "accuracy", sum(a) / 6, 0.0, 0.0, 6, per_episode=a, episodes_digest="d1")
    rb = EvalResult("B", "accuracy", sum(b) / 6, 0.0, 0.0, 6, per_episode=b, episodes_digest="d1")
    d = paired_difference(ra, rb)
    diffs = [y - x for x, y in zip(a, b)]
    mean = sum(diffs) / 6
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 5)
    assert d.mean == pytest.approx(mean) and d.ci95 == pytest.approx(1.959963984540054 * sd / math.sqrt(6))
    assert (d.wins, d.losses, d.episodes) == (3, 1, 6) and d.significant == (abs(mean) > d.ci95)
    # regression: a lower MSE is the better episode
    mse = paired_difference(EvalResult("A", "mse", 0, 0, 0, 2, per_episode=[1.0, 2.0]),
                            EvalResult("B", "mse", 0, 0, 0, 2, per_episode=[0.5, 3.0]))
    assert (mse.wins, mse.losses) == (1, 1) and mse.mean == pytest.approx(0.25)
    assert "| B | +0.2500 | ± " in paired_table([EvalResult("A", "mse", 0, 0, 0, 2, per_episode=[1.0, 2.0]),
                                                 EvalResult("B", "mse", 0, 0, 0, 2, per_episode=[0.5, 3.0])])
    with pytest.raises(ValueError, match="same episodes"):
        paired_difference(ra, EvalResult("C", "accuracy", 0, 0, 0, 5, per_episode=b[:5]))
    with pytest.raises(ValueError, match="different episodes"):
        paired_difference(ra, EvalResult("D", "accuracy", 0, 0, 0, 6, per_episode=b, episodes_digest="d2"))
    with pytest.raises(ValueError, match="per-episode scores"):
        paired_difference(ra, EvalResult("E", "accuracy", 0, 0, 0, 6))
    assert paired_table([ra, EvalResult("D", "accuracy", 0, 0, 0, 6, per_episode=b, episodes_digest="d2")]) == ""
    # the paired interval of correlated scores is narrower than either result's own interval
    assert d.ci95 < mean_ci95(a)[1] and d.ci95 < mean_ci95(b)[1]
    # eval.json files on the same settings but other data (another fingerprint) are refused by compare
    write_report([ra], tmp_path / "a", header={"episodes": 6})
    write_report([EvalResult("F", "accuracy", 0, 0, 0, 6, per_episode=b, episodes_digest="zz")], tmp_path / "f",
                 header={"episodes": 6})
    with pytest.raises(ValueError, match="different episodes"):
        combine_reports([tmp_path / "a", tmp_path / "f"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not an eval.json"):
        combine_reports([tmp_path / "bad.json"])


def test_episode_digest_follows_the_episodes() -> None:
    cfg = load_config(TINY)
    torch.manual_seed(0)
    model = build_model(cfg)
    episodes = build_episodes(cfg, "test")
    one = evaluate(model, episodes, 6, 3, torch.device("cpu"))
    assert one.episodes_digest == evaluate(model, episodes, 6, 2, torch.device("cpu")).episodes_digest  # batching
    other_seed = build_episodes(load_config(TINY, ["eval.seed=7"]), "test")
    assert evaluate(model, other_seed, 6, 3, torch.device("cpu")).episodes_digest != one.episodes_digest
    assert evaluate(model, episodes, 5, 3, torch.device("cpu")).episodes_digest != one.episodes_digest
