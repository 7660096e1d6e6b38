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
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from peft import PeftModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import checkpoint as ckpt
from . import plan
from .config import Recipe, RecipeError
from .cpu_memory import release_freed_memory
from .craft import (
    Augmenter,
    FreezeSchedule,
    activate_neftune,
    forgetting_breach,
    forgetting_metrics,
    param_groups,
    reference_examples,
)
from .data import Collator, LengthGroupedBatches
from .distributed import adapter_snapshot, restore_adapter, save_adapter, scale_to_processes
from .evaluation import evaluate_all, train_loss
from .report import plot_curves, tracker_config
from .session import make_accelerator, make_loader, setup
from .signals import StopOnSignal, TrainingInterrupted

log = logging.getLogger(__name__)

RUN_CONFIG, RUN_INFO, METRICS, RESULTS = "run_config.yaml", "run_info.json", "metrics.jsonl", "eval_results.json"


def _check_output_dir(out: Path, resume: str | None, overwrite: bool) -> None:
    if resume is None and not overwrite and (out / RUN_CONFIG).exists():
        raise RecipeError(f"output_dir {out} already holds a run; pass --resume latest to continue it, "
                          "--overwrite to replace it, or choose another output_dir")


def _clear_run(out: Path) -> None:
    """``--overwrite``: remove the old run's outputs, so none of them (a checkpoint that ``--resume latest`` would
    pick, a stale adapter or report) is mistaken for the new run's. Other files in the folder stay."""
    for name in ("checkpoints", "adapter", "merged", "hub"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (RUN_CONFIG, RUN_INFO, METRICS, RESULTS, "curves.png", "merge_report.json"):
        (out / name).unlink(missing_ok=True)


def _raise_if_non_finite(accelerator: Accelerator, first_bad: torch.Tensor, checkpoints: Path) -> None:
    """Raise if any process saw a NaN/inf loss (``first_bad``: its first such step, 0 for none). Called where a
    host sync happens anyway (logging) and before every save, so no checkpoint holds weights a non-finite step
    has touched."""
    bad = accelerator.gather(first_bad[None])
    bad = bad[bad > 0]
    if bad.numel():
        at = int(bad.min())
        # The weights saved at step at-1 are the ones that gave the non-finite loss: not a good checkpoint.
        good = [c for c in ckpt.list_checkpoints(checkpoints) if int(c.name.split("-")[1]) <= at - 2]
        raise FloatingPointError(
            f"loss became non-finite at step {at}; lower train.lr, or use compute_dtype bf16/fp32 instead of fp16; "
            f"nothing from that step on was saved (last good checkpoint: {good[-1] if good else 'none'}"
            + (f"; continue with --resume {good[-1].name} --set train.lr=..." if good else "") + ")")


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
    # micro_batch_size auto: the planner's largest that fits this device, grad_accum keeping the global batch
    # (from the config and the data, before the model is loaded; see plan.resolve_auto_micro_batch).
    recipe = plan.resolve_for_launch(recipe, accelerator)
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
    window = LengthGroupedBatches.window_for(recipe.data.group_by_length, causal)  # batches per sorted window
    augmenter = Augmenter(recipe.data.augment, tc.seed, set(tok.all_special_ids), tok.mask_token_id
                          if tok.mask_token_id is not None else tok.unk_token_id) if not causal else None
    train_loader = make_loader(data.splits["train"], tc.micro_batch_size, tok, causal, True, tc.seed, window,
                               augmenter or None)
    sampler = train_loader.batch_sampler  # kept: the loop sets its epoch (accelerate wraps the loader)
    eval_loaders = {n: make_loader(ds, tc.micro_batch_size * 2, tok, causal, False, tc.seed)
                    for n, ds in data.splits.items() if n != "train"}
    heads = s.loaded.head_modules
    optimizer = torch.optim.AdamW(param_groups(model, tc, heads), lr=tc.lr, weight_decay=tc.weight_decay)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaced them with sharded ones
    eval_loaders = {n: accelerator.prepare(v) for n, v in eval_loaders.items()}
    per_epoch = max(len(train_loader) // tc.grad_accum, 1)
    total_steps = tc.max_steps or max(math.ceil(tc.epochs * per_epoch), 1)
    warmup = int(tc.warmup * total_steps) if tc.warmup < 1 else int(tc.warmup)
    # Not passed to accelerator.prepare: its wrapper steps the schedule once per process per step.
    scheduler = get_scheduler(tc.schedule if tc.schedule != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    unwrapped: PeftModel = accelerator.unwrap_model(model)
    untrim = release_freed_memory(unwrapped) if tc.trim_cpu_memory and accelerator.device.type == "cpu" else None
    schedule = FreezeSchedule(unwrapped, recipe.freeze, heads)
    fg = recipe.forgetting
    ref_loader = DataLoader(reference_examples(fg.reference, tok, fg.max_examples, recipe.data.max_length),
                            batch_size=tc.micro_batch_size * 2, collate_fn=Collator(tok.pad_token_id, True)) \
        if fg.enabled else None
    info = {"source": s.loaded.source, "format": data.format, "id2label": data.id2label,
            "targets": sorted(unwrapped.peft_config["default"].target_modules),
            "head_modules": s.loaded.head_modules, "compute_dtype": compute, "world_size": world,
            "global_batch": tc.micro_batch_size * tc.grad_accum * world, "grad_accum": tc.grad_accum,
            "total_steps": total_steps, "data": data.stats}
    log.info("global batch %d = micro_batch_size %d × grad_accum %d × %d process(es); %d optimizer steps",
             info["global_batch"], tc.micro_batch_size, tc.grad_accum, world, total_steps)
    if main:
        if overwrite and resume is None:
            _clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        if resume is None:
            (out / METRICS).unlink(missing_ok=True)
        (out / RUN_CONFIG).write_text(recipe.dump(), encoding="utf-8")
        (out / RUN_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
    if tc.trackers:  # TensorBoard's hparams take only scalars: a flat, dotted config
        accelerator.init_trackers("lora_ft", config=tracker_config(recipe.model_dump(mode="json")))

    # ---------------------------------------------------------------- state (fresh or resumed)
    step, epoch, position, best, bad_evals, best_state, before = 0, 0, 0, math.inf, 0, None, None
    rng, evaluated_epoch, best_step, last_val, forgot_before = None, 0, 0, None, None
    recent_losses, prev_eval, worsening, within_budget = [], None, 0, None
    validating = "validation" in eval_loaders
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, unwrapped)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        best, bad_evals, before, rng = state["best"], state["bad_evals"], state["before"], state["rng"]
        best_state, best_step, forgot_before = state.get("best_state"), state.get("best_step", 0), state.get("forgot")
        loop = state.get("loop", {})  # what the periodic evaluation tracks between evaluations
        evaluated_epoch, within_budget = loop.get("evaluated_epoch", epoch), loop.get("within_budget")
        prev_eval, worsening, recent_losses = loop.get("prev_eval"), loop.get("worsening", 0), loop.get("recent", [])
        before.pop("forgetting", None)  # checkpoints of older versions kept it among the splits
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, step, epoch, position)
    if before is None:
        before = evaluate_all(model, eval_loaders, accelerator, causal)
        log.info("before training: %s", before)
    if ref_loader is not None and forgot_before is None:
        forgot_before = forgetting_metrics(model, ref_loader, accelerator)
    if main and resume is None:
        for split, metrics in {**before, **({"forgetting": forgot_before} if forgot_before else {})}.items():
            _append_jsonl(out / METRICS, {"step": 0, "split": split, **metrics})

    def micro_batches():
        nonlocal epoch, position
        while True:
            train_loader.set_epoch(epoch)  # accelerate re-sets the sampler's epoch from this on __iter__
            sampler.set_epoch(epoch)
            if augmenter:
                augmenter.epoch = epoch
            loader = accelerator.skip_first_batches(train_loader, position) if position else train_loader
            for batch in loader:
                position += 1
                yield batch
            epoch, position = epoch + 1, 0

    def evaluate_and_track() -> bool:
        """Evaluate on validation (never test: it must not steer training), keep the best adapter in
        memory, log; True when early stopping says stop."""
        nonlocal best, bad_evals, best_state, best_step, last_val, prev_eval, worsening, within_budget, stopped
        val = evaluate_all(model, {"validation": eval_loaders["validation"]}, accelerator, causal)["validation"]
        last_val = (step, val)
        # Overfitting watch: the train/validation gap, and validation worsening while training improves.
        train_mean = sum(recent_losses) / len(recent_losses) if recent_losses else float("nan")
        recent_losses.clear()
        row = {**val, "train_loss": train_mean, "gap": val["loss"] - train_mean}
        if prev_eval and val["loss"] > prev_eval[0] and train_mean < prev_eval[1]:
            worsening += 1
            if worsening >= (tc.early_stopping_patience or 2):
                log.warning("step %d: validation loss rose for %d evaluations while training loss fell: the "
                            "adapter is overfitting (the best one is kept)", step, worsening)
        else:
            worsening = 0
        prev_eval = (val["loss"], train_mean)
        if main:
            _append_jsonl(out / METRICS, {"step": step, "split": "validation", **row})
        accelerator.log({f"validation/{k}": v for k, v in row.items()}, step=step)
        if val["loss"] < best - 1e-6:
            best, best_step, bad_evals = val["loss"], step, 0
            best_state = adapter_snapshot(accelerator, unwrapped)
        else:
            bad_evals += 1
        log.info("step %d: validation %s (best loss %.4f at step %d)", step, val, best, best_step)
        if ref_loader is not None:
            forgot = forgetting_metrics(model, ref_loader, accelerator, forgot_before["ppl_base"])
            if main:
                _append_jsonl(out / METRICS, {"step": step, "split": "forgetting", **forgot})
            breach = forgetting_breach(forgot, fg.max_kl, fg.max_ppl_increase)
            if breach is None:
                if fg.action == "rollback":
                    within_budget = (step, adapter_snapshot(accelerator, unwrapped))
            else:
                if fg.action == "rollback":  # the kept adapter is the last one within budget, not the best
                    best_step, best_state = within_budget or (0, None)
                    if best_state is None:  # nothing trained was within budget: back to the untrained adapter
                        best_state = {k: torch.zeros_like(v) if "lora_B" in k else v
                                      for k, v in adapter_snapshot(accelerator, unwrapped).items()}
                stopped = f"forgetting guard at step {step}: {breach}; " + (
                    f"rolled back to the adapter of step {best_step}" if fg.action == "rollback" else
                    f"stopped (keeping the best adapter, step {best_step})")
                log.warning(stopped)
                return True
        return bool(tc.early_stopping_patience and bad_evals >= tc.early_stopping_patience)

    # ---------------------------------------------------------------- train
    stream = micro_batches()
    if rng is not None:
        ckpt.set_rng_state(rng)  # last, so nothing between restore and the first step draws numbers

    def save_checkpoint() -> Path:
        return ckpt.save_checkpoint(out / "checkpoints", step, unwrapped, {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
            "epoch": epoch, "position": position, "best": best, "bad_evals": bad_evals,
            "before": before, "best_state": best_state, "best_step": best_step, "forgot": forgot_before,
            "loop": {"evaluated_epoch": evaluated_epoch, "within_budget": within_budget, "prev_eval": prev_eval,
                     "worsening": worsening, "recent": list(recent_losses)}}, tc.keep_checkpoints)

    def check_finite() -> None:
        _raise_if_non_finite(accelerator, first_bad, out / "checkpoints")

    neftune = activate_neftune(unwrapped, recipe.data.augment.neftune_alpha) \
        if causal and recipe.data.augment.neftune_alpha else None
    model.train()
    stopped = None
    bar = tqdm(total=total_steps, initial=step, disable=not main, desc="training", dynamic_ncols=True)
    first_bad = torch.zeros((), dtype=torch.long, device=accelerator.device)  # first non-finite step, 0: none
    with StopOnSignal() as stopper, bar:  # the bar closes on every exit, so errors print on a clean line
        tokens, train_time = torch.zeros((), device=accelerator.device), 0.0
        while step < total_steps and stopped is None:
            t0 = time.perf_counter()
            if change := schedule.apply(step):
                log.info("freeze schedule: %s", change)
                if main:
                    _append_jsonl(out / METRICS, {"step": step, "freeze": change})
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
            first_bad.masked_fill_((first_bad == 0) & ~torch.isfinite(loss_sum), step)  # no host sync here
            train_time += time.perf_counter() - t0  # excludes evaluation and checkpointing
            if step % tc.log_every == 0 or step == total_steps:
                check_finite()
                loss = (accelerator.reduce(loss_sum, "sum") / n_items).item()
                row = {"step": step, "epoch": round(epoch + position / max(len(train_loader), 1), 4), "loss": loss,
                       "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens.item() * world / train_time}
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                recent_losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                accelerator.log(row, step=step)
                if main:
                    _append_jsonl(out / METRICS, row)
            finished = epoch + (position == len(train_loader))  # epochs completed so far
            epoch_done = tc.eval_every is None and finished > evaluated_epoch
            evaluated_epoch = finished
            if validating and step < total_steps and (
                (tc.eval_every and step % tc.eval_every == 0) or epoch_done
            ) and evaluate_and_track() and stopped is None:
                stopped = f"early stopping at step {step}: validation loss did not improve for " \
                          f"{tc.early_stopping_patience} evaluations"
                log.info(stopped)
            signum = stopper.requested(accelerator)  # collective: every process gets the same answer
            if signum or (tc.checkpoint_every and step % tc.checkpoint_every == 0):  # one save, even for both
                check_finite()
                saved = save_checkpoint() if main else None
            if signum:
                accelerator.wait_for_everyone()
                raise TrainingInterrupted(
                    f"interrupted at step {step}/{total_steps}; checkpoint saved to {saved}; continue with: "
                    f"lora-ft train RECIPE --resume latest (output_dir {out})", signum)
    check_finite()  # before the final evaluation and save
    if neftune is not None:
        neftune.remove()
    if untrim is not None:
        untrim()
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
    results: dict[str, Any] = {"before": before, "after": after}
    if ref_loader is not None:  # not a split: the model against its own base on general text
        results["forgetting"] = {"before": forgot_before, "after": forgetting_metrics(
            model, ref_loader, accelerator, forgot_before["ppl_base"])}
    info.update(best_step=best_step or step, steps_done=step, stopped=stopped)
    save_adapter(accelerator, unwrapped, out / "adapter", tok)  # every process: sharded engines gather first
    accelerator.wait_for_everyone()
    if main:
        final = {**after, **({"forgetting": results["forgetting"]["after"]} if ref_loader is not None else {})}
        for split, metrics in final.items():
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
    # The whole file is scored: max_eval_examples caps only the periodic evaluation during training.
    recipe.data.validation, recipe.data.test, recipe.data.max_eval_examples = None, None, None
    accelerator, compute = make_accelerator(recipe.model_copy(update={"train": recipe.train.model_copy(
        update={"trackers": []})}))
    s = setup(recipe, accelerator, compute, str(run_dir / "adapter"), {split: data_file}, id2label)
    loader = accelerator.prepare(make_loader(s.data.splits[split], recipe.train.micro_batch_size * 2,
                                             s.loaded.tokenizer, s.causal, False, 0))
    return evaluate_all(s.model, {split: loader}, accelerator, s.causal)[split]
