"""The recipe: its schema (``schema.py``) and how a YAML file becomes one (``loading.py``).

The bottom of the package: every other part of lora_ft reads a ``Recipe``; nothing here imports them.
"""

from .loading import load_recipe, parse_overrides
from .schema import (
    FULL_PRECISION_INITS,
    LORA_INITS,
    AugmentConfig,
    DataConfig,
    ForgettingConfig,
    FreezeConfig,
    LoraConfigSection,
    ModelConfig,
    ObjectiveConfig,
    Recipe,
    TrainConfig,
)

__all__ = ["FULL_PRECISION_INITS", "LORA_INITS", "AugmentConfig", "DataConfig", "ForgettingConfig", "FreezeConfig",
           "LoraConfigSection", "ModelConfig", "ObjectiveConfig", "Recipe", "TrainConfig", "load_recipe",
           "parse_overrides"]
