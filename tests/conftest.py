"""Fixtures: tiny random Llama/BERT models with real tokenizers, and small learnable datasets, on disk.

Everything is built locally (no network): HF_HUB_OFFLINE is forced before transformers is imported.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ANIMALS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "owl": "hoot",
           "frog": "ribbit", "bee": "buzz"}
TOPICS = {
    "animals": ["cat", "dog", "horse", "bird", "fish", "mouse", "lion", "tiger"],
    "money": ["bank", "price", "stock", "market", "cash", "loan", "trade", "profit"],
    "weather": ["rain", "snow", "wind", "storm", "cloud", "sun", "fog", "frost"],
}
FILLER = ["the", "a", "is", "was", "very", "near", "today", "and", "big", "small"]


def chat_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        animal = rng.choice(sorted(ANIMALS))
        q = rng.choice(["What does the {} say?", "Which sound does a {} make?", "The {} says what?"])
        rows.append({"messages": [{"role": "user", "content": q.format(animal)},
                                  {"role": "assistant", "content": f"The {animal} says {ANIMALS[animal]}."}]})
    return rows


def classification_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(TOPICS))
        words = rng.sample(TOPICS[label], 2) + rng.sample(FILLER, 3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _corpus() -> list[str]:
    texts = []
    for r in chat_rows(200, 0):
        texts += [m["content"] for m in r["messages"]] + ["user", "assistant", "system"]
    texts += [r["text"] for r in classification_rows(200, 0)]
    return texts * 3


def build_chat_tokenizer(base: bool = False):
    """A byte-level BPE trained on the test corpus: a chat model's (``<|im_start|>``/``<|im_end|>``, EOS
    ``<|im_end|>``, ChatML), or with ``base`` a base model's as downloaded (EOS ``<|endoftext|>``, no template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|endoftext|>"] if base else ["<unk>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    # No pad token on purpose: lora_ft must pick one (and pad == eos must not mask the answers' EOS).
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=specials[-1])
    if not base:
        fast.chat_template = CHATML
    return fast


def build_bert_tokenizer():
    from tokenizers import processors
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import PreTrainedTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(_corpus(), vocab_size=300)
    inner = wp._tokenizer
    cls, sep = inner.token_to_id("[CLS]"), inner.token_to_id("[SEP]")
    inner.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def save_random_model(tmp_path_factory, name: str, model_cls, cfg, tok) -> Path:
    """``model_cls(cfg)`` with seed-0 random weights and ``tok``, saved as a local model folder."""
    folder = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    model_cls(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_random_llama(tmp_path_factory, name: str, tok=None, **sizes) -> Path:
    """A random Llama with ``tok``, the chat tokenizer by default (vocabulary: the tokenizer's unless ``sizes`` says
    otherwise)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tok or build_chat_tokenizer()
    cfg = LlamaConfig(**{"vocab_size": len(tok), **sizes}, eos_token_id=tok.eos_token_id, bos_token_id=None)
    return save_random_model(tmp_path_factory, name, LlamaForCausalLM, cfg, tok)



@pytest.fixture(scope="session", autouse=True)
def trackio_dir(tmp_path_factory) -> Path:
    """Trackio keeps its databases in TRACKIO_DIR, read once when trackio is first imported (by a run that tracks
    with it, never at collection): the tests' runs go to pytest's temporary folder, not ~/.cache/huggingface."""
    path = tmp_path_factory.mktemp("trackio")
    os.environ["TRACKIO_DIR"] = str(path)
    return path

@pytest.fixture(scope="session", autouse=True)
def data_cache_dir(tmp_path_factory) -> Path:
    """The data cache (``lora_ft.data.cache``) of the tests' runs: pytest's temporary folder, not ~/.cache."""
    path = tmp_path_factory.mktemp("data-cache")
    os.environ["LORA_FT_DATA_CACHE"] = str(path)
    return path


TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                  initializer_range=0.2)  # large enough that a frozen random head can be peaked
"""The tiny Llama's sizes (``tiny_llama``; ``test_chat_template.py``'s base model)."""


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random Llama (causal LM) with a ChatML template, saved as a local model folder."""
    return save_random_llama(tmp_path_factory, "tiny-llama", **TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer random BERT *encoder* checkpoint: the classifier head does not exist in it yet."""
    from transformers import BertConfig, BertModel

    tok = build_bert_tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                     initializer_range=0.2)
    return save_random_model(tmp_path_factory, "tiny-bert", BertModel, cfg, tok)


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    """A 2-layer random RoBERTa encoder: its classifier is a module of two layers (``dense``, ``out_proj``), not
    one ``Linear`` as BERT's; ELECTRA and XLM-R build theirs the same way."""
    from transformers import RobertaConfig, RobertaModel

    tok = build_bert_tokenizer()
    # positions start after the padding index (RoBERTa's offset), so 128 + pad + 1 of them
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=130 + tok.pad_token_id,
                        pad_token_id=tok.pad_token_id, initializer_range=0.2)
    return save_random_model(tmp_path_factory, "tiny-roberta", RobertaModel, cfg, tok)


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("chat-data")
    return {"train": write_jsonl(d / "train.jsonl", chat_rows(96, 1)),
            "validation": write_jsonl(d / "validation.jsonl", chat_rows(24, 2)),
            "test": write_jsonl(d / "test.jsonl", chat_rows(24, 3))}


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cls-data")
    return {"train": write_jsonl(d / "train.jsonl", classification_rows(120, 1)),
            "validation": write_jsonl(d / "validation.jsonl", classification_rows(30, 2)),
            "test": write_jsonl(d / "test.jsonl", classification_rows(30, 3))}


def make_recipe(model_dir: Path, splits: dict[str, Path], out: Path, **sections):
    """A Recipe for the tiny models; ``sections`` update model/lora/data/train keys."""
    from lora_ft.recipe import Recipe

    # eval.generate off unless a test turns it on: the generation evaluation costs 2-4 s per tiny run (before and
    # after), and the tests of generation (test_generated.py, test_judge.py, test_stops.py, DDP, resume) turn it on.
    # compute_dtype fp32: the tests compare runs and models to 1e-5, which bf16 autocast (auto's choice on CPUs
    # with bf16 units) does not keep; test_precision.py tests the auto rule.
    tree = {"model": {"name": str(model_dir), "compute_dtype": "fp32"}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "eval": {"generate": False},
            "data": {**{k: str(v) for k, v in splits.items()}, "max_length": 128},  # the tiny models' positions
            "train": {"max_steps": 30, "micro_batch_size": 8, "lr": 1e-2, "warmup": 0, "log_every": 1},
            "output_dir": str(out)}
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return Recipe.model_validate(tree)


@pytest.fixture(scope="session")
def quickstart_chat_run(tmp_path_factory) -> tuple[Path, dict]:
    """The chat quickstart (SmolLM2-135M NF4) shortened to 6 steps, 16 validation examples, no forgetting guard:
    (run folder, results). Trained once for the slow tests that need a real trained run (the quickstart's loss in
    test_examples.py, its GGUF export in test_export.py): each trained its own, ~100 s apiece on 2 cores."""
    from lora_ft.modeling import examples
    from lora_ft.recipe import load_recipe
    from lora_ft.training.trainer import train

    out = tmp_path_factory.mktemp("quickstart") / "run"
    examples.set_home(os.environ.get("LORA_FT_HOME"))  # as test_examples.py does: CI may keep a persistent cache
    try:
        recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes/quickstart/smollm2-qlora-chat.yaml",
                             [f"output_dir={out}", "train.max_steps=6", "train.eval_every=100",
                              "data.max_eval_examples=16", "forgetting.enabled=false"])
        return out, train(recipe)
    finally:
        examples.set_home(None)  # the run's info names its base by path: later tests need no home


@pytest.fixture(scope="session")
def answering_run(tiny_llama, chat_data, tmp_path_factory) -> Path:
    """A tiny fp32 chat run trained until its answers match the references and end with <|im_end|> (40 steps, the
    generation evaluation on): what the export gate's stop check and ``lora-ft eval``'s columns compare."""
    from lora_ft.training.trainer import train

    out = tmp_path_factory.mktemp("answering") / "run"
    splits = {k: v for k, v in chat_data.items() if k != "test"}
    train(make_recipe(tiny_llama, splits, out, eval={"generate": "auto", "examples": 12},
                      train={"max_steps": 40, "eval_every": None}))
    return out


@pytest.fixture(autouse=True)
def _fresh_root_logging():
    """The CLI's logging.basicConfig binds a handler to the stderr of the moment (pytest's capture of one
    test); drop it afterwards so later tests do not write to a closed stream."""
    import logging

    yield
    for handler in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(handler)


def prepare(cfg, task: str, tok, seed: int = 0, **kwargs):
    """``data.prepare.prepare_data`` with the objective of ``task`` (what ``session.setup`` builds)."""
    from lora_ft.data.prepare import prepare_data
    from lora_ft.objectives import OBJECTIVES

    return prepare_data(cfg, OBJECTIVES[task](cfg, tok), seed, **kwargs)


def resume_losses(recipe, tmp_path: Path, step: int) -> tuple[dict[int, float], dict[int, float]]:
    """``recipe``'s run continued in a fresh folder from its checkpoint at ``step``: the training losses by step of
    the uninterrupted run and of the resumed one."""
    import shutil

    from lora_ft.training.trainer import train

    name = f"step-{step:08d}"
    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    shutil.copytree(Path(recipe.output_dir) / "checkpoints" / name, tmp_path / "part" / "checkpoints" / name)
    train(recipe.model_copy(update={"output_dir": str(tmp_path / "part")}), resume="latest")

    def losses(out) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in metrics_rows(out) if "split" not in r}

    return losses(recipe.output_dir), losses(tmp_path / "part")


def metrics_rows(out: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def bert_lora(tiny_bert):
    """The tiny BERT as a 2-label classifier with LoRA r=2: (peft model, new head modules)."""
    from lora_ft.modeling.adapters import attach_adapters
    from lora_ft.modeling.loading import load_model
    from lora_ft.recipe import LoraConfigSection, ModelConfig

    loaded = load_model(ModelConfig(name=str(tiny_bert), task="sequence_classification"), "fp32",
                        id2label={0: "a", 1: "b"})
    return attach_adapters(loaded.model, LoraConfigSection(r=2), "sequence_classification", loaded.head_modules,
                           False), loaded.head_modules


@pytest.fixture(scope="module")
def tok():
    """The chat tokenizer with pad == eos: the hardest case for answer masks."""
    t = build_chat_tokenizer()
    t.pad_token = t.eos_token
    return t


def labelled_text(tok, enc) -> str:
    """The tokens of an encoded example that carry loss, decoded."""
    return tok.decode([i for i, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != -100])
