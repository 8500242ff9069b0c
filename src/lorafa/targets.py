"""Which modules of a model get adapters: per-architecture defaults, "all-linear", names, suffixes and regexes."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from lorafa.config import LoRAFAConfig
from lorafa.heads import HEAD_NAMES, classification_head_names
from lorafa.layer import LoRAFALinear, is_conv1d, linear_dims, lorafa_layers

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# Every linear layer of the transformer blocks (attention and MLP) of the paper's families, and GPT-2. LoRA-FA's
# activation saving grows with the number of adapted layers and QLoRA (Dettmers et al. 2023) found adapting all
# block linears matters for quality, so that is the default. Heads and poolers are not adapted.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    # transformers >= 5 fuses each MoE layer's experts into 3-D parameters (experts.gate_up_proj/down_proj), which
    # are not linear layers, so only attention can be adapted (PEFT's own default here is attention too).
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": _LLAMA_LIKE,
    # Attention and the shared expert's MLP; not the shared expert's one-output gate (nor the fused experts).
    "qwen2_moe": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    # Falcon-H1's Mamba mixer hands in_proj/out_proj's weight and bias straight to its scan (an adapter there would
    # be bypassed), so attention and MLP only.
    "falcon_h1": _LLAMA_LIKE,
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
    "mt5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


# Architectures where adapting every linear layer (the fallback) would silently leave out a part of each block.
NO_DEFAULT_TARGETS: dict[str, str] = {
    "xlnet": "XLNet's attention keeps its projections (q, k, v, o, r) as raw parameters, not linear layers, so "
    "only its feed-forward layers can be adapted; set target_modules=['layer_1', 'layer_2'] to do that knowingly",
}


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _is_quantized(module: nn.Module) -> bool:
    """A linear layer whose weight is not a plain floating-point tensor: bitsandbytes' Linear4bit / Linear8bitLt
    (nn.Linear subclasses, quantized when moved to the GPU), or a weight held as a quantized tensor subclass
    (torchao)."""
    weight = getattr(module, "weight", None)
    if type(module).__module__.split(".")[0] == "bitsandbytes":
        return True
    return isinstance(weight, torch.Tensor) and (
        not weight.dtype.is_floating_point or type(weight) not in (nn.Parameter, torch.Tensor)
    )


def within(name: str, roots: list[str]) -> bool:
    """Whether module `name` is one of `roots` or nested inside one."""
    return any(name == r or name.startswith(r + ".") for r in roots)


def name_matches(name: str, keys: list[str]) -> bool:
    return any(name == k or name.endswith("." + k) for k in keys)


# A module name or dotted suffix (q_proj, self_attn.q_proj); anything else given as one string is a regex.
_MODULE_NAME = re.compile(r"[\w\-]+(?:\.[\w\-]+)*")


def module_spec(text: str) -> list[str] | str | None:
    """One target_modules / exclude_modules string as configs and command lines give it: "all-linear" (any case),
    or a plain module name or dotted suffix as a one-name list (as a regex, "o_proj" would have to be a whole
    top-level name and match nothing); None for anything else, which the caller reads as a regex."""
    value = text.strip()
    if value.lower() == "all-linear":
        return "all-linear"
    return [value] if _MODULE_NAME.fullmatch(value) else None


def excluded(name: str, exclude: list[str] | str) -> bool:
    """Whether `exclude_modules` leaves module `name` out: a regex (str) matches the full name, as in PEFT; a
    list holds names or suffixes."""
    return re.fullmatch(exclude, name) is not None if isinstance(exclude, str) else name_matches(name, exclude)


def _named_by(tm: list[str] | str, name: str, module: nn.Module) -> bool:
    """Whether target_modules `tm` ("all-linear", a regex, or names/suffixes) names module `name` (all-linear: any
    linear layer; `resolve_targets` then leaves heads, routers and narrow layers out)."""
    if tm == "all-linear":
        return is_linear(module)
    if isinstance(tm, str):
        return re.fullmatch(tm, name) is not None
    return name_matches(name, tm)


def _unused_excludes(model: nn.Module, exclude: list[str] | str) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    keys = [exclude] if isinstance(exclude, str) else list(exclude)
    return [k for k in keys if not any(excluded(n, k if isinstance(exclude, str) else [k]) for n in names)]


def _output_head_names(model: nn.Module) -> set[str]:
    """Linear layers "all-linear" leaves out: the output embedding, layers named like a head, and every layer
    inside the task head (`lorafa.heads.classification_head_names`, e.g. RoBERTa's classifier.dense/out_proj)."""
    task_heads = classification_head_names(model)
    heads = {n for n, m in model.named_modules() if within(n, task_heads) and is_linear(m)}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            heads.add(name)
        if name.split(".")[-1] in HEAD_NAMES and is_linear(module):
            heads.add(name)
    return heads


def resolve_targets(model: nn.Module, cfg: LoRAFAConfig) -> list[str]:
    """Names of the modules `cfg` adapts in `model`; raises ValueError when nothing matches or a match isn't linear."""
    tm = cfg.target_modules
    if tm is None:
        model_type = str(getattr(getattr(model, "config", None), "model_type", None))
        if model_type in NO_DEFAULT_TARGETS:
            raise ValueError(
                f"target_modules: no default for model_type {model_type!r}: {NO_DEFAULT_TARGETS[model_type]}"
            )
        tm = DEFAULT_TARGETS.get(model_type, "all-linear")
    elif isinstance(tm, list):
        raw = [n for n, _ in model.named_parameters() if name_matches(n, tm)]
        if raw:
            raise ValueError(
                f"target_modules {tm} name parameters, not modules: {raw[:4]}; lorafa adapts nn.Linear and Conv1D "
                "layers only (fused weights such as transformers' MoE experts cannot be adapted)"
            )
    peft = next(
        (
            n
            for n, m in model.named_modules()
            if hasattr(m, "base_layer") and hasattr(m, "lora_A") and not isinstance(m, LoRAFALinear)
        ),
        None,
    )  # (a LoRAFALinear there means "applied twice", reported below)
    if peft is not None:
        raise ValueError(
            f"module {peft!r} already has a PEFT adapter ({type(model.get_submodule(peft)).__module__}); "
            "(from get_peft_model, or from transformers, which adds one when it loads a folder holding "
            "adapter_config.json); add lorafa's adapters to the base model, or lorafa.load_adapter(base, folder)"
        )
    heads = _output_head_names(model)
    saved = resolve_modules_to_save(model, cfg.modules_to_save or [])
    experts = _num_experts(model)
    mha = _mha_projections(model)
    names: list[str] = []
    passed: dict[str, list[str]] = {"router": [], "narrow": [], "mha": []}
    left_out: list[str] = []  # targets that exclude_modules removed
    for name, module in model.named_modules():
        if not name:
            continue
        if excluded(name, cfg.exclude_modules):
            if _named_by(tm, name, module):
                left_out.append(name)
            continue
        if within(name, saved):
            continue  # a module trained fully (modules_to_save) is not adapted
        if tm == "all-linear" and name in mha:
            passed["mha"].append(name)
            continue
        hit = _named_by(tm, name, module)
        if tm == "all-linear":
            hit = hit and name not in heads
            reason = _left_alone(name, module, cfg.r, experts) if hit else None
            if reason is not None:
                passed[reason].append(name)
                continue
        if not hit:
            continue
        if name in mha:
            raise ValueError(
                f"target module {name!r} is a projection of an nn.MultiheadAttention, whose forward reads its weight "
                "and bias directly (an adapter there would be bypassed); leave it out of target_modules"
            )
        if isinstance(module, LoRAFALinear):
            raise ValueError(f"module {name!r} already has a LoRA-FA adapter: add_lorafa was applied twice")
        if not is_linear(module):
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}, not an nn.Linear or Conv1D; "
                "name the linear layers inside it instead"
            )
        if _is_quantized(module):
            raise ValueError(
                f"target module {name!r} is a quantized layer ({type(module).__module__}.{type(module).__name__}, "
                f"weight {type(module.weight).__name__} {module.weight.dtype}): lorafa's layer multiplies by the "
                "base weight itself, so it adapts unquantized fp32/bf16/fp16 weights only; load the model without "
                "quantization (e.g. dtype=torch.bfloat16)"
            )
        names.append(name)
    unused = _unused_excludes(model, cfg.exclude_modules)
    if unused:
        warnings.warn(
            f"exclude_modules {unused} matched no module (a string is a regex over full module names, e.g. "
            "'.*attention.*'; a list holds names or suffixes)",
            stacklevel=3,
        )
    if passed["router"]:
        warnings.warn(
            f"target_modules=all-linear: not adapting {len(passed['router'])} MoE router or gate layers (an output "
            f"per expert, or a single output), e.g. {passed['router'][:3]}; name them in target_modules to adapt them",
            stacklevel=3,
        )
    if passed["mha"]:
        warnings.warn(
            f"target_modules=all-linear: not adapting {len(passed['mha'])} projections of nn.MultiheadAttention "
            f"(its forward reads their weight and bias directly, bypassing an adapter), e.g. {passed['mha'][:3]}",
            stacklevel=3,
        )
    if passed["narrow"] and names:
        warnings.warn(
            f"target_modules=all-linear: not adapting {len(passed['narrow'])} layers narrower than r={cfg.r} "
            f"(min(d_in, d_out) < r), e.g. {passed['narrow'][:3]}",
            stacklevel=3,
        )
    if not names and passed["narrow"]:
        raise ValueError(
            f"r={cfg.r} is larger than every linear layer's min(d_in, d_out) this model has to adapt, e.g. "
            f"{passed['narrow'][:3]}; choose a smaller r"
        )
    if not names:
        if any(True for _ in lorafa_layers(model)):
            raise ValueError("the model already has LoRA-FA adapters: add_lorafa was applied twice")
        if left_out:
            raise ValueError(
                f"target_modules={tm!r} matched only modules that exclude_modules={cfg.exclude_modules!r} leaves "
                f"out, e.g. {left_out[:3]}"
            )
        linear = [n for n, m in model.named_modules() if is_linear(m)]
        raise ValueError(
            f"no module matched target_modules={tm!r}; linear modules in this model include: {linear[:8]}"
        )
    return names


def _mha_projections(model: nn.Module) -> set[str]:
    """Names of the linear children of every nn.MultiheadAttention: torch's forward hands out_proj.weight and .bias
    to F.multi_head_attention_forward instead of calling out_proj, so an adapter there is bypassed (and crashes)."""
    return {
        f"{name}.{child_name}" if name else child_name
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child_name, child in module.named_children()
        if is_linear(child)
    }


def _num_experts(model: nn.Module) -> int | None:
    """The number of routed experts of a mixture-of-experts config, or None."""
    config: Any = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        n = getattr(text, attr, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 1:
            return n
    return None


def _left_alone(name: str, module: nn.Module, r: int, experts: int | None) -> str | None:
    """Why all-linear leaves a linear layer alone: "router" for an MoE router (named *gate*/*router*, one output
    per expert) or a one-output gate (Qwen2-MoE's shared-expert gate), "narrow" for a layer where a rank-r adapter
    does not fit (min(d_in, d_out) < r); None to adapt it."""
    d_in, d_out = linear_dims(module)
    if d_out == 1 or (d_out == experts and any(k in p for p in name.split(".")[-2:] for k in ("gate", "router"))):
        return "router"
    return "narrow" if min(d_out, d_in) < r else None


def resolve_modules_to_save(model: nn.Module, keys: list[str]) -> list[str]:
    found = [n for n, _ in model.named_modules() if n and name_matches(n, keys)]
    missing = [k for k in keys if not any(name_matches(n, [k]) for n in found)]
    if missing:
        top = [n for n, _ in model.named_children()]
        raise ValueError(f"modules_to_save {missing} matched no module; top-level modules are {top}")
    return found
