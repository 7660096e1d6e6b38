"""A large synthetic chat file (and a tiny model with a real tokenizer) for profiling data preparation at scale.

Rows are ``{"messages": [user, assistant]}`` conversations of random words, about ``--tokens`` tokens each with the
SmolLM2 tokenizer and chat template (default system prompt included). ``--model DIR`` also writes a 2-layer random
Llama with the SmolLM2 example model's tokenizer and template, so the preparation cost is the real tokenizer's while
the model costs nothing.

    python scripts/make_big_chat.py --rows 1000000 --out /tmp/chat_1m.jsonl --model /tmp/tiny-smol
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
from pathlib import Path

log = logging.getLogger("make_big_chat")

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education "
         "explain describe compare answer because however therefore quickly slowly carefully simple detailed").split()
WORDS_PER_TOKEN = 1.0
"""These common English words are about one token each (SmolLM2 tokenizer: 150 requested -> ~150 measured)."""
TEMPLATE_TOKENS = 35
"""SmolLM2's template around a user/assistant pair, with its default system prompt."""


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def write_rows(path: Path, rows: int, tokens: int, seed: int) -> None:
    """``rows`` conversations of about ``tokens`` tokens each, as JSON lines."""
    rng = random.Random(seed)
    body = max(4, int((tokens - TEMPLATE_TOKENS) * WORDS_PER_TOKEN))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            n = max(4, int(rng.gauss(body, body / 4)))
            q = rng.randint(2, max(2, n // 3))
            row = {"messages": [{"role": "user", "content": sentence(rng, q) + "?"},
                                {"role": "assistant", "content": sentence(rng, n - q)}]}
            f.write(json.dumps(row) + "\n")


def write_tiny_model(folder: Path, source: Path) -> None:
    """A 2-layer random Llama with ``source``'s tokenizer files (a real tokenizer, a negligible model)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(source)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--tokens", type=int, default=150, help="about this many tokens per example")
    p.add_argument("--out", type=Path, required=True, help="the .jsonl file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, help="also write a tiny random model with the SmolLM2 tokenizer here")
    p.add_argument("--tokenizer-from", type=Path,
                   default=Path.home() / ".cache/lora_ft/examples/smollm2-135m-instruct")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_rows(args.out, args.rows, args.tokens, args.seed)
    log.info("wrote %d rows to %s (%.0f MB)", args.rows, args.out, args.out.stat().st_size / 2**20)
    if args.model:
        write_tiny_model(args.model, args.tokenizer_from)
        log.info("wrote a tiny model with %s's tokenizer to %s", args.tokenizer_from.name, args.model)


if __name__ == "__main__":
    main()
