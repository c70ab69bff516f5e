"""``build_head(name, backbone, **kw)``: every head by name."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .base import FewShotHead
from .lstm import LSTMMetaLearner
from .maml import ANIL, MAML, MetaSGD
from .matching import MatchingNet
from .probabilistic import ProbabilisticMAML
from .protonet import ProtoNet
from .reptile import Reptile
from .transfer import BaselinePlusPlus, TransferBaseline


def _fomaml(backbone: nn.Module, **kw: Any) -> FewShotHead:
    """First-order MAML."""
    if kw.pop("first_order", True) is not True:
        raise ValueError("'fomaml' is first order by definition; use build_head('maml', ...) for second order")
    return MAML(backbone, first_order=True, **kw)


HEADS: dict[str, Callable[..., FewShotHead]] = {
    "maml": MAML,
    "fomaml": _fomaml,
    "anil": ANIL,
    "metasgd": MetaSGD,
    "reptile": Reptile,
    "lstm": LSTMMetaLearner,
    "protonet": ProtoNet,
    "matchingnet": MatchingNet,
    "baseline": TransferBaseline,
    "baselinepp": BaselinePlusPlus,
    "probmaml": ProbabilisticMAML,
}

# Other spellings of a head (after lower-casing and dropping "-" and "_"); not separate heads.
ALIASES: dict[str, str] = {"probabilisticmaml": "probmaml", "platipus": "probmaml"}


def build_head(name: str, backbone: nn.Module, **kw: Any) -> FewShotHead:
    """Build a head by name ("maml", "fomaml", "anil", "metasgd", "reptile", "lstm", "protonet", "matchingnet",
    "probmaml" (aliases "probabilistic_maml", "platipus"), "baseline", "baselinepp" (transfer baselines of
    Chen et al. 2019: supervised pre-training, a new linear / cosine classifier per task))."""
    key = name.lower().replace("-", "").replace("_", "")
    key = ALIASES.get(key, key)
    if key not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")
    try:
        return HEADS[key](backbone, **kw)
    except TypeError as e:
        raise ValueError(f"bad arguments for head {name!r}: {sorted(kw)} ({e})") from e
