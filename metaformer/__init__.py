"""metaformer: few-shot learning with an in-context Meta-Transformer, MAML-family heads and metric baselines."""

__version__ = "0.1.0"
