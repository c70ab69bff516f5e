"""Matching Networks (Vinyals et al. 2016), with or without full context embeddings (FCE).

``p(y = n | query) = sum_i a(query, x_i) [y_i = n]``, ``a = softmax_i(scale * cos(f(query), g(x_i)))``;
the head returns ``log p`` as logits (so cross-entropy is the negative log-likelihood of the paper).

FCE (``fce=True``): ``g(x_i, S) = g'(x_i) + fwd_i + bwd_i`` with a bidirectional LSTM over the support
sequence, and ``f(query, S)`` from ``fce_steps`` attention-LSTM read steps: ``h_k, c_k = LSTMCell([f'(q),
r_{k-1}], (h_{k-1}, c_{k-1}))``, ``h_k += f'(q)``, ``r_k = sum_i softmax(h_k . g_i) g_i`` (the read vector
is fed as input rather than concatenated to the state; otherwise as in the paper).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BatchPredictor, FewShotHead, Inputs
from .losses import mask_unused_classes
from .metric import embed_sets


class MatchingPredictor(BatchPredictor):
    """Support embeddings of T tasks; queries attend over them."""

    def __init__(self, head: "MatchingNet", g: Tensor, y: Tensor, mask: Optional[Tensor], n_way: Optional[Tensor]) -> None:
        """Hold support embeddings g [T, S, D], labels [T, S] and padding mask."""
        self.head, self.g, self.y, self.mask, self.n_way = head, g, y, mask, n_way

    def __call__(self, query_x: Inputs, query_mask: Optional[Tensor] = None) -> Tensor:
        """query_x [T, Q, *item] -> log-probabilities [T, Q, N]."""
        head = self.head
        f = embed_sets(head.backbone, query_x, query_mask)
        if head.fce:
            f = head.attend_queries(f, self.g, self.mask)
        sim = torch.einsum("tqd,tsd->tqs", F.normalize(f, dim=-1), F.normalize(self.g, dim=-1)) * head.scale
        if self.mask is not None:
            sim = sim.masked_fill(~self.mask.unsqueeze(1), float("-inf"))
        att = sim.softmax(dim=-1)
        onehot = F.one_hot(self.y.clamp_min(0), head.n_out).to(att.dtype)
        if self.mask is not None:
            onehot = onehot * self.mask.unsqueeze(-1).to(att.dtype)
        probs = torch.einsum("tqs,tsn->tqn", att, onehot)
        return mask_unused_classes(torch.log(probs.clamp_min(1e-12)), self.n_way)


class MatchingNet(FewShotHead):
    """Matching Networks head; ``fce=True`` adds the full context embeddings."""

    fixed_ways = False  # no parameter has one row per way: any n_way loads the same weights

    def __init__(self, backbone: nn.Module, n_way: int = 5, *, fce: bool = False, fce_steps: int = 5,
                 scale: float = 1.0) -> None:
        """``scale`` multiplies the cosine similarities (1.0 as in the paper); ``fce_steps`` read steps."""
        super().__init__("classification", n_way)
        dim = getattr(backbone, "out_dim", None)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{type(backbone).__name__} has no positive int attribute `out_dim`")
        if fce_steps < 1:
            raise ValueError(f"fce_steps must be >= 1, got {fce_steps}")
        self.backbone = backbone
        self.fce = bool(fce)
        self.fce_steps = int(fce_steps)
        self.scale = float(scale)
        if self.fce:
            self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
            self.query_cell = nn.LSTMCell(2 * dim, dim)

    def embed_support(self, emb: Tensor, mask: Optional[Tensor]) -> Tensor:
        """FCE g(x_i, S) = g'(x_i) + forward + backward LSTM states over the (real) support sequence."""
        d = emb.shape[-1]
        if mask is None:
            out, _ = self.support_lstm(emb)
            return emb + out[..., :d] + out[..., d:]
        lengths = mask.sum(dim=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(emb, lengths.clamp_min(1), batch_first=True, enforce_sorted=False)
        out, _ = self.support_lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=emb.shape[1])
        return (emb + out[..., :d] + out[..., d:]) * mask.unsqueeze(-1).to(emb.dtype)

    def attend_queries(self, f: Tensor, g: Tensor, mask: Optional[Tensor]) -> Tensor:
        """FCE f(query, S): ``fce_steps`` attention-LSTM read steps over the support embeddings."""
        t, q, d = f.shape
        x = f.reshape(t * q, d)
        h = torch.zeros_like(x)
        c = torch.zeros_like(x)
        r = torch.zeros_like(x)
        gq = g.unsqueeze(1).expand(t, q, *g.shape[1:]).reshape(t * q, g.shape[1], d)
        for _ in range(self.fce_steps):
            h, c = self.query_cell(torch.cat([x, r], dim=-1), (h, c))
            h = h + x
            logits = torch.einsum("bd,bsd->bs", h, gq)
            if mask is not None:
                logits = logits.masked_fill(~mask.repeat_interleave(q, dim=0), float("-inf"))
            r = torch.einsum("bs,bsd->bd", logits.softmax(-1), gq)
        return h.reshape(t, q, d)

    def adapt_batch(self, support_x: Inputs, support_y: Tensor, support_mask: Optional[Tensor] = None,
                    n_way: Optional[Union[int, Tensor]] = None) -> BatchPredictor:
        """Embed the support sets (with FCE when enabled)."""
        _, mask, ways = self.check_support(support_x, support_y, support_mask, n_way)
        g = embed_sets(self.backbone, support_x, mask)
        if self.fce:
            g = self.embed_support(g, mask)
        return MatchingPredictor(self, g, support_y, mask, ways)
