"""LoRAFALinear: a frozen base linear layer plus a LoRA pair (lora_A frozen for LoRA-FA, lora_B trained).

The layer holds its base layer (composition, as litgpt/torchtune do) and calls `lorafa.autograd.lorafa_linear`,
which keeps only the rank-r projection u = A·dropout(x) for backward. Merging folds s·B·A into the base weight by
an explicit, idempotent call; `.train()`/`.eval()` never touch weights.
"""

from __future__ import annotations

import contextlib
import math
import weakref
import zlib
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lorafa.autograd import SharedProjection, keep_probability, lorafa_linear
from lorafa.projection import projection_matrix

METHODS = ("lora-fa", "lora")
DATA_INITS = ("gradient", "inputs")
"""Inits whose A comes from training data (`lorafa.init_a_from_gradients`); a Kaiming placeholder until then."""
INITS = ("kaiming", "gaussian", "orthogonal", *DATA_INITS)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style `Conv1D` (a linear layer whose weight is stored as (d_in, d_out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _weight(module: nn.Module) -> Tensor:
    return cast(Tensor, module.weight)


def _bias(module: nn.Module) -> Tensor | None:
    return cast("Tensor | None", getattr(module, "bias", None))


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` runs more than its forward: torch forward or backward (pre-)hooks, or accelerate's
    hook (which loads offloaded weights before the forward and offloads them after)."""
    hooks = (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks, module._backward_hooks)
    return any(hooks) or "_hf_hook" in module.__dict__


@contextlib.contextmanager
def _onloaded(*modules: nn.Module) -> Iterator[None]:
    """Hold the weights of modules that accelerate offloads (`cpu_offload`, device_map with "cpu"/"disk") on their
    execution device while the adapter reads them directly (it never calls lora_A/lora_B, where the hook sits)."""
    hooks: list[tuple[nn.Module, Any]] = [(m, m.__dict__["_hf_hook"]) for m in modules if "_hf_hook" in m.__dict__]
    for m, hook in hooks:
        hook.pre_forward(m)
    try:
        yield
    finally:
        for m, hook in hooks:
            hook.post_forward(m, torch.tensor([]))


def _base_layer_under_plain_names(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook: the base layer's tensors under the names they had before add_lorafa
    (`<layer>.weight`, as `save_pretrained` of an adapted model writes them) load into `<layer>.base_layer.weight`;
    a state dict holding A ends a data-initialised A's wait (`a_pending`)."""
    for local in cast(nn.Module, module.base_layer).state_dict(keep_vars=True):
        plain, nested = prefix + local, f"{prefix}base_layer.{local}"
        if plain in state_dict and nested not in state_dict:
            state_dict[nested] = state_dict.pop(plain)
    if f"{prefix}lora_A.weight" in state_dict:
        # A comes from the state dict (e.g. Trainer's resume), as load_adapter sets it
        cast(Any, module).a_pending = False
    layer = cast("LoRAFALinear", module)
    weight = f"{prefix}base_layer.weight"
    if layer.merged and weight in state_dict:
        # State dicts hold the unmerged W (`_unmerged_base_weight`); a merged layer holds W + s·B·A, with the
        # loaded A and B.
        own_a, own_b = layer.lora_A.weight, layer.lora_B.weight
        a = state_dict.get(f"{prefix}lora_A.weight", own_a).to(own_a.device, own_a.dtype)
        b = state_dict.get(f"{prefix}lora_B.weight", own_b).to(own_b.device, own_b.dtype)
        w = state_dict[weight]
        state_dict[weight] = w + layer.weight_delta(a, b).to(w.device)


def _unmerged_base_weight(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """State-dict post-hook: a merged layer's base weight goes out as W, as the base model had it, so a state dict
    reads the same merged or not and loading it into an unmerged model does not add s·B·A twice (PEFT's keys are
    unchanged). It is (W + s·B·A) − s·B·A: W itself up to the rounding of W + s·B·A, which in bf16/fp16 leaves
    elements off by up to half a unit in the last place of the merged value. `state_dict(keep_vars=True)` asks for
    the live parameters, which hold W + s·B·A: left as they are."""
    layer = cast("LoRAFALinear", module)
    key = f"{prefix}base_layer.weight"
    if layer.merged and key in state_dict and not isinstance(state_dict[key], nn.Parameter):
        state_dict[key] = layer.unmerged_weight()


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an `nn.Linear` or `Conv1D`."""
    if is_conv1d(module):
        d_in, d_out = _weight(module).shape
        return int(d_in), int(d_out)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise TypeError(f"{type(module).__name__} is not an nn.Linear or transformers Conv1D")


def init_lora_A(weight: Tensor, init: str, seed: int | None, name: str) -> None:
    """Initialise A (r, d_in) in place.

    "kaiming": Kaiming-uniform with a=√5 (nn.Linear's and PEFT's default), U(-1/√d_in, 1/√d_in).
    "gaussian": N(0, 1/r²) (PEFT's "gaussian").
    "orthogonal": orthogonal rows of norm 1/√3 (kaiming's expected row norm), so A·Aᵀ = I/3 and the
      gradient projection (A·Aᵀ)⁻¹ is a plain rescale.
    "gradient", "inputs": a kaiming placeholder here; `lorafa.init_a_from_gradients` sets A from training data
      (the layer refuses to train until then, see `LoRAFALinear.a_pending`).
    With a seed, each layer draws from its own generator seeded by (seed, crc32(module name)), so A does not
    depend on the order in which layers are created or on the global RNG.
    """
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu")
        gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    r, d_in = weight.shape
    with torch.no_grad():
        if init == "kaiming" or init in DATA_INITS:
            bound = 1.0 / math.sqrt(d_in)
            value = torch.rand(r, d_in, generator=gen, dtype=torch.float64) * (2 * bound) - bound
        elif init == "gaussian":
            value = torch.randn(r, d_in, generator=gen, dtype=torch.float64) / r
        elif init == "orthogonal":
            g = torch.randn(d_in, r, generator=gen, dtype=torch.float64)
            q, _ = torch.linalg.qr(g)  # (d_in, r) orthonormal columns
            value = q.t() * math.sqrt(1.0 / 3.0)  # kaiming rows have E‖a‖² = d_in·b²/3 = 1/3
        else:
            raise ValueError(f"init_lora_weights must be one of {INITS}, got {init!r}")
        weight.copy_(value.to(device=weight.device, dtype=weight.dtype))


# The u slots of share groups per input tensor: id(x) → (weak reference to x, {share group: slot}). Kept here rather
# than on the tensor: a dict in x.__dict__ would travel with any model output that is x itself (T5's
# encoder_last_hidden_state) into pickles. An entry goes when its tensor does.
_SLOTS: dict[int, tuple[weakref.ref[Tensor], dict[str, SharedProjection]]] = {}


def _slots_of(x: Tensor) -> dict[str, SharedProjection]:
    entry = _SLOTS.get(id(x))
    if entry is not None and entry[0]() is x:
        return entry[1]
    key = id(x)

    def forget(ref: weakref.ref[Tensor]) -> None:
        if _SLOTS.get(key, (None,))[0] is ref:
            del _SLOTS[key]

    slots: dict[str, SharedProjection] = {}
    _SLOTS[key] = (weakref.ref(x, forget), slots)
    return slots


class LoRAFALinear(nn.Module):
    """y = base_layer(x) + s·B·A·dropout(x), with A (lora_A.weight) frozen for LoRA-FA.

    Attributes:
        base_layer: the original `nn.Linear` or `Conv1D` (frozen).
        lora_A: `nn.Linear(d_in, r, bias=False)` holding A (r, d_in).
        lora_B: `nn.Linear(r, d_out, bias=False)` holding B (d_out, r), zero at init.
        scaling: s = lora_alpha / r, or lora_alpha / √r with rsLoRA.
        merged: whether s·B·A is currently folded into the base weight.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        method: str = "lora-fa",
        use_rslora: bool = False,
        init_lora_weights: str = "kaiming",
        init_seed: int | None = 0,
        projection: bool = False,
        name: str = "",
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not 0.0 <= lora_dropout < 1.0 or keep_probability(lora_dropout) <= 0.0:
            raise ValueError(f"lora_dropout must be in [0, 1 - 2**-17), got {lora_dropout!r} for module {name!r}")
        d_in, d_out = linear_dims(base_layer)
        if not 0 < r <= min(d_in, d_out):
            raise ValueError(
                f"r={r} must satisfy 0 < r <= min(d_in, d_out) = {min(d_in, d_out)} for module {name!r}"
            )
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, lora_dropout
        self.method, self.use_rslora, self.projection = method, use_rslora, projection
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.merged = False

        weight = _weight(base_layer)
        device: Any = weight.device
        if device.type == "meta":
            # accelerate offloads the weight (device_map with "cpu"/"disk", cpu_offload) and loads it for each
            # forward: the adapter, small, lives on the device where that forward runs. Without such a hook the
            # model is a shape-only one (the memory planner's) and so is the adapter.
            device = getattr(getattr(base_layer, "_hf_hook", None), "execution_device", None) or device
        factory = {"device": device, "dtype": weight.dtype if weight.is_floating_point() else None}
        # Adapters are kept in fp32 when the base is fp16/bf16: mixed precision needs fp32 master weights.
        if factory["dtype"] in (torch.float16, torch.bfloat16):
            factory["dtype"] = torch.float32
        self.lora_A = nn.Linear(d_in, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, d_out, bias=False, **factory)
        init_lora_A(self.lora_A.weight, init_lora_weights, init_seed, name)
        nn.init.zeros_(self.lora_B.weight)

        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.lora_A.weight.requires_grad_(method == "lora")
        self.lora_B.weight.requires_grad_(True)
        self._proj_key: tuple[int, int] | None = None
        self._proj: Tensor | None = None
        self.share_group: str | None = None
        """Set by `add_lorafa(share_a=True)`: layers with the same group hold equal A's and share u per input."""
        self.layer_name = name
        self.tied_to: tuple[str, ...] = ()
        """Other names of the base weight (e.g. the input embedding a tied lm_head shares), kept current by
        `lorafa.inject`: merge refuses, as adding s·B·A to a shared tensor changes every module that reads it."""
        self.a_pending = init_lora_weights in DATA_INITS
        """A waits for `lorafa.init_a_from_gradients` (or `load_adapter`); training forward passes refuse to run."""
        self.register_load_state_dict_pre_hook(_base_layer_under_plain_names)
        self.register_state_dict_post_hook(_unmerged_base_weight)

    @property
    def in_features(self) -> int:
        return linear_dims(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return linear_dims(self.base_layer)[1]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "bias":
                layer = self.__dict__.get("layer_name") or "this layer"
                raise AttributeError(
                    f"{type(self).__name__} {layer!r} has no attribute 'bias': code that reads an adapted layer's "
                    "weight and bias directly (e.g. a fused Mamba scan) would bypass its adapter; leave that layer "
                    "out of target_modules (or add it to exclude_modules); for nn.TransformerEncoderLayer's "
                    "linear1/linear2, whose eval-mode fast path does this, call "
                    "torch.backends.mha.set_fastpath_enabled(False) instead"
                ) from None
            raise

    @property
    def weight(self) -> Tensor:
        """The base weight, so code that inspects `module.weight` (dtype/device) keeps working."""
        return _weight(self.base_layer)

    def base_weight(self) -> Tensor:
        """The base weight as (d_out, d_in) (a transposed view for `Conv1D`)."""
        w = _weight(self.base_layer)
        return w.t() if self.fan_in_fan_out else w

    def projection_matrix(self) -> Tensor:
        """(A·Aᵀ)⁻¹ / s² for the gradient projection, computed once per A (A is frozen) and cached."""
        A = self.lora_A.weight
        if torch.compiler.is_compiling():
            # dynamo traces neither data_ptr() nor a write to the cache: P joins the graph (an r×r inverse per call)
            return projection_matrix(A, self.scaling)
        key = (A.data_ptr(), A._version)
        if self._proj is None or self._proj_key != key or self._proj.device != A.device:
            self._proj = projection_matrix(A, self.scaling)
            self._proj_key = key
        return self._proj

    def weight_delta(self, a: Tensor | None = None, b: Tensor | None = None) -> Tensor:
        """s·B·A laid out like the base weight (transposed for GPT-2's Conv1D), in its dtype: what merging adds.
        A and B default to the layer's own."""
        a = self.lora_A.weight if a is None else a
        b = self.lora_B.weight if b is None else b
        delta = ((b @ a) * self.scaling).to(_weight(self.base_layer).dtype)
        return delta.t() if self.fan_in_fan_out else delta

    def check_mergeable(self) -> None:
        """Raise ValueError if folding s·B·A into the base weight would not give this layer's output alone."""
        if self.tied_to:
            raise ValueError(
                f"cannot merge the adapter of {self.layer_name or 'this layer'!r}: its base weight is also "
                f"{list(self.tied_to)} (tied weights), which merging would change too; use the model unmerged "
                "(it trains, saves and loads as usual) or leave this layer out of target_modules"
            )
        if _weight(self.base_layer).device.type == "meta":
            raise ValueError(
                f"cannot merge the adapter of {self.layer_name or 'this layer'!r}: its base weight is offloaded "
                "(meta device; accelerate loads it for each forward), so there is no weight to add s·B·A to; load "
                "the model without offloading to merge"
            )
        if parametrize.is_parametrized(self.base_layer, "weight"):
            # The weight is recomputed from its parametrization's originals on every access: an addition is lost.
            raise ValueError(
                f"cannot merge the adapter of {self.layer_name or 'this layer'!r}: its base weight is computed by a "
                "parametrization (e.g. weight_norm, spectral_norm), which would drop s·B·A; use the model unmerged "
                "or call torch.nn.utils.parametrize.remove_parametrizations(layer.base_layer, 'weight') first"
            )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·B·A into the base weight. Idempotent.

        A merged layer's `state_dict()` still holds the unmerged W (and loading one into a merged layer adds s·B·A
        back), but `state_dict(keep_vars=True)` gives the live, merged parameter: do not load that one back."""
        if self.merged:
            return
        self.check_mergeable()
        _weight(self.base_layer).add_(self.weight_delta())
        self.merged = True

    @torch.no_grad()
    def unmerged_weight(self) -> Tensor:
        """The base layer's weight without s·B·A, as stored (a new tensor when merged)."""
        w = _weight(self.base_layer).detach()
        return w - self.weight_delta() if self.merged else w

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract s·B·A from the base weight again (exact up to floating-point rounding). Idempotent."""
        if not self.merged:
            return
        _weight(self.base_layer).sub_(self.weight_delta())
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.a_pending and self.training:
            raise RuntimeError(
                f"init_lora_weights {' / '.join(DATA_INITS)}: A is not set yet; call "
                "lorafa.init_a_from_gradients(model, batches, loss_fn) before training (lorafa train does), or load "
                "an adapter"
            )
        p = self.lora_dropout if self.training else 0.0
        if _hooked(self.base_layer) or "_hf_hook" in self.lora_A.__dict__ or "_hf_hook" in self.lora_B.__dict__:
            return self._forward_through_base(x, p)
        proj = self.projection_matrix() if self.projection and self.lora_B.weight.requires_grad else None
        return lorafa_linear(
            x,
            self.base_weight(),
            _bias(self.base_layer),
            self.lora_A.weight,
            self.lora_B.weight,
            self.scaling,
            p,
            proj,
            self._shared_slot(x, p),
        )

    def _forward_through_base(self, x: Tensor, p: float) -> Tensor:
        """y = base_layer(x) + s·B·A·dropout(x), for a base layer with hooks (a user's, or accelerate's, which
        loads an offloaded weight): calling it runs them, as PEFT does. The frozen base layer keeps nothing of x
        for backward and the adapter's term keeps only u, so the saving is the same; the two products are not
        fused, so it is a little slower."""
        y = self.base_layer(x)
        with _onloaded(self.lora_A, self.lora_B):
            a, b = self.lora_A.weight, self.lora_B.weight
            if (a.is_meta or b.is_meta) and not x.is_meta:
                raise RuntimeError(
                    f"the adapter of {self.layer_name or 'this layer'!r} is on the meta device (offloaded without "
                    "weights to load back); add adapters after the model is dispatched, or keep them on a device"
                )
            proj = self.projection_matrix() if self.projection and b.requires_grad else None
            delta = lorafa_linear(x, None, None, a, b, self.scaling, p, proj, self._shared_slot(x, p))
        return y + delta.to(y.device)

    def _shared_slot(self, x: Tensor, p: float) -> SharedProjection | None:
        """The u slot of this layer's share group for input x, kept as long as x lives (`_slots_of`).

        A slot is reused while x, the dropout probability, autocast and grad mode are unchanged and no member's A
        was written since it used the slot. A recomputed forward under activation checkpointing fills a new slot
        when its x is new (pre-norm blocks) and reuses the first forward's u and seed when the block reads its own
        input (post-norm blocks, cross-attention): the same values either way, and `LoRAFALinearFunction` draws a
        seed on every call so the replayed random stream stays aligned.
        """
        if self.share_group is None or torch.compiler.is_compiling():
            return None  # compiled: every layer computes its own u (the same values; dynamo cannot trace the slots)
        device_type = x.device.type
        cast = (
            torch.get_autocast_dtype(device_type)
            if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
            else None
        )
        key = (x._version, p, cast, torch.is_grad_enabled())
        slots = _slots_of(x)
        slot = slots.get(self.share_group)
        a = self.lora_A.weight
        if slot is None or slot.key != key or slot.a_versions.get(id(a), a._version) != a._version:
            slot = slots[self.share_group] = SharedProjection(key)
        slot.a_versions[id(a)] = a._version
        return slot

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
            f"lora_dropout={self.lora_dropout}, projection={self.projection}, merged={self.merged}"
            + (f", share_group={self.share_group!r}" if self.share_group else "")
        )


def lorafa_layers(model: nn.Module) -> Iterator[tuple[str, LoRAFALinear]]:
    """Yield (module name, layer) for every LoRAFALinear in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRAFALinear):
            yield name, module
