"""Which modules of a model are its task head: trained in full and saved with the adapter, never adapted.

A task head is what the pretrained checkpoint does not provide: BERT's `classifier`, DistilBERT's
`pre_classifier` + `classifier`, DeBERTa-v2's `pooler` + `classifier`, BART's and T5's `classification_head`,
XLNet's `sequence_summary` + `logits_proj`, BERT's `bert.pooler` when the checkpoint was a masked-LM one. Those
weights are random. Adapting one (frozen random W + B·A) or leaving it frozen ruins training, and not saving it
makes a reloaded adapter predict through another random head. `classification_head_names` returns the union of
rule 1 (or rule 2 for a model built in code) and rule 3; `prepare_model` puts it in modules_to_save, and
`add_lorafa` refuses to adapt, or leave frozen, a module of rule 1.

1. Loading info. `lorafa.models.load_model` records the parameter names that `from_pretrained` reported missing
   or mismatched in `model.lorafa_new_keys`. Each maps to the largest module whose parameters are all new, so
   `classifier.dense.*` + `classifier.out_proj.*` give `classifier`, and a missing `bert.pooler.dense.*` gives
   `bert.pooler` (not the pretrained `bert`); a module only partly new is named itself.
2. For a model built in code (no loading info; every weight is random, so "new" means nothing): the top-level
   children outside the backbone (`base_model`) that hold parameters, except the LM output head, i.e. the layers
   the `*For<Task>` class adds to its backbone.
3. The names in HEAD_NAMES, lorafa's original rule (and PEFT's for SEQ_CLS): a `classifier` the checkpoint did
   provide (an already fine-tuned model) still trains.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

# Heads that a task model adds on top of the backbone; trained and saved via modules_to_save, never adapted.
HEAD_NAMES = ("classifier", "score", "qa_outputs", "lm_head")

# Model classes whose `lm_head` is a task head added on the backbone (CTC's per-frame vocabulary projection, random
# on a pretrained speech encoder), not the pretrained output embedding of a language model.
LM_HEAD_TASKS = ("ForCTC",)

# The attribute `lorafa.models.load_model` sets: parameter names the checkpoint did not provide.
NEW_KEYS_ATTR = "lorafa_new_keys"


def outermost_modules(model: nn.Module, names: Iterable[str]) -> list[str]:
    """`names` without those nested in another, in the model's module order."""
    chosen = set(names)
    keep = {n for n in chosen if not any(n.startswith(o + ".") for o in chosen)}
    return [n for n, _ in model.named_modules() if n in keep]


def new_module_names(model: nn.Module, new_keys: Iterable[str] | None = None) -> list[str]:
    """The fewest modules that hold every parameter the checkpoint did not provide (rule 1 of the module doc).

    Args:
        model: a model, typically from `lorafa.models.load_model`.
        new_keys: parameter names that were newly initialised; default `model.lorafa_new_keys` (none if unset).

    Raises:
        ValueError: a new parameter belongs to the model itself rather than to a submodule, or a new module holds
            a stack of layers (the checkpoint is not one of this architecture).
    """
    keys = getattr(model, NEW_KEYS_ATTR, None) if new_keys is None else new_keys
    if not keys:
        return []
    # remove_duplicate=False: a tied parameter has a name per module, and transformers may report either.
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    new = {k for k in keys if k in params}  # buffers are computed from the config, not random
    modules = dict(model.named_modules(remove_duplicate=False))

    def all_new(name: str) -> bool:
        own = [f"{name}.{p}" for p, _ in modules[name].named_parameters(remove_duplicate=False)]
        return bool(own) and all(p in new for p in own)

    found: set[str] = set()
    for key in sorted(new):
        name = key.rpartition(".")[0]
        if not name:
            raise ValueError(
                f"the checkpoint has no weight for {key!r}, a parameter of {type(model).__name__} itself; lorafa "
                "trains and saves new weights per submodule (modules_to_save), so it cannot keep this one"
            )
        while (parent := name.rpartition(".")[0]) and all_new(parent):
            name = parent
        found.add(name)
    names = outermost_modules(model, found)
    for name in names:
        if any(isinstance(m, nn.ModuleList) for m in modules[name].modules()):
            count = sum(1 for k in new if k.startswith(name + "."))
            raise ValueError(
                f"the checkpoint provided none of the {count} weights of {name!r}, which holds a stack of layers: "
                f"it is not a pretrained checkpoint of {type(model).__name__}'s architecture (or its config differs)"
            )
    return names


def _lm_head_is_task_head(model: nn.Module) -> bool:
    return type(model).__name__.endswith(LM_HEAD_TASKS)


def _added_children(model: nn.Module) -> list[str]:
    """Top-level children with parameters outside the backbone, except the LM output head (rule 2)."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        return []
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return [
        name
        for name, child in model.named_children()
        if child is not base
        and child is not out
        and (name != "lm_head" or _lm_head_is_task_head(model))
        and any(True for _ in child.parameters())
    ]


def classification_head_names(model: nn.Module, new_keys: Iterable[str] | None = None) -> list[str]:
    """The task head of a transformers model for modules_to_save (e.g. ["classifier"], ["bert.pooler", "score"]).

    Args:
        model: a task model (sequence, token, image or audio classification, regression, question answering,
            CTC, whose `lm_head` is its head).
        new_keys: parameter names the checkpoint did not provide; default `model.lorafa_new_keys`, which
            `lorafa.models.load_model` sets. Without either, the model counts as built in code (module doc).

    Returns:
        Module names in model order, none nested in another.
    """
    keys = getattr(model, NEW_KEYS_ATTR, None) if new_keys is None else new_keys
    lm_head_task = _lm_head_is_task_head(model)
    named = [n for n, _ in model.named_children() if n in HEAD_NAMES and (n != "lm_head" or lm_head_task)]
    found = new_module_names(model, keys) if keys is not None else _added_children(model)
    return outermost_modules(model, [*named, *found])
