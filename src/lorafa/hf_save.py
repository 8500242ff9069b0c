"""`save_pretrained` of a model with LoRA-FA adapters, as `transformers.Trainer` and Hugging Face users call it.

`add_lorafa` swaps each target layer for a `LoRAFALinear` holding it as `base_layer`, so the model's own
`save_pretrained` would write `…q_proj.base_layer.weight` and a folder that neither transformers nor PEFT can read
(a plain `from_pretrained` re-initialises every adapted layer at random). `add_lorafa` therefore gives the model a
`save_pretrained` (an instance attribute; `remove_lorafa` takes it away) that writes one folder serving all readers:

- `config.json` and `model.safetensors` as transformers writes them, with every base weight under its plain name
  (unmerged, whatever the model's merge state) plus the adapter tensors (`…q_proj.lora_A.weight`, ...). Trainer's
  checkpoint resume and best-model reload (`load_state_dict(strict=False)`) restore base and adapter: a
  `LoRAFALinear` reads its base layer's plain names (see `lorafa.layer`).
- `adapter_config.json`, `adapter_model.safetensors` and `lorafa_config.json`, exactly what `lorafa.save_adapter`
  writes: `lorafa.load_adapter(base, folder)` and `peft.PeftModel.from_pretrained(base, folder)` load it, and
  `AutoModel*.from_pretrained(folder)` with PEFT installed loads the base from the folder and then the adapter
  (transformers' "model with an embedded adapter"), giving the trained model back. Without PEFT installed it warns
  about the adapter tensors it does not use and gives the base model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafa.layer import LoRAFALinear


def _adapted_layers(model: nn.Module) -> dict[str, LoRAFALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAFALinear)}


def plain_names(state: dict[str, torch.Tensor], layers: dict[str, LoRAFALinear]) -> dict[str, torch.Tensor]:
    """`state` with `<layer>.base_layer.<name>` renamed `<layer>.<name>` for the adapted layers in `layers`."""
    out = {}
    for key, value in state.items():
        head, sep, tail = key.rpartition(".base_layer.")
        out[f"{head}.{tail}" if sep and head in layers else key] = value
    return out


class AdapterSavePretrained:
    """Stands in for `model.save_pretrained` after `add_lorafa` (see the module doc). Holds the model, so copies
    and pickles of the model carry a working one."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        model = self.model
        plain_save = type(model).save_pretrained  # type: ignore[attr-defined]
        layers = _adapted_layers(model)
        if not layers:
            return plain_save(model, save_directory, *args, **kwargs)
        from lorafa.adapter import save_adapter

        merged = [layer for layer in layers.values() if layer.merged]
        for layer in merged:
            layer.unmerge()  # the base weights are saved as the base model had them
        try:
            state = kwargs.pop("state_dict", None)
            kwargs["state_dict"] = plain_names(model.state_dict() if state is None else state, layers)
            result = plain_save(model, save_directory, *args, **kwargs)
            if kwargs.get("is_main_process", True):
                out = Path(save_directory)
                tmp = Path(tempfile.mkdtemp(prefix=".adapter.tmp-", dir=out))
                try:
                    save_adapter(model, tmp / "adapter")
                    for f in (tmp / "adapter").iterdir():
                        os.replace(f, out / f.name)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            for layer in merged:
                layer.merge()
        return result


def install(model: nn.Module) -> None:
    """Give a transformers model (anything with `save_pretrained`) the adapter-aware `save_pretrained`."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = AdapterSavePretrained(model)  # type: ignore[assignment]


def uninstall(model: nn.Module) -> None:
    """Give the model its class's own `save_pretrained` back."""
    model.__dict__.pop("save_pretrained", None)
