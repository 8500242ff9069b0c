"""LoRAFAConfig: the adapter configuration (PEFT's names where PEFT has the concept), validated on creation."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lorafa.autograd import keep_probability
from lorafa.layer import DATA_INITS, INITS, METHODS


@dataclass
class LoRAFAConfig:
    """Configuration of LoRA-FA (or LoRA) adapters. Invalid values raise ValueError naming the field."""

    r: int = 8
    """Rank of the adapter."""
    lora_alpha: float = 16.0
    """Scale numerator: s = lora_alpha / r (or lora_alpha / √r with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout probability on the adapter's input, in [0, 1)."""
    target_modules: list[str] | str | None = None
    """Module names/suffixes (list), a regex matched against full module names (str), "all-linear" (every linear
    layer but the output embedding and the task head, `lorafa.heads`, and, with a warning, MoE routers and layers
    with one output or fewer than r), or None for the architecture's default (see
    `lorafa.targets.DEFAULT_TARGETS`)."""
    method: str = "lora-fa"
    """"lora-fa" (A frozen, only B trained; keeps r numbers per token) or "lora" (A and B trained)."""
    use_rslora: bool = False
    """Rank-stabilised scaling s = lora_alpha / √r."""
    modules_to_save: list[str] | None = None
    """Modules (names/suffixes) trained fully and saved with the adapter, e.g. a classification head."""
    init_lora_weights: str = "kaiming"
    """Initialisation of A: "kaiming" (uniform, PEFT's default), "gaussian" (N(0, 1/r²)), "orthogonal", or
    "gradient" (top right singular vectors of the base weight's gradient on `init_batches` training batches; set by
    `lorafa.init_a_from_gradients`, which `lorafa train` calls; not in the paper, see docs/TRAINING.md), or "inputs"
    (the same from the layer inputs' principal directions, as EVA does for LoRA)."""
    init_batches: int = 8
    """Training batches that set A when init_lora_weights is "gradient" or "inputs"."""
    init_seed: int | None = 0
    """Seed for A; each layer uses (init_seed, its module name). None draws from the global RNG."""
    projection: bool = False
    """Apply the LoRA-FA gradient projection g_B ← g_B·(A·Aᵀ)⁻¹/s² (method "lora-fa" only)."""
    exclude_modules: list[str] | str = field(default_factory=list)
    """Module names/suffixes (list) or a regex matched against full module names (str, as PEFT reads it) never
    adapted, even when target_modules matches them."""
    share_a: bool = False
    """Opt-in (method "lora-fa" only): adapted sibling layers with the same input width (q/k/v, gate/up) share one
    frozen A; layers that then read the same input tensor also share u = A·dropout(x) and its dropout mask, so one
    (…, r) tensor is kept per shared input instead of one per layer. Each layer keeps its own B. Not in the paper
    (which draws an independent A per layer); see docs/MEMORY.md."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        alpha = self.lora_alpha
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, int | float)
            or not math.isfinite(alpha)
            or alpha <= 0
        ):
            raise ValueError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        p = self.lora_dropout
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if keep_probability(p) <= 0.0:
            raise ValueError(
                f"lora_dropout must be below 1 - 2**-17 (masks keep inputs with probability in steps of 2**-16), "
                f"got {self.lora_dropout!r}"
            )
        for flag in ("use_rslora", "projection"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        ex = self.exclude_modules
        if isinstance(ex, str):
            try:
                re.compile(ex)
            except re.error as e:
                raise ValueError(f"exclude_modules is not a valid regex: {ex!r} ({e})") from e
        elif not isinstance(ex, list | tuple) or not all(isinstance(m, str) and m for m in ex):
            raise ValueError(f"exclude_modules must be a list of module names or a regex, got {ex!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.init_lora_weights not in INITS:
            raise ValueError(
                f"init_lora_weights must be one of {list(INITS)}, got {self.init_lora_weights!r}"
            )
        if (
            isinstance(self.init_batches, bool)
            or not isinstance(self.init_batches, int)
            or self.init_batches < 1
        ):
            raise ValueError(f"init_batches must be a positive integer, got {self.init_batches!r}")
        if self.init_lora_weights in DATA_INITS and self.share_a:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} does not support share_a=True (one A per layer)"
            )
        if not isinstance(self.share_a, bool):
            raise ValueError(f"share_a must be true or false, got {self.share_a!r}")
        if self.share_a and self.method != "lora-fa":
            raise ValueError("share_a=True needs method='lora-fa' (a shared A must stay frozen)")
        if self.projection and self.method != "lora-fa":
            raise ValueError("projection=True needs method='lora-fa' (the projection assumes a frozen A)")
        tm = self.target_modules
        if isinstance(tm, str):
            if tm != "all-linear":
                try:
                    re.compile(tm)
                except re.error as e:
                    raise ValueError(f"target_modules is not a valid regex: {tm!r} ({e})") from e
        elif tm is not None:
            if isinstance(tm, tuple | set):
                self.target_modules = tm = sorted(tm) if isinstance(tm, set) else list(tm)
            if not isinstance(tm, list) or not tm or not all(isinstance(t, str) and t for t in tm):
                raise ValueError(
                    f"target_modules must be a non-empty list of names, a regex or 'all-linear', got {tm!r}"
                )
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list | tuple)
            or not all(isinstance(m, str) for m in self.modules_to_save)
        ):
            raise ValueError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        if self.init_seed is not None and (
            isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int)
        ):
            raise ValueError(f"init_seed must be an int or None, got {self.init_seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRAFAConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LoRAFAConfig field(s): {unknown}")
        return cls(**d)
