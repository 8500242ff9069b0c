"""Weights a model registers under more than one module (tied embeddings): found before merging, copied for
modules_to_save."""

from __future__ import annotations

from torch import nn

from lorafa.layer import LoRAFALinear


def weight_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) → (full name, owning module) for every registration of it, tied copies and aliases included."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local, p in module._parameters.items():
            if p is not None:
                name = f"{module_name}.{local}" if module_name else local
                owners.setdefault(id(p), []).append((name, module))
    return owners


def tied_names(owners: dict[int, list[tuple[str, nn.Module]]], base: nn.Module) -> list[str]:
    """Names under which other modules than `base` register `base`'s weight (a tied output embedding's input
    embedding); the same module under two names is not a tie."""
    weight = base._parameters.get("weight")
    return [] if weight is None else [n for n, owner in owners.get(id(weight), []) if owner is not base]


def mark_tied(model: nn.Module, layers: list[tuple[str, LoRAFALinear]]) -> None:
    """Record each layer's tied names as the model has them now (ties may be made after add_lorafa)."""
    owners = weight_owners(model)
    for _, layer in layers:
        layer.tied_to = tuple(tied_names(owners, layer.base_layer))


def untie_saved(model: nn.Module, saved: list[str], owners: dict[int, list[tuple[str, nn.Module]]]) -> None:
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
