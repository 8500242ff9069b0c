"""What a meta forward of the planner keeps, as the target device's kernels would: the simulated GPU attention
kernel (`_SimulatedFlashAttention`), CUDA's fused dropout, and answers to transformers' data-dependent checks, all
switched on by `planning_mode` (see `lorafa.planner`'s docstring)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["planning_mode"]


class _SimulatedFlashAttention(torch.autograd.Function):
    """Memory model of SDPA's FlashAttention / memory-efficient kernels, for the meta device only.

    Saves what those kernels save for backward: q, k, v, the output and a log-sum-exp (B, H, T) in fp32, plus the
    additive mask when one is given (then only the memory-efficient kernel applies, and it keeps the bias). Dropout
    inside the kernel is regenerated from a Philox seed, so no mask is kept. k and v are kept as given, i.e. not
    repeated for grouped-query attention when transformers passes `enable_gqa=True`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None
    ) -> Tensor:
        if q.device.type != "meta":
            raise RuntimeError("the simulated flash attention only models memory on the meta device")
        b, h, t, _ = q.shape
        # The kernels write the output in q's layout: for a token-major q (a (B, H, T, D) view of (B, T, H, D), as
        # LLaMA's projections give) a view of (B, T, H, Dv), so the `transpose(1, 2).contiguous()` before o_proj
        # makes no copy; for a head-major q (Phi-3's and GPT-NeoX's partial rotary concatenates) a (B, H, T, Dv)
        # tensor, which that line copies and o_proj keeps.
        if q.transpose(1, 2).is_contiguous():
            out = q.new_empty((b, t, h, v.shape[-1])).transpose(1, 2)  # (B, H, T, Dv)
        else:
            out = q.new_empty((b, h, t, v.shape[-1]))  # (B, H, T, Dv)
        lse = q.new_empty((b, h, t), dtype=torch.float32)  # (B, H, T)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        raise RuntimeError("the simulated flash attention is a memory model; it has no backward")


def _flash_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    return _SimulatedFlashAttention.apply(query, key, value, attn_mask)


_ALL = (torch.all, Tensor.all)
_ANY = (torch.any, Tensor.any)


def _fused_dropout(
    input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> Tensor | None:
    if not training or not 0.0 < p < 1.0 or inplace:
        return None
    return torch.native_dropout(input, p, True)[0]


def _sdpa_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """F.scaled_dot_product_attention's arguments by name, defaults filled in."""
    bound = inspect.signature(_flash_sdpa).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _cpu_math_path(a: dict[str, Any]) -> bool:
    """Whether CPU SDPA runs its math path (keeping the T×T probabilities, and dropout noise, as eager attention
    does) instead of its flash kernel: with attention dropout, or with an additive mask that needs a gradient
    (T5's relative position bias when it trains)."""
    mask = a["attn_mask"]
    return float(a["dropout_p"]) > 0 or (isinstance(mask, Tensor) and mask.requires_grad)


def _math_sdpa(a: dict[str, Any]) -> Tensor:
    out, _ = torch.ops.aten._scaled_dot_product_attention_math(
        a["query"], a["key"], a["value"], a["attn_mask"], a["dropout_p"], a["is_causal"],
        scale=a["scale"], enable_gqa=a["enable_gqa"],
    )  # fmt: skip
    return out


class _MetaPlanningMode(TorchFunctionMode):
    """What a meta forward needs: the target device's kernels (for memory), and answers to data checks.

    Kernels: with `flash`, SDPA is `_SimulatedFlashAttention`. With `fused_dropout`, `F.dropout` runs
    `torch.native_dropout`, the fused kernel `F.dropout` uses on CUDA, which keeps a bool mask (1 byte per
    element); on CPU and meta, `F.dropout` multiplies by a noise tensor it keeps in the input's dtype.

    Data checks: meta tensors have no values, so a data-dependent check (`if mask.all():`) cannot run.
    transformers only makes such checks to skip work for inputs without padding, packing or overflow, which is
    what the planner's batch is: `all()` of a meta tensor is answered True and `any()` False, as a CPU scalar.
    """

    def __init__(self, flash: bool, fused_dropout: bool) -> None:
        super().__init__()
        self.flash = flash
        self.fused_dropout = fused_dropout

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if self.flash and func is F.scaled_dot_product_attention:
            named = _sdpa_arguments(args, kwargs)
            if not self.fused_dropout and _cpu_math_path(named):
                return _math_sdpa(named)
            return _flash_sdpa(*args, **kwargs)
        if self.fused_dropout and func is F.dropout and args[0].device.type == "meta":
            out = _fused_dropout(*args, **kwargs)
            if out is not None:
                return out
        if (func in _ALL or func in _ANY) and isinstance(args[0], Tensor) and args[0].device.type == "meta":
            result = func(*args, **kwargs)
            if result.dim() == 0:
                return torch.tensor(func in _ALL)
            return result
        return func(*args, **kwargs)


@contextmanager
def planning_mode(attention: str, device: str = "cuda") -> Iterator[None]:
    """Inside, a meta forward keeps (for memory) what `attention` and `device`'s kernels keep (see PlannerArgs)."""
    with _MetaPlanningMode(flash=attention == "sdpa-flash", fused_dropout=device == "cuda"):
        yield
