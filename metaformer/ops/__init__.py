"""Fused ops of metaformer: the batched inner-loop update, BatchNorm+ReLU+max-pool and the Conv-4 stem, with pure-PyTorch references."""

from ._extension import backend, extension_has_cuda
from .bn_relu_pool import batch_norm_relu_pool, bn_relu_pool_reference
from .conv_bn_relu_pool import conv3x3_bn_relu_pool, conv_stem_bn_relu_pool, conv_stem_reference
from .inner_update import inner_update, inner_update_
from .reference import inner_update_reference

__all__ = ["batch_norm_relu_pool", "bn_relu_pool_reference", "conv3x3_bn_relu_pool", "conv_stem_bn_relu_pool", "conv_stem_reference", "backend", "extension_has_cuda", "inner_update", "inner_update_", "inner_update_reference"]
