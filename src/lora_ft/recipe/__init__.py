"""The recipe: its schema (``schema.py``) and how a YAML file becomes one (``loading.py``).

The bottom of the package: every other part of lora_ft reads a ``Recipe``; nothing here imports them.
"""

from .compare import changes, describe_changes
from .evaluation import GENERATED_METRICS, EvalConfig
from .loading import load_recipe, looks_local, parse_overrides
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

__all__ = ["FULL_PRECISION_INITS", "GENERATED_METRICS", "LORA_INITS", "AugmentConfig", "DataConfig", "EvalConfig",
           "ForgettingConfig", "FreezeConfig", "LoraConfigSection", "ModelConfig", "ObjectiveConfig", "Recipe",
           "TrainConfig", "changes", "describe_changes", "load_recipe", "looks_local", "parse_overrides"]
