"""The LSTM meta-learner of Ravi & Larochelle (2017): a learned, coordinate-wise update rule.

Every coordinate of every fast weight is one sample of a small LSTM. Each inner step

    h, c = LSTMCell([pre(grad), pre(loss)], (h, c))                 (first layer, ``hidden`` units)
    i    = sigmoid(W_I [h, theta, i_prev] + b_I)                     (input gate  = learning rate)
    f    = sigmoid(W_F [h, theta, f_prev] + b_F)                     (forget gate = decay)
    theta = metaformer.ops.inner_update(theta, grad, lr=i, decay=f)  (= f * theta - i * grad)

so the cell state is the learner's parameters, as in the paper (``pre`` is the log/sign preprocessing of
Andrychowicz et al. 2016). As in the paper, the gradient and loss inputs are treated as constants
(``first_order=True`` default: no second derivatives). ``b_F`` starts large (f ~ 1) and ``b_I`` at
``logit(inner_lr)``, so the first updates are plain SGD with ``inner_lr``. BatchNorm: as the other
gradient heads (default transductive). Gradient checkpointing is not supported (the LSTM carries state).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .gradient import GradientHead


def preprocess(x: Tensor, p: float = 10.0) -> Tensor:
    """Andrychowicz et al. preprocessing of a tensor into 2 features: (log|x|/p, sign x) or (-1, e^p x)."""
    big = x.abs() >= math.exp(-p)
    first = torch.where(big, x.abs().clamp_min(1e-45).log() / p, torch.full_like(x, -1.0))
    second = torch.where(big, x.sign(), x * math.exp(p))
    return torch.stack([first, second], dim=-1)


class LSTMMetaLearner(GradientHead):
    """Ravi & Larochelle meta-learner: LSTM gates give the per-coordinate lr (input) and decay (forget)."""

    def __init__(self, backbone: nn.Module, n_way: int = 5, *, hidden: int = 20, inner_lr: float = 0.1,
                 first_order: bool = True, **kw: Any) -> None:
        """Options as MAML plus ``hidden`` (first LSTM layer width); ``inner_lr`` sets the initial input gate."""
        if kw.get("checkpoint"):
            raise ValueError("LSTMMetaLearner does not support checkpoint=True (its LSTM state is carried across steps)")
        if not 0 < inner_lr < 1:
            raise ValueError(f"LSTMMetaLearner: inner_lr must be in (0, 1) (it is a sigmoid gate), got {inner_lr}")
        super().__init__(backbone, n_way, inner_lr=inner_lr, first_order=first_order, **kw)
        self.lstm = nn.LSTMCell(4, hidden)
        self.gate_i = nn.Linear(hidden + 2, 1)
        self.gate_f = nn.Linear(hidden + 2, 1)
        with torch.no_grad():
            for gate, bias in ((self.gate_i, math.log(inner_lr / (1 - inner_lr))), (self.gate_f, 5.0)):
                gate.weight.uniform_(-0.01, 0.01)
                gate.bias.fill_(bias)

    def inner_rates(
        self, step: int, fast: list[Tensor], grads: list[Tensor], losses: Tensor, state: dict
    ) -> tuple[Union[float, list[Tensor]], Optional[Union[float, list[Tensor]]]]:
        """Per-coordinate (lr, decay) = (input gate, forget gate) of the meta-learner LSTM."""
        t = grads[0].shape[0]
        g = torch.cat([x.reshape(t, -1) for x in grads], dim=1)
        theta = torch.cat([x.reshape(t, -1) for x in fast], dim=1)
        if self.first_order:
            g, theta = g.detach(), theta.detach()
        n = g.shape[1]
        loss = losses.detach() if self.first_order else losses
        dtype = self.gate_i.weight.dtype
        inp = torch.cat([preprocess(g), preprocess(loss).unsqueeze(1).expand(t, n, 2)], dim=-1).reshape(t * n, 4)
        h, c = self.lstm(inp.to(dtype), state.get("hc"))
        state["hc"] = (h, c)
        th = theta.reshape(-1, 1).to(dtype)
        i_prev = state.get("i", torch.zeros_like(th))
        f_prev = state.get("f", torch.ones_like(th))
        i = torch.sigmoid(self.gate_i(torch.cat([h, th, i_prev], dim=1)))
        f = torch.sigmoid(self.gate_f(torch.cat([h, th, f_prev], dim=1)))
        state["i"], state["f"] = i, f
        lrs, decays, off = [], [], 0
        for x in grads:
            k = x[0].numel()
            lrs.append(i.view(t, n)[:, off : off + k].reshape(x.shape).to(x.dtype))
            decays.append(f.view(t, n)[:, off : off + k].reshape(x.shape).to(x.dtype))
            off += k
        return lrs, decays
