"""The planner's model on the meta device: its config (`load_config`, from a preset or a config.json), task,
model and batch (`build_model`, `make_batch`), the method's adapters (`prepare_method`: lorafa or a real PEFT
model) and activation checkpointing (`set_checkpointing`, `checkpointed_layers`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafa.config import LoRAFAConfig
from lorafa.data_files import one_line
from lorafa.heads import classification_head_names
from lorafa.inject import add_lorafa
from lorafa.models import enable_activation_checkpointing
from lorafa.planner_args import PRESETS, PlannerArgs, _alpha
from lorafa.targets import resolve_targets

logger = logging.getLogger(__name__)

# Size fields (any of each group's names) without which a config plans transformers' default model size.
_SIZE_FIELDS = (
    ("hidden_size", "d_model", "n_embd"),
    ("num_hidden_layers", "num_layers", "n_layer", "encoder_layers"),
    ("num_attention_heads", "num_heads", "n_head", "encoder_attention_heads"),
    ("vocab_size",),
)

__all__ = [
    "adapter_config",
    "build_model",
    "checkpointed_layers",
    "load_config",
    "make_batch",
    "prepare_method",
    "resolve_task",
    "set_checkpointing",
]

_SEQ_CLS_TYPES = ("bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "distilbert", "electra")


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
    if args.preset is None and "encoder" not in d:  # (a composite config's sizes sit in its sub-configs)
        missing = [names[0] for names in _SIZE_FIELDS if not any(n in d for n in names)]
        if missing:
            logger.warning("--config: %s sets no %s; transformers' defaults for %s are used", args.config,
                           ", ".join(missing), model_type)  # fmt: skip
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError) as e:
        raise ValueError(f"--config: unsupported model_type {model_type!r}: {e}") from e
    except Exception as e:  # e.g. huggingface_hub's strict-dataclass validation of inconsistent sizes
        raise ValueError(f"--config: {model_type} config rejected: {one_line(e)}") from e


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
    if task == "seq-cls" and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0  # decoder classifiers pool the last non-pad token; make_batch's ids are all 1
    with torch.device(device):
        model = auto.from_config(config, dtype=dtype, attn_implementation=impl)
    # With a pad id, GPT-2-style models look for padding in the input's values (a warning), which the meta device
    # has not; the planning batch has no padding, so the check is skipped.
    for module in model.modules():
        if hasattr(module, "warn_if_padding_and_no_attention_mask"):
            module.warn_if_padding_and_no_attention_mask = lambda *args, **kwargs: None
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
        exclude_modules=args.exclude_modules,
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
    else:
        if hasattr(hf, "activation_checkpointing_disable"):
            hf.activation_checkpointing_disable()
        else:
            hf.gradient_checkpointing_disable()
        # Enabling registered enable_input_require_grads' hook, which disabling leaves (without PEFT): the
        # embedding output would keep requiring grad and the first layer would keep more for backward.
        if getattr(hf, "_require_grads_hook", None) is not None:
            hf.disable_input_require_grads()


def checkpointed_layers(model: nn.Module) -> list[str]:
    """Names of the modules transformers checkpoints (its GradientCheckpointingLayer blocks)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [n for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]
