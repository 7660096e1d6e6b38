"""The training engine: one class, ``setup → evaluate (before) → train → finish``, on Accelerate.

One explicit loop instead of ``transformers.Trainer``: the loss comes from the objective (``objectives/``), summed
over its items and divided by the items of the whole global batch (so 1 process × N accumulation steps equals N
processes × 1 step); the best adapter is kept in memory; every piece of loop state lives in ``self.state``
(``state.LoopState``), which is what a checkpoint saves and a resumed run restores. The loop never branches on the
task: what differs between tasks is the objective's business, and the guards (``guards.py``) are consulted after
each validation. (About 540 lines: the phases and the signal handling inside each belong together; what a
signal leaves behind, and its message, are in ``interruption.py``, resuming's checks in ``resume.py``.)
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..errors import NonFiniteLoss, RecipeError, TrainingInterrupted, first_line
from ..lock import RunLock
from ..memory.launch import resolve_for_launch
from ..recipe import Recipe
from ..recipe.defaults import resolve_cadence, sources
from ..run import CURVES, OBJECTIVE_CACHE, RESULTS, RUN_INFO, RunFolder, adopt_start_adapter
from ..scoring.rewards import check_rewards
from ..scoring.suite import GenerationSuite
from . import checkpoint as ckpt
from .cpu_memory import release_freed_memory
from .distributed import adapter_snapshot, restore_adapter, save_adapter, scale_to_processes
from .evaluation import evaluate_all
from .freezing import FreezeSchedule
from .generated import GeneratedEvaluation, check_selectable
from .guards import ForgettingGuard
from .interruption import FINAL_EVALUATION, interrupted
from .neftune import activate_neftune
from .param_groups import make_optimizer
from .report import final_metrics, peak_memory, plot_curves, tracker_config, tracker_run
from .resume import abandon_after, check_recipe_fits, keep_new_hyperparameters, start_point
from .session import (
    Session,
    attended_pairs_of,
    lock_run,
    longest_sequence,
    make_accelerator,
    make_loader,
    make_train_loader,
    resolve_dtype,
    resolve_for_data,
    setup,
)
from .signals import Interrupted, Signals, requested
from .state import LoopState
from .throughput import ThroughputMeter
from .trackers import check_trackers, start_trackers

log = logging.getLogger(__name__)


class Trainer:
    """One training run of a recipe.

    Args:
        recipe: the validated recipe (``auto`` values are resolved in ``setup``).
        resume: ``latest`` or a checkpoint name/path to continue from; None starts fresh.
        overwrite: replace a run already in ``output_dir``.
        group: the experiment this run belongs to (a sweep's name), for the trackers.
    """

    def __init__(self, recipe: Recipe, resume: str | None = None, overwrite: bool = False, group: str | None = None):
        self.recipe, self.resume, self.overwrite, self.group = recipe, resume, overwrite, group
        self.given = recipe  # as written: run_config.yaml says which values it gave and which lora_ft chose
        self.rules: dict[str, str] = {}  # dotted key → the defaults rule that resolved it
        self.folder = RunFolder(recipe.output_dir)
        self.state = LoopState()
        self.last_validation: tuple[int, dict[str, float]] | None = None  # reused at the end when still current
        self.session: Session | None = None
        self.signals = Signals()
        self.lock: RunLock | None = None
        self.resume_from: Path | None = None  # the checkpoint this run continues (None: from step 0)
        self.started = False  # this run wrote run_config.yaml
        self.final_weights: dict[str, torch.Tensor] | None = None  # the last step's, while the best are evaluated
        self.generated: GeneratedEvaluation | None = None  # eval: answers generated and scored (scoring/suite.py)
        self.eval_seconds: dict[str, float] = {}  # each split's last evaluation took: logged and in metrics.jsonl

    def run(self) -> dict[str, Any]:
        """The whole run; returns ``eval_results`` (also written to ``output_dir``).

        SIGINT/SIGTERM end any phase cleanly: during the training steps after the current step, with a checkpoint
        (``train``); during setup or the first evaluation at once (nothing is trained yet); during the final
        evaluation at once, keeping the trained adapter and a checkpoint that finishes the run; during the final
        save after it (``finish``). Each says what was kept and the command that continues
        (``interruption.py``).
        """
        with self.signals:
            try:
                with self.signals.phase("setup (loading the model and data)"):
                    self.setup()
                with self.signals.phase("the evaluation before training"):
                    self.evaluate_before()
                self.train()
                return self.finish()
            except Interrupted as e:
                raise interrupted(self, e) from None
            finally:
                self._close()

    # ==================================================================================================== setup
    def setup(self) -> None:
        """Checks and the run lock → trackers' backends → accelerator and resolved recipe → model, data, optimizer →
        trackers started → run folder → resumed state.

        The order matters: the run lock comes before anything reads or writes the folder, so a second run refuses
        at once; the ``auto`` memory settings decide the micro-batch the loaders are built with; a missing or
        unfitting checkpoint must fail before a minute of loading; the run folder is written only once everything
        that can reject the recipe has run.
        """
        errors, warnings = self.recipe.inert_settings()
        errors += GenerationSuite.check(self.recipe)  # metric names and functions, before any model loads
        errors += check_rewards(self.recipe.objective.rewards)  # GRPO's reward functions, likewise
        if errors:
            raise RecipeError(f"{len(errors)} problem(s): " + "; ".join(errors))
        for warning in warnings:
            log.warning(warning)
        self.folder.check_location(self.recipe)
        self.recipe, dtype_rule = resolve_dtype(self.recipe)  # before check_recipe_fits compares it
        self.accelerator, compute = make_accelerator(self.recipe)
        # Before anything reads or writes the folder: a second run refuses at once.
        self.lock = lock_run(self.folder, self.accelerator)
        self.folder.check_new(self.resume, self.overwrite)
        check_trackers(self.accelerator, self.folder.path, tracker_run(self.folder.path, self.group)[0])
        self.recipe = adopt_start_adapter(self.recipe)  # lora.init_from: the starting adapter's shape
        # micro_batch_size / gradient_checkpointing auto: the planner's choice for this device, from the config
        # and the data, before any loader is built (see memory.launch); then grad_accum for this many processes.
        self.recipe = scale_to_processes(resolve_for_launch(self.recipe, self.accelerator), self.accelerator,
                                         self.resume)
        self.tc = self.recipe.train
        self.resume_from = start_point(self.folder, self.resume)
        if self.resume_from is not None:
            check_recipe_fits(self.resume_from, self.folder, self.recipe)
        set_seed(self.tc.seed)
        self.session = s = setup(self.recipe, self.accelerator, compute)
        # Before the loaders (it may add columns) and before a checkpoint is restored: the model is still the one
        # training starts from (a preference objective's reference log-probs).
        s.data.splits = s.objective.prepare(s.model, self.accelerator, s.data.splits, self.tc.eval_batch_size,
                                            self.folder / OBJECTIVE_CACHE)
        # epochs, learning rates, warmup, patience, trimming auto: by objective and data (recipe.defaults).
        self.recipe, self.rules = resolve_for_data(self.recipe, self.given, s, self.accelerator.num_processes,
                                                   self.accelerator.device.type)
        self.rules.update(dtype_rule)
        if "train.micro_batch_size" in self.rules:  # a smaller batch (the step rule): DeepSpeed must be told it
            self.recipe = scale_to_processes(self.recipe, self.accelerator, self.resume)
        self.tc = self.recipe.train
        s.objective.select_by(self.recipe.eval.select_by)
        suite = GenerationSuite.build(self.recipe, s.objective, s.loaded.tokenizer, s.data.raw.get("validation"),
                                      s.data.formats.get("validation"))
        self.generated = GeneratedEvaluation(suite, self.accelerator) if suite is not None else None
        self._build_loop()
        self._start_folder(compute)
        self._rng = self._restore(self.resume_from) if self.resume_from is not None else None

    def _build_loop(self) -> None:
        """Loaders, optimizer and schedule, prepared by Accelerate; the hooks and guards the loop uses."""
        s, tc, acc = self.session, self.tc, self.accelerator
        self.objective, tok, heads = s.objective, s.loaded.tokenizer, s.loaded.head_modules
        train_loader, self.packing, self.augmenter = make_train_loader(s.data.splits.get("train"), self.objective,
                                                                       s.model, self.recipe, s.data.stream, acc)
        self.streaming = s.data.stream is not None  # a TrainStream: accelerate.prepare passes it through as it is
        # kept: the loop sets its epoch (accelerate wraps the loader)
        self.sampler = train_loader if self.streaming else train_loader.batch_sampler
        eval_loaders = {n: make_loader(ds, tc.eval_batch_size, self.objective.collate, False, tc.seed,
                                       max_tokens=tc.eval_max_tokens)
                        for n, ds in s.data.splits.items() if n != "train"}
        # The steps as accelerate will shard the loader (a chat template's token rows' rate needs the run's length).
        planned = tc.max_steps if self.streaming else tc.total_steps(-(-len(train_loader) // acc.num_processes))
        optimizer = make_optimizer(s.model, tc, heads, acc.distributed_type, self.recipe.lora.plus_lr_ratio, planned)
        self.model, self.optimizer, self.train_loader = acc.prepare(s.model, optimizer, train_loader)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # FSDP2 replaced them with shards
        self.eval_loaders = {n: acc.prepare(v) for n, v in eval_loaders.items()}
        self.total_steps = tc.total_steps(len(self.train_loader))
        self.recipe, cadence = resolve_cadence(self.recipe, self.total_steps)  # eval_every auto needs the steps
        self.tc, tc = self.recipe.train, self.recipe.train
        self.rules.update(cadence)
        # Not passed to accelerator.prepare: its wrapper steps the schedule once per process per step.
        self.scheduler = get_scheduler(tc.schedule if tc.schedule != "constant" else "constant_with_warmup",
                                       self.optimizer, num_warmup_steps=tc.warmup_steps(self.total_steps),
                                       num_training_steps=self.total_steps)
        self.unwrapped = acc.unwrap_model(self.model)
        # DDP and FSDP average gradients over processes, and DeepSpeed also divides the loss by its accumulation
        # steps; both are undone so that the gradient is Σloss / Σitems over the whole global batch.
        deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        self.loss_scale = acc.num_processes * (tc.grad_accum if deepspeed else 1)
        self.freeze = FreezeSchedule(self.unwrapped, self.recipe.freeze, heads)
        fg = self.recipe.forgetting
        self.forgetting = ForgettingGuard(fg, tok, self.objective.collate, tc.eval_batch_size,
                                          self.recipe.data.max_length) if fg.enabled else None
        self.validating = "validation" in self.eval_loaders

    def _start_folder(self, compute: str) -> None:
        """Start the trackers, then write the resolved recipe and the run's facts (main process)."""
        s, tc, world = self.session, self.tc, self.accelerator.num_processes
        self.info = {"source": s.loaded.source, "format": s.data.format, "id2label": s.data.id2label,
                     "targets": sorted(self.unwrapped.peft_config["default"].target_modules),
                     "head_modules": s.loaded.head_modules, "compute_dtype": compute, "world_size": world,
                     "global_batch": tc.global_batch(world), "grad_accum": tc.grad_accum,
                     "total_steps": self.total_steps, "packing": self.packing, "data": s.data.stats,
                     "generation": self.generated.settings() if self.generated is not None else None}
        rows = self.packing and not self.objective.packs_examples
        unit = f"rows of up to {self.recipe.data.max_length} tokens" if rows else "examples"
        log.info("global batch %d %s = micro_batch_size %d × grad_accum %d × %d process(es); %d optimizer steps",
                 self.info["global_batch"], unit, tc.micro_batch_size, tc.grad_accum, world, self.total_steps)
        if self.accelerator.is_main_process:
            if self.resume is not None:
                abandon_after(self.folder, self.resume_from)
            elif self.overwrite:
                self.folder.set_aside()  # deleted once this run has saved something (drop_aside), else put back
            self.info["resolved"] = sources(self.given, self.recipe, self.rules)
        if tc.trackers:  # before the folder is written, which a tracker that cannot start leaves as it was
            project, init_kwargs = tracker_run(self.folder.path, self.group)
            start_trackers(self.accelerator, project, tracker_config(self.recipe.model_dump(mode="json")),
                           init_kwargs, self.folder.path)
        if self.accelerator.is_main_process:
            self.folder.start(self.recipe, self.info, fresh=self.resume_from is None)
            self.started = True
            if self.recipe.lora.init_from:
                self.folder.keep_start_adapter(self.recipe.lora.init_from)

    def _restore(self, path: Path) -> dict[str, Any]:
        """Adapter, optimizer, schedule and loop state from a checkpoint; returns the RNG state, which ``train``
        sets last, so that nothing between here and the first step draws from it."""
        saved = ckpt.load_checkpoint(path, self.unwrapped)
        new_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
        except ValueError as e:  # torch: "loaded state dict contains a parameter group that doesn't match ..."
            raise RecipeError(f"checkpoint {path}: its optimizer state does not fit this recipe's trainable "
                              f"parameters ({first_line(e)}); start a new run") from None
        self.scheduler.load_state_dict(saved["scheduler"])
        keep_new_hyperparameters(self.optimizer, self.scheduler, new_groups)  # lr, weight decay: the recipe's
        self.state = LoopState.from_checkpoint(saved)
        if self.streaming:  # where the stream continues (data.streaming)
            self.train_loader.restore(saved.get("stream"))
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step, self.state.epoch,
                 self.state.position)
        return saved["rng"]

    # ================================================================================================ evaluate
    def evaluate(self, names: list[str] | None = None) -> dict[str, dict[str, float]]:
        """The objective's metrics of each split (all by default); each split's time goes to ``eval_seconds``."""
        loaders = {n: self.eval_loaders[n] for n in (self.eval_loaders if names is None else names)}
        return evaluate_all(self.model, loaders, self.objective, self.accelerator, self.eval_seconds)

    def _took(self, split: str) -> dict[str, float]:
        """``eval_seconds``: how long the split's latest evaluation took (the loss pass; generation is timed apart),
        for its row of ``metrics.jsonl``."""
        return {"eval_seconds": self.eval_seconds[split]} if split in self.eval_seconds else {}

    def snapshot(self) -> dict[str, torch.Tensor]:
        return adapter_snapshot(self.accelerator, self.unwrapped)

    def evaluate_before(self) -> None:
        """The base model (untrained adapter) on every split, and the forgetting guard's reference; a resumed run
        reuses what its checkpoint recorded."""
        st = self.state
        if st.before is None:
            st.before = self.evaluate()
            if st.before:  # a run without evaluation splits has nothing to report
                log.info("before training: %s (seconds per split: %s)", st.before, self.eval_seconds)
        if self.generated is not None:
            self.generated.before(self.model, st, fresh=self.resume_from is None)
        check_selectable(self.recipe.eval.select_by, st.before)
        if self.forgetting is not None and st.forgetting.before is None:
            st.forgetting.before = self.forgetting.measure(self.model, self.accelerator)
        if self.resume_from is None:
            extra = {"forgetting": st.forgetting.before} if st.forgetting.before else {}
            for split, metrics in {**st.before, **extra}.items():
                if self.accelerator.is_main_process:
                    self.folder.log({"step": 0, "split": split, **metrics, **self._took(split)})
                self.accelerator.log({f"{split}/{k}": v for k, v in metrics.items()}, step=0)

    def evaluate_and_track(self) -> bool:
        """Evaluate on validation (never test: it must not steer training), keep the best adapter, log, consult
        the guards; True when training should stop (early stopping or a forgetting breach)."""
        st, tc, main = self.state, self.tc, self.accelerator.is_main_process
        val = self.evaluate(["validation"])["validation"]
        if self.generated is not None and self.recipe.eval.every_eval:
            val.update(self.generated.run(self.model, st.step))
        self.last_validation = (st.step, val)
        row = {**val, **self._took("validation"),
               **st.watch.on_evaluation(val["loss"], st.step, tc.early_stopping_patience)}
        if main:
            self.folder.log({"step": st.step, "split": "validation", **row})
        self.accelerator.log({f"validation/{k}": v for k, v in row.items()}, step=st.step)
        st.best.consider(val["loss"], st.step, self.snapshot, self.objective.selection_key(val),
                         self.objective.selection_noise(val))
        log.info("step %d: validation %s in %.1f s (best %s at step %d)", st.step, val,
                 self.eval_seconds["validation"], self.objective.describe_best(st.best), st.best.step)
        if self.forgetting is not None:
            forgot = self.forgetting.measure(self.model, self.accelerator, st.forgetting.before)
            if main:
                self.folder.log({"step": st.step, "split": "forgetting", **forgot})
            self.accelerator.log({f"forgetting/{k}": v for k, v in forgot.items()}, step=st.step)
            breach = self.forgetting.judge(forgot, st.step, st.forgetting, st.best, self.snapshot)
            if breach is not None:
                self.state.stopped = breach
                log.warning(breach)
                return True
        return st.best.patience_exhausted(tc.early_stopping_patience)

    # =================================================================================================== train
    def micro_batches(self):
        """The training batches from where the state says the run is, epoch after epoch."""
        st = self.state
        while True:
            self.train_loader.set_epoch(st.epoch)  # accelerate re-sets the sampler's epoch from this on __iter__
            self.sampler.set_epoch(st.epoch)
            if self.augmenter:
                self.augmenter.epoch = st.epoch
            if self.streaming:
                loader = self.train_loader.from_position(st.position)
            else:
                loader = self.accelerator.skip_first_batches(self.train_loader, st.position) if st.position \
                    else self.train_loader
            for batch in loader:
                st.position += 1
                yield batch
            st.epoch, st.position = st.epoch + 1, 0

    def train_step(self, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One optimizer step over ``grad_accum`` micro-batches: (summed loss, global items, gradient norm).

        The items of the whole global batch are counted before the first backward, so each micro-batch's loss
        is divided by the global count (token-weighted, however the batch is split over steps and processes).
        """
        acc = self.accelerator
        # An online objective (GRPO) samples from the current model first: its items are known only after that.
        batches = [self.objective.rollout(self.model, b, self.state.step) for b in batches]
        # An objective with several loss terms (ORPO: pairs and NLL tokens) returns one count and one sum per term.
        local = torch.stack([self.objective.items(b) for b in batches]).sum(0)
        n_items = acc.reduce(local, "sum").clamp(min=1)
        loss_sum = torch.zeros(n_items.shape, device=acc.device)
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            with nullcontext() if sync else acc.no_sync(self.model):
                loss = self.objective.loss(self.model, batch)
                acc.backward((loss * self.loss_scale / n_items).sum())  # see loss_scale
            loss_sum += loss.detach()
            self.meter.count(self.objective.tokens(batch), self.objective.head_positions(batch))
        norm = acc.clip_grad_norm_(self.params, self.tc.max_grad_norm) if self.tc.max_grad_norm else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, n_items, norm

    def train(self) -> None:
        """Steps until ``total_steps`` or a stop; evaluates, checkpoints and answers signals between steps."""
        st, tc, acc = self.state, self.tc, self.accelerator
        stream = self.micro_batches()
        alpha = self.objective.neftune_alpha(self.recipe.data.augment)
        neftune = activate_neftune(self.unwrapped, alpha) if alpha else None
        untrim = release_freed_memory(self.unwrapped) if tc.trim_cpu_memory and acc.device.type == "cpu" else None
        self.meter = ThroughputMeter(self.unwrapped, acc.device, self.info["compute_dtype"])
        self.first_bad = torch.zeros((), dtype=torch.long, device=acc.device)  # first non-finite step, 0: none
        if self._rng is not None:  # last, so nothing between restore and the first step draws numbers
            ckpt.set_rng_state(self._rng, acc.process_index)
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=st.step, disable=not acc.is_main_process, desc="training",
                   dynamic_ncols=True)
        # A signal is answered after the current step, with a checkpoint (_answer_signal_or_checkpoint).
        with self.signals.phase("the current training step", immediate=False), bar:  # bar: errors on a clean line
            while st.step < self.total_steps and self.state.stopped is None:
                t0 = time.perf_counter()
                if change := self.freeze.apply(st.step):
                    log.info("freeze schedule: %s", change)
                    if acc.is_main_process:
                        self.folder.log({"step": st.step, "freeze": change})
                loss_sum, n_items, norm = self.train_step([next(stream) for _ in range(tc.grad_accum)])
                st.step += 1
                bar.update(1)
                self.first_bad.masked_fill_((self.first_bad == 0) & ~torch.isfinite(loss_sum).all(), st.step)  # no sync
                self.meter.seconds += time.perf_counter() - t0  # excludes evaluation and checkpointing
                if st.step % tc.log_every == 0 or st.step == self.total_steps:
                    self._log_step(loss_sum, n_items, norm, bar)
                self._maybe_evaluate()
                self._answer_signal_or_checkpoint()
        self.check_finite()  # before the final evaluation and save
        for hook in (neftune.remove if neftune else None, untrim):
            if hook is not None:
                hook()
        if self.validating and self.state.stopped is None:
            with self.signals.phase(FINAL_EVALUATION):
                self.evaluate_and_track()

    def _log_step(self, loss_sum: torch.Tensor, n_items: torch.Tensor, norm: torch.Tensor | None, bar) -> None:
        """The step's loss (a host sync: only at logging steps), learning rate, gradient norm and throughput."""
        self.check_finite()
        st, acc = self.state, self.accelerator
        loss = (acc.reduce(loss_sum, "sum") / n_items).sum().item()
        row = {"step": st.step, "epoch": st.epoch_progress(len(self.train_loader)), "loss": loss,
               "lr": self.scheduler.get_last_lr()[0], **self.meter.row(acc.num_processes)}
        if norm is not None:
            row["grad_norm"] = float(norm)
        st.watch.record(loss)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", mfu=f"{row['mfu']:.0%}")
        acc.log({k: v for k, v in row.items() if k != "step"}, step=st.step)  # the trackers' own step axis
        if acc.is_main_process:
            self.folder.log(row)

    def _maybe_evaluate(self) -> None:
        """Validation every ``eval_every`` steps, or at the end of each epoch when that is unset (the last step is
        evaluated after the loop)."""
        st, tc = self.state, self.tc
        finished = st.epoch + (st.position == len(self.train_loader))  # epochs completed so far
        epoch_done = tc.eval_every is None and finished > st.evaluated_epoch
        st.evaluated_epoch = finished
        due = (tc.eval_every and st.step % tc.eval_every == 0) or epoch_done
        if self.validating and st.step < self.total_steps and due and self.evaluate_and_track() \
                and self.state.stopped is None:
            self.state.stopped = (f"early stopping at step {st.step}: validation loss did not improve for "
                            f"{tc.early_stopping_patience} evaluations")
            log.info(self.state.stopped)

    def _answer_signal_or_checkpoint(self) -> None:
        """One checkpoint on a ``checkpoint_every`` step or a signal (one save, even for both); after a signal,
        stop with the command that continues."""
        st, acc = self.state, self.accelerator
        signum = requested(self.signals, acc)  # collective: every process gets the same answer
        saved = None
        if signum or (self.tc.checkpoint_every and st.step % self.tc.checkpoint_every == 0):
            self.check_finite()
            saved = self.save_checkpoint()
        if signum:
            acc.wait_for_everyone()
            raise TrainingInterrupted(
                f"interrupted at step {st.step}/{self.total_steps}; checkpoint saved to {saved}; continue with: "
                f"lora-ft train RECIPE --resume latest (output_dir {self.folder.path})", signum)

    def save_checkpoint(self) -> Path | None:
        """Every process calls this: each one's RNG state is gathered (each draws its own dropout masks), then the
        main process writes; returns the folder there (None elsewhere)."""
        acc = self.accelerator
        rngs = gather_object([ckpt.rng_state()]) if acc.num_processes > 1 else [ckpt.rng_state()]
        if not acc.is_main_process:
            return None
        saved = {**self.state.to_checkpoint(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": rngs,
                 **({"stream": self.train_loader.state()} if self.streaming else {})}
        path = ckpt.save_checkpoint(self.folder.checkpoints, self.state.step, self.unwrapped, saved,
                                    self.tc.keep_checkpoints, self.recipe.dump())
        self.folder.drop_aside()  # --overwrite: the new run has saved something of its own
        return path

    def check_finite(self) -> None:
        """Raise if any process saw a NaN/inf loss. Called where a host sync happens anyway (logging) and before
        every save, so no checkpoint holds weights a non-finite step has touched."""
        bad = self.accelerator.gather(self.first_bad[None])
        bad = bad[bad > 0]
        if not bad.numel():
            return
        at = int(bad.min())
        # The weights saved at step at-1 are the ones that gave the non-finite loss: not a good checkpoint.
        good = [c for c in ckpt.list_checkpoints(self.folder.checkpoints) if int(c.name.split("-")[1]) <= at - 2]
        raise NonFiniteLoss(
            f"loss became non-finite at step {at}; lower train.lr, or use compute_dtype bf16/fp32 instead of fp16; "
            f"nothing from that step on was saved (last good checkpoint: {good[-1] if good else 'none'}"
            + (f"; continue with --resume {good[-1].name} --set train.lr=..." if good else "") + ")")

    # ================================================================================================== finish
    def finish(self) -> dict[str, Any]:
        """The best adapter back in place → evaluated on every split → saved with the reports."""
        st, acc = self.state, self.accelerator
        best = st.best
        if best.weights is not None and best.step != st.step:
            self.final_weights = self.snapshot()  # for a checkpoint of the last step, should a signal come
            restore_adapter(acc, self.model, self.unwrapped, best.weights)
            log.info("restored the best adapter (step %d)", best.step)
        with self.signals.phase(FINAL_EVALUATION):
            # The validation result of the best step is reused when it is the current model: no second pass.
            current = self.last_validation is not None and self.last_validation[0] == st.step and best.step == st.step
            reuse = {"validation": self.last_validation[1]} if current else {}
            after = {**self.evaluate([n for n in self.eval_loaders if n not in reuse]), **reuse}
            after = {n: after[n] for n in self.eval_loaders}
            if self.generated is not None:  # the best adapter's answers (reused when generated at that step)
                after["validation"] = {**after["validation"], **self.generated.after(self.model, best.step or st.step,
                                                                                     st)}
            results: dict[str, Any] = {"before": st.before, "after": after}
            if self.forgetting is not None:  # not a split: the model against its own base on general text
                results["forgetting"] = {"before": st.forgetting.before, "after": self.forgetting.measure(
                    self.model, acc, st.forgetting.before)}
        self.info.update(best_step=best.step or st.step, steps_done=st.step, stopped=self.state.stopped,
                         objective=self.objective.learned(),
                         generation=self.generated.settings() if self.generated is not None else None)
        # Once, at the end: the planner's prediction for this run beside what it really took.
        self.info["memory"] = peak_memory(self.recipe, acc.device, self.session.loaded.source,
                                          self.session.data.splits.get("train"),
                                          longest_sequence(self.recipe, self.session), attended_pairs_of(self.session))
        acc.log({**self.info["memory"], **final_metrics(results)}, step=st.step)
        with self.signals.phase("the final save", immediate=False):  # a signal waits until all is written
            save_adapter(acc, self.unwrapped, self.folder.adapter, self.session.loaded.tokenizer)  # every process
            acc.wait_for_everyone()
            if acc.is_main_process:
                self.folder.drop_aside()
                self._write_reports(results, after, best.step != st.step)
        acc.end_training()
        if self.signals.pending:
            raise TrainingInterrupted(f"interrupted during the final save, which was completed first: the run is "
                                      f"complete (adapter and reports in {self.folder.path}); nothing to continue",
                                      self.signals.pending)
        return results

    def _close(self) -> None:
        """On every exit: an old run set aside by ``--overwrite`` comes back if this run saved nothing of its own;
        the run lock is released."""
        if self.lock is not None:
            try:
                self.folder.restore_aside()
            finally:
                self.lock.release()
                self.lock = None

    def _write_reports(self, results: dict[str, Any], after: dict[str, Any], restored: bool) -> None:
        final = {**after, **({"forgetting": results["forgetting"]["after"]} if "forgetting" in results else {})}
        for split, metrics in final.items():
            if split != "validation" or restored:  # else already logged at this step
                self.folder.log({"step": self.state.step, "split": split, "final": True, **metrics,
                                 **self._took(split)})
        self.folder.write_json(RESULTS, results)
        self.folder.write_json(RUN_INFO, self.info)
        plot_curves(self.folder.metrics, self.folder / CURVES)
        if self.generated is not None:
            self.generated.write(self.folder, results, self.state.step)
        log.info("after training: %s", after)


def train(recipe: Recipe, resume: str | None = None, overwrite: bool = False,
          group: str | None = None) -> dict[str, Any]:
    """Run a recipe end to end; return ``eval_results`` (also written to ``output_dir``). ``group``: see
    ``Trainer``."""
    return Trainer(recipe, resume, overwrite, group).run()
