"""NEFTune (``data.augment.neftune_alpha``): noise on the input embeddings while training, transformers' own hook."""

from __future__ import annotations

import torch
from transformers.integrations.neftune import neftune_post_forward_hook


def activate_neftune(model: torch.nn.Module, alpha: float):
    """NEFTune noise on the input embeddings in training mode (transformers' own hook)."""
    embeddings = model.get_input_embeddings()
    embeddings.neftune_noise_alpha = alpha
    return embeddings.register_forward_hook(neftune_post_forward_hook)
