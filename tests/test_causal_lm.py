"""The causal LM objective: left-padded batches whose kept logits give the full loss; packed batches whose losses
and gradients are those of their examples one by one, for every architecture packing is allowed on."""

import pytest
import torch
import torch.nn.functional as F
from conftest import chat_rows

from lora_ft.data.chat import IGNORE, encode_chat
from lora_ft.errors import RecipeError
from lora_ft.modeling import packed_attention
from lora_ft.objectives import CausalLM
from lora_ft.objectives.causal_lm import PACKING_MODELS, causal_loss, pack, pad_left
from lora_ft.recipe import DataConfig


def test_collator_left_pads_and_logits_to_keep_gives_the_full_loss(tiny_llama, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    rows = [encode_chat(tok, r["messages"], False) for r in chat_rows(3, 5)]
    rows[0] = encode_chat(tok, [{"role": "user", "content": "hi " * 9}, {"role": "assistant", "content": "x"}], False)
    batch = pad_left(rows, tok.pad_token_id)
    assert batch["logits_to_keep"] < batch["input_ids"].shape[1]
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


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
            max_position_embeddings=256)


def _tiny_lora(model_type: str, vocab: int, attention: str = "sdpa"):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_ft.modeling.adapters import attach_adapters
    from lora_ft.recipe import LoraConfigSection

    extra = {"num_key_value_heads": 2} if model_type != "gpt_neox" else {}
    config = AutoConfig.for_model(model_type, vocab_size=vocab, pad_token_id=0, **TINY, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager" if attention == "eager" else "sdpa")
    # gaussian init: lora_B is not zero, so every LoRA weight gets a gradient
    model = attach_adapters(model.float(), LoraConfigSection(r=4, dropout=0.0, init="gaussian"), "causal_lm", [], False)
    if attention == "sdpa":  # training switches SDPA to packed_attention; transformers' own SDPA path is tested too
        model.get_base_model().set_attn_implementation("sdpa")
    assert model.config._attn_implementation == attention
    return model


def _examples(tok) -> list[dict]:
    from lora_ft.data.chat import encode_text

    rows = [encode_chat(tok, r["messages"], False) for r in chat_rows(5, 11)]
    rows += [encode_text(tok, t) for t in ("the cat sat near the big dog", "rain", "a small bank was near today")]
    return rows


# Gemma 2 has no SDPA path in transformers (it loads with eager), so it is tested with eager alone.
ARCHITECTURE_ATTENTION = [(m, a) for m in sorted(PACKING_MODELS) for a in ("sdpa", "eager", packed_attention.NAME)
                          if m != "gemma2" or a == "eager"]


@pytest.mark.parametrize("model_type,attention", ARCHITECTURE_ATTENTION)
def test_a_packed_batch_gives_the_losses_and_lora_gradients_of_its_examples_one_by_one(tok, model_type, attention):
    """Across example boundaries, with a row left part empty (the padding segment): the sum of losses and every
    LoRA gradient equal those of the examples run one at a time, unpadded. With the attention implementations
    packing accepts that run on the CPU (lora_ft's ``packed_attention`` among them, which must have run example by
    example); FlashAttention's varlen path (GPUs) is not tested here."""
    rows = _examples(tok)
    model = _tiny_lora(model_type, len(tok), attention)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss_and_grads(batches):  # the mean over label tokens, as training normalises it
        model.zero_grad()
        losses, counts = zip(*(causal_loss(model, b) for b in batches), strict=True)
        mean = sum(losses) / sum(counts)
        mean.backward()
        return mean.detach(), {n: p.grad.clone() for n, p in params.items()}

    packed = pack(rows, tok.pad_token_id, capacity=80)
    assert packed["input_ids"].shape[0] >= 3 and (packed["labels"] == IGNORE).any()
    assert int(packed["real_tokens"]) == sum(len(r["input_ids"]) for r in rows)
    one_by_one, grads_one = loss_and_grads([pad_left([r], tok.pad_token_id) for r in rows])
    packed_attention._last = None
    together, grads_packed = loss_and_grads([packed])
    assert (packed_attention._last is not None and packed_attention._last[1] is not None) == (
        attention == packed_attention.NAME)
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-5)
    for name in params:
        torch.testing.assert_close(grads_packed[name], grads_one[name], rtol=1e-5, atol=1e-5, msg=name)
    n_one = sum(causal_loss(model, pad_left([r], tok.pad_token_id))[1] for r in rows)
    assert causal_loss(model, packed)[1] == n_one == CausalLM(DataConfig(), tok).items(packed)


def test_packing_is_refused_where_it_would_not_be_exact(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    objective = CausalLM(DataConfig(), tok)
    llama = _tiny_lora("llama", len(tok))
    assert objective.use_packing("auto", llama) and objective.cannot_pack(llama) is None
    assert not objective.use_packing(False, llama)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    assert "not 'gpt2'" in objective.cannot_pack(gpt2) and not objective.use_packing("auto", gpt2)
    with pytest.raises(RecipeError, match="data.packing true: packing is checked for .*not 'gpt2'"):
        objective.use_packing(True, gpt2)
    llama.get_base_model().config._attn_implementation = "flex_attention"
    assert "does not read packed position ids" in objective.cannot_pack(llama)


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_encoding_a_batch_gives_what_encoding_each_row_gives(tok, train_on_prompt):
    """Multi-turn answers, a system prompt, truncation and an example that loses its answer to it: the batched
    tokenizer call and the numpy answer mask give the row-by-row values."""
    rows = chat_rows(5, 9) + [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What does the cow say?"},
                      {"role": "assistant", "content": "moo"}, {"role": "user", "content": "And the dog?"},
                      {"role": "assistant", "content": "woof"}]},
        {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat " * 30}]}]
    objective = CausalLM(DataConfig(max_length=40, train_on_prompt=train_on_prompt), tok)
    one_by_one = [objective.encode(r, "messages") for r in rows]
    assert objective.encode_batch(rows, "messages") == one_by_one
    assert [e["truncated"] for e in one_by_one][-2:] == [True, True]
    assert one_by_one[-2]["usable"] is train_on_prompt and (IGNORE in one_by_one[5]["labels"]) is not train_on_prompt
