"""One `lorafa bench` worker: build a model, make it trainable by one method, and measure one training job.

The parent runs each `Job` in a fresh process (`python -m lorafa.bench --worker JOB`), which calls
`worker_main`; it prints one line, `RESULT_PREFIX` + the JSON result of `run_job`, on stdout.

Per worker: the model is built from the same seed, a fixed random batch is drawn, and one training step
(forward, backward, optimizer step) runs under `lorafa.memory.SavedTensorTracker` (saved-for-backward bytes);
then `warmup` untimed and `steps` timed steps (median step time, tokens/s); then, on CPU, one step under the
PyTorch profiler's allocation events (peak live tensor bytes, independent of the allocator). The process peak
RSS (`getrusage`, its high-water mark reset once the model is set up) is read before that profiled step, and on
CUDA `max_memory_allocated` is the peak of live tensors.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, cast

import torch
from torch import nn

from lorafa.bench_models import METHODS, MODELS
from lorafa.bench_settings import Job
from lorafa.models import enable_activation_checkpointing, position_limit

__all__ = ["RESULT_PREFIX", "run_job", "worker_main"]

RESULT_PREFIX = "LORAFA_BENCH_RESULT "
"""Marks the result line on a worker's stdout (libraries may print other lines)."""

LossFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _make_batch(task: str, model: nn.Module, job: Job, device: torch.device) -> dict[str, Any]:
    """A fixed random batch: token ids over the whole vocabulary (and labels) drawn from `job.seed`."""
    config: Any = model.config
    limit = position_limit(config)
    if task != "seq2seq" and limit is not None and job.seq > limit:
        raise ValueError(f"--seq {job.seq} exceeds {job.model}'s {limit} positions (max_position_embeddings)")
    gen = torch.Generator().manual_seed(job.seed)
    ids = torch.randint(0, config.vocab_size, (job.batch, job.seq), generator=gen)
    if task == "causal-lm":
        batch: dict[str, Any] = {"input_ids": ids, "labels": ids.clone(), "use_cache": False}
    elif task == "classification":
        batch = {"input_ids": ids, "labels": torch.randint(0, 2, (job.batch,), generator=gen)}
    else:
        labels = torch.randint(0, config.vocab_size, (job.batch, job.seq), generator=gen)
        batch = {"input_ids": ids, "labels": labels, "use_cache": False}
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _adapted_names(model: nn.Module, r: int, heads: list[str]) -> list[str]:
    """Full names of the modules lorafa adapts by default (all block linears), to give PEFT the same targets."""
    from lorafa.config import LoRAFAConfig
    from lorafa.targets import resolve_targets

    return resolve_targets(model, LoRAFAConfig(r=r, modules_to_save=heads or None))


def _prepare(
    model: nn.Module, task: str, job: Job, notes: list[str]
) -> tuple[nn.Module, torch.optim.Optimizer | None, LossFn]:
    """Make `model` trainable by `job.method`; return (model to run, optimizer or None, loss function)."""
    from lorafa.heads import classification_head_names

    method, p = job.method, job.dropout or 0.0
    heads = classification_head_names(model)  # e.g. ["classifier"]: trained and saved along with adapters

    def model_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss  # type: ignore[no-any-return]

    loss_fn: LossFn = model_loss
    if method == "full":
        model.requires_grad_(True)
    elif method == "floor":
        # Nothing trains, but backward runs from the embedding output on: every frozen layer keeps what it needs
        # to pass gradients back, as it would with adapters somewhere below it. This is what adapters can't beat.
        model.requires_grad_(False)
        word = cast(Any, model).get_input_embeddings().weight
        for module in model.modules():
            # T5's encoder and decoder each have their own embedding module sharing this weight.
            if isinstance(module, nn.Embedding) and module.weight is word:
                module.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    elif method.startswith("peft-"):
        from peft import LoraConfig, get_peft_model

        targets = _adapted_names(model, job.r, heads)
        if method == "peft-lora-ckpt":
            enable_activation_checkpointing(model)
        cfg = LoraConfig(
            r=job.r,
            lora_alpha=job.lora_alpha,  # type: ignore[arg-type]  # PEFT annotates int, computes in float
            lora_dropout=p,
            target_modules=targets,
            modules_to_save=heads or None,
        )
        model = get_peft_model(model, cfg)  # type: ignore[arg-type]
    else:
        from lorafa.config import LoRAFAConfig
        from lorafa.inject import add_lorafa

        cfg_fa = LoRAFAConfig(
            r=job.r,
            lora_alpha=job.lora_alpha,
            lora_dropout=p,
            method="lora" if method in ("lora", "lora-ckpt") else "lora-fa",
            projection=method == "lora-fa-proj",
            share_a=method == "lora-fa-shared",
            modules_to_save=heads or None,
            init_seed=job.seed,
        )
        add_lorafa(model, cfg_fa)
        if method in ("lora-fa-ckpt", "lora-ckpt"):
            enable_activation_checkpointing(model)
        if method in ("lora-fa-lean", "lora-fa-recompute"):
            from lorafa.recompute import enable_cheap_recompute

            notes.append(f"cheap recompute wrapped {enable_cheap_recompute(model)} modules")
        if method in ("lora-fa-lean", "lora-fa-chunked"):
            if task == "causal-lm":
                from lorafa.loss import chunked_causal_lm_loss

                def chunked_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
                    return chunked_causal_lm_loss(model, batch)

                loss_fn = chunked_loss
            else:
                notes.append(f"chunked loss n/a for {task} (causal LMs only)")

    optimizer: torch.optim.Optimizer | None = None
    trainable = [q for q in model.parameters() if q.requires_grad]
    if method == "peft-lora-fa":
        from peft.optimizers import create_lorafa_optimizer

        # Freezes lora_A and projects B's gradient (PEFT's LoraFAOptimizer), with AdamW's defaults otherwise.
        optimizer = create_lorafa_optimizer(model, r=job.r, lora_alpha=job.lora_alpha, lr=job.lr)  # type: ignore[arg-type]
    elif trainable:
        optimizer = torch.optim.AdamW(trainable, lr=job.lr)
    return model, optimizer, loss_fn


def _current_rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux `clear_refs` 5) to its current RSS; False if impossible.

    Loading or initialising a model has its own transient peak (a random init of T5-small alone outgrows a small
    training step), the same for every method; resetting after setup makes the peak the training step's.
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _live_tensor_bytes(device: torch.device) -> int:
    """Bytes of unique storages of all tensors Python can reach on `device` (weights, grads, optimizer states)."""
    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated module proxies warns
        for obj in gc.get_objects():
            try:
                if (
                    isinstance(obj, torch.Tensor)
                    and obj.device.type == device.type
                    and obj.layout == torch.strided
                ):
                    storage = obj.untyped_storage()
                    seen[storage._cdata] = storage.nbytes()
            except Exception:  # tensor subclasses without storage, half-built objects
                continue
    return sum(seen.values())


def _profiled_peak_live(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak bytes of live tensors during `step()`: those alive before it plus the peak of its allocations.

    On CPU there is no allocator counter, so the allocation and free events of the PyTorch profiler
    (`profile_memory=True`) are summed in time order. Frees of tensors allocated before the step are not reported
    by the profiler (PyTorch warns about them), so the result can only overestimate; after `zero_grad(set_to_none)`
    almost nothing allocated earlier is freed during a step.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:
        return None
    baseline = _live_tensor_bytes(device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        pass  # the first profiler session of a process has a one-time setup cost; keep it out of the step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == device.type:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return baseline + peak


def run_job(job: Job) -> dict[str, Any]:
    """Measure one (model, method, dropout) in this process and return its metrics.

    The benchmark calls this in a fresh worker process per job; calling it in-process is for tests, where the
    process-wide numbers (peak RSS) mean little.
    """
    from transformers.utils import logging as hf_logging

    from lorafa.memory import SavedTensorTracker

    hf_logging.set_verbosity_error()  # "newly initialized classifier" etc.: expected here
    if job.threads:
        torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job.dtype]
    spec = MODELS[job.model]
    notes: list[str] = []

    torch.manual_seed(job.seed)
    t0 = time.perf_counter()
    with device:  # random-init models are created directly on the device
        model = spec.build(dtype)
    model.to(device).train()  # loaded ones may come on the CPU
    model, optimizer, loss_fn = _prepare(model, spec.task, job, notes)
    batch = _make_batch(spec.task, model, job, device)
    setup_s = time.perf_counter() - t0
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    total = sum(q.numel() for q in {id(q): q for q in model.parameters()}.values())
    rss_setup, setup_peak_rss = _current_rss(), _peak_rss()
    if not _reset_peak_rss():
        notes.append("peak RSS includes model loading (could not reset the high-water mark)")
    is_cuda = device.type == "cuda"

    def step() -> None:
        loss = loss_fn(batch)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        if is_cuda:
            torch.cuda.synchronize(device)

    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with SavedTensorTracker(model) as tracker:
        loss = loss_fn(batch)
    saved, by_category = tracker.total_bytes, tracker.by_category()
    del tracker
    loss.backward()
    first_loss = float(loss.detach().float().item())
    del loss
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)

    for _ in range(job.warmup):
        step()
    times = []
    for _ in range(job.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)

    peak_rss = _peak_rss()  # before the profiled step, whose bookkeeping is not part of training
    cuda_peak = int(torch.cuda.max_memory_allocated(device)) if is_cuda else None
    live: int | None = cuda_peak
    if not is_cuda and job.profile_live:
        try:
            live = _profiled_peak_live(step, device)
        except Exception as e:  # the profiler's event tree is not a stable API; the other numbers still stand
            notes.append(f"peak live tensors unavailable: {type(e).__name__}: {e}")

    return {
        **asdict(job),
        "status": "ok",
        "label": METHODS[job.method].label,
        "trainable_params": trainable,
        "total_params": total,
        "saved_bytes": saved,
        "saved_by_category": by_category,
        "peak_rss_bytes": peak_rss,
        "rss_after_setup_bytes": rss_setup,
        "setup_peak_rss_bytes": setup_peak_rss,
        "cuda_peak_allocated_bytes": cuda_peak,
        "peak_live_bytes": live,
        "step_s": step_s,
        "step_times_s": times,
        "tokens_per_s": job.batch * job.seq / step_s,
        "setup_s": setup_s,
        "first_loss": first_loss,
        "threads": torch.get_num_threads(),
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
        "notes": notes,
    }


def worker_main(job_json: str) -> int:
    """Run one job given as JSON (`python -m lorafa.bench --worker JOB`); print its result line. Returns 0, or 1
    if the job failed (the error is then the result)."""
    job = Job(**json.loads(job_json))
    try:
        result = run_job(job)
        code = 0
    except Exception as e:  # reported to the parent as a row, so one failing method doesn't stop the run
        result = {**asdict(job), "status": "error", "error": f"{type(e).__name__}: {e}"}
        traceback.print_exc()
        code = 1
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return code
