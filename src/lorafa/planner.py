"""The `lorafa memory` planner: training memory per method for any Hugging Face config, without weights.

The model is instantiated on the `meta` device (shapes, no storage), adapters are added exactly as in training
(`lorafa.add_lorafa`, or a real PEFT model for "peft-lora"), and one forward + loss runs under
`lorafa.memory.SavedTensorTracker`, which counts the bytes autograd keeps for backward. Weights, gradients and
optimizer states come from `lorafa.memory.static_memory`. Nothing is extrapolated: every activation figure is a
measured meta forward of the real model code at the requested batch and sequence length.

Attention kernel. On the meta device PyTorch's SDPA has no fused kernel and decomposes into the math path, which
keeps the T×T probabilities. On a GPU, SDPA runs FlashAttention (or the memory-efficient kernel when there is an
additive mask, e.g. T5's position bias), which keeps only q, k, v, the output and a log-sum-exp per query and head
(plus the additive mask when there is one). `attention="sdpa-flash"` (default) models that by routing
`F.scaled_dot_product_attention` to `_SimulatedFlashAttention`, a meta-only autograd Function that saves exactly
those tensors, with the output in the kernels' token-major layout so that the `o_proj` input is a view of it, as on
the GPU. `attention="eager"` runs transformers' eager attention, which keeps the probabilities (and their dropout
mask). PyTorch's own CPU flash kernel keeps the same tensors as the simulated one; tests/test_planner.py checks the
planner against it.

Options below the LoRA-FA floor (issue 7), each modelled by running lorafa's own code on meta:
`chunked_loss` (causal LMs only) replaces ``model(**batch).loss`` by `lorafa.loss.chunked_causal_lm_loss`, which
keeps dh (tokens, d) (and dW for a trainable head) instead of the fp32 (tokens × vocab) log-probabilities; the one
chunk of logits alive at a time is transient and not counted. The labels of that run are real CPU values (no
ignored token but the shift's last position per row), as the loss selects counted tokens by value.
`cheap_recompute` applies `lorafa.recompute.enable_cheap_recompute` after the adapters; the local graphs it
rebuilds in backward (e.g. a recomputed RMSNorm's rsqrt) live one module at a time and are not counted, and the
RNG state each regenerated dropout keeps is host memory (on CUDA 16 bytes), so it costs no device memory with
device "cuda" (with device "cpu" it is CPU memory and counted). `offload` models `lorafa.offload.offload_activations`
(GPU only; with device "cpu" a no-op, like the library without CUDA): the library's own pack hook decides which
saved tensors move to pinned host memory (dense, non-parameter, at least `offload_min_bytes`); they are reported
as `activations_offloaded` (host) instead of device memory. Backward copies each back right before its node uses
it and frees it after, so the planner adds a transient: the offloaded bytes of the largest checkpointable layer
(or, outside the layers, of the largest offloaded tensor), an upper bound on what is back on the device at once.
Not modelled: copies still in flight when the forward outruns the host link (device memory then grows until the
copies catch up), and pinned host memory limits.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lorafa.config import LoRAFAConfig
from lorafa.inject import add_lorafa, classification_head_names, resolve_targets
from lorafa.memory import CATEGORIES, SavedRecord, SavedTensorTracker, _storage_key, static_memory
from lorafa.models import enable_activation_checkpointing
from lorafa.offload import _Offloaded, _OffloadHooks
from lorafa.recompute import enable_cheap_recompute

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

_SEQ_CLS_TYPES = ("bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "distilbert", "electra")


# ---- arguments ------------------------------------------------------------------------------------------------
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
    target_modules: list[str] | None = None
    """Adapted module names/suffixes; default: lorafa's default for the architecture (--targets)."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Methods to plan for, from METHODS (--methods)."""
    checkpointing: str = "both"
    """Activation checkpointing: "off", "on" or "both" (--checkpointing)."""
    attention: str = "sdpa-flash"
    """"sdpa-flash" (GPU flash/memory-efficient SDPA) or "eager" (keeps T×T probabilities) (--attention)."""
    device: str = "cuda"
    """Where training runs, for the kernels' memory: "cuda" (dropout keeps a 1-byte mask) or "cpu" (dropout keeps
    its noise in the input's dtype; CPU SDPA keeps what "sdpa-flash" models when there is no attention dropout)
    (--device)."""
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
        if self.gpu_memory is not None:
            parse_size(self.gpu_memory, "--gpu-memory")
        parse_size(self.reserve, "--reserve")
        parse_size(self.offload_min_bytes, "--offload-min-bytes")


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


def parse_size(text: str, flag: str = "--gpu-memory") -> int:
    """Bytes in a size such as "24GB" (10⁹), "24GiB" (2³⁰), "80G" (= GiB, as nvidia-smi and `ls -h`), "0".

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
    return int(float(m.group(1)) * _UNITS[str(unit)])


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


# ---- the simulated GPU attention kernel -----------------------------------------------------------------------
class _SimulatedFlashAttention(torch.autograd.Function):
    """Memory model of SDPA's FlashAttention / memory-efficient kernels, for the meta device only.

    Saves what those kernels save for backward: q, k, v, the output and a log-sum-exp (B, H, T) in fp32, plus the
    additive mask when one is given (then only the memory-efficient kernel applies, and it keeps the bias). Dropout
    inside the kernel is regenerated from a Philox seed, so no mask is kept. k and v are kept as given, i.e. not
    repeated for grouped-query attention when transformers passes `enable_gqa=True`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None
    ) -> Tensor:
        if q.device.type != "meta":
            raise RuntimeError("the simulated flash attention only models memory on the meta device")
        b, h, t, _ = q.shape
        # The kernels write the output token-major (B, T, H, D) and return a (B, H, T, D) view of it, so the
        # `transpose(1, 2).contiguous()` before o_proj makes no copy.
        out = q.new_empty((b, t, h, v.shape[-1])).transpose(1, 2)  # (B, H, T, Dv)
        lse = q.new_empty((b, h, t), dtype=torch.float32)  # (B, H, T)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        raise RuntimeError("the simulated flash attention is a memory model; it has no backward")


def _flash_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    return _SimulatedFlashAttention.apply(query, key, value, attn_mask)


_ALL = (torch.all, Tensor.all)
_ANY = (torch.any, Tensor.any)


def _fused_dropout(
    input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> Tensor | None:
    if not training or not 0.0 < p < 1.0 or inplace:
        return None
    return torch.native_dropout(input, p, True)[0]


class _MetaPlanningMode(TorchFunctionMode):
    """What a meta forward needs: the target device's kernels (for memory), and answers to data checks.

    Kernels: with `flash`, SDPA is `_SimulatedFlashAttention`. With `fused_dropout`, `F.dropout` runs
    `torch.native_dropout`, the fused kernel `F.dropout` uses on CUDA, which keeps a bool mask (1 byte per
    element); on CPU and meta, `F.dropout` multiplies by a noise tensor it keeps in the input's dtype.

    Data checks: meta tensors have no values, so a data-dependent check (`if mask.all():`) cannot run.
    transformers only makes such checks to skip work for inputs without padding, packing or overflow, which is
    what the planner's batch is: `all()` of a meta tensor is answered True and `any()` False, as a CPU scalar.
    """

    def __init__(self, flash: bool, fused_dropout: bool) -> None:
        super().__init__()
        self.flash = flash
        self.fused_dropout = fused_dropout

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if self.flash and func is F.scaled_dot_product_attention:
            return _flash_sdpa(*args, **kwargs)
        if self.fused_dropout and func is F.dropout and args[0].device.type == "meta":
            out = _fused_dropout(*args, **kwargs)
            if out is not None:
                return out
        if (func in _ALL or func in _ANY) and isinstance(args[0], Tensor) and args[0].device.type == "meta":
            result = func(*args, **kwargs)
            if result.dim() == 0:
                return torch.tensor(func in _ALL)
            return result
        return func(*args, **kwargs)


# ---- model building -------------------------------------------------------------------------------------------
def load_config(args: PlannerArgs) -> Any:
    """The transformers config of `args.preset` or `args.config`.

    Raises:
        FileNotFoundError: the config path does not exist.
        ValueError: unknown preset; a file that is not a JSON config with a known model_type.
    """
    from transformers import AutoConfig

    if args.preset is not None:
        if args.preset not in PRESETS:
            raise ValueError(f"--preset: unknown preset {args.preset!r}; known presets: {', '.join(PRESETS)}")
        d = dict(PRESETS[args.preset])
    else:
        path = Path(str(args.config))
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"--config: no such file: {path}")
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"--config: cannot read {path} as JSON: {e}") from e
        if not isinstance(d, dict) or "model_type" not in d:
            raise ValueError(f"--config: {path} is not a transformers config (no 'model_type')")
    model_type = d.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError) as e:
        raise ValueError(f"--config: unsupported model_type {model_type!r}: {e}") from e


def resolve_task(config: Any, task: str) -> str:
    """The task for `config`: encoder-decoders are seq2seq, BERT-like encoders seq-cls, the rest causal-lm."""
    if task != "auto":
        return task
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if config.model_type in _SEQ_CLS_TYPES:
        return "seq-cls"
    return "causal-lm"


def build_model(
    config: Any, task: str, dtype: torch.dtype, attention: str, device: str = "meta"
) -> nn.Module:
    """A random-init (or meta) transformers model for `task`, in train mode, all parameters trainable."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    auto = {
        "causal-lm": AutoModelForCausalLM,
        "seq-cls": AutoModelForSequenceClassification,
        "seq2seq": AutoModelForSeq2SeqLM,
    }[task]
    impl = "sdpa" if attention == "sdpa-flash" else "eager"
    with torch.device(device):
        model = auto.from_config(config, dtype=dtype, attn_implementation=impl)
    return model.train()


def make_batch(config: Any, task: str, batch_size: int, seq_len: int, target_len: int, device: str) -> dict:
    """Inputs with labels for one training step, with no padding (so no attention mask)."""
    ids = torch.ones(batch_size, seq_len, dtype=torch.long, device=device)  # values don't change memory
    batch: dict[str, Any] = {"input_ids": ids}
    if task == "seq-cls":
        batch["labels"] = torch.zeros(batch_size, dtype=torch.long, device=device)
    elif task == "seq2seq":
        batch["labels"] = torch.ones(batch_size, target_len, dtype=torch.long, device=device)
        batch["use_cache"] = False
    else:
        batch["labels"] = ids
        batch["use_cache"] = False  # a training step builds no KV cache
    return batch


def adapter_config(args: PlannerArgs, method: str) -> LoRAFAConfig:
    """The lorafa adapter config of `args` for `method` ("lora" or "lora-fa")."""
    return LoRAFAConfig(
        r=args.r,
        lora_alpha=_alpha(args),
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules,
        method=method,
        modules_to_save=None,
    )


def prepare_method(model: nn.Module, args: PlannerArgs, method: str, task: str) -> nn.Module:
    """`model` set up for `method`: "full" (unchanged), lorafa "lora"/"lora-fa", or a real PEFT LoRA model."""
    if method == "full":
        return model
    cfg = adapter_config(args, method if method != "peft-lora" else "lora")
    # A classification head is new, so it is trained fully (and saved with the adapter), as in the paper.
    heads = classification_head_names(model) if task == "seq-cls" else []
    cfg.modules_to_save = heads or None
    if method in ("lora", "lora-fa"):
        return add_lorafa(model, cfg)
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(model, cfg)  # the same layers as lorafa, named in full
    peft_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # memory does not depend on alpha
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        modules_to_save=heads or None,
    )
    return get_peft_model(model, peft_cfg)  # type: ignore[arg-type]


def _hf_model(model: nn.Module) -> nn.Module:
    # A PEFT model wraps the transformers model as base_model.model.
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return inner if type(model).__name__.startswith("PeftModel") and inner is not None else model


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn non-reentrant activation checkpointing of every transformer layer on or off."""
    hf: Any = _hf_model(model)
    if on:
        enable_activation_checkpointing(hf)
    elif hasattr(hf, "activation_checkpointing_disable"):
        hf.activation_checkpointing_disable()
    else:
        hf.gradient_checkpointing_disable()


def checkpointed_layers(model: nn.Module) -> list[str]:
    """Names of the modules transformers checkpoints (its GradientCheckpointingLayer blocks)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [n for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]


@contextmanager
def planning_mode(attention: str, device: str = "cuda") -> Iterator[None]:
    """Inside, a meta forward keeps (for memory) what `attention` and `device`'s kernels keep (see PlannerArgs)."""
    with _MetaPlanningMode(flash=attention == "sdpa-flash", fused_dropout=device == "cuda"):
        yield


@dataclass
class Activations:
    """Saved-for-backward bytes of one forward + loss."""

    saved: int
    """Device bytes of the unique storages kept after the forward (with checkpointing: the checkpoint inputs and the
    layers outside); without what offloading moves to the host, and, for device "cuda", without host tensors."""
    recompute: int
    """With checkpointing: the largest layer's saved bytes, re-created during backward; else 0."""
    by_category: dict[str, int]
    """`saved` per category (see `SavedTensorTracker.by_category`)."""
    per_layer_max: int
    """Largest saved bytes of one checkpointable layer, measured without checkpointing."""
    offloaded: int = 0
    """With offloading: saved bytes moved to pinned host memory (not in `saved`)."""
    transient: int = 0
    """With offloading: offloaded bytes back on the device at once during backward (see the module docstring)."""

    @property
    def total(self) -> int:
        return self.saved + self.recompute + self.transient


class _MetaCopier:
    """An offload copier for the meta device: moves nothing, so that `_OffloadHooks` only decides what would move."""

    def accepts(self, t: Tensor) -> bool:
        return t.is_meta

    def to_host(self, t: Tensor) -> None:
        return None

    def to_device(self, handle: Any) -> Tensor:
        raise RuntimeError("a meta forward is a memory model; it has no backward")


class _PlanTracker(SavedTensorTracker):
    """A SavedTensorTracker that also notes where each saved storage would live while training.

    `host`: storages of non-meta tensors a meta forward saves, i.e. RNG states of `RegeneratedDropout` (on CUDA a
    16-byte host tensor). `moved`/`kept`: storages `offload_activations(min_bytes)` would / would not move, decided
    by the library's own pack hook; a storage leaves the device only if no saved view of it stays.
    """

    def __init__(self, model: nn.Module, offload_min_bytes: int | None) -> None:
        super().__init__(model)
        self._offload = (
            _OffloadHooks(_MetaCopier(), offload_min_bytes, ()) if offload_min_bytes is not None else None
        )
        self.host: set[int] = set()  # ids of SavedRecords
        self.moved: set[int] = set()
        self.kept: set[int] = set()

    def _pack(self, t: Tensor) -> Tensor:
        packed = super()._pack(t)
        entry = self._live.get(_storage_key(t)) if t.layout == torch.strided else None
        if entry is None:  # a parameter or buffer: not counted
            return packed
        rid = id(entry[0])
        if not t.is_meta:
            self.host.add(rid)
        elif self._offload is not None:
            # On meta every data_ptr() is 0, so the hook's de-duplication may merge unrelated tensors; it only
            # merges tensors it already decided to move, so the decision itself is the library's.
            moves = isinstance(self._offload.pack(t), _Offloaded)
            (self.moved if moves else self.kept).add(rid)
        return packed

    def offloaded(self, r: SavedRecord) -> bool:
        return id(r) in self.moved and id(r) not in self.kept


def measure_activations(
    model: nn.Module,
    batch: dict,
    attention: str,
    checkpointing: bool,
    plain: Activations | None = None,
    device: str = "cuda",
    *,
    chunked_loss: bool = False,
    offload_min_bytes: int | None = None,
) -> Activations:
    """Run one meta forward + loss of `model` on `batch` and count the bytes saved for backward.

    With `checkpointing`, the forward without checkpointing is needed too (for the largest layer, re-created
    during backward); pass it as `plain` when already measured. `attention` and `device` pick the kernels whose
    memory is modelled (see PlannerArgs). `chunked_loss` computes the loss with `lorafa.loss` (causal LMs);
    `offload_min_bytes` (None: no offloading) models `lorafa.offload.offload_activations` on a GPU.
    """
    if plain is None or not checkpointing:
        plain = _measure(model, batch, attention, False, device, chunked_loss, offload_min_bytes, 0)
        if not checkpointing:
            return plain
    return _measure(
        model, batch, attention, True, device, chunked_loss, offload_min_bytes, plain.per_layer_max
    )


def _measure(
    model: nn.Module,
    batch: dict,
    attention: str,
    checkpointing: bool,
    device: str,
    chunked_loss: bool,
    offload_min_bytes: int | None,
    recompute: int,
) -> Activations:
    tracker = _track(model, batch, attention, checkpointing, device, chunked_loss, offload_min_bytes)
    # Host tensors are the device's memory when training on CPU; on a GPU they cost no device memory.
    records = [r for r in tracker.records if device == "cpu" or id(r) not in tracker.host]
    on_device = [r for r in records if not tracker.offloaded(r)]
    by_category = dict.fromkeys(CATEGORIES, 0)
    for r in on_device:
        by_category[tracker.category(r.module)] += r.nbytes
    prefix = "base_model.model." if _hf_model(model) is not model else ""
    layers = [prefix + x for x in checkpointed_layers(_hf_model(model))]

    def layer_of(r: SavedRecord) -> str | None:
        return next((x for x in layers if r.module == x or r.module.startswith(x + ".")), None)

    per_layer = dict.fromkeys(layers, 0)
    moved_per_layer = dict.fromkeys(layers, 0)
    moved_outside = [0]
    for r in records:
        layer = layer_of(r)
        if layer is not None:
            per_layer[layer] += r.nbytes
        if tracker.offloaded(r):
            if layer is not None:
                moved_per_layer[layer] += r.nbytes
            else:
                moved_outside.append(r.nbytes)
    return Activations(
        saved=sum(r.nbytes for r in on_device),
        recompute=recompute,
        by_category=by_category,
        per_layer_max=max(per_layer.values(), default=0),
        offloaded=sum(r.nbytes for r in records if tracker.offloaded(r)),
        transient=max([*moved_per_layer.values(), *moved_outside]),
    )


def _track(
    model: nn.Module,
    batch: dict,
    attention: str,
    checkpointing: bool,
    device: str,
    chunked_loss: bool = False,
    offload_min_bytes: int | None = None,
) -> _PlanTracker:
    set_checkpointing(model, checkpointing)
    tracker = _PlanTracker(model, offload_min_bytes)
    try:
        with planning_mode(attention, device), tracker:
            if chunked_loss:
                from lorafa.loss import chunked_causal_lm_loss

                # The loss selects counted tokens by value, so its labels are real: make_batch's (no padding).
                labels = torch.ones(batch["labels"].shape, dtype=torch.long)
                # One chunk: the chunk size only bounds the transient logits, not what is saved, and meta runs
                # of many small chunks are slow.
                chunked_causal_lm_loss(
                    _hf_model(model), {**batch, "labels": labels}, chunk_size=labels.numel()
                )
            else:
                model(**batch)  # the output holds the loss; its graph is dropped on return
    finally:
        set_checkpointing(model, False)
    return tracker


# ---- the plan -------------------------------------------------------------------------------------------------
def largest_fitting(fits: Callable[[int], bool], upper: int) -> int:
    """The largest n in [1, upper] with fits(n), for a monotone `fits` (True up to some n, then False); 0 if none.

    Doubling then bisection: about 2·log2(n) calls of `fits`.
    """
    if upper < 1 or not fits(1):
        return 0
    lo, hi = 1, 2  # fits(lo) is known True; hi is the next candidate
    while hi <= upper and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, upper + 1)  # fits(hi) is False, or hi is past the bound
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
        "offload_min_bytes": parse_size(args.offload_min_bytes, "--offload-min-bytes") if on_gpu else None,
    }


def _alpha(args: PlannerArgs) -> float:
    return args.lora_alpha if args.lora_alpha is not None else 2.0 * args.r


def _target_names(args: PlannerArgs, config: Any, task: str, dtype: torch.dtype) -> list[str]:
    """The distinct last names of the adapted modules, e.g. ["q_proj", "v_proj"] ([] for full only)."""
    if all(m == "full" for m in args.methods):
        return []
    model = build_model(config, task, dtype, args.attention)
    return sorted({n.split(".")[-1] for n in resolve_targets(model, adapter_config(args, "lora"))})


def _search(model: nn.Module, ckpt: bool, args: PlannerArgs, config: Any, task: str, budget: int) -> int:
    static = static_memory(model, args.optimizer, args.mixed_precision).total
    options = _options(args)
    cache: dict[int, bool] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            if args.search == "batch":
                b, t, tt = n, args.seq_len, args.target_len or args.seq_len
            else:
                b, t, tt = args.batch_size, n, args.target_len or n
            batch = make_batch(config, task, b, t, tt, "meta")
            acts = measure_activations(model, batch, args.attention, ckpt, device=args.device, **options)
            cache[n] = static + acts.total <= budget
        return cache[n]

    upper = args.max_search
    if args.search == "seq":
        upper = min(upper, int(getattr(config, "max_position_embeddings", upper) or upper))
        if config.model_type in ("roberta", "xlm-roberta"):
            upper -= 2  # RoBERTa's positions start after the padding index
    return largest_fitting(fits, upper)


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


# ---- output ---------------------------------------------------------------------------------------------------
def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of `report` (from `run_planner`), with its notes."""
    s = report["settings"]
    lines = [
        f"{report['model']} ({report['model_type']}, {report['task']}): batch {s['batch_size']} × seq "
        f"{s['seq_len']}"
        + (f" (targets {s['target_len']})" if s["target_len"] else "")
        + f", {s['dtype']}, r={s['r']}, dropout {s['lora_dropout']}, attention {s['attention']}, "
        f"device {s['device']}" + "".join(f", {o}" for o in _option_names(s)),
    ]
    search_key = None
    if report["gpu_memory"] is not None:
        search_key = "max_batch_size" if report["search"] == "batch" else "max_seq_len"
        lines.append(f"budget {format_bytes(report['gpu_memory'])}")
    header = ["method", "ckpt", "trainable", "weights", "grads+optim", "activations", "total"]
    offloading = s["offload_min_bytes"] is not None
    if offloading:
        header.append("host (offloaded)")
    if search_key:
        header.append("max batch" if report["search"] == "batch" else "max seq")
    rows = [header]
    for e in report["methods"]:
        row = [
            e["method"],
            "on" if e["checkpointing"] else "off",
            f"{e['trainable_params'] / 1e6:.2f}M",
            format_bytes(e["weights"]),
            format_bytes(e["grads"] + e["optimizer_states"] + e["master_weights"]),
            format_bytes(e["activations"]),
            format_bytes(e["total"]),
        ]
        if offloading:
            row.append(format_bytes(e["activations_offloaded"]))
        if search_key:
            row.append(str(e[search_key]))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.extend(f"- {n}" for n in report["notes"])
    return "\n".join(lines)


def _option_names(settings: dict[str, Any]) -> list[str]:
    """The below-the-floor options a report's settings turn on, e.g. ["chunked loss", "offload"]."""
    names = [("chunked_loss", "chunked loss"), ("cheap_recompute", "cheap recompute")]
    out = [label for key, label in names if settings[key]]
    if settings["offload_min_bytes"] is not None:
        out.append("offload")
    return out


def plot_report(report: dict[str, Any], path: str) -> None:
    """Stacked bars per method (weights / grads + optimizer states / activations) written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = report["methods"]
    labels = [e["method"] + (" +ckpt" if e["checkpointing"] else "") for e in entries]
    gib = 2**30
    weights = [e["weights"] / gib for e in entries]
    optim = [(e["grads"] + e["optimizer_states"] + e["master_weights"]) / gib for e in entries]
    acts = [e["activations"] / gib for e in entries]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(entries)), 4.5))
    x = range(len(entries))
    ax.bar(x, weights, label="weights")
    ax.bar(x, optim, bottom=weights, label="grads + optimizer states")
    ax.bar(x, acts, bottom=[a + b for a, b in zip(weights, optim, strict=True)], label="activations")
    if report["gpu_memory"] is not None:
        ax.axhline(report["gpu_memory"] / gib, color="k", linestyle="--", linewidth=1, label="budget")
    ax.set_xticks(list(x), labels, rotation=30, ha="right")
    ax.set_ylabel("GiB")
    s = report["settings"]
    options = "".join(f", {o}" for o in _option_names(s))
    ax.set_title(
        f"{report['model']}: batch {s['batch_size']} × {s['seq_len']}, {s['dtype']}, r={s['r']}{options}"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- command line ---------------------------------------------------------------------------------------------
def _add_arguments(p: argparse.ArgumentParser) -> None:
    d = PlannerArgs()
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    src.add_argument("--config", help="path to a transformers config.json (or its folder)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument(
        "--target-len", type=int, default=None, help="decoder length of encoder-decoders (default: seq len)"
    )
    p.add_argument("--dtype", default=d.dtype, help="float32/fp32, bfloat16/bf16, float16/fp16")
    p.add_argument("--r", type=int, default=d.r)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument(
        "--targets", nargs="+", default=None, help="adapted module names (default: per architecture)"
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"from {list(METHODS)}")
    p.add_argument("--checkpointing", default=d.checkpointing, help="off, on or both")
    p.add_argument("--attention", default=d.attention, help="sdpa-flash (GPU kernels, default) or eager")
    p.add_argument("--device", default=d.device, help="cuda (default) or cpu: whose dropout kernel to model")
    p.add_argument("--task", default=d.task, help=f"one of {list(TASKS)}")
    p.add_argument("--num-labels", type=int, default=d.num_labels)
    p.add_argument("--optimizer", default=d.optimizer, help="adamw, sgd or none")
    p.add_argument("--no-mixed-precision", dest="mixed_precision", action="store_false")
    p.add_argument(
        "--gpu-memory", default=None, help="e.g. 24GB, 24GiB, 80G: find the largest batch that fits"
    )
    p.add_argument("--reserve", default=d.reserve, help="memory kept aside from --gpu-memory, e.g. 1GiB")
    p.add_argument("--search", default=d.search, help="what --gpu-memory maximises: batch or seq")
    p.add_argument("--max-search", type=int, default=d.max_search)
    p.add_argument("--plot", default=None, help="write stacked bars to this PNG")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--chunked-loss", action="store_true", help="causal LMs: chunked linear + cross-entropy (lorafa.loss)"
    )
    p.add_argument(
        "--cheap-recompute", action="store_true", help="recompute norms/activations/dropout in backward"
    )
    p.add_argument(
        "--offload", action="store_true", help="saved activations in pinned host memory (GPU only)"
    )
    p.add_argument(
        "--offload-min-bytes",
        default=d.offload_min_bytes,
        help="with a unit, e.g. 1MiB: smaller tensors stay",
    )


def add_memory_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `memory` subcommand to an argparse subparsers object; its handler (`run`, also `func`) is `memory_main`."""
    p = subparsers.add_parser(
        "memory",
        help="plan training memory per method (no weights needed)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    _add_arguments(p)
    p.set_defaults(run=memory_main, func=memory_main)
    return p


def args_from_namespace(ns: argparse.Namespace) -> PlannerArgs:
    """A PlannerArgs from parsed command-line arguments."""
    return PlannerArgs(
        preset=ns.preset,
        config=ns.config,
        batch_size=ns.batch_size,
        seq_len=ns.seq_len,
        target_len=ns.target_len,
        dtype=ns.dtype,
        r=ns.r,
        lora_alpha=ns.lora_alpha,
        lora_dropout=ns.lora_dropout,
        target_modules=ns.targets,
        methods=ns.methods,
        checkpointing=ns.checkpointing,
        attention=ns.attention,
        device=ns.device,
        task=ns.task,
        num_labels=ns.num_labels,
        optimizer=ns.optimizer,
        mixed_precision=ns.mixed_precision,
        gpu_memory=ns.gpu_memory,
        reserve=ns.reserve,
        search=ns.search,
        max_search=ns.max_search,
        plot=ns.plot,
        json=ns.json,
        chunked_loss=ns.chunked_loss,
        cheap_recompute=ns.cheap_recompute,
        offload=ns.offload,
        offload_min_bytes=ns.offload_min_bytes,
    )


def memory_main(ns: argparse.Namespace) -> int:
    """Run the planner for parsed arguments; print a table (or JSON); 0 on success, 2 on bad input."""
    try:
        args = args_from_namespace(ns)
        report = run_planner(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lorafa memory: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    if args.plot:
        plot_report(report, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m lorafa.planner ...`: the same as `lorafa memory ...`."""
    p = argparse.ArgumentParser(prog="python -m lorafa.planner", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    return memory_main(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
