"""Few-shot heads behind one interface: MAML family, Reptile, LSTM meta-learner, ProtoNet, MatchingNet,
transfer baselines (Baseline, Baseline++). Each head's module is imported on first use (see metaformer._lazy)."""

from typing import TYPE_CHECKING

from metaformer._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "base": ["BatchPredictor", "FewShotHead", "TaskPredictor"],
    "batchnorm": ["BN_MODES", "PerStepBatchNorm"],
    "gradient": ["BackboneWithLinear", "GradientHead"],
    "lstm": ["LSTMMetaLearner"],
    "maml": ["ANIL", "MAML", "MetaSGD"],
    "matching": ["MatchingNet"],
    "probabilistic": ["ProbabilisticMAML", "ProbabilisticPredictor"],
    "protonet": ["ProtoNet"],
    "registry": ["HEADS", "build_head", "head_class"],
    "reptile": ["Reptile"],
    "transfer": ["BaselinePlusPlus", "TransferBaseline"],
})

if TYPE_CHECKING:  # static tools see the real names
    from .base import BatchPredictor, FewShotHead, TaskPredictor
    from .batchnorm import BN_MODES, PerStepBatchNorm
    from .gradient import BackboneWithLinear, GradientHead
    from .lstm import LSTMMetaLearner
    from .maml import ANIL, MAML, MetaSGD
    from .matching import MatchingNet
    from .probabilistic import ProbabilisticMAML, ProbabilisticPredictor
    from .protonet import ProtoNet
    from .registry import HEADS, build_head, head_class
    from .reptile import Reptile
    from .transfer import BaselinePlusPlus, TransferBaseline
