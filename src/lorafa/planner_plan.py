"""The plan: `run_planner` measures every requested method × checkpointing for `PlannerArgs` and returns the
JSON-ready report (static memory from `lorafa.memory.static_memory`, activations from `planner_measure`), with the
largest batch or sequence length that fits a memory budget (`largest_fitting`) and the report's notes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorafa.memory import static_memory
from lorafa.models import is_rotary, position_limit
from lorafa.planner_args import PlannerArgs, _alpha, parse_dtype, parse_size
from lorafa.planner_measure import Activations, measure_activations
from lorafa.planner_models import (
    _hf_model,
    adapter_config,
    build_model,
    load_config,
    make_batch,
    prepare_method,
    resolve_task,
)
from lorafa.recompute import enable_cheap_recompute
from lorafa.targets import resolve_targets

__all__ = ["largest_fitting", "run_planner"]


def largest_fitting(fits: Callable[[int], bool], upper: int, guess: int | None = None) -> int:
    """The largest n in [1, upper] with fits(n), for a monotone `fits` (True up to some n, then False); 0 if none.

    Doubling then bisection: about 2·log2(n) calls of `fits`. A `guess` of the answer is checked first (fits(guess)
    and not fits(guess + 1): two calls); a wrong guess only narrows the search.
    """
    if upper < 1 or not fits(1):
        return 0
    lo, hi = 1, 2  # fits(lo) is known True; hi is the next candidate
    if guess is not None and 1 <= guess <= upper:
        if not fits(guess):
            return _bisect(fits, 1, guess)
        if guess == upper or not fits(guess + 1):
            return guess
        lo, hi = guess + 1, 2 * (guess + 1)
    while hi <= upper and fits(hi):
        lo, hi = hi, hi * 2
    return _bisect(fits, lo, min(hi, upper + 1))  # fits(hi) is False, or hi is past the bound


def _bisect(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest n in [lo, hi) with fits(n), given fits(lo) and not fits(hi) (or hi past the bound)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _entry(method: str, checkpointing: bool, model: nn.Module, args: PlannerArgs, acts: Activations) -> dict:
    st = static_memory(model, args.optimizer, args.mixed_precision)
    return {
        "method": method,
        "checkpointing": checkpointing,
        "trainable_params": st.trainable_params,
        "total_params": st.total_params,
        "weights": st.weights,
        "weights_by_dtype": st.weights_by_dtype,
        "grads": st.grads,
        "optimizer_states": st.optimizer,
        "master_weights": st.master_weights,
        "activations": acts.total,
        "activations_saved": acts.saved,
        "activations_recompute": acts.recompute,
        "activations_by_category": acts.by_category,
        "activations_offloaded": acts.offloaded,
        "activations_transient": acts.transient,
        "total": st.total + acts.total,
    }


def run_planner(args: PlannerArgs) -> dict[str, Any]:
    """Plan the training memory of every requested method for `args`.

    Returns:
        A JSON-ready dict: "model", "model_type", "task", "settings", "methods" (one entry per method ×
        checkpointing with trainable_params, weights, grads, optimizer_states, master_weights, activations (=
        activations_saved + activations_recompute, and activations_by_category) and total, in bytes, plus
        "max_batch_size" or "max_seq_len" with a gpu_memory budget), "gpu_memory" (the budget less the reserve),
        "search" and "notes".

    Raises:
        ValueError, FileNotFoundError: invalid arguments (naming the flag).
    """
    args.validate()
    dtype = parse_dtype(args.dtype)
    config = load_config(args)
    task = resolve_task(config, args.task)
    limit = position_limit(config)
    # (Rotary models run past their max_position_embeddings, as training then does; learned tables cannot.)
    if task != "seq2seq" and limit is not None and args.seq_len > limit and not is_rotary(config):
        raise ValueError(
            f"--seq-len {args.seq_len} exceeds the model's {limit} positions (max_position_embeddings)"
        )
    if args.chunked_loss and task != "causal-lm":
        raise ValueError(
            f"--chunked-loss: the chunked loss is for causal LMs; this plan's task is {task!r} "
            f"(model_type {config.model_type!r})"
        )
    if task == "seq-cls":
        config.num_labels = args.num_labels
    budget = None
    if args.gpu_memory is not None:
        budget = parse_size(args.gpu_memory) - parse_size(args.reserve, "--reserve")
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    key = "max_batch_size" if args.search == "batch" else "max_seq_len"

    options = _options(args)
    entries = []
    for method in args.methods:
        model = prepare_method(build_model(config, task, dtype, args.attention), args, method, task)
        if args.cheap_recompute:
            enable_cheap_recompute(model)  # after the adapters, which manage their own saved tensors
        hf: Any = _hf_model(model)
        head = hf.get_output_embeddings() if args.chunked_loss else None
        if args.chunked_loss and not isinstance(head, nn.Linear):
            raise ValueError(f"--chunked-loss needs an nn.Linear output head, got {type(head).__name__}")
        batch = make_batch(
            config, task, args.batch_size, args.seq_len, args.target_len or args.seq_len, "meta"
        )
        plain = measure_activations(model, batch, args.attention, False, None, args.device, **options)
        for ckpt in ckpts:
            acts = (
                measure_activations(model, batch, args.attention, True, plain, args.device, **options)
                if ckpt
                else plain
            )
            entry = _entry(method, ckpt, model, args, acts)
            if budget is not None:
                entry[key] = _search(model, ckpt, args, config, task, budget)
            entries.append(entry)

    return {
        "model": args.preset or str(args.config),
        "model_type": config.model_type,
        "task": task,
        "settings": {
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "target_len": (args.target_len or args.seq_len) if task == "seq2seq" else None,
            "dtype": str(dtype).removeprefix("torch."),
            "r": args.r,
            "lora_alpha": _alpha(args),
            "lora_dropout": args.lora_dropout,
            "target_modules": _target_names(args, config, task, dtype),
            "attention": args.attention,
            "device": args.device,
            "optimizer": args.optimizer,
            "mixed_precision": args.mixed_precision,
            "chunked_loss": args.chunked_loss,
            "cheap_recompute": args.cheap_recompute,
            "offload": args.offload,
            "offload_min_bytes": options["offload_min_bytes"],
        },
        "gpu_memory": budget,
        "search": args.search if budget is not None else None,
        "methods": entries,
        "notes": _notes(args),
    }


def _options(args: PlannerArgs) -> dict[str, Any]:
    """measure_activations' keyword options for `args` (offloading only on a GPU, as the library)."""
    on_gpu = args.offload and args.device == "cuda"
    return {
        "chunked_loss": args.chunked_loss,
        "offload_min_bytes": parse_size(args.offload_min_bytes, "--offload-min-bytes", bare=1) if on_gpu else None,
    }


def _target_names(args: PlannerArgs, config: Any, task: str, dtype: torch.dtype) -> list[str]:
    """The distinct last names of the adapted modules, e.g. ["q_proj", "v_proj"] ([] for full only)."""
    if all(m == "full" for m in args.methods):
        return []
    model = build_model(config, task, dtype, args.attention)
    return sorted({n.split(".")[-1] for n in resolve_targets(model, adapter_config(args, "lora"))})


def _search(model: nn.Module, ckpt: bool, args: PlannerArgs, config: Any, task: str, budget: int) -> int:
    static = static_memory(model, args.optimizer, args.mixed_precision).total
    options = _options(args)
    cache: dict[int, int] = {}

    def total(n: int) -> int:
        if n not in cache:
            if args.search == "batch":
                b, t, tt = n, args.seq_len, args.target_len or args.seq_len
            else:
                b, t, tt = args.batch_size, n, args.target_len or n
            batch = make_batch(config, task, b, t, tt, "meta")
            acts = measure_activations(model, batch, args.attention, ckpt, device=args.device, **options)
            cache[n] = static + acts.total
        return cache[n]

    def fits(n: int) -> bool:
        return total(n) <= budget

    upper = args.max_search
    guess = None
    if args.search == "seq":
        upper = min(upper, position_limit(config) or upper)
    elif upper >= 2 and fits(1):
        # Saved activations grow linearly with the batch: the line through batches 1 and 2 predicts the edge,
        # which largest_fitting then checks by measuring it (and one more).
        slope = total(2) - total(1)
        guess = upper if slope <= 0 else max(1, min(upper, 1 + (budget - total(1)) // slope))
    return largest_fitting(fits, upper, guess)


def _notes(args: PlannerArgs) -> list[str]:
    notes = [
        "activations = tensors autograd saves for backward (unique storages, measured by a meta-device forward "
        "+ loss); transient buffers (logits before the loss, gradient temporaries, CUDA context, allocator "
        "fragmentation) are not included: keep some headroom or use --reserve.",
        "lora-fa keeps only u = A·dropout(x) (…, r) per adapted layer; lorafa's lora also keeps x (for A's "
        "gradient) but no dropout mask or dropped copy; peft-lora is a real PEFT model on meta (keeps x, the "
        "dropout output and its mask, in the adapters' fp32 when the model is half precision).",
    ]
    if args.attention == "sdpa-flash":
        notes.append(
            "attention sdpa-flash: GPU FlashAttention/memory-efficient SDPA keeps q, k, v, output and an fp32 "
            "log-sum-exp per query and head (and an additive mask such as T5's position bias), not the T×T "
            "probabilities; use --attention eager for eager attention (keeps probabilities and dropout mask)."
        )
        if args.device == "cpu":
            notes.append(
                "device cpu: SDPA with attention dropout runs its math path, which keeps the T×T probabilities "
                "and dropout noise like eager attention; it is planned so."
            )
    else:
        notes.append("attention eager: keeps the T×T attention probabilities (and their dropout mask).")
    if args.device == "cuda":
        notes.append(
            "device cuda: each dropout keeps a bool mask (CUDA's fused dropout), 1 byte per element."
        )
    else:
        notes.append("device cpu: each dropout keeps its scaled noise in the input's dtype (CPU's dropout).")
    if args.checkpointing != "off":
        notes.append(
            "checkpointing (non-reentrant): activations = what the forward keeps (layer inputs and the parts "
            "outside the layers) + the largest layer's activations, re-created once during backward."
        )
    if args.chunked_loss:
        notes.append(
            "chunked loss: keeps dh (tokens × d), plus dW for a trainable head, instead of fp32 (tokens × vocab) "
            "log-probabilities; one chunk of logits at a time is transient (lorafa.loss.default_chunk_size)."
        )
    if args.cheap_recompute:
        notes.append(
            "cheap recompute: norms, activations, gated products and dropout masks are recomputed in backward "
            "from their inputs (one module's local graph at a time, not counted)."
        )
    if args.offload and args.device == "cuda":
        notes.append(
            f"offload: saved tensors of at least {args.offload_min_bytes} (dense, not parameters) wait in pinned "
            "host memory (activations_offloaded); activations include a transient, the largest layer's "
            "offloaded bytes, copied back during backward. Not included: copies in flight when the forward "
            "outruns the host link."
        )
    elif args.offload:
        notes.append("offload: a no-op with --device cpu (offload_activations only moves CUDA tensors).")
    if args.optimizer == "adamw":
        notes.append(
            "AdamW: two moments per trainable parameter"
            + (
                " in fp32, plus fp32 master copies of trainable fp16/bf16 parameters."
                if args.mixed_precision
                else " in the parameter's dtype (plain torch.optim.AdamW)."
            )
        )
    return notes
