"""Activation measurement: one meta forward + loss of the planner's model under a `SavedTensorTracker`
(`measure_activations`), counting the bytes autograd keeps for backward per category, per checkpointed layer and,
with offloading, what `lorafa.offload`'s own pack hook would move to host memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafa.memory import CATEGORIES, SavedRecord, SavedTensorTracker, _storage_key
from lorafa.offload import _Offloaded, _OffloadHooks
from lorafa.planner_meta import planning_mode
from lorafa.planner_models import _hf_model, checkpointed_layers, set_checkpointing

__all__ = ["Activations", "measure_activations"]


@dataclass
class Activations:
    """Saved-for-backward bytes of one forward + loss."""

    saved: int
    """Device bytes of the unique storages kept after the forward (with checkpointing: the checkpoint inputs and the
    layers outside); without what offloading moves to the host, and, for device "cuda", without host tensors."""
    recompute: int
    """With checkpointing: the largest layer's saved bytes, re-created during backward; else 0."""
    by_category: dict[str, int]
    """`saved` per category (see `SavedTensorTracker.by_category`)."""
    per_layer_max: int
    """Largest saved bytes of one checkpointable layer, measured without checkpointing."""
    offloaded: int = 0
    """With offloading: saved bytes moved to pinned host memory (not in `saved`)."""
    transient: int = 0
    """With offloading: offloaded bytes back on the device at once during backward (see `lorafa.planner`'s docstring)."""

    @property
    def total(self) -> int:
        return self.saved + self.recompute + self.transient


class _MetaCopier:
    """An offload copier for the meta device: moves nothing, so that `_OffloadHooks` only decides what would move."""

    def accepts(self, t: Tensor) -> bool:
        return t.is_meta

    def to_host(self, t: Tensor) -> None:
        return None

    def to_device(self, handle: Any) -> Tensor:
        raise RuntimeError("a meta forward is a memory model; it has no backward")


class _PlanTracker(SavedTensorTracker):
    """A SavedTensorTracker that also notes where each saved storage would live while training.

    `host`: storages of non-meta tensors a meta forward saves, i.e. RNG states of `RegeneratedDropout` (on CUDA a
    16-byte host tensor). `moved`/`kept`: storages `offload_activations(min_bytes)` would / would not move, decided
    by the library's own pack hook; a storage leaves the device only if no saved view of it stays.
    """

    def __init__(self, model: nn.Module, offload_min_bytes: int | None) -> None:
        super().__init__(model)
        self._offload = (
            _OffloadHooks(_MetaCopier(), offload_min_bytes, ()) if offload_min_bytes is not None else None
        )
        self.host: set[int] = set()  # ids of SavedRecords
        self.moved: set[int] = set()
        self.kept: set[int] = set()

    def _pack(self, t: Tensor) -> Tensor:
        packed = super()._pack(t)
        entry = self._live.get(_storage_key(t)) if t.layout == torch.strided else None
        if entry is None:  # a parameter or buffer: not counted
            return packed
        rid = id(entry[0])
        if not t.is_meta:
            self.host.add(rid)
        elif self._offload is not None:
            # On meta every data_ptr() is 0, so the hook's de-duplication may merge unrelated tensors; it only
            # merges tensors it already decided to move, so the decision itself is the library's.
            moves = isinstance(self._offload.pack(t), _Offloaded)
            (self.moved if moves else self.kept).add(rid)
        return packed

    def offloaded(self, r: SavedRecord) -> bool:
        return id(r) in self.moved and id(r) not in self.kept


def measure_activations(
    model: nn.Module,
    batch: dict,
    attention: str,
    checkpointing: bool,
    plain: Activations | None = None,
    device: str = "cuda",
    *,
    chunked_loss: bool = False,
    offload_min_bytes: int | None = None,
) -> Activations:
    """Run one meta forward + loss of `model` on `batch` and count the bytes saved for backward.

    With `checkpointing`, the forward without checkpointing is needed too (for the largest layer, re-created
    during backward); pass it as `plain` when already measured. `attention` and `device` pick the kernels whose
    memory is modelled (see PlannerArgs). `chunked_loss` computes the loss with `lorafa.loss` (causal LMs);
    `offload_min_bytes` (None: no offloading) models `lorafa.offload.offload_activations` on a GPU.
    """
    if plain is None or not checkpointing:
        plain = _measure(model, batch, attention, False, device, chunked_loss, offload_min_bytes, 0)
        if not checkpointing:
            return plain
    return _measure(
        model, batch, attention, True, device, chunked_loss, offload_min_bytes, plain.per_layer_max
    )


def _measure(
    model: nn.Module,
    batch: dict,
    attention: str,
    checkpointing: bool,
    device: str,
    chunked_loss: bool,
    offload_min_bytes: int | None,
    recompute: int,
) -> Activations:
    tracker = _track(model, batch, attention, checkpointing, device, chunked_loss, offload_min_bytes)
    # Host tensors are the device's memory when training on CPU; on a GPU they cost no device memory.
    records = [r for r in tracker.records if device == "cpu" or id(r) not in tracker.host]
    on_device = [r for r in records if not tracker.offloaded(r)]
    by_category = dict.fromkeys(CATEGORIES, 0)
    for r in on_device:
        by_category[tracker.category(r.module)] += r.nbytes
    prefix = "base_model.model." if _hf_model(model) is not model else ""
    layers = [prefix + x for x in checkpointed_layers(_hf_model(model))]

    def layer_of(r: SavedRecord) -> str | None:
        return next((x for x in layers if r.module == x or r.module.startswith(x + ".")), None)

    per_layer = dict.fromkeys(layers, 0)
    moved_per_layer = dict.fromkeys(layers, 0)
    moved_outside = [0]
    for r in records:
        layer = layer_of(r)
        if layer is not None:
            per_layer[layer] += r.nbytes
        if tracker.offloaded(r):
            if layer is not None:
                moved_per_layer[layer] += r.nbytes
            else:
                moved_outside.append(r.nbytes)
    return Activations(
        saved=sum(r.nbytes for r in on_device),
        recompute=recompute,
        by_category=by_category,
        per_layer_max=max(per_layer.values(), default=0),
        offloaded=sum(r.nbytes for r in records if tracker.offloaded(r)),
        transient=max([*moved_per_layer.values(), *moved_outside]),
    )


def _track(
    model: nn.Module,
    batch: dict,
    attention: str,
    checkpointing: bool,
    device: str,
    chunked_loss: bool = False,
    offload_min_bytes: int | None = None,
) -> _PlanTracker:
    set_checkpointing(model, checkpointing)
    tracker = _PlanTracker(model, offload_min_bytes)
    try:
        with planning_mode(attention, device), tracker:
            if chunked_loss:
                from lorafa.loss import chunked_causal_lm_loss

                # The loss selects counted tokens by value, so its labels are real: make_batch's (no padding).
                labels = torch.ones(batch["labels"].shape, dtype=torch.long)
                # One chunk: the chunk size only bounds the transient logits, not what is saved, and meta runs
                # of many small chunks are slow.
                chunked_causal_lm_loss(
                    _hf_model(model), {**batch, "labels": labels}, chunk_size=labels.numel()
                )
            else:
                model(**batch)  # the output holds the loss; its graph is dropped on return
    finally:
        set_checkpointing(model, False)
    return tracker
