"""What a `lorafa bench` run does: `BenchSettings` (the whole run, validated), `Job` (one worker's task) and the
malloc environment the `allocator` setting gives every worker (`malloc_env`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lorafa.bench_models import DEFAULT_METHODS, DEFAULT_MODELS, METHODS, MODELS

__all__ = ["ALLOCATORS", "BenchSettings", "Job", "malloc_env"]

ALLOCATORS = ("lorafa", "glibc", "inherit")


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
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: this torch has no CUDA device (use --device cpu or auto)")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if not math.isfinite(self.timeout) or not math.isfinite(self.lora_alpha):
            raise ValueError("--lora-alpha and --timeout must be finite")
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
