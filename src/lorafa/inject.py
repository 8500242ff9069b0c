"""add_lorafa / merge_lorafa / unmerge_lorafa / remove_lorafa: swap target linear layers of a model by name and type."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lorafa import hf_save
from lorafa.config import LoRAFAConfig
from lorafa.heads import NEW_KEYS_ATTR, classification_head_names, new_module_names
from lorafa.layer import LoRAFALinear, lorafa_layers
from lorafa.targets import DEFAULT_TARGETS as DEFAULT_TARGETS  # re-exported, its old home
from lorafa.targets import resolve_modules_to_save, resolve_targets, within
from lorafa.ties import mark_tied, tied_names, untie_saved, weight_owners


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
    saved = resolve_modules_to_save(model, cfg.modules_to_save or [])
    _check_new_modules_saved(model, names, saved)
    _warn_frozen_head(model, saved)
    _warn_fast_path(model, names)
    owners = weight_owners(model)
    module_names = _module_names(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        tied = tied_names(owners, base)
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
    untie_saved(model, saved, owners)
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.lorafa_config = cfg  # type: ignore[assignment]
    model.lorafa_modules_to_save = saved  # type: ignore[assignment]
    hf_save.install(model)
    return model


def _check_new_modules_saved(model: nn.Module, targets: list[str], saved: list[str]) -> None:
    """Raise if a module the checkpoint did not provide (lorafa.heads) would be adapted or stay frozen."""
    uncovered = [m for m in new_module_names(model) if not within(m, saved)]
    if uncovered:
        adapted = [t for t in targets if within(t, uncovered)]
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
    frozen = [h for h in classification_head_names(model) if not within(h, saved)]
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
    mark_tied(model, layers)
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
