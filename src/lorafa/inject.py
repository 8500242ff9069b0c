"""add_lorafa / merge_lorafa / unmerge_lorafa / remove_lorafa: swap target linear layers of a model by name and type."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lorafa import hf_save
from lorafa.config import LoRAFAConfig
from lorafa.heads import HEAD_NAMES, NEW_KEYS_ATTR, new_module_names
from lorafa.heads import classification_head_names as classification_head_names  # re-exported, its old home
from lorafa.layer import LoRAFALinear, is_conv1d, linear_dims

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


def lorafa_layers(model: nn.Module) -> Iterator[tuple[str, LoRAFALinear]]:
    """Yield (module name, layer) for every LoRAFALinear in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRAFALinear):
            yield name, module


def _is_linear(module: nn.Module) -> bool:
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


def _within(name: str, roots: list[str]) -> bool:
    """Whether module `name` is one of `roots` or nested inside one."""
    return any(name == r or name.startswith(r + ".") for r in roots)


def _name_matches(name: str, keys: list[str]) -> bool:
    return any(name == k or name.endswith("." + k) for k in keys)


def _output_head_names(model: nn.Module) -> set[str]:
    """Linear layers "all-linear" leaves out: the output embedding, layers named like a head, and every layer
    inside the task head (`lorafa.heads.classification_head_names`, e.g. RoBERTa's classifier.dense/out_proj)."""
    task_heads = classification_head_names(model)
    heads = {n for n, m in model.named_modules() if _within(n, task_heads) and _is_linear(m)}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            heads.add(name)
        if name.split(".")[-1] in HEAD_NAMES and _is_linear(module):
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
        raw = [n for n, _ in model.named_parameters() if _name_matches(n, tm)]
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
            "transformers adds one when it loads a folder holding adapter_config.json: load the base model and "
            "then lorafa.load_adapter(model, folder)"
        )
    heads = _output_head_names(model)
    saved = _resolve_modules_to_save(model, cfg.modules_to_save or [])
    experts = _num_experts(model)
    mha = _mha_projections(model)
    names: list[str] = []
    passed: dict[str, list[str]] = {"router": [], "narrow": [], "mha": []}
    for name, module in model.named_modules():
        if not name or _name_matches(name, cfg.exclude_modules):
            continue
        if _within(name, saved):
            continue  # a module trained fully (modules_to_save) is not adapted
        if tm == "all-linear" and name in mha:
            passed["mha"].append(name)
            continue
        if tm == "all-linear":
            hit = _is_linear(module) and name not in heads
            reason = _left_alone(name, module, cfg.r, experts) if hit else None
            if reason is not None:
                passed[reason].append(name)
                continue
        elif isinstance(tm, str):
            hit = re.fullmatch(tm, name) is not None
        else:
            hit = _name_matches(name, tm)
        if not hit:
            continue
        if name in mha:
            raise ValueError(
                f"target module {name!r} is a projection of an nn.MultiheadAttention, whose forward reads its weight "
                "and bias directly (an adapter there would be bypassed); leave it out of target_modules"
            )
        if isinstance(module, LoRAFALinear):
            raise ValueError(f"module {name!r} already has a LoRA-FA adapter: add_lorafa was applied twice")
        if not _is_linear(module):
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
        linear = [n for n, m in model.named_modules() if _is_linear(m)]
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
        if _is_linear(child)
    }


def _warn_fast_path(model: nn.Module, names: list[str]) -> None:
    """Warn when an adapted layer belongs to an nn.TransformerEncoderLayer: in eval mode torch's fast path reads
    linear1/linear2's weight and bias directly (and fails on an adapted layer, which has no bias of its own)."""
    inside = [
        n for n in names if isinstance(model.get_submodule(n.rpartition(".")[0]), nn.TransformerEncoderLayer)
    ]
    if inside:
        warnings.warn(
            f"adapting {inside[:3]} inside nn.TransformerEncoderLayer: torch's fast path for eval mode reads their "
            "weight and bias directly, bypassing the adapter; call torch.backends.mha.set_fastpath_enabled(False) "
            "before evaluating",
            stacklevel=3,
        )


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


def _weight_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) → (full name, owning module) for every registration of it, tied copies and aliases included."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local, p in module._parameters.items():
            if p is not None:
                name = f"{module_name}.{local}" if module_name else local
                owners.setdefault(id(p), []).append((name, module))
    return owners


def _tied_names(owners: dict[int, list[tuple[str, nn.Module]]], base: nn.Module) -> list[str]:
    """Names under which other modules than `base` register `base`'s weight (a tied output embedding's input
    embedding); the same module under two names is not a tie."""
    weight = base._parameters.get("weight")
    return [] if weight is None else [n for n, owner in owners.get(id(weight), []) if owner is not base]


def _mark_tied(model: nn.Module, layers: list[tuple[str, LoRAFALinear]]) -> None:
    """Record each layer's tied names as the model has them now (ties may be made after add_lorafa)."""
    owners = _weight_owners(model)
    for _, layer in layers:
        layer.tied_to = tuple(_tied_names(owners, layer.base_layer))


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _module_names(model: nn.Module) -> dict[int, list[str]]:
    """id(module) → every name it has in `model` (a module registered twice, `self.b = self.a`, has two)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            names.setdefault(id(module), []).append(name)
    return names


def _replace_module(model: nn.Module, names: dict[int, list[str]], old: nn.Module, new: nn.Module) -> None:
    """Put `new` under every name `old` has (from `_module_names`, taken once per call: calls through an alias
    would otherwise bypass the adapter)."""
    for name in names.get(id(old), []):
        _set_submodule(model, name, new)


def _resolve_modules_to_save(model: nn.Module, keys: list[str]) -> list[str]:
    found = [n for n, _ in model.named_modules() if n and _name_matches(n, keys)]
    missing = [k for k in keys if not any(_name_matches(n, [k]) for n in found)]
    if missing:
        top = [n for n, _ in model.named_children()]
        raise ValueError(f"modules_to_save {missing} matched no module; top-level modules are {top}")
    return found


def add_lorafa(model: nn.Module, cfg: LoRAFAConfig) -> nn.Module:
    """Add LoRA-FA (or LoRA) adapters to `model` in place and freeze everything but the adapters' trainable part.

    Args:
        model: any torch model, typically a transformers `PreTrainedModel`.
        cfg: the adapter configuration.

    Returns:
        The same model object, with target layers replaced by `LoRAFALinear`, `model.lorafa_config` set, and (for a
        transformers model) a `save_pretrained` that writes base, adapter and PEFT files (`lorafa.hf_save`).

    Raises:
        ValueError: adapters already present, nothing matched, a match that is not a linear layer, an invalid r.
    """
    cfg.validate()
    if getattr(model, "lorafa_config", None) is not None or any(True for _ in lorafa_layers(model)):
        raise ValueError("the model already has LoRA-FA adapters: add_lorafa was applied twice")
    names = resolve_targets(model, cfg)
    saved = _resolve_modules_to_save(model, cfg.modules_to_save or [])
    _check_new_modules_saved(model, names, saved)
    _warn_frozen_head(model, saved)
    _warn_fast_path(model, names)
    owners = _weight_owners(model)
    module_names = _module_names(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        tied = _tied_names(owners, base)
        if tied:
            warnings.warn(
                f"{name}.weight is tied to {tied}: its adapter trains and saves as usual, but merge_lorafa will "
                "refuse this layer (merging would change the tied weights too)",
                stacklevel=2,
            )
        layer = LoRAFALinear(
            base,
            r=cfg.r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            method=cfg.method,
            use_rslora=cfg.use_rslora,
            init_lora_weights=cfg.init_lora_weights,
            init_seed=cfg.init_seed,
            projection=cfg.projection,
            name=name,
        )
        layer.tied_to = tuple(tied)
        layer.train(base.training)  # a new module defaults to training mode; keep the model's mode
        _replace_module(model, module_names, base, layer)
    if cfg.share_a:
        _share_a(model)
    _untie_saved(model, saved, owners)
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.lorafa_config = cfg  # type: ignore[assignment]
    model.lorafa_modules_to_save = saved  # type: ignore[assignment]
    hf_save.install(model)
    return model


def _untie_saved(model: nn.Module, saved: list[str], owners: dict[int, list[tuple[str, nn.Module]]]) -> None:
    """Give each modules_to_save module its own copy of the parameters it shares with modules outside it.

    GPT-2's lm_head shares its weight with the input embedding: training it in place would train the embedding
    too, and loading a saved lm_head would overwrite it. PEFT trains a copy of the module (ModulesToSaveWrapper)
    and leaves the original, so does lorafa, and the same adapter gives the same model in both.
    """
    copies: dict[int, nn.Parameter] = {}
    for name in saved:
        root = model.get_submodule(name)
        inside = {id(m) for m in root.modules()}
        for module in root.modules():
            for local, p in list(module._parameters.items()):
                if p is None or all(id(owner) in inside for _, owner in owners.get(id(p), [])):
                    continue
                if id(p) not in copies:
                    copies[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                setattr(module, local, copies[id(p)])


def _check_new_modules_saved(model: nn.Module, targets: list[str], saved: list[str]) -> None:
    """Raise if a module the checkpoint did not provide (lorafa.heads) would be adapted or stay frozen."""
    uncovered = [m for m in new_module_names(model) if not _within(m, saved)]
    if uncovered:
        adapted = [t for t in targets if _within(t, uncovered)]
        fate = (
            f"adapted as frozen random layers ({adapted})" if adapted else "left frozen at their random init"
        )
        raise ValueError(
            f"modules {uncovered} were newly initialised when the model was loaded (the checkpoint has no weights "
            f"for them) and would be {fate}: add them to modules_to_save so they train and are saved"
        )


# Model classes that add a head (random unless the checkpoint was fine-tuned for the task) to a backbone.
_TASK_CLASSES = (
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
    "ForImageClassification",
    "ForImageClassificationWithTeacher",
    "ForVideoClassification",
    "ForAudioClassification",
    "ForAudioFrameClassification",
    "ForXVector",
    "ForCTC",
    "ForSemanticSegmentation",
    "ForUniversalSegmentation",
    "ForInstanceSegmentation",
    "ForObjectDetection",
    "ForDepthEstimation",
)


def _warn_frozen_head(model: nn.Module, saved: list[str]) -> None:
    """Warn when a task model's head stays frozen and unsaved and it is unknown whether the checkpoint had it.

    `lorafa.models.load_model` records what the checkpoint lacked, and `_check_new_modules_saved` then raises; for
    a model loaded otherwise the head may be a trained one kept frozen on purpose, or a random one (PEFT's
    task_type SEQ_CLS would train it).
    """
    if getattr(model, NEW_KEYS_ATTR, None) is not None or not type(model).__name__.endswith(_TASK_CLASSES):
        return
    frozen = [h for h in classification_head_names(model) if not _within(h, saved)]
    if frozen:
        warnings.warn(
            f"{type(model).__name__}: its head {frozen} is not in modules_to_save, so it stays frozen and is not "
            f"saved with the adapter; pass modules_to_save={frozen} to train it (needed when the checkpoint had no "
            "weights for it; lorafa.models.load_model checks that)",
            stacklevel=3,
        )


def share_groups(model: nn.Module) -> dict[str, list[str]]:
    """share_group → names of the adapted layers in it (only groups of two or more layers exist)."""
    groups: dict[str, list[str]] = {}
    for name, layer in lorafa_layers(model):
        if layer.share_group is not None:
            groups.setdefault(layer.share_group, []).append(name)
    return groups


@torch.no_grad()
def _share_a(model: nn.Module) -> None:
    """Group adapted siblings (same parent module) by input width; give each group its first member's A."""
    groups: dict[tuple[str, int], list[tuple[str, LoRAFALinear]]] = {}
    for name, layer in lorafa_layers(model):
        groups.setdefault((name.rpartition(".")[0], layer.in_features), []).append((name, layer))
    for members in groups.values():
        if len(members) < 2:
            continue
        first_name, first = members[0]
        for _, layer in members:
            layer.lora_A.weight.copy_(first.lora_A.weight)
            layer.share_group = first_name


def _require_adapters(model: nn.Module) -> list[tuple[str, LoRAFALinear]]:
    layers = list(lorafa_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA-FA adapters (call lorafa.add_lorafa first)")
    return layers


def _mergeable_adapters(model: nn.Module) -> list[tuple[str, LoRAFALinear]]:
    """The model's adapted layers, after checking that every one can merge (so none is merged when one cannot)."""
    layers = _require_adapters(model)
    _mark_tied(model, layers)
    for _, layer in layers:
        layer.check_mergeable()
    return layers


def merge_lorafa(model: nn.Module) -> nn.Module:
    """Fold s·B·A into every adapted base weight (idempotent); the adapters stay attached for unmerge.

    Raises:
        ValueError: a layer's base weight is tied to another module's (merging would change that module too).
    """
    for _, layer in _mergeable_adapters(model):
        layer.merge()
    return model


def unmerge_lorafa(model: nn.Module) -> nn.Module:
    """Undo `merge_lorafa` (idempotent)."""
    for _, layer in _require_adapters(model):
        layer.unmerge()
    return model


def remove_lorafa(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the base layers back, merged with their adapters when `merge` (a plain model to `save_pretrained`).

    Parameters' requires_grad flags are left as they are (all frozen after add_lorafa).

    Raises:
        ValueError: `merge` and a layer that cannot merge (`merge_lorafa`); the model is left unchanged.
    """
    module_names = _module_names(model)
    for _, layer in _mergeable_adapters(model) if merge else _require_adapters(model):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _replace_module(model, module_names, layer, layer.base_layer)
    for attr in ("lorafa_config", "lorafa_modules_to_save"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
