"""Building a run's pieces: the Accelerator, the data loaders, and tokenizer → objective → data → model → adapters.

Shared by training (``trainer.py``), evaluation of a saved run, merging and the planner's measurements
(``measure.py``), so that every command loads a model exactly the way training did.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs
from peft import PeftModel
from torch.utils.data import DataLoader

from ..data.augment import Augmenter
from ..data.batching import LengthGroupedBatches, lengths_of
from ..data.packing import PackedBatches
from ..data.prepare import TaskData, prepare_data
from ..data.streaming import TrainStream, open_train
from ..errors import RunError
from ..lock import RunLock
from ..memory.activations import attended_pairs
from ..memory.launch import resolve_trim
from ..modeling.adapters import attach_adapters, attach_start_adapter, load_adapter
from ..modeling.loading import LoadedModel, check_max_length, load_config, load_model, load_tokenizer, resolve_source
from ..modeling.precision import resolve_compute_dtype
from ..objectives import Objective, objective_for
from ..recipe import Recipe
from ..recipe.defaults import DataFacts, resolve_training
from ..run import RunFolder
from .report import available_trackers

log = logging.getLogger(__name__)


def make_accelerator(recipe: Recipe) -> tuple[Accelerator, str]:
    cuda = torch.cuda.is_available()
    compute = resolve_compute_dtype(recipe.model, cuda).dtype
    precision = {"bf16": "bf16", "fp16": "fp16"}.get(compute, "no")
    # On a machine without GPUs, accelerate forms a (gloo) process group only when told it runs on the CPU:
    # otherwise every process that torchrun / `accelerate launch --multi_gpu` starts trains alone, and all of
    # them write the same files.
    cpu = torch.distributed.is_available() and torch.distributed.is_torchelastic_launched() and not cuda
    # gradient_accumulation_steps stays 1: the loop accumulates itself, with token-weighted normalisation.
    # A freezing schedule leaves some adapters without gradients for a while; DDP must be told to expect that.
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if recipe.freeze.strategy != "none" else []
    _fresh_state_for(precision)
    accelerator = Accelerator(mixed_precision=precision, log_with=available_trackers(recipe.train.trackers) or None,
                              project_dir=recipe.output_dir, cpu=cpu, kwargs_handlers=ddp)
    if not accelerator.is_main_process:
        # Every process runs the same code: without this each message would appear once per process.
        logging.getLogger("lora_ft").setLevel(logging.WARNING)
    return accelerator, compute


def _fresh_state_for(precision: str) -> None:
    """A run after another in the same single process (a notebook, the Python API, a test session) may train in
    another dtype (``compute_dtype: auto`` is bf16 on some machines, a recipe may pin fp32): accelerate keeps one
    state per process and refuses the change ("restart your runtime"), so that state is started afresh. Never in a
    launched multi-process run, whose processes share the state of their process group."""
    state = AcceleratorState._shared_state
    launched = torch.distributed.is_available() and torch.distributed.is_torchelastic_launched()
    if state and not launched and state.get("_mixed_precision") not in (None, precision):
        AcceleratorState._reset_state(reset_partial_state=True)


def resolve_dtype(recipe: Recipe) -> tuple[Recipe, dict[str, str]]:
    """``model.compute_dtype: auto`` → this machine's choice (``modeling.precision``), and the reason for the record
    in ``run_config.yaml``; a given dtype is kept as it is."""
    if recipe.model.compute_dtype != "auto":
        return recipe, {}
    choice = resolve_compute_dtype(recipe.model, torch.cuda.is_available())
    model = recipe.model.model_copy(update={"compute_dtype": choice.dtype})
    return recipe.model_copy(update={"model": model}), {"model.compute_dtype": choice.reason}


def make_loader(ds, batch_size: int, collate: Callable[[list[dict]], dict], shuffle: bool, seed: int,
                window: int = 0, max_tokens: int | None = None) -> DataLoader:
    """Length-grouped batches of ``ds`` padded by ``collate``; ``window``: batches per length-sorted window when
    shuffling (0: shuffle only); ``max_tokens``: a cap on a padded batch's tokens."""
    sampler = LengthGroupedBatches(lengths_of(ds), batch_size, shuffle, seed, window, max_tokens)
    return _loader(ds, sampler, collate, seed)


def make_packed_loader(ds, capacity: int, rows: int, collate: Callable[[list[dict], int], dict],
                       seed: int) -> DataLoader:
    """Training batches of ``rows`` rows of whole examples packed to ``capacity`` tokens (``data.packing``)."""
    sampler = PackedBatches(lengths_of(ds), capacity, rows, seed)
    return _loader(ds, sampler, partial(collate, capacity=capacity), seed)


def make_train_loader(train, objective: Objective, model: torch.nn.Module, recipe: Recipe, stream: tuple | None = None,
                      accelerator: Accelerator | None = None
                      ) -> tuple[DataLoader | TrainStream, bool, Augmenter | None]:
    """The training loader: packed rows where ``data.packing`` allows it for this model, else length-grouped
    examples (augmented where the recipe asks); under ``data.streaming`` the ``stream`` (``TaskData.stream``) as a
    ``TrainStream`` batching for ``accelerator``'s process. Returns (loader, packing, augmenter); the loop sets the
    augmenter's epoch."""
    tc, d = recipe.train, recipe.data
    packing = objective.use_packing(d.packing, model)
    augmenter = objective.token_augmenter(d.augment, tc.seed)
    if stream is not None:
        return make_stream_loader(stream, objective, recipe, packing, augmenter, accelerator), packing, augmenter
    if packing and objective.packs_examples:
        # micro_batch_size examples as unpacked, laid end to end: no padding is left for length grouping to save,
        # so group_by_length auto only shuffles (as the Trainer's default sampler); true still groups.
        collate = partial(objective.collate_packed, capacity=d.max_length, augment=augmenter)
        window = LengthGroupedBatches.window_for(d.group_by_length, 0)
        log.info("packing: each micro-batch's examples laid end to end in rows (no padding between them)")
        return make_loader(train, tc.micro_batch_size, collate, True, tc.seed, window, tc.max_tokens_per_batch), \
            True, augmenter
    if packing:
        rows = tc.rows_per_packed_batch(d.max_length)
        loader = make_packed_loader(train, d.max_length, rows, objective.collate_packed, tc.seed)
        log.info("packing: %d rows of up to %d tokens per micro-batch, filled to %.1f%%", rows, d.max_length,
                 100 * loader.batch_sampler.fill())
        return loader, True, augmenter
    window = LengthGroupedBatches.window_for(d.group_by_length, objective.length_window)
    return make_loader(train, tc.micro_batch_size, partial(objective.collate, augment=augmenter), True, tc.seed,
                       window, tc.max_tokens_per_batch), False, augmenter


def make_stream_loader(stream: tuple, objective: Objective, recipe: Recipe, packing: bool,
                       augmenter: Augmenter | None, accelerator: Accelerator | None = None) -> TrainStream:
    """``data.streaming``'s training batches: packed rows of ``max_length`` (``rows_per_packed_batch`` a
    micro-batch), else ``micro_batch_size`` examples in the stream's order (see ``data.streaming``)."""
    tc, d = recipe.train, recipe.data
    ds, fmt = stream
    if packing:
        collate, capacity, batch = partial(objective.collate_packed, capacity=d.max_length), d.max_length, \
            tc.rows_per_packed_batch(d.max_length)
        log.info("packing (streaming): %d rows of up to %d tokens per micro-batch", batch, d.max_length)
    else:
        collate, capacity, batch = partial(objective.collate, augment=augmenter), None, tc.micro_batch_size
    where = (accelerator.process_index, accelerator.num_processes, accelerator.device) if accelerator else (0, 1, None)
    return TrainStream(ds, objective, fmt, collate, capacity, batch, tc.max_tokens_per_batch, d.shuffle_buffer,
                       tc.seed, *where, source=d.train)


def _packed_rows(recipe: Recipe, session: Session) -> bool:
    """Whether training batches rows packed up to ``max_length`` rather than whole examples."""
    return session.objective.use_packing(recipe.data.packing, session.model) and not session.objective.packs_examples


def longest_sequence(recipe: Recipe, session: Session) -> int:
    """The longest sequence a training micro-batch holds, what the planner plans a step at: ``max_length`` for
    packed rows or a stream (not counted), else the longest prepared example (GRPO: the longest prompt)."""
    stats = session.data.stats.get("train")
    return recipe.data.max_length if stats is None or _packed_rows(recipe, session) else stats["max_tokens"]


def attended_pairs_of(session: Session) -> float | None:
    """``memory.activations.attended_pairs`` of the prepared training examples; None for a stream (not read)."""
    train = session.data.splits.get("train")
    return None if train is None or session.data.stats.get("train") is None else attended_pairs(lengths_of(train))


def resolve_for_data(recipe: Recipe, given: Recipe, session: Session, processes: int,
                     device: str) -> tuple[Recipe, dict[str, str]]:
    """The ``auto`` values that need the prepared data: ``recipe.defaults.resolve_training`` and
    ``memory.launch.resolve_trim`` (at the longest training sequence). ``given``: the recipe as written (whether it
    left the batch to lora_ft). Returns the recipe and the rules that resolved its values."""
    max_length = recipe.data.max_length
    # counted once by prepare_data; a stream (data.streaming) is not counted: train.max_steps sets the run's
    # length, the longest sequence is taken to be max_length, and there are no examples per row to scale lr by.
    counted = session.data.stats.get("train")
    stats = counted or {"examples": 1, "tokens": 1, "max_tokens": max_length}
    # What make_train_loader batches in an epoch: the examples, or about the rows they fill (first-fit packing
    # fills rows to within a few percent).
    rows = _packed_rows(recipe, session)
    units = max(1, math.ceil(stats["tokens"] / max_length)) if rows else stats["examples"]
    batch_auto = given.train.micro_batch_size == "auto" and given.train.global_batch_size is None
    parameters = session.model.get_nb_trainable_parameters()[1]  # peft counts 4-bit weights at their real size
    recipe, rules = resolve_training(recipe, DataFacts(stats["examples"], units, processes, batch_auto, parameters,
                                                         session.data.format,
                                                         packed_rows=rows and counted is not None))
    return resolve_trim(recipe, device, session.loaded.source, longest_sequence(recipe, session),
                        attended_pairs_of(session)), rules


def lock_run(folder: RunFolder, accelerator: Accelerator) -> RunLock | None:
    """The run lock, taken by the main process for the whole run (None on the others); every process learns
    whether it was, so that all of them stop together when another command holds the folder."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = folder.lock().acquire()
            folder.recover_aside()  # an --overwrite that was killed before it saved anything
        except RunError as e:
            error = e
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(torch.tensor(int(error is not None), device=accelerator.device), "max").item()
        error = error or (RunError(f"output_dir {folder.path} is in use (see the main process's message)")
                          if failed else None)
    if error is not None:
        raise error
    return lock


def _loader(ds, sampler, collate: Callable, seed: int) -> DataLoader:
    # A private generator: creating an iterator would otherwise draw from the global RNG, so a resumed run
    # (which creates its iterator after restoring the RNG) would see different dropout masks.
    return DataLoader(ds, batch_sampler=sampler, collate_fn=collate, generator=torch.Generator().manual_seed(seed))


@dataclass
class Session:
    """Everything ``setup`` builds; the rest of a command only reads it."""

    loaded: LoadedModel
    model: PeftModel
    data: TaskData
    objective: Objective


def setup(recipe: Recipe, accelerator: Accelerator, compute: str, adapter_dir: str | None = None,
          extra_splits: dict[str, str] | None = None, id2label: dict[int, str] | None = None) -> Session:
    """Tokenizer → objective → data → model → adapters. Data comes before the model because a classifier's head
    size is the number of labels found in the training split.

    Args:
        recipe: the resolved recipe.
        accelerator: places the model on this process's device.
        compute: the compute dtype (``make_accelerator``).
        adapter_dir: load this trained adapter instead of attaching a fresh one (evaluation of a saved run).
        extra_splits: further splits by name → file (``lora-ft eval --data``).
        id2label: a trained classifier's label set.
    """
    cfg = recipe.model
    with accelerator.main_process_first():  # one rank fetches/converts example or GGUF models
        source = resolve_source(cfg.name)
    # The position limit is in the config: a max_length beyond it fails here, not after the weights are loaded.
    check_max_length(load_config(source, cfg), recipe.data.max_length, cfg.name)
    tokenizer = load_tokenizer(source, cfg)
    objective = objective_for(recipe, tokenizer)
    data = prepare_data(recipe.data, objective, recipe.train.seed, adapter_dir is None, extra_splits, id2label)
    if recipe.data.streaming and adapter_dir is None:  # before the model: a wrong column fails at once
        data.stream = open_train(recipe.data, objective)
        data.format = data.formats["train"] = data.stream[1]
    loaded, model = build_model(recipe, accelerator, compute, source, tokenizer, data.id2label, adapter_dir)
    return Session(loaded, model, data, objective)


def build_model(recipe: Recipe, accelerator: Accelerator, compute: str, source: str, tokenizer,
                id2label: dict[int, str] | None = None,
                adapter_dir: str | None = None) -> tuple[LoadedModel, PeftModel]:
    """The base model on this process's device, quantized as the recipe says, with fresh LoRA adapters (or the
    trained ones in ``adapter_dir``, or trainable from ``lora.init_from``): exactly what ``setup`` trains, also for
    the planner's measurements."""
    cfg = recipe.model
    device = accelerator.device if accelerator.device.type != "cuda" else accelerator.local_process_index
    loaded = load_model(cfg.model_copy(update={"name": source}), compute, device, id2label, tokenizer)
    if adapter_dir is not None:
        return loaded, load_adapter(loaded.model, adapter_dir)
    gc = recipe.train.gradient_checkpointing
    gc = torch.cuda.is_available() if gc == "auto" else gc
    if recipe.lora.init_from:  # continue from a trained adapter (run.adopt_start_adapter resolved the folder)
        return loaded, attach_start_adapter(loaded.model, recipe.lora.init_from, gc)
    return loaded, attach_adapters(loaded.model, recipe.lora, cfg.task, loaded.head_modules, gc,
                                   loaded.weight_files, loaded.token_rows)
