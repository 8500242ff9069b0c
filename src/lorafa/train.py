"""The training loop of `lorafa train`: one explicit loop on Hugging Face Accelerate, read top to bottom in `train`.

Accelerate provides device placement, mixed precision and distribution (DDP under `accelerate launch` / `torchrun`;
FSDP and DeepSpeed through `accelerate config`). Everything else is spelled out here: the data order (a seeded
permutation per epoch, so a checkpoint only needs the epoch and the batch position), gradient accumulation,
clipping, the schedule, evaluation, logging and checkpoints (`lorafa.checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lorafa.adapter import save_adapter
from lorafa.checkpoint import (
    TrainState,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_rng_state,
    prune_checkpoints,
    read_state,
    save_checkpoint,
)
from lorafa.data import PreparedData, build_datasets, example_lengths, make_collator, same_data_file
from lorafa.data_files import one_line
from lorafa.evaluate import base_model_path, count_targets, evaluate, rows, write_labels
from lorafa.files import atomic_write, readable
from lorafa.gradient_init import gradient_init_budget, init_a_from_gradients
from lorafa.inject import trainable_parameters
from lorafa.layer import DATA_INITS
from lorafa.models import (
    LossModel,
    check_positions,
    check_token_ids,
    is_rotary,
    load_model,
    load_tokenizer,
    position_limit,
    prepare_model,
    remote_code,
)
from lorafa.run_folder import (
    TrainLog,
    check_output_dir,
    clear_outputs,
    plot_losses,
    read_metrics,
    run_of_checkpoint,
)
from lorafa.train_config import TOKEN_TASKS, TrainConfig, config_from_dict

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; raised before the optimizer step, so the weights are the last good ones."""


def train(cfg: TrainConfig) -> dict[str, float]:
    """Fine-tune `cfg.model` on `cfg.data` and write the outputs to `cfg.output_dir`.

    Outputs: adapter/ (PEFT format, or the full model via save_pretrained for method full), labels.json
    (classification), metrics.json, train_log.jsonl, config.yaml, loss.png, and checkpoints/ when
    checkpoint_every > 0.

    Args:
        cfg: A validated training configuration.

    Returns:
        The final metrics (also written to metrics.json).

    Raises:
        TrainingDiverged: the loss became NaN/inf (the last checkpoint, if any, is kept).
        FileNotFoundError / ValueError: bad data, model or resume folder.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # Accelerate runs several processes on CPU (gloo) only when told to; torchrun alone sets just WORLD_SIZE.
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # Accelerate keeps one global state per process and refuses a second mixed_precision; a single-process
        # caller (a notebook, the tests) may train several configs in a row, so start from a clean state.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu_ddp)
    refuse_cpu_fp16(cfg, accelerator.device.type)
    check_distributed(accelerator, cfg)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    out = Path(cfg.output_dir).expanduser()
    checkpoint = find_checkpoint(cfg.resume) if cfg.resume else None
    check_before_loading(cfg, out, checkpoint, warn=main)  # a folder this run may not write ends it now
    set_seed(cfg.seed)

    # ---- data, model, optimizer, schedule
    tokenizer, data, model = load_inputs(cfg)
    collator = make_collator(cfg.task, tokenizer)
    model = prepare_model(
        model, cfg.method, cfg.task, cfg.adapter, cfg.gradient_checkpointing, cfg.cheap_recompute
    )
    lengths = example_lengths(data.train, cfg.task) if cfg.group_by_length else None

    def batches_of(epoch: int) -> list[list[int]]:
        return epoch_batches(len(data.train), cfg.batch_size, epoch, cfg.seed, rank, world, lengths)

    first_epoch = batches_of(0)
    chunked = use_chunked_loss(cfg)
    if chunked:
        model.to(accelerator.device)
        sample = {k: v.to(accelerator.device) for k, v in collator(rows(data.train, first_epoch[0])).items()}
        chunked = confirm_chunked_loss(cfg, model, sample)
    extra_metrics: dict[str, float] = {}
    statistic = cfg.adapter.init_lora_weights
    if cfg.method != "full" and statistic in DATA_INITS and checkpoint is None:
        # A from the first training batches' gradient or inputs (lorafa.gradient_init); a resumed run loads its A.
        init_started = time.perf_counter()
        model.to(accelerator.device)
        n_init = cfg.adapter.init_batches
        first = first_epoch[:n_init]
        kept = init_a_from_gradients(
            model,
            ({k: v.to(accelerator.device) for k, v in collator(rows(data.train, i)).items()} for i in first),
            LossModel(model, cfg.task, chunked),
            (lambda t: accelerator.reduce(t, reduction="sum")) if world > 1 else None,
            gradient_init_budget(accelerator.device),
            statistic,
        )
        share = "a_gradient_share" if statistic == "gradient" else "a_input_share"
        extra_metrics[share] = sum(kept.values()) / len(kept)  # a random A keeps about r/d_in
        extra_metrics["a_init_s"] = time.perf_counter() - init_started  # not part of train_runtime_s
    trainable, total = trainable_parameters(model)
    optimizer = make_optimizer(model, cfg)
    batches_per_epoch = len(first_epoch)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    trainee, optimizer = accelerator.prepare(LossModel(model, cfg.task, chunked), optimizer)
    eval_batch_size = cfg.eval_batch_size or 2 * cfg.batch_size

    def run_eval() -> dict[str, float]:
        return evaluate(
            model,
            data.eval,
            cfg.task,
            collator,
            eval_batch_size,
            accelerator,
            tokenizer,
            cfg.exact_match_samples,
        )

    # ---- outputs, or the state to resume from
    log = TrainLog(out / "train_log.jsonl", main, tensorboard=cfg.tensorboard)
    state = TrainState()
    if checkpoint is not None:
        check_resumable(cfg, checkpoint, world, total_steps)
        state = load_checkpoint(checkpoint, model, cfg.method == "full", optimizer, scheduler)
        _follow_this_schedule(optimizer, scheduler, cfg.lr)
        source = run_of_checkpoint(checkpoint)
        if main and source != out.resolve():
            # Resumed into another folder: its earlier outputs go (checked above), and the log starts with the
            # source run's records up to the checkpoint, so that the new folder holds one run's history.
            out.mkdir(parents=True, exist_ok=True)
            clear_outputs(out)
            log.reset()
            if source is not None and (source / "train_log.jsonl").is_file():
                shutil.copyfile(source / "train_log.jsonl", out / "train_log.jsonl")
        log.truncate_after(state.step)
    else:
        if main:
            out.mkdir(parents=True, exist_ok=True)
            clear_outputs(out)  # a mix of this run's files and an earlier run's would be read as one run
            log.reset()
        if cfg.eval_before and data.eval is not None:
            state.initial_metrics = run_eval()
            log.write({"step": 0, **state.initial_metrics})
    if main:
        out.mkdir(parents=True, exist_ok=True)
        # Without resume: the file repeats the run (a resumed run's checkpoint is in train_log / its folder).
        (out / "config.yaml").write_text(replace(cfg.with_absolute_paths(), resume=None).to_yaml())
        if data.label_names is not None:
            write_labels(out, data.label_names)
    if checkpoint is not None:
        load_rng_state(checkpoint, rank)  # last, so nothing above consumes the restored random numbers
    accelerator.wait_for_everyone()

    # ---- the loop: one iteration = one optimizer step over grad_accum micro-batches
    progress = _progress_bar(total_steps, state.step, main and cfg.progress_bar)
    params = [p for p in model.parameters() if p.requires_grad]
    if checkpoint is not None and state.step >= total_steps and (out / "metrics.json").is_file():
        logger.warning("%s already reached step %d of %d: nothing to train; metrics.json kept", checkpoint,
                       state.step, total_steps)  # fmt: skip
        return read_metrics(out / "metrics.json")
    started = time.perf_counter()
    tokens_before = state.tokens_seen
    step_time, tokens_since_log, time_since_log = 0.0, 0, 0.0
    losses_since_log: list[float] = []
    metrics: dict[str, float] = {}
    batches, batches_epoch = first_epoch, 0
    while state.step < total_steps:
        if batches_epoch != state.epoch:
            batches, batches_epoch = batches_of(state.epoch), state.epoch
        group = batches[state.batch_in_epoch : state.batch_in_epoch + cfg.grad_accum]
        t0 = time.perf_counter()
        trainee.train()
        loss_sum = torch.zeros((), device=accelerator.device)
        host_batches = [collator(rows(data.train, indices)) for indices in group]
        # Each micro-batch's loss is a mean over its targets (tokens, or examples); weighting it by its share of
        # the step's targets (over all processes: DDP then averages the processes' gradients) makes the step's
        # loss and gradient those of one batch of the whole global group.
        counts = target_counts(host_batches, cfg.task)
        step_targets = float(sum(counts))
        if world > 1:
            step_targets = float(accelerator.reduce(torch.tensor(step_targets, device=accelerator.device), "sum"))
        weights = (
            [world * c / step_targets for c in counts] if step_targets > 0 else [1.0 / len(counts)] * len(counts)
        )
        tokens = 0
        for i, host_batch in enumerate(host_batches):
            # Counted on the host: no device sync per micro-batch.
            tokens += (
                int(host_batch["attention_mask"].sum())
                if "attention_mask" in host_batch
                else host_batch["input_ids"].numel()
            )
            batch = {k: v.to(accelerator.device) for k, v in host_batch.items()}
            # Gradients are all-reduced only on the group's last backward.
            sync = accelerator.no_sync(trainee) if i < len(group) - 1 else nullcontext()
            with sync:
                loss = trainee(batch)
                accelerator.backward(loss * weights[i])
            loss_sum += loss.detach().float() * weights[i]
        # One all-reduce gives every process the step's mean loss and the input tokens of all processes.
        stats = torch.stack(
            [
                loss_sum.double(),
                torch.tensor(float(tokens), dtype=torch.float64, device=loss_sum.device),
            ]
        )
        stats = accelerator.reduce(stats, reduction="sum")
        step_loss, tokens = float(stats[0]) / world, int(stats[1])
        if not math.isfinite(step_loss):
            raise TrainingDiverged(_diverged_message(step_loss, state, out, cfg.mixed_precision == "fp16"))
        grad_norm = None
        if cfg.max_grad_norm:
            norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)  # None under DeepSpeed (it clips)
            grad_norm = float(norm) if norm is not None else None
        lr = optimizer.param_groups[0]["lr"]  # the lr this step uses (the scheduler moves on below)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skips steps with inf gradients
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        state.step += 1
        state.batch_in_epoch += len(group)
        if state.batch_in_epoch >= len(batches):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        elapsed = time.perf_counter() - t0
        step_time += elapsed
        time_since_log += elapsed
        tokens_since_log += tokens
        losses_since_log.append(step_loss)
        state.tokens_seen += tokens

        # ---- logging, evaluation, checkpoints
        peak = peak_memory_bytes(accelerator.device)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", mem=_gib(peak), refresh=False)
        progress.update(1)
        if state.step % cfg.logging_every == 0 or state.step == total_steps:
            tokens_per_s = tokens_since_log / max(time_since_log, 1e-9)
            progress.set_postfix(
                loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", mem=_gib(peak)
            )
            # The mean over the steps since the last record: one step's loss is too noisy to plot.
            mean_loss = sum(losses_since_log) / len(losses_since_log)
            record = {"step": state.step, "epoch": state.epoch, "loss": mean_loss, "lr": lr}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            log.write({**record, "tokens_per_s": tokens_per_s, "peak_memory_bytes": peak})
            tokens_since_log, time_since_log, losses_since_log = 0, 0.0, []
        if (
            cfg.eval_every
            and state.step % cfg.eval_every == 0
            and state.step < total_steps
            and data.eval is not None
        ):
            log.write({"step": state.step, **run_eval()})
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            folder = out / "checkpoints" / f"checkpoint-{state.step}"
            # Paths absolute: a resume from another working folder compares the same files.
            extra = {"total_steps": total_steps, "config": cfg.with_absolute_paths().to_dict(), "processes": world}
            save_checkpoint(
                folder, model, cfg.method == "full", optimizer, scheduler, state, rank, main,
                accelerator.wait_for_everyone, extra=extra,
            )  # fmt: skip
            if main:
                prune_checkpoints(out, cfg.keep_checkpoints)
    progress.close()
    runtime = time.perf_counter() - started

    # ---- outputs and final evaluation (the weights first: an evaluation that fails must not lose the training)
    if main:
        save_trained(model, cfg, out / "adapter", tokenizer)
        if data.label_names is not None and cfg.method != "full":
            write_labels(out / "adapter", data.label_names)  # the class names travel with a copied adapter
    if data.eval is not None:
        metrics = run_eval()
        log.write({"step": state.step, **metrics})
    peak = int(
        accelerator.reduce(
            torch.tensor(peak_memory_bytes(accelerator.device), device=accelerator.device), "max"
        )
    )
    metrics.update(
        {f"initial_{k}": v for k, v in state.initial_metrics.items() if k != "eval_samples"},
    )
    metrics.update(
        {
            "train_runtime_s": runtime,
            "tokens_per_s": (state.tokens_seen - tokens_before)
            / max(step_time, 1e-9),  # this process's steps
            "peak_memory_bytes": int(peak),
            "trainable_params": int(trainable),
            "total_params": int(total),
            "train_samples": len(data.train),
            "steps": state.step,
            **extra_metrics,
        }
    )
    if main:
        text = json.dumps(metrics, indent=2) + "\n"
        atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(text))
        plot_losses(out / "train_log.jsonl", out / "loss.png")
    log.close()
    accelerator.wait_for_everyone()
    return metrics


# ------------------------------------------------------------------------------------------------ helpers


def check_distributed(accelerator: Any, cfg: TrainConfig) -> None:
    """Refuse the Accelerate set-ups this loop would get wrong, before any work is done.

    Saving and checkpointing read the parameters directly, which parameter sharding (FSDP, DeepSpeed ZeRO-3)
    splits across processes; and DeepSpeed steps its optimizer inside backward, so the loop's own gradient
    accumulation would step it every micro-batch. DDP (any number of processes and GPUs) and ZeRO-1/2 without
    accumulation are fine.
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        raise ValueError(
            "FSDP is not supported by lorafa train yet (the adapter is saved from unsharded parameters); "
            "use DDP (`accelerate launch --multi_gpu` or torchrun), which keeps a full copy per GPU"
        )
    if kind == DistributedType.DEEPSPEED:
        stage = getattr(accelerator.state.deepspeed_plugin, "zero_stage", None)
        if stage is not None and stage >= 3:
            raise ValueError(
                "DeepSpeed ZeRO-3 is not supported by lorafa train yet; use ZeRO stage 1 or 2, or DDP"
            )
        if cfg.grad_accum > 1:
            raise ValueError(
                "grad_accum > 1 is not supported under DeepSpeed (it accumulates itself); set grad_accum=1"
            )


def refuse_cpu_fp16(cfg: TrainConfig, device_type: str) -> None:
    """ValueError for fp16 mixed precision on CPU: Accelerate has no fp16 autocast there and would train in fp32."""
    if cfg.mixed_precision == "fp16" and device_type == "cpu":
        raise ValueError("mixed_precision: fp16 does nothing on CPU (it would train in fp32); use bf16 or no")


def check_before_loading(cfg: TrainConfig, out: Path, checkpoint: Path | None, warn: bool = True) -> None:
    """What train and dry_run refuse before loading anything (an output folder this run may not write, a missing
    tensorboard), and, with `warn`, an eval file that is the train file."""
    check_output_dir(out, checkpoint)
    check_tensorboard(cfg)
    if warn and cfg.data.eval_file is not None and same_data_file(cfg.data.train_file, cfg.data.eval_file):
        logger.warning("data.eval_file is data.train_file (%s): the evaluation is on training rows",
                       cfg.data.eval_file)  # fmt: skip


def load_inputs(cfg: TrainConfig) -> tuple[Any, PreparedData, nn.Module]:
    """The run's tokenizer, data and model (a checkpoint's own code runs as cfg.trust_remote_code says), checked
    against each other (`check_data_fits`)."""
    with remote_code(cfg.trust_remote_code):
        tokenizer = load_tokenizer(cfg.model)
        data = build_datasets(cfg.data, tokenizer, cfg.task)
        model = load_model(
            cfg.model, cfg.task, data.num_labels, data.id2label, cfg.model_dtype, tokenizer.pad_token_id
        )
    check_data_fits(cfg, model, data, tokenizer)
    return tokenizer, data, model


def check_data_fits(cfg: TrainConfig, model: nn.Module, data: PreparedData, tokenizer: Any) -> None:
    """What train and dry_run check once model and data are loaded: token ids inside the embedding table, inputs
    within the model's positions (`lorafa.models`); a warning when eval_every has no eval data."""
    check_token_ids(model, [data.train, data.eval], tokenizer)
    check_positions(model, [data.train, data.eval], cfg.task)
    if data.eval is None and cfg.eval_every > 0:
        logger.warning("eval_every=%d: there is no eval data (no eval_file, eval_split 0), so nothing is "
                       "evaluated", cfg.eval_every)  # fmt: skip


def use_chunked_loss(cfg: TrainConfig) -> bool:
    """chunked_loss as set, or (None) on for sft/clm when `lorafa.loss` is installed."""
    if cfg.chunked_loss is not None:
        if cfg.chunked_loss and not _has_module("lorafa.loss"):
            raise ValueError("chunked_loss: lorafa.loss is not available in this installation")
        return cfg.chunked_loss
    return cfg.task in ("sft", "clm") and _has_module("lorafa.loss")


def confirm_chunked_loss(cfg: TrainConfig, model: nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """Whether to train with the chunked loss, after checking on `batch` that it equals the model's own loss.

    Off, with a warning, when it does not and chunked_loss was left to its default; an error when it was asked for.
    """
    from lorafa.loss import chunked_loss_mismatch

    problem = chunked_loss_mismatch(model, batch)
    if problem is None:
        return True
    if cfg.chunked_loss:
        raise ValueError(f"chunked_loss: {problem}; set chunked_loss=false")
    logger.warning("chunked_loss off (the model's own loss is used): %s", problem)
    return False


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# group_by_length sorts by length within windows of this many global batches (then shuffles the batches): wide
# enough that a batch's lengths are close, narrow enough that a window is still a random sample of the data.
LENGTH_WINDOW = 50


def epoch_batches(
    n: int,
    batch_size: int,
    epoch: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    lengths: Sequence[int] | None = None,
) -> list[list[int]]:
    """This process's batches (lists of example indices) for one epoch.

    The order is a permutation drawn from its own generator seeded by (seed, epoch), so it never touches the
    global RNG and a resumed run can recompute it. Global batch i holds examples [i·b·w, (i+1)·b·w) of the
    permutation and process r takes its r-th slice of b; so w processes with batch b see exactly the examples a
    single process with batch b·w sees. With w > 1 the permutation is padded by wrapping around to a multiple of
    w (as torch's DistributedSampler does), so every process runs the same number of batches.

    With `lengths` (tokens per example: group_by_length), each window of LENGTH_WINDOW global batches of the
    permutation is sorted longest first before it is cut into batches, so a batch pads little; then the batches
    are shuffled by the same generator, except that the one holding the longest example goes first (an
    out-of-memory shows at step 1, not hours in).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen).tolist()
    if world > 1 and n % world:
        order += order[: world - n % world]
    per_step = batch_size * world
    if lengths is not None:
        if len(lengths) != n:
            raise ValueError(f"epoch_batches: {len(lengths)} lengths for {n} examples")
        window = per_step * LENGTH_WINDOW
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda i: -lengths[i])  # stable: ties keep order
        ]
    chunks = [order[start : start + per_step] for start in range(0, len(order), per_step)]
    if lengths is not None and len(chunks) > 1:
        longest = max(range(len(chunks)), key=lambda c: max(lengths[i] for i in chunks[c]))
        rest = [c for c in range(len(chunks)) if c != longest]
        shuffled = [rest[j] for j in torch.randperm(len(rest), generator=gen).tolist()]
        chunks = [chunks[longest]] + [chunks[c] for c in shuffled]
    batches = []
    for chunk in chunks:
        share = len(chunk) // world
        batches.append(chunk[rank * share : (rank + 1) * share])
    return batches


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay on matrices only (not biases or norm scales)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (check method and adapter.target_modules)")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    """Linear warm-up, then linear or cosine decay to 0 at `total_steps` (or constant).

    Warm-up lasts W = warmup_steps or floor(warmup_ratio · total_steps) steps; step k = 1..W uses k/(W+1) of the
    peak lr, so no step runs at lr 0 (Hugging Face's schedules start at 0 and take ceil for the ratio). Decay then
    runs over the remaining steps; step k > W uses 1 − (k−1−W)/(total−W) of the peak (linear).
    """
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    if warmup >= total_steps:
        logger.warning(
            "warmup_steps=%d >= the run's %d steps: the lr never reaches its peak (the last step uses %.2g of it)",
            warmup, total_steps, total_steps / (warmup + 1),
        )  # fmt: skip

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA peak allocated bytes on GPU, else this process's peak RSS."""
    try:
        from lorafa.memory import peak_memory_bytes as measure
    except ImportError:
        import resource
        import sys

        if device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(device))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux
    return measure(device)


def _follow_this_schedule(optimizer: torch.optim.Optimizer, scheduler: Any, lr: float) -> None:
    """After a resume, the lr of this run's config and schedule at the checkpoint's step.

    The optimizer's and scheduler's saved states carry the old run's peak lr (and its schedule's last value, 0 at
    the end of a finished run); with unchanged settings this recomputes exactly the same value.
    """
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    lrs = [lr * fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for group, value in zip(optimizer.param_groups, lrs, strict=True):
        group["initial_lr"], group["lr"] = lr, value
    scheduler._last_lr = lrs


def target_counts(batches: list[dict[str, torch.Tensor]], task: str) -> list[int]:
    """What each micro-batch's loss averages over: label tokens for sft/clm/seq2seq (as the loss counts them),
    examples for classification/regression."""
    return [
        count_targets(b["labels"], task) if task in TOKEN_TASKS else int(b["labels"].shape[0]) for b in batches
    ]


# data fields that leave the training examples and their order alone: a resumed run may change them.
_RESUMABLE_DATA_CHANGES = ("max_eval_samples", "cache_dir")


def check_resumable(
    cfg: TrainConfig, checkpoint: Path, processes: int | None = 1, total_steps: int | None = None
) -> None:
    """Refuse to resume a checkpoint of another model, task, method, adapter or data, or with another batch_size,
    group_by_length, seed or number of processes (the data position is counted in per-process batches of a
    seeded order, so those would repeat or skip examples); the rest (lr, schedule, steps, grad_accum,
    data.max_eval_samples, data.cache_dir, ...) may change. A checkpoint past this run's `total_steps` is refused.

    Local paths compare as absolute paths (`runs/x/` and `./runs/x` are one folder)."""
    state, raw = read_state(checkpoint)
    saved = raw.get("config") or {}
    if saved:
        with contextlib.suppress(ValueError):  # an older or foreign config is compared as it is
            saved = config_from_dict(saved).with_absolute_paths().to_dict()
    now = cfg.with_absolute_paths().to_dict()
    differ: list[str] = []
    for key in ("model", "task", "method", "adapter", "data", "batch_size", "group_by_length", "seed"):
        if key not in saved:
            continue
        old, new = saved[key], now[key]
        if isinstance(old, dict) and isinstance(new, dict):
            ignored = _RESUMABLE_DATA_CHANGES if key == "data" else ()
            changed = [k for k in sorted(set(old) | set(new)) if k not in ignored and old.get(k) != new.get(k)]
            differ += [f"{key}.{k} ({old.get(k)!r}, now {new.get(k)!r})" for k in changed]
        elif old != new:
            differ.append(f"{key} ({old!r}, now {new!r})")
    if differ:
        raise ValueError(f"resume: {checkpoint} was trained with a different {', '.join(differ)}")
    if total_steps is not None and state.step > total_steps:
        raise ValueError(
            f"resume: {checkpoint} is at step {state.step}, past this run's {total_steps} steps (max_steps, or "
            f"epochs × steps per epoch); set max_steps above {state.step} to train on, or resume an earlier checkpoint"
        )
    if processes is not None and raw.get("processes", processes) != processes:
        raise ValueError(
            f"resume: {checkpoint} was trained by {raw['processes']} processes, now {processes}: its data "
            "position counts per-process batches"
        )


def save_trained(model: nn.Module, cfg: TrainConfig, folder: Path, tokenizer: Any) -> None:
    """adapter/: the adapter (PEFT format) or, for method full, the model and tokenizer via save_pretrained."""
    if cfg.method != "full":
        save_adapter(model, folder, base_model_name_or_path=base_model_path(cfg.model))
        return
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    cast(Any, model).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    readable(tmp)  # safetensors writes its files 0600
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def check_tensorboard(cfg: TrainConfig) -> None:
    if cfg.tensorboard and not _has_module("tensorboard"):
        raise ValueError("tensorboard: true needs the tensorboard package (pip install tensorboard)")


def _diverged_message(loss: float, state: TrainState, out: Path, fp16: bool) -> str:
    found = list_checkpoints(out)
    where = (
        f"the last good checkpoint is {found[-1]}; continue from it with resume={found[-1]}"
        if found
        else "no checkpoint was written (set checkpoint_every to keep resumable checkpoints)"
    )
    where = where[0].upper() + where[1:]  # it starts a sentence
    return (
        f"the training loss became {loss} at step {state.step + 1} (epoch {state.epoch}); stopped before the "
        f"optimizer step, so no weights were updated with it. {where}. Try a lower lr or max_grad_norm"
        + (", or mixed_precision=bf16 instead of fp16." if fp16 else ".")
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}GiB"


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True
    )


def describe_data(data: PreparedData) -> str:
    """One line about the prepared data, for dry runs and logs."""
    n_eval = len(data.eval) if data.eval is not None else 0
    labels = f", {data.num_labels} labels {data.label_names}" if data.label_names else ""
    return f"{len(data.train)} training examples, {n_eval} eval examples{labels}"


def dry_run(cfg: TrainConfig) -> dict[str, Any]:
    """Load the data and the model as `train` would, without training; report what the run would do.

    Returns:
        trainable_params, total_params, train_samples, eval_samples, steps (optimizer steps), data (a summary).
    """
    refuse_cpu_fp16(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = find_checkpoint(cfg.resume) if cfg.resume else None
    check_before_loading(cfg, Path(cfg.output_dir).expanduser(), checkpoint)
    tokenizer, data, model = load_inputs(cfg)
    model = prepare_model(
        model, cfg.method, cfg.task, cfg.adapter, cfg.gradient_checkpointing, cfg.cheap_recompute
    )
    trainable, total = trainable_parameters(model)
    batches = len(epoch_batches(len(data.train), cfg.batch_size, 0, cfg.seed))  # grouping keeps the count
    steps = cfg.max_steps or cfg.epochs * math.ceil(batches / cfg.grad_accum)
    if checkpoint is not None:  # the process count is the launcher's, which a dry run does not know
        check_resumable(cfg, checkpoint, processes=None, total_steps=steps)
    report: dict[str, Any] = {
        "trainable_params": trainable,
        "total_params": total,
        "train_samples": len(data.train),
        "eval_samples": len(data.eval) if data.eval is not None else 0,
        "steps": steps,
        "data": describe_data(data),
    }
    report["memory"] = memory_estimate(cfg, data.num_labels)
    return report


def memory_estimate(cfg: TrainConfig, num_labels: int | None = None) -> str:
    """One line from the memory planner (`lorafa.planner`) for this run at batch_size × the longest sequence.

    Sequences are padded per batch, so real batches are often shorter than max_length and need less. The planner
    runs the model on the meta device in one dtype (the autocast dtype under mixed precision), so weights kept in
    fp32 under autocast are counted at that dtype (the line says so).
    """
    try:
        from lorafa.planner import PlannerArgs, format_bytes, run_planner
    except ImportError:
        return "unavailable (lorafa.planner is not installed)"
    from lorafa.assets import resolve

    folder = Path(resolve(cfg.model)).expanduser()
    if not (folder / "config.json").is_file():
        return f"unavailable (the planner needs a local model folder, not {cfg.model!r})"
    from transformers import AutoConfig

    seq = cfg.data.block_size if cfg.task == "clm" else cfg.data.max_length
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    except (ValueError, OSError) as e:
        return f"unavailable ({one_line(e)})"
    positions = position_limit(config)
    if positions is not None and not is_rotary(config):
        seq = min(seq, positions)  # longer inputs are refused (check_positions); rotary models run them
    tm = cfg.adapter.target_modules
    args = PlannerArgs(
        config=str(folder),
        batch_size=cfg.batch_size,
        seq_len=seq,
        target_len=cfg.data.max_target_length or cfg.data.max_length,
        dtype={"no": cfg.model_dtype, "bf16": "bfloat16", "fp16": "float16"}[cfg.mixed_precision],
        r=cfg.adapter.r,
        lora_alpha=cfg.adapter.lora_alpha,
        lora_dropout=cfg.adapter.lora_dropout,
        target_modules=tm,
        exclude_modules=cfg.adapter.exclude_modules,
        methods=[cfg.method],
        checkpointing="on" if cfg.gradient_checkpointing else "off",
        device="cuda" if torch.cuda.is_available() else "cpu",
        task={"sft": "causal-lm", "clm": "causal-lm", "seq2seq": "seq2seq"}.get(cfg.task, "seq-cls"),
        num_labels=num_labels or 2,
        chunked_loss=use_chunked_loss(cfg),
        cheap_recompute=cfg.cheap_recompute,
        # BART-style decoders read their inputs' values to build masks, which the meta device cannot; eager
        # attention avoids that path (T5 runs either way).
        attention="eager" if cfg.task == "seq2seq" and config.model_type != "t5" else "sdpa-flash",
    )
    try:
        entry = run_planner(args)["methods"][0]
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        return f"unavailable ({e})"
    return (
        f"{format_bytes(entry['total'])} at batch {cfg.batch_size} × {seq} tokens "
        f"(weights {format_bytes(entry['weights'])}, gradients + optimizer "
        f"{format_bytes(entry['grads'] + entry['optimizer_states'] + entry['master_weights'])}, "
        f"activations {format_bytes(entry['activations'])}; lorafa.planner, {args.dtype} on {args.device}"
        + (f", fp32 weights counted as {args.dtype}" if cfg.mixed_precision != "no" else "")
        + ")"
    )
