"""Activation offloading: tensors saved for backward wait in pinned host memory instead of GPU memory.

Inside :func:`offload_activations`, every tensor autograd saves for backward passes through a pack hook
(``torch.autograd.graph.saved_tensors_hooks``). Large device tensors are copied to pinned host memory on a side
CUDA stream (overlapping the forward compute) and their GPU memory is released as soon as the forward drops
them; in backward the unpack hook copies each one back, on the compute stream, right before its node uses it.
Parameters (and views of them), excluded tensors and tensors under ``min_bytes`` stay where they are.
Issue 7, item 3. Unlike ``torch.autograd.graph.save_on_cpu`` the copies are asynchronous, size-filtered,
parameter-aware and deduplicated (a norm saves its input twice; it moves once).

It composes with activation checkpointing (non-reentrant checkpointing installs its own hooks inside each
checkpointed region, which win there; reentrant checkpointing saves only region inputs, which are offloaded) and
with LoRA-FA layers (their rank-r tensors are usually under the threshold). On a machine without CUDA it does
nothing and says so once.

The device-specific part is a small :class:`Copier`, so the hook logic is testable on CPU with a fake copier.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from lorafa.recompute import _dense  # the same "fills its storage block" test decides what may move

__all__ = ["Copier", "CudaHostCopier", "OffloadStats", "offload_activations"]


class Copier(Protocol):
    """Moves a saved tensor off its device and back; ``to_device(to_host(t))`` must equal t (values, strides)."""

    def accepts(self, t: torch.Tensor) -> bool:
        """Whether t lives on a device this copier offloads from."""
        ...

    def to_host(self, t: torch.Tensor) -> Any:
        """Start moving t off the device; returns a handle that must not reference t's storage."""
        ...

    def to_device(self, handle: Any) -> torch.Tensor:
        """The tensor back on its device, ready for use on the current stream."""
        ...


@dataclass
class _HostCopy:
    host: torch.Tensor  # pinned, same size/strides/dtype as the device tensor
    device: torch.device
    done: torch.cuda.Event  # recorded on the side stream after the device→host copy


class CudaHostCopier:
    """Device→pinned-host copies on a side stream per device; host→device copies on the current stream."""

    def __init__(self, pin_memory: bool = True) -> None:
        self.pin_memory = pin_memory
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def accepts(self, t: torch.Tensor) -> bool:
        return t.is_cuda

    def to_host(self, t: torch.Tensor) -> _HostCopy:
        stream = self._streams.setdefault(t.device, torch.cuda.Stream(t.device))
        host = torch.empty_strided(
            t.size(), t.stride(), dtype=t.dtype, device="cpu", pin_memory=self.pin_memory
        )
        # The side stream must see t fully written by the compute stream before reading it.
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        # Keep the caching allocator from handing t's block to the compute stream before the copy has read it.
        t.record_stream(stream)
        return _HostCopy(host, t.device, done)

    def to_device(self, handle: _HostCopy) -> torch.Tensor:
        stream = torch.cuda.current_stream(handle.device)
        stream.wait_event(handle.done)
        out = torch.empty_strided(
            handle.host.size(), handle.host.stride(), dtype=handle.host.dtype, device=handle.device
        )
        return out.copy_(handle.host, non_blocking=True)


@dataclass
class OffloadStats:
    """What an :func:`offload_activations` block moved off the device."""

    tensors: int = 0  # distinct saved tensors copied to the host
    bytes: int = 0  # their total size


class _Offloaded:
    """A packed saved tensor: the copier's handle, and the restored device tensor while backward holds it."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.restored: weakref.ref[torch.Tensor] | None = None


def _is_parameter(t: torch.Tensor) -> bool:
    # Linear layers save weight.t(), a view: check the base as well.
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


class _OffloadHooks:
    def __init__(self, copier: Copier, min_bytes: int, exclude: Iterable[torch.Tensor]) -> None:
        self.copier, self.min_bytes = copier, min_bytes
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.stats = OffloadStats()
        # Same view of the same storage saved again (e.g. x by both pow and mul in RMSNorm) → reuse its copy.
        # The weak reference to t proves the storage is still the one copied (an address is reused once freed);
        # the one to the copy lets backward free host copies as it goes.
        self._seen: dict[tuple[Any, ...], tuple[weakref.ref[torch.Tensor], weakref.ref[_Offloaded]]] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor | _Offloaded:
        nbytes = t.numel() * t.element_size()
        if (
            nbytes < self.min_bytes
            or not self.copier.accepts(t)
            or _is_parameter(t)
            or t.untyped_storage().data_ptr() in self.excluded
            or not _dense(t)
        ):
            return t
        # _version: a tensor saved, changed in place, then saved again must not get the first copy back
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t._version)
        seen = self._seen.get(key)
        if seen is not None and seen[0]() is not None:
            earlier = seen[1]()
            if earlier is not None:
                return earlier
        packed = _Offloaded(self.copier.to_host(t))
        self._seen[key] = (weakref.ref(t), weakref.ref(packed))
        self.stats.tensors += 1
        self.stats.bytes += nbytes
        return packed

    def unpack(self, packed: torch.Tensor | _Offloaded) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        restored = packed.restored() if packed.restored is not None else None
        if restored is None:
            restored = self.copier.to_device(packed.handle)
            packed.restored = weakref.ref(restored)
        return restored


@functools.cache
def _warn_no_cuda() -> None:
    warnings.warn(
        "offload_activations: CUDA is not available, so saved activations stay in (host) memory; "
        "activation offloading only helps on a GPU and is a no-op here.",
        stacklevel=4,
    )


@contextmanager
def offload_activations(
    min_bytes: int = 1 << 20,
    *,
    exclude: Iterable[torch.Tensor] = (),
    copier: Copier | None = None,
) -> Iterator[OffloadStats]:
    """Keep tensors saved for backward in pinned host memory while the block runs forward.

    Run the forward pass (and the loss) inside the block; backward may run inside or after it::

        with offload_activations() as stats:
            loss = model(**batch).loss
        loss.backward()

    Args:
        min_bytes: Saved tensors smaller than this stay on the device (copies of tiny tensors cost more than
            they free).
        exclude: Tensors whose storages must never move (e.g. inputs reused after the step).
        copier: How to move tensors; defaults to :class:`CudaHostCopier` when CUDA is available.

    Yields:
        Counters of what was moved, filled in as the forward runs.

    Raises:
        ValueError: If ``min_bytes`` is negative.
    """
    if min_bytes < 0:
        raise ValueError(f"min_bytes must be >= 0, got {min_bytes}")
    if copier is None:
        if not torch.cuda.is_available():
            _warn_no_cuda()
            yield OffloadStats()
            return
        copier = CudaHostCopier()
    hooks = _OffloadHooks(copier, min_bytes, exclude)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        yield hooks.stats
