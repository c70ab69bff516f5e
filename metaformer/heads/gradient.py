"""The shared inner loop of the gradient-based heads (MAML family, Reptile, LSTM meta-learner).

A gradient-based head is ``backbone -> nn.Linear(out_dim, n_out)``. Its *fast weights* are a subset of
those parameters (all of them for MAML, the linear classifier for ANIL); every inner step is

    grads = d(sum_t support_loss_t) / d(fast)            (per task, because fast weights carry a task dim)
    fast  = metaformer.ops.inner_update(fast, grads, lr, decay)

``lr``/``decay`` are a float (MAML), learned per-parameter tensors (Meta-SGD) or LSTM gates (Ravi &
Larochelle). The meta-gradient flows through ``inner_update`` (second order: ``create_graph=True``;
first order: the inner gradients are detached, so the Hessian term vanishes).

Execution path (``path=``): "loop" runs one functional forward per task, "batched" runs the whole
meta-batch in one pass (grouped convs / batched matmuls, see :mod:`metaformer.heads.functional`);
"auto" (default) picks "loop" for convolutions on CPU and "batched" otherwise. Both are tested against
a plain per-task autograd loop.

BatchNorm (``batch_norm=``, see :mod:`metaformer.heads.batchnorm`): "transductive" (default, original
MAML: per-task batch statistics in training and evaluation, BN weight/bias adapted like any fast weight)
or "per_step" (MAML++: per-step running statistics and per-step BN weight/bias, not adapted).

Memory (``first_order=True``: no second-order graph; ``checkpoint=True``: each inner step is
recomputed during the backward instead of keeping its activations, so peak memory holds one inner step's
graph instead of all of them; it needs ``loss.backward()`` / ``meta_backward`` (the reentrant checkpoint
does not support ``torch.autograd.grad`` on the meta-loss), and costs one more forward+backward of every step;
with ``batch_norm="per_step"`` the recomputation's statistics join the step's one update inside ``meta_backward``,
while after a plain ``loss.backward()`` they count as a second update).
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from metaformer.ops import inner_update
from metaformer.ops.conv_bn_relu_pool import stem_is_fast

from .base import BatchPredictor, FewShotHead, Inputs
from .batchnorm import BN_MODES, PerStepBatchNorm, batchnorm_modules
from .functional import choose_path, functional_forward, has_convolutions
from .losses import mask_unused_classes, task_losses


class BackboneWithLinear(nn.Module):
    """``backbone`` followed by a linear layer: the network a gradient-based head adapts."""

    def __init__(self, backbone: nn.Module, n_out: int) -> None:
        """Wrap ``backbone`` (with an ``out_dim`` attribute) and add ``classifier = Linear(out_dim, n_out)``."""
        super().__init__()
        dim = getattr(backbone, "out_dim", None)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(
                f"{type(backbone).__name__} has no positive int attribute `out_dim`; every backbone must declare its feature size"
            )
        self.backbone = backbone
        self.classifier = nn.Linear(dim, n_out)

    def forward(self, x: Any) -> Tensor:
        """[B, *item] -> [B, n_out]."""
        return self.classifier(self.backbone(x))


class FastWeights:
    """Adapted state of T tasks: fast weights (task-batched) plus what the predictor needs."""

    def __init__(self, tensors: list[Tensor], step: int) -> None:
        """``tensors`` follow the head's ``fast_names``; ``step`` is the number of inner steps taken."""
        self.tensors = tensors
        self.step = step


class GradientPredictor(BatchPredictor):
    """Queries of T tasks through the network with the tasks' fast weights."""

    def __init__(self, head: "GradientHead", fast: FastWeights, n_way: Optional[Tensor], path: str) -> None:
        """Hold the adapted weights of a head."""
        self.head = head
        self.fast = fast
        self.n_way = n_way
        self.path = path

    def __call__(self, query_x: Inputs, query_mask: Optional[Tensor] = None) -> Tensor:
        """query_x [T, Q, *item] -> [T, Q, n_out] (classes beyond n_way are -inf)."""
        out = self.head.forward_fast(
            self.fast.tensors, query_x, query_mask, self.fast.step, self.path,
            once_differentiable=self.head.query_stem_fused(), query=True,
        )
        return mask_unused_classes(out, self.n_way) if self.head.kind == "classification" else out


class GradientHead(FewShotHead):
    """Base of the heads that adapt by gradient steps on the support loss; subclasses choose lr/decay."""

    def __init__(
        self,
        backbone: nn.Module,
        n_way: int = 5,
        *,
        kind: str = "classification",
        n_out: Optional[int] = None,
        inner_steps: int = 1,
        eval_inner_steps: Optional[int] = None,
        inner_lr: float = 0.4,
        first_order: bool = False,
        adapt: str = "all",
        batch_norm: str = "transductive",
        path: str = "auto",
        checkpoint: bool = False,
        max_grad_norm: Optional[float] = None,
        bn_momentum: float = 0.1,
    ) -> None:
        """Build the network ``backbone -> Linear(out_dim, n_out)`` and the inner-loop settings.

        ``adapt``: "all" (MAML) or "head" (ANIL: only the classifier is a fast weight; the backbone features
        are computed once per set). ``n_out`` defaults to ``n_way`` (classification) / 1 (regression).
        """
        out = n_out if n_out is not None else (n_way if kind == "classification" else 1)
        super().__init__(kind, out)
        if not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps must be an int >= 0, got {inner_steps!r}")
        if eval_inner_steps is not None and (not isinstance(eval_inner_steps, int) or eval_inner_steps < 0):
            raise ValueError(f"eval_inner_steps must be an int >= 0 or None, got {eval_inner_steps!r}")
        if batch_norm not in BN_MODES:
            raise ValueError(f"batch_norm must be one of {BN_MODES}, got {batch_norm!r}")
        if adapt not in ("all", "head"):
            raise ValueError(f"adapt must be 'all' (MAML) or 'head' (ANIL), got {adapt!r}")
        if checkpoint and adapt == "head":
            raise ValueError("checkpoint=True is for long inner loops over the whole network; ANIL adapts only the "
                             "linear head (its inner steps hold almost no activations): use checkpoint=False")
        if path not in ("auto", "batched", "loop"):
            raise ValueError(f"path must be 'auto', 'batched' or 'loop', got {path!r}")
        self.net = BackboneWithLinear(backbone, out)
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps if eval_inner_steps is not None else inner_steps
        self.inner_lr = float(inner_lr)
        self.first_order = bool(first_order)
        self.adapt_mode = adapt
        self.batch_norm = batch_norm
        self.path = path
        self.checkpoint = bool(checkpoint)
        self.max_grad_norm = max_grad_norm
        # the query pass of the predictors is differentiated once (the meta-gradient), so a Conv-4 stem may run
        # as the once-differentiable fused op there (metaformer.ops.conv_bn_relu_pool). None: where it is the
        # faster (the AVX-512 or AVX2 kernels); True / False force it (False for higher-order gradients through the
        # query pass)
        self.fused_query_stem: Optional[bool] = None
        bn_layers = batchnorm_modules(backbone)
        self.per_step_bn: Optional[PerStepBatchNorm] = None
        if batch_norm == "per_step":
            # rows for the training steps and the query forward: only those are ever trained (more steps at test
            # time reuse the last support row)
            self.per_step_bn = PerStepBatchNorm(bn_layers, inner_steps, bn_momentum)
        bn_param_ids = {id(p) for m in bn_layers for p in m.parameters(recurse=False)}
        module = self.net if adapt == "all" else self.net.classifier
        names = []
        for name, p in module.named_parameters():
            if batch_norm == "per_step" and id(p) in bn_param_ids:
                continue  # MAML++ BN weight/bias live in the per-step table and are not adapted
            if not p.requires_grad:
                continue  # a frozen parameter (a frozen encoder, say) is neither adapted nor meta-learned
            names.append(name)
        self.adapted_module = module
        self.fast_names: list[str] = names
        self._fast_ndims = [tuple(range(p.dim())) for p in self.fast_parameters()]

    # ------------------------------------------------------------------ parameters
    @property
    def backbone(self) -> nn.Module:
        """The feature extractor."""
        return self.net.backbone

    def fast_parameters(self) -> list[nn.Parameter]:
        """The meta-parameters that initialise the fast weights, in ``fast_names`` order."""
        params = dict(self.adapted_module.named_parameters())
        return [params[n] for n in self.fast_names]

    def resolve_path(self, x: Inputs) -> str:
        """The execution path for inputs ``x`` ("loop" or "batched")."""
        device = next(self.net.parameters()).device
        return choose_path(self.path, self.adapted_module, self.fast_names, device, isinstance(x, Tensor))

    def default_chunk_size(self, batch: Any) -> Optional[int]:
        """Tasks per backward: one on the loop path (memory of one task's graph), and with ``path="auto"`` and
        transductive BatchNorm also where the network has convolutions on CPU (ANIL: its inner loop is batched,
        its backbone runs once per set); otherwise the whole batch."""
        if self.resolve_path(batch.support_x) == "loop":
            return 1
        # ANIL on Conv-4, meta-batch 8, Omniglot 5w1s, one thread: the whole batch in one backward peaked at
        # 2908 MiB and took 1.12 s per step with the allocator tuned (2.56 s with glibc's default); one task per
        # backward: 640 MiB, 1.10 s (1.56 s). Same meta-gradient (per-task losses, per-task BatchNorm).
        device = next(self.net.parameters()).device
        # per-step BatchNorm (MAML++) keeps the whole batch, as before its statistics were deferred to one update per
        # meta-batch (PerStepBatchNorm.deferred_updates); per-task chunks would now be safe, but were never measured
        if self.path == "auto" and self.per_step_bn is None and device.type == "cpu" and has_convolutions(self.net):
            return 1
        return None

    def query_stem_fused(self) -> bool:
        """Whether the query pass runs a Conv-4 stem as the fused, once-differentiable op (see fused_query_stem)."""
        return stem_is_fast() if self.fused_query_stem is None else bool(self.fused_query_stem)

    # ------------------------------------------------------------------ forward with fast weights
    def features(self, x: Inputs, mask: Optional[Tensor], step: int, path: str, query: bool = False) -> Inputs:
        """ANIL: backbone features [T, B, out_dim] (computed once per set); MAML: the input itself."""
        if self.adapt_mode == "all":
            return x
        return functional_forward(
            self.net.backbone, [], [], [], x, path=path, sample_mask=mask, step=step,
            per_step_bn=self.per_step_bn, training=self.training, query=query,
        )

    def statistics_scope(self) -> contextlib.AbstractContextManager:
        """Per-step BatchNorm (training): one running-statistics update per row for everything inside the scope."""
        if self.per_step_bn is not None and self.training:
            return self.per_step_bn.deferred_updates()
        return contextlib.nullcontext()

    def forward_fast(self, fast: Sequence[Tensor], x: Inputs, mask: Optional[Tensor], step: int, path: str,
                     feats: Optional[Inputs] = None, once_differentiable: bool = False,
                     twice_differentiable: bool = False, query: bool = False) -> Tensor:
        """Network output [T, B, n_out] for inputs ``x`` with fast weights ``fast`` at inner step ``step``.

        ``once_differentiable``: the output's graph meets one backward at most (the query pass), which lets a
        Conv-4 stem run as the fused stem op on the loop path; ``twice_differentiable``: it meets a
        ``create_graph`` backward (a second-order support pass), which runs a Conv-4 stem's conv as patches @ weight;
        ``query``: the query forward of adapted weights (per-step BatchNorm uses its query row).
        """
        if feats is None:
            feats = self.features(x, mask, step, path, query)
        # a fast weight's own shape minus its task dim: no parameter traversal per forward pass
        shapes = [f.shape[1:] if f.dim() == len(n) + 1 else f.shape for f, n in zip(fast, self._fast_ndims)]
        return functional_forward(
            self.adapted_module, self.fast_names, fast, shapes, feats, path=path, sample_mask=mask, step=step,
            per_step_bn=self.per_step_bn, training=self.training, once_differentiable=once_differentiable,
            twice_differentiable=twice_differentiable, query=query,
        )

    # ------------------------------------------------------------------ inner loop
    def inner_rates(
        self, step: int, fast: list[Tensor], grads: list[Tensor], losses: Tensor, state: dict
    ) -> tuple[Union[float, list[Tensor]], Optional[Union[float, list[Tensor]]]]:
        """(lr, decay) of inner step ``step`` for ``inner_update``; MAML: (inner_lr, None)."""
        return self.inner_lr, None

    def _step(self, step: int, create_graph: bool, x: Inputs, y: Tensor, mask: Optional[Tensor],
              ways: Optional[Tensor], path: str, feats: Optional[Inputs], state: dict,
              fast: list[Tensor]) -> list[Tensor]:
        """One inner step on the support set: gradients of the per-task losses, then inner_update."""
        out = self.forward_fast(fast, x, mask, step, path, feats, twice_differentiable=create_graph)
        if self.kind == "classification":
            out = mask_unused_classes(out, ways)
        losses = task_losses(out, y, mask, self.kind)
        # materialize_grads: a fast weight the support loss does not reach (a ViT's pooler, say) gets a zero step
        grads = list(torch.autograd.grad(losses.sum(), fast, create_graph=create_graph, allow_unused=True,
                                         materialize_grads=True))
        if not create_graph:
            grads = [g.detach() for g in grads]
        lr, decay = self.inner_rates(step, fast, grads, losses, state)
        return inner_update(fast, grads, lr, decay, max_grad_norm=self.max_grad_norm)

    def _checkpointed_step(self, args: tuple, *fast: Tensor) -> tuple[Tensor, ...]:
        """An inner step run by the reentrant checkpoint, which calls it with autograd off: turn it back on.

        Only the step's inputs are kept; the backward recomputes the step (including its inner
        ``create_graph`` gradient) and backpropagates through it, so the meta-gradient stays second order.
        """
        with torch.enable_grad():
            return tuple(self._step(*args, list(fast)))

    def adapt_fast(self, support_x: Inputs, support_y: Tensor, mask: Optional[Tensor], ways: Optional[Tensor],
                   steps: int, path: str, track_meta: bool, init: Optional[list[Tensor]] = None) -> FastWeights:
        """Run ``steps`` inner steps for all tasks; ``track_meta`` keeps the graph to the meta-parameters.

        ``init``: initial fast weights ``[T, *shape]`` in ``fast_names`` order (default: the meta-parameters,
        shared by all tasks); the probabilistic heads pass a sampled initialisation here.
        """
        t = len(support_x) if isinstance(support_x, list) else support_x.shape[0]
        create_graph = track_meta and not self.first_order
        with torch.enable_grad():
            feats = self.features(support_x, mask, 0, path) if self.adapt_mode == "head" else None
            # a task dim from the start: d(sum_t loss_t)/d(expanded weight) is then the per-task gradient
            if init is None:
                fast = [p.unsqueeze(0).expand(t, *p.shape) for p in self.fast_parameters()]
            else:
                fast = self._check_init(init, t)
            if not track_meta:
                fast = [f.detach().clone().requires_grad_(True) for f in fast]
                if feats is not None and isinstance(feats, Tensor):
                    feats = feats.detach()
            state: dict = {}
            for k in range(steps):
                if not track_meta:
                    fast = [f.detach().requires_grad_(True) for f in fast]
                args = (k, create_graph, support_x, support_y, mask, ways, path, feats, state)
                if self.checkpoint and track_meta:
                    fast = list(torch_checkpoint(self._checkpointed_step, args, *fast, use_reentrant=True))
                else:
                    fast = self._step(*args, fast)
            if not track_meta:
                fast = [f.detach() for f in fast]
        return FastWeights(fast, steps)

    def _check_init(self, init: Sequence[Tensor], t: int) -> list[Tensor]:
        """Validate initial fast weights passed to adapt_fast: one [T, *shape] tensor per fast weight."""
        params = self.fast_parameters()
        if len(init) != len(params):
            raise ValueError(f"init has {len(init)} tensors but the head has {len(params)} fast weights ({self.fast_names})")
        for name, x, p in zip(self.fast_names, init, params):
            if tuple(x.shape) != (t, *p.shape):
                raise ValueError(f"init for {name} has shape {tuple(x.shape)}, expected [T={t}, *{tuple(p.shape)}]")
        return list(init)

    def adapt_batch(self, support_x: Inputs, support_y: Tensor, support_mask: Optional[Tensor] = None,
                    n_way: Optional[Union[int, Tensor]] = None) -> BatchPredictor:
        """Adapt to T tasks (inner_steps in training mode, eval_inner_steps in eval mode) -> predictor."""
        self.check_gradients_allowed()
        _, mask, ways = self.check_support(support_x, support_y, support_mask, n_way)
        path = self.resolve_path(support_x)
        steps = self.inner_steps if self.training else self.eval_inner_steps
        fast = self.adapt_fast(support_x, support_y, mask, ways, steps, path, torch.is_grad_enabled())
        return GradientPredictor(self, fast, ways, path)
