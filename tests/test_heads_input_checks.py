"""Bad or unusual input to the heads and the Meta-Transformer: clear errors where the result would be wrong, the
right result where the input is legitimate (frozen weights, hooks, padding that holds garbage)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import Tensor, nn

from metaformer.data import Episode, EpisodeBatch, SinusoidFamily
from metaformer.heads import MAML, MatchingNet, ProtoNet
from metaformer.models import Conv4, MetaTransformer, MetaTransformerConfig, build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def episode(n: int, k: int, q: int, seed: int) -> Episode:
    """A random 8x8 image episode of n ways."""
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.randn(n * k, 1, 8, 8, generator=g), torch.arange(n).repeat_interleave(k),
                   torch.randn(n * q, 1, 8, 8, generator=g), torch.arange(n).repeat_interleave(q),
                   [f"c{i}" for i in range(n)])


def mixed_batch() -> EpisodeBatch:
    """A 2-way 1-shot task padded next to a 5-way 2-shot one."""
    return EpisodeBatch.collate([episode(2, 1, 2, 0), episode(5, 2, 2, 1)])


def heads() -> dict[str, nn.Module]:
    """One head of each family on a small Conv-4."""
    torch.manual_seed(0)
    return {"maml": MAML(Conv4(1, 4, 2), 5, inner_lr=0.1), "protonet": ProtoNet(Conv4(1, 4, 2), 5),
            "matchingnet": MatchingNet(Conv4(1, 4, 2), 5)}


@pytest.mark.parametrize("name", ["maml", "protonet", "matchingnet"])
def test_support_labels_are_checked_per_task(name: str) -> None:
    head = heads()[name]
    batch = mixed_batch()
    head.loss(batch)  # the legitimate batch passes
    bad = batch.support_y.clone()
    bad[0, 0] = 3  # task 0 is 2-way: label 3 is below the batch's max n_way (5) but not one of its classes
    with pytest.raises(ValueError, match="support label 3 of task 0 .*out of range"):
        head.adapt_batch(batch.support_x, bad, batch.support_mask, batch.n_way)
    neg = batch.support_y.clone()
    neg[1, 0] = -1  # -1 at a real position (padding is -1 with the mask False)
    with pytest.raises(ValueError, match="support label -1 of task 1"):
        head.adapt_batch(batch.support_x, neg, batch.support_mask, batch.n_way)


@pytest.mark.parametrize("name", ["maml", "protonet", "matchingnet"])
def test_query_labels_outside_the_task_are_an_error_not_an_infinite_loss(name: str) -> None:
    head = heads()[name]
    batch = mixed_batch()
    batch.query_y[0, 0] = 4  # task 0 is 2-way
    with pytest.raises(ValueError, match="query label 4 of task 0"):
        head.loss(batch)


def test_meta_transformer_checks_query_labels_and_regression_target_shapes() -> None:
    torch.manual_seed(0)
    model = MetaTransformer(MetaTransformerConfig(backbone="conv4", backbone_kwargs={"in_channels": 1, "hidden": 8,
                                                  "num_blocks": 2}, d_model=16, n_layers=1, n_heads=2, max_way=5))
    batch = mixed_batch()
    batch.query_y[0, 1] = 3
    with pytest.raises(ValueError, match="query label 3 of task 0"):
        model.loss(batch)
    reg = MetaTransformer(MetaTransformerConfig(task="regression", backbone="mlp", backbone_kwargs={"hidden": 8},
                                                d_model=16, n_layers=1, n_heads=2))
    sine = SinusoidFamily(k_shot=4, q_query=4, seed=0).batch(0, 4)
    reg.loss(sine)
    sine.query_y = sine.query_y.squeeze(-1)  # [T, Q]: (out - y) would broadcast to [T, Q, Q]
    with pytest.raises(ValueError, match=r"query_y has shape \(4, 4\)"):
        reg.loss(sine)


def test_regression_heads_refuse_targets_that_would_broadcast() -> None:
    torch.manual_seed(0)
    head = MAML(build_backbone("mlp", in_dim=1, hidden=8), kind="regression", inner_lr=0.01)
    sine = SinusoidFamily(k_shot=4, q_query=4, seed=0).batch(0, 4)
    head.loss(sine)
    sine.query_y = sine.query_y.squeeze(-1)
    with pytest.raises(ValueError, match="unsqueeze"):
        head.loss(sine)


@pytest.mark.parametrize("name", ["protonet", "matchingnet"])
def test_a_task_without_support_or_query_examples_is_refused(name: str) -> None:
    head = heads()[name]
    batch = mixed_batch()
    mask = batch.support_mask.clone()
    mask[0] = False
    with pytest.raises(ValueError, match="task 0 has no support examples"):
        head.adapt_batch(batch.support_x, batch.support_y, mask, batch.n_way)
    batch.query_mask[1] = False
    with pytest.raises(ValueError, match="task 1 has no real query examples"):
        head.loss(batch)


class LengthEncoder(nn.Module):
    """Toy text encoder: (length, 1) of each string."""

    out_dim = 2

    def forward(self, xs: list[str]) -> Tensor:
        """[B] strings -> [B, 2]."""
        return torch.tensor([[float(len(s)), 1.0] for s in xs])


@pytest.mark.parametrize("head_cls", [ProtoNet, MatchingNet])
def test_ragged_text_lists_without_a_mask_are_padded_by_their_lengths(head_cls: type) -> None:
    head = head_cls(LengthEncoder(), 2)
    sx = [["aaaa", "b"], ["aaaa", "b", "cc"]]
    sy = torch.tensor([[0, 1, -1], [0, 1, 1]])  # task 0 has 2 items; its third label is padding
    mask = torch.tensor([[True, True, False], [True, True, True]])
    qx = [["aaaa", "bbb"], ["aaaa", "bbb"]]
    torch.testing.assert_close(head.adapt_batch(sx, sy, None, 2)(qx), head.adapt_batch(sx, sy, mask, 2)(qx))
    if head_cls is ProtoNet:  # "aaaa" sits on class 0's prototype, which the padding would have pulled away
        assert abs(float(head.adapt_batch(sx, sy, None, 2)(qx)[0, 0, 0])) < 1e-6


def test_garbage_at_padded_positions_cannot_reach_loss_or_gradients_on_either_path() -> None:
    torch.manual_seed(0)
    loop = MAML(Conv4(1, 4, 2), 5, inner_lr=0.1, path="loop").double()
    batched = MAML(Conv4(1, 4, 2), 5, inner_lr=0.1, path="batched").double()
    batched.load_state_dict(loop.state_dict())
    batch = mixed_batch()
    batch.support_x = batch.support_x.double()
    batch.query_x = batch.query_x.double()
    batch.support_x[0, ~batch.support_mask[0]] = float("nan")
    batch.query_x[0, ~batch.query_mask[0]] = float("inf")
    grads = []
    for head in (loop, batched):
        loss, _ = head.meta_backward(batch)
        assert torch.isfinite(loss)
        grads.append([p.grad.clone() for p in head.net.parameters()])
        assert all(bool(torch.isfinite(g).all()) for g in grads[-1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_frozen_parameters_are_neither_adapted_nor_meta_learned_on_both_paths() -> None:
    """A conv weight frozen before the head is built: not a fast weight (its bias still is), no meta-gradient, and
    the batched path (a shared weight with a task-batched bias) agrees with the loop path."""
    heads_ = {}
    for path in ("loop", "batched"):
        torch.manual_seed(1)
        bb = Conv4(1, 4, 2).double()
        bb.features[0].weight.requires_grad_(False)
        heads_[path] = MAML(bb, 5, inner_lr=0.1, path=path).double()
    heads_["batched"].load_state_dict(heads_["loop"].state_dict())
    assert "backbone.features.0.weight" not in heads_["loop"].fast_names
    assert "backbone.features.0.bias" in heads_["loop"].fast_names
    batch = mixed_batch()
    batch.support_x, batch.query_x = batch.support_x.double(), batch.query_x.double()
    grads = []
    for head in heads_.values():
        head.meta_backward(batch)
        assert head.net.backbone.features[0].weight.grad is None
        grads.append([p.grad for p in head.net.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_a_fast_weight_the_support_loss_does_not_reach_gets_a_zero_step() -> None:
    class WithUnused(nn.Module):
        out_dim = 4

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.pooler = nn.Linear(4, 4)  # never called, as a ViT's pooler under a CLS readout

        def forward(self, x: Tensor) -> Tensor:
            return torch.relu(self.lin(x))

    torch.manual_seed(0)
    head = MAML(WithUnused(), 2, inner_lr=0.1, path="loop")
    sx, sy = torch.randn(1, 4, 3), torch.tensor([[0, 1, 0, 1]])
    fast = head.adapt_fast(sx, sy, None, None, 1, "loop", track_meta=True)
    names = head.fast_names
    pooler = fast.tensors[names.index("backbone.pooler.weight")]
    torch.testing.assert_close(pooler[0], head.net.backbone.pooler.weight)


def test_gradient_heads_explain_inference_mode() -> None:
    head = heads()["maml"]
    batch = mixed_batch()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="no_grad"):
        head.adapt_batch(batch.support_x, batch.support_y, batch.support_mask, batch.n_way)
    with torch.inference_mode():  # a metric head needs no gradient at test time
        heads()["protonet"].adapt_batch(batch.support_x, batch.support_y, batch.support_mask, batch.n_way)


def test_conv4_runs_hooks_and_pruning_of_its_modules() -> None:
    torch.manual_seed(0)
    conv = Conv4(1, 4, 2).eval()
    x = torch.randn(3, 1, 8, 8)
    fired = []
    handles = [m.register_forward_hook(lambda m, i, o, k=k: fired.append(k)) for k, m in enumerate(conv.features)]
    conv(x)
    assert fired == list(range(8))
    for h in handles:
        h.remove()
    prune.l1_unstructured(conv.features[0], "weight", amount=0.5)
    with torch.no_grad():
        conv.features[0].weight_orig.mul_(2.0)  # the pruning pre-hook recomputes weight from weight_orig
    torch.testing.assert_close(conv(x), conv.features(x).mean(dim=(2, 3)))
    ref = F.conv2d(x, conv.features[0].weight_orig * conv.features[0].weight_mask, conv.features[0].bias, padding=1)
    torch.testing.assert_close(conv.features[0](x), ref)


def test_from_pretrained_is_ready_for_inference_and_predict_leaves_training_state_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MetaTransformer(MetaTransformerConfig(backbone="conv4", backbone_kwargs={"in_channels": 1, "hidden": 8,
                                                  "num_blocks": 2}, d_model=16, n_layers=1, n_heads=2, max_way=5))
    model.save_pretrained(tmp_path)
    loaded = MetaTransformer.from_pretrained(tmp_path)
    assert not loaded.training
    loaded.train()
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    batch = mixed_batch()
    one = loaded.predict(batch)
    assert loaded.training  # restored
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in before.items())  # no running statistic moved
    part = EpisodeBatch.collate([batch.episode(1)])
    assert torch.equal(loaded.predict(part)[0], one[1, : part.query_y.shape[1]])


def test_accuracy_metric_counts_in_float32_for_low_precision_logits() -> None:
    from metaformer.heads.losses import task_accuracy

    logits = torch.zeros(1, 600, 2, dtype=torch.bfloat16)
    logits[0, :, 0] = 1.0
    y = torch.zeros(1, 600, dtype=torch.int64)
    y[0, 0] = 1  # one miss of 600
    assert float(task_accuracy(logits, y, None)[0]) == pytest.approx(599 / 600, abs=1e-7)


@pytest.mark.parametrize(("key", "value"), [("mlp_ratio", "4"), ("dropout", None), ("label_code_seed", "x")])
def test_meta_transformer_config_types_are_value_errors(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        MetaTransformerConfig(**{key: value})


def test_a_damaged_safetensors_file_is_a_value_error_naming_it(tmp_path: Path) -> None:
    model = MetaTransformer(MetaTransformerConfig(backbone="conv4", backbone_kwargs={"in_channels": 1, "hidden": 8,
                                                  "num_blocks": 2}, d_model=16, n_layers=1, n_heads=2, max_way=5))
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        MetaTransformer.from_pretrained(tmp_path)


def test_an_overflowing_logit_is_not_mistaken_for_a_bad_label() -> None:
    """fp16 logits that overflow to -inf at a valid label: the trainer's non-finite policy handles that, not a
    label error."""
    from metaformer.heads.losses import check_targets

    out = torch.zeros(2, 3, 4)
    out[0, 0, 1] = float("-inf")
    y = torch.tensor([[1, 0, 2], [3, 3, 0]])
    check_targets(out, y, None, "classification", torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="query label 3 of task 0"):
        check_targets(out, torch.tensor([[3, 0, 2], [3, 3, 0]]), None, "classification", torch.tensor([3, 4]))
