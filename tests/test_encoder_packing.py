import pytest
import torch
import transformers as t
from peft import LoraConfig, get_peft_model

from lora_ft.errors import RecipeError
from lora_ft.objectives.classification import SequenceClassification, pad_right
from lora_ft.objectives.encoder_packing import (
    cannot_pack_encoder,
    pack_examples,
    packed_logits,
    pair_cost,
    row_width,
)
from lora_ft.recipe import DataConfig

PAD = 1  # RoBERTa's padding index; the other configs use it too, so the examples never contain it
LENGTHS = [9, 3, 14, 5, 5, 11, 2, 7]  # in rows of 16 tokens (the capacity below): several examples per row


def tiny(kind: str, attention: str = "sdpa", **extra) -> torch.nn.Module:
    """A 2-3-layer random sequence classifier of architecture ``kind`` with one label per test example."""
    common = {"vocab_size": 60, "pad_token_id": PAD, "num_labels": len(LENGTHS)}
    cfg = {
        "bert": lambda: t.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, **common),
        "roberta": lambda: t.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=66, **common),
        "distilbert": lambda: t.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                 max_position_embeddings=64, **common),
        "electra": lambda: t.ElectraConfig(hidden_size=32, embedding_size=16, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64,
                                           max_position_embeddings=64, **common),
        # local_attention 6: a sliding window narrower than the examples, so the band matters
        "modernbert": lambda: t.ModernBertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                 intermediate_size=64, max_position_embeddings=64,
                                                 global_attn_every_n_layers=3, local_attention=6, **common,
                                                 **extra),
        "deberta-v2": lambda: t.DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, max_position_embeddings=64,
                                                relative_attention=True, pos_att_type=["p2c", "c2p"],
                                                position_buckets=8, max_relative_positions=16,
                                                position_biased_input=True, type_vocab_size=2, **common),
    }[kind]()
    cfg._attn_implementation = attention
    torch.manual_seed(0)
    model = t.AutoModelForSequenceClassification.from_config(cfg, attn_implementation=attention)
    # init_lora_weights=False: B random too, so the LoRA A matrices get gradients.
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()


def examples(pairs: bool) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for i, n in enumerate(LENGTHS):
        row = {"input_ids": torch.randint(2, 60, (n,), generator=g).tolist(), "labels": i}
        if pairs:
            row["token_type_ids"] = [0] * (n // 2) + [1] * (n - n // 2)
        rows.append(row)
    return rows


def logits_and_grads(model, batch, packed: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example logits (in the examples' own order) and the LoRA gradients of their summed cross-entropy."""
    model.zero_grad()
    if packed:
        logits = packed_logits(model, batch)
    else:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").backward()
    order = batch["labels"].argsort()  # labels are the examples' numbers
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return logits[order].detach(), grads


@pytest.mark.parametrize(("kind", "attention", "pairs", "extra"), [
    ("bert", "sdpa", True, {}), ("bert", "eager", True, {}), ("roberta", "sdpa", False, {}),
    ("distilbert", "sdpa", False, {}), ("electra", "eager", True, {}),
    ("modernbert", "sdpa", False, {"classifier_pooling": "cls"}),
    ("modernbert", "eager", False, {"classifier_pooling": "mean"}), ("deberta-v2", "eager", True, {})])
def test_packed_logits_and_lora_gradients_equal_the_padded_batch_s(kind, attention, pairs, extra):
    model = tiny(kind, attention, **extra)
    rows = examples(pairs)
    packed = pack_examples(rows, PAD, capacity=16)
    assert packed["input_ids"].shape[0] < len(rows)  # several examples share a row
    assert packed["real_tokens"].item() == sum(LENGTHS) and packed["input_ids"].numel() < len(rows) * max(LENGTHS)
    want_logits, want_grads = logits_and_grads(model, pad_right(rows, PAD), packed=False)
    got_logits, got_grads = logits_and_grads(model, packed, packed=True)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=0)
    assert want_grads and set(got_grads) == set(want_grads)
    for name, g in want_grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], g, atol=1e-5, rtol=0, msg=name)


def test_rows_restart_positions_and_keep_each_example_to_its_own_segment():
    rows = [{"input_ids": [5] * n, "token_type_ids": [0] * (n - 1) + [1], "labels": n} for n in (3, 6, 2, 4)]
    b = pack_examples(rows, PAD, capacity=8)
    # first-fit decreasing into rows of 8 tokens ([6, 2] and [4, 3]: 16 slots) rather than 6 ([6], [4, 2], [3]: 18)
    assert b["labels"].tolist() == [6, 2, 4, 3]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 3, 0, 1, 2, 0]]
    assert b["segments"].tolist() == [[0] * 6 + [1] * 2, [2] * 4 + [3] * 3 + [-2]]
    assert b["starts"].tolist() == [0, 6, 8, 12]
    assert b["token_type_ids"].tolist() == [[0] * 5 + [1, 0, 1], [0, 0, 0, 1, 0, 0, 1, 0]]
    assert b["input_ids"][1, -1].item() == PAD


def test_an_architecture_without_a_proof_is_refused_with_the_reason():
    gpt2 = t.GPT2ForSequenceClassification(t.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30))
    why = cannot_pack_encoder(gpt2)
    assert why.startswith("unpadded encoder batches are proven for bert,") and "'gpt2'" in why
    probe = SequenceClassification(DataConfig(), None)
    assert probe.use_packing("auto", gpt2) is False
    with pytest.raises(RecipeError, match="data.packing true: unpadded encoder batches are proven for"):
        probe.use_packing(True, gpt2)


def test_the_row_width_trades_the_padding_of_narrow_rows_against_the_attention_of_wide_ones():
    lengths = dict(enumerate([100, 30, 30, 30, 28]))
    # Tightest (pair 0): rows of 128, [100, 28] and [30, 30, 30] (256 slots), rather than 3 rows of 100 (300).
    assert row_width(lengths, 128, 0.0) == 128
    # Attention dear (a pair 1/50 of a token): 300 × (1 + 100/50) = 900 < 256 × (1 + 128/50) = 911.
    assert row_width(lengths, 128, 1 / 50) == 100
    rows = [{"input_ids": [5] * n, "labels": i} for i, n in lengths.items()]
    wide, narrow = pack_examples(rows, PAD, 128, 0.0), pack_examples(rows, PAD, 128, 1 / 50)
    assert wide["input_ids"].shape == (2, 128) and narrow["input_ids"].shape == (3, 100)
    assert wide["real_tokens"] == narrow["real_tokens"] == 218
    assert sorted(narrow["labels"].tolist()) == sorted(wide["labels"].tolist()) == [0, 1, 2, 3, 4]


def test_a_pair_costs_more_on_the_cpu_and_less_in_a_bigger_encoder():
    minilm = t.BertConfig(hidden_size=384, intermediate_size=1536, num_attention_heads=12)
    base = t.BertConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert pair_cost(minilm, cpu) == pytest.approx(1 / 138, rel=0.01)  # the measured 1/140
    assert pair_cost(minilm, gpu) == pytest.approx(1 / 2304)  # the matmuls alone: 4h / (24h²)
    assert pair_cost(base, cpu) < pair_cost(minilm, cpu) / 3
    distil = t.DistilBertConfig(dim=384, hidden_dim=1536, n_heads=12)  # attention_dropout 0.1
    assert pair_cost(distil, cpu) == pair_cost(minilm, cpu)
    # Without attention dropout CPU SDPA runs its fused kernel: the matmuls alone, as on a GPU.
    no_dropout = t.BertConfig(hidden_size=384, intermediate_size=1536, num_attention_heads=12,
                              attention_probs_dropout_prob=0.0)
    assert pair_cost(no_dropout, cpu) == pair_cost(minilm, gpu)
