"""Data-aware A for LoRA-FA: the top right singular vectors of the full-weight gradient (opt-in, not in the paper).

LoRA-FA trains only B, so every change of an adapted weight W' = W + s·B·A lies in A's row space. With the full-weight
gradient G = ∂L/∂W (d_out, d_in), B's gradient is g_B = s·G·Aᵀ, and one SGD step on B changes W' by
−η·s²·G·Aᵀ·A: the part of G that A's rows can see. A random A (the paper's) sees a random r-dimensional slice of
G's row space, about r/d_in of its energy. Taking A's rows from the top-r right singular vectors Vᵣ of G, summed over
a few training batches at the start (B = 0, so W' = W), keeps the largest share of ‖G‖² any rank-r row space can
(Eckart–Young); this is the idea of LoRA-GA (Wang et al. 2024) and LoRA-One (Zhang et al. 2025) applied to the frozen
factor. A stays frozen afterwards: memory and speed are those of LoRA-FA. `init_lora_weights="gradient"` selects it;
`lorafa train` calls `init_a_from_gradients` on the first `init_batches` training batches.
`init_lora_weights="inputs"` takes the rows from the layer inputs' principal directions instead (the top-r
eigenvectors of Σ xᵀx over every token position of the batches, padding included: EVA's choice for LoRA's A).

Row i of A is c_i·v_i, with c_i chosen so that u_i = A_i·x has, over the calibration tokens, the mean square a
Kaiming-uniform row gives on the same inputs, E‖x‖²/(3·d_in). Unscaled (or scaled to Kaiming's row norm), the top
directions, which follow the largest input features, gave u up to orders of magnitude larger than the random init's:
a larger and uneven effective learning rate that made SmolLM2 SFT unstable at the random init's learning rates.
A's rows stay orthogonal (A·Aᵀ is diagonal).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lorafa.layer import DATA_INITS, LoRAFALinear, lorafa_layers

__all__ = ["init_a_from_gradients"]

# Above this min(d_out, d_in) a randomized low-rank SVD replaces the exact one (seconds per layer on CPU otherwise).
_EXACT_SVD_MAX = 2048


def init_a_from_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any], Tensor],
    reduce: Callable[[Tensor], Tensor] | None = None,
    max_bytes: int | None = None,
    statistic: str = "gradient",
) -> dict[str, float]:
    """Set every adapter's frozen A to the top-r right singular vectors of its base weight's gradient, in place
    (each row scaled as described in the module docstring).

    The model runs in eval mode (no dropout) on `batches`: forward+backward passes, then one forward-only pass for
    the row scales. For each adapted layer, with x (N, d_in) its input and g = ∂L/∂y (N, d_out) its output
    gradient, G += gᵀ·x is accumulated in fp32: 4·d_out·d_in bytes per layer, freed once its A is set. With
    `max_bytes`, the layers are taken in groups (module order) whose accumulators fit in it, one forward+backward
    pass over `batches` per group; the result is the same. Gradients that backward leaves on B or on
    modules_to_save are cleared afterwards.

    Args:
        model: a model prepared with `add_lorafa`, adapters not merged, B still zero.
        batches: the calibration batches (training data), each passed to `loss_fn`.
        loss_fn: batch -> scalar loss of `model`.
        reduce: sums a tensor over processes (data parallel), so that every process derives the same A.
        max_bytes: most bytes of gradient accumulators held at once (a layer larger than this gets a pass of its
            own); None: all layers in one pass (one fp32 copy of the adapted weights).
        statistic: "gradient" (G = Σ gᵀ·x, above) or "inputs": A's rows from the top-r right singular vectors of
            the layer's inputs X (N, d_in), i.e. the top eigenvectors of C = Σ xᵀ·x (d_in, d_in; forward passes
            only), the principal directions EVA (Paischer et al. 2024) gives LoRA's A, without its rank
            redistribution. Scaled the same way.

    Returns:
        For each adapted module name, the share of ‖G‖²_F (or of Σ‖x‖², for "inputs") that A's row space keeps
        (a random A keeps about r/d_in).

    Raises:
        ValueError: no adapters, merged adapters, share_a, B not zero, unknown statistic, or no batch reached the
            adapters.
    """
    if statistic not in DATA_INITS:
        raise ValueError(f"init_a_from_gradients: statistic must be one of {DATA_INITS}, got {statistic!r}")
    inputs = statistic == "inputs"
    layers = dict(lorafa_layers(model))
    if not layers:
        raise ValueError("init_a_from_gradients: the model has no adapters (call lorafa.add_lorafa first)")
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"init_a_from_gradients: {name} is merged; unmerge it first")
        if layer.share_group is not None:
            raise ValueError(
                "init_a_from_gradients: not supported with share_a (layers would need one shared A)"
            )
        if bool(layer.lora_B.weight.detach().any()):
            raise ValueError(f"init_a_from_gradients: {name}'s B is not zero (A must be set before training)")

    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"init_a_from_gradients: max_bytes must be positive, got {max_bytes}")

    grads: dict[str, Tensor] = {}

    def accumulate(name: str, lhs: Tensor, x2: Tensor) -> None:
        """grads[name] += lhsᵀ·x2: G (d_out, d_in) from g, or C (d_in, d_in) from x itself."""
        if name not in grads:
            grads[name] = lhs.t() @ x2
        else:
            grads[name].addmm_(lhs.t(), x2)

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if inputs:
                x2 = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (N, d_in)
                accumulate(name, x2, x2)
                return
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            x = args[0].detach()

            def on_grad(g: Tensor) -> None:
                x2 = x.reshape(-1, x.shape[-1]).float()  # (N, d_in)
                accumulate(name, g.reshape(-1, g.shape[-1]).float(), x2)  # g: (N, d_out)

            output.register_hook(on_grad)

        return hook

    calibration = list(batches)  # read once per group, then once more for the input scales
    kept: dict[str, float] = {}
    rows: dict[str, Tensor] = {}
    reached = False
    for group in _groups(layers, max_bytes, inputs):
        try:
            with _hooked_eval(model, {layers[name]: make_hook(name) for name in group}):
                for batch in calibration:
                    if inputs:
                        with torch.no_grad():
                            loss_fn(batch)
                    else:
                        loss = loss_fn(batch)
                        if not loss.requires_grad:
                            raise ValueError(
                                "init_a_from_gradients: loss_fn returned a loss without a gradient path (detached, "
                                "computed under no_grad, or every parameter frozen, e.g. is_trainable=False)"
                            )
                        loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
        reached = reached or bool(grads)
        with torch.no_grad():
            for name in group:
                layer = layers[name]
                A = layer.lora_A.weight
                G = grads.pop(name, None)
                if G is None:
                    G = torch.zeros(A.shape[1] if inputs else layer.out_features, A.shape[1], device=A.device)
                if reduce is not None:
                    G = reduce(G)
                total = float(G.square().sum())
                if total == 0.0:  # no signal (e.g. the layer does not reach the loss): keep the random A
                    kept[name] = 0.0
                else:
                    rows[name] = _top_right_singular_vectors(G, A.shape[0])  # (r, d_in)
                    if inputs:  # share of Σ‖x‖² = trace(C) in A's row space: trace(V·C·Vᵀ) / trace(C)
                        kept[name] = float((rows[name] @ G * rows[name]).sum()) / float(G.trace())
                    else:
                        kept[name] = float((G @ rows[name].t()).square().sum()) / total
                del G
    if not reached:
        raise ValueError(
            "init_a_from_gradients: no gradient reached the adapters (no batches, or no loss path)"
        )
    for name in layers:
        if name not in rows:
            layers[name].a_pending = False
    scales = _kaiming_scales(model, layers, rows, calibration, loss_fn, reduce)
    with torch.no_grad():
        for name, vr in rows.items():
            A = layers[name].lora_A.weight
            A.copy_((vr * scales[name][:, None]).to(A.dtype))
            layers[name].a_pending = False
    return kept


def gradient_init_budget(device: torch.device) -> int | None:
    """`max_bytes` for `init_a_from_gradients` as `lorafa train` sets it: on a CUDA device a quarter of its free
    memory (the calibration passes' own activations need the rest; more groups only cost more passes), elsewhere
    None (one pass; the accumulators are one fp32 copy of the adapted weights in host memory)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, free // 4)


def _kaiming_scales(
    model: nn.Module,
    layers: dict[str, LoRAFALinear],
    rows: dict[str, Tensor],
    batches: list[Any],
    loss_fn: Callable[[Any], Tensor],
    reduce: Callable[[Tensor], Tensor] | None,
) -> dict[str, Tensor]:
    """Per-row scales c (r,) for the orthonormal rows V (r, d_in) of each layer, so that u_i = c_i·v_i·x has, over the
    calibration tokens, the RMS that a Kaiming-uniform row gives on the same inputs: E[(a·x)²] = E‖x‖²/(3·d_in).

    The top gradient directions are where the inputs are largest (outlier features), so unscaled they would hand
    B's optimizer a u up to orders of magnitude larger than the random init's, which acts as a much larger and
    uneven learning rate (measured: unstable at the random init's learning rates). One forward pass, no graph.
    """
    # Per layer: Σ_tokens u_i² for each row i, then Σ_tokens ‖x‖² (both sums over the same tokens).
    sums = {n: torch.zeros(v.shape[0] + 1, dtype=torch.float64, device=v.device) for n, v in rows.items()}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (N, d_in)
            u = x @ rows[name].t()  # (N, r)
            acc = sums[name]
            acc[:-1] += u.square().sum(0).double()
            acc[-1] += float(x.square().sum())

        return hook

    with _hooked_eval(model, {layers[n]: make_hook(n) for n in rows}), torch.no_grad():
        for batch in batches:
            loss_fn(batch)
    scales = {}
    for name, acc in sums.items():
        acc = reduce(acc) if reduce is not None else acc
        d_in = rows[name].shape[1]
        target = float(acc[-1]) / (3.0 * d_in)  # Σ_tokens ‖x‖² / (3·d_in): a Kaiming row's Σ_tokens u²
        per_row = acc[:-1]
        floor = 1e-12 * max(target, 1e-30)
        c = torch.where(
            per_row > floor,
            (target / per_row.clamp_min(floor)).sqrt(),
            torch.full_like(per_row, (1 / 3) ** 0.5),
        )
        scales[name] = c.float()
    return scales


def _groups(layers: dict[str, LoRAFALinear], max_bytes: int | None, inputs: bool = False) -> list[list[str]]:
    """Layer names in module order, cut into runs whose fp32 accumulators (4·d_out·d_in bytes each, 4·d_in² for
    the "inputs" statistic) fit in `max_bytes` (a layer larger than that on its own); one group when `max_bytes`
    is None."""
    if max_bytes is None:
        return [list(layers)]
    groups: list[list[str]] = [[]]
    used = 0
    for name, layer in layers.items():
        d_in = layer.lora_A.weight.shape[1]
        size = 4 * (d_in if inputs else layer.out_features) * d_in
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


@contextmanager
def _hooked_eval(model: nn.Module, hooks: dict[nn.Module, Callable[..., None]]) -> Iterator[None]:
    """Run the body with `model` in eval mode and each forward hook registered; restore the mode, drop the hooks."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def _top_right_singular_vectors(G: Tensor, r: int) -> Tensor:
    """The top-r right singular vectors of G (d_out, d_in) as orthonormal rows (r, d_in), fp32."""
    if min(G.shape) <= _EXACT_SVD_MAX:
        _, _, vh = torch.linalg.svd(G, full_matrices=False)
        return vh[:r].contiguous()
    # svd_lowrank draws its sketch from the global RNG: seed it for a reproducible A, and leave the RNG as it was.
    with torch.random.fork_rng(
        devices=[G.device] if G.device.type != "cpu" else [], device_type=G.device.type
    ):
        torch.manual_seed(0)
        _, _, v = torch.svd_lowrank(G, q=min(min(G.shape), 2 * r + 8), niter=6)
    return v[:, :r].t().contiguous()
