"""MAML family meta-gradients against a plain per-task autograd loop (float64, BatchNorm, both paths)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metaformer.data import Episode, EpisodeBatch
from metaformer.heads import ANIL, MAML, LSTMMetaLearner, MetaSGD, build_head
from metaformer.models import Conv4, build_backbone

T, N, K, Q = 3, 3, 2, 2
LR = 0.3


pytestmark = pytest.mark.usefixtures("one_thread")


def small_conv() -> nn.Module:
    """A 2-block Conv-4 (8 channels, BatchNorm) on 8x8 images, in float64."""
    return Conv4(1, hidden=6, num_blocks=2).double()


def make_data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random float64 images and balanced labels for T tasks."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, N * K, 1, 8, 8, generator=g, dtype=torch.float64)
    xq = torch.randn(T, N * Q, 1, 8, 8, generator=g, dtype=torch.float64)
    ys = torch.arange(N).repeat_interleave(K).expand(T, -1).contiguous()
    yq = torch.arange(N).repeat_interleave(Q).expand(T, -1).contiguous()
    return xs, ys, xq, yq


def reference_meta_grad(net: nn.Module, data: tuple, steps: int, first_order: bool, names: list[str] | None = None,
                        lrs: dict[str, Tensor] | None = None, extra: list[Tensor] | None = None) -> list[Tensor]:
    """Plain per-task MAML: functional_call + autograd.grad(create_graph=not first_order), native BatchNorm."""
    xs, ys, xq, yq = data
    params = dict(net.named_parameters())
    adapted = names if names is not None else list(params)
    total = 0.0
    for t in range(xs.shape[0]):
        fast = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(net, fast, (xs[t],)), ys[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in adapted], create_graph=not first_order)
            for n, g in zip(adapted, grads):
                fast[n] = fast[n] - (lrs[n] if lrs is not None else LR) * g
        total = total + F.cross_entropy(functional_call(net, fast, (xq[t],)), yq[t]) / xs.shape[0]
    return list(torch.autograd.grad(total, list(params.values()) + (extra or [])))


def head_meta_grad(head: nn.Module, data: tuple, extra: list[Tensor] | None = None) -> list[Tensor]:
    """d(mean over tasks of the query loss)/d(params) through the head's adapt_batch."""
    xs, ys, xq, yq = data
    out = head.adapt_batch(xs, ys)(xq)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), yq.reshape(-1))
    grads = torch.autograd.grad(loss, list(head.net.parameters()) + (extra or []), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, list(head.net.parameters()) + (extra or []))]


def rel_err(a: list[Tensor], b: list[Tensor]) -> float:
    """Global relative error ||a - b|| / ||b|| over all tensors."""
    num = sum(((x - y) ** 2).sum() for x, y in zip(a, b)).sqrt()
    return float(num / sum((y**2).sum() for y in b).sqrt())


@pytest.mark.parametrize("path", ["loop", "batched"])
@pytest.mark.parametrize("steps", [1, 5])
def test_maml_second_order_meta_gradient_matches_plain_loop(path: str, steps: int) -> None:
    torch.manual_seed(0)
    head = MAML(small_conv(), N, inner_steps=steps, inner_lr=LR, path=path).double()
    data = make_data()
    assert head.resolve_path(data[0]) == path
    got = head_meta_grad(head, data)
    ref = reference_meta_grad(head.net, data, steps, first_order=False)
    assert rel_err(got, ref) < 1e-5
    # the conv weights feed BatchNorm: a wrong BN second-order term would show up here
    assert all(float(g.abs().max()) > 0 for g, n in zip(got, dict(head.net.named_parameters())) if "weight" in n)


@pytest.mark.parametrize("path", ["loop", "batched"])
@pytest.mark.parametrize("steps", [1, 5])
def test_fomaml_equals_second_order_without_hessian_term(path: str, steps: int) -> None:
    torch.manual_seed(0)
    head = MAML(small_conv(), N, inner_steps=steps, inner_lr=LR, path=path, first_order=True).double()
    data = make_data(1)
    got = head_meta_grad(head, data)
    assert rel_err(got, reference_meta_grad(head.net, data, steps, first_order=True)) < 1e-5
    if steps == 1:
        # 1 step: the FOMAML meta-gradient is the query-loss gradient at the adapted weights
        xs, ys, xq, yq = data
        params = dict(head.net.named_parameters())
        total = 0.0
        for t in range(T):
            loss = F.cross_entropy(functional_call(head.net, params, (xs[t],)), ys[t])
            g = torch.autograd.grad(loss, list(params.values()))
            phi = {n: (p - LR * gi).detach().requires_grad_() for (n, p), gi in zip(params.items(), g)}
            ql = F.cross_entropy(functional_call(head.net, phi, (xq[t],)), yq[t]) / T
            gq = torch.autograd.grad(ql, list(phi.values()))
            total = gq if isinstance(total, float) else [a + b for a, b in zip(total, gq)]
        assert rel_err(got, total) < 1e-10


@pytest.mark.parametrize("path", ["loop", "batched"])
def test_second_order_does_not_silently_degrade_to_first_order(path: str) -> None:
    torch.manual_seed(0)
    data = make_data(2)
    so = MAML(small_conv(), N, inner_steps=2, inner_lr=LR, path=path).double()
    fo = MAML(small_conv(), N, inner_steps=2, inner_lr=LR, path=path, first_order=True).double()
    fo.load_state_dict(so.state_dict())
    g_so, g_fo = head_meta_grad(so, data), head_meta_grad(fo, data)
    ref_so = reference_meta_grad(so.net, data, 2, first_order=False)
    ref_fo = reference_meta_grad(so.net, data, 2, first_order=True)
    assert rel_err(ref_fo, ref_so) > 1e-2  # the Hessian term matters on this problem ...
    assert rel_err(g_so, ref_so) < 1e-5  # ... and the second-order head keeps it
    assert rel_err(g_so, g_fo) > 1e-2


def test_meta_gradient_by_finite_differences_on_mlp_regression() -> None:
    """Independent of autograd: the directional derivative of the meta-loss equals <meta-grad, v>."""
    torch.manual_seed(0)
    head = MAML(build_backbone("mlp", in_dim=1, hidden=8, num_layers=2), kind="regression", inner_steps=2,
                inner_lr=0.05, path="batched").double()
    g = torch.Generator().manual_seed(3)
    xs, xq = torch.randn(4, 5, 1, generator=g, dtype=torch.float64), torch.randn(4, 5, 1, generator=g, dtype=torch.float64)
    ys, yq = torch.sin(3 * xs), torch.sin(3 * xq)

    def meta_loss() -> Tensor:
        return ((head.adapt_batch(xs, ys)(xq) - yq) ** 2).mean()

    params = list(head.parameters())
    grads = torch.autograd.grad(meta_loss(), params)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(d, alpha=eps)
        plus = float(meta_loss())
        for p, d in zip(params, v):
            p.add_(d, alpha=-2 * eps)
        minus = float(meta_loss())
    fd = (plus - minus) / (2 * eps)
    analytic = float(sum((gi * d).sum() for gi, d in zip(grads, v)))
    assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic))


@pytest.mark.parametrize("path", ["loop", "batched"])
def test_padded_tasks_match_per_task_reference(path: str) -> None:
    """EpisodeBatch padding (different K and N per task) is ignored by adaptation, BatchNorm and loss."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    eps = []
    for n, k in ((3, 2), (2, 1), (3, 1)):
        sx = torch.randn(n * k, 1, 8, 8, generator=g, dtype=torch.float64)
        qx = torch.randn(n * 2, 1, 8, 8, generator=g, dtype=torch.float64)
        eps.append(Episode(sx, torch.arange(n).repeat_interleave(k), qx, torch.arange(n).repeat_interleave(2),
                           [str(i) for i in range(n)]))
    batch = EpisodeBatch.collate(eps)
    head = MAML(small_conv(), 3, inner_steps=2, inner_lr=LR, path=path).double()
    loss, metrics = head.loss(batch)
    got = torch.autograd.grad(loss, list(head.net.parameters()))
    params = dict(head.net.named_parameters())
    total = 0.0
    for e in eps:
        fast = dict(params)
        n = e.n_way
        for _ in range(2):
            out = functional_call(head.net, fast, (e.support_x,))[:, :n]
            gr = torch.autograd.grad(F.cross_entropy(out, e.support_y), list(fast.values()), create_graph=True)
            fast = {k: p - LR * gi for (k, p), gi in zip(fast.items(), gr)}
        out = functional_call(head.net, fast, (e.query_x,))[:, :n]
        total = total + F.cross_entropy(out, e.query_y) / len(eps)
    ref = torch.autograd.grad(total, list(params.values()))
    assert abs(float(loss.detach()) - float(total.detach())) < 1e-10
    assert rel_err(got, ref) < 1e-5
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_meta_backward_in_chunks_equals_full_backward() -> None:
    torch.manual_seed(0)
    eps = [Episode(torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 0, 1, 1]),
                   torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 0, 1]), ["a", "b"]) for _ in range(4)]
    batch = EpisodeBatch.collate(eps)
    head = MAML(small_conv(), 2, inner_steps=1, inner_lr=LR, path="batched").double()
    loss, _ = head.loss(batch)
    full = torch.autograd.grad(loss, list(head.parameters()))
    head.zero_grad()
    loss2, _ = head.meta_backward(batch, chunk_size=1)
    assert abs(float(loss2) - float(loss.detach())) < 1e-12
    assert rel_err([p.grad for p in head.parameters()], list(full)) < 1e-10


def test_anil_on_a_cpu_conv_backbone_backpropagates_task_by_task() -> None:
    """ANIL's inner loop is batched (a linear head), but on a CPU Conv-4 its backbone graph for the whole meta-batch
    took 4.5x the memory: with path="auto" and transductive BatchNorm meta_backward goes one task at a time, with
    the same meta-gradient as one backward over the whole batch; a forced path, an MLP or per-step BatchNorm
    keep one chunk."""
    torch.manual_seed(0)
    eps = [Episode(torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 0, 1, 1]),
                   torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 0, 1]), ["a", "b"]) for _ in range(4)]
    batch = EpisodeBatch.collate(eps)
    head = ANIL(small_conv(), 2, inner_steps=2, inner_lr=LR).double()
    assert head.resolve_path(batch.support_x) == "batched" and head.default_chunk_size(batch) == 1
    loss, _ = head.loss(batch)
    full = torch.autograd.grad(loss, list(head.parameters()))
    head.zero_grad()
    loss2, _ = head.meta_backward(batch)
    assert abs(float(loss2) - float(loss.detach())) < 1e-12
    assert rel_err([p.grad for p in head.parameters()], list(full)) < 1e-10
    assert ANIL(small_conv(), 2, path="batched").default_chunk_size(batch) is None
    assert ANIL(small_conv(), 2, batch_norm="per_step").default_chunk_size(batch) is None
    mlp = ANIL(build_backbone("mlp", in_dim=64, hidden=8), 2).double()
    flat = EpisodeBatch.collate([Episode(e.support_x.flatten(1), e.support_y, e.query_x.flatten(1), e.query_y, e.class_names)
                                 for e in eps])
    assert mlp.default_chunk_size(flat) is None


@pytest.mark.parametrize("path", ["loop", "batched"])
def test_anil_matches_reference_with_head_only_inner_loop(path: str) -> None:
    torch.manual_seed(0)
    head = ANIL(small_conv(), N, inner_steps=3, inner_lr=LR, path=path).double()
    data = make_data(5)
    got = head_meta_grad(head, data)
    ref = reference_meta_grad(head.net, data, 3, False, names=["classifier.weight", "classifier.bias"])
    assert head.fast_names == ["weight", "bias"]
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("path", ["loop", "batched"])
def test_metasgd_meta_gradient_including_learned_rates(path: str) -> None:
    torch.manual_seed(0)
    head = MetaSGD(small_conv(), N, inner_steps=2, inner_lr=LR, path=path).double()
    with torch.no_grad():
        for lr in head.inner_lrs:
            lr.uniform_(0.1, 0.5)
    data = make_data(6)
    lrs = list(head.inner_lrs)
    got = head_meta_grad(head, data, extra=lrs)
    ref = reference_meta_grad(head.net, data, 2, False, lrs=dict(zip(head.fast_names, lrs)), extra=lrs)
    assert rel_err(got, ref) < 1e-5


def test_checkpointed_inner_steps_give_the_same_meta_gradient() -> None:
    torch.manual_seed(0)
    data = make_data(7)
    plain = MAML(small_conv(), N, inner_steps=3, inner_lr=LR, path="loop").double()
    ckpt = MAML(small_conv(), N, inner_steps=3, inner_lr=LR, path="loop", checkpoint=True).double()
    ckpt.load_state_dict(plain.state_dict())
    xs, ys, xq, yq = data
    out = ckpt.adapt_batch(xs, ys)(xq)
    F.cross_entropy(out.reshape(-1, N), yq.reshape(-1)).backward()
    got = [p.grad for p in ckpt.net.parameters()]
    assert rel_err(got, reference_meta_grad(plain.net, data, 3, first_order=False)) < 1e-10


def test_per_step_batchnorm_batched_equals_loop_and_updates_running_stats() -> None:
    torch.manual_seed(0)
    data = make_data(8)
    loop = MAML(small_conv(), N, inner_steps=2, inner_lr=LR, path="loop", batch_norm="per_step").double()
    batched = MAML(small_conv(), N, inner_steps=2, inner_lr=LR, path="batched", batch_norm="per_step").double()
    batched.load_state_dict(loop.state_dict())
    assert not any("running" in n or n.endswith(("1.weight", "1.bias")) for n in loop.fast_names if "features" in n)
    extra_l, extra_b = list(loop.per_step_bn.parameters()), list(batched.per_step_bn.parameters())
    gl, gb = head_meta_grad(loop, data, extra_l), head_meta_grad(batched, data, extra_b)
    assert rel_err(gb, gl) < 1e-8
    rows = loop.per_step_bn.running_mean_0
    assert rows.shape == (3, 6) and bool((rows != 0).all())  # every step's statistics were updated
    loop.eval()
    with torch.no_grad():
        xs, ys, xq, _ = data
        one = loop.adapt_batch(xs, ys)(xq)
        part = loop.adapt_batch(xs, ys)(xq[:, :2])
    # evaluation with running statistics: a query's prediction does not depend on the other queries
    assert torch.allclose(one[:, :2], part, atol=1e-10)


def episode_batch_of(data: tuple) -> EpisodeBatch:
    """The tensors of make_data as an EpisodeBatch."""
    xs, ys, xq, yq = data
    return EpisodeBatch.collate([Episode(xs[t], ys[t], xq[t], yq[t], [str(c) for c in range(N)]) for t in range(T)])


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_per_step_running_statistics_are_one_update_per_meta_batch_on_both_paths(chunk_size: int | None) -> None:
    """Row 0 of the first BatchNorm after one meta_backward: momentum times the mean over tasks of the per-task
    statistics of the support set, on the loop path too (which once applied the momentum once per task)."""
    torch.manual_seed(0)
    data = make_data(10)
    loop = MAML(small_conv(), N, inner_steps=2, inner_lr=LR, path="loop", batch_norm="per_step").double()
    batched = MAML(small_conv(), N, inner_steps=2, inner_lr=LR, path="batched", batch_norm="per_step").double()
    batched.load_state_dict(loop.state_dict())
    for head in (loop, batched):
        head.meta_backward(episode_batch_of(data), chunk_size=chunk_size)
    with torch.no_grad():
        h = loop.net.backbone.features[0](data[0].flatten(0, 1)).view(T, N * K, 6, 8, 8)
        mean = h.mean(dim=(1, 3, 4)).mean(0)
        var = h.transpose(1, 2).reshape(T, 6, -1).var(dim=2, unbiased=True).mean(0)
    m = 0.1  # bn_momentum
    for head in (loop, batched):
        bn = head.per_step_bn
        assert torch.allclose(bn.running_mean_0[0], m * mean, atol=1e-12)
        assert torch.allclose(bn.running_var_0[0], (1 - m) + m * var, atol=1e-12)
        assert bool((bn.running_mean_1 != 0).all())  # every row of every layer moved
    for name, buf in loop.per_step_bn.named_buffers():
        assert torch.allclose(buf, dict(batched.per_step_bn.named_buffers())[name], atol=1e-12), name


def test_per_step_batchnorm_with_more_steps_at_test_time_uses_trained_rows() -> None:
    """Train 1 inner step, evaluate with 3: the query forward keeps its trained row (the table has K + 1 rows)."""
    torch.manual_seed(0)
    data = make_data(11)
    head = MAML(small_conv(), N, inner_steps=1, eval_inner_steps=3, inner_lr=0.0, batch_norm="per_step").double()
    assert head.per_step_bn.rows == 2
    head.meta_backward(episode_batch_of(data))
    head.eval()
    xs, ys, xq, _ = data
    with torch.no_grad():
        three = head.adapt_batch(xs, ys)(xq)
        head.eval_inner_steps = 1
        one = head.adapt_batch(xs, ys)(xq)
    # inner_lr = 0: the fast weights never move, so the number of steps may change nothing
    assert torch.allclose(three, one, atol=1e-12)
    assert [head.per_step_bn.row(k, False) for k in range(3)] == [0, 0, 0] and head.per_step_bn.row(3, True) == 1


def test_per_step_batchnorm_loads_a_table_with_untrained_extra_rows() -> None:
    """Earlier versions sized the table by max(inner_steps, eval_inner_steps) + 1; the trained rows are kept."""
    old = MAML(small_conv(), N, inner_steps=1, batch_norm="per_step").double()
    state = old.state_dict()
    for key in [k for k in state if k.startswith("per_step_bn.")]:
        state[key] = torch.cat([state[key] + 1.0, torch.full_like(state[key], 7.0)])  # rows 2-3: never trained
    new = MAML(small_conv(), N, inner_steps=1, batch_norm="per_step").double()
    new.load_state_dict(state)
    assert torch.equal(new.per_step_bn.running_mean_0, old.per_step_bn.running_mean_0 + 1.0)
    assert torch.equal(new.per_step_bn.weight[1], old.per_step_bn.weight[1] + 1.0)


def test_the_checkpoint_loader_accepts_per_step_tables_with_untrained_extra_rows() -> None:
    """`metaformer eval` / `--resume` compare shapes before load_state_dict: the old tables are cut there too."""
    from pathlib import Path

    from training.checkpoint import Checkpoint, load_weights_into
    from training.config import Config

    old = MAML(small_conv(), N, inner_steps=1, batch_norm="per_step").double()
    state = {k: (torch.cat([v, torch.full_like(v, 7.0)]) if k.startswith("per_step_bn.") else v)
             for k, v in old.state_dict().items()}
    new = MAML(small_conv(), N, inner_steps=1, batch_norm="per_step").double()
    load_weights_into(new, Checkpoint(Path("old"), 1, "maml", "MAML", Config(), state), "maml")
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in new.state_dict().items())


def test_lstm_meta_learner_first_step_is_sgd_with_gate_rates() -> None:
    """At init the forget gate is ~1 and the input gate ~inner_lr: the first step is almost SGD."""
    torch.manual_seed(0)
    head = LSTMMetaLearner(small_conv(), N, inner_steps=1, inner_lr=0.2, path="loop").double()
    maml = MAML(small_conv(), N, inner_steps=1, inner_lr=0.2, path="loop").double()
    maml.net.load_state_dict(head.net.state_dict())
    xs, ys, xq, _ = make_data(9)
    with torch.no_grad():
        a = head.adapt_batch(xs, ys)(xq)
        b = maml.adapt_batch(xs, ys)(xq)
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    data = make_data(9)
    grads = head_meta_grad(head, data, extra=list(head.lstm.parameters()) + list(head.gate_i.parameters()))
    assert float(grads[-1].abs()) > 0  # the gates are meta-learned


def test_bad_options_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="batch_norm"):
        MAML(small_conv(), N, batch_norm="running")
    with pytest.raises(ValueError, match="path"):
        MAML(small_conv(), N, path="vmap")
    with pytest.raises(ValueError, match="unknown head"):
        build_head("maml2", small_conv())
    with pytest.raises(ValueError, match="n_way"):
        MAML(small_conv(), 2).double().adapt_batch(*make_data()[:2])
    with pytest.raises(ValueError, match="checkpoint"):
        ANIL(small_conv(), N, checkpoint=True)
    with pytest.raises(ValueError, match="checkpoint"):
        LSTMMetaLearner(small_conv(), N, checkpoint=True)
    with pytest.raises(ValueError, match="out_dim"):
        MAML(nn.Linear(2, 2), 2)


def test_lstm_meta_learner_batched_equals_loop() -> None:
    torch.manual_seed(0)
    data = make_data(10)
    loop = LSTMMetaLearner(small_conv(), N, inner_steps=3, inner_lr=0.2, path="loop").double()
    batched = LSTMMetaLearner(small_conv(), N, inner_steps=3, inner_lr=0.2, path="batched").double()
    batched.load_state_dict(loop.state_dict())
    extra_l = list(loop.lstm.parameters()) + list(loop.gate_i.parameters()) + list(loop.gate_f.parameters())
    extra_b = list(batched.lstm.parameters()) + list(batched.gate_i.parameters()) + list(batched.gate_f.parameters())
    assert rel_err(head_meta_grad(batched, data, extra_b), head_meta_grad(loop, data, extra_l)) < 1e-8
