"""A quantized load that reads the checkpoint tensor by tensor: the peak is the quantized model plus one tensor.

transformers 5 quantizes on the fly one tensor at a time, but it memory-maps every safetensors shard first and
keeps the maps until the last tensor is converted: every page it has read stays in the process's resident
memory, so a load peaks at the quantized model plus the *whole* bf16 checkpoint. Measured on a
Llama-3.2-1B-shaped NF4 load (``scripts/bench_scale.py``, 2 shards, 2.30 GiB): 2.47 GiB of mapped file pages
beside 2.30 GiB of the process's own memory at the peak (4.75 GiB RSS); for a 7B model the checkpoint alone is
13-15 GiB. transformers has no switch for it on Linux (it reads with ``pread`` on Windows and MPS for this very
reason). Handing it the tensors as safetensors slices opened with the ``pread`` backend makes each tensor be read
into memory of its own when it is converted, freed once it is quantized: measured, the same load peaks at
2.37 GiB RSS. transformers' key renaming and conversions run on these slices as on its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from transformers import GenerationConfig, PreTrainedModel

log = logging.getLogger(__name__)


def read_tensor_by_tensor(files: list[Path]) -> dict[str, Any] | None:
    """Every tensor of the safetensors ``files`` as a lazy slice read with ``pread`` when indexed (``[...]``, as
    transformers materializes a checkpoint tensor); None when a file cannot be opened (``from_pretrained`` on
    the folder then reports the damaged file its own way).

    Args:
        files: the checkpoint's shards (or its single file).
    """
    lazy: dict[str, Any] = {}
    try:
        for f in files:
            handle = safe_open(str(f), framework="pt", device="cpu", backend="pread")
            lazy.update({k: handle.get_slice(k) for k in handle.keys()})
    except (SafetensorError, OSError) as e:
        log.debug("cannot open %s for reading tensor by tensor: %s", files, e)
        return None
    return lazy


def as_if_from(model: PreTrainedModel, source: str, revision: str | None) -> None:
    """What ``from_pretrained(source)`` sets beside the weights, for a model loaded from a state dict: its source
    (peft writes it into an adapter's config as the base model) and the folder's generation config.

    Args:
        model: the model ``from_pretrained(None, config=..., state_dict=...)`` returned.
        source: the model folder or Hub id the state dict was read from.
        revision: the Hub revision.
    """
    model.name_or_path = model.config._name_or_path = source
    try:
        model.generation_config = GenerationConfig.from_pretrained(source, revision=revision)
    except OSError:  # the folder has none: the one built from the model config stays
        log.debug("%s has no generation_config.json", source)
