"""A reference count of what autograd saves for backward, independent of lorafa.memory's tracker."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def saved_bytes(fn: Callable[[], Any], params: Iterable[torch.Tensor]) -> tuple[int, Any]:
    """(bytes of unique non-parameter storages saved for backward while running fn(), fn's result)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out
