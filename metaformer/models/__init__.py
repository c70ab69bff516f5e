"""Models: example backbones (Conv-4, ResNet-12, the Encoder interface), ``transformers`` encoders and the
in-context Meta-Transformer. Each module is imported on first use (see metaformer._lazy)."""

from typing import TYPE_CHECKING

from metaformer._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "backbones": ["MLP", "Conv4", "Encoder", "ResNet12", "build_backbone"],
    "hf_encoder": ["FeatureIdentity", "HFEncoder", "HFEncoderConfig", "tiny_vit_encoder"],
    "meta_transformer": ["MetaTransformer", "MetaTransformerConfig", "simplex_code"],
})

if TYPE_CHECKING:  # static tools see the real names
    from metaformer.models.backbones import MLP, Conv4, Encoder, ResNet12, build_backbone
    from metaformer.models.hf_encoder import FeatureIdentity, HFEncoder, HFEncoderConfig, tiny_vit_encoder
    from metaformer.models.meta_transformer import MetaTransformer, MetaTransformerConfig, simplex_code
