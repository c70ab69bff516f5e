"""Meta-training and evaluation: configs, checkpoints, the training loop, evaluation, the demo."""

from training.config import Config, ConfigError, load_config, valid_keys

__all__ = ["Config", "ConfigError", "load_config", "valid_keys"]
