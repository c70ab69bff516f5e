"""The Meta-Transformer: an in-context few-shot learner that reads a support set as tokens.

Each support example becomes ``proj(backbone(x)) + label_embedding[y]``; each query becomes
``proj(backbone(x)) + unknown``. A pre-norm Transformer encoder without positional encoding runs
over ``[support ; queries]`` with a boolean attention mask: every token attends to the real support
tokens and to itself, so queries never see each other and the output does not depend on the order of
the support set. Classification logits are dot products of the query outputs with the label
embeddings of the episode's N ways (``-inf`` for ways ``>= n_way[t]``), or, with ``readout="prototype"``,
negative squared distances of the query outputs to the mean output of each way's support tokens (the
set-to-set adaptation of FEAT, Ye et al. 2020, read out as Prototypical Networks do), or, with
``readout="residual"``, the same distances between *adapted backbone features*: each example's features plus
a zero-initialised projection of its output, so that the untrained learner is exactly a Prototypical Network
on its backbone and training learns a correction to it (FEAT's residual form); regression reads ``d_out``
values off each query output.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaformer.data.episodes import EpisodeBatch
from metaformer.heads.losses import check_has_examples, check_targets
from metaformer.models.backbones import backbone_out_dim, build_backbone

__all__ = ["MetaTransformerConfig", "MetaTransformer", "simplex_code", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_TASKS = ("classification", "regression")
_LABEL_CODES = ("learned", "fixed")
_READOUTS = ("label", "prototype", "residual")


@dataclass
class MetaTransformerConfig:
    """Hyper-parameters of a MetaTransformer; everything needed to rebuild it from ``config.json``."""

    model_type: ClassVar[str] = "meta_transformer"

    backbone: str = "conv4"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    max_way: int = 20
    task: str = "classification"
    label_code: str = "learned"
    label_code_seed: int = 0
    # How query outputs become class logits: "label" (dot product with the label embeddings) or "prototype"
    # (negative squared distance to the mean output of each way's support tokens, times a learned scale) or
    # "residual" (that distance between backbone features plus a zero-initialised projection of the outputs:
    # a Prototypical Network on the backbone before training, a learned correction after).
    readout: str = "label"
    d_in: int = 1
    d_out: int = 1
    # A frozen backbone stays in eval mode (BatchNorm keeps its running statistics) and gets no
    # gradient: the CAML recipe (a pre-trained feature extractor, only the in-context learner trains),
    # and what lets the trainer embed a data set once and train on cached features.
    freeze_backbone: bool = False

    def __post_init__(self) -> None:
        if self.task not in _TASKS:
            raise ValueError(f"MetaTransformerConfig.task must be one of {_TASKS}, got {self.task!r}")
        if self.label_code not in _LABEL_CODES:
            raise ValueError(f"MetaTransformerConfig.label_code must be one of {_LABEL_CODES}, got {self.label_code!r}")
        if self.readout not in _READOUTS:
            raise ValueError(f"MetaTransformerConfig.readout must be one of {_READOUTS}, got {self.readout!r}")
        if self.task == "regression" and self.readout != "label":
            raise ValueError(f"MetaTransformerConfig.readout={self.readout!r} is for classification; regression reads "
                             "its values off each query output (leave readout='label')")
        for name in ("d_model", "n_layers", "n_heads", "max_way", "d_in", "d_out"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MetaTransformerConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"MetaTransformerConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "pick d_model as a multiple of n_heads"
            )
        for name in ("dropout", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"MetaTransformerConfig.{name} must be a number, got {value!r}")
        if isinstance(self.label_code_seed, bool) or not isinstance(self.label_code_seed, int):
            raise ValueError(f"MetaTransformerConfig.label_code_seed must be an int, got {self.label_code_seed!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MetaTransformerConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"MetaTransformerConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.task == "classification" and self.label_code == "fixed" and self.d_model < self.max_way:
            raise ValueError(
                f"label_code='fixed' needs d_model >= max_way for a simplex code of max_way={self.max_way} "
                f"equal-norm vectors, got d_model={self.d_model}; raise d_model or use label_code='learned'"
            )
        if not isinstance(self.freeze_backbone, bool):
            raise ValueError(f"MetaTransformerConfig.freeze_backbone must be true or false, got {self.freeze_backbone!r}")
        if not isinstance(self.backbone_kwargs, dict):
            raise ValueError(f"MetaTransformerConfig.backbone_kwargs must be a dict, got {type(self.backbone_kwargs).__name__}")
        try:
            # Stored in its JSON form (tuples become lists) so that a saved and reloaded config compares equal.
            self.backbone_kwargs = json.loads(json.dumps(self.backbone_kwargs))
        except TypeError as e:
            raise ValueError(f"MetaTransformerConfig.backbone_kwargs must be JSON-serialisable ({e})") from e

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the config, with ``model_type`` first."""
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MetaTransformerConfig":
        """Build a config from ``to_dict()`` output; unknown keys or another ``model_type`` raise ValueError."""
        data = dict(data)
        model_type = data.pop("model_type", None)
        if model_type != cls.model_type:
            raise ValueError(
                f"config has model_type={model_type!r}, but MetaTransformer loads only "
                f"model_type={cls.model_type!r}; load this checkpoint with the class that wrote it"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"MetaTransformerConfig: unknown config keys {unknown}; known keys are {sorted(known)} "
                "(was the checkpoint written by a newer or different version?)"
            )
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "MetaTransformerConfig":
        """Read a config written by ``save``."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


def simplex_code(num: int, dim: int, seed: int = 0) -> Tensor:
    """``num`` equal-norm (norm sqrt(dim)), maximally separated vectors in R^dim (a simplex ETF) -> [num, dim].

    Every pair has cosine -1/(num-1), the most negative equal angle possible for ``num`` vectors
    (CAML's ELMES). The rotation into R^dim is a seeded random orthonormal basis.
    """
    if num < 1 or dim < num:
        raise ValueError(f"simplex_code needs 1 <= num <= dim, got num={num}, dim={dim}")
    if num == 1:
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(1, dim, generator=g, dtype=torch.float64)
        return (v / v.norm() * math.sqrt(dim)).float()
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, num, generator=g, dtype=torch.float64))  # [dim, num], orthonormal
    centered = torch.eye(num, dtype=torch.float64) - 1.0 / num  # rows: e_i - mean, the simplex vertices
    code = centered @ basis.T  # [num, dim]
    code = code / code.norm(dim=1, keepdim=True) * math.sqrt(dim)
    return code.float()


class _Block(nn.Module):
    """Pre-norm Transformer block: x + MHA(LN(x)) then x + MLP(LN(x)), attention via SDPA with a bool mask."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, dropout: float) -> None:
        """Build attention and MLP sub-layers."""
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        hidden = max(1, int(round(d_model * mlp_ratio)))
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """Apply the block to ``x`` [T, L, d] with ``attn_mask`` [T, 1, L, L] (True = may attend)."""
        t, length, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(t, length, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [T, H, L, dh]
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(t, length, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


def _flatten_real(x: Tensor | list, mask: Tensor, name: str) -> Tensor | list:
    """The real (unpadded) items of a [T, N, ...] tensor or list of lists, in (task, position) order."""
    if isinstance(x, Tensor):
        if tuple(x.shape[:2]) != tuple(mask.shape):
            raise ValueError(f"{name} has leading shape {tuple(x.shape[:2])} but its mask is {tuple(mask.shape)}")
        return x[mask]
    if len(x) != mask.shape[0]:
        raise ValueError(f"{name} has {len(x)} tasks but its mask has {mask.shape[0]}")
    rows = mask.tolist()
    return [item for items, m in zip(x, rows) for item, keep in zip(items, m) if keep]


class MetaTransformer(nn.Module):
    """In-context few-shot learner: one forward pass over a whole EpisodeBatch, no gradient steps at test time.

    BatchNorm in the backbone uses batch statistics in train mode (pooled over the real support and
    query items of the batch); call ``eval()`` for the exact order- and query-independence guarantees.
    """

    fixed_ways: ClassVar[bool] = True  # one label row per way, up to config.max_way (as FewShotHead.fixed_ways)

    def __init__(self, config: MetaTransformerConfig, backbone: nn.Module | None = None) -> None:
        """Build the model; ``backbone`` overrides the one named in ``config`` (e.g. a text encoder)."""
        super().__init__()
        if not isinstance(config, MetaTransformerConfig):
            raise TypeError(f"MetaTransformer needs a MetaTransformerConfig, got {type(config).__name__}")
        self.config = config
        if backbone is None:
            kwargs = dict(config.backbone_kwargs)
            if config.task == "regression" and config.backbone.lower() == "mlp":
                kwargs.setdefault("in_dim", config.d_in)
            backbone = build_backbone(config.backbone, **kwargs)
        self.backbone = backbone
        if config.freeze_backbone:
            for p in backbone.parameters():
                p.requires_grad_(False)
            backbone.eval()
        d = config.d_model
        # BatchNorm1d removes the component all examples share (post-ReLU pooled features have cosine
        # ~0.9 between unrelated images, which stalls learning to match queries to support); the
        # LayerNorm puts features on the same unit-RMS scale as the label codes they are added to.
        out_dim = backbone_out_dim(backbone)
        self.proj = nn.Sequential(nn.BatchNorm1d(out_dim), nn.Linear(out_dim, d), nn.LayerNorm(d))
        self.unknown = nn.Parameter(torch.randn(d) * 0.02)
        if config.task == "classification":
            if config.label_code == "learned":
                self.label_embedding = nn.Parameter(torch.randn(config.max_way, d))
            else:
                self.register_buffer("label_embedding", simplex_code(config.max_way, d, config.label_code_seed))
            self.target_proj = None
        else:
            self.label_embedding = None
            self.target_proj = nn.Linear(config.d_out, d)
        # a warm start (training.warm_start) may copy a model with fewer ways into this one: trained label
        # rows first, new rows after; a fixed simplex code is rebuilt for the new max_way instead
        self.warm_start_growable: tuple[str, ...] = (
            ("label_embedding",) if config.task == "classification" and config.label_code == "learned" else ()
        )
        self.blocks = nn.ModuleList(
            _Block(d, config.n_heads, config.mlp_ratio, config.dropout) for _ in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(d)
        if config.readout == "residual":
            # zero at the start: the logits are then exactly a Prototypical Network's on the backbone's features
            self.head = nn.Linear(d, out_dim)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
            self.readout_log_scale = nn.Parameter(torch.tensor(0.0))  # scale 1: ProtoNet's plain squared distance
        else:
            self.head = nn.Linear(d, d if config.task == "classification" else config.d_out)
        if config.readout == "prototype":
            # log of the distance scale; 1/d to start keeps the first logits in the softmax's working range
            self.readout_log_scale = nn.Parameter(torch.tensor(-math.log(d)))

    @property
    def backbone_frozen(self) -> bool:
        """True when the backbone's features are a fixed function of the input (config.freeze_backbone or a frozen encoder)."""
        return self.config.freeze_backbone or bool(getattr(self.backbone, "frozen", False))

    def train(self, mode: bool = True) -> "MetaTransformer":
        """Set train/eval mode; a frozen backbone (config.freeze_backbone) always stays in eval mode."""
        super().train(mode)
        if self.config.freeze_backbone:
            self.backbone.eval()
        return self

    def feature_view(self) -> "MetaTransformer":
        """This model reading precomputed backbone features [B, out_dim] as its inputs, sharing every other module.

        Parameters and buffers are the very same tensors, so training the view trains this model; only
        valid for a frozen backbone, whose features do not change while the rest trains.
        """
        if not self.backbone_frozen:
            raise ValueError("feature_view needs a frozen backbone (MetaTransformerConfig.freeze_backbone=True or a "
                             "frozen encoder): a trainable backbone's features change at every step")
        from metaformer.models.hf_encoder import FeatureIdentity

        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._modules = dict(self._modules)  # a new dict: replacing the backbone must not touch this model
        view._modules["backbone"] = FeatureIdentity(backbone_out_dim(self.backbone))
        return view

    # ----------------------------------------------------------------------------------------- forward
    def embed(self, x: Tensor | list) -> Tensor:
        """Backbone features of a flat batch of examples (tensor [B, ...] or list of B strings) -> [B, out_dim]."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_backbone):
            feats = self.backbone(x)
        if not isinstance(feats, Tensor) or feats.dim() != 2:
            shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
            raise ValueError(f"backbone must return [B, out_dim] features, got {shape}")
        return feats

    def _check_batch(self, batch: EpisodeBatch) -> None:
        """Raise a clear error when ``batch`` does not fit this model's task or limits."""
        if not isinstance(batch, EpisodeBatch):
            raise TypeError(f"MetaTransformer expects an EpisodeBatch, got {type(batch).__name__}")
        regression = self.config.task == "regression"
        if batch.is_regression != regression:
            kind = "regression" if batch.is_regression else "classification"
            raise ValueError(
                f"this MetaTransformer is configured for task={self.config.task!r} but got a {kind} batch; "
                f"build the model with MetaTransformerConfig(task={kind!r})"
            )
        check_has_examples(batch.support_mask, "support")
        if regression:
            if batch.support_y.dim() != 3 or batch.support_y.shape[-1] != self.config.d_out:
                raise ValueError(
                    f"regression support_y must be [T, S, d_out={self.config.d_out}], got {tuple(batch.support_y.shape)}"
                )
            return
        n_way = batch.n_way
        if bool((n_way < 1).any()) or bool((n_way > self.config.max_way).any()):
            raise ValueError(
                f"n_way per task must be in 1..max_way={self.config.max_way}, got {n_way.tolist()}; "
                "raise MetaTransformerConfig.max_way"
            )
        y = batch.support_y
        bad = batch.support_mask & ((y < 0) | (y >= n_way[:, None]))
        if bool(bad.any()):
            raise ValueError("support labels must lie in 0..n_way[t]-1 for every real support example")

    def _tokens(self, batch: EpisodeBatch, with_features: bool = False) -> tuple[Tensor, ...]:
        """Support and query tokens [T, S, d], [T, Q, d] (zeros at padded positions), then, with ``with_features``,
        the backbone features laid out the same way: [T, S + Q, out_dim]."""
        s_mask, q_mask = batch.support_mask, batch.query_mask
        t, s = s_mask.shape
        q = q_mask.shape[1]
        s_items = _flatten_real(batch.support_x, s_mask, "support_x")
        q_items = _flatten_real(batch.query_x, q_mask, "query_x")
        n_s = s_mask.sum().item()
        # One backbone call for support and queries: half the launches, one BatchNorm batch.
        if isinstance(s_items, Tensor):
            feats = self.embed(torch.cat([s_items, q_items]))
        else:
            feats = self.embed(list(s_items) + list(q_items))
        emb = self.proj(feats)
        d = emb.shape[-1]
        s_tok = emb.new_zeros(t, s, d)
        s_tok[s_mask] = emb[:n_s]
        q_tok = emb.new_zeros(t, q, d)
        q_tok[q_mask] = emb[n_s:]
        if self.config.task == "classification":
            labels = batch.support_y.clamp(min=0)
            s_tok = s_tok + self.label_embedding[labels] * s_mask[..., None]
        else:
            s_tok = s_tok + self.target_proj(batch.support_y.to(emb.dtype)) * s_mask[..., None]
        q_tok = q_tok + self.unknown
        if not with_features:
            return s_tok, q_tok
        laid = feats.new_zeros(t, s + q, feats.shape[-1])
        laid[:, :s][s_mask] = feats[:n_s]
        laid[:, s:][q_mask] = feats[n_s:]
        return s_tok, q_tok, laid

    @staticmethod
    def attention_mask(support_mask: Tensor, query_mask: Tensor) -> Tensor:
        """Bool mask [T, 1, S+Q, S+Q]: each token attends to the real support tokens and to itself."""
        t, s = support_mask.shape
        q = query_mask.shape[1]
        length = s + q
        keys = torch.cat([support_mask, torch.zeros_like(query_mask)], dim=1)  # [T, L]
        mask = keys[:, None, :].expand(t, length, length)
        eye = torch.eye(length, dtype=torch.bool, device=support_mask.device)
        # The diagonal keeps padded rows from being all-False (SDPA would return NaN there).
        return (mask | eye)[:, None]

    def forward(self, batch: EpisodeBatch) -> Tensor:
        """Logits [T, Q, max_way] (-inf for ways >= n_way[t]) or regression outputs [T, Q, d_out]."""
        self._check_batch(batch)
        residual = self.config.readout == "residual"
        s_tok, q_tok, *feats = self._tokens(batch, with_features=residual)
        s = s_tok.shape[1]
        x = torch.cat([s_tok, q_tok], dim=1)
        mask = self.attention_mask(batch.support_mask, batch.query_mask)
        for block in self.blocks:
            x = block(x, mask)
        if self.config.readout == "prototype":
            return self._prototype_logits(self.head(self.norm(x)), batch)
        if residual:
            return self._prototype_logits(feats[0].float() + self.head(self.norm(x)).float(), batch)
        h = self.head(self.norm(x[:, s:]))
        if self.config.task == "regression":
            return h
        codes = self.label_embedding.to(h.dtype)
        logits = h @ codes.T / math.sqrt(h.shape[-1])  # [T, Q, max_way]
        ways = torch.arange(self.config.max_way, device=logits.device)
        invalid = ways[None, None, :] >= batch.n_way[:, None, None]
        return logits.masked_fill(invalid, float("-inf"))

    def _prototype_logits(self, out: Tensor, batch: EpisodeBatch) -> Tensor:
        """Logits [T, Q, max_way]: -scale * squared distance of each query output to its way's mean support output."""
        s = batch.support_mask.shape[1]
        h_s, h_q = out[:, :s].float(), out[:, s:].float()
        ways = torch.arange(self.config.max_way, device=out.device)
        onehot = (batch.support_y[..., None] == ways) & batch.support_mask[..., None]  # [T, S, max_way]
        counts = onehot.sum(dim=1)  # [T, max_way]
        protos = onehot.transpose(1, 2).to(h_s.dtype) @ h_s / counts.clamp(min=1)[..., None]  # [T, max_way, d]
        # |q|^2 - 2 q.p + |p|^2 in one matmul: exact enough in float32 and without a [T, Q, max_way, d] tensor
        dist = (h_q * h_q).sum(-1, keepdim=True) - 2.0 * h_q @ protos.transpose(1, 2) + (protos * protos).sum(-1)[:, None]
        logits = -self.readout_log_scale.exp() * dist
        # a way beyond the episode's N, or one without a support example, has no prototype
        invalid = (ways[None, :] >= batch.n_way[:, None]) | (counts == 0)
        return logits.masked_fill(invalid[:, None, :], float("-inf"))

    def loss(self, batch: EpisodeBatch) -> tuple[Tensor, dict[str, float]]:
        """Mean over tasks of the mean query loss (cross-entropy or MSE) and metrics {"loss", "accuracy"|"mse"}."""
        out = self(batch)
        q_mask = batch.query_mask
        counts = q_mask.sum(dim=1)
        if bool((counts == 0).any()):
            raise ValueError("every task needs at least one query to compute a loss; found a task without queries")
        check_targets(out, batch.query_y, q_mask, self.config.task, batch.n_way)
        if self.config.task == "regression":
            per_item = ((out.float() - batch.query_y.float()) ** 2).mean(dim=-1)  # [T, Q]
            per_task = (per_item * q_mask).sum(dim=1) / counts
            loss = per_task.mean()
            return loss, {"loss": float(loss.detach()), "mse": float(loss.detach())}
        logits = out.float()
        target = batch.query_y.clamp(min=0)
        per_item = F.cross_entropy(logits[q_mask], target[q_mask], reduction="none")
        task_id = torch.arange(len(batch), device=logits.device)[:, None].expand_as(q_mask)[q_mask]
        per_task = torch.zeros(len(batch), device=logits.device).index_add(0, task_id, per_item) / counts
        loss = per_task.mean()
        with torch.no_grad():
            correct = (logits.argmax(dim=-1) == batch.query_y) & q_mask
            acc = ((correct.sum(dim=1) / counts).mean())
        return loss, {"loss": float(loss.detach()), "accuracy": float(acc)}

    def meta_backward(
        self, batch: EpisodeBatch, chunk_size: int | None = None, scale: float = 1.0
    ) -> tuple[Tensor, dict[str, float]]:
        """Accumulate d(scale * loss)/d(params) into ``.grad`` in chunks of tasks; return detached loss, metrics.

        One chunk (the default) is exactly ``(scale * loss(batch)).backward()``. Smaller chunks bound peak
        memory; in train mode BatchNorm statistics are then per chunk, so gradients differ slightly.
        """
        total = len(batch)
        if chunk_size is None or chunk_size >= total:
            loss, metrics = self.loss(batch)
            (loss * scale).backward()
            return loss.detach(), metrics
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        loss_sum = torch.zeros(())
        sums: dict[str, float] = {}
        for start in range(0, total, chunk_size):
            idx = range(start, min(start + chunk_size, total))
            sub = EpisodeBatch.collate([batch.episode(t) for t in idx])
            loss, metrics = self.loss(sub)
            (loss * (scale * len(idx) / total)).backward()
            loss_sum = loss_sum + loss.detach().cpu() * len(idx)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
        return loss_sum / total, {k: v / total for k, v in sums.items()}

    @torch.no_grad()
    def predict(self, batch: EpisodeBatch) -> Tensor:
        """Predicted labels [T, Q] (classification; -1 at padded queries) or values [T, Q, d_out], in eval mode."""
        was_training = self.training
        self.eval()  # running statistics, no dropout: a prediction must not depend on the other queries
        try:
            out = self(batch)
        finally:
            self.train(was_training)
        if self.config.task == "regression":
            return out
        return out.argmax(dim=-1).masked_fill(~batch.query_mask, -1)

    # ----------------------------------------------------------------------------------------- save / load
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (all parameters and buffers) into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"model_type": self.config.model_type})
        self.config.save(directory / CONFIG_NAME)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, backbone: nn.Module | None = None, map_location: str | torch.device = "cpu"
    ) -> "MetaTransformer":
        """Rebuild a model saved by ``save_pretrained``; pass ``backbone`` when it was a custom module."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found; {directory} is not a save_pretrained() directory")
        config = MetaTransformerConfig.load(cfg_path)
        try:
            with safe_open(str(w_path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for damaged files
            raise ValueError(f"{w_path} is not a readable safetensors file ({exc}); the save is damaged or "
                             "incomplete: save_pretrained it again") from None
        if meta.get("model_type", config.model_type) != config.model_type:
            raise ValueError(
                f"{w_path} holds weights of model_type={meta.get('model_type')!r}, not "
                f"{config.model_type!r}; it does not belong with this config.json"
            )
        model = cls(config, backbone=backbone)
        state = load_file(str(w_path), device=str(map_location))
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            custom = "" if backbone is not None else (
                "; a model saved with a backbone module of its own (a text encoder, say) needs that module again: "
                "from_pretrained(directory, backbone=...)")
            raise ValueError(
                f"{w_path} does not match the architecture in its config.json: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}{custom}"
            )
        model.load_state_dict(state, strict=True)
        return model.to(map_location).eval()  # as Hugging Face models: ready for inference; .train() to train on

    def num_parameters(self, trainable_only: bool = True) -> int:
        """Number of (trainable) parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
