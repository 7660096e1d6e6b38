"""Chat rendering: loss on every assistant answer (its EOS included), nothing else unless asked."""

import pytest
from conftest import chat_rows, labelled_text

from lora_ft.data.chat import IGNORE, encode_chat
from lora_ft.errors import RecipeError


def test_loss_only_on_every_assistant_answer_including_eos(tok):
    msgs = [{"role": "user", "content": "What does the cow say?"},
            {"role": "assistant", "content": "The cow says moo."},
            {"role": "user", "content": "And the dog?"},
            {"role": "assistant", "content": "The dog says woof."}]
    enc = encode_chat(tok, msgs, train_on_prompt=False)
    assert labelled_text(tok, enc) == "The cow says moo.<|im_end|>The dog says woof.<|im_end|>"
    # exactly the answer tokens: re-tokenising the answers gives the same count
    n_answer = sum(len(tok(m["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
                   for m in msgs if m["role"] == "assistant")
    assert sum(lab != IGNORE for lab in enc["labels"]) == n_answer
    assert tok.eos_token_id in [lab for lab in enc["labels"] if lab != IGNORE]


def test_train_on_prompt_labels_everything(tok):
    enc = encode_chat(tok, chat_rows(1, 0)[0]["messages"], train_on_prompt=True)
    assert enc["labels"] == enc["input_ids"]


def test_chat_without_answer_is_rejected(tok):
    with pytest.raises(RecipeError, match="assistant turn"):
        encode_chat(tok, [{"role": "user", "content": "hi"}], False)
