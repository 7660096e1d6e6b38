"""Data parallelism on the CPU: 2 processes (gloo) against 1, launched the way users launch them.

The 1-process run accumulates 2 micro-batches per step, the 2-process run takes one micro-batch on each
process: the same recipe (``train.global_batch_size: 16``), the same global batches, so the same updates up to
float rounding. The 2-process run goes through a small driver that runs
``lora_ft.training.trainer.Trainer`` and then dumps
every process's in-memory adapter, so the test sees all ranks, not only the files the main process writes.
Each launch costs ~30 s on 2 CPU cores, mostly imports: three launches in all.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import make_recipe, write_jsonl
from safetensors.torch import load_file

from lora_ft.errors import RecipeError
from lora_ft.training.distributed import scale_to_processes
from lora_ft.training.evaluation import evaluate_run
from lora_ft.training.trainer import train

DRIVER = textwrap.dedent("""
    import os
    import sys
    from pathlib import Path

    from accelerate import PartialState
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from lora_ft.cli import _setup_logging
    from lora_ft.recipe import load_recipe
    from lora_ft.training.trainer import Trainer
    from test_distributed import first_step_gradients

    _setup_logging(False)
    trainer = Trainer(load_recipe(sys.argv[1]))
    rank = os.environ["RANK"]  # not PartialState: created before the trainer's Accelerator, it would form no group
    with first_step_gradients(Path(sys.argv[2]) / f"grads-rank{rank}.safetensors"):
        trainer.run()
    assert PartialState().process_index == int(rank)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(trainer.unwrapped).items()}
    save_file(state, Path(sys.argv[2]) / f"rank{rank}.safetensors")
""")
MAX_STEPS = 8  # 12 micro-batches per epoch → 6 steps: the run crosses into a second (reshuffled) epoch
CONFIGS = Path(__file__).parents[1] / "recipes" / "accelerate"


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(tmp / "hf"),  # no user accelerate config
            # The driver imports first_step_gradients from here; an existing PYTHONPATH (a worktree's src) stays.
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])])}


@contextmanager
def first_step_gradients(path: Path):
    """Save the gradients of the first optimizer step as ``clip_grad_norm_`` receives them: after DDP's all-reduce,
    before clipping (which rescales them to the norm limit, hiding a uniform scale) and AdamW (which divides it out),
    in parameter order, to ``path``."""
    from accelerate import Accelerator
    from safetensors.torch import save_file

    real = Accelerator.clip_grad_norm_

    def clip(self, parameters, *args, **kwargs):
        parameters = list(parameters)
        if not path.exists():
            grads = [p.grad for p in parameters if p.grad is not None]
            save_file({f"{i:04d}": g.detach().cpu().contiguous() for i, g in enumerate(grads)}, path)
        return real(self, parameters, *args, **kwargs)

    Accelerator.clip_grad_norm_ = clip
    try:
        yield
    finally:
        Accelerator.clip_grad_norm_ = real


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def accelerate_launch(n: int, *args: str) -> list[str]:
    # The shipped DDP config (MULTI_GPU): accelerate starts N processes through torchrun, and on a machine
    # without GPUs lora_ft runs them on the CPU with gloo. (`--cpu --num_processes N` starts one process
    # unless mpirun is set up.)
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "multi-gpu.yaml"),
            "--num_processes", str(n), "--main_process_port", _port(), *args]


def run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp), timeout=600)
    assert r.returncode == 0, r.stderr[-12000:]
    return r


def on_two_processes(recipe, tmp_path: Path) -> tuple[list[dict], subprocess.CompletedProcess]:
    """``recipe`` (its ``output_dir`` a fresh folder) trained on 2 processes through ``DRIVER``: its metrics rows
    and the launch."""
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "dump").mkdir(exist_ok=True)
    launch = run(accelerate_launch(2, str(tmp_path / "driver.py"),
                                   str(write_recipe(recipe, tmp_path / f"{Path(recipe.output_dir).name}.yaml")),
                                   str(tmp_path / "dump")), tmp_path)
    return rows(Path(recipe.output_dir)), launch


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def write_recipe(recipe, path: Path) -> Path:
    path.write_text(recipe.dump(), encoding="utf-8")
    return path


# fp32 with packed rows of two examples (max_length 56: 6 micro-batches of 8 rows per epoch, the run crosses two
# epoch boundaries), and NF4 with left-padded batches of 8 examples.
DDP_CASES = {"none": {"max_length": 56}, "nf4": {"packing": False}}


@pytest.fixture(scope="module", params=list(DDP_CASES))
def runs(request, tiny_llama, chat_data, tmp_path_factory):
    """The same recipe on 1 (in this process) and on 2 processes; returns paths and the launch's stderr."""
    quant = request.param
    root = tmp_path_factory.mktemp(f"ddp-{quant}")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    train_cfg = {"max_steps": MAX_STEPS, "micro_batch_size": 8, "global_batch_size": 16, "eval_every": 4,
                 "checkpoint_every": 4}
    # The generation evaluation too: 24 validation prompts in batches of 8, so the 2 processes get 2 and 1 batches.
    sections = {"model": {"quant": quant}, "train": train_cfg, "data": DDP_CASES[quant],
                "eval": {"generate": "auto", "batch_size": 8, "max_new_tokens": 16}}
    (root / "dump1").mkdir()
    with first_step_gradients(root / "dump1" / "grads-rank0.safetensors"):
        train(make_recipe(tiny_llama, chat_data, root / "p1", **sections))
    recipe = write_recipe(make_recipe(tiny_llama, chat_data, root / "p2", **sections), root / "p2.yaml")
    (root / "dump2").mkdir()
    stderr = run(accelerate_launch(2, str(driver), str(recipe), str(root / "dump2")), root).stderr
    return {"quant": quant, "root": root, "driver": driver, "stderr": stderr}


def test_ranks_end_with_bit_identical_adapters_and_the_file_is_that_adapter(runs):
    root = runs["root"]
    rank0, rank1 = load_file(root / "dump2" / "rank0.safetensors"), load_file(root / "dump2" / "rank1.safetensors")
    saved = load_file(root / "p2" / "adapter" / "adapter_model.safetensors")
    assert sorted(rank0) == sorted(rank1) == sorted(saved) and any("lora_B" in k for k in rank0)
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
        assert torch.equal(rank0[k], saved[k]), k
    assert not (root / "dump2" / "rank2.safetensors").exists()


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    root = runs["root"]
    info1, info2 = (json.loads((root / f"p{n}" / "run_info.json").read_text()) for n in (1, 2))
    assert info1["packing"] == info2["packing"] == (runs["quant"] == "none")
    assert (info1["world_size"], info1["grad_accum"], info1["global_batch"]) == (1, 2, 16)
    assert (info2["world_size"], info2["grad_accum"], info2["global_batch"]) == (2, 1, 16)
    loss1 = {r["step"]: r["loss"] for r in rows(root / "p1") if "split" not in r}
    loss2 = {r["step"]: r["loss"] for r in rows(root / "p2") if "split" not in r}
    norm1 = {r["step"]: r["grad_norm"] for r in rows(root / "p1") if "split" not in r}
    norm2 = {r["step"]: r["grad_norm"] for r in rows(root / "p2") if "split" not in r}
    # Clipping rescales a gradient to the norm limit and AdamW divides by its own scale, so equal losses and
    # adapters alone would not catch a gradient that is uniformly off by a factor (a wrong loss scale for N
    # processes): the step-1 gradients before clipping, and their norms at every step, must agree. That the dumps
    # are unclipped: their norm is the logged (pre-clipping) grad_norm, above the limit that clipping scales to.
    g1 = load_file(root / "dump1" / "grads-rank0.safetensors")
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g1.values()])).item()
    assert total == pytest.approx(norm1[1], rel=1e-5) and total > 1.0  # train.max_grad_norm
    for rank in (0, 1):
        g2 = load_file(root / "dump2" / f"grads-rank{rank}.safetensors")
        assert sorted(g1) == sorted(g2) and len(g1) > 10
        worst = max(((g1[k] - g2[k]).abs().max() / g1[k].abs().max().clamp(min=1e-12)).item() for k in g1)
        assert worst == 0 and all(g1[k].abs().max() > 0 for k in g1 if "lora_B" in k)
    assert norm1 == norm2
    # The same examples in every step. Exactly equal, as the README says: with 2 processes each gradient is the
    # sum of the same two terms, and the loss scaling (× processes, then DDP's average) is by powers of two, which
    # floating point does exactly.
    assert sorted(loss1) == sorted(loss2) == list(range(1, MAX_STEPS + 1))
    assert max(abs(loss1[s] - loss2[s]) for s in loss1) == 0
    assert loss1[MAX_STEPS] < loss1[1] - 0.5  # it learned: the comparison is not between two untrained adapters
    one, two = load_file(root / "p1" / "adapter" / "adapter_model.safetensors"), \
        load_file(root / "p2" / "adapter" / "adapter_model.safetensors")
    assert sorted(one) == sorted(two)
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    scale = max(one[k].abs().max().item() for k in one if "lora_B" in k)
    print(f"\n[{runs['quant']}] max |adapter(1 process) - adapter(2 processes)| = {diff:.3g} "
          f"(largest lora_B weight {scale:.3g}); losses differ by at most "
          f"{max(abs(loss1[s] - loss2[s]) for s in loss1):.3g}; step-1 gradients by at most {worst:.3g} (relative)")
    assert scale > 1e-2 and diff == 0


def test_each_output_is_written_once_by_the_main_process(runs):
    root = runs["root"]
    p1, p2 = root / "p1", root / "p2"
    # A second writer would duplicate metrics rows (append) or race on the folder renames.
    assert [(r["step"], r.get("split")) for r in rows(p2)] == [(r["step"], r.get("split")) for r in rows(p1)]
    assert sorted(p.name for p in p2.iterdir()) == sorted(p.name for p in p1.iterdir())
    assert sorted(p.name for p in (p2 / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]
    assert sorted(p.name for p in (p2 / "adapter").iterdir()) == sorted(p.name for p in (p1 / "adapter").iterdir())
    # Only the main process logs lora_ft's messages.
    assert runs["stderr"].count("= micro_batch_size 8 × grad_accum 1 × 2 process(es)") == 1


def test_evaluation_on_two_processes_equals_evaluation_on_one(runs, chat_data):
    root = runs["root"]
    r1, r2 = (json.loads((root / f"p{n}" / "eval_results.json").read_text()) for n in (1, 2))
    # 24 examples in batches of 16: the second process pads its last batch with repeats, which
    # gather_for_metrics must drop. Before training both runs hold identical weights.
    for split in ("validation", "test"):
        a, b = r1["before"][split], r2["before"][split]
        assert (a["examples"], a["tokens"]) == (b["examples"], b["tokens"]) == (24, a["tokens"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert r2["after"][split]["loss"] == pytest.approx(r1["after"][split]["loss"], rel=1e-4)
    # The 2-process run's final adapter, evaluated by one process: the same numbers.
    again = evaluate_run(root / "p2", str(chat_data["validation"]))
    assert (again["examples"], again["tokens"]) == (24, r2["after"]["validation"]["tokens"])
    assert again["loss"] == pytest.approx(r2["after"]["validation"]["loss"], rel=1e-5)


def test_generation_on_two_processes_equals_generation_on_one(runs):
    """Each process generates whole batches of prompts and the answers are gathered: the same answers, metrics and
    samples as one process, before training (the same weights) and after (bit-identical adapters)."""
    root = runs["root"]
    r1, r2 = (json.loads((root / f"p{n}" / "eval_results.json").read_text()) for n in (1, 2))
    generated = ("rougeL", "chrf", "exact_match", "stop_rate", "length_ratio", "answer_tokens")
    for when in ("before", "after"):
        assert all(k in r1[when]["validation"] for k in generated)
        assert {k: r2[when]["validation"][k] for k in generated} == {k: r1[when]["validation"][k] for k in generated}
    s1, s2 = ((root / f"p{n}" / "samples.jsonl").read_text().splitlines() for n in (1, 2))
    assert len(s1) == 24 and s1 == s2
    assert r1["after"]["validation"]["answer_tokens"] != r1["before"]["validation"]["answer_tokens"]  # it learned


def test_cli_num_processes_resumes_mid_epoch_with_dropout_like_the_uninterrupted_run(runs, tiny_llama, chat_data):
    """`lora-ft train --num-processes 2 --resume`: the convenience launch, and a mid-epoch resume under sharding
    (accelerate's skip_first_batches over each process's shard, then a reshuffled epoch) with LoRA dropout on: each
    process draws its own dropout masks, so each must continue its own RNG stream (the checkpoint holds one per
    process; with rank 0's alone, rank 1's masks after the resume differ and the losses drift). In fp32 (packed
    rows) and in NF4 (left-padded batches, the dropout fused into peft's 4-bit LoRA layers)."""
    root, quant = runs["root"], runs["quant"]
    full = make_recipe(tiny_llama, chat_data, root / "drop-full", lora={"dropout": 0.1}, model={"quant": quant},
                       data={} if quant == "none" else DDP_CASES[quant], train={
                           "max_steps": MAX_STEPS, "micro_batch_size": 8, "global_batch_size": 16,
                           "checkpoint_every": 4})
    run([sys.executable, "-m", "lora_ft", "train", str(write_recipe(full, root / "drop-full.yaml")),
         "--num-processes", "2"], root)
    part = root / "drop-part"
    shutil.copytree(root / "drop-full" / "checkpoints" / "step-00000004", part / "checkpoints" / "step-00000004")
    path = write_recipe(full.model_copy(update={"output_dir": str(part)}), root / "drop-part.yaml")
    r = run([sys.executable, "-m", "lora_ft", "train", str(path), "--resume", "--num-processes", "2"], root)
    assert r.stdout.count('"before"') == 1  # the results are printed once, not once per process
    info = json.loads((part / "run_info.json").read_text())
    assert (info["world_size"], info["grad_accum"], info["global_batch"]) == (2, 1, 16)
    state = torch.load(part / "checkpoints" / "step-00000004" / "trainer_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    uninterrupted = {r["step"]: r["loss"] for r in rows(root / "drop-full") if "split" not in r}
    resumed = {r["step"]: r["loss"] for r in rows(part) if "split" not in r}
    assert sorted(resumed) == [5, 6, 7, 8]
    assert max(abs(uninterrupted[s] - resumed[s]) for s in resumed) < 1e-6
    a = load_file(part / "adapter" / "adapter_model.safetensors")
    b = load_file(root / "drop-full" / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in b) < 1e-6


def test_global_batch_size_must_divide_into_micro_batches_and_processes(tiny_llama, chat_data, tmp_path):
    recipe = make_recipe(tiny_llama, chat_data, tmp_path / "r", train={"global_batch_size": 12,
                                                                       "micro_batch_size": 8})
    with pytest.raises(RecipeError, match=r"global_batch_size 12 is not a multiple of micro_batch_size 8 × 1 "
                                          r"process\(es\) = 8"):
        train(recipe)
    assert not (tmp_path / "r").exists()


def test_shipped_accelerate_configs_load_as_documented():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p)) for p in sorted(CONFIGS.glob("*.yaml"))}
    assert {name: c.distributed_type.value for name, c in configs.items()} == {
        "single-gpu": "NO", "multi-gpu": "MULTI_GPU", "multi-node": "MULTI_GPU", "fsdp-qlora": "FSDP",
        "deepspeed-zero2": "DEEPSPEED", "deepspeed-zero3": "DEEPSPEED"}
    assert configs["fsdp-qlora"].fsdp_config["fsdp_version"] == 2  # lora_ft refuses FSDP1
    assert [configs[f"deepspeed-zero{n}"].deepspeed_config["zero_stage"] for n in (2, 3)] == [2, 3]
    assert configs["multi-node"].num_machines == 2 and configs["multi-node"].main_process_ip


def test_sharded_engines_get_the_recipe_numbers_or_a_clear_refusal(tiny_llama, chat_data, tmp_path):
    """What ``scale_to_processes`` tells DeepSpeed and refuses under FSDP1/DeepSpeed (no GPUs here: stubs)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    recipe = make_recipe(tiny_llama, chat_data, tmp_path / "r", train={"global_batch_size": 32,
                                                                       "micro_batch_size": 4})
    plugin = SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {}})
    ds = SimpleNamespace(num_processes=4, distributed_type=DistributedType.DEEPSPEED, is_fsdp2=False,
                         state=SimpleNamespace(deepspeed_plugin=plugin))
    assert scale_to_processes(recipe, ds).train.grad_accum == 2
    assert plugin.deepspeed_config == {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {},
                                       "gradient_accumulation_steps": 2, "train_batch_size": 32,
                                       "gradient_clipping": 1.0}
    with pytest.raises(RecipeError, match="--resume work with DDP, not yet under DEEPSPEED"):
        scale_to_processes(recipe, ds, resume="latest")
    fsdp1 = SimpleNamespace(num_processes=2, distributed_type=DistributedType.FSDP, is_fsdp2=False)
    with pytest.raises(RecipeError, match="set fsdp_version: 2"):
        scale_to_processes(recipe, fsdp1)


FSDP2_DRIVER = textwrap.dedent("""
    import os
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file
    from torch.distributed.fsdp import fully_shard

    from lora_ft.modeling.adapters import attach_adapters
    from lora_ft.recipe import LoraConfigSection, ModelConfig
    from lora_ft.training.distributed import adapter_snapshot, restore_adapter, save_adapter
    from lora_ft.modeling.loading import load_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    loaded = load_model(ModelConfig(name=sys.argv[1]), "fp32")
    model = attach_adapters(loaded.model, LoraConfigSection(r=4), "causal_lm", [], gradient_checkpointing=False)
    torch.manual_seed(0)  # lora_B starts at zero: give it values, the same on both ranks
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data.normal_()
    full = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for block in model.get_base_model().model.layers:
        fully_shard(block)
    fully_shard(model)
    sharded = [n for n, p in model.named_parameters() if p.requires_grad and type(p.data).__name__ == "DTensor"]
    assert len(sharded) == len(full), (len(sharded), len(full))
    acc = SimpleNamespace(is_fsdp2=True, distributed_type=DistributedType.FSDP, is_main_process=rank == 0)

    snap = adapter_snapshot(acc, model)  # a collective: every rank gathers the full adapter
    assert snap.keys() == full.keys() and all(torch.equal(snap[n], full[n]) for n in full)
    restore_adapter(acc, model, model, {n: v + 1 for n, v in snap.items()})
    again = adapter_snapshot(acc, model)
    assert all(torch.equal(again[n], full[n] + 1) for n in full)
    save_adapter(acc, model, Path(sys.argv[2]), loaded.tokenizer)
    dist.barrier()
    saved = load_file(Path(sys.argv[2]) / "adapter_model.safetensors")
    assert len(saved) == len(full)
    for n, v in full.items():
        key = n.replace(".default", "")
        assert torch.equal(saved[key], v + 1), key
    print(f"rank {rank}: {len(full)} sharded adapter tensors gathered, restored and saved")
    dist.destroy_process_group()
""")


def test_fsdp2_adapter_is_gathered_restored_and_saved_from_shards(tiny_llama, tmp_path):
    """lora_ft's FSDP2 code (adapter_snapshot, restore_adapter, save_adapter) on a model really sharded by
    ``fully_shard`` over 2 CPU processes (gloo). Accelerate itself enables FSDP only on GPUs, so its
    ``prepare`` is left to scripts/gpu_check.sh."""
    driver = tmp_path / "fsdp2.py"
    driver.write_text(FSDP2_DRIVER)
    r = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(),
             str(driver), str(tiny_llama), str(tmp_path / "adapter")], tmp_path)
    assert r.stdout.count("sharded adapter tensors gathered, restored and saved") == 2



@pytest.mark.parametrize("objective", [{"type": "dpo"}, {"type": "ipo", "precompute_reference": True}],
                         ids=["dpo-per-batch-reference", "ipo-precomputed-reference"])
def test_preference_run_on_two_processes_matches_one_process(tiny_llama, tmp_path, objective):
    """DPO with its per-batch reference (the adapter switched off on the module DDP wraps), and IPO with the
    reference precomputed before training (each process scores half of the pairs, then they are gathered): the
    same global batches on 2 processes as on 1 give the same losses and evaluations. The IPO run, resumed on 2
    processes from its step-2 checkpoint, reads the cached reference back and repeats steps 3-4."""
    from test_preference import pref_rows

    data = {"train": write_jsonl(tmp_path / "train.jsonl", pref_rows(32, 1)),
            "validation": write_jsonl(tmp_path / "validation.jsonl", pref_rows(12, 2))}
    train_cfg = {"max_steps": 4, "micro_batch_size": 4, "global_batch_size": 8, "eval_every": 2,
                 "checkpoint_every": 2}
    train(make_recipe(tiny_llama, data, tmp_path / "p1", objective=objective, train=train_cfg))
    recipe = make_recipe(tiny_llama, data, tmp_path / "p2", objective=objective, train=train_cfg)
    two, launch = on_two_processes(recipe, tmp_path)
    one = rows(tmp_path / "p1")
    assert [(r["step"], r.get("split")) for r in one] == [(r["step"], r.get("split")) for r in two]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a, b)
        if "reward_accuracy" in a:
            assert (b["reward_accuracy"], b["examples"]) == (a["reward_accuracy"], a["examples"])
            assert b["reward_margin"] == pytest.approx(a["reward_margin"], abs=1e-5)
    assert one[-1]["loss"] < one[0]["loss"] - 0.1  # it learned
    if objective.get("precompute_reference"):
        cache = [load_file(tmp_path / p / "objective_cache.safetensors") for p in ("p1", "p2")]
        assert cache[1].keys() == {"train", "validation"} and cache[1]["train"].shape == (2, 32)
        # Log-probs around -70 summed in batches padded differently: equal to fp32 rounding.
        assert all(torch.allclose(cache[1][k], cache[0][k], rtol=1e-6, atol=1e-4) for k in cache[0])
        part = tmp_path / "p3"
        shutil.copytree(tmp_path / "p2" / "checkpoints" / "step-00000002", part / "checkpoints" / "step-00000002")
        shutil.copy(tmp_path / "p2" / "objective_cache.safetensors", part)
        path = write_recipe(recipe.model_copy(update={"output_dir": str(part)}), tmp_path / "p3.yaml")
        resumed = run([sys.executable, "-m", "lora_ft", "train", str(path), "--resume", "--num-processes", "2"],
                      tmp_path)
        computing = "reference log-probs of train (32 pairs), once before training"
        assert computing in launch.stderr and computing not in resumed.stderr
        full = {r["step"]: r["loss"] for r in two if "split" not in r}
        again = {r["step"]: r["loss"] for r in rows(part) if "split" not in r}
        assert sorted(again) == [3, 4] and max(abs(full[s] - again[s]) for s in again) < 1e-6


def test_deepspeed_is_told_the_smaller_batch_the_sft_step_rule_chose(tiny_llama, chat_data, tmp_path):
    """The trainer passes a batch lowered by ``resolve_training`` through ``scale_to_processes`` again (stubs)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from lora_ft.recipe.defaults import DataFacts, resolve_training

    launched = make_recipe(tiny_llama, chat_data, tmp_path / "r", train={"global_batch_size": 16, "micro_batch_size": 4,
                                                                         "lr": "auto", "epochs": "auto",
                                                                         "max_steps": None})
    resolved, rules = resolve_training(launched, DataFacts(200, 40, processes=4, batch_auto=True))
    assert "train.micro_batch_size" in rules  # 40 rows × 3 epochs in batches of 16 would be 9 steps
    plugin = SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": "auto"})
    ds = SimpleNamespace(num_processes=4, distributed_type=DistributedType.DEEPSPEED, is_fsdp2=False,
                         state=SimpleNamespace(deepspeed_plugin=plugin))
    tc = scale_to_processes(resolved, ds).train
    assert (tc.micro_batch_size, tc.grad_accum, tc.global_batch(4)) == (1, 1, 4)
    assert plugin.deepspeed_config == {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                                       "train_batch_size": 4, "gradient_clipping": 1.0}
