"""Feature extractors that embed one example into a vector: Conv-4, ResNet-12 and the Encoder interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from metaformer.ops.bn_relu_pool import batch_norm_module_args, batch_norm_module_relu_pool, fusable_block_tail
from metaformer.ops.conv_bn_relu_pool import conv_stem_bn_relu_pool, is_conv_stem

__all__ = ["Encoder", "Conv4", "ResNet12", "MLP", "build_backbone", "BACKBONES", "backbone_out_dim"]


class Encoder(nn.Module, ABC):
    """Interface of every feature extractor: ``forward(x) -> [B, out_dim]`` and an ``out_dim`` attribute.

    Image backbones take a ``[B, C, H, W]`` tensor; a text encoder (a later ``transformers`` wrapper)
    takes a list of ``B`` strings. The Meta-Transformer and the heads only rely on this interface.
    """

    out_dim: int

    @abstractmethod
    def forward(self, x: Any) -> Tensor:
        """Embed a batch of examples into a ``[B, out_dim]`` float tensor."""


def _check_image_input(x: Tensor, in_channels: int, name: str, num_pools: int) -> None:
    """Raise a clear error when ``x`` is not a ``[B, in_channels, H, W]`` tensor large enough for the pools."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a Tensor [B, {in_channels}, H, W], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(
            f"{name} expects input of shape [B, {in_channels}, H, W], got {tuple(x.shape)}; "
            f"set in_channels={x.shape[1] if x.dim() == 4 else '?'} or reshape the input"
        )
    if min(x.shape[2], x.shape[3]) < 2**num_pools:
        raise ValueError(
            f"{name} halves the image {num_pools} times, so it needs H, W >= {2**num_pools}; "
            f"got {tuple(x.shape[2:])}. Resize the images or use fewer blocks"
        )


def _hooks_would_run(modules: list[nn.Module]) -> bool:
    """Whether calling these modules would run a hook: one of their own, or a global module hook."""
    from torch.nn.modules import module as module_globals

    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        if getattr(module_globals, name, None):
            return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None)
               for m in modules)


class Conv4(Encoder):
    """Conv-4: ``num_blocks`` x (3x3 conv ``hidden`` channels, BatchNorm, ReLU, 2x2 max-pool), then flatten.

    The final map is global-average-pooled, so ``out_dim == hidden`` for any input size. On 28x28
    Omniglot the map is 1x1 (28->14->7->3->1) and this is the standard 64-d flatten; on 84x84 it
    averages the 5x5 map instead of flattening it to the 1600-d vector some papers use.
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, num_blocks: int = 4) -> None:
        """Build the conv stack; ``hidden`` channels in every block."""
        super().__init__()
        if in_channels < 1 or hidden < 1 or num_blocks < 1:
            raise ValueError(
                f"Conv4 needs positive in_channels, hidden, num_blocks; got {in_channels}, {hidden}, {num_blocks}"
            )
        self.in_channels = in_channels
        self.hidden = hidden
        self.num_blocks = num_blocks
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(num_blocks):
            layers += [
                nn.Conv2d(c, hidden, kernel_size=3, padding=1),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=False),
                nn.MaxPool2d(2),
            ]
            c = hidden
        self.features = nn.Sequential(*layers)
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, C, H, W]`` images to ``[B, hidden]`` features."""
        _check_image_input(x, self.in_channels, "Conv4", self.num_blocks)
        layers = list(self.features)
        # a features stack edited into another shape, or hooks (pruning, feature capture) that the fused calls below
        # would skip because they call no submodule: run the modules as they are
        if len(layers) % 4 or _hooks_would_run(layers):
            return self.features(x).mean(dim=(2, 3))
        for i in range(0, len(layers), 4):
            conv, bn, act, pool = layers[i : i + 4]
            fusable = fusable_block_tail(bn, act, pool)
            if i == 0 and fusable and is_conv_stem(conv):
                # the whole first block as one overridable call: a MAML head's query pass runs it as one fused
                # op (metaformer.ops.conv_bn_relu_pool); anywhere else it is the conv, then the fused tail
                x = conv_stem_bn_relu_pool(x, conv.weight, conv.bias, *batch_norm_module_args(bn))
                continue
            x = conv(x)
            # one fused op for the block's tail (see metaformer.ops.bn_relu_pool); same weights, same keys
            x = batch_norm_module_relu_pool(bn, x) if fusable else pool(act(bn(x)))
        return x.mean(dim=(2, 3))


class _ResBlock(nn.Module):
    """ResNet-12 block: three 3x3 conv-BN(-LeakyReLU) layers, a 1x1 conv-BN shortcut, then 2x2 max-pool."""

    def __init__(self, in_ch: int, out_ch: int, negative_slope: float = 0.1) -> None:
        """Build one residual stage from ``in_ch`` to ``out_ch`` channels."""
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv3 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.act = nn.LeakyReLU(negative_slope)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the residual stage and downsample by 2."""
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


class ResNet12(Encoder):
    """The few-shot field's ResNet-12 (Lee et al. 2019 / Oreshkin et al. 2018): 4 residual stages, then GAP.

    ``channels=(64, 160, 320, 640)`` is the standard width; pass e.g. ``(8, 16, 32, 64)`` for tests.
    """

    def __init__(
        self, in_channels: int = 3, channels: Sequence[int] = (64, 160, 320, 640), negative_slope: float = 0.1
    ) -> None:
        """Build the four residual stages with the given output ``channels``."""
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if in_channels < 1 or len(channels) == 0 or any(c < 1 for c in channels):
            raise ValueError(
                f"ResNet12 needs in_channels >= 1 and a non-empty tuple of positive channels; "
                f"got in_channels={in_channels}, channels={channels}"
            )
        self.in_channels = in_channels
        self.channels = channels
        stages = []
        c = in_channels
        for out in channels:
            stages.append(_ResBlock(c, out, negative_slope))
            c = out
        self.stages = nn.Sequential(*stages)
        self.out_dim = channels[-1]

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, C, H, W]`` images to ``[B, channels[-1]]`` features."""
        _check_image_input(x, self.in_channels, "ResNet12", len(self.channels))
        return self.stages(x).mean(dim=(2, 3))


class MLP(Encoder):
    """Small MLP embedding for vector inputs (e.g. sinusoid regression ``x`` of shape ``[B, d_in]``)."""

    def __init__(self, in_dim: int = 1, hidden: int = 64, num_layers: int = 2) -> None:
        """Build ``num_layers`` Linear+ReLU layers of width ``hidden``."""
        super().__init__()
        if in_dim < 1 or hidden < 1 or num_layers < 1:
            raise ValueError(f"mlp needs positive in_dim, hidden, num_layers; got {in_dim}, {hidden}, {num_layers}")
        self.in_dim = in_dim
        layers: list[nn.Module] = []
        c = in_dim
        for _ in range(num_layers):
            layers += [nn.Linear(c, hidden), nn.ReLU()]
            c = hidden
        self.net = nn.Sequential(*layers)
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, in_dim]`` vectors to ``[B, hidden]`` features."""
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.in_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"mlp backbone expects [B, {self.in_dim}] input, got {shape}; set in_dim accordingly")
        return self.net(x)


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "conv4": Conv4,
    "resnet12": ResNet12,
    "mlp": MLP,
}


def registered_backbone_key(name: str) -> Optional[str]:
    """The BACKBONES key a name refers to ("Conv-4" -> "conv4"), or None when it names no registered backbone."""
    key = str(name).lower().replace("-", "").replace("_", "")
    return key if key in BACKBONES else None


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone by name ("conv4", "resnet12", "mlp") with constructor ``kwargs``."""
    key = registered_backbone_key(name)
    if key is None:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    try:
        return BACKBONES[key](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for backbone {name!r}: {kwargs} ({e})") from e


def backbone_out_dim(backbone: nn.Module) -> int:
    """Return ``backbone.out_dim``, raising a clear error when the module does not declare it."""
    dim = getattr(backbone, "out_dim", None)
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(
            f"{type(backbone).__name__} has no positive integer attribute `out_dim`; every backbone must "
            "declare its feature size (see metaformer.models.backbones.Encoder)"
        )
    return dim
