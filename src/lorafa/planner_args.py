"""What `lorafa memory` plans for: `PlannerArgs` (validated, each field naming its command-line flag), the
choices it accepts (`METHODS`, `ATTENTIONS`, ..., the model `PRESETS`), and the size and dtype parsing and byte
formatting the planner shares (`parse_size`, `parse_dtype`, `format_bytes`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "ATTENTIONS",
    "CHECKPOINTING",
    "DEVICES",
    "METHODS",
    "PRESETS",
    "SEARCHES",
    "TASKS",
    "PlannerArgs",
    "format_bytes",
    "parse_dtype",
    "parse_size",
]

METHODS = ("full", "lora", "lora-fa", "peft-lora")
ATTENTIONS = ("sdpa-flash", "eager")
DEVICES = ("cuda", "cpu")
TASKS = ("auto", "causal-lm", "seq-cls", "seq2seq")
CHECKPOINTING = ("both", "off", "on")
SEARCHES = ("batch", "seq")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

_LLAMA_2 = {
    "model_type": "llama",
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}

# Public dimensions of the paper's models (Zhang et al. 2023, §4) and two current decoders, as transformers
# config dicts (from each model's config.json on the Hugging Face Hub).
PRESETS: dict[str, dict[str, Any]] = {
    "roberta-base": {
        "model_type": "roberta",
        "vocab_size": 50265,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-5,
        "pad_token_id": 1,
    },
    "roberta-large": {
        "model_type": "roberta",
        "vocab_size": 50265,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-5,
        "pad_token_id": 1,
    },
    "t5-base": {
        "model_type": "t5",
        "vocab_size": 32128,
        "d_model": 768,
        "d_kv": 64,
        "d_ff": 3072,
        "num_layers": 12,
        "num_decoder_layers": 12,
        "num_heads": 12,
        "feed_forward_proj": "relu",
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
    },
    "t5-large": {
        "model_type": "t5",
        "vocab_size": 32128,
        "d_model": 1024,
        "d_kv": 64,
        "d_ff": 4096,
        "num_layers": 24,
        "num_decoder_layers": 24,
        "num_heads": 16,
        "feed_forward_proj": "relu",
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
    },
    "llama-2-7b": {
        **_LLAMA_2,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "llama-2-13b": {
        **_LLAMA_2,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
    },
    "llama-3-8b": {
        **_LLAMA_2,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
}


@dataclass
class PlannerArgs:
    """What to plan for. Invalid values raise ValueError naming the command-line flag."""

    preset: str | None = None
    """A name from PRESETS (--preset)."""
    config: str | None = None
    """Path to a transformers config.json, or a folder holding one (--config)."""
    batch_size: int = 8
    """Sequences per step (--batch-size)."""
    seq_len: int = 512
    """Tokens per sequence (encoder side for encoder-decoders) (--seq-len)."""
    target_len: int | None = None
    """Decoder tokens for encoder-decoders; default: seq_len (--target-len)."""
    dtype: str = "bfloat16"
    """Weights and activations dtype: float32/fp32, bfloat16/bf16, float16/fp16 (--dtype)."""
    r: int = 16
    """Adapter rank (--r)."""
    lora_alpha: float | None = None
    """Adapter alpha; default 2·r. Does not change memory (--lora-alpha)."""
    lora_dropout: float = 0.05
    """Adapter dropout (--lora-dropout)."""
    target_modules: list[str] | str | None = None
    """Adapted module names/suffixes, a regex or "all-linear"; default: lorafa's default for the architecture
    (--targets)."""
    exclude_modules: list[str] | str = field(default_factory=list)
    """Module names/suffixes or a regex never adapted (as LoRAFAConfig.exclude_modules)."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Methods to plan for, from METHODS (--methods)."""
    checkpointing: str = "both"
    """Activation checkpointing: "off", "on" or "both" (--checkpointing)."""
    attention: str = "sdpa-flash"
    """"sdpa-flash" (GPU flash/memory-efficient SDPA) or "eager" (keeps T×T probabilities) (--attention)."""
    device: str = "cuda"
    """Where training runs, for the kernels' memory: "cuda" (dropout keeps a 1-byte mask) or "cpu" (dropout keeps
    its noise in the input's dtype; CPU SDPA keeps what "sdpa-flash" models without attention dropout, and runs its
    math path, planned as such, with it) (--device)."""
    task: str = "auto"
    """"causal-lm", "seq-cls", "seq2seq", or "auto" from the config (--task)."""
    num_labels: int = 2
    """Classes for seq-cls (--num-labels)."""
    optimizer: str = "adamw"
    """"adamw", "sgd" or "none" (--optimizer)."""
    mixed_precision: bool = True
    """fp32 AdamW moments and fp32 master copies of trainable fp16/bf16 weights (--no-mixed-precision: off)."""
    gpu_memory: str | None = None
    """Memory budget, e.g. 24GB, 24GiB, 80G: report the largest batch (or seq len) that fits (--gpu-memory)."""
    reserve: str = "0"
    """Memory kept aside from the budget (CUDA context, allocator slack), e.g. 1GiB (--reserve)."""
    search: str = "batch"
    """What --gpu-memory searches: "batch" or "seq" (--search)."""
    max_search: int = 65536
    """Upper bound of the search (--max-search)."""
    plot: str | None = None
    """Write stacked bars per method to this PNG (--plot)."""
    json: bool = False
    """Print JSON instead of a table (--json)."""
    chunked_loss: bool = False
    """Causal LMs: the chunked linear + cross-entropy loss of lorafa.loss, no (tokens × vocab) logits kept
    (--chunked-loss)."""
    cheap_recompute: bool = False
    """Recompute norms, activations, gated products and dropout masks in backward (lorafa.recompute)
    (--cheap-recompute)."""
    offload: bool = False
    """Saved activations wait in pinned host memory (lorafa.offload); a no-op with --device cpu (--offload)."""
    offload_min_bytes: str = "1MiB"
    """Saved tensors smaller than this stay on the GPU with --offload, as offload_activations' min_bytes
    (--offload-min-bytes)."""

    def validate(self) -> None:
        """Raise ValueError naming the first invalid flag."""
        if (self.preset is None) == (self.config is None):
            raise ValueError("give exactly one of --preset or --config")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"--preset: unknown preset {self.preset!r}; known presets: {', '.join(PRESETS)}")
        for flag, value in (("--batch-size", self.batch_size), ("--seq-len", self.seq_len), ("--r", self.r)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
        if self.target_len is not None and (not isinstance(self.target_len, int) or self.target_len <= 0):
            raise ValueError(f"--target-len must be a positive integer, got {self.target_len!r}")
        parse_dtype(self.dtype)
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout!r}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"--methods: unknown method(s) {bad}; choose from {list(METHODS)}")
        for flag, choice, allowed in (
            ("--checkpointing", self.checkpointing, CHECKPOINTING),
            ("--attention", self.attention, ATTENTIONS),
            ("--device", self.device, DEVICES),
            ("--task", self.task, TASKS),
            ("--search", self.search, SEARCHES),
            ("--optimizer", self.optimizer, ("adamw", "sgd", "none")),
        ):
            if choice not in allowed:
                raise ValueError(f"{flag} must be one of {list(allowed)}, got {choice!r}")
        if self.num_labels <= 0:
            raise ValueError(f"--num-labels must be a positive integer, got {self.num_labels!r}")
        if self.max_search <= 0:
            raise ValueError(f"--max-search must be a positive integer, got {self.max_search!r}")
        reserve = parse_size(self.reserve, "--reserve")
        if self.gpu_memory is not None and reserve >= parse_size(self.gpu_memory, "--gpu-memory"):
            raise ValueError(f"--reserve {self.reserve} leaves nothing of --gpu-memory {self.gpu_memory}")
        parse_size(self.offload_min_bytes, "--offload-min-bytes", bare=1)


def _alpha(args: PlannerArgs) -> float:
    return args.lora_alpha if args.lora_alpha is not None else 2.0 * args.r


_UNITS = {
    "": 10**9,  # a bare number is read as GB, as in "--gpu-memory 80"
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str, flag: str = "--gpu-memory", bare: int = 10**9) -> int:
    """Bytes in a size such as "24GB" (10⁹), "24GiB" (2³⁰), "80G" (= GiB, as nvidia-smi and `ls -h`), "0"; a bare
    number counts `bare` bytes a unit (GB for memory budgets, bytes for --offload-min-bytes).

    Raises:
        ValueError: naming `flag`, for anything else (e.g. "24 GiBs").
    """
    m = _SIZE_RE.fullmatch(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"{flag}: cannot parse memory size {text!r}; expected a number and one of the units "
            "B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB or K, M, G, T (powers of 1024), e.g. 24GB, 80GiB"
        )
    return int(float(m.group(1)) * (bare if unit == "" else _UNITS[str(unit)]))


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype for a name such as "bf16"; raises ValueError naming --dtype otherwise."""
    if name not in _DTYPES:
        raise ValueError(f"--dtype: unknown dtype {name!r}; choose from {sorted(_DTYPES)}")
    return _DTYPES[name]


def format_bytes(n: float) -> str:
    """Human-readable size in binary units (GiB, MiB, ...)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
