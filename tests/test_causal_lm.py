"""The causal LM objective: left-padded batches whose kept logits give the full loss."""

import torch
import torch.nn.functional as F
from conftest import chat_rows

from lora_ft.data.chat import IGNORE, encode_chat
from lora_ft.objectives.causal_lm import pad_left


def test_collator_left_pads_and_logits_to_keep_gives_the_full_loss(tiny_llama, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    rows = [encode_chat(tok, r["messages"], False) for r in chat_rows(3, 5)]
    rows[0] = encode_chat(tok, [{"role": "user", "content": "hi " * 9}, {"role": "assistant", "content": "x"}], False)
    batch = pad_left(rows, tok.pad_token_id)
    assert batch["logits_to_keep"] < batch["input_ids"].shape[1]
    from lora_ft.objectives.causal_lm import causal_loss

    loss, n = causal_loss(model, batch)
    # reference: full logits, standard shift, right here
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"]).logits
    ref_loss = F.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
    assert n == (batch["labels"][:, 1:] != IGNORE).sum()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    # left padding + position ids: a padded row gives the logits of the same row alone
    alone = model(input_ids=torch.tensor([rows[1]["input_ids"]])).logits[0, -1]
    torch.testing.assert_close(ref[1, -1], alone, rtol=1e-4, atol=1e-4)
