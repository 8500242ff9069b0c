"""save_adapter / load_adapter in PEFT's file format (adapter_config.json + adapter_model.safetensors).

Keys follow PEFT's layout: `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, and the full state of
each modules_to_save module under `base_model.model.<module path>.<param>`. A is random and frozen, so it is saved
like B. lorafa's own settings (method, init, projection, model type) go to a side file, lorafa_config.json, which
PEFT ignores, so `PeftModel.from_pretrained` loads our folders unchanged.

Loading is strict, unlike PEFT: missing or unexpected keys, wrong shapes and a config for another architecture
raise an error naming them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorafa.config import LoRAFAConfig
from lorafa.files import atomic_write_dir
from lorafa.heads import outermost_modules
from lorafa.inject import add_lorafa, remove_lorafa, share_groups
from lorafa.layer import lorafa_layers
from lorafa.targets import is_linear, name_matches, within

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LORAFA_NAME = "lorafa_config.json"

# PEFT LoraConfig features that change the computation and that lorafa does not implement, with their neutral value.
_UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "lora_bias": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "use_qalora": False,
}
# PEFT LoRA variants enabled by any value but None (an empty dict turns KaSA on with its defaults): each changes the
# forward (aLoRA, Arrow, KaSA, BD-LoRA, MonteCLoRA) or stores extra tensors in the adapter file (VeLoRA).
_UNSUPPORTED_VARIANTS = {
    "alora_invocation_tokens": "aLoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "use_bdlora": "BD-LoRA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}
# PEFT inits that rewrite the base weights when the adapter is loaded (W - s·B0·A0 and the like); lorafa loads
# into unmodified base weights, so their outputs would differ. PEFT can convert such an adapter to plain LoRA at
# save time (save_pretrained(..., path_initial_model_for_weight_conversion=...)).
_BASE_REWRITING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")


def _task_type(model: nn.Module) -> str | None:
    n = type(model).__name__
    if n.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if n.endswith("ForCausalLM") or n.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if n.endswith("ForConditionalGeneration") or n.endswith("ForSeq2SeqLM"):
        return "SEQ_2_SEQ_LM"
    if n.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


# PEFT's task classes for these types add modules named like this to modules_to_save when they load an adapter.
_PEFT_HEAD_KEYS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score")}


def _peft_hits(names: list[str], key: str) -> set[str]:
    """The modules PEFT wraps for a modules_to_save entry `key`: it matches the end of each module's name in the
    PeftModel with `str.endswith`, without a dot boundary (peft.utils.other._set_trainable)."""
    return {n for n in names if (PREFIX + n).endswith(key)}


def _peft_modules_to_save(model: nn.Module, saved: list[str]) -> tuple[list[str] | None, str | None]:
    """(modules_to_save, task_type) to write for PEFT, such that PEFT wraps exactly the modules saved.

    Each saved module gets the shortest tail of its PEFT name that matches it alone ("norm" would also match
    "input_layernorm", "classifier" DistilBERT's "pre_classifier"). The task type is dropped (None: a plain
    PeftModel, same outputs) when PEFT's task class would add head names that select modules not saved, e.g. a
    classification head left out of modules_to_save, whose missing weights PEFT's loader cannot handle.
    """
    names = [n for n, _ in model.named_modules() if n]
    keys = []
    for module in saved:
        parts = (PREFIX + module).split(".")
        tails = [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]
        keys.append(next(t for t in tails if _peft_hits(names, t) == {module}))
    task = _task_type(model)
    implied = set().union(*(_peft_hits(names, k) for k in [*keys, *_PEFT_HEAD_KEYS.get(task or "", ())]))
    if not implied <= set(saved):
        task = None
    return keys or None, task


def _compact_targets(model: nn.Module, adapted: list[str], saved: list[str]) -> list[str]:
    """Last name components if they select exactly the adapted set (PEFT's suffix matching), else full names."""
    suffixes = sorted({n.split(".")[-1] for n in adapted})
    selected = {
        n
        for n, m in model.named_modules()
        if n and name_matches(n, suffixes) and (is_linear(m) or n in adapted) and not within(n, saved)
    }
    return suffixes if selected == set(adapted) else sorted(adapted)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors save_adapter writes, keyed as PEFT keys them."""
    layers = list(lorafa_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA-FA adapters to save (call lorafa.add_lorafa first)")
    state: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        state[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        state[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    for name in getattr(model, "lorafa_modules_to_save", []):
        for k, v in model.get_submodule(name).state_dict().items():
            state[f"{PREFIX}{name}.{k}"] = v
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_adapter(
    model: nn.Module, path: str | os.PathLike[str], base_model_name_or_path: str | None = None
) -> Path:
    """Save the adapters (and modules_to_save) of `model` to `path` in PEFT's format.

    Args:
        model: a model prepared with `add_lorafa`.
        path: output folder (replaced atomically if it holds an earlier adapter; any other existing, non-empty
            folder is an error).
        base_model_name_or_path: recorded for PEFT; defaults to `model.config._name_or_path`.

    Returns:
        The folder path.
    """
    out = Path(path)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_NAME).is_file())):
        # The folder is replaced as a whole: only ever an earlier adapter, never e.g. "." or a run folder.
        raise ValueError(
            f"{out} exists and is not an adapter folder (no {CONFIG_NAME}); save to a new folder"
        )
    state = adapter_state_dict(model)
    cfg: LoRAFAConfig = model.lorafa_config  # type: ignore[assignment]
    layers = list(lorafa_layers(model))
    saved = list(getattr(model, "lorafa_modules_to_save", []))
    config = getattr(model, "config", None)
    base = base_model_name_or_path or getattr(config, "_name_or_path", None) or None
    peft_saved, task_type = _peft_modules_to_save(model, saved)
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": _compact_targets(model, [n for n, _ in layers], saved),
        "modules_to_save": peft_saved,
        "use_rslora": cfg.use_rslora,
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
        "bias": "none",
        "init_lora_weights": "gaussian" if cfg.init_lora_weights == "gaussian" else True,
        "inference_mode": True,
    }
    lorafa_meta = {
        "format_version": 1,
        "model_type": getattr(config, "model_type", None),
        "adapter": cfg.to_dict(),
    }

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")
        (tmp / LORAFA_NAME).write_text(json.dumps(lorafa_meta, indent=2) + "\n")

    atomic_write_dir(out, write)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"adapter file missing: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"adapter file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"adapter file {path} must hold a JSON object")
    return data


def read_adapter_config(
    path: str | os.PathLike[str],
) -> tuple[LoRAFAConfig, dict[str, Any], dict[str, Any] | None]:
    """Read (LoRAFAConfig, PEFT config dict, lorafa side config or None) from an adapter folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {folder}")
    peft = _read_json(folder / CONFIG_NAME)
    meta = _read_json(folder / LORAFA_NAME) if (folder / LORAFA_NAME).exists() else None
    if peft.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder / CONFIG_NAME}: peft_type {peft.get('peft_type')!r} is not LORA")
    for key, neutral in _UNSUPPORTED.items():
        value = peft.get(key, neutral)
        if value not in (neutral, None, False, {}, []):
            raise ValueError(f"{folder / CONFIG_NAME}: {key}={value!r} is not supported by lorafa")
    for key, variant in _UNSUPPORTED_VARIANTS.items():
        if peft.get(key) is not None and peft.get(key) is not False:
            raise ValueError(
                f"{folder / CONFIG_NAME}: {key}={repr(peft[key])[:80]} turns on PEFT's {variant}, a LoRA variant "
                "lorafa does not implement (its outputs or files differ from plain LoRA's)"
            )
    init = peft.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ValueError(
            f"{folder / CONFIG_NAME}: init_lora_weights={init!r} rewrites the base weights when PEFT loads it, which "
            "lorafa does not do; save it from PEFT converted to plain LoRA "
            "(path_initial_model_for_weight_conversion) and load that"
        )
    if peft.get("bias", "none") != "none":
        raise ValueError(f"{folder / CONFIG_NAME}: bias={peft.get('bias')!r} is not supported (only 'none')")
    if meta is not None and isinstance(meta.get("adapter"), dict):
        cfg = LoRAFAConfig.from_dict(meta["adapter"])
    else:
        missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in peft]
        if missing:
            raise ValueError(f"{folder / CONFIG_NAME}: missing field(s) {missing}")
        exclude = peft.get("exclude_modules") or []
        cfg = LoRAFAConfig(
            r=int(peft["r"]),
            lora_alpha=float(peft["lora_alpha"]),
            lora_dropout=float(peft.get("lora_dropout", 0.0) or 0.0),
            target_modules=peft["target_modules"],
            exclude_modules=exclude if isinstance(exclude, str) else list(exclude),  # str: a regex, as in PEFT
            use_rslora=bool(peft.get("use_rslora", False)),
            modules_to_save=peft.get("modules_to_save"),
            init_lora_weights="gaussian" if init == "gaussian" else "kaiming",
            method="lora-fa",  # a PEFT LoRA adapter continues as LoRA-FA: its A is loaded and frozen
        )
    return cfg, peft, meta


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    f = folder / WEIGHTS_NAME
    if not f.is_file():
        raise FileNotFoundError(f"adapter file missing: {f}")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"adapter file {f} is corrupt or not a safetensors file: {e}") from e


def load_adapter(
    model: nn.Module, path: str | os.PathLike[str], method: str | None = None, is_trainable: bool = True
) -> nn.Module:
    """Load an adapter folder (ours or PEFT's) into `model`, strictly.

    If `model` has no adapters yet, they are added from the folder's config first (a PEFT LoRA adapter is
    continued as LoRA-FA unless `method="lora"`).

    Args:
        model: the base model (or one already prepared with a matching `add_lorafa`).
        path: the adapter folder.
        method: override the method recorded in the folder ("lora-fa" or "lora").
        is_trainable: if False, lora_B and modules_to_save are frozen too (inference).

    Returns:
        The model, in place.

    Raises:
        FileNotFoundError: folder or file missing. ValueError: corrupt files, another architecture, missing or
        unexpected keys, shape mismatches, a merged model.
    """
    folder = Path(path)
    cfg, _, meta = read_adapter_config(folder)
    state = _load_weights(folder)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if meta is not None and meta.get("model_type") and model_type and meta["model_type"] != model_type:
        raise ValueError(
            f"adapter {folder} was saved for model_type {meta['model_type']!r}, but this model is {model_type!r}"
        )
    if method is not None:
        cfg = LoRAFAConfig(
            **{**cfg.to_dict(), "method": method, "projection": cfg.projection and method == "lora-fa"}
        )
    injected = not any(True for _ in lorafa_layers(model))
    have = getattr(model, "lorafa_config", None)
    if not injected and isinstance(have, LoRAFAConfig):
        _check_same_computation(have, cfg, folder)
    if not injected and method is not None:
        methods = {layer.method for _, layer in lorafa_layers(model)}
        if methods != {method}:
            raise ValueError(
                f"load_adapter(method={method!r}): the model's adapters are already {sorted(methods)} (the method is "
                "chosen when adapters are added); load into a model without adapters to choose it"
            )
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        _load_into(model, folder, cfg, meta, state, injected, is_trainable)
    except BaseException:
        if injected and any(True for _ in lorafa_layers(model)):  # put the model back as it was given
            remove_lorafa(model, merge=False)
            for n, p in model.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))
        raise
    return model


def _check_same_computation(have: LoRAFAConfig, file: LoRAFAConfig, folder: Path) -> None:
    """ValueError when the file's adapters scale differently from the model's (rank, alpha, rsLoRA); a shared A
    that the file's A's do not fit is checked later, with the weights."""
    differ = [
        f"{f}: file {getattr(file, f)!r} vs model {getattr(have, f)!r}"
        for f in ("r", "lora_alpha", "use_rslora")
        if getattr(file, f) != getattr(have, f)
    ]
    if differ:
        raise ValueError(
            f"adapter {folder} was saved with other adapter settings than the model's adapters ({'; '.join(differ)});"
            " load it into a model without adapters, which gets them from the file"
        )


def _load_into(
    model: nn.Module,
    folder: Path,
    cfg: LoRAFAConfig,
    meta: dict[str, Any] | None,
    state: dict[str, torch.Tensor],
    inject: bool,
    is_trainable: bool,
) -> None:
    if inject:
        if cfg.modules_to_save:
            keys, names = cfg.modules_to_save, [n for n, _ in model.named_modules() if n]
            if meta is None:
                # PEFT records its task's usual head names (e.g. ["classifier", "score"]) and saves every module
                # whose name ends with one, without a dot boundary (peft.utils.other._set_trainable): its
                # "classifier" also saves DistilBERT's pre_classifier. Select what PEFT saved.
                present = outermost_modules(model, set().union(*(_peft_hits(names, k) for k in keys)))
            else:
                present = [k for k in keys if any(name_matches(n, [k]) for n in names)]
            cfg = LoRAFAConfig(**{**cfg.to_dict(), "modules_to_save": present or None})
        add_lorafa(model, cfg)
    layers = dict(lorafa_layers(model))
    if any(layer.merged for layer in layers.values()):
        raise ValueError("cannot load an adapter into a merged model; call lorafa.unmerge_lorafa first")

    expected: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        expected[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        expected[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    for name in getattr(model, "lorafa_modules_to_save", []):
        for k, v in model.get_submodule(name).state_dict(keep_vars=True).items():
            expected[f"{PREFIX}{name}.{k}"] = v
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter {folder} does not match the model: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)})"
        )
    bad = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if bad:
        raise ValueError(f"adapter {folder} has wrong shapes: {bad[:10]}")
    for group, members in share_groups(model).items():  # checked before anything is copied
        a0 = state[f"{PREFIX}{group}.lora_A.weight"]
        differ = [m for m in members if not torch.equal(state[f"{PREFIX}{m}.lora_A.weight"], a0)]
        if differ:
            raise ValueError(
                f"adapter {folder}: share_a needs layers {differ} to hold the same A as {group!r}, but the file's "
                "A's differ (load it without share_a)"
            )
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k].to(device=v.device, dtype=v.dtype))
    for layer in layers.values():
        layer.a_pending = False  # A comes from the file
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
