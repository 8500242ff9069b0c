"""Memory accounting: bytes autograd saves for backward (per module), peak memory of a step, static parts.

`SavedTensorTracker` records every tensor autograd saves during a forward pass (through
`torch.autograd.graph.saved_tensors_hooks`) and counts each underlying storage once: a view of a saved tensor, a
tensor saved by two ops, or a parameter (or a view of one) costs nothing extra. It works on any device, including
`meta` (where storages have no address, so a storage is identified by its StorageImpl pointer `_cdata`), and under
non-reentrant activation checkpointing, where the checkpointed region installs its own, innermost hooks: what the
tracker then sees is what is really kept after the forward, i.e. the checkpoint inputs.

`static_memory` counts weights, gradients and optimizer states; `peak_memory_bytes` reads the peak of a real step.
"""

from __future__ import annotations

import resource
import sys
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from lorafa.layer import LoRAFALinear

CATEGORIES = ("attention", "mlp", "norm", "adapter", "embedding", "head", "loss", "other")

# Type-name fragments of transformers modules, searched from the innermost module outwards. "SelfOutput" is
# BERT/RoBERTa's attention output block (dense + dropout + LayerNorm); their plain "Output" is the FFN's.
_ATTENTION_TYPES = ("Attention", "SelfOutput")
_MLP_TYPES = (
    "MLP",
    "Intermediate",
    "Output",
    "LayerFF",
    "DenseActDense",
    "DenseGatedActDense",
    "FeedForward",
)
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "pooler")


@dataclass
class SavedRecord:
    """One unique storage saved for backward."""

    module: str
    """Qualified name of the innermost module whose forward was running when the storage was first saved."""
    nbytes: int
    """Size of the whole storage (a saved view keeps its whole storage alive)."""
    dtype: torch.dtype
    """dtype of the first tensor saved on this storage."""
    shape: tuple[int, ...]
    """Shape of the first tensor saved on this storage."""


def _storage_key(t: Tensor) -> tuple[str, int]:
    # The StorageImpl pointer identifies a storage among live ones on every device; on meta, data_ptr() is 0.
    return (t.device.type, t.untyped_storage()._cdata)


class SavedTensorTracker:
    """Context manager recording the unique storages autograd saves for backward, per module.

    Example:
        >>> with SavedTensorTracker(model) as tracker:
        ...     loss = model(**batch).loss
        >>> tracker.total_bytes, tracker.by_module, tracker.by_category()

    Args:
        model: optional; its parameters and buffers are excluded, and its modules' names are used for the
            per-module breakdown. Without a model, parameters of any `nn.Module` that runs are excluded and
            modules are named by type.

    Attributes:
        records: one `SavedRecord` per unique storage, in the order first saved.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model
        self.records: list[SavedRecord] = []
        self._live: dict[tuple[str, int], tuple[SavedRecord, list[int]]] = {}
        self._excluded: set[tuple[str, int]] = set()
        self._stack: list[str] = []
        self._handles: list[Any] = []
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._names: dict[int, str] = {}

    # ---- context manager -------------------------------------------------------------------------------------
    def __enter__(self) -> SavedTensorTracker:
        self.records.clear()
        self._live.clear()
        self._stack.clear()
        if self.model is not None:
            tensors = [*self.model.parameters(), *self.model.buffers()]
            self._excluded = {_storage_key(t) for t in tensors}
            self._names = {id(m): name for name, m in self.model.named_modules()}
            # An adapted layer never calls its base layer or lora_A/lora_B (one fused Function), and a hook on them
            # would send it down its slower hooked path (`LoRAFALinear._forward_through_base`): skip them.
            inner = {id(c) for m in self.model.modules() if isinstance(m, LoRAFALinear) for c in m.children()}
            for m in self.model.modules():
                if id(m) in inner:
                    continue
                self._handles.append(m.register_forward_pre_hook(self._pre_hook))
                self._handles.append(m.register_forward_hook(self._post_hook, always_call=True))
        else:
            self._handles.append(nn.modules.module.register_module_forward_pre_hook(self._pre_hook))
            self._handles.append(
                nn.modules.module.register_module_forward_hook(self._post_hook, always_call=True)
            )
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(exc_type, exc, tb)
            self._hooks = None
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ---- hooks ----------------------------------------------------------------------------------------------
    def _module_name(self, module: nn.Module) -> str:
        if self.model is None:
            return type(module).__name__
        return self._names.get(id(module), type(module).__name__)

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        if self.model is None:
            # Without a model, parameters are only known once their module runs.
            for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                self._excluded.add(_storage_key(t))
        self._stack.append(self._module_name(module))

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self._module_name(module)
        # Pop up to and including this module: an exception may have skipped inner post hooks.
        while self._stack:
            if self._stack.pop() == name:
                break

    def _pack(self, t: Tensor) -> Tensor:
        packed = t.detach()  # a reference to `t` itself would make a cycle through its grad_fn
        if t.layout != torch.strided:
            return packed
        key = _storage_key(t)
        if key in self._excluded:
            return packed
        entry = self._live.get(key)
        if entry is None:
            nbytes = t.untyped_storage().nbytes()
            record = SavedRecord(self._stack[-1] if self._stack else "", nbytes, t.dtype, tuple(t.shape))
            self.records.append(record)
            entry = (record, [0])
            self._live[key] = entry
        entry[1][0] += 1
        # When the graph frees its last reference to this storage, the address may be reused by a new storage,
        # which must then count as new.
        weakref.finalize(packed, self._release, key, entry)
        return packed

    def _release(self, key: tuple[str, int], entry: tuple[SavedRecord, list[int]]) -> None:
        entry[1][0] -= 1
        if entry[1][0] == 0 and self._live.get(key) is entry:
            del self._live[key]

    @staticmethod
    def _unpack(t: Tensor) -> Tensor:
        return t

    # ---- results --------------------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        """Bytes of all unique storages saved for backward (parameters and buffers excluded)."""
        return sum(r.nbytes for r in self.records)

    @property
    def by_module(self) -> dict[str, int]:
        """Bytes per module name (the innermost module running when the storage was first saved)."""
        out: dict[str, int] = defaultdict(int)
        for r in self.records:
            out[r.module] += r.nbytes
        return dict(out)

    def by_category(self) -> dict[str, int]:
        """Bytes per category: attention, mlp, norm, adapter, embedding, head, loss, other (all keys present).

        "loss" is what the top-level model saves outside any submodule (the loss, logits upcasts); "head" is a
        task head (lm_head, classifier, score, pooler).
        """
        out = dict.fromkeys(CATEGORIES, 0)
        for name, nbytes in self.by_module.items():
            out[self.category(name)] += nbytes
        return out

    def category(self, name: str) -> str:
        """The category of the module called `name` (see `by_category`)."""
        if self.model is None:
            return _category_of_types([name], [name])
        parts = name.split(".")
        chain = [".".join(parts[: i + 1]) for i in range(len(parts))]
        types = []
        for n in chain:
            try:
                types.append(type(self.model.get_submodule(n)).__name__)
            except AttributeError:
                types.append("")
        return _category_of_types(parts, types)


def _category_of_types(parts: list[str], types: list[str]) -> str:
    # parts/types go from the outermost module to the innermost one. A task model (…ForCausalLM, PEFT's
    # wrappers) computes the loss in its own forward, outside any submodule.
    if parts == [""] or "For" in types[-1] or types[-1] in ("LoraModel", "PeftModel"):
        return "loss"
    if any(t == "LoRAFALinear" for t in types) or any(p.startswith("lora_") for p in parts):
        return "adapter"
    leaf = types[-1]
    if "Norm" in leaf:
        return "norm"
    if "Embedding" in leaf or "embed" in parts[-1]:
        return "embedding"
    if any(p in _HEAD_NAMES for p in parts):
        return "head"
    for part, typ in zip(reversed(parts), reversed(types), strict=True):
        if any(k in typ for k in _ATTENTION_TYPES) or "attn" in part or "attention" in part:
            return "attention"
        if any(k in typ for k in _MLP_TYPES) or part in ("mlp", "ffn", "feed_forward"):
            return "mlp"
    if "Loss" in leaf:
        return "loss"
    return "other"


# ---- peak memory ----------------------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device | str) -> None:
    """Reset CUDA's peak counter (the process peak RSS on CPU cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory: `torch.cuda.max_memory_allocated` on CUDA, else the process peak RSS (getrusage)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


# ---- static memory --------------------------------------------------------------------------------------------
_HALF = (torch.float16, torch.bfloat16)
OPTIMIZERS = ("adamw", "sgd", "none")


@dataclass
class StaticMemory:
    """Memory that does not depend on the batch: weights, gradients, optimizer states, master weights."""

    weights_by_dtype: dict[str, int] = field(default_factory=dict)
    """Bytes of parameters and buffers per dtype name, e.g. {"bfloat16": ...}."""
    grads: int = 0
    """Gradients of trainable parameters (in the parameter's dtype)."""
    optimizer: int = 0
    """Optimizer states (AdamW: two moments per trainable parameter)."""
    master_weights: int = 0
    """fp32 copies of trainable fp16/bf16 parameters (mixed precision)."""
    trainable_params: int = 0
    """Number of trainable parameters."""
    total_params: int = 0
    """Number of parameters."""

    @property
    def weights(self) -> int:
        """Bytes of all parameters and buffers."""
        return sum(self.weights_by_dtype.values())

    @property
    def total(self) -> int:
        """weights + grads + optimizer + master weights."""
        return self.weights + self.grads + self.optimizer + self.master_weights


def static_memory(model: nn.Module, optimizer: str = "adamw", mixed_precision: bool = True) -> StaticMemory:
    """Bytes of weights, gradients and optimizer states of `model` (no batch-dependent memory).

    Args:
        model: a model on any device (meta works); trainable = `requires_grad`.
        optimizer: "adamw" (two moments per trainable parameter), "sgd" (no momentum: no state) or "none"
            (no optimizer and no gradients: inference).
        mixed_precision: True: the usual mixed-precision recipe, AdamW moments in fp32 and an fp32 master copy
            of every trainable fp16/bf16 parameter. False: what `torch.optim.AdamW` does on the parameters as
            they are, moments in the parameter's dtype and no master copy.

    Returns:
        A `StaticMemory`.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    out = StaticMemory()
    seen: set[tuple[str, int]] = set()
    for t in (*model.parameters(), *model.buffers()):
        key = _storage_key(t)
        if key in seen:  # tied weights (e.g. embeddings and lm_head) are stored once
            continue
        seen.add(key)
        name = str(t.dtype).removeprefix("torch.")
        out.weights_by_dtype[name] = out.weights_by_dtype.get(name, 0) + t.untyped_storage().nbytes()
    for p in model.parameters():
        out.total_params += p.numel()
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        n = p.numel()
        out.trainable_params += n
        if optimizer == "none":
            continue
        out.grads += n * p.element_size()
        if optimizer == "adamw":
            out.optimizer += 2 * n * (4 if mixed_precision else p.element_size())
        if mixed_precision and p.dtype in _HALF:
            out.master_weights += 4 * n
    return out
