"""The training recipe: setup → evaluate (before) → train → evaluate (after) → save, on Accelerate.

One explicit loop instead of ``transformers.Trainer``: the loss is computed from only the logits that
carry labels (see ``data.Collator``), normalised by the number of label tokens in the whole global batch
(so 1 process × N accumulation steps equals N processes × 1 step), and the best adapter is kept in memory.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import checkpoint as ckpt
from .adapters import attach_adapters, load_adapter
from .config import Recipe, RecipeError, resolve_compute_dtype
from .data import Collator, LengthGroupedBatches, TaskData, prepare_data
from .evaluation import evaluate_all, train_loss
from .model import LoadedModel, load_model, load_tokenizer, resolve_source
from .report import plot_curves
from .signals import StopOnSignal, TrainingInterrupted

log = logging.getLogger(__name__)

RUN_CONFIG, RUN_INFO, METRICS, RESULTS = "run_config.yaml", "run_info.json", "metrics.jsonl", "eval_results.json"


def make_accelerator(recipe: Recipe) -> tuple[Accelerator, str]:
    cuda = torch.cuda.is_available()
    compute = resolve_compute_dtype(recipe.model.compute_dtype, cuda, cuda and torch.cuda.is_bf16_supported())
    precision = {"bf16": "bf16", "fp16": "fp16"}.get(compute, "no")
    # On a machine without GPUs, accelerate forms a (gloo) process group only when told it runs on the CPU:
    # otherwise every process that torchrun / `accelerate launch --multi_gpu` starts trains alone, and all of
    # them write the same files.
    cpu = torch.distributed.is_available() and torch.distributed.is_torchelastic_launched() and not cuda
    # gradient_accumulation_steps stays 1: the loop accumulates itself, with token-weighted normalisation.
    accelerator = Accelerator(mixed_precision=precision, log_with=recipe.train.trackers or None,
                              project_dir=recipe.output_dir, cpu=cpu)
    if not accelerator.is_main_process:
        # Every process runs the same code: without this each message would appear once per process.
        logging.getLogger("lora_ft").setLevel(logging.WARNING)
    return accelerator, compute


def scale_to_processes(recipe: Recipe, accelerator: Accelerator, resume: str | None = None) -> Recipe:
    """The recipe as this launch runs it: ``grad_accum`` derived from ``train.global_batch_size`` for this many
    processes, DeepSpeed told the batch sizes, and what the sharded engines cannot do refused up front."""
    tc, world, kind = recipe.train, accelerator.num_processes, accelerator.distributed_type
    if tc.global_batch_size is not None:
        per_pass = tc.micro_batch_size * world
        if tc.global_batch_size % per_pass:
            raise RecipeError(f"train.global_batch_size {tc.global_batch_size} is not a multiple of micro_batch_size "
                              f"{tc.micro_batch_size} × {world} process(es) = {per_pass}; choose a multiple of "
                              f"{per_pass} or change micro_batch_size")
        tc = tc.model_copy(update={"grad_accum": tc.global_batch_size // per_pass})
        recipe = recipe.model_copy(update={"train": tc})
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise RecipeError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                          "(see recipes/accelerate/fsdp-qlora.yaml)")
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED) and (tc.checkpoint_every or resume):
        # The optimizer state is sharded there, and checkpoints hold one process's optimizer state.
        raise RecipeError(f"train.checkpoint_every and --resume work with DDP, not yet under {kind.value}; unset "
                          "them or launch with a DDP config (recipes/accelerate/multi-gpu.yaml)")
    if kind == DistributedType.DEEPSPEED:
        # Our loader yields whole micro-batches (no batch_size for accelerate to read), and the engine decides
        # when an optimizer step happens: it must know the recipe's numbers.
        accelerator.state.deepspeed_plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": tc.micro_batch_size, "gradient_accumulation_steps": tc.grad_accum,
            "train_batch_size": tc.micro_batch_size * tc.grad_accum * world,
            "gradient_clipping": tc.max_grad_norm or 0.0})
    return recipe


def _zero3(accelerator: Accelerator) -> bool:
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3)


def _trainable(unwrapped: PeftModel) -> dict[str, torch.nn.Parameter]:
    # Full names without activation-checkpoint wrappers: the names in the model's own state dict.
    return {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in unwrapped.named_parameters() if p.requires_grad}


def adapter_snapshot(accelerator: Accelerator, unwrapped: PeftModel) -> dict[str, torch.Tensor]:
    """The trained weights as CPU tensors, identical on every process: to keep the best adapter and to save it.

    Under FSDP2 and ZeRO-3 each process holds a shard of every weight, so every process must call this (the
    gather is a collective); only the adapter is gathered, not the frozen base. Keys are then full parameter
    names (what ``save_pretrained(state_dict=...)`` takes), otherwise peft's adapter keys.
    """
    if accelerator.is_fsdp2:
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
                for n, p in _trainable(unwrapped).items()}
    if _zero3(accelerator):
        import deepspeed

        params = _trainable(unwrapped)
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().cpu().clone() for n, p in params.items()}
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unwrapped).items()}


def restore_adapter(accelerator: Accelerator, model, unwrapped: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Put an ``adapter_snapshot`` back into the (possibly sharded) model; every process calls this."""
    if accelerator.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    elif _zero3(accelerator):
        import deepspeed

        params = _trainable(unwrapped)
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])
    else:
        set_peft_model_state_dict(unwrapped, state)


def save_adapter(accelerator: Accelerator, unwrapped: PeftModel, folder: Path, tokenizer) -> None:
    """Every process calls this (sharded engines gather first); the main process writes."""
    if not (accelerator.is_fsdp2 or _zero3(accelerator)):
        if accelerator.is_main_process:
            ckpt.save_adapter(unwrapped, folder, tokenizer)
        return
    state = adapter_snapshot(accelerator, unwrapped)
    if accelerator.is_main_process:  # as ckpt.save_adapter, from the gathered weights
        tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)


def make_loader(ds, batch_size: int, tokenizer, causal: bool, shuffle: bool, seed: int,
                group: bool = True) -> DataLoader:
    sampler = LengthGroupedBatches([len(x) for x in ds["input_ids"]], batch_size, shuffle, seed, group=group)
    # A private generator: creating an iterator would otherwise draw from the global RNG, so a resumed run
    # (which creates its iterator after restoring the RNG) would see different dropout masks.
    return DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(tokenizer.pad_token_id, causal),
                      generator=torch.Generator().manual_seed(seed))


@dataclass
class Session:
    """Everything ``setup`` builds; the rest of the recipe only reads it."""

    recipe: Recipe
    accelerator: Accelerator
    loaded: LoadedModel
    model: PeftModel
    data: TaskData
    causal: bool


def setup(recipe: Recipe, accelerator: Accelerator, compute: str, adapter_dir: str | None = None,
          extra_splits: dict[str, str] | None = None, id2label: dict[int, str] | None = None) -> Session:
    """Tokenizer → data → model → adapters. Data comes first because a classifier's head size is the
    number of labels found in the training split."""
    cfg = recipe.model
    with accelerator.main_process_first():  # one rank fetches/converts example or GGUF models
        source = resolve_source(cfg.name)
    tokenizer = load_tokenizer(source, cfg)
    need_train = adapter_dir is None
    data = prepare_data(recipe.data, cfg.task, tokenizer, recipe.train.seed, need_train, extra_splits, id2label)
    device = accelerator.device if accelerator.device.type != "cuda" else accelerator.local_process_index
    loaded = load_model(cfg.model_copy(update={"name": source}), compute, device, data.id2label, tokenizer)
    if adapter_dir is not None:
        model = load_adapter(loaded.model, adapter_dir)
    else:
        gc = recipe.train.gradient_checkpointing
        model = attach_adapters(loaded.model, recipe.lora, cfg.task, loaded.head_modules,
                                torch.cuda.is_available() if gc == "auto" else gc)
    return Session(recipe, accelerator, loaded, model, data, cfg.task == "causal_lm")


def _check_output_dir(out: Path, resume: str | None, overwrite: bool) -> None:
    if resume is None and not overwrite and (out / RUN_CONFIG).exists():
        raise RecipeError(f"output_dir {out} already holds a run; pass --resume latest to continue it, "
                          "--overwrite to replace it, or choose another output_dir")


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _items(batch: dict, causal: bool) -> torch.Tensor:
    labels = batch["labels"]
    return (labels[:, 1:] != -100).sum() if causal else labels.new_tensor(labels.shape[0])


def train(recipe: Recipe, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run a recipe end to end; return ``eval_results`` (also written to ``output_dir``)."""
    tc, out = recipe.train, Path(recipe.output_dir)
    accelerator, compute = make_accelerator(recipe)
    recipe = scale_to_processes(recipe, accelerator, resume)
    tc = recipe.train
    main = accelerator.is_main_process
    _check_output_dir(out, resume, overwrite)
    resume_from = None
    if resume is not None:  # before any loading: a missing checkpoint should fail in a second, not a minute
        resume_from = ckpt.find_checkpoint(out / "checkpoints", resume)
        if resume_from is None:
            raise RecipeError(f"--resume {resume}: no intact checkpoint under {out / 'checkpoints'}")
    set_seed(tc.seed)

    # ---------------------------------------------------------------- setup
    s = setup(recipe, accelerator, compute)
    model, data, causal, tok = s.model, s.data, s.causal, s.loaded.tokenizer
    world = accelerator.num_processes
    # DDP and FSDP average gradients over processes, and DeepSpeed also divides the loss by its accumulation
    # steps; both are undone so that the gradient is Σloss / Σitems over the whole global batch.
    loss_scale = world * (tc.grad_accum if accelerator.distributed_type == DistributedType.DEEPSPEED else 1)
    group = causal if recipe.data.group_by_length == "auto" else recipe.data.group_by_length
    train_loader = make_loader(data.splits["train"], tc.micro_batch_size, tok, causal, True, tc.seed, group)
    sampler = train_loader.batch_sampler  # kept: the loop sets its epoch (accelerate wraps the loader)
    eval_loaders = {n: make_loader(ds, tc.micro_batch_size * 2, tok, causal, False, tc.seed)
                    for n, ds in data.splits.items() if n != "train"}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    eval_loaders = {n: accelerator.prepare(v) for n, v in eval_loaders.items()}
    per_epoch = max(len(train_loader) // tc.grad_accum, 1)
    total_steps = tc.max_steps or max(math.ceil(tc.epochs * per_epoch), 1)
    warmup = int(tc.warmup * total_steps) if tc.warmup < 1 else int(tc.warmup)
    # Not passed to accelerator.prepare: its wrapper steps the schedule once per process per step.
    scheduler = get_scheduler(tc.schedule if tc.schedule != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    unwrapped: PeftModel = accelerator.unwrap_model(model)
    info = {"source": s.loaded.source, "format": data.format, "id2label": data.id2label,
            "targets": sorted(unwrapped.peft_config["default"].target_modules),
            "head_modules": s.loaded.head_modules, "compute_dtype": compute, "world_size": world,
            "global_batch": tc.micro_batch_size * tc.grad_accum * world, "grad_accum": tc.grad_accum,
            "total_steps": total_steps, "data": data.stats}
    log.info("global batch %d = micro_batch_size %d × grad_accum %d × %d process(es); %d optimizer steps",
             info["global_batch"], tc.micro_batch_size, tc.grad_accum, world, total_steps)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if resume is None:
            (out / METRICS).unlink(missing_ok=True)
        (out / RUN_CONFIG).write_text(recipe.dump(), encoding="utf-8")
        (out / RUN_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
    if tc.trackers:
        accelerator.init_trackers("lora_ft", config=json.loads(json.dumps(recipe.model_dump(mode="json"))))

    # ---------------------------------------------------------------- state (fresh or resumed)
    step, epoch, position, best, bad_evals, best_state, before = 0, 0, 0, math.inf, 0, None, None
    rng, evaluated_epoch, best_step, last_val = None, 0, 0, None
    validating = "validation" in eval_loaders
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, unwrapped)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        best, bad_evals, before, rng = state["best"], state["bad_evals"], state["before"], state["rng"]
        best_state, best_step = state.get("best_state"), state.get("best_step", 0)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, step, epoch, position)
    if before is None:
        before = evaluate_all(model, eval_loaders, accelerator, causal)
        log.info("before training: %s", before)
    if main and resume is None:
        for split, metrics in before.items():
            _append_jsonl(out / METRICS, {"step": 0, "split": split, **metrics})

    def micro_batches():
        nonlocal epoch, position
        while True:
            train_loader.set_epoch(epoch)  # accelerate re-sets the sampler's epoch from this on __iter__
            sampler.set_epoch(epoch)
            loader = accelerator.skip_first_batches(train_loader, position) if position else train_loader
            for batch in loader:
                position += 1
                yield batch
            epoch, position = epoch + 1, 0

    def evaluate_and_track() -> bool:
        """Evaluate on validation (never test: it must not steer training), keep the best adapter in
        memory, log; True when early stopping says stop."""
        nonlocal best, bad_evals, best_state, best_step, last_val
        val = evaluate_all(model, {"validation": eval_loaders["validation"]}, accelerator, causal)["validation"]
        last_val = (step, val)
        if main:
            _append_jsonl(out / METRICS, {"step": step, "split": "validation", **val})
        accelerator.log({f"validation/{k}": v for k, v in val.items()}, step=step)
        if val["loss"] < best - 1e-6:
            best, best_step, bad_evals = val["loss"], step, 0
            best_state = adapter_snapshot(accelerator, unwrapped)
        else:
            bad_evals += 1
        log.info("step %d: validation %s (best loss %.4f at step %d)", step, val, best, best_step)
        return bool(tc.early_stopping_patience and bad_evals >= tc.early_stopping_patience)

    # ---------------------------------------------------------------- train
    stream = micro_batches()
    if rng is not None:
        ckpt.set_rng_state(rng)  # last, so nothing between restore and the first step draws numbers

    def save_checkpoint() -> Path:
        return ckpt.save_checkpoint(out / "checkpoints", step, unwrapped, {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
            "epoch": epoch, "position": position, "best": best, "bad_evals": bad_evals,
            "before": before, "best_state": best_state, "best_step": best_step}, tc.keep_checkpoints)

    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=not main, desc="training", dynamic_ncols=True)
    with StopOnSignal() as stopper, bar:  # the bar closes on every exit, so errors print on a clean line
        tokens, train_time, stopped = torch.zeros((), device=accelerator.device), 0.0, None
        while step < total_steps and stopped is None:
            t0 = time.perf_counter()
            batches = [next(stream) for _ in range(tc.grad_accum)]
            local = torch.stack([_items(b, causal) for b in batches]).sum()
            n_items = accelerator.reduce(local, "sum").clamp(min=1)
            loss_sum = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(batches):
                sync = i == len(batches) - 1
                with nullcontext() if sync else accelerator.no_sync(model):
                    item_loss, _ = train_loss(model, batch, causal)
                    accelerator.backward(item_loss * loss_scale / n_items)  # see loss_scale
                loss_sum += item_loss.detach()
                tokens += batch["attention_mask"].sum()
            grad_norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm) if tc.max_grad_norm else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            train_time += time.perf_counter() - t0  # excludes evaluation and checkpointing
            if step % tc.log_every == 0 or step == total_steps:
                loss = (accelerator.reduce(loss_sum, "sum") / n_items).item()
                if not math.isfinite(loss):
                    last = ckpt.list_checkpoints(out / "checkpoints")
                    raise FloatingPointError(
                        f"loss became {loss} at step {step}; lower train.lr, or use compute_dtype bf16/fp32 instead "
                        f"of fp16; nothing from this step was saved (last good checkpoint: "
                        f"{last[-1] if last else 'none'})")
                row = {"step": step, "epoch": round(epoch + position / max(len(train_loader), 1), 4), "loss": loss,
                       "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens.item() * world / train_time}
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                accelerator.log(row, step=step)
                if main:
                    _append_jsonl(out / METRICS, row)
            finished = epoch + (position == len(train_loader))  # epochs completed so far
            epoch_done = tc.eval_every is None and finished > evaluated_epoch
            evaluated_epoch = finished
            if validating and step < total_steps and (
                (tc.eval_every and step % tc.eval_every == 0) or epoch_done
            ) and evaluate_and_track():
                stopped = f"early stopping at step {step}: validation loss did not improve for " \
                          f"{tc.early_stopping_patience} evaluations"
                log.info(stopped)
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and main:
                save_checkpoint()
            signum = stopper.requested(accelerator)
            if signum:
                path = save_checkpoint() if main else None
                accelerator.wait_for_everyone()
                raise TrainingInterrupted(
                    f"interrupted at step {step}/{total_steps}; checkpoint saved to {path}; continue with: "
                    f"lora-ft train RECIPE --resume latest (output_dir {out})", signum)
    if validating and stopped is None:
        evaluate_and_track()

    # ---------------------------------------------------------------- cleanup: best adapter → outputs
    if best_state is not None and best_step != step:
        restore_adapter(accelerator, model, unwrapped, best_state)
        log.info("restored the best adapter (step %d)", best_step)
    # The validation result of the best step is reused when it is the current model: no second pass.
    reuse = {"validation": last_val[1]} if last_val and last_val[0] == step and best_step == step else {}
    after = {**evaluate_all(model, {n: v for n, v in eval_loaders.items() if n not in reuse}, accelerator,
                            causal), **reuse}
    after = {n: after[n] for n in eval_loaders}
    info.update(best_step=best_step or step, steps_done=step, stopped=stopped)
    results = {"before": before, "after": after}
    save_adapter(accelerator, unwrapped, out / "adapter", tok)  # every process: sharded engines gather first
    accelerator.wait_for_everyone()
    if main:
        for split, metrics in after.items():
            if split != "validation" or best_step != step:  # else already logged at this step
                _append_jsonl(out / METRICS, {"step": step, "split": split, "final": True, **metrics})
        (out / RESULTS).write_text(json.dumps(results, indent=2), encoding="utf-8")
        (out / RUN_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
        plot_curves(out / METRICS, out / "curves.png")
        log.info("after training: %s", after)
    accelerator.end_training()
    return results


def evaluate_run(run_dir: str | Path, data_file: str, split: str = "eval") -> dict[str, float]:
    """``lora-ft eval``: the run's adapter on any file, with the run's own recipe and label set."""
    from .config import load_recipe

    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG).is_file():
        raise RecipeError(f"{run_dir} is not a lora_ft run (no {RUN_CONFIG}); give the output_dir of a run")
    recipe = load_recipe(run_dir / RUN_CONFIG)
    info = json.loads((run_dir / RUN_INFO).read_text())
    id2label = {int(k): v for k, v in info["id2label"].items()} if info.get("id2label") else None
    recipe.data.validation, recipe.data.test = None, None
    accelerator, compute = make_accelerator(recipe.model_copy(update={"train": recipe.train.model_copy(
        update={"trackers": []})}))
    s = setup(recipe, accelerator, compute, str(run_dir / "adapter"), {split: data_file}, id2label)
    loader = accelerator.prepare(make_loader(s.data.splits[split], recipe.train.micro_batch_size * 2,
                                             s.loaded.tokenizer, s.causal, False, 0))
    return evaluate_all(s.model, {split: loader}, accelerator, s.causal)[split]
