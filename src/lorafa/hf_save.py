"""`save_pretrained` of a model with LoRA-FA adapters, as `transformers.Trainer` and Hugging Face users call it.

`add_lorafa` swaps each target layer for a `LoRAFALinear` holding it as `base_layer`, so the model's own
`save_pretrained` would write `…q_proj.base_layer.weight` and a folder that neither transformers nor PEFT can read
(a plain `from_pretrained` re-initialises every adapted layer at random). `add_lorafa` therefore gives the model a
`save_pretrained` (an instance attribute, kept after `remove_lorafa`, when it saves the plain model and deletes
the adapter files an earlier save of the adapted model left in the folder) that writes one folder serving all
readers:

- `config.json` and `model.safetensors` as transformers writes them, with every base weight under its plain name
  (unmerged, whatever the model's merge state; a merged 16-bit weight comes back as (W + Δ) − Δ, off W by up to
  half a unit in the last place of W + Δ) plus the adapter tensors (`…q_proj.lora_A.weight`, ...). Trainer's
  checkpoint resume and best-model reload (`load_state_dict(strict=False)`) restore base and adapter: a
  `LoRAFALinear` reads its base layer's plain names (see `lorafa.layer`).
- `adapter_config.json`, `adapter_model.safetensors` and `lorafa_config.json`, exactly what `lorafa.save_adapter`
  writes: `lorafa.load_adapter(base, folder)` and `peft.PeftModel.from_pretrained(base, folder)` load it, and
  `AutoModel*.from_pretrained(folder)` with PEFT installed loads the base from the folder and then the adapter
  (transformers' "model with an embedded adapter"), giving the trained model back. Without PEFT installed it warns
  about the adapter tensors it does not use and gives the base model (with any trained `modules_to_save`).

A model class that replaces transformers' `load_adapter` with its own (the Wav2Vec2 family's, for MMS language
adapters) would fail in `from_pretrained(folder)` on those files, so for it they go to `folder/adapter`
(`ADAPTER_SUBFOLDER`), with a logged warning: `from_pretrained(folder)` gives the base model, and
`lorafa.load_adapter(model, folder/"adapter")` or `PeftModel.from_pretrained(model, folder/"adapter")` the trained one.

`save_pretrained(push_to_hub=True)` is refused (transformers uploads before the adapter files are written);
`model.push_to_hub(repo)` saves through this method into a temporary folder first. A model pushed so records its
base as the adapter's `base_model_name_or_path` (the local path or Hub id it was loaded from), which is where
transformers' `from_pretrained(repo)` then loads the base from.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafa.layer import LoRAFALinear

logger = logging.getLogger(__name__)

ADAPTER_SUBFOLDER = "adapter"
"""Where the PEFT files go for a model class with its own `load_adapter` (Wav2Vec2 family): see
`_has_own_load_adapter`."""


def _adapted_layers(model: nn.Module) -> dict[str, LoRAFALinear]:
    # remove_duplicate=False: a layer registered under two names has its state under both
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, LoRAFALinear)}


def plain_names(state: dict[str, torch.Tensor], layers: dict[str, LoRAFALinear]) -> dict[str, torch.Tensor]:
    """`state` with `<layer>.base_layer.<name>` renamed `<layer>.<name>` for the adapted layers in `layers`."""
    out = {}
    for key, value in state.items():
        head, sep, tail = key.rpartition(".base_layer.")
        out[f"{head}.{tail}" if sep and head in layers else key] = value
    return out


class AdapterSavePretrained:
    """Stands in for `model.save_pretrained` after `add_lorafa` (see the module doc). Holds the model weakly (no
    reference cycle keeps a deleted model's weights alive); copies and pickles of the model get their own."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise ReferenceError(
                "save_pretrained: the model was freed (it holds its save_pretrained weakly, so that deleting it frees "
                "its memory); call it on a model you keep a reference to, e.g. model = lorafa.add_lorafa(...)"
            )
        return model

    def __reduce__(self) -> tuple[Any, ...]:
        return (AdapterSavePretrained, (self.model,))

    def __deepcopy__(self, memo: dict[int, Any]) -> AdapterSavePretrained:
        # copy.deepcopy of the model registers the copy in memo before copying its attributes: this is the copy.
        return AdapterSavePretrained(copy.deepcopy(self.model, memo))

    def __call__(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        model = self.model
        plain_save = type(model).save_pretrained  # type: ignore[attr-defined]
        # Keyword view of the call (is_main_process and state_dict may come positionally).
        bound = inspect.signature(plain_save).bind(model, save_directory, *args, **kwargs)
        kwargs = {k: v for k, v in bound.arguments.items() if k not in ("self", "save_directory")}
        kwargs.update(kwargs.pop("kwargs", {}))
        main = kwargs.get("is_main_process", True)
        # Imported here: lorafa.adapter imports lorafa.inject, which imports this module.
        from lorafa.adapter import LORAFA_NAME, save_adapter

        if kwargs.get("push_to_hub"):
            raise ValueError(
                "save_pretrained(push_to_hub=True) of a model with LoRA-FA adapters would upload before the adapter "
                "files are written; call model.push_to_hub(repo_id) instead (it saves through this method first)"
            )
        layers = _adapted_layers(model)
        if not layers:  # after remove_lorafa: a plain model, without an earlier save's adapter files beside it
            result = plain_save(model, save_directory, **kwargs)
            if main:
                _remove_adapter_files(Path(save_directory))
                if (Path(save_directory) / ADAPTER_SUBFOLDER / LORAFA_NAME).is_file():
                    shutil.rmtree(Path(save_directory) / ADAPTER_SUBFOLDER)
            return result
        state = kwargs.pop("state_dict", None)
        if state is None:
            state = model.state_dict()  # base weights unmerged, whatever the merge state (LoRAFALinear's hook)
        else:
            # A caller's copy may hold W + s·B·A (e.g. gathered under ZeRO-3, past the layers' state-dict hook):
            # take each merged layer's unmerged tensors.
            state = dict(state)
            for name, layer in layers.items():
                if layer.merged:
                    for local, tensor in layer.state_dict().items():
                        if f"{name}.{local}" in state:
                            state[f"{name}.{local}"] = tensor
        kwargs["state_dict"] = plain_names(state, layers)
        result = plain_save(model, save_directory, **kwargs)
        if main and _has_own_load_adapter(model):
            sub = Path(save_directory) / ADAPTER_SUBFOLDER
            save_adapter(model, sub)
            _remove_adapter_files(Path(save_directory))  # an earlier save's files, which would fail to load
            logger.warning(
                "%s overrides transformers' load_adapter (for its own adapters), so from_pretrained could not read "
                "PEFT files in %s: the LoRA-FA adapter is in %s; load it with lorafa.load_adapter(model, %r) or "
                "PeftModel.from_pretrained(model, %r) on the model from_pretrained gives",
                type(model).__name__, save_directory, sub, str(sub), str(sub),
            )  # fmt: skip
        elif main:
            out = Path(save_directory)
            tmp = Path(tempfile.mkdtemp(prefix=".adapter.tmp-", dir=out))
            try:
                save_adapter(model, tmp / "adapter")
                for f in (tmp / "adapter").iterdir():
                    os.replace(f, out / f.name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return result


def _remove_adapter_files(folder: Path) -> None:
    """Delete the PEFT adapter files an earlier save wrote into `folder` (recognised by lorafa's own file)."""
    from lorafa.adapter import CONFIG_NAME, LORAFA_NAME, WEIGHTS_NAME

    if (folder / LORAFA_NAME).is_file():
        for name in (LORAFA_NAME, CONFIG_NAME, WEIGHTS_NAME):
            (folder / name).unlink(missing_ok=True)


def _has_own_load_adapter(model: nn.Module) -> bool:
    """Whether the model's class replaces transformers' PEFT `load_adapter` (Wav2Vec2's loads MMS language
    adapters), which `from_pretrained` calls when the folder holds adapter_config.json, and which then fails."""
    try:
        from transformers.integrations.peft import PeftAdapterMixin
    except ImportError:  # pragma: no cover - transformers without its PEFT integration
        return False
    own = getattr(type(model), "load_adapter", None)
    return own is not None and own is not PeftAdapterMixin.load_adapter


def install(model: nn.Module) -> None:
    """Give a transformers model (anything with `save_pretrained`) the adapter-aware `save_pretrained`."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = AdapterSavePretrained(model)  # type: ignore[assignment]


