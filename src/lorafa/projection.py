"""The LoRA-FA gradient projection for B (Zhang et al. 2023, later version; PEFT's `LoraFAOptimizer`).

With A frozen, the full-weight gradient G = ∂L/∂W' of the adapted weight W' = W + s·B·A is best approximated
inside the reachable set {s·ΔB·A} by projecting onto A's row space. B's plain gradient is g_B = s·G·Aᵀ, and the
projected update is ΔB = G·Aᵀ·(A·Aᵀ)⁻¹ / s, i.e. in terms of g_B:

    g_B ← g_B · (A·Aᵀ)⁻¹ / s²

A is frozen, so P = (A·Aᵀ)⁻¹ / s² (r×r) is computed once per layer and cached by the layer; the autograd Function
applies it to dB in backward, so every torch optimizer sees the projected gradient and checkpoints resume
unchanged (P is a function of A, which is saved with the adapter).
"""

from __future__ import annotations

import torch
from torch import Tensor

# The same Tikhonov term PEFT's LoraFAOptimizer adds before inverting, for parity and for rank-deficient A.
DAMPING = 1e-8


def projection_matrix(lora_A: Tensor, scaling: float) -> Tensor:
    """P = (A·Aᵀ + δI)⁻¹ / s², computed in float64 and returned in A's dtype, shape (r, r)."""
    a = lora_A.detach().to(torch.float64)
    r = a.shape[0]
    gram = a @ a.t() + DAMPING * torch.eye(r, dtype=torch.float64, device=a.device)  # (r, r)
    p = torch.linalg.pinv(gram) / (scaling**2)
    return p.to(lora_A.dtype)
