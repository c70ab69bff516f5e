"""Fused ops of metaformer: the batched inner-loop update, with a pure-PyTorch reference beside it."""

from ._extension import backend, extension_has_cuda
from .inner_update import inner_update, inner_update_
from .reference import inner_update_reference

__all__ = ["backend", "extension_has_cuda", "inner_update", "inner_update_", "inner_update_reference"]
