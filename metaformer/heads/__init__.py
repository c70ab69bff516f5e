"""Few-shot heads behind one interface: MAML family, Reptile, LSTM meta-learner, ProtoNet, MatchingNet."""

from .base import BatchPredictor, FewShotHead, TaskPredictor
from .batchnorm import BN_MODES, PerStepBatchNorm
from .gradient import BackboneWithLinear, GradientHead
from .lstm import LSTMMetaLearner
from .maml import ANIL, MAML, MetaSGD
from .matching import MatchingNet
from .protonet import ProtoNet
from .registry import HEADS, build_head
from .reptile import Reptile

__all__ = [
    "ANIL",
    "BN_MODES",
    "BackboneWithLinear",
    "BatchPredictor",
    "FewShotHead",
    "GradientHead",
    "HEADS",
    "LSTMMetaLearner",
    "MAML",
    "MatchingNet",
    "MetaSGD",
    "PerStepBatchNorm",
    "ProtoNet",
    "Reptile",
    "TaskPredictor",
    "build_head",
]
