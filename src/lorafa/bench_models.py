"""What `lorafa bench` measures: the benchmark models (`MODELS`) and fine-tuning methods (`METHODS`).

A model is a builder plus the loss it trains with; a method is one row of the report. How a method makes a model
trainable lives in `lorafa.bench_worker`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["DEFAULT_METHODS", "DEFAULT_MODELS", "METHODS", "MODELS", "Method", "ModelSpec"]

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
