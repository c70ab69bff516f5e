"""Few-shot heads behind one interface: MAML family, Reptile, LSTM meta-learner, ProtoNet, MatchingNet,
transfer baselines (Baseline, Baseline++)."""

from .base import BatchPredictor, FewShotHead, TaskPredictor
from .batchnorm import BN_MODES, PerStepBatchNorm
from .gradient import BackboneWithLinear, GradientHead
from .lstm import LSTMMetaLearner
from .maml import ANIL, MAML, MetaSGD
from .matching import MatchingNet
from .probabilistic import ProbabilisticMAML, ProbabilisticPredictor
from .protonet import ProtoNet
from .registry import HEADS, build_head
from .reptile import Reptile
from .transfer import BaselinePlusPlus, TransferBaseline

__all__ = [
    "ANIL",
    "BN_MODES",
    "BackboneWithLinear",
    "BaselinePlusPlus",
    "BatchPredictor",
    "FewShotHead",
    "GradientHead",
    "HEADS",
    "LSTMMetaLearner",
    "MAML",
    "MatchingNet",
    "MetaSGD",
    "PerStepBatchNorm",
    "ProbabilisticMAML",
    "ProbabilisticPredictor",
    "ProtoNet",
    "Reptile",
    "TaskPredictor",
    "TransferBaseline",
    "build_head",
]
