"""Transfer-learning baselines (Chen et al. 2019, "A Closer Look at Few-Shot Classification"): Baseline, Baseline++.

No meta-learning: the backbone is pre-trained by ordinary supervised learning, then frozen, and every test
task gets a new classifier fitted on its support embeddings.

Pre-training (``loss(batch)``)
    The trainer still hands the head EpisodeBatches, but that is only how examples arrive: every support and
    query example is classified into its *global* class index over ``num_classes`` outputs with plain
    cross-entropy, by a linear layer (Baseline) or a cosine-similarity layer ``scale * cos(f(x), w_c)``
    (Baseline++; ``scale`` fixed at ``cosine_scale``, default 10, or learned from it with ``learn_scale=True``;
    Chen et al.'s code uses 2 up to 200 classes and 10 above, but with 2 the softmax over many classes stays
    nearly uniform and pre-training is slow: on 40 glyph classes, 30 steps reach loss 3.03 and 64.6% 5-way
    1-shot test accuracy with scale 2 against 1.82 and 66.6% with 10). Episode labels 0..N-1 are relabelled
    through the episode's ``class_names``: a map name -> global index grows as new names are seen (first
    come, first served) and raises a clear error beyond ``num_classes``. The map is part of ``state_dict()`` (see
    :meth:`TransferBaseline.get_extra_state`), so checkpoints, ``load_state_dict`` and exact resume keep it;
    under torch.distributed the ranks exchange their new names every step, so all ranks keep one map.

Evaluation (``adapt_batch``)
    The backbone is frozen and in eval mode (BatchNorm normalises with its running statistics, as a
    transfer baseline does; the head's own train/eval mode is restored afterwards), the support set is
    embedded once without a graph, and a new per-task classifier over the task's N ways is fitted on the
    support embeddings with ``finetune_steps`` full-batch steps of SGD (momentum, weight decay) or Adam,
    for all T tasks at once (one einsum over ``[T, N, D]`` weights; a task's loss depends on its own weights
    only, so each task gets exactly its own optimisation). Baseline: softmax over ``W f(x) + b`` from zero
    weights; Baseline++: ``scale * cos(f(x), w_n)`` starting from the normalised class means of the support
    embeddings. Both starts are deterministic, so evaluation is reproducible. Classes >= ``n_way[t]`` and
    classes without a support example are ``-inf`` (as in ProtoNet), padded support examples carry no
    weight, and query predictions carry no gradient.

Regression (``kind="regression"``, the sinusoid family)
    Pre-training regresses all tasks' points pooled together with one network ``backbone -> Linear``
    (MSE): the "pretrained" baseline of Finn et al. 2017. Evaluation fine-tunes only the final linear layer,
    starting from its pre-trained weights, with ``finetune_steps`` full-batch steps on the support points
    (features of the frozen backbone computed once), then predicts the queries. There is no class map.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BatchPredictor, FewShotHead, Inputs, num_tasks_of
from .losses import task_losses
from .metric import embed_sets

CLASSIFIERS = ("linear", "cosine")
FINETUNE_OPTIMIZERS = ("sgd", "adam")
_EMPTY = -1  # an unused slot of the class map
_KEY_MASK = (1 << 63) - 1
DEFAULT_COSINE_SCALE = 10.0


def class_key(name: str) -> int:
    """Stable non-negative 63-bit key of a class name (the same in every process, unlike ``hash``)."""
    if not isinstance(name, str):
        raise ValueError(f"class names must be str, got {type(name).__name__} {name!r}")
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _KEY_MASK


@contextmanager
def frozen_eval(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode (BatchNorm running statistics) and restore each one's mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def real_items(x: Inputs, mask: Optional[Tensor]) -> tuple[Inputs, Tensor]:
    """Unpadded items of a task-batched set [T, B, *item] (or T lists) and the task index of each -> (items, [n])."""
    if isinstance(x, list):
        if mask is None:
            keep = [[True] * len(v) for v in x]
        else:
            keep = mask.tolist()
        items = [item for v, m in zip(x, keep) for item, k in zip(v, m) if k]
        tasks = torch.tensor([t for t, m in enumerate(keep) for k in m if k], dtype=torch.int64)
        return items, tasks
    t, b = x.shape[:2]
    if mask is None:
        return x.reshape(t * b, *x.shape[2:]), torch.arange(t, device=x.device).repeat_interleave(b)
    return x[mask], mask.nonzero(as_tuple=True)[0]


def cosine_logits(emb: Tensor, weight: Tensor, scale: Union[float, Tensor]) -> Tensor:
    """``scale * cos(emb, weight)``: emb [T, B, D], weight [T, N, D] -> [T, B, N] (zero vectors give 0)."""
    return scale * torch.einsum("tbd,tnd->tbn", F.normalize(emb, dim=-1), F.normalize(weight, dim=-1))


def linear_logits(emb: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``emb @ weight^T + bias`` per task: emb [T, B, D], weight [T, N, D], bias [T, N] -> [T, B, N]."""
    return torch.einsum("tbd,tnd->tbn", emb, weight) + bias.unsqueeze(1)


def unused_classes(y: Tensor, mask: Optional[Tensor], n_way: Optional[Tensor], n_out: int) -> Tensor:
    """[T, N] True for the classes a task cannot predict: beyond its n_way, or without a support example."""
    onehot = F.one_hot(y.clamp_min(0), n_out).bool()
    if mask is not None:
        onehot = onehot & mask.unsqueeze(-1)
    absent = ~onehot.any(dim=1)
    if n_way is None:
        return absent
    return absent | (torch.arange(n_out, device=y.device).view(1, -1) >= n_way.view(-1, 1).to(y.device))


def mask_classes(out: Tensor, unused: Optional[Tensor]) -> Tensor:
    """Logits [T, B, N] with the ``unused`` [T, N] classes set to -inf (regression outputs: ``unused`` is None)."""
    return out if unused is None else out.masked_fill(unused.unsqueeze(1), float("-inf"))


def class_mean_init(emb: Tensor, y: Tensor, mask: Optional[Tensor], n_out: int) -> Tensor:
    """Mean of the normalised support embeddings of every class -> [T, N, D] (zeros for a class without examples)."""
    onehot = F.one_hot(y.clamp_min(0), n_out).to(emb.dtype)
    if mask is not None:
        onehot = onehot * mask.unsqueeze(-1).to(emb.dtype)
    sums = torch.einsum("tsn,tsd->tnd", onehot, F.normalize(emb, dim=-1))
    return sums / onehot.sum(dim=1).clamp_min(1.0).unsqueeze(-1)


class TransferPredictor(BatchPredictor):
    """Per-task classifiers (or regression output layers) fitted on frozen support embeddings."""

    def __init__(self, head: "TransferBaseline", weight: Tensor, bias: Optional[Tensor],
                 unused: Optional[Tensor]) -> None:
        """Hold weights [T, N, D] (and bias [T, N]) of T tasks; ``unused`` [T, N] marks the classes that get -inf."""
        self.head, self.weight, self.bias, self.unused = head, weight, bias, unused

    def __call__(self, query_x: Inputs, query_mask: Optional[Tensor] = None) -> Tensor:
        """query_x [T, Q, *item] -> logits [T, Q, N] (-inf for unused classes) or regression outputs [T, Q, d_out]."""
        if num_tasks_of(query_x) != self.weight.shape[0]:
            raise ValueError(
                f"query_x has {num_tasks_of(query_x)} tasks but the predictor was adapted to {self.weight.shape[0]}"
            )
        emb = self.head.frozen_embed(query_x, query_mask)
        out = self.head.task_outputs(emb, self.weight, self.bias)
        return mask_classes(out, self.unused)


class TransferBaseline(FewShotHead):
    """Baseline / Baseline++ (Chen et al. 2019): supervised pre-training, then a new classifier per test task."""

    fixed_ways = False  # no parameter has one row per way: any n_way loads the same weights

    def __init__(
        self,
        backbone: nn.Module,
        n_way: int = 5,
        *,
        kind: str = "classification",
        n_out: Optional[int] = None,
        num_classes: Optional[int] = None,
        classifier: str = "linear",
        cosine_scale: Optional[float] = None,
        learn_scale: bool = False,
        finetune_steps: int = 100,
        finetune_lr: float = 0.01,
        finetune_optimizer: str = "sgd",
        finetune_momentum: float = 0.9,
        finetune_weight_decay: float = 1e-3,
    ) -> None:
        """Build the pre-training layer and the fine-tuning settings.

        ``n_way``: the largest number of ways of a test task; ``num_classes``: outputs of the pre-training
        classifier (the number of training classes; required for classification). ``classifier``: "linear"
        (Baseline) or "cosine" (Baseline++) for both pre-training and fine-tuning. ``cosine_scale``: the
        cosine temperature (default 10), learned in pre-training from that start when ``learn_scale``;
        fine-tuning uses the pre-training value. Fine-tuning: ``finetune_steps`` full-batch steps of
        ``finetune_optimizer`` ("sgd" with ``finetune_momentum``, or "adam") at ``finetune_lr`` with
        ``finetune_weight_decay`` (defaults: Chen et al.'s SGD 0.01, momentum 0.9, weight decay 1e-3).
        """
        out = n_out if n_out is not None else (n_way if kind == "classification" else 1)
        super().__init__(kind, out)
        dim = getattr(backbone, "out_dim", None)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{type(backbone).__name__} has no positive int attribute `out_dim`; "
                             "every backbone must declare its feature size")
        if classifier not in CLASSIFIERS:
            raise ValueError(
                f"classifier must be one of {CLASSIFIERS} ('linear': Baseline, 'cosine': Baseline++), got {classifier!r}"
            )
        if finetune_optimizer not in FINETUNE_OPTIMIZERS:
            raise ValueError(f"finetune_optimizer must be one of {FINETUNE_OPTIMIZERS}, got {finetune_optimizer!r}")
        if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0:
            raise ValueError(f"finetune_steps must be an int >= 0, got {finetune_steps!r}")
        for name, value in (("finetune_lr", finetune_lr), ("finetune_momentum", finetune_momentum),
                            ("finetune_weight_decay", finetune_weight_decay)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.backbone = backbone
        self.classifier_type = classifier
        self.finetune_steps = finetune_steps
        self.finetune_lr = float(finetune_lr)
        self.finetune_optimizer = finetune_optimizer
        self.finetune_momentum = float(finetune_momentum)
        self.finetune_weight_decay = float(finetune_weight_decay)
        self._keys: list[int] = []  # global index -> class key
        self._index: dict[int, int] = {}  # class key -> global index
        if kind == "regression":
            if num_classes is not None:
                raise ValueError("num_classes is the size of the pre-training classifier; regression has no classes, "
                                 "drop it")
            if classifier != "linear" or cosine_scale is not None or learn_scale:
                raise ValueError("regression uses a linear output layer; classifier, cosine_scale and learn_scale are "
                                 "for classification")
            self.num_classes = 0
            self.regressor = nn.Linear(dim, out)
            return
        if num_classes is None:
            raise ValueError(
                "the transfer baseline pre-trains a classifier over all training classes: pass num_classes "
                "(model.options.num_classes in a config; training.registry fills it in from the training split "
                "when the split has a known, finite number of classes)"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        if classifier == "linear":
            if cosine_scale is not None or learn_scale:
                raise ValueError("cosine_scale and learn_scale belong to the cosine classifier "
                                 "(Baseline++, classifier='cosine')")
            self.classifier = nn.Linear(dim, num_classes)
            return
        scale = DEFAULT_COSINE_SCALE if cosine_scale is None else cosine_scale
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"cosine_scale must be a finite number > 0, got {cosine_scale!r}")
        # bias-free cosine layer as Chen et al. (their weight-normalised Linear), initialised like nn.Linear
        self.cosine_weight = nn.Parameter(nn.Linear(dim, num_classes, bias=False).weight.detach().clone())
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=bool(learn_scale))

    # ------------------------------------------------------------------ class map
    @property
    def num_known_classes(self) -> int:
        """Number of class names mapped so far."""
        return len(self._keys)

    def class_index(self, name: str, grow: bool = True) -> int:
        """Global index of a class name, adding it when new (``grow``); clear error when the map is full."""
        key = class_key(name)
        index = self._index.get(key)
        if index is not None:
            return index
        if not grow:
            raise KeyError(f"class {name!r} has not been seen in pre-training")
        if len(self._keys) >= self.num_classes:
            raise ValueError(
                f"pre-training met class {name!r} but all num_classes={self.num_classes} outputs are taken by other "
                "classes: raise model.options.num_classes (num_classes= of the head) to the number of training classes, "
                "or draw the training episodes from fewer classes (glyph: data.options.num_classes)"
            )
        self._index[key] = len(self._keys)
        self._keys.append(key)
        return self._index[key]

    def get_extra_state(self) -> Tensor:
        """The class map as int64 [num_classes]: slot i holds the key of the class with global index i (-1: unused).

        A fixed-shape tensor (keys, not names) so that safetensors checkpoints store it and shape checks pass.
        """
        state = torch.full((self.num_classes,), _EMPTY, dtype=torch.int64)
        if self._keys:
            state[: len(self._keys)] = torch.tensor(self._keys, dtype=torch.int64)
        return state

    def set_extra_state(self, state: Any) -> None:
        """Restore the class map written by :meth:`get_extra_state`."""
        if not isinstance(state, Tensor) or state.dtype != torch.int64 or tuple(state.shape) != (self.num_classes,):
            got = f"{state.dtype} {tuple(state.shape)}" if isinstance(state, Tensor) else type(state).__name__
            raise ValueError(
                f"class map state must be int64 [{self.num_classes}] (num_classes of this head), got {got}; "
                "the checkpoint was trained with another num_classes"
            )
        keys = state.tolist()
        used = sum(1 for k in keys if k != _EMPTY)
        if any(k == _EMPTY for k in keys[:used]) or len(set(keys[:used])) != used:
            raise ValueError("class map state is corrupt: used slots must come first and hold distinct keys")
        self._keys = keys[:used]
        self._index = {k: i for i, k in enumerate(self._keys)}

    def _sync_names(self, class_names: Sequence[Sequence[str]]) -> None:
        """Under torch.distributed, add every rank's new names in rank order so all ranks keep the same map."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        new = list(dict.fromkeys(n for names in class_names for n in names if class_key(n) not in self._index))
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, new)
        for names in gathered:
            for name in names:
                self.class_index(name)

    def global_label_table(self, class_names: Any, n_way: Tensor, device: torch.device) -> Tensor:
        """[T, N_max] global index of each episode label (-1 beyond a task's ways), growing the map."""
        t = int(n_way.shape[0])
        if not isinstance(class_names, (list, tuple)) or len(class_names) != t:
            raise ValueError(
                "pre-training needs the original class name of every episode label (EpisodeBatch.class_names, "
                f"one list per task); got {type(class_names).__name__} for {t} tasks"
            )
        ways = n_way.tolist()
        for names, n in zip(class_names, ways):
            if len(names) < n:
                raise ValueError(f"an episode has n_way={n} but only {len(names)} class names; pass one name per class")
        self._sync_names(class_names)
        table = torch.full((t, max(ways)), -1, dtype=torch.int64)
        for i, (names, n) in enumerate(zip(class_names, ways)):
            table[i, :n] = torch.tensor([self.class_index(name) for name in names[:n]], dtype=torch.int64)
        return table.to(device)

    # ------------------------------------------------------------------ pre-training
    @property
    def scale(self) -> Tensor:
        """The Baseline++ cosine temperature."""
        return self.log_scale.exp()

    def global_logits(self, emb: Tensor) -> Tensor:
        """Pre-training logits [B, num_classes] of embeddings [B, D]."""
        if self.classifier_type == "linear":
            return self.classifier(emb)
        return self.scale * F.normalize(emb, dim=-1) @ F.normalize(self.cosine_weight, dim=-1).T

    def loss(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """Supervised pre-training loss: mean CE (MSE) over every real support and query example, not per task.

        The metrics' "accuracy" is the training accuracy over all ``num_classes`` global classes.
        """
        sx, sm = batch.support_x, batch.support_mask
        qx, qm = batch.query_x, batch.query_mask
        s_items, s_task = real_items(sx, sm)
        q_items, q_task = real_items(qx, qm)
        s_y = batch.support_y.flatten(0, 1) if sm is None else batch.support_y[sm]
        q_y = batch.query_y.flatten(0, 1) if qm is None else batch.query_y[qm]
        items = s_items + q_items if isinstance(s_items, list) else torch.cat([s_items, q_items])
        if len(items) == 0:
            raise ValueError("the batch has no real support or query examples to pre-train on")
        # one backbone call: BatchNorm sees the whole meta-batch, as in ordinary supervised training
        emb = self.backbone(items)
        if self.kind == "regression":
            target = torch.cat([s_y, q_y]).to(emb.device)
            if not target.is_floating_point() or target.dim() != 2 or target.shape[1] != self.n_out:
                raise ValueError(f"regression pre-training needs float targets [.., {self.n_out}], "
                                 f"got {target.dtype} {tuple(target.shape)}")
            loss = F.mse_loss(self.regressor(emb), target.to(emb.dtype))
            value = float(loss.detach())
            return loss, {"loss": value, "mse": value}
        if batch.support_y.is_floating_point():
            raise ValueError("classification pre-training got float targets; build the head with kind='regression' "
                             "for regression")
        labels = torch.cat([s_y, q_y]).to(emb.device)
        tasks = torch.cat([s_task, q_task]).to(emb.device)
        n_way = batch.n_way if isinstance(batch.n_way, Tensor) else torch.full((num_tasks_of(sx),), int(batch.n_way))
        table = self.global_label_table(batch.class_names, n_way, emb.device)
        if int(labels.min()) < 0 or int(labels.max()) >= table.shape[1]:
            raise ValueError(f"episode labels must lie in 0..n_way-1, got {int(labels.min())}..{int(labels.max())}")
        target = table[tasks, labels]
        if bool((target < 0).any()):
            raise ValueError("an episode label is >= that episode's n_way; labels must lie in 0..n_way[t]-1")
        logits = self.global_logits(emb)
        loss = F.cross_entropy(logits, target)
        with torch.no_grad():
            acc = float((logits.argmax(dim=-1) == target).float().mean())
        return loss, {"loss": float(loss.detach()), "accuracy": acc}

    # ------------------------------------------------------------------ evaluation
    def frozen_embed(self, x: Inputs, mask: Optional[Tensor]) -> Tensor:
        """Embeddings [T, B, D] of the backbone in eval mode, without a graph (padded items are zeros)."""
        with frozen_eval(self.backbone), torch.no_grad():
            return embed_sets(self.backbone, x, mask).detach()

    def task_outputs(self, emb: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """Per-task classifier (or regression layer) outputs [T, B, N] of embeddings [T, B, D]."""
        if self.kind == "classification" and self.classifier_type == "cosine":
            return cosine_logits(emb, weight, self.scale.detach())
        assert bias is not None
        return linear_logits(emb, weight, bias)

    def initial_task_weights(self, emb: Tensor, y: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """Deterministic start of the per-task layer: zeros, class means (cosine) or pre-trained (regression)."""
        t, _, d = emb.shape
        if self.kind == "regression":
            w = self.regressor.weight.detach().to(emb.dtype)
            b = self.regressor.bias.detach().to(emb.dtype)
            return w.unsqueeze(0).repeat(t, 1, 1), b.unsqueeze(0).repeat(t, 1)
        if self.classifier_type == "cosine":
            return class_mean_init(emb, y, mask, self.n_out), None
        return emb.new_zeros(t, self.n_out, d), emb.new_zeros(t, self.n_out)

    def fit_task_weights(self, emb: Tensor, y: Tensor, mask: Optional[Tensor],
                         unused: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """Fit the per-task layer on support embeddings [T, S, D] with ``finetune_steps`` full-batch steps."""
        weight, bias = self.initial_task_weights(emb, y, mask)
        params = [weight] + ([bias] if bias is not None else [])
        if self.finetune_steps == 0:
            return weight, bias
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            if self.finetune_optimizer == "sgd":
                opt: torch.optim.Optimizer = torch.optim.SGD(
                    params, lr=self.finetune_lr, momentum=self.finetune_momentum, weight_decay=self.finetune_weight_decay)
            else:
                opt = torch.optim.Adam(params, lr=self.finetune_lr, weight_decay=self.finetune_weight_decay)
            for _ in range(self.finetune_steps):
                # -inf logits pass no gradient: unused classes never pull on the real ones
                out = mask_classes(self.task_outputs(emb, weight, bias), unused)
                # the sum over tasks: each task's weights get exactly the gradient of its own mean support loss
                loss = task_losses(out, y, mask, self.kind).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return weight.detach(), (bias.detach() if bias is not None else None)

    def adapt_batch(self, support_x: Inputs, support_y: Tensor, support_mask: Optional[Tensor] = None,
                    n_way: Optional[Union[int, Tensor]] = None) -> BatchPredictor:
        """Embed the support sets with the frozen backbone and fit a new per-task classifier (or output layer)."""
        self.check_gradients_allowed()
        _, mask, ways = self.check_support(support_x, support_y, support_mask, n_way)  # refuses empty tasks too
        emb = self.frozen_embed(support_x, mask)
        y = support_y.to(emb.device)
        unused = None
        if self.kind == "classification":
            unused = unused_classes(y, None if mask is None else mask.to(emb.device), ways, self.n_out)
        weight, bias = self.fit_task_weights(emb, y, mask, unused)
        return TransferPredictor(self, weight, bias, unused)


class BaselinePlusPlus(TransferBaseline):
    """Baseline++ (Chen et al. 2019): the transfer baseline with cosine-similarity classifiers."""

    def __init__(self, backbone: nn.Module, n_way: int = 5, **kw: Any) -> None:
        """Same options as :class:`TransferBaseline`, with ``classifier="cosine"``."""
        if kw.get("kind", "classification") != "classification":
            raise ValueError("Baseline++ is a classification head (cosine classifier); use 'baseline' for regression")
        if kw.setdefault("classifier", "cosine") != "cosine":
            raise ValueError(f"Baseline++ uses the cosine classifier; got classifier={kw['classifier']!r} "
                             "(use 'baseline' for the linear one)")
        super().__init__(backbone, n_way, **kw)
