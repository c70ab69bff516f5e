"""ProtoNet and MatchingNet against their formulas; padding and n_way handling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaformer.data import Episode, EpisodeBatch
from metaformer.heads import MatchingNet, ProtoNet, build_head
from padded_episodes import Flat, episodes


pytestmark = pytest.mark.usefixtures("one_thread")


def test_protonet_logits_are_negative_squared_distances_to_class_means() -> None:
    torch.manual_seed(0)
    head = ProtoNet(Flat(), 3)
    eps = episodes()
    batch = EpisodeBatch.collate(eps)
    logits = head.adapt_batch(batch.support_x, batch.support_y, batch.support_mask, batch.n_way)(batch.query_x, batch.query_mask)
    for t, e in enumerate(eps):
        s, q = head.backbone(e.support_x), head.backbone(e.query_x)
        means = torch.stack([s[e.support_y == c].mean(0) for c in range(e.n_way)])
        want = -((q[:, None, :] - means[None]) ** 2).sum(-1)
        assert torch.allclose(logits[t, : len(q), : e.n_way], want, atol=1e-5)
        assert bool(torch.isinf(logits[t, :, e.n_way :]).all())
    single = head.adapt(eps[1].support_x, eps[1].support_y, n_way=2)(eps[1].query_x)
    assert torch.allclose(single[:, :2], logits[1, :4, :2], atol=1e-5)


def test_matchingnet_probabilities_follow_cosine_attention() -> None:
    torch.manual_seed(0)
    head = MatchingNet(Flat(), 3, scale=2.0)
    eps = episodes(1)
    batch = EpisodeBatch.collate(eps)
    logits = head.adapt_batch(batch.support_x, batch.support_y, batch.support_mask, batch.n_way)(batch.query_x, batch.query_mask)
    for t, e in enumerate(eps):
        s, q = head.backbone(e.support_x), head.backbone(e.query_x)
        att = (2.0 * F.normalize(q, dim=-1) @ F.normalize(s, dim=-1).T).softmax(-1)
        probs = att @ F.one_hot(e.support_y, e.n_way).float()
        assert torch.allclose(logits[t, : len(q), : e.n_way].exp(), probs, atol=1e-5)


def test_matchingnet_fce_ignores_padding() -> None:
    """Each task of a padded batch gets the same FCE output as when adapted alone."""
    torch.manual_seed(0)
    head = MatchingNet(Flat(), 3, fce=True, fce_steps=3)
    eps = episodes(2)
    batch = EpisodeBatch.collate(eps)
    logits = head.adapt_batch(batch.support_x, batch.support_y, batch.support_mask, batch.n_way)(batch.query_x, batch.query_mask)
    for t, e in enumerate(eps):
        alone = head.adapt(e.support_x, e.support_y, n_way=e.n_way)(e.query_x)
        assert torch.allclose(logits[t, :, : e.n_way], alone[:, : e.n_way], atol=1e-5)
    loss, _ = head.loss(batch)
    loss.backward()
    assert head.support_lstm.weight_ih_l0.grad.abs().sum() > 0 and head.query_cell.weight_ih.grad.abs().sum() > 0


def test_metric_heads_by_name() -> None:
    assert isinstance(build_head("protonet", Flat(), n_way=4), ProtoNet)
    m = build_head("matchingnet", Flat(), n_way=4, fce=True)
    assert isinstance(m, MatchingNet) and m.fce


class CharEncoder(nn.Module):
    """A toy text encoder (mean of character embeddings) taking a list of strings."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(128, 6)
        self.out_dim = 6

    def forward(self, texts: list) -> Tensor:
        return torch.stack([self.emb(torch.tensor([ord(c) % 128 for c in s])).mean(0) for s in texts])


def test_text_inputs_through_metric_and_gradient_heads() -> None:
    """Lists of strings (padded text batches) run through ProtoNet, MatchingNet, MAML and ANIL (loop path)."""
    torch.manual_seed(0)
    eps = [Episode(["ab", "ba", "xy", "yx"], torch.tensor([0, 0, 1, 1]), ["aab", "xyy"], torch.tensor([0, 1]), ["a", "x"]),
           Episode(["pq", "mn"], torch.tensor([0, 1]), ["pp", "nm", "qp"], torch.tensor([0, 1, 0]), ["p", "m"])]
    batch = EpisodeBatch.collate(eps)
    for name in ("protonet", "matchingnet", "maml", "anil"):
        head = build_head(name, CharEncoder(), n_way=2)
        loss, metrics = head.loss(batch)
        loss.backward()
        assert torch.isfinite(loss) and 0.0 <= metrics["accuracy"] <= 1.0
        assert head.get_submodule("backbone" if name in ("protonet", "matchingnet") else "net.backbone").emb.weight.grad is not None
        alone = head.adapt(eps[1].support_x, eps[1].support_y, n_way=2)(eps[1].query_x)
        together = head.adapt_batch(batch.support_x, batch.support_y, batch.support_mask, batch.n_way)(batch.query_x, batch.query_mask)
        assert torch.allclose(alone, together[1, :3], atol=1e-5)
