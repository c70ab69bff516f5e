"""Meta-Transformer: invariances, masking, shapes for mixed N/K, regression, text, save/load, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaformer.data import Episode, EpisodeBatch, EpisodeSampler, GlyphFamily, SinusoidFamily
from metaformer.models import Encoder, MetaTransformer, MetaTransformerConfig, simplex_code
from metaformer.models.meta_transformer import _Block

TOL = dict(atol=1e-5, rtol=0.0)


def tol(readout: str) -> dict:
    """TOL, plus float32's relative error for the residual readout's raw-feature distances (logits in the tens)."""
    return dict(atol=1e-5, rtol=1e-5) if readout == "residual" else TOL


pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(**kw: Any) -> MetaTransformerConfig:
    """A tiny classification config that runs in milliseconds."""
    base = dict(backbone="conv4", backbone_kwargs={"hidden": 8}, d_model=32, n_layers=2, n_heads=4, max_way=20)
    base.update(kw)
    return MetaTransformerConfig(**base)


def small_model(seed: int = 0, **kw: Any) -> MetaTransformer:
    """A tiny eval-mode model with non-trivial BatchNorm running statistics."""
    torch.manual_seed(seed)
    model = MetaTransformer(small_config(**kw))
    for m in model.modules():  # non-default running stats so eval-mode BN is not an identity map
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    if model.config.readout == "residual":
        with torch.no_grad():  # the residual head starts at zero; a trained one lets the transformer matter
            model.head.weight.normal_(0.0, 0.5)
            model.head.bias.normal_(0.0, 0.1)
    return model.eval()


def glyph_episodes(n_way: int | tuple[int, int], k_shot: int | tuple[int, int], q_query: int = 3, count: int = 3, seed: int = 0) -> list[Episode]:
    """``count`` held-out glyph episodes (n_way/k_shot may be ranges)."""
    sampler = EpisodeSampler(GlyphFamily("val"), n_way=n_way, k_shot=k_shot, q_query=q_query, seed=seed)
    return [sampler[i] for i in range(count)]


def shuffle_support(ep: Episode, gen: torch.Generator) -> Episode:
    """The same episode with its support set in a random order."""
    perm = torch.randperm(ep.support_y.shape[0], generator=gen)
    return Episode(ep.support_x[perm], ep.support_y[perm], ep.query_x, ep.query_y, ep.class_names)


# ------------------------------------------------------------------------------------ invariances
@pytest.mark.parametrize("label_code,readout", [("learned", "label"), ("fixed", "label"), ("learned", "prototype"),
                                                ("learned", "residual")])
def test_support_permutation_invariance(label_code: str, readout: str) -> None:
    model = small_model(label_code=label_code, d_model=32, readout=readout)
    eps = glyph_episodes((2, 20), (1, 5), count=4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ref = model(EpisodeBatch.collate(eps))
        out = model(EpisodeBatch.collate([shuffle_support(e, gen) for e in eps]))
    assert torch.isfinite(ref).sum() > 0
    torch.testing.assert_close(out, ref, **tol(readout))


@pytest.mark.parametrize("readout", ["label", "prototype", "residual"])
def test_changing_one_query_changes_only_that_query(readout: str) -> None:
    model = small_model(readout=readout)
    ep = glyph_episodes(5, 1, q_query=4, count=1)[0]
    qx = ep.query_x.clone()
    qx[7] = torch.rand_like(qx[7])
    with torch.no_grad():
        ref = model(EpisodeBatch.collate([ep]))[0]
        out = model(EpisodeBatch.collate([Episode(ep.support_x, ep.support_y, qx, ep.query_y, ep.class_names)]))[0]
    others = torch.arange(20) != 7
    torch.testing.assert_close(out[others], ref[others], **tol(readout))
    assert (out[7, :5] - ref[7, :5]).abs().max() > 1e-3


@pytest.mark.parametrize("readout", ["label", "prototype", "residual"])
def test_removing_queries_leaves_the_others_unchanged(readout: str) -> None:
    model = small_model(readout=readout)
    ep = glyph_episodes(5, 5, q_query=3, count=1)[0]
    keep = torch.tensor([0, 3, 4, 9, 14])
    with torch.no_grad():
        ref = model(EpisodeBatch.collate([ep]))[0]
        out = model(EpisodeBatch.collate([Episode(ep.support_x, ep.support_y, ep.query_x[keep], ep.query_y[keep],
                                                  ep.class_names)]))[0]
    torch.testing.assert_close(out, ref[keep], **tol(readout))


@pytest.mark.parametrize("readout", ["label", "prototype", "residual"])
def test_mixed_batch_with_padding_equals_each_task_alone(readout: str) -> None:
    model = small_model(readout=readout)
    eps = glyph_episodes((2, 20), (1, 5), q_query=2, count=5, seed=3)
    assert len({e.n_way for e in eps}) > 1 and len({e.support_y.numel() for e in eps}) > 1
    batch = EpisodeBatch.collate(eps)
    with torch.no_grad():
        out = model(batch)
        for t, ep in enumerate(eps):
            alone = model(EpisodeBatch.collate([ep]))[0]
            q = ep.query_y.numel()
            torch.testing.assert_close(out[t, :q, : ep.n_way], alone[:, : ep.n_way], **tol(readout))
            assert torch.isinf(out[t, :, ep.n_way:]).all() and (out[t, :, ep.n_way:] < 0).all()
            assert torch.isfinite(out[t, :q, : ep.n_way]).all()


@pytest.mark.parametrize("n_way", [2, 5, 20])
@pytest.mark.parametrize("k_shot", [1, 5])
def test_shapes_loss_and_gradients_for_n_and_k(n_way: int, k_shot: int) -> None:
    torch.manual_seed(0)
    model = MetaTransformer(small_config())
    batch = EpisodeBatch.collate(glyph_episodes(n_way, k_shot, q_query=2, count=2))
    logits = model(batch)
    assert logits.shape == (2, 2 * n_way, 20)
    assert torch.isfinite(logits[..., :n_way]).all() and torch.isneginf(logits[..., n_way:]).all()
    loss, metrics = model.loss(batch)
    assert set(metrics) == {"loss", "accuracy"} and 0.0 <= metrics["accuracy"] <= 1.0
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.label_embedding.grad[n_way:].abs().sum() == 0  # unused ways get no gradient


def test_loss_matches_per_task_reference() -> None:
    torch.manual_seed(0)
    model = MetaTransformer(small_config()).eval()
    eps = glyph_episodes((2, 6), (1, 3), q_query=(2), count=3, seed=5)
    batch = EpisodeBatch.collate(eps)
    loss, metrics = model.loss(batch)
    per_task, accs = [], []
    for ep in eps:
        logits = model(EpisodeBatch.collate([ep]))[0, :, : ep.n_way]
        per_task.append(F.cross_entropy(logits, ep.query_y))
        accs.append((logits.argmax(-1) == ep.query_y).float().mean())
    torch.testing.assert_close(loss, torch.stack(per_task).mean(), atol=1e-5, rtol=1e-5)
    assert metrics["accuracy"] == pytest.approx(float(torch.stack(accs).mean()), abs=1e-6)
    pred = model.predict(batch)
    assert pred.shape == batch.query_y.shape and (pred[~batch.query_mask] == -1).all()


def test_attention_block_matches_masked_softmax_reference() -> None:
    torch.manual_seed(0)
    block = _Block(d_model=16, n_heads=2, mlp_ratio=2.0, dropout=0.0).eval()
    support_mask = torch.tensor([[True, True, False], [True, True, True]])
    query_mask = torch.tensor([[True, False], [True, True]])
    mask = MetaTransformer.attention_mask(support_mask, query_mask)
    # Hand-written expected mask for task 0: keys = real support (0, 1) plus the token itself.
    expected0 = torch.tensor([
        [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected0)
    x = torch.randn(2, 5, 16)
    out = block(x, mask)
    h = block.norm1(x)
    q, k, v = block.qkv(h).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(~mask, float("-inf"))
    attn = torch.softmax(scores, dim=-1) @ v
    y = x + block.out(attn.transpose(1, 2).reshape(2, 5, 16))
    y = y + block.mlp(block.norm2(y))
    torch.testing.assert_close(out, y, atol=1e-5, rtol=1e-5)


def test_prototype_readout_matches_a_per_way_reference() -> None:
    model = small_model(readout="prototype")
    with torch.no_grad():
        model.readout_log_scale.fill_(-2.5)
    eps = glyph_episodes((2, 7), (1, 4), q_query=2, count=3, seed=11)
    batch = EpisodeBatch.collate(eps)
    with torch.no_grad():
        out = model(batch)
        for t, ep in enumerate(eps):
            # the transformer's outputs of this task alone, then the readout written out way by way
            s_tok, q_tok = model._tokens(EpisodeBatch.collate([ep]))
            x = torch.cat([s_tok, q_tok], dim=1)
            n_s = s_tok.shape[1]
            mask = model.attention_mask(torch.ones(1, n_s, dtype=torch.bool), torch.ones(1, q_tok.shape[1], dtype=torch.bool))
            for block in model.blocks:
                x = block(x, mask)
            h = model.head(model.norm(x))[0].double()
            h_s, h_q = h[:n_s], h[n_s:]
            ref = torch.stack([-math.exp(-2.5) * ((h_q - h_s[ep.support_y == k].mean(0)) ** 2).sum(-1)
                               for k in range(ep.n_way)], dim=1)
            q = ep.query_y.numel()
            torch.testing.assert_close(out[t, :q, : ep.n_way].double(), ref, atol=1e-4, rtol=1e-5)
            assert torch.isinf(out[t, :, ep.n_way:]).all()
    # a way with no support example has no prototype: -inf, never a distance to the origin
    ep = eps[0]
    keep = ep.support_y != 1
    lone = Episode(ep.support_x[keep], ep.support_y[keep], ep.query_x, ep.query_y, ep.class_names)
    with torch.no_grad():
        logits = model(EpisodeBatch.collate([lone]))[0]
    assert torch.isinf(logits[:, 1]).all() and torch.isfinite(logits[:, 0]).all()
    loss, _ = model.train().loss(batch)
    loss.backward()
    assert model.readout_log_scale.grad is not None and model.readout_log_scale.grad.abs() > 0


def test_residual_readout_starts_as_a_protonet_on_the_backbone_and_learns() -> None:
    """Untrained, the residual readout's logits are ProtoNet's on the same backbone; training moves its head."""
    from metaformer.heads.protonet import ProtoNet

    torch.manual_seed(0)
    model = MetaTransformer(small_config(readout="residual")).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    eps = glyph_episodes((2, 9), (1, 4), q_query=2, count=4, seed=7)
    batch = EpisodeBatch.collate(eps)
    proto = ProtoNet(model.backbone, n_way=20).eval()
    with torch.no_grad():
        out = model(batch)
        for t, ep in enumerate(eps):
            ref = proto.adapt_batch(ep.support_x[None], ep.support_y[None])(ep.query_x[None])[0]
            q = ep.query_y.numel()
            torch.testing.assert_close(out[t, :q, : ep.n_way], ref[:, : ep.n_way], atol=1e-3, rtol=1e-5)
    # the zero head still gets a gradient, so the transformer's correction can grow from ProtoNet's solution
    model.train()
    loss, _ = model.loss(batch)
    loss.backward()
    # (the blocks get none yet: their output is multiplied by the zero head; they start learning after one step)
    assert model.head.weight.grad.abs().sum() > 0 and model.blocks[0].qkv.weight.grad.abs().sum() == 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    opt.zero_grad()
    model.eval()
    with torch.no_grad():
        finite = torch.isfinite(out)
        assert (model(batch)[finite] - out[finite]).abs().max() > 1e-4


# ------------------------------------------------------------------------------------ label codes
def test_fixed_label_code_is_an_equal_norm_simplex() -> None:
    code = simplex_code(20, 32, seed=0).double()
    norms = code.norm(dim=1)
    torch.testing.assert_close(norms, torch.full((20,), math.sqrt(32), dtype=torch.float64), atol=1e-5, rtol=0)
    cos = (code @ code.T) / 32
    off = cos[~torch.eye(20, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1 / 19), atol=1e-6, rtol=0)
    model = MetaTransformer(small_config(label_code="fixed"))
    assert "label_embedding" in dict(model.named_buffers())
    assert "label_embedding" not in dict(model.named_parameters())
    learned = MetaTransformer(small_config(label_code="learned"))
    assert "label_embedding" in dict(learned.named_parameters())


# ------------------------------------------------------------------------------------ regression
def test_regression_shapes_invariance_and_loss() -> None:
    torch.manual_seed(0)
    cfg = MetaTransformerConfig(task="regression", backbone="mlp", backbone_kwargs={"hidden": 16}, d_model=32,
                                n_layers=2, n_heads=4, d_in=1, d_out=1)
    model = MetaTransformer(cfg).eval()
    fam = SinusoidFamily(k_shot=5, q_query=7, seed=0)
    eps = [fam[i] for i in range(3)] + [SinusoidFamily(k_shot=2, q_query=4, seed=1)[0]]  # mixed K and Q
    batch = EpisodeBatch.collate(eps)
    with torch.no_grad():
        out = model(batch)
    assert out.shape == (4, 7, 1) and torch.isfinite(out).all()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out2 = model(EpisodeBatch.collate([shuffle_support(e, gen) for e in eps]))
        alone = model(EpisodeBatch.collate([eps[3]]))[0]
    torch.testing.assert_close(out2, out, **TOL)
    torch.testing.assert_close(out[3, :4], alone, **TOL)
    loss, metrics = model.loss(batch)
    ref = torch.stack([((out[t, : e.query_y.shape[0]] - e.query_y) ** 2).mean() for t, e in enumerate(eps)]).mean()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert set(metrics) == {"loss", "mse"}


# ------------------------------------------------------------------------------------ text inputs
class CharCountEncoder(Encoder):
    """Toy text encoder: letter counts of each string through a linear layer."""

    def __init__(self) -> None:
        """A 26 -> 12 linear map."""
        super().__init__()
        self.linear = nn.Linear(26, 12)
        self.out_dim = 12

    def forward(self, x: list[str]) -> Tensor:
        """Embed a list of strings -> [B, 12]."""
        assert isinstance(x, list) and all(isinstance(s, str) for s in x)
        counts = torch.zeros(len(x), 26)
        for i, s in enumerate(x):
            for ch in s.lower():
                if "a" <= ch <= "z":
                    counts[i, ord(ch) - 97] += 1
        return self.linear(counts)


def test_text_inputs_go_through_the_backbone_as_lists() -> None:
    torch.manual_seed(0)
    model = MetaTransformer(small_config(backbone="text", max_way=4), backbone=CharCountEncoder()).eval()
    e1 = Episode(["apple", "banana", "cherry"], torch.tensor([0, 1, 2]), ["apples", "bananas"], torch.tensor([0, 1]),
                 ["a", "b", "c"])
    e2 = Episode(["kiwi", "lime"], torch.tensor([0, 1]), ["kiwis", "limes", "lemon"], torch.tensor([0, 1, 1]),
                 ["k", "l"])
    batch = EpisodeBatch.collate([e1, e2])
    with torch.no_grad():
        out = model(batch)
        alone = model(EpisodeBatch.collate([e2]))[0]
        swapped = model(EpisodeBatch.collate([Episode(["lime", "kiwi"], torch.tensor([1, 0]), e2.query_x, e2.query_y,
                                                      e2.class_names)]))[0]
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out[1, :, :2], alone[:, :2], **TOL)
    torch.testing.assert_close(swapped, alone, **TOL)
    assert torch.isneginf(out[0, :, 3]).all() and torch.isfinite(out[0, :2, :3]).all()


# ------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("label_code,readout", [("learned", "label"), ("fixed", "label"), ("learned", "prototype")])
def test_save_load_round_trip_is_exact(tmp_path: Path, label_code: str, readout: str) -> None:
    model = small_model(label_code=label_code, readout=readout)
    batch = EpisodeBatch.collate(glyph_episodes((2, 8), (1, 3), count=3))
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == "meta_transformer"
    loaded = MetaTransformer.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(model(batch), loaded(batch))


def test_save_load_round_trip_regression(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = MetaTransformerConfig(task="regression", backbone="mlp", backbone_kwargs={"hidden": 8}, d_model=16,
                                n_layers=1, n_heads=2)
    model = MetaTransformer(cfg).eval()
    model.save_pretrained(tmp_path)
    loaded = MetaTransformer.from_pretrained(tmp_path).eval()
    batch = SinusoidFamily(k_shot=4, q_query=3, seed=2).batch(0, 3)
    with torch.no_grad():
        assert torch.equal(model(batch), loaded(batch))


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    model = small_model()
    model.save_pretrained(tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())

    bad = tmp_path / "unknown_key"
    model.save_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "num_experts": 4}))
    with pytest.raises(ValueError, match=r"unknown config keys \['num_experts'\]"):
        MetaTransformer.from_pretrained(bad)

    other = tmp_path / "other_arch"
    model.save_pretrained(other)
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert'"):
        MetaTransformer.from_pretrained(other)

    mismatch = tmp_path / "mismatch"
    model.save_pretrained(mismatch)
    (mismatch / "config.json").write_text(json.dumps({**cfg, "n_layers": 3}))
    with pytest.raises(ValueError, match="does not match the architecture"):
        MetaTransformer.from_pretrained(mismatch)

    with pytest.raises(FileNotFoundError, match="not a save_pretrained"):
        MetaTransformer.from_pretrained(tmp_path / "nothing_here")


def test_config_and_batch_errors() -> None:
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        MetaTransformerConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="needs d_model >= max_way"):
        MetaTransformerConfig(d_model=16, n_heads=4, max_way=20, label_code="fixed")
    with pytest.raises(ValueError, match="task must be one of"):
        MetaTransformerConfig(task="ranking")
    with pytest.raises(ValueError, match="label_code must be one of"):
        MetaTransformerConfig(label_code="onehot")
    with pytest.raises(ValueError, match="readout must be one of"):
        MetaTransformerConfig(readout="cosine")
    with pytest.raises(ValueError, match="readout='prototype' is for classification"):
        MetaTransformerConfig(task="regression", backbone="mlp", readout="prototype")
    model = small_model(max_way=5)
    with pytest.raises(ValueError, match="raise MetaTransformerConfig.max_way"):
        model(EpisodeBatch.collate(glyph_episodes(6, 1, count=1)))
    with pytest.raises(ValueError, match="configured for task='classification' but got a regression batch"):
        model(SinusoidFamily(k_shot=2, q_query=2).batch(0, 2))
    with pytest.raises(TypeError, match="expects an EpisodeBatch"):
        model(glyph_episodes(2, 1, count=1)[0])


# ------------------------------------------------------------------------------------ trainer hooks
def test_meta_backward_chunks_match_one_backward_in_eval_mode() -> None:
    model = small_model()  # eval mode: BatchNorm uses running statistics, so chunking is exact
    batch = EpisodeBatch.collate(glyph_episodes((2, 6), (1, 3), q_query=2, count=5, seed=7))
    loss, metrics = model.loss(batch)
    (loss * 0.5).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss2, metrics2 = model.meta_backward(batch, chunk_size=2, scale=0.5)
    torch.testing.assert_close(loss2, loss.detach(), atol=1e-5, rtol=1e-5)
    assert metrics2["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        model.meta_backward(batch, chunk_size=0)


def test_resnet12_config_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = MetaTransformerConfig(backbone="resnet12", backbone_kwargs={"in_channels": 1, "channels": (4, 4, 8, 8)},
                                d_model=16, n_layers=1, n_heads=2, max_way=5)
    model = MetaTransformer(cfg).eval()
    model.save_pretrained(tmp_path)
    loaded = MetaTransformer.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    batch = EpisodeBatch.collate(glyph_episodes(3, 1, q_query=1, count=2))
    with torch.no_grad():
        assert torch.equal(model(batch), loaded(batch))


def test_a_task_without_support_is_named() -> None:
    """A task whose support positions are all padding is refused by loss and forward, naming the task."""
    batch = EpisodeSampler(GlyphFamily(seed=0), n_way=2, k_shot=1, q_query=1, seed=0).batch(0, 3)
    batch.support_mask[2] = False
    model = MetaTransformer(MetaTransformerConfig(backbone="conv4", d_model=32, n_layers=1, max_way=5))
    for call in (model.loss, model):
        with pytest.raises(ValueError, match="task 2 has no real support examples"):
            call(batch)
