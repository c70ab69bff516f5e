"""Backbones: Conv-4 and ResNet-12 shapes and structure, the Encoder interface, build_backbone errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metaformer.models import Conv4, Encoder, ResNet12, build_backbone


pytestmark = pytest.mark.usefixtures("one_thread")


def test_conv4_structure_matches_the_standard_definition() -> None:
    net = Conv4()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    assert len(convs) == len(bns) == len(pools) == len(relus) == 4
    assert all(c.out_channels == 64 and c.kernel_size == (3, 3) for c in convs)
    assert all(p.kernel_size == 2 for p in pools)
    # Standard Conv-4 parameter count: conv (in*9+1)*64 + BN 2*64 per block.
    expected = (1 * 9 * 64 + 64 + 128) + 3 * (64 * 9 * 64 + 64 + 128)
    assert sum(p.numel() for p in net.parameters()) == expected


@pytest.mark.parametrize("in_ch,size", [(1, 28), (3, 84)])
def test_conv4_output_shape(in_ch: int, size: int) -> None:
    net = Conv4(in_channels=in_ch, hidden=16)
    out = net(torch.rand(3, in_ch, size, size))
    assert out.shape == (3, 16) and net.out_dim == 16
    assert isinstance(net, Encoder)


def test_conv4_on_28px_is_the_flattened_1x1_map() -> None:
    # 28 -> 14 -> 7 -> 3 -> 1: the global average over a 1x1 map is the plain flatten of the field.
    torch.manual_seed(0)
    net = Conv4(hidden=8).eval()
    x = torch.rand(2, 1, 28, 28)
    fmap = net.features(x)
    assert fmap.shape == (2, 8, 1, 1)
    torch.testing.assert_close(net(x), fmap.flatten(1))


def test_resnet12_standard_width_parameter_count() -> None:
    net = ResNet12()
    n = sum(p.numel() for p in net.parameters())
    assert net.out_dim == 640
    assert 12.3e6 < n < 12.5e6  # the few-shot literature's ResNet-12 has ~12.4M parameters


def test_resnet12_small_width_forward_and_backward() -> None:
    net = ResNet12(in_channels=1, channels=(4, 8, 8, 16))
    x = torch.rand(5, 1, 28, 28)
    out = net(x)
    assert out.shape == (5, 16)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_functional_call_with_task_batched_fast_weights() -> None:
    torch.manual_seed(0)
    net = Conv4(hidden=8).eval()
    params = dict(net.named_parameters())
    fast = {k: torch.stack([v, v * 1.5]) for k, v in params.items()}  # [T=2, *shape]
    x = torch.rand(2, 3, 1, 28, 28)
    outs = [functional_call(net, {k: v[t] for k, v in fast.items()}, (x[t],)) for t in range(2)]
    torch.testing.assert_close(outs[0], net(x[0]))
    assert not torch.allclose(outs[1], outs[0])


def test_build_backbone_by_name_and_errors() -> None:
    assert isinstance(build_backbone("conv4", hidden=8), Conv4)
    assert isinstance(build_backbone("ResNet-12", channels=(2, 2, 2, 2)), ResNet12)
    mlp = build_backbone("mlp", in_dim=3, hidden=7)
    assert mlp(torch.rand(4, 3)).shape == (4, 7)
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        build_backbone("vgg")
    with pytest.raises(ValueError, match="bad arguments for backbone"):
        build_backbone("conv4", width=3)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        Conv4()(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ResNet12(channels=(2, 2, 2, 2))(torch.rand(3, 28, 28))
    with pytest.raises(ValueError, match="positive"):
        Conv4(hidden=0)


def test_encoder_is_abstract() -> None:
    with pytest.raises(TypeError):
        Encoder()  # type: ignore[abstract]
