"""Chunked linear + cross-entropy: the causal-LM loss without (tokens × vocab) logits kept for backward.

The plain path, ``lm_head(h)`` followed by ``cross_entropy``, keeps fp32 log-probabilities of shape
(tokens, vocab) alive until backward: 0.4 GiB for SmolLM2 at batch 8 × 256, 2 GiB per 4k-token sequence at
Llama-3's 128k vocabulary (issue 7). Here the head and the loss are one autograd Function that walks the tokens
in chunks, computes each chunk's logits, loss and gradient in forward and keeps only the gradient w.r.t. the
hidden states (tokens, d) — plus dW when the head is trainable — so at most one chunk of logits exists at a time.

Label handling is exactly transformers' ``ForCausalLMLoss``: position t predicts label t+1 (labels padded with the
ignore index and shifted), ignored positions contribute nothing, and the loss is the mean over the rest (or the
sum divided by ``num_items_in_batch`` when given). Ignored positions are dropped before the head, so prompt
masking in SFT also saves their compute.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafa.data_files import one_line

__all__ = ["LinearCrossEntropy", "chunked_causal_lm_loss", "default_chunk_size", "linear_cross_entropy"]

# About 64 MiB of fp32 logits per chunk: large enough for efficient matmuls, small next to any model's weights.
_LOGITS_PER_CHUNK = 1 << 24


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits stay near 64 MiB (a multiple of 8 when ≥ 8)."""
    rows = max(1, _LOGITS_PER_CHUNK // max(1, vocab_size))
    return rows if rows < 8 else rows - rows % 8


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h Wᵀ + b`` over rows of h, computed chunk by chunk.

    Forward, for rows h_i (d,) with targets y_i, logit scale s, optional soft-cap c and normaliser n::

        z_i = s · (W h_i + b)                        (V,)  computed in h's dtype, then upcast to fp32
        z_i ← c · tanh(z_i / c)                      only with a soft-cap
        loss = (1 / n) · Σ_i [logsumexp(z_i) − z_i[y_i]]

    Gradients (evaluated chunk by chunk in forward, multiplied by the incoming scalar gradient in backward)::

        g_i = (softmax(z_i) − onehot(y_i)) / n · (1 − tanh²(·) with a soft-cap) · s       (V,)
        dh_i = g_i W          dW = Σ_i g_iᵀ h_i          db = Σ_i g_i

    Only the gradients the inputs need (``ctx.needs_input_grad``) are computed and saved: dh (N, d) in h's dtype,
    dW (V, d) and db (V,) in the head's dtype. Logits never outlive their chunk.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
        normalizer: float,
        logit_scale: float,
        softcap: float | None,
    ) -> torch.Tensor:
        # h (N, d) rows that all have a valid target; targets (N,) int64 in [0, V).
        need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n_rows, vocab = h.shape[0], weight.shape[0]
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if need_dh else None  # (N, d)
        # dW/db accumulate in fp32 across chunks, as one big matmul would accumulate internally.
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        db = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_db else None

        # fp16 keeps the stored gradients scaled by S (a power of two, so exactly undone in backward): unscaled,
        # a probability / n of ~1e-8 underflows fp16 before a GradScaler's factor arrives in backward, as it does not
        # on the plain path, which multiplies by that factor first. S·g stays below 256·logit_scale.
        store = 2.0 ** (round(math.log2(max(normalizer, 1.0))) + 8) if weight.dtype == torch.float16 else 1.0
        for start in range(0, n_rows, chunk_size):
            hc = h[start : start + chunk_size]  # (c, d)
            yc = targets[start : start + chunk_size]  # (c,)
            z = F.linear(hc, weight, bias).float()  # (c, V) fp32, as transformers upcasts before the loss
            if logit_scale != 1.0:
                z = z * logit_scale
            tanh_z = None
            if softcap is not None:
                tanh_z = torch.tanh(z / softcap)
                z = tanh_z * softcap
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            loss_sum += (lse - z.gather(1, yc[:, None]).squeeze(1)).sum()
            if not (need_dh or need_dw or need_db):
                continue
            g = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits (c, V)
            g[torch.arange(g.shape[0], device=g.device), yc] -= 1.0
            g.mul_(1.0 / normalizer)
            if tanh_z is not None:
                g.mul_(1.0 - tanh_z * tanh_z)
            if logit_scale != 1.0:
                g.mul_(logit_scale)
            if store != 1.0:
                g.mul_(store)
            if db is not None:
                db += g.sum(0)
            # Like the plain path, whose fp32 upcast hands the head a gradient in the head's dtype.
            gw = g.to(weight.dtype)  # (c, V)
            if dh is not None:
                dh[start : start + chunk_size] = gw @ weight  # (c, d)
            if dw is not None and weight.dtype == torch.float32:
                dw.addmm_(gw.t(), hc.float())  # (V, d)
            elif dw is not None:
                dw += (gw.t() @ hc.to(weight.dtype)).float()  # (V, d), low-precision matmul per chunk

        ctx.save_for_backward(
            dh,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None and bias is not None else None,
        )
        ctx.store = store
        return loss_sum / normalizer

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        dh, dw, db = ctx.saved_tensors
        # The loss is a scalar, so each stored gradient only needs the incoming scalar factor (and 1/S in fp16).
        if ctx.store != 1.0:
            grad_loss = grad_loss / ctx.store
        grad_h = dh * grad_loss if dh is not None else None  # (N, d)
        grad_w = dw * grad_loss if dw is not None else None  # (V, d)
        grad_b = db * grad_loss if db is not None else None  # (V,)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    shift_labels: bool = True,
    num_items_in_batch: int | torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of the output head over hidden states, without keeping full logits for backward.

    Equals ``transformers.loss.loss_utils.ForCausalLMLoss(F.linear(hidden, weight, bias), labels, V)`` (with
    ``shift_labels=True``) in value and in gradients w.r.t. hidden, weight and bias.

    Args:
        hidden: Hidden states (..., T, d) feeding the head, any float dtype.
        weight: Head weight (V, d); receives a gradient only if it requires grad (e.g. tied, trainable embeddings).
        labels: Token ids (..., T); ``ignore_index`` marks positions without a loss (padding, prompt).
        bias: Optional head bias (V,).
        chunk_size: Tokens per chunk; None picks ``default_chunk_size(V)``.
        ignore_index: Label value that contributes no loss.
        shift_labels: True for causal LMs (position t predicts label t+1); False if labels are already aligned.
        num_items_in_batch: If given, divide the summed loss by this instead of the number of counted tokens
            (transformers' gradient-accumulation semantics).
        logit_scale: Multiplier applied to the logits before the loss (Cohere's ``logit_scale``).
        softcap: If set, logits become ``softcap · tanh(logits / softcap)`` (Gemma-2's final soft-capping).

    Returns:
        The fp32 scalar loss (NaN when no token is counted and ``num_items_in_batch`` is None, like transformers).

    Raises:
        ValueError: On mismatched shapes or a non-positive ``chunk_size``/``softcap``/``num_items_in_batch``.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] {tuple(hidden.shape[:-1])}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} must be (vocab, {hidden.shape[-1]})")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias shape {tuple(bias.shape)} must be ({weight.shape[0]},)")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")

    if shift_labels:
        # transformers' ForCausalLMLoss: pad with the ignore index, then drop the first label.
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = labels.reshape(-1)  # (N,)
    # Select on the labels' own device: they may hold values where hidden has none (the planner's meta runs).
    keep = (targets != ignore_index).nonzero().squeeze(1)  # (n,)
    targets, keep = targets.to(hidden.device), keep.to(hidden.device)
    rows = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
    if keep.numel() < targets.numel():
        # index_select's backward scatters dh back and keeps only the (n,) indices.
        rows, targets = rows.index_select(0, keep), targets.index_select(0, keep)  # (n, d), (n,)

    if num_items_in_batch is None:
        normalizer = float(keep.numel())
    else:
        normalizer = float(
            num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        )
        if normalizer <= 0:
            raise ValueError(f"num_items_in_batch must be positive, got {num_items_in_batch}")
    size = chunk_size or default_chunk_size(weight.shape[0])

    device_type = rows.device.type
    # meta (the planner's shape-only runs) has no autocast to ask about.
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # Do autocast's cast explicitly (differentiably), then run the Function with dtypes fixed.
        dtype = torch.get_autocast_dtype(device_type)
        rows, weight = rows.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return LinearCrossEntropy.apply(
                rows, weight, bias, targets, size, normalizer, logit_scale, softcap
            )
    if rows.dtype != weight.dtype:
        # a head kept in fp32 on a half-precision body (lorafa.models' fully trained head) computes on upcast
        # inputs; the cast is differentiable, so the body gets its gradient in its own dtype
        rows = rows.to(weight.dtype)
    return LinearCrossEntropy.apply(rows, weight, bias, targets, size, normalizer, logit_scale, softcap)


def _head_transform(config: Any) -> tuple[float, float | None]:
    """(logit_scale, softcap) that a transformers causal LM applies between its head and its loss.

    Raises:
        ValueError: a config field whose meaning differs between architectures (`logits_scaling`, by which Granite
            divides and HyperCLOVAX multiplies) on an architecture not known here.
    """
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        if not str(getattr(config, "model_type", "")).startswith("granite"):
            raise ValueError(
                f"model_type {getattr(config, 'model_type', None)!r} sets logits_scaling, which lorafa.loss only "
                "knows from Granite (logits / logits_scaling)"
            )
        scale /= float(config.logits_scaling)  # Granite: logits / logits_scaling
    if getattr(config, "lm_head_multiplier", None) is not None:  # Falcon-H1: logits * lm_head_multiplier
        scale *= float(config.lm_head_multiplier)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma-2: c · tanh(logits / c)
    if softcap is None:
        softcap = getattr(config, "logits_soft_cap", None)  # RecurrentGemma: the same
    return scale, (float(softcap) if softcap is not None else None)


def chunked_loss_mismatch(model: nn.Module, batch: Mapping[str, Any]) -> str | None:
    """Why `chunked_causal_lm_loss(model, batch)` would not be `model(**batch).loss`, or None when it is.

    Both are computed once on `batch`, in eval mode (no dropout) and without gradients: a head or a logit transform
    that `chunked_causal_lm_loss` does not model shows as a different value. The tolerance allows for the chunked
    loss's fp32 log-softmax against the model's own in half precision.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                ours = chunked_causal_lm_loss(model, batch)
            except (ValueError, RuntimeError) as e:  # what it refuses, or a head it cannot run
                return one_line(e, with_type=False)
            theirs = model(**batch, use_cache=False).loss
    finally:
        model.train(was_training)
    half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    tol = 2e-2 if half else 1e-4
    if not torch.isclose(ours.float(), theirs.float(), rtol=tol, atol=tol):
        return (
            f"on a training batch the chunked loss is {float(ours):.6g} but {type(model).__name__}'s own loss is "
            f"{float(theirs):.6g}: its head, logits transform, label shift or an extra loss term is one "
            "lorafa.loss does not model"
        )
    return None


# Causal LMs built from an encoder-decoder family's decoder (BartForCausalLM, MBart..., TrOCR...): their loss is
# the cross-entropy of unshifted labels.
_UNSHIFTED = frozenset(
    {"bart", "mbart", "marian", "pegasus", "pegasus_x", "blenderbot", "blenderbot-small", "plbart", "trocr"}
)


def chunked_causal_lm_loss(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``model(**batch).loss`` of a Hugging Face causal LM, via the chunked head + loss.

    Runs the model body (``model.base_model``, e.g. ``LlamaForCausalLM.model`` or ``GPT2LMHeadModel.transformer``)
    and applies :func:`linear_cross_entropy` with ``model.get_output_embeddings()``. The result equals
    ``model(**batch).loss`` (mean over non-ignored shifted labels) in value and gradients.

    Args:
        model: A transformers ``*ForCausalLM`` whose forward is body → output head → ``ForCausalLMLoss``
            (with Cohere/Granite logit scaling or Gemma-2 soft-capping taken from its config).
        batch: Model inputs including ``labels``; every other key is passed to the body.
        chunk_size: Tokens per chunk; None picks ``default_chunk_size(vocab)``.
        ignore_index: Label value that contributes no loss.
        num_items_in_batch: Optional normaliser for gradient accumulation (see :func:`linear_cross_entropy`).

    Returns:
        The fp32 scalar loss.

    Raises:
        ValueError: If ``batch`` has no ``labels``, the model is an encoder-decoder (or the unshifted
            ``ForCausalLM`` decoder of one: BART, mBART, Marian, ...) or adds a router auxiliary loss, has no
            separate body, its output head is not an ``nn.Linear`` child of the model, or its config sets a logits
            transform not known here.
    """
    if "labels" not in batch:
        raise ValueError(f"batch needs 'labels' for the loss; got keys {sorted(batch)}")
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "model_type", None) in _UNSHIFTED:
        # Their loss is over the decoder's (or unshifted) labels, not the shifted inputs of one body.
        raise ValueError(
            f"{type(model).__name__} is no decoder-only causal LM with shifted labels; its loss is not chunked"
        )
    if getattr(config, "output_router_logits", False):
        # Mixture-of-experts models then add the router's auxiliary loss, which the chunked loss does not.
        raise ValueError(
            f"{type(model).__name__} adds a router auxiliary loss (output_router_logits=True); the chunked loss "
            "computes only the language-modelling part"
        )
    body = model.base_model if hasattr(model, "base_model") else None
    if not isinstance(body, nn.Module) or body is model:
        raise ValueError(
            f"{type(model).__name__} has no separate body (model.base_model); cannot chunk its loss"
        )
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear):
        adapted = " (an adapted output head is not supported: leave it out of target_modules)" if head else ""
        raise ValueError(f"the chunked loss needs an nn.Linear output head, got {type(head).__name__}{adapted}")
    if not any(child is head for child in model.children()):
        # e.g. BERT/RoBERTa-style LM heads: dense → activation → norm → decoder, of which the decoder is the
        # output embedding; applying it alone to the body's output would skip the rest.
        raise ValueError(
            f"{type(model).__name__}'s output layer sits inside a prediction head with layers of its own; the "
            "chunked loss applies the output layer to the body's output directly"
        )

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_items_in_batch")}
    inputs.setdefault("use_cache", False)  # a KV cache is useless in training and only costs memory
    outputs = body(**inputs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]  # (B, T, d)
    scale, softcap = _head_transform(model.config)
    return linear_cross_entropy(
        hidden,
        head.weight,
        batch["labels"],
        head.bias,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
        logit_scale=scale,
        softcap=softcap,
    )
