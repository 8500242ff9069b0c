"""The LoRA-FA linear operation as one autograd Function that keeps only the rank-r projection for backward.

For a frozen linear layer (W: d_out×d_in, optional bias b) and a LoRA pair (A: r×d_in, B: d_out×r, s = scaling):

    y = W·x + b + s·B·A·dropout(x)

Plain autograd (and PEFT) keeps x, the dropout output and the dropout mask of every adapted layer for backward.
LoRA-FA freezes A, so B's gradient only needs u = A·dropout(x), r numbers per token (Zhang et al. 2023, §3).
The dropout mask is regenerated in backward from a seed drawn in forward, so it costs no memory either. The seed
comes from torch's default CPU generator, which non-reentrant activation checkpointing saves and restores, so a
recomputed forward draws the same seed and hence the same mask.

`method="lora"` (A trainable) goes through the same Function; it then also keeps x (not the dropout output,
not the mask) because dA needs it, as it does when a user unfreezes the base weight W (dW needs x).

With `weight=None` the Function computes the adapter's term s·B·A·dropout(x) alone, for a base layer that must run
its own forward (hooks on it, e.g. accelerate's offloading): the caller adds base_layer(x), which keeps nothing
of x either while W is frozen.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

# The mask is drawn as 16-bit integers, four per 64-bit random number, and turned into a 0/1 float mask with
# float ops only. On CPU this costs ~3x less than `bernoulli_` (itself comparable to a 512x512 matmul per block of
# tokens); multiplying by a bool mask instead would take a slow type-promotion path. The keep probability is thus
# quantised to 1/65536: `keep_probability` returns the exact value used and activations are scaled by its inverse,
# so dropout stays unbiased.
_LEVELS = 65536


def keep_probability(p: float) -> float:
    """The exact keep probability of the dropout mask for a requested dropout probability `p`."""
    return 1.0 - round(p * _LEVELS) / _LEVELS


def dropout_mask(
    shape: torch.Size, seed: int, p: float, device: torch.device, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The keep-mask m ∈ {0, 1} of `shape` in `dtype`: a pure function of (seed, p, shape, device type, and on
    accelerators dtype), with P(m = 1) = keep_probability(p)."""
    if device.type == "meta":
        return torch.empty(shape, dtype=dtype, device=device)
    n = 1
    for size in shape:
        n *= size
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    if device.type != "cpu":
        # Accelerators: one fused kernel writing the mask in its final dtype. The integer trick below pays on CPU
        # only; on a GPU its five memory passes per mask would dominate the adapter's cost.
        return torch.empty(shape, dtype=dtype, device=device).bernoulli_(keep_probability(p), generator=gen)
    words = (n + 3) // 4
    bits = torch.randint(-(2**63), 2**63 - 1, (words,), dtype=torch.int64, generator=gen, device=device)
    r = bits.view(torch.int16)[:n].view(shape).to(torch.float32)  # integers, uniform over [-32768, 32767]
    threshold = round(p * _LEVELS) - _LEVELS // 2  # P(r >= threshold) == keep_probability(p)
    # r is integer-valued, so clamp(r - threshold + 1, 0, 1) is exactly 1 where r >= threshold and 0 elsewhere.
    return r.sub_(threshold - 1).clamp_(0.0, 1.0).to(dtype)


def _autocast_off(device_type: str) -> AbstractContextManager[object]:
    # Devices without autocast (e.g. "meta", used by the memory planner) have nothing to turn off; where autocast
    # is off already, skip torch.autocast's context manager (tens of microseconds per call, twice per layer).
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()


@dataclass
class SharedProjection:
    """u = A·dropout(x)/q and its dropout seed, computed by the first of several layers that share A and read the
    same input x, reused by the others (`LoRAFAConfig.share_a`). `key` identifies the input's state."""

    key: tuple[object, ...]
    u: Tensor | None = None
    seed: int = 0
    a_versions: dict[int, int] = field(default_factory=dict)
    """id → version counter of each member's A when it used this slot: an A written since (load_adapter) makes u
    stale."""


def _can_fold(dtype: torch.dtype, no_dropout: bool) -> bool:
    """Whether W + s·B·A may stand in for the two paths: only without dropout (the mask applies to the adapter path
    alone) and only in fp32/fp64 (in 16-bit, W + s·B·A would round the small adapter term away)."""
    return no_dropout and dtype in (torch.float32, torch.float64)


def _fold_backward(g: Tensor, weight: Tensor | None, no_dropout: bool) -> bool:
    """Whether backward computes ∂L/∂x as g·(W + s·B·A) instead of g·W + (s·g·B)·A.

    The (d_out, d_in) temporary costs d_out·d_in·r multiply-adds against N·(d_out + d_in)·r for g·B and h·A; fold
    when min(d_out, d_in) ≤ N, where it is both cheaper and no larger than g (N, d_out) or dx (N, d_in), tensors
    backward holds anyway.
    """
    return weight is not None and _can_fold(g.dtype, no_dropout) and min(weight.shape) <= g.shape[0]


def _draw_seed() -> int:
    # From the default CPU generator: seeded by torch.manual_seed and restored by checkpoint's preserve_rng_state.
    return int(torch.randint(0, 2**62, (1,)).item())


class LoRAFALinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + s·u·Bᵀ with u = (m ⊙ x)·Aᵀ / q, m ~ Bernoulli(q)^{d_in}, q = keep probability.

    Shapes: x (N, d_in), W (d_out, d_in), b (d_out,), A (r, d_in), B (d_out, r), u (N, r), y (N, d_out).

    Forward saves u (and x only when A or W needs a gradient: method "lora", or a base weight the user unfroze);
    never the mask or m ⊙ x. u and the adapters' gradients are computed in `adapter_dtype` (fp32 for fp32 adapters
    on a 16-bit model without autocast, else the activation dtype); y and ∂L/∂x stay in the activation dtype.
    Backward, with g = ∂L/∂y (N, d_out) and h = s·g·B (N, r):
        ∂L/∂x = g·W + (m ⊙ (h·A)) / q            (the mask m regenerated from the forward's seed;
                                                  = g·(W + s·B·A) without dropout, see `_fold_backward`)
        ∂L/∂B = s·gᵀ·u                            (then ·P when a gradient projection P (r, r) is given)
        ∂L/∂A = hᵀ·(m ⊙ x) / q                    (method "lora" only)
        ∂L/∂W = gᵀ·x                              (only if W requires grad; lorafa freezes it)
        ∂L/∂b = Σ_n g                             (only if b requires grad)
    With W = None (and no b) y is the adapter's term s·u·Bᵀ alone and ∂L/∂x loses its g·W.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        lora_A: Tensor,
        lora_B: Tensor,
        scaling: float,
        dropout_p: float,
        projection: Tensor | None,
        shared: SharedProjection | None = None,
        adapter_dtype: torch.dtype | None = None,
    ) -> Tensor:
        dt = x.dtype
        at = adapter_dtype or dt  # u and the adapter's gradients: fp32 for fp32 adapters on a 16-bit model
        a = lora_A.to(at)  # (r, d_in): small
        bm = lora_B.to(dt)  # (d_out, r): small
        q = keep_probability(dropout_p)
        # Every call draws its seed, also one that reuses a shared u: the number of draws from the CPU generator
        # must not depend on whether a slot was already filled. Checkpointing replays that generator for the
        # recompute, where a block that reads its own input (post-norm BERT, cross-attention) finds the slot its
        # first forward filled; one draw fewer there would shift every later mask of the block.
        seed = _draw_seed() if dropout_p > 0 else 0
        if shared is not None and shared.u is not None:
            u, seed = shared.u, shared.seed  # the same tensor: saved once for every layer that shares it
        else:
            xa = x if at == dt else x.to(at)  # a transient copy only for a wider adapter dtype
            if dropout_p > 0:
                mask = dropout_mask(x.shape, seed, dropout_p, x.device, at)
                # the masked copy of x is transient; a wider copy xa is masked in place (one temporary, not two)
                u = (xa * mask if xa is x else xa.mul_(mask)) @ a.t()  # (N, r)
                u.mul_(1.0 / q)
            else:
                u = xa @ a.t()  # (N, r)
            if shared is not None:
                shared.u, shared.seed = u, seed

        # (N, d_out); the bias is added inside the GEMM (as F.linear does), not in a separate pass
        # Folding s·B·A into W here, as backward does, measured slower: the (d_out, d_in) temporary costs a copy of
        # W plus a memory-bound k=r GEMM, more than the one extra pass over y below.
        ud = u if at == dt else u.to(dt)  # the output is in the activation dtype either way
        if weight is None:
            y = (ud @ bm.t()).mul_(scaling)  # the adapter's term alone
        else:
            w = weight.to(dt)  # no copy when the base weight already has the activation dtype
            y = x @ w.t() if bias is None else torch.addmm(bias.to(dt), x, w.t())
            y.addmm_(ud, bm.t(), alpha=scaling)  # accumulate s·u·Bᵀ in place: no (N, d_out) temporary

        save_x = ctx.needs_input_grad[3] or ctx.needs_input_grad[1]
        ctx.save_for_backward(u, x if save_x else None, weight, lora_A, lora_B, projection)
        ctx.seed, ctx.p, ctx.q, ctx.scaling, ctx.at = seed, dropout_p, q, scaling, at
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        # Backward may run inside a user's autocast region; the math below picks its dtypes explicitly.
        with _autocast_off(g.device.type):
            return LoRAFALinearFunction._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g: Tensor):
        u, x, weight, lora_A, lora_B, projection = ctx.saved_tensors
        dt, at = g.dtype, ctx.at
        wide = at != dt  # fp32 adapters on a 16-bit model: their math in fp32, as PEFT does it
        ga = g.to(at) if wide else g  # (N, d_out), transient
        a, bm = lora_A.to(at), lora_B.to(at)
        need_x, need_w, need_b, need_a, need_bm = ctx.needs_input_grad[:5]
        mask = None
        if ctx.p > 0 and (need_x or need_a):
            mask = dropout_mask(torch.Size((g.shape[0], a.shape[1])), ctx.seed, ctx.p, g.device, at)

        # h = s·g·B (N, r), with the dropout scale 1/q folded in.
        fold = need_x and not need_a and not wide and _fold_backward(g, weight, mask is None)
        h = (ga @ bm).mul_(ctx.scaling / ctx.q) if (need_x and not fold) or need_a else None

        dx = None
        if fold:
            # ∂L/∂x = g·(W + s·B·A) without dropout: one (d_out, d_in) temporary, no larger than dx, replaces the
            # two skinny products g·B and h·A (N·(d_out + d_in)·r vs d_out·d_in·r multiply-adds).
            dx = g @ torch.addmm(weight.to(dt), bm, a, alpha=ctx.scaling)  # (N, d_in)
        elif need_x and (wide or weight is None):
            assert h is not None
            adapter = h @ a if mask is None else (h @ a).mul_(mask)  # (N, d_in) in the adapter dtype
            dx = adapter.to(dt) if weight is None else (g @ weight.to(dt)).add_(adapter)
        elif need_x:
            assert h is not None and weight is not None
            dx = g @ weight.to(dt)  # (N, d_in)
            if mask is None:
                dx.addmm_(h, a)  # accumulate in place
            else:
                dx.addcmul_(h @ a, mask)  # the adapter path's gradient passes the same mask (one fused pass)

        # dB = s·gᵀ·u in the adapter dtype (the activation dtype under autocast); projected in B's dtype.
        dB = None
        if need_bm:
            dB = (ga.t() @ u).mul_(ctx.scaling).to(lora_B.dtype)  # (d_out, r)
            if projection is not None:
                dB = dB @ projection.to(lora_B.dtype)  # (r, r): cheap in fp32, where the conditioning matters

        dA = None
        if need_a:
            assert h is not None and x is not None
            xa = x.to(at)
            xd = xa if mask is None else xa * mask  # h already carries 1/q
            dA = (h.t() @ xd).to(lora_A.dtype)  # (r, d_in)

        dW = None
        if need_w:
            assert x is not None and weight is not None
            dW = (g.t() @ x).to(weight.dtype)  # (d_out, d_in); the base layer was unfrozen by the caller

        db = g.sum(0) if ctx.has_bias and need_b else None
        return dx, dW, db, dA, dB, None, None, None, None, None


def lorafa_linear(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    projection: Tensor | None = None,
    shared: SharedProjection | None = None,
) -> Tensor:
    """Apply y = W·x + b + s·B·A·dropout(x) over the last dim of `x`, keeping only (..., r) for backward.

    Args:
        x: input (..., d_in), in the compute dtype (parameters are cast to it).
        weight: frozen base weight (d_out, d_in). Pass `w.t()` for a GPT-2 `Conv1D` weight (d_in, d_out). None
            gives the adapter's term s·B·A·dropout(x) alone (the caller adds the base layer's output).
        bias: base bias (d_out,) or None (None when weight is None).
        lora_A: (r, d_in); frozen for LoRA-FA (no gradient computed unless it requires grad).
        lora_B: (d_out, r).
        scaling: s = lora_alpha / r (or / sqrt(r) for rsLoRA).
        dropout_p: dropout probability on the adapter's input; 0 disables dropout.
        projection: optional (r, r) matrix right-multiplied onto B's gradient (see `lorafa.projection`).
        shared: a slot for u shared with other layers that use the same A on the same x (empty: fill it; filled:
            reuse its u and dropout seed instead of computing them).

    Returns:
        y of shape (..., d_out).
    """
    device_type = x.device.type
    if (
        torch.amp.is_autocast_available(device_type)
        and torch.is_autocast_enabled(device_type)
        and x.dtype != torch.float64  # autocast leaves float64 alone
    ):
        # Do what autocast would do for a linear layer (compute in its dtype), then run with autocast off so that
        # the Function's dtypes are explicit. Casting x costs the same copy autocast itself would make.
        x = x.to(torch.get_autocast_dtype(device_type))
        adapter_dtype = x.dtype
    else:
        # fp32 adapters on a bf16/fp16 model: u and the adapters' gradients in fp32 (u is r numbers per token),
        # so that B trains as precisely as PEFT trains it; the output stays in the activation dtype.
        adapter_dtype = torch.promote_types(x.dtype, lora_B.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
    with _autocast_off(device_type):
        y = LoRAFALinearFunction.apply(
            x2, weight, bias, lora_A, lora_B, scaling, dropout_p, projection, shared, adapter_dtype
        )
    return y.view(*lead, y.shape[-1])
