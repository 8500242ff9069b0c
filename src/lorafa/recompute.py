"""Cheap-op recomputation: frozen blocks keep only what their matmuls need; norms, activations, dropout redo.

With frozen weights (and LoRA-FA adapters that keep only u = A·x), a transformer block's saved activations are
those of its cheap element-wise ops (issue 7, item 2): the LLaMA MLP keeps gate, SiLU(gate) and up for the product
SiLU(gate)·up; an RMSNorm in bf16 keeps an fp32 copy of its input; GPT-2's tanh-GELU keeps four tensors of the
intermediate size; on CPU every dropout keeps a float mask as large as its input. Each of these is recomputed in
backward from the smallest input that determines it, with exactly the same ops: each module's outputs and
gradients are bit-identical (a whole model's may differ by round-off only, where autograd now sums the gradient
contributions of a tensor with several consumers in another order):

* gated MLPs (``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: LLaMA, Mistral, Qwen2, Gemma, ...) keep gate
  and up only (:class:`GatedMLP`);
* leaf norm/activation modules (RMSNorm, LayerNorm, NewGELU, ...) that keep more than their input keep their
  input only (:class:`RecomputedLeaf`);
* ``nn.Dropout`` keeps the RNG state and regenerates its mask (:class:`RegeneratedDropout`).

Selection is by structure, verified on the module itself at enable time (a tiny probe forward): a gated MLP must
reproduce the original module's output, a leaf must be shape-preserving, deterministic and must save more than
its input. Replacements reuse the original parameters and children under the same names, so state dicts,
adapter injection (which wraps the Linear children) and activation checkpointing are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

__all__ = [
    "GatedMLP",
    "RecomputedLeaf",
    "RegeneratedDropout",
    "disable_cheap_recompute",
    "enable_cheap_recompute",
]

_GATED_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}


def _autocast_of(device_type: str) -> tuple[str, bool, torch.dtype | None]:
    """The autocast state of a device type, to replay it when recomputing in backward."""
    if not torch.amp.is_autocast_available(device_type):
        return device_type, False, None
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _replay_autocast(state: tuple[str, bool, torch.dtype | None]) -> AbstractContextManager[Any]:
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=True) if enabled else nullcontext()


class _RecomputeLeaf(torch.autograd.Function):
    """y = f(x; θ) for an element-wise or normalisation module f; saves x (and θ), recomputes f in backward.

    Backward rebuilds the local graph of f from the saved x and returns autograd's own gradients of f::

        dx, dθ = ∂f(x; θ)/∂(x, θ) ᵀ · dy       (θ only where ``needs_input_grad``)
    """

    @staticmethod
    def forward(
        ctx: Any, fn: Callable[..., torch.Tensor], x: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:  # type: ignore[override]
        ctx.fn, ctx.autocast = fn, _autocast_of(x.device.type)
        ctx.save_for_backward(x, *params)
        return fn(x, *params)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        with torch.enable_grad(), _replay_autocast(ctx.autocast):
            leaves = [t.detach().requires_grad_(need) for t, need in zip([x, *params], needs, strict=True)]
            y = ctx.fn(*leaves)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, dy))
        return (None, *(next(grads) if t.requires_grad else None for t in leaves))


class _GatedProduct(torch.autograd.Function):
    """y = act(g) ⊙ u, the gated-MLP product; saves g and u, recomputes act(g) in backward.

    Gradients, in the same op order as plain autograd of ``act(g) * u`` (hence bit-identical)::

        du = dy ⊙ act(g)          dg = act'(g)ᵀ · (dy ⊙ u)     (act' from autograd of the recomputed act)
    """

    @staticmethod
    def forward(
        ctx: Any, act: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor, u: torch.Tensor
    ) -> torch.Tensor:  # type: ignore[override]
        ctx.act, ctx.autocast = act, _autocast_of(g.device.type)
        ctx.save_for_backward(g, u)
        return act(g) * u  # (..., I)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        g, u = ctx.saved_tensors
        need_g, need_u = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        with torch.enable_grad(), _replay_autocast(ctx.autocast):
            g_leaf = g.detach().requires_grad_(need_g)
            a = ctx.act(g_leaf)  # (..., I)
        du = dy * a.detach() if need_u else None  # grad w.r.t. u
        dg = torch.autograd.grad(a, g_leaf, dy * u)[0] if need_g else None  # grad w.r.t. g
        return None, dg, du


def _rng_state(device: torch.device) -> torch.Tensor:
    # meta (the planner's shape-only forwards, which never run backward) has no generator: the CPU one stands in.
    if device.type in ("cpu", "meta"):
        return torch.get_rng_state()
    return cast(torch.Tensor, torch.get_device_module(device.type).get_rng_state(device))


class _RegeneratedDropout(torch.autograd.Function):
    """y = dropout(x, p) drawn exactly as ``F.dropout`` draws it; saves the RNG state, not the mask.

    Backward restores the generator state of forward, draws the identical mask m and returns::

        dx = dy ⊙ m / (1 − p)      (the same op as dropout's own backward on that device)
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:  # type: ignore[override]
        ctx.p, ctx.device, ctx.dtype, ctx.size = p, x.device, x.dtype, x.shape
        # The mask is laid out like x (empty_like inside dropout), so regenerate it with the same strides.
        ctx.stride = x.stride() if _dense(x) else None
        ctx.save_for_backward(_rng_state(x.device))
        return F.dropout(x, p, training=True)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (state,) = ctx.saved_tensors
        device, p = ctx.device, ctx.p
        if ctx.stride is not None:
            template = torch.empty_strided(ctx.size, ctx.stride, dtype=ctx.dtype, device=device)
        else:
            template = torch.empty(ctx.size, dtype=ctx.dtype, device=device)
        on_cpu = device.type == "cpu"
        with torch.random.fork_rng(
            devices=[] if on_cpu else [device], device_type="cuda" if on_cpu else device.type
        ):
            if device.type == "cpu":
                torch.set_rng_state(state)
            else:
                torch.get_device_module(device.type).set_rng_state(state, device)
            if device.type in ("cuda", "xpu"):
                # F.dropout uses the fused kernel here; replay it and its own backward.
                mask = torch.native_dropout(template, p, True)[1]
                return torch.ops.aten.native_dropout_backward(dy, mask, 1.0 / (1.0 - p)), None
            scaled_mask = F.dropout(template.fill_(1.0), p, training=True)  # m / (1 − p), exactly
        return dy * scaled_mask, None


def _dense(t: torch.Tensor) -> bool:
    """True if t's elements exactly fill a storage block with no gaps or overlaps (any dim order)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda s: s[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _needs_graph(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _getattr_with_fallback(module: nn.Module, name: str) -> Any:
    """nn.Module's attribute lookup, then the replaced original module's (for eps, config, sizes, ...)."""
    try:
        return nn.Module.__getattr__(module, name)
    except AttributeError:
        original = module.__dict__.get("original")
        if original is None:
            raise
        return getattr(original, name)


class RecomputedLeaf(nn.Module):
    """Stands in for a leaf norm/activation module and keeps only its input for backward.

    The original module's parameters are registered here under the same names (same objects), so the state dict
    is unchanged; the original module serves as the function, called with this module's current parameters.
    Attributes not found here (``eps``, ``variance_epsilon``, ...) are read from the original.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        for name, param in original.named_parameters(recurse=False):
            self.register_parameter(name, param)
        # Not a child (its parameters are registered above instead); set last, as it feeds attribute fallback.
        self.__dict__["original"] = original

    def _call(self, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        names = [name for name, _ in self.named_parameters(recurse=False)]
        return cast(torch.Tensor, functional_call(self.original, dict(zip(names, params, strict=True)), (x,)))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params = [p for _, p in self.named_parameters(recurse=False)]
        if (
            len(args) == 1
            and not kwargs
            and isinstance(args[0], torch.Tensor)
            and _needs_graph(args[0], *params)
        ):
            return _RecomputeLeaf.apply(self._call, args[0], *params)
        state: dict[str, torch.Tensor] = dict(self.named_parameters(recurse=False))
        return functional_call(self.original, state, args, kwargs)

    def restore(self) -> nn.Module:
        """The original module, holding this module's current parameters."""
        for name, param in self.named_parameters(recurse=False):
            setattr(self.original, name, param)
        return cast(nn.Module, self.original)

    def __getattr__(self, name: str) -> Any:
        return _getattr_with_fallback(self, name)

    def extra_repr(self) -> str:
        return f"recomputes {type(self.original).__name__}({self.original.extra_repr()})"


class GatedMLP(nn.Module):
    """``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` keeping only gate and up for the product's backward.

    Holds the original MLP's children under their own names (so adapters may wrap the Linear layers before or
    after), and computes the product with :class:`_GatedProduct` instead of keeping act_fn(gate) as well.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        for name, child in original.named_children():  # same names, same order: same state-dict keys
            self.add_module(name, child)
        self.__dict__["original"] = original  # set last, as it feeds attribute fallback

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)  # (..., I)
        u = self.up_proj(x)  # (..., I)
        if _needs_graph(g, u):
            return cast(torch.Tensor, self.down_proj(_GatedProduct.apply(self.act_fn, g, u)))  # (..., d)
        return cast(torch.Tensor, self.down_proj(self.act_fn(g) * u))

    def restore(self) -> nn.Module:
        """The original MLP, holding this module's current children (e.g. adapters injected meanwhile)."""
        for name, child in self.named_children():
            setattr(self.original, name, child)
        return cast(nn.Module, self.original)

    def __getattr__(self, name: str) -> Any:
        return _getattr_with_fallback(self, name)


class RegeneratedDropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same masks, same RNG stream) that keeps the RNG state instead of the mask.

    A subclass rather than a wrapper because models read ``module.dropout.p`` (e.g. BERT's attention).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (On CPU the kept generator state is 5,056 bytes: more than the mask of an input under ~1,264 fp32
        # elements, i.e. only at toy sizes; the planner counts exactly this.)
        if self.training and 0.0 < self.p < 1.0 and _needs_graph(x):
            return cast(torch.Tensor, _RegeneratedDropout.apply(x, self.p))
        return F.dropout(x, self.p, self.training, self.inplace)

    def restore(self) -> nn.Module:
        """A plain ``nn.Dropout`` with the same settings."""
        plain = nn.Dropout(self.p, self.inplace)
        return plain.train(self.training)


_WRAPPERS = (RecomputedLeaf, GatedMLP, RegeneratedDropout)


# ---- selection by structure, verified by a probe ----------------------------------------------------------


class _Training:
    """Puts a module tree in eval mode for a probe and restores every submodule's own flag afterwards."""

    def __init__(self, module: nn.Module) -> None:
        self.flags = [(m, m.training) for m in module.modules()]

    def __enter__(self) -> None:
        for m, _ in self.flags:
            m.training = False

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag


def _probe_saved_bytes(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes.values())


def _as_leaf(module: nn.Module, dtype: torch.dtype) -> RecomputedLeaf | None:
    """A RecomputedLeaf for a shape-preserving, deterministic leaf that saves more than its input, else None."""
    params = dict(module.named_parameters(recurse=False))
    if (
        any(module.children())
        or any(True for _ in module.buffers())
        or any(p.dim() != 1 for p in params.values())
    ):
        return None
    # Probe on CPU with small copies of the (1-D) parameters: works for any device, including meta.
    cpu = {
        name: (torch.ones(p.shape, dtype=p.dtype) if p.is_meta else p.detach().cpu().clone()).requires_grad_(
            p.requires_grad
        )
        for name, p in params.items()
    }
    # The probe's feature size: a norm's own (a parameter-free norm, e.g. OLMo's, checks its normalized_shape),
    # else any size an element-wise module takes.
    shape = getattr(module, "normalized_shape", None)
    if params:
        feature = tuple(next(iter(params.values())).shape)
    elif isinstance(shape, tuple | list) and all(isinstance(n, int) for n in shape):
        feature = tuple(shape)
    elif isinstance(shape, int):
        feature = (shape,)
    else:
        feature = (8,)
    x = torch.randn((2, 3, *feature), generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    try:
        with torch.enable_grad():
            y1 = functional_call(module, cpu, (x,))
            y2 = functional_call(module, cpu, (x,))
            plain = _probe_saved_bytes(lambda: functional_call(module, cpu, (x,)), list(cpu.values()))
    except Exception:  # not callable on one tensor of this shape: not an element-wise/norm module
        return None
    if not (isinstance(y1, torch.Tensor) and y1.shape == x.shape and torch.equal(y1, y2)):
        return None
    return RecomputedLeaf(module) if plain > x.untyped_storage().nbytes() else None


def _linear_in_features(module: nn.Module) -> int | None:
    d_in = getattr(module, "in_features", None)
    return d_in if isinstance(d_in, int) else None


def _as_gated_mlp(module: nn.Module) -> GatedMLP | None:
    """A GatedMLP if the module has exactly the gated-MLP children and reproduces its output, else None."""
    if {name for name, _ in module.named_children()} != _GATED_MLP_CHILDREN:
        return None
    own_state = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if own_state or any(True for _ in module.get_submodule("act_fn").parameters()):
        return None
    d_in = _linear_in_features(module.get_submodule("gate_proj"))
    weight = next(module.parameters(), None)
    if d_in is None or weight is None:
        return None
    candidate = GatedMLP(module)
    if weight.is_meta:  # nothing to compare on the meta device: the structure has to do
        return candidate
    x = torch.randn(1, 3, d_in, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    with _Training(module), torch.enable_grad():
        want = module(x)
        got = candidate(x.requires_grad_())  # the _GatedProduct path
    return candidate if torch.allclose(got.detach(), want.detach(), rtol=1e-5, atol=1e-6) else None


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _enable(parent: nn.Module, dtype: torch.dtype) -> int:
    count = 0
    for name, child in list(parent.named_children()):
        if isinstance(child, _WRAPPERS) or hasattr(child, "base_layer"):
            continue  # already cheap, or an adapter layer (LoRA-FA/PEFT) that manages its own saved tensors
        new: nn.Module | None
        if type(child) is nn.Dropout:
            new = RegeneratedDropout(child.p, child.inplace).train(child.training) if child.p > 0 else None
        else:
            new = _as_gated_mlp(child) or _as_leaf(child, dtype)
        if new is not None:
            setattr(parent, name, new)
            count += 1
        else:
            count += _enable(child, dtype)
    return count


def enable_cheap_recompute(model: nn.Module) -> int:
    """Make the model recompute its cheap ops (gated products, norms, activations, dropout) in backward.

    Replaces, in place, gated MLPs by :class:`GatedMLP`, leaf norm/activation modules that save more than their
    input by :class:`RecomputedLeaf`, and ``nn.Dropout`` (p > 0) by :class:`RegeneratedDropout`. Outputs and
    gradients are unchanged; Linear layers and adapter layers (modules with a ``base_layer``) are left alone, so
    LoRA-FA injection may happen before or after. Calling it again wraps nothing new.

    Args:
        model: Any ``nn.Module`` (e.g. a transformers LLaMA/Qwen2/Mistral/GPT-2/BERT/RoBERTa model).

    Returns:
        The number of modules replaced by this call.
    """
    return _enable(model, _float_dtype(model))


def disable_cheap_recompute(model: nn.Module) -> int:
    """Undo :func:`enable_cheap_recompute` in place (keeping any adapters injected meanwhile).

    Returns:
        The number of modules restored.
    """
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, _WRAPPERS):
            setattr(model, name, child.restore())
            count += 1
        else:
            count += disable_cheap_recompute(child)
    return count
