"""Models: example backbones (Conv-4, ResNet-12, the Encoder interface), ``transformers`` encoders and the in-context Meta-Transformer."""

from metaformer.models.backbones import MLP, Conv4, Encoder, ResNet12, build_backbone
from metaformer.models.hf_encoder import FeatureIdentity, HFEncoder, HFEncoderConfig, tiny_vit_encoder
from metaformer.models.meta_transformer import MetaTransformer, MetaTransformerConfig, simplex_code

__all__ = [
    "Conv4", "Encoder", "MLP", "ResNet12", "build_backbone", "MetaTransformer", "MetaTransformerConfig", "simplex_code",
    "HFEncoder", "HFEncoderConfig", "FeatureIdentity", "tiny_vit_encoder",
]
