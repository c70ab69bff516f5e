"""Probabilistic MAML (amortised, PLATIPUS-style): a Gaussian over the MAML initialisation.

The initial fast weights are random, ``θ ~ q(θ) = N(μ, diag σ²)``: ``μ`` is the usual MAML initialisation
(the head's own parameters) and ``logvar = log σ²`` a learned tensor per fast weight (one value per
coordinate, initialised to ``init_logvar``). A task adapts a sample ``θ = μ + σ·ε`` (reparameterised, one
``ε`` per task) with the ordinary MAML inner loop of :class:`~metaformer.heads.gradient.GradientHead`, so
every inner step goes through :func:`metaformer.ops.inner_update` and BatchNorm, ANIL-style ``adapt="head"``,
first order, checkpointing and both execution paths behave exactly as in MAML.

Training minimises the negative ELBO::

    loss = mean_s mean_t query_loss_t(adapt(θ_s)) + kl_weight * KL(q(θ) || p(θ)),   p(θ) = N(0, prior_std² I)

with ``num_samples`` samples ``θ_s`` per task. The KL is summed over all coordinates of the fast weights
(closed form, see :meth:`ProbabilisticMAML.kl_divergence`); ``kl_weight`` is the weight of that sum in the
loss of one task. The sum scales with the network: at ``init_logvar=-8`` and ``prior_std=1`` it is ~3.5
nats per coordinate, ~6k for the sinusoid MLP (40 hidden) and ~390k for a Conv-4 with 64 channels, so the
default ``kl_weight=1e-6`` adds 0.006 / 0.4 to the logged loss (1e-4 would add ~40 for the Conv-4 and swamp
the query loss; the strict ELBO weight, one over the number of training tasks times queries, is smaller
still). Its gradient is ``kl_weight * (σ²/prior_std² - 1) / 2`` per log-variance and ``kl_weight * μ /
prior_std²`` per mean coordinate (a weight decay). The logged metrics carry ``nll`` and ``kl`` beside the
total ``loss``.

Prediction draws ``eval_samples`` samples (``num_samples`` in training mode) and averages the predictive
distributions: classification returns ``log(mean_s softmax(logits_s))`` (so argmax and cross-entropy work
as with logits; with one sample the raw logits), regression the mean prediction.
:meth:`ProbabilisticPredictor.mean_and_std` and :meth:`ProbabilisticMAML.predict_with_std` also give the
spread over samples (the predictive standard deviation of the regression output, or of the class
probabilities).

Randomness: training mode uses the global RNG. Evaluation mode (``head.eval()``) draws from a fresh
CPU generator seeded with ``eval_seed`` (default 0) on every ``adapt_batch`` call, so evaluation is
reproducible and leaves the global RNG alone (a task's samples depend on its position in the batch, so
re-batching the same tasks draws other samples); pass ``generator=`` (e.g. ``head.sample_generator(seed)``)
to choose the samples explicitly, or set ``eval_seed=None`` for the global RNG.

σ = 0: with ``deterministic=True`` the initialisation is ``μ`` itself (no sampling, one sample), so the
predictions and the query loss are exactly MAML's with the same parameters; ``logvar = -inf`` gives the
same predictions through the sampling path (the KL is then infinite, so use ``kl_weight=0``).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .base import BatchPredictor, Inputs
from .gradient import FastWeights, GradientHead
from .losses import batch_metrics, check_has_examples, check_targets, mask_unused_classes, task_losses


class ProbabilisticPredictor(BatchPredictor):
    """Queries of T tasks through S sampled-and-adapted fast weights; the predictive average over samples."""

    def __init__(self, head: "ProbabilisticMAML", samples: list[FastWeights], n_way: Optional[Tensor], path: str) -> None:
        """Hold the S adapted weight samples of a head."""
        self.head = head
        self.samples = samples
        self.n_way = n_way
        self.path = path

    @property
    def num_samples(self) -> int:
        """S, the number of weight samples."""
        return len(self.samples)

    def sample_outputs(self, query_x: Inputs, query_mask: Optional[Tensor] = None) -> Tensor:
        """Per-sample outputs [S, T, Q, n_out] (logits with classes beyond n_way at -inf, or regression outputs)."""
        outs = []
        for fast in self.samples:
            out = self.head.forward_fast(
                fast.tensors, query_x, query_mask, fast.step, self.path,
                once_differentiable=self.head.query_stem_fused(), query=True,
            )
            outs.append(mask_unused_classes(out, self.n_way) if self.head.kind == "classification" else out)
        return torch.stack(outs)

    def __call__(self, query_x: Inputs, query_mask: Optional[Tensor] = None) -> Tensor:
        """query_x [T, Q, *item] -> log mean probabilities [T, Q, n_out] (classification) or mean outputs."""
        return self.head.combine_samples(self.sample_outputs(query_x, query_mask))

    def mean_and_std(self, query_x: Inputs, query_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(mean, std) over samples: of the outputs (regression) or of the class probabilities (classification).

        The std is that of the S-sample predictive mixture (no Bessel correction; 0 with one sample).
        """
        outs = self.sample_outputs(query_x, query_mask)
        if self.head.kind == "classification":
            outs = torch.softmax(outs, dim=-1)
        return outs.mean(0), outs.std(0, correction=0)


class ProbabilisticMAML(GradientHead):
    """MAML with a Gaussian over the initial fast weights (amortised PLATIPUS); see the module docstring."""

    def __init__(
        self,
        backbone: nn.Module,
        n_way: int = 5,
        *,
        init_logvar: float = -8.0,
        prior_std: float = 1.0,
        kl_weight: float = 1e-6,
        num_samples: int = 1,
        eval_samples: int = 5,
        eval_seed: Optional[int] = 0,
        deterministic: bool = False,
        **kw: Any,
    ) -> None:
        """Same options as MAML (``inner_steps``, ``inner_lr``, ``first_order``, ``batch_norm``, ``adapt`` ...) plus:

        ``init_logvar`` (initial log σ² of every coordinate), ``prior_std`` (std of the N(0, prior_std² I)
        prior), ``kl_weight`` (weight of the summed KL in the loss), ``num_samples`` / ``eval_samples``
        (weight samples per task in training / evaluation mode), ``eval_seed`` (seed of the evaluation-mode
        samples, None: global RNG) and ``deterministic`` (σ treated as 0: adapt from μ, i.e. plain MAML).
        """
        adapt = kw.pop("adapt", "all")
        super().__init__(backbone, n_way, adapt=adapt, **kw)
        if not isinstance(init_logvar, (int, float)) or not math.isfinite(init_logvar):
            raise ValueError(f"init_logvar must be a finite float (log σ² of the initialisation), got {init_logvar!r}")
        if not isinstance(prior_std, (int, float)) or not prior_std > 0 or not math.isfinite(prior_std):
            raise ValueError(f"prior_std must be a finite float > 0, got {prior_std!r}")
        if not isinstance(kl_weight, (int, float)) or not kl_weight >= 0 or not math.isfinite(kl_weight):
            raise ValueError(f"kl_weight must be a finite float >= 0, got {kl_weight!r}")
        for name, value in (("num_samples", num_samples), ("eval_samples", eval_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1 (weight samples per task), got {value!r}")
        if eval_seed is not None and (isinstance(eval_seed, bool) or not isinstance(eval_seed, int)):
            raise ValueError(f"eval_seed must be an int or None, got {eval_seed!r}")
        self.prior_std = float(prior_std)
        self.kl_weight = float(kl_weight)
        self.num_samples = num_samples
        self.eval_samples = eval_samples
        self.eval_seed = eval_seed
        self.deterministic = bool(deterministic)
        self.logvar = nn.ParameterList(
            [nn.Parameter(torch.full_like(p, float(init_logvar))) for p in self.fast_parameters()]
        )

    # ------------------------------------------------------------------ the distribution over initialisations
    def stds(self) -> list[Tensor]:
        """σ of every fast weight, in ``fast_names`` order."""
        return [torch.exp(0.5 * lv) for lv in self.logvar]

    def kl_divergence(self) -> Tensor:
        """KL(N(μ, diag σ²) || N(0, prior_std² I)) summed over all coordinates of the fast weights (a scalar)."""
        var_p = self.prior_std**2
        total = torch.zeros((), dtype=self.logvar[0].dtype, device=self.logvar[0].device)
        for mu, lv in zip(self.fast_parameters(), self.logvar):
            # closed form per coordinate: log(s_p/s_q) + (s_q² + μ²) / (2 s_p²) - 1/2
            kl = 0.5 * (math.log(var_p) - lv) + (torch.exp(lv) + mu.pow(2)) / (2 * var_p) - 0.5
            total = total + kl.sum()
        return total

    @staticmethod
    def sample_generator(seed: int) -> torch.Generator:
        """A CPU generator seeded with ``seed``, for ``adapt_batch(..., generator=...)`` and ``predict_with_std``."""
        return torch.Generator().manual_seed(int(seed))

    def sample_init(self, t: int, generator: Optional[torch.Generator] = None) -> list[Tensor]:
        """One initialisation per task, θ = μ + σ·ε with ε ~ N(0, I): tensors [T, *shape] in ``fast_names`` order."""
        init = []
        for mu, lv in zip(self.fast_parameters(), self.logvar):
            shape = (t, *mu.shape)
            if generator is None:
                eps = torch.randn(shape, dtype=mu.dtype, device=mu.device)
            else:
                # drawn on the generator's device, so a CPU seed gives the same samples on every device
                eps = torch.randn(shape, dtype=mu.dtype, device=generator.device, generator=generator).to(mu.device)
            init.append(mu.unsqueeze(0) + torch.exp(0.5 * lv).unsqueeze(0) * eps)
        return init

    # ------------------------------------------------------------------ adaptation and prediction
    def combine_samples(self, outs: Tensor) -> Tensor:
        """Per-sample outputs [S, T, Q, n] -> predictive [T, Q, n]: log mean softmax (classification) or mean."""
        if outs.shape[0] == 1:
            return outs[0]
        if self.kind == "classification":
            # log-sum-exp keeps -inf (unused classes) at -inf and avoids underflow of tiny probabilities
            return torch.logsumexp(torch.log_softmax(outs, dim=-1), dim=0) - math.log(outs.shape[0])
        return outs.mean(0)

    def adapt_batch(
        self,
        support_x: Inputs,
        support_y: Tensor,
        support_mask: Optional[Tensor] = None,
        n_way: Optional[Union[int, Tensor]] = None,
        *,
        generator: Optional[torch.Generator] = None,
        num_samples: Optional[int] = None,
    ) -> ProbabilisticPredictor:
        """Sample S initialisations per task, adapt each with the MAML inner loop -> predictor averaging them.

        S is ``num_samples`` if given, else ``self.num_samples`` (training mode) or ``self.eval_samples``
        (evaluation mode); ``deterministic`` heads use S = 1 and adapt from μ.
        """
        self.check_gradients_allowed()
        t, mask, ways = self.check_support(support_x, support_y, support_mask, n_way)
        if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1):
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        path = self.resolve_path(support_x)
        steps = self.inner_steps if self.training else self.eval_inner_steps
        track_meta = torch.is_grad_enabled()
        if self.deterministic:
            return ProbabilisticPredictor(self, [self.adapt_fast(support_x, support_y, mask, ways, steps, path, track_meta)],
                                          ways, path)
        count = num_samples if num_samples is not None else (self.num_samples if self.training else self.eval_samples)
        if generator is None and not self.training and self.eval_seed is not None:
            generator = self.sample_generator(self.eval_seed)
        samples = []
        for _ in range(count):
            init = self.sample_init(t, generator)
            samples.append(self.adapt_fast(support_x, support_y, mask, ways, steps, path, track_meta, init=init))
        return ProbabilisticPredictor(self, samples, ways, path)

    def predict_with_std(
        self,
        support_x: Inputs,
        support_y: Tensor,
        query_x: Inputs,
        n_way: Optional[Union[int, Tensor]] = None,
        *,
        generator: Optional[torch.Generator] = None,
        num_samples: Optional[int] = None,
    ) -> tuple[Tensor, Tensor]:
        """Predictive (mean, std) of the queries, detached: [Q, n_out] for one task (support_x [S, *item]) or [T, Q, n_out].

        Regression: mean and std of the output over weight samples; classification: of the class probabilities.
        """
        single = support_y.dim() == (1 if self.kind == "classification" else 2)
        if single:
            support_x = [support_x] if isinstance(support_x, list) else support_x.unsqueeze(0)
            query_x = [query_x] if isinstance(query_x, list) else query_x.unsqueeze(0)
            support_y = support_y.unsqueeze(0)
        # no graph to the meta-parameters (adapt_fast enables grad for the inner loop itself): memory of one sample
        with torch.no_grad():
            predictor = self.adapt_batch(support_x, support_y, None, n_way, generator=generator, num_samples=num_samples)
            mean, std = predictor.mean_and_std(query_x)
        mean, std = mean.detach(), std.detach()
        return (mean[0], std[0]) if single else (mean, std)

    # ------------------------------------------------------------------ meta-training loss
    def loss(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """Negative ELBO: mean over samples and tasks of the query loss + kl_weight * KL; metrics include nll and kl."""
        check_has_examples(batch.query_mask, "query")
        with self.statistics_scope():
            predictor = self.adapt_batch(batch.support_x, batch.support_y, batch.support_mask, batch.n_way)
            outs = predictor.sample_outputs(batch.query_x, batch.query_mask)
        check_targets(outs[0], batch.query_y, batch.query_mask, self.kind, batch.n_way)
        per_task = torch.stack([task_losses(o, batch.query_y, batch.query_mask, self.kind) for o in outs]).mean(0)
        nll = per_task.mean()
        kl = self.kl_divergence()
        # kl_weight = 0 leaves the KL out of the graph (it is infinite at σ = 0)
        total = nll + self.kl_weight * kl if self.kl_weight > 0 else nll
        with torch.no_grad():
            pred = self.combine_samples(outs.detach())
            metrics = batch_metrics(pred, batch.query_y, batch.query_mask, self.kind,
                                    task_losses(pred, batch.query_y, batch.query_mask, self.kind))
        metrics.update(loss=float(total.detach()), nll=float(nll.detach()), kl=float(kl.detach()))
        return total, metrics
