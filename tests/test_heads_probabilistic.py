"""Probabilistic MAML: σ = 0 is MAML, the KL against torch.distributions, seeded sampling, training; ECE."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from metaformer.data import Episode, EpisodeBatch, EpisodeSampler, GlyphFamily, SinusoidFamily
from metaformer.heads import MAML, ProbabilisticMAML, build_head
from metaformer.models import build_backbone
from training.config import load_config
from training.evaluation import EvalResult, evaluate, expected_calibration_error, markdown_table, predict
from training.registry import build_model

T, N, K, Q = 3, 3, 2, 2
LR = 0.3
SINUSOID = Path(__file__).resolve().parents[1] / "training" / "configs" / "sinusoid.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def conv() -> nn.Module:
    """A Conv-4 with 8 channels (BatchNorm) for 16x16 images, in float64."""
    return build_backbone("conv4", in_channels=1, hidden=8).double()


def mlp() -> nn.Module:
    """A 2-layer MLP for 1-d regression, in float64."""
    return build_backbone("mlp", in_dim=1, hidden=16, num_layers=2).double()


def class_batch(seed: int = 0) -> EpisodeBatch:
    """T tasks of N-way K-shot random 16x16 images (float64)."""
    g = torch.Generator().manual_seed(seed)
    eps = [Episode(torch.randn(N * K, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(N).repeat_interleave(K),
                   torch.randn(N * Q, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(N).repeat_interleave(Q),
                   [str(i) for i in range(N)]) for _ in range(T)]
    return EpisodeBatch.collate(eps)


def reg_batch(seed: int = 0) -> EpisodeBatch:
    """T sinusoid tasks, 5 support and 6 query points (float64)."""
    g = torch.Generator().manual_seed(seed)
    eps = []
    for _ in range(T):
        amp, phase = 0.5 + 4 * float(torch.rand((), generator=g)), math.pi * float(torch.rand((), generator=g))
        x = torch.rand(11, 1, generator=g, dtype=torch.float64) * 10 - 5
        y = amp * torch.sin(x - phase)
        eps.append(Episode(x[:5], y[:5], x[5:], y[5:], []))
    return EpisodeBatch.collate(eps)


def pair(kind: str, **kw: object) -> tuple[ProbabilisticMAML, MAML]:
    """A probabilistic head and a MAML head with the same μ (float64), same inner-loop settings."""
    torch.manual_seed(0)
    opts = dict(inner_steps=2, inner_lr=LR if kind == "classification" else 0.05)
    if kind == "classification":
        prob = ProbabilisticMAML(conv(), N, **opts, **kw).double()
        maml = MAML(conv(), N, **opts).double()
    else:
        prob = ProbabilisticMAML(mlp(), kind="regression", **opts, **kw).double()
        maml = MAML(mlp(), kind="regression", **opts).double()
    maml.net.load_state_dict(prob.net.state_dict())
    return prob, maml


def batch_of(kind: str, seed: int = 0) -> EpisodeBatch:
    """A classification or regression meta-batch."""
    return class_batch(seed) if kind == "classification" else reg_batch(seed)


def max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    """Largest absolute difference over lists of tensors."""
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- σ = 0 is MAML
@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_deterministic_head_is_exactly_maml(kind: str) -> None:
    prob, maml = pair(kind, deterministic=True, kl_weight=0.0)
    batch = batch_of(kind)
    loss_p, metrics = prob.loss(batch)
    loss_m, _ = maml.loss(batch)
    assert loss_p.item() == loss_m.item() and metrics["nll"] == loss_m.item()
    gp = torch.autograd.grad(loss_p, list(prob.net.parameters()))
    gm = torch.autograd.grad(loss_m, list(maml.net.parameters()))
    assert max_diff(list(gp), list(gm)) == 0.0
    for head in (prob, maml):
        head.eval()
    pp = predict(prob, batch)
    assert torch.equal(pp, predict(maml, batch))


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_zero_variance_sampling_path_equals_maml(kind: str) -> None:
    """logvar = -inf: θ = μ + 0·ε through the sampling path; predictions, loss and d/dμ are MAML's."""
    prob, maml = pair(kind, kl_weight=0.0, num_samples=2, eval_samples=3)
    with torch.no_grad():
        for lv in prob.logvar:
            lv.fill_(float("-inf"))
    batch = batch_of(kind, 1)
    loss_p, _ = prob.loss(batch)
    loss_m, _ = maml.loss(batch)
    assert abs(loss_p.item() - loss_m.item()) < 1e-6
    grads = torch.autograd.grad(loss_p, list(prob.net.parameters()) + list(prob.logvar), allow_unused=True)
    gm = torch.autograd.grad(loss_m, list(maml.net.parameters()))
    n = len(gm)
    assert max_diff(list(grads[:n]), list(gm)) < 1e-6
    assert all(g is None or bool((g == 0).all()) for g in grads[n:])  # σ = 0: no signal, and no NaN
    for head in (prob, maml):
        head.eval()
    pp, pm = predict(prob, batch), predict(maml, batch)
    if kind == "classification":
        # 3 identical samples: log of the mean softmax is MAML's log-softmax
        pp, pm = torch.softmax(pp, -1), torch.softmax(pm, -1)
    assert float((pp - pm).abs().max()) < 1e-6
    mean, std = prob.adapt_batch(batch.support_x, batch.support_y).mean_and_std(batch.query_x)
    assert float(std.detach().abs().max()) < 1e-12


# ---------------------------------------------------------------------------------------------- the KL
def test_kl_matches_torch_distributions() -> None:
    torch.manual_seed(1)
    head = ProbabilisticMAML(mlp(), kind="regression", prior_std=0.7, init_logvar=-3.0, kl_weight=0.01).double()
    with torch.no_grad():
        for lv in head.logvar:
            lv.uniform_(-6.0, 1.0)
    ref = float(sum(
        kl_divergence(Normal(mu, torch.exp(0.5 * lv)), Normal(torch.zeros_like(mu), torch.full_like(mu, 0.7))).sum()
        for mu, lv in zip(head.fast_parameters(), head.logvar)
    ).detach())
    got = head.kl_divergence().detach()
    assert abs(float(got) - ref) <= 1e-10 * ref
    # the loss is the NLL plus kl_weight times that KL
    batch = reg_batch(2)
    torch.manual_seed(5)
    loss, metrics = head.loss(batch)
    assert metrics["kl"] == pytest.approx(ref, rel=1e-12)
    assert loss.item() == pytest.approx(metrics["nll"] + head.kl_weight * ref, rel=1e-12)
    # the KL gradient reaches the log-variances even where the data term gives none
    assert all(g is not None and float(g.abs().max()) > 0 for g in torch.autograd.grad(loss, list(head.logvar)))


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_seeded_sampling_is_reproducible_and_differs_from_maml(kind: str) -> None:
    prob, maml = pair(kind, init_logvar=-2.0, eval_samples=3)
    batch = batch_of(kind, 3)
    prob.eval()
    maml.eval()

    def run(seed: int) -> Tensor:
        with torch.enable_grad():
            p = prob.adapt_batch(batch.support_x, batch.support_y, generator=prob.sample_generator(seed))
            return p(batch.query_x).detach()

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert float((a - c).abs().max()) > 1e-4
    assert float((a - predict(maml, batch)).abs().max()) > 1e-4
    # evaluation mode without a generator: the eval_seed, reproducible and the global RNG untouched
    state = torch.get_rng_state()
    assert torch.equal(predict(prob, batch), predict(prob, batch))
    assert torch.equal(torch.get_rng_state(), state)
    # training mode follows the global RNG
    prob.train()
    torch.manual_seed(3)
    l1 = prob.loss(batch)[0].item()
    torch.manual_seed(3)
    assert prob.loss(batch)[0].item() == l1


def test_predict_with_std_for_one_task_and_classification_outputs() -> None:
    prob, _ = pair("regression", init_logvar=-1.0, eval_samples=4)
    prob.eval()
    batch = reg_batch(4)
    grid = torch.linspace(-5, 5, 9, dtype=torch.float64).unsqueeze(1)
    with torch.no_grad():  # works under no_grad: the inner loop turns gradients on itself
        mean, std = prob.predict_with_std(batch.support_x[0], batch.support_y[0], grid, generator=prob.sample_generator(0))
    assert mean.shape == std.shape == (9, 1) and bool((std > 0).all())
    outs = prob.adapt_batch(batch.support_x[:1], batch.support_y[:1], generator=prob.sample_generator(0)).sample_outputs(grid[None])
    assert torch.allclose(mean, outs.mean(0)[0]) and torch.allclose(std, outs.std(0, correction=0)[0])
    # classification: the predictor returns log mean probabilities (normalised, usable as logits)
    cls, _ = pair("classification", init_logvar=-2.0, eval_samples=3)
    cls.eval()
    cb = class_batch(5)
    with torch.enable_grad():
        pred = cls.adapt_batch(cb.support_x, cb.support_y)
        out = pred(cb.query_x).detach()
        probs = torch.softmax(pred.sample_outputs(cb.query_x).detach(), -1).mean(0)
    assert torch.allclose(out.exp(), probs, atol=1e-12)
    assert torch.allclose(out.exp().sum(-1), torch.ones(T, N * Q, dtype=torch.float64))


def test_padded_ways_and_errors() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    eps = [Episode(torch.randn(n, 1, 16, 16, generator=g), torch.arange(n), torch.randn(n, 1, 16, 16, generator=g),
                   torch.arange(n), [str(i) for i in range(n)]) for n in (3, 2)]
    batch = EpisodeBatch.collate(eps)
    head = build_head("platipus", build_backbone("conv4", in_channels=1, hidden=8), n_way=3, inner_steps=1,
                      num_samples=2, eval_samples=2)
    assert isinstance(head, ProbabilisticMAML) and isinstance(build_head("probabilistic_maml", conv(), n_way=3), ProbabilisticMAML)
    loss, metrics = head.loss(batch)
    assert math.isfinite(loss.item()) and 0 <= metrics["accuracy"] <= 1 and metrics["kl"] > 0
    head.eval()
    out = predict(head, batch)
    assert bool(torch.isinf(out[1, :, 2]).all()) and bool(torch.isfinite(out[0]).all())
    for bad, match in ((dict(num_samples=0), "num_samples"), (dict(eval_samples=1.5), "eval_samples"),
                       (dict(prior_std=0.0), "prior_std"), (dict(kl_weight=-1.0), "kl_weight"),
                       (dict(init_logvar=float("nan")), "init_logvar")):
        with pytest.raises(ValueError, match=match):
            ProbabilisticMAML(conv(), 3, **bad)
    with pytest.raises(ValueError, match="num_samples"):
        head.adapt_batch(batch.support_x, batch.support_y, batch.support_mask, batch.n_way, num_samples=0)


# ---------------------------------------------------------------------------------------------- training
def test_short_sinusoid_meta_training_lowers_the_loss() -> None:
    torch.manual_seed(0)
    family = SinusoidFamily(10, 10, seed=0)
    batches = [family.batch(8 * i, 8) for i in range(4)]
    head = ProbabilisticMAML(build_backbone("mlp", in_dim=1, hidden=40, num_layers=2), kind="regression",
                             inner_steps=1, inner_lr=0.01, init_logvar=-6.0, eval_samples=4)
    assert head.resolve_path(batches[0].support_x) == "batched"
    held_out = family.batch(1000, 25)

    def held_out_mse() -> float:
        head.eval()
        out = predict(head, held_out)
        head.train()
        return float(((out - held_out.query_y) ** 2).mean())

    before_mse, before_loss = held_out_mse(), head.loss(batches[0])[0].item()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    logvar0 = [lv.detach().clone() for lv in head.logvar]
    for step in range(60):
        opt.zero_grad()
        loss, metrics = head.meta_backward(batches[step % 4])
        assert math.isfinite(float(loss)) and {"nll", "kl", "mse"} <= set(metrics)
        opt.step()
    after_mse = held_out_mse()
    assert after_mse < 0.8 * before_mse, (before_mse, after_mse)  # measured: 4.23 -> 2.84
    assert head.loss(batches[0])[0].item() < before_loss
    assert max_diff(list(head.logvar), logvar0) > 0  # σ is learned


def test_sinusoid_config_builds_and_trains_one_step() -> None:
    cfg = load_config(SINUSOID, ["model.name=probmaml", "model.options={inner_steps: 1, inner_lr: 0.01, eval_samples: 2}"])
    model = build_model(cfg)
    assert isinstance(model, ProbabilisticMAML) and model.kind == "regression" and model.eval_samples == 2
    loss, metrics = model.meta_backward(SinusoidFamily(10, 10, seed=1).batch(0, 4))
    assert math.isfinite(float(loss)) and "kl" in metrics


# ---------------------------------------------------------------------------------------------- calibration
def reference_ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Textbook ECE: bins (b/n, (b+1)/n], sum of |acc - conf| weighted by the fraction of predictions."""
    conf, pred = probs.max(-1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        sel = [i for i in range(len(conf)) if lo < float(conf[i]) <= hi]
        if sel:
            acc = sum(float(pred[i] == labels[i]) for i in sel) / len(sel)
            avg = sum(float(conf[i]) for i in sel) / len(sel)
            total += abs(acc - avg) * len(sel) / len(conf)
    return total


def test_expected_calibration_error_by_hand() -> None:
    def rows(conf: float, right: int, wrong: int) -> tuple[list[list[float]], list[int]]:
        # 3 classes: the predicted class 0 gets `conf`, the rest split the remainder
        p = [conf, (1 - conf) / 2, (1 - conf) / 2]
        return [p] * (right + wrong), [0] * right + [1] * wrong

    # perfectly calibrated: conf 0.8 with 4/5 right, conf 0.6 with 3/5 right -> 0
    (p1, y1), (p2, y2) = rows(0.8, 4, 1), rows(0.6, 3, 2)
    probs, labels = torch.tensor(p1 + p2, dtype=torch.float64), torch.tensor(y1 + y2)
    assert expected_calibration_error(probs, labels, from_logits=False) == pytest.approx(0.0, abs=1e-12)
    # overconfident: 4 at 0.9 with 2 right, 2 at 0.7 with 1 right -> (4 * 0.4 + 2 * 0.2) / 6 = 1/3
    (p1, y1), (p2, y2) = rows(0.9, 2, 2), rows(0.7, 1, 1)
    probs, labels = torch.tensor(p1 + p2, dtype=torch.float64), torch.tensor(y1 + y2)
    assert expected_calibration_error(probs, labels, from_logits=False) == pytest.approx(1 / 3, abs=1e-12)
    # from logits (softmax of log p is p), and masked entries are ignored
    assert expected_calibration_error(probs.log(), labels) == pytest.approx(1 / 3, abs=1e-12)
    padded = torch.cat([probs, torch.tensor([[0.99, 0.005, 0.005]], dtype=torch.float64)]).log()
    mask = torch.tensor([True] * 6 + [False])
    assert expected_calibration_error(padded, torch.cat([labels, torch.tensor([2])]), mask=mask) == pytest.approx(1 / 3, abs=1e-12)
    # random predictions against the textbook loop, several bin counts
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(200, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (200,), generator=g)
    for bins in (1, 10, 15):
        ref = reference_ece(torch.softmax(logits, -1), y, bins)
        assert expected_calibration_error(logits, y, bins) == pytest.approx(ref, abs=1e-12)
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(logits, y, 0)
    with pytest.raises(ValueError, match="labels"):
        expected_calibration_error(logits, y[:5])


def test_evaluate_fills_ece_for_classifiers_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sampler = EpisodeSampler(GlyphFamily("test", seed=0, image_size=16), 3, 1, 3, seed=0)
    head = ProbabilisticMAML(build_backbone("conv4", in_channels=1, hidden=8), 3, inner_steps=1, eval_samples=2)
    res = evaluate(head, sampler, 6, 4, torch.device("cpu"), name="probmaml")
    assert res.metric == "accuracy" and res.ece is not None and 0.0 <= res.ece <= 1.0
    # the pooled ECE over all real queries of all episodes (batches of 4 then 2)
    outs = [predict(head, sampler.batch(0, 4)), predict(head, sampler.batch(4, 2))]
    logits = torch.cat([o.reshape(-1, 3) for o in outs])
    labels = torch.cat([sampler.batch(0, 4).query_y.reshape(-1), sampler.batch(4, 2).query_y.reshape(-1)])
    assert res.ece == pytest.approx(expected_calibration_error(logits, labels), abs=1e-12)
    assert json.loads(json.dumps(res.to_dict()))["ece"] == pytest.approx(res.ece)
    reg = ProbabilisticMAML(mlp().float(), kind="regression", inner_steps=1, inner_lr=0.01, eval_samples=2)
    rres = evaluate(reg, SinusoidFamily(5, 5, seed=0), 4, 4, torch.device("cpu"), name="reg")
    assert rres.metric == "mse" and rres.ece is None and rres.to_dict()["ece"] is None
    table = markdown_table([res, rres])
    assert "ECE (%)" in table and f"| {100 * res.ece:.2f} |" in table
    assert "ECE" not in markdown_table([rres])
    assert EvalResult("A", "accuracy", 0.5, 0.0, 0.0, 1).ece is None  # old positional callers still work
