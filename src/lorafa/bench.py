"""`lorafa bench`: memory and speed of LoRA-FA side by side with PEFT LoRA, full fine-tuning and checkpointing.

Every (model, method, LoRA dropout) runs in its own fresh worker process (`python -m lorafa.bench --worker JOB`,
one JSON result on stdout), one after the other, so that one method's allocations cannot hide another's peak and
every method starts from the same empty heap (issue 5). All workers get the same allocator setting: by default
the glibc malloc thresholds `lorafa train` uses on CPU (`lorafa.allocator`), because with glibc's default a freed
large block stays in the heap and peak RSS then measures fragmentation rather than the method (issue 5 measured
one LoRA-FA step at 6.9 GiB by default and 3.9 GiB with `MALLOC_MMAP_THRESHOLD_=65536`).

Per worker: the model is built from the same seed, a fixed random batch is drawn, and one training step
(forward, backward, optimizer step) runs under `lorafa.memory.SavedTensorTracker` (saved-for-backward bytes);
then `warmup` untimed and `steps` timed steps (median step time, tokens/s); then, on CPU, one step under the
PyTorch profiler's allocation events (peak live tensor bytes, independent of the allocator). The process peak
RSS (`getrusage`, its high-water mark reset once the model is set up) is read before that profiled step, and on
CUDA `max_memory_allocated` is the peak of live tensors. The parent pairs every method with PEFT LoRA at the same dropout, writes `BENCHMARKS.md`, a PNG chart
and the raw results as JSON, and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

__all__ = [
    "METHODS",
    "MODELS",
    "BenchSettings",
    "Job",
    "add_bench_subparser",
    "bench_main",
    "checks",
    "run_benchmark",
    "run_job",
]

RESULT_PREFIX = "LORAFA_BENCH_RESULT "
ALLOCATORS = ("lorafa", "glibc", "inherit")
MIB = 2**20


# ---- models ---------------------------------------------------------------------------------------------------
Builder = Callable[[torch.dtype], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it and which loss it trains with."""

    description: str
    """One line for the report."""
    task: str
    """"causal-lm" (labels = input ids, shifted inside the model), "classification" or "seq2seq"."""
    build: Builder
    """Builds the model (weights in the given dtype) on the current default device."""


def _llama(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int) -> Builder:
    def build(dtype: torch.dtype) -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        shape: dict[str, Any] = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter}
        shape |= {"num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv}
        shape |= {"max_position_embeddings": 4096, "attn_implementation": "sdpa"}
        cfg = LlamaConfig(**shape)
        model: nn.Module = LlamaForCausalLM(cfg)
        return model.to(dtype)

    return build


def _t5(vocab: int, d_model: int, d_kv: int, d_ff: int, layers: int, heads: int) -> Builder:
    def build(dtype: torch.dtype) -> nn.Module:
        from transformers import T5Config, T5ForConditionalGeneration

        shape: dict[str, Any] = {"vocab_size": vocab, "d_model": d_model, "d_kv": d_kv, "d_ff": d_ff}
        shape |= {"num_layers": layers, "num_heads": heads, "decoder_start_token_id": 0, "pad_token_id": 0}
        model: nn.Module = T5ForConditionalGeneration(T5Config(feed_forward_proj="relu", **shape))
        return model.to(dtype)

    return build


def _tiny_bert(dtype: torch.dtype) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    shape: dict[str, Any] = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_labels": 2}
    shape |= {"num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128}
    model: nn.Module = BertForSequenceClassification(BertConfig(**shape))
    return model.to(dtype)


def _smollm2(dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from lorafa.assets import smollm2_model_dir

    return AutoModelForCausalLM.from_pretrained(smollm2_model_dir(), dtype=dtype, attn_implementation="sdpa")


def _minilm(dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    from lorafa.assets import minilm_path

    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2, dtype=dtype)


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec("SmolLM2-135M-Instruct (real weights, LLaMA family)", "causal-lm", _smollm2),
    "minilm-l6": ModelSpec("all-MiniLM-L6-v2 (real BERT encoder), 2-class head", "classification", _minilm),
    "t5-small": ModelSpec(
        "T5-small shape, random init (d_model 512, 6+6 layers, 8 heads, d_ff 2048, vocab 32128)",
        "seq2seq",
        _t5(32128, 512, 64, 2048, 6, 8),
    ),
    "llama-core": ModelSpec(
        "the core issue's LLaMA shape, random init (hidden 512, 4 layers, 8 heads, intermediate 1376, vocab 1000)",
        "causal-lm",
        _llama(1000, 512, 1376, 4, 8, 8),
    ),
    "llama-1b": ModelSpec(
        "~1.1B LLaMA shape (TinyLlama's), random init (hidden 2048, 22 layers, 32/4 heads, vocab 32000); for a GPU",
        "causal-lm",
        _llama(32000, 2048, 5632, 22, 32, 4),
    ),
    # Tiny random-init models for smoke tests: seconds per method.
    "tiny-llama": ModelSpec(
        "tiny LLaMA, random init (hidden 64, 2 layers)", "causal-lm", _llama(256, 64, 128, 2, 4, 4)
    ),
    "tiny-bert": ModelSpec(
        "tiny BERT, random init (hidden 64, 2 layers), 2-class head", "classification", _tiny_bert
    ),
    "tiny-t5": ModelSpec(
        "tiny T5, random init (d_model 64, 2+2 layers)", "seq2seq", _t5(256, 64, 16, 128, 2, 4)
    ),
}
"""Models by name. The first four are the issue-5 models; `llama-1b` is for a GPU; `tiny-*` for smoke tests."""

DEFAULT_MODELS = ["smollm2-135m", "minilm-l6", "t5-small", "llama-core"]


# ---- methods --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """A way of fine-tuning, i.e. one row of the table."""

    label: str
    """Name in the report."""
    uses_dropout: bool
    """Whether LoRA dropout applies (full fine-tuning and the floor run once per model)."""


METHODS: dict[str, Method] = {
    "full": Method("full fine-tuning", False),
    "peft-lora": Method("PEFT LoRA", True),
    "peft-lora-fa": Method("PEFT LoRA + create_lorafa_optimizer", True),
    "lora": Method("lorafa LoRA", True),
    "lora-fa": Method("lorafa LoRA-FA", True),
    "lora-fa-proj": Method("lorafa LoRA-FA + projection", True),
    "peft-lora-ckpt": Method("PEFT LoRA + activation checkpointing", True),
    "lora-fa-ckpt": Method("lorafa LoRA-FA + activation checkpointing", True),
    "floor": Method("frozen floor (no adapters)", False),
    "lora-fa-lean": Method("lorafa LoRA-FA + chunked loss + cheap recompute", True),
    "lora-fa-shared": Method("lorafa LoRA-FA + shared A (share_a, opt-in)", True),
    # Not in the default list: the two parts of lora-fa-lean alone, and lorafa's own LoRA with checkpointing.
    "lora-fa-chunked": Method("lorafa LoRA-FA + chunked loss", True),
    "lora-fa-recompute": Method("lorafa LoRA-FA + cheap recompute", True),
    "lora-ckpt": Method("lorafa LoRA + activation checkpointing", True),
}
"""Methods by name. PEFT baselines get exactly the module names lorafa adapts (all linear layers of the blocks)."""

DEFAULT_METHODS = list(METHODS)[:11]  # the issue-5 methods, lora-fa-lean (issue 7) and lora-fa-shared


# ---- settings -------------------------------------------------------------------------------------------------
@dataclass
class BenchSettings:
    """What to run. Invalid values raise ValueError naming the option."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    """Model names (keys of `MODELS`)."""
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    """Method names (keys of `METHODS`)."""
    batch: int = 8
    """Sequences per step."""
    seq: int = 256
    """Tokens per sequence (encoder and decoder length for seq2seq)."""
    steps: int = 5
    """Timed steps per method (the median is reported)."""
    warmup: int = 1
    """Untimed steps after the saved-bytes step and before the timed ones."""
    dropout: list[float] = field(default_factory=lambda: [0.05, 0.0])
    """LoRA dropout values; each adapter method runs once per value."""
    r: int = 16
    """Adapter rank."""
    lora_alpha: float = 32.0
    """Adapter scale numerator (s = lora_alpha / r)."""
    lr: float = 1e-4
    """AdamW learning rate."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu" or "cuda"."""
    dtype: str = "auto"
    """"auto" (float32 on CPU, bfloat16 on CUDA), "float32" or "bfloat16"."""
    allocator: str = "lorafa"
    """Workers' glibc malloc settings: "lorafa" (`lorafa.allocator.malloc_settings()`, what `lorafa train` uses
    on CPU), "glibc" (glibc's defaults: every MALLOC_* variable removed) or "inherit" (this environment)."""
    threads: int | None = None
    """torch threads per worker; None keeps torch's default."""
    repeats: int = 1
    """Runs of each worker, in alternating order; the medians across repeats are reported."""
    timeout: float = 3600.0
    """Seconds before a worker is killed."""
    seed: int = 0
    """Seed for model init, adapter init and the batch."""

    def __post_init__(self) -> None:
        for name, known in (("models", MODELS), ("methods", METHODS)):
            values = getattr(self, name)
            unknown = [v for v in values if v not in known]
            if not values or unknown:
                raise ValueError(
                    f"--{name}: unknown or empty {unknown or values}; choose from {sorted(known)}"
                )
        for name in ("batch", "seq", "steps", "r", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if not self.dropout or any(not 0.0 <= p < 1.0 for p in self.dropout):
            raise ValueError(f"--dropout values must be in [0, 1), got {self.dropout}")
        if self.lora_alpha <= 0 or self.lr <= 0 or self.timeout <= 0:
            raise ValueError("--lora-alpha, --lr and --timeout must be > 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"--allocator must be one of {ALLOCATORS}, got {self.allocator!r}")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self) -> str:
        if self.dtype == "auto":
            return "bfloat16" if self.resolved_device() == "cuda" else "float32"
        return self.dtype


@dataclass
class Job:
    """One worker's task: one (model, method, dropout) measured in a fresh process."""

    model: str
    method: str
    dropout: float | None
    """LoRA dropout; None for methods without adapters."""
    batch: int
    seq: int
    steps: int
    warmup: int
    r: int
    lora_alpha: float
    lr: float
    device: str
    dtype: str
    seed: int = 0
    threads: int | None = None
    profile_live: bool = True
    """Measure peak live tensor bytes with the profiler (CPU; one extra step)."""


# ---- one worker: build, prepare, measure ------------------------------------------------------------------------
LossFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _make_batch(task: str, model: nn.Module, job: Job, device: torch.device) -> dict[str, Any]:
    """A fixed random batch: token ids over the whole vocabulary (and labels) drawn from `job.seed`."""
    config: Any = model.config
    limit = getattr(config, "max_position_embeddings", None)
    if task != "seq2seq" and limit is not None and job.seq > limit:
        raise ValueError(f"--seq {job.seq} exceeds {job.model}'s max_position_embeddings {limit}")
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
    from lorafa.inject import resolve_targets

    return resolve_targets(model, LoRAFAConfig(r=r, modules_to_save=heads or None))


def _enable_checkpointing(model: nn.Module) -> None:
    # Non-reentrant: needs no input that requires grad, and replays the RNG state (LoRA-FA's dropout seeds).
    kwargs, hf = {"use_reentrant": False}, cast(Any, model)
    if hasattr(hf, "activation_checkpointing_enable"):  # the name since transformers 5
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _prepare(
    model: nn.Module, task: str, job: Job, notes: list[str]
) -> tuple[nn.Module, torch.optim.Optimizer | None, LossFn]:
    """Make `model` trainable by `job.method`; return (model to run, optimizer or None, loss function)."""
    from lorafa.inject import classification_head_names

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
            _enable_checkpointing(model)
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
            _enable_checkpointing(model)
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


def _worker_main(job_json: str) -> int:
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


# ---- the parent: spawn workers, aggregate ----------------------------------------------------------------------
def _jobs(settings: BenchSettings) -> list[Job]:
    common: dict[str, Any] = {
        k: getattr(settings, k) for k in ("batch", "seq", "steps", "warmup", "r", "lora_alpha")
    }
    common |= {"lr": settings.lr, "seed": settings.seed, "threads": settings.threads}
    common |= {"device": settings.resolved_device(), "dtype": settings.resolved_dtype()}
    return [
        Job(model=model, method=method, dropout=p, **common)
        for model in settings.models
        for method in settings.methods
        for p in (settings.dropout if METHODS[method].uses_dropout else [None])
    ]


def malloc_env(allocator: str) -> dict[str, str] | None:
    """The MALLOC_* variables workers get for `allocator` ({} = glibc's defaults), or None to inherit."""
    if allocator == "inherit":
        return None
    if allocator == "glibc":
        return {}
    try:
        from lorafa.allocator import malloc_settings
    except ImportError:  # lorafa without the allocator module: its documented core setting
        return {"MALLOC_MMAP_THRESHOLD_": "65536"}
    return malloc_settings()


def _worker_env(settings: BenchSettings) -> dict[str, str]:
    env = dict(os.environ)
    malloc = malloc_env(settings.allocator)
    if malloc is not None:
        env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")} | malloc
    # Workers must import this very lorafa, also when it is run from a source tree that isn't installed.
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _spawn(job: Job, settings: BenchSettings) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "lorafa.bench", "--worker", json.dumps(asdict(job))]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=_worker_env(settings), timeout=settings.timeout
        )
    except subprocess.TimeoutExpired:
        return {**asdict(job), "status": "error", "error": f"timed out after {settings.timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if lines:
        return dict(json.loads(lines[-1][len(RESULT_PREFIX) :]))
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
    return {**asdict(job), "status": "error", "error": f"worker {why}: {tail}"}


_MEDIAN_KEYS = (
    "setup_peak_rss_bytes",
    "saved_bytes",
    "peak_rss_bytes",
    "rss_after_setup_bytes",
    "cuda_peak_allocated_bytes",
    "peak_live_bytes",
    "step_s",
    "setup_s",
)


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the repeats of a job: the median of each metric over the successful repeats."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return runs[-1]
    row = dict(ok[0])
    for key in _MEDIAN_KEYS:
        values = [r[key] for r in ok if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    row["step_times_s"] = [t for r in ok for t in r["step_times_s"]]
    row["peak_rss_bytes"] = int(row["peak_rss_bytes"])
    row["tokens_per_s"] = row["batch"] * row["seq"] / row["step_s"]
    row["repeats"] = len(ok)
    return row


def run_benchmark(
    models: Sequence[str],
    methods: Sequence[str],
    batch: int,
    seq: int,
    steps: int,
    dropout: float | Sequence[float],
    out_dir: str | Path | None,
    *,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Run every (model, method, dropout) in its own worker process and write the report.

    Args:
        models: Names from `MODELS`.
        methods: Names from `METHODS`.
        batch: Sequences per step.
        seq: Tokens per sequence.
        steps: Timed steps per method.
        dropout: LoRA dropout value(s); each adapter method runs once per value.
        out_dir: Folder for `BENCHMARKS.md`, `benchmarks.png` and `benchmarks.json`; None writes nothing.
        command: The command line to print as "reproduce" in the report (default: the equivalent
            `python -m lorafa.bench ...`).
        log: Progress lines (default: stderr).
        **options: Further `BenchSettings` fields (warmup, r, lora_alpha, lr, device, dtype,
            allocator, threads, repeats, timeout, seed).

    Returns:
        One dict per (model, method, dropout), in run order: the job's settings, `status` ("ok" or "error"),
        and for "ok" the metrics (`saved_bytes`, `peak_live_bytes`, `peak_rss_bytes`, `cuda_peak_allocated_bytes`,
        `step_s`, `tokens_per_s`, `trainable_params`, ...) and ratios to PEFT LoRA at the same dropout
        (`vs_peft`: metric name -> this ÷ PEFT LoRA).

    Raises:
        ValueError: An unknown model/method or an invalid setting (the message names the option).
    """
    drop = [float(dropout)] if isinstance(dropout, int | float) else [float(p) for p in dropout]
    settings = BenchSettings(
        models=list(models), methods=list(methods), batch=batch, seq=seq, steps=steps, dropout=drop, **options
    )
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if "smollm2-135m" in settings.models:
        from lorafa.assets import smollm2_model_dir

        smollm2_model_dir()  # convert the GGUF once here, not inside a measured worker
    jobs = _jobs(settings)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = _loadavg()
    runs: list[list[dict[str, Any]]] = [[] for _ in jobs]
    for rep in range(settings.repeats):
        # Alternate the order between repeats, so slow drifts in machine load touch all methods alike.
        order = list(range(len(jobs))) if rep % 2 == 0 else list(reversed(range(len(jobs))))
        for n, i in enumerate(order, 1):
            job = jobs[i]
            t = time.perf_counter()
            result = _spawn(job, settings)
            runs[i].append(result)
            what = f"{job.model} {job.method}" + ("" if job.dropout is None else f" p={job.dropout}")
            status = result["status"] if result["status"] != "ok" else f"{result['step_s']:.3f} s/step"
            say(f"[{rep + 1}.{n}/{len(jobs)}] {what}: {status} ({time.perf_counter() - t:.0f} s)")
    rows = [_aggregate(r) for r in runs]
    _add_ratios(rows)
    meta = _metadata(settings, started, load_start, command or _default_command(settings))
    if out_dir is not None:
        write_report(rows, meta, Path(out_dir))
    return rows


# ---- ratios and acceptance checks -------------------------------------------------------------------------------
RATIO_METRICS = ("saved_bytes", "peak_live_bytes", "peak_rss_bytes", "cuda_peak_allocated_bytes", "step_s")


def _find(rows: list[dict[str, Any]], model: str, method: str, p: float | None) -> dict[str, Any] | None:
    for row in rows:
        same_p = row["dropout"] is None or p is None or row["dropout"] == p
        if row["model"] == model and row["method"] == method and row.get("status") == "ok" and same_p:
            return row
    return None


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """`row["vs_peft"][metric]` = this ÷ PEFT LoRA of the same model at the same dropout (the first dropout
    value for full fine-tuning and the floor)."""
    first_p = next((r["dropout"] for r in rows if r["dropout"] is not None), None)
    for row in rows:
        ref = _find(
            rows, row["model"], "peft-lora", row["dropout"] if row["dropout"] is not None else first_p
        )
        row["vs_peft"] = {}
        if row.get("status") != "ok" or ref is None:
            continue
        for key in RATIO_METRICS:
            if row.get(key) is not None and ref.get(key):
                row["vs_peft"][key] = row[key] / ref[key]


# (issue, metric, numerator, denominator, comparison, target): "method" means that method at LoRA dropout 0.05,
# "method@0" at dropout 0 (full fine-tuning and the floor have no LoRA dropout).
_CHECKS: list[tuple[int, str, str, str, str, float]] = [
    (5, "peak_rss_bytes", "peft-lora", "lora-fa", ">=", 1.6),
    (5, "peak_rss_bytes", "full", "lora-fa", ">=", 1.4),
    (5, "peak_live_bytes", "peft-lora", "lora-fa", ">=", 1.6),
    (5, "peak_live_bytes", "full", "lora-fa", ">=", 1.4),
    (5, "saved_bytes", "lora-fa", "floor", "<=", 1.01),
    (5, "saved_bytes", "lora-fa-shared", "floor", "<=", 1.01),
    (5, "step_s", "lora-fa", "peft-lora", "<=", 1.0),
    (5, "step_s", "lora-fa@0", "peft-lora@0", "<=", 0.9),
    (2, "saved_bytes", "peft-lora", "lora-fa", ">=", 2.0),
    (2, "saved_bytes", "peft-lora-fa", "lora-fa", ">=", 1.5),
    (7, "saved_bytes", "lora-fa-lean", "floor", "<=", 0.7),
    (7, "peak_rss_bytes", "full", "lora-fa-lean", ">=", 1.9),
    (7, "peak_rss_bytes", "peft-lora", "lora-fa-lean", ">=", 2.2),
    (7, "peak_live_bytes", "full", "lora-fa-lean", ">=", 1.9),
    (7, "peak_live_bytes", "peft-lora", "lora-fa-lean", ">=", 2.2),
    (7, "step_s", "lora-fa-lean", "lora-fa", "<=", 1.15),
]
_METRIC_NAMES = {
    "peak_rss_bytes": "peak RSS",
    "peak_live_bytes": "peak live",
    "saved_bytes": "saved",
    "step_s": "step",
}


def _split(spec: str) -> tuple[str, float]:
    method, _, p = spec.partition("@")
    return method, float(p or 0.05)


def checks(rows: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """The acceptance ratios of issues 2, 5 and 7 that `rows` allow for `model` (dropout 0.05 and 0).

    The targets belong to specific workloads (issues 5 and 7: SmolLM2-135M, batch 8 × 256, fp32 CPU; issue 2:
    the LLaMA shape at batch 4 × 256); on other settings they are for reference only. "peak live" rows apply the
    peak-RSS targets to the allocator-independent live-tensor peak.

    Returns:
        Dicts with issue, check, value, target ("≥ 1.6"), passed.
    """
    out = []
    for issue, metric, num_spec, den_spec, op, target in _CHECKS:
        num, den = _find(rows, model, *_split(num_spec)), _find(rows, model, *_split(den_spec))
        if num is None or den is None or not num.get(metric) or not den.get(metric):
            continue
        value = num[metric] / den[metric]
        out.append(
            {
                "issue": issue,
                "check": f"{_METRIC_NAMES[metric]}: {num_spec} ÷ {den_spec}",
                "value": value,
                "target": f"{'≥' if op == '>=' else '≤'} {target:g}",
                "passed": value >= target if op == ">=" else value <= target,
            }
        )
    return out


# ---- report ---------------------------------------------------------------------------------------------------
def _busy(loadavg: str) -> bool:
    """Whether the 1-minute load average exceeds the number of cores: other work competes for the CPUs."""
    try:
        return float(loadavg.split()[0]) > (os.cpu_count() or 1)
    except (ValueError, IndexError):
        return False


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> str:
    try:
        return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        return "RAM n/a"


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


def _default_command(settings: BenchSettings) -> str:
    parts = ["python", "-m", "lorafa.bench", "--models", *settings.models, "--methods", *settings.methods]
    parts += ["--batch", str(settings.batch), "--seq", str(settings.seq), "--steps", str(settings.steps)]
    parts += ["--warmup", str(settings.warmup), "--dropout", *(f"{p:g}" for p in settings.dropout)]
    parts += ["--r", str(settings.r), "--lora-alpha", f"{settings.lora_alpha:g}"]
    parts += ["--device", settings.device, "--dtype", settings.dtype, "--repeats", str(settings.repeats)]
    parts += ["--allocator", settings.allocator]
    if settings.threads:
        parts += ["--threads", str(settings.threads)]
    return shlex.join(parts)


def _metadata(
    settings: BenchSettings, started: datetime.datetime, load_start: str, command: str
) -> dict[str, Any]:
    device = settings.resolved_device()
    if device == "cuda":
        device_line = f"CUDA: {torch.cuda.get_device_name(0)} (peak memory = torch.cuda.max_memory_allocated)"
    else:
        device_line = "CPU only: no CUDA device was available, so CUDA peak memory and bf16 timings are not recorded here"
    malloc = malloc_env(settings.allocator)
    if malloc is None:
        inherited = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
        allocator = f"glibc malloc, environment inherited ({_env_text(inherited)})"
    else:
        allocator = f"glibc malloc with {_env_text(malloc)} in every worker's environment"
        allocator += (
            " (what `lorafa train` uses on CPU, lorafa.allocator)" if settings.allocator == "lorafa" else ""
        )
    return {
        "command": command,
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "machine": f"{_cpu_name()}, {os.cpu_count()} logical cores, {_ram_gib()}, {platform.platform()}",
        "device": device_line,
        "software": f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{_version('transformers')}, peft {_version('peft')}, lorafa {_version('lorafa')}",
        "allocator": allocator,
        "load": f"{load_start} at start, {_loadavg()} at end (1/5/15-min load averages)",
        "busy": _busy(load_start) or _busy(_loadavg()),
        "settings": asdict(settings) | {"device": device, "dtype": settings.resolved_dtype()},
    }


def _env_text(env: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(env.items())) or "no MALLOC_* variables: glibc's defaults"


def _mib(x: float | None) -> str:
    return "–" if x is None else f"{x / MIB:,.1f}"


def _ratio(row: dict[str, Any], key: str) -> str:
    value = row.get("vs_peft", {}).get(key)
    return "–" if value is None else f"{value:.2f}"


def _row_name(row: dict[str, Any]) -> str:
    p = row["dropout"]
    return METHODS[row["method"]].label + ("" if p is None else f", p={p:g}")


def _model_section(rows: list[dict[str, Any]], model: str) -> list[str]:
    cuda = any(r.get("cuda_peak_allocated_bytes") for r in rows)
    mem_cols = "saved for backward | peak live tensors | peak RSS" + (" | CUDA peak" if cuda else "")
    head = f"| method | trainable params | {mem_cols} | step (s) | tokens/s | ÷ PEFT LoRA: saved / live / RSS / step |"
    lines = [f"## {model}: {MODELS[model].description}", "", head, "|---|" + "---:|" * (6 + cuda) + "---|"]
    for row in rows:
        if row.get("status") != "ok":
            lines.append(f"| {_row_name(row)} | {row.get('status')}: {row.get('error', '')} |")
            continue
        mem = [_mib(row["saved_bytes"]), _mib(row["peak_live_bytes"]), _mib(row["peak_rss_bytes"])]
        if cuda:
            mem.append(_mib(row.get("cuda_peak_allocated_bytes")))
        ratios = " / ".join(
            _ratio(row, k) for k in ("saved_bytes", "peak_live_bytes", "peak_rss_bytes", "step_s")
        )
        notes = f" ({'; '.join(row['notes'])})" if row.get("notes") else ""
        lines.append(
            f"| {_row_name(row)}{notes} | {row['trainable_params']:,} | {' | '.join(mem)} | {row['step_s']:.3f} | "
            f"{row['tokens_per_s']:,.0f} | {ratios} |"
        )
    lines += ["", "Memory in MiB. Saved for backward, by category (MiB):", ""]
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        cats = [c for c in ok[0]["saved_by_category"] if any(r["saved_by_category"].get(c) for r in ok)]
        lines += ["| method | " + " | ".join(cats) + " |", "|---|" + "---:|" * len(cats)]
        for row in ok:
            cells = " | ".join(_mib(row["saved_by_category"].get(c, 0)) for c in cats)
            lines.append(f"| {_row_name(row)} | {cells} |")
    found = checks(rows, model)
    if found:
        lines += ["", f"Acceptance checks ({_workload_note(rows[0], model)}):", ""]
        lines += ["| issue | check | value | target | |", "|---|---|---:|---|---|"]
        for c in found:
            mark = "pass" if c["passed"] else "**miss**"
            lines.append(f"| {c['issue']} | {c['check']} | {c['value']:.4f} | {c['target']} | {mark} |")
    return lines + [""]


# The workloads the acceptance targets were written for: model -> (issues, batch, seq).
_ACCEPTANCE = {"smollm2-135m": ("5 and 7", 8, 256), "llama-core": ("2", 4, 256)}


def _workload_note(row: dict[str, Any], model: str) -> str:
    if model not in _ACCEPTANCE:
        return "no issue sets targets for this model: for reference only"
    issues, batch, seq = _ACCEPTANCE[model]
    settings = (row["batch"], row["seq"], row["r"], row["lora_alpha"], row["dtype"], row["device"])
    if settings == (batch, seq, 16, 32.0, "float32", "cpu"):
        return f"the workload of issue {issues}"
    return f"NOT the workload of issue {issues} ({batch} x {seq}, r=16, lora_alpha=32, fp32 CPU): for reference only"


_METHOD_NOTES = """\
## How the numbers are measured

- **Each method in its own process.** A fresh `python -m lorafa.bench --worker` process per (model, method,
  dropout), run one after another, so one method's allocations cannot hide another's peak.
- **Saved for backward**: the unique storages autograd keeps after the forward pass of one training step
  (`lorafa.memory.SavedTensorTracker`: `saved_tensors_hooks`, each storage counted once, parameters excluded;
  under activation checkpointing what is really kept, i.e. the checkpoint inputs).
- **Peak live tensors**: on CPU, the bytes of all tensors alive before one steady-state step (weights, optimizer
  states; found through the garbage collector) plus the peak of the running sum of the step's allocation and free
  events from the PyTorch profiler (`profile_memory=True`). It does not depend on the allocator. On CUDA it is
  `torch.cuda.max_memory_allocated` over all steps.
- **Peak RSS**: the worker's whole-process peak resident memory (`getrusage` `ru_maxrss`) over the training
  steps, before the profiled step: Python, libraries, weights, gradients, optimizer states and activations. The
  high-water mark is reset (Linux `/proc/self/clear_refs`) once the model, optimizer and batch are set up, so
  the transient peak of loading or initialising the model, the same for every method, doesn't mask the step's
  (it is kept in `benchmarks.json` as `setup_peak_rss_bytes`).
- **Step**: median wall time of the timed steps, each forward + backward + optimizer step + `zero_grad`;
  tokens/s = batch × sequence length ÷ step time. The floor has no optimizer step (nothing trains).
- **Ratios** (÷ PEFT LoRA): this method's value divided by PEFT LoRA's at the same LoRA dropout, measured in the
  same run (for full fine-tuning and the floor, PEFT LoRA at the first dropout value).
- **Methods.** Targets are all linear layers of the transformer blocks (`lorafa.inject.DEFAULT_TARGETS`); the
  PEFT baselines get exactly the same module names. Classification heads are trained (`modules_to_save`).
  Optimizer AdamW (PEFT LoRA + create_lorafa_optimizer: PEFT's `LoraFAOptimizer`, which freezes lora_A and
  projects B's gradient). Checkpointing is Hugging Face's per-layer activation checkpointing, non-reentrant.
  The frozen floor has no adapters and its embedding output requires grad: what every frozen layer keeps to
  pass gradients back. "Lean" is LoRA-FA + `lorafa.loss.chunked_causal_lm_loss` (causal LMs only) +
  `lorafa.recompute.enable_cheap_recompute`.
- **Acceptance checks** use dropout 0.05 unless marked; their targets belong to the issues' workloads (issues 5
  and 7: SmolLM2-135M, batch 8 × 256, r=16, fp32 CPU; issue 2: the LLaMA shape at batch 4 × 256); on other
  settings they are shown for reference.
"""


def render_report(rows: list[dict[str, Any]], meta: dict[str, Any], chart: str | None) -> str:
    """The markdown report: settings, machine, date, reproduce command, one section per model, the chart."""
    s = meta["settings"]
    lines = [
        "# Benchmarks: LoRA-FA vs PEFT LoRA, full fine-tuning and activation checkpointing",
        "",
        "<!-- Written by `lorafa bench` (src/lorafa/bench.py); rerun the command below rather than editing. -->",
        "",
        "Reproduce:",
        "",
        f"    {meta['command']}",
        "",
        f"- **Date**: {meta['date']} (took {meta['duration_s'] / 60:.1f} min)",
        f"- **Machine**: {meta['machine']}",
        f"- **Device**: {meta['device']}",
        f"- **Software**: {meta['software']}",
        f"- **Allocator**: {meta['allocator']}",
        f"- **Load**: {meta['load']}",
        *(
            [
                "- **Busy machine**: the load average exceeded the number of cores, so other processes competed "
                "for the CPUs: step times and their ratios are noisy; the memory numbers are not affected."
            ]
            if meta.get("busy")
            else []
        ),
        f"- **Settings**: batch {s['batch']} × {s['seq']} tokens, r={s['r']}, lora_alpha={s['lora_alpha']:g}, "
        f"LoRA dropout {', '.join(f'{p:g}' for p in s['dropout'])}, {s['dtype']} on {s['device']}, "
        f"AdamW lr {s['lr']:g}, {s['warmup']} warm-up + {s['steps']} timed steps, {s['repeats']} repeat(s), "
        f"torch threads per worker: {s['threads'] or f'default ({torch.get_num_threads()})'}, seed {s['seed']}",
        "",
        _METHOD_NOTES,
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += _model_section([r for r in rows if r["model"] == model], model)
    if chart:
        lines += [f"![peak memory and step time per method]({chart})", ""]
    return "\n".join(lines)


def write_chart(rows: list[dict[str, Any]], path: Path) -> bool:
    """A PNG with, per model, peak memory (RSS, live tensors, saved) and step time per method. False if no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [
        m
        for m in dict.fromkeys(r["model"] for r in rows)
        if any(r["model"] == m and r.get("status") == "ok" for r in rows)
    ]
    if not models:
        return False
    sizes = [sum(1 for r in rows if r["model"] == m and r.get("status") == "ok") for m in models]
    fig, axes = plt.subplots(
        len(models),
        2,
        figsize=(13, sum(0.42 * n + 1.4 for n in sizes)),
        squeeze=False,
        gridspec_kw={"height_ratios": sizes, "width_ratios": [3, 2]},
    )
    for (ax_mem, ax_time), model in zip(axes, models, strict=True):
        ok = [r for r in rows if r["model"] == model and r.get("status") == "ok"]
        names = [_row_name(r) for r in ok]
        ys = range(len(ok))
        series = [("peak RSS", "peak_rss_bytes"), ("peak live tensors", "peak_live_bytes")]
        series += [("saved for backward", "saved_bytes")]
        for k, (label, key) in enumerate(series):
            values = [(r.get(key) or 0) / MIB for r in ok]
            ax_mem.barh([y + (k - 1) * 0.27 for y in ys], values, height=0.27, label=label)
        ax_mem.set_yticks(list(ys), names, fontsize=8)
        ax_mem.invert_yaxis()
        ax_mem.set_xlabel("MiB")
        ax_mem.set_title(f"{model}: memory", fontsize=10)
        ax_mem.legend(fontsize=7)
        ax_time.barh(list(ys), [r["step_s"] for r in ok], color="tab:gray")
        ax_time.set_yticks(list(ys), [""] * len(ok))
        ax_time.invert_yaxis()
        ax_time.set_xlabel("seconds per step (median)")
        ax_time.set_title(f"{model}: step time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(tmp)
    tmp.replace(path)


def write_report(rows: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path) -> Path:
    """Write `BENCHMARKS.md`, `benchmarks.png` and `benchmarks.json` into `out_dir`; return the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "benchmarks.png"
    has_chart = [False]

    def chart(tmp: Path) -> None:
        has_chart[0] = write_chart(rows, tmp)
        if not has_chart[0]:
            tmp.write_bytes(b"")

    _atomic_write(png, chart)
    if not has_chart[0]:
        png.unlink()
    md = out_dir / "BENCHMARKS.md"
    text = render_report(rows, meta, png.name if has_chart[0] else None)
    _atomic_write(md, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    payload = {"meta": meta, "rows": rows}
    _atomic_write(out_dir / "benchmarks.json", lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
    return md


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table for the terminal."""
    head = f"{'model':<13} {'method':<58} {'saved':>9} {'live':>9} {'RSS':>9} {'step s':>8} {'tok/s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        name = _row_name(r)
        if r.get("status") != "ok":
            lines.append(f"{r['model']:<13} {name:<58} {r.get('status')}: {r.get('error', '')}"[:200])
            continue
        lines.append(
            f"{r['model']:<13} {name:<58} {_mib(r['saved_bytes']):>9} {_mib(r['peak_live_bytes']):>9} "
            f"{_mib(r['peak_rss_bytes']):>9} {r['step_s']:>8.3f} {r['tokens_per_s']:>8.0f}"
        )
    return "\n".join(lines) + "\n(memory in MiB)"


# ---- command line ---------------------------------------------------------------------------------------------
def _add_arguments(ap: argparse.ArgumentParser) -> None:
    d = BenchSettings()
    ap.add_argument("--models", nargs="+", default=d.models, help="model names (listed above)")
    ap.add_argument("--methods", nargs="+", default=d.methods, help="method names (listed above)")
    ap.add_argument("--batch", type=int, default=d.batch, help="sequences per step")
    ap.add_argument("--seq", type=int, default=d.seq, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=d.steps, help="timed steps per method (median)")
    ap.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps before the timed ones")
    ap.add_argument("--dropout", type=float, nargs="+", default=d.dropout, help="LoRA dropout value(s)")
    ap.add_argument("--r", type=int, default=d.r, help="adapter rank")
    ap.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    ap.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16"])
    ap.add_argument(
        "--allocator",
        default=d.allocator,
        choices=ALLOCATORS,
        help="workers' malloc settings: lorafa (as `lorafa train` on CPU), glibc (defaults) or inherit",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    ap.add_argument("--repeats", type=int, default=d.repeats, help="runs per method, alternating order")
    ap.add_argument("--timeout", type=float, default=d.timeout, help="seconds per worker")
    ap.add_argument("--out-dir", type=Path, default=Path("docs"), help="where BENCHMARKS.md and the chart go")
    ap.add_argument("--no-write", action="store_true", help="print the table only")


_DESCRIPTION = (
    """\
Memory and speed of lorafa LoRA-FA side by side with PEFT LoRA, full fine-tuning and activation checkpointing.
Each (model, method, LoRA dropout) runs in its own fresh process; writes BENCHMARKS.md, benchmarks.png and
benchmarks.json to --out-dir and prints the table.

models:  """
    + ", ".join(MODELS)
    + """
methods: """
    + ", ".join(METHODS)
    + "\n"
)


def add_bench_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to an argparse subparsers object; it sets `run=bench_main` (the CLI's convention)."""
    ap = subparsers.add_parser(
        "bench",
        help="memory and speed benchmark vs PEFT LoRA and full fine-tuning",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(ap)
    ap.set_defaults(run=bench_main)
    return ap


def bench_main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments; print the table. Returns 0, or 1 if a method failed."""
    options = {
        "warmup": args.warmup,
        "r": args.r,
        "lora_alpha": args.lora_alpha,
        "device": args.device,
        "dtype": args.dtype,
        "allocator": args.allocator,
        "threads": args.threads,
        "repeats": args.repeats,
        "timeout": args.timeout,
    }
    try:
        rows = run_benchmark(
            args.models,
            args.methods,
            args.batch,
            args.seq,
            args.steps,
            args.dropout,
            None if args.no_write else args.out_dir,
            **options,
        )
    except ValueError as e:
        print(f"lorafa bench: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    for model in dict.fromkeys(r["model"] for r in rows):
        for c in checks(rows, model):
            mark = "pass" if c["passed"] else "MISS"
            print(
                f"{model}: issue {c['issue']} {c['check']} = {c['value']:.3f} (target {c['target']}) {mark}"
            )
    if not args.no_write:
        print(f"wrote {args.out_dir / 'BENCHMARKS.md'}")
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m lorafa.bench [options]` (same as `lorafa bench`), or `--worker JOB` for one measurement."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"] and len(argv) == 2:
        return _worker_main(argv[1])
    ap = argparse.ArgumentParser(
        prog="python -m lorafa.bench",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(ap)
    return bench_main(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
