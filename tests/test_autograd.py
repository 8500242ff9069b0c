"""The LoRA-FA Function against plain autograd, and what it keeps for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from lorafa.autograd import keep_probability, lorafa_linear
from lorafa.layer import LoRAFALinear


def reference(x, W, b, A, B, s, mask=None, q=1.0):
    """Frozen-A LoRA in plain autograd: W·x + b + s·B·A·(m ⊙ x / q)."""
    xd = x if mask is None else x * mask / q
    y = x @ W.t() + s * (xd @ A.t()) @ B.t()
    return y if b is None else y + b


def make(n, d_in, d_out, r, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    W = torch.randn(d_out, d_in, generator=g, dtype=dtype) / d_in**0.5
    b = torch.randn(d_out, generator=g, dtype=dtype) if bias else None
    A = torch.randn(r, d_in, generator=g, dtype=dtype) / d_in**0.5
    B = torch.randn(d_out, r, generator=g, dtype=dtype)  # non-zero so the adapter path matters
    return x, W, b, A, B


def grads(fn, x, B, g):
    x = x.detach().clone().requires_grad_(True)
    B = B.detach().clone().requires_grad_(True)
    y = fn(x, B)
    y.backward(g)
    return y.detach(), x.grad, B.grad


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 9),
    d_in=st.integers(1, 24),
    d_out=st.integers(1, 24),
    r_frac=st.floats(0.01, 1.0),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_matches_plain_autograd_without_dropout(n, d_in, d_out, r_frac, bias, dtype):
    r = max(1, int(r_frac * min(d_in, d_out)))
    x, W, b, A, B = make(n, d_in, d_out, r, dtype, bias)
    g = torch.randn(n, d_out, dtype=dtype)
    s = 1.7
    got = grads(lambda x, B: lorafa_linear(x, W, b, A, B, s), x, B, g)
    ref = grads(lambda x, B: reference(x, W, b, A, B, s), x, B, g)
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-9}
    for a, e in zip(got, ref, strict=True):
        torch.testing.assert_close(a, e, **tol)


@pytest.mark.parametrize("n", [5, 9])  # 9 >= d_out: without dropout, dx takes the folded g·(W + s·B·A) path
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(p, n):
    x, W, b, A, B = make(n, 7, 6, 3, torch.float64, bias=True)
    x.requires_grad_(True)
    B.requires_grad_(True)
    b.requires_grad_(True)

    def f(x, B, b):
        torch.manual_seed(1234)  # the same seed, hence the same mask, on every call gradcheck makes
        return lorafa_linear(x, W, b, A, B, 0.9, p)

    assert torch.autograd.gradcheck(f, (x, B, b))


def test_bf16_activations_with_fp32_adapter():
    x, W, b, A, B = make(16, 32, 24, 4, torch.float32, bias=True)
    g = torch.randn(16, 24)
    xb, Wb, bb = x.bfloat16(), W.bfloat16(), b.bfloat16()
    got = grads(lambda x, B: lorafa_linear(x, Wb, bb, A, B, 2.0), xb, B, g.bfloat16())
    ref = grads(lambda x, B: reference(x, W, b, A, B, 2.0), x, B, g)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for a, e in zip(got, ref, strict=True):
        torch.testing.assert_close(a.float(), e, atol=0.1, rtol=0.05)


def saved_tensors(fn):
    """Run fn() recording every tensor autograd saves; returns (output, list of saved tensors)."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def non_parameter(saved, params):
    ptrs = {p.untyped_storage().data_ptr() for p in params}
    return [t for t in saved if t.untyped_storage().data_ptr() not in ptrs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_only_rank_r_projection_is_saved(dtype, p):
    torch.manual_seed(0)
    layer = LoRAFALinear(nn.Linear(64, 48).to(dtype), r=4, lora_alpha=8, lora_dropout=p)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 10, 64, dtype=dtype, requires_grad=True)
    y, saved = saved_tensors(lambda: layer(x))
    kept = non_parameter(saved, list(layer.parameters()))
    assert len(kept) == 1
    (u,) = kept
    # fp32 adapters on a bf16 layer keep u in fp32 (still r numbers per token), so B's gradient is fp32 math
    assert u.shape == (20, 4) and u.dtype == torch.float32
    # dB is s·Σ gᵀ·u for the u actually used in forward.
    g = torch.randn_like(y)
    y.backward(g)
    expected = layer.scaling * (g.reshape(-1, 48).float().t() @ u.float())
    torch.testing.assert_close(layer.lora_B.weight.grad, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["lora-fa", "lora"])
def test_fp32_adapters_on_a_half_precision_layer_train_as_precisely_as_peft(dtype, method):
    """A 16-bit base with fp32 adapters (model_dtype bfloat16, no autocast): the adapters' gradients come from fp32
    math on the 16-bit input and output gradient, as PEFT computes them, not rounded to 16 bits on the way."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 192)).to(dtype)
    ours = LoRAFALinear(copy.deepcopy(base[0]), r=16, lora_alpha=32, method=method)
    nn.init.normal_(ours.lora_B.weight, std=0.02)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=["0"]))
    peft_layer = peft.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(1024, 256).to(dtype) + (3.0 if dtype == torch.float16 else 0.0)
    g = torch.randn(1024, 192).to(dtype)
    ours(x).backward(g)
    peft(x).backward(g)
    # float64 reference of the same math on the same 16-bit x and g
    a, b, s = ours.lora_A.weight.double(), ours.lora_B.weight.double(), ours.scaling
    xd, gd = x.double(), g.double()
    ref_b = s * gd.t() @ (xd @ a.t())
    ref_a = s * (gd @ b).t() @ xd
    grads = [(ours.lora_B.weight.grad, peft_layer.lora_B["default"].weight.grad, ref_b)]
    if method == "lora":
        grads.append((ours.lora_A.weight.grad, peft_layer.lora_A["default"].weight.grad, ref_a))
    for mine, theirs, ref in grads:
        assert mine.dtype == torch.float32 and torch.isfinite(mine).all()
        err = ((mine.double() - ref).norm() / ref.norm()).item()
        peft_err = ((theirs.double() - ref).norm() / ref.norm()).item()
        assert err <= 2 * peft_err + 1e-6, (err, peft_err)


def test_autocast_keeps_no_fp32_copy_of_x():
    torch.manual_seed(0)
    layer = LoRAFALinear(nn.Linear(64, 48), r=4, lora_alpha=8, lora_dropout=0.1)
    x = torch.randn(20, 64, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, saved = saved_tensors(lambda: layer(x))
    assert y.dtype == torch.bfloat16
    kept = non_parameter(saved, list(layer.parameters()))
    assert [tuple(t.shape) for t in kept] == [(20, 4)]
    assert kept[0].dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and layer.lora_B.weight.grad is not None


def test_dropout_mask_in_backward_is_the_forward_mask():
    # With A = I (r = d_in) the saved u is exactly dropout(x), so the forward mask can be read off it and the
    # gradient compared with plain autograd using that mask.
    d, p = 16, 0.4
    W = torch.randn(12, d, dtype=torch.float64)
    A = torch.eye(d, dtype=torch.float64)
    B = torch.randn(12, d, dtype=torch.float64)
    x = torch.randn(30, d, dtype=torch.float64) + 3.0  # non-zero entries so the mask is visible
    g = torch.randn(30, 12, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    Bg = B.clone().requires_grad_(True)
    y, saved = saved_tensors(lambda: lorafa_linear(xg, W, None, A, Bg, 0.5, p))
    (u,) = non_parameter(saved, [W, A, Bg])
    mask = (u != 0).to(x.dtype)
    q = keep_probability(p)
    assert 0 < mask.mean() < 1
    torch.testing.assert_close(u, x * mask / q)
    y.backward(g)
    ref = grads(lambda x, B: reference(x, W, None, A, B, 0.5, mask, q), x, B, g)
    torch.testing.assert_close(y.detach(), ref[0])
    torch.testing.assert_close(xg.grad, ref[1])
    torch.testing.assert_close(Bg.grad, ref[2])


def _two_layers(p):
    torch.manual_seed(0)
    layers = nn.Sequential(
        LoRAFALinear(nn.Linear(32, 32), r=4, lora_alpha=8, lora_dropout=p),
        nn.GELU(),
        LoRAFALinear(nn.Linear(32, 16), r=4, lora_alpha=8, lora_dropout=p),
    )
    for m in layers:
        if isinstance(m, LoRAFALinear):
            nn.init.normal_(m.lora_B.weight)
    return layers


def _run(model, x, seed, use_checkpoint=False):
    torch.manual_seed(seed)
    xg = x.clone().requires_grad_(True)
    out = checkpoint(model, xg, use_reentrant=False) if use_checkpoint else model(xg)
    out.pow(2).sum().backward()
    grads_ = [m.lora_B.weight.grad.clone() for m in model if isinstance(m, LoRAFALinear)]
    model.zero_grad(set_to_none=True)
    return [xg.grad, *grads_]


def test_dropout_is_seeded_and_checkpoint_safe():
    model = _two_layers(0.2)
    x = torch.randn(8, 32)
    a = _run(model, x, seed=7)
    b = _run(model, x, seed=7)
    c = _run(model, x, seed=8)
    ck = _run(model, x, seed=7, use_checkpoint=True)
    for ga, gb, gk in zip(a, b, ck, strict=True):
        assert torch.equal(ga, gb)
        torch.testing.assert_close(gk, ga, atol=0, rtol=0)
    assert not torch.equal(a[1], c[1])  # another seed draws another mask


def test_conv1d_matches_reference():
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs; weight (16, 24)
    nn.init.normal_(conv.bias)
    layer = LoRAFALinear(conv, r=3, lora_alpha=6)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 16)
    g = torch.randn(2, 5, 24)
    W, b, A = conv.weight.t().detach(), conv.bias.detach(), layer.lora_A.weight.detach()

    def ours(x, B):
        with torch.no_grad():
            layer.lora_B.weight.copy_(B)
        layer.lora_B.weight.grad = None
        return layer(x)

    xg = x.clone().requires_grad_(True)
    y = ours(xg, layer.lora_B.weight.detach().clone())
    y.backward(g)
    ref = grads(lambda x, B: reference(x, W, b, A, B, layer.scaling), x, layer.lora_B.weight.detach(), g)
    torch.testing.assert_close(y.detach(), ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(xg.grad, ref[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.lora_B.weight.grad, ref[2], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_method_trains_A_and_keeps_x_not_mask(p):
    x, W, b, A, B = make(10, 12, 8, 3, torch.float64, bias=False)
    g = torch.randn(10, 8, dtype=torch.float64)
    xg, Ag, Bg = (t.clone().requires_grad_(True) for t in (x, A, B))
    torch.manual_seed(3)
    y, saved = saved_tensors(lambda: lorafa_linear(xg, W, None, Ag, Bg, 1.5, p))
    kept = non_parameter(saved, [W, Ag, Bg])
    assert sorted(tuple(t.shape) for t in kept) == [(10, 3), (10, 12)]  # u and x; never a mask or m ⊙ x
    y.backward(g)
    u = next(t for t in kept if t.shape == (10, 3))
    if p == 0:
        ref_A = torch.autograd.functional.vjp(lambda A: reference(x, W, None, A, B, 1.5), A, g)[1]
        torch.testing.assert_close(Ag.grad, ref_A)
    else:
        # dA = hᵀ·(m ⊙ x)/q with the forward's mask m; since u = (m ⊙ x / q)·Aᵀ, dA·Aᵀ must equal hᵀ·u.
        h = 1.5 * g @ B
        torch.testing.assert_close(Ag.grad @ A.t(), h.t() @ u)


def test_no_gradient_for_frozen_inputs():
    x, W, b, A, B = make(4, 6, 5, 2, torch.float32, bias=True)
    Bg = B.clone().requires_grad_(True)
    y = lorafa_linear(x, W, b, A, Bg, 1.0, 0.1)
    y.sum().backward()
    assert Bg.grad is not None and x.grad is None and A.grad is None and W.grad is None


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_dropout_mask_rate_and_determinism(p):
    from lorafa.autograd import dropout_mask

    shape = torch.Size((400, 500))
    m = dropout_mask(shape, seed=11, p=p, device=torch.device("cpu"))
    q = keep_probability(p)
    assert abs(q - (1 - p)) <= 1 / 65536
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    sigma = (q * (1 - q) / m.numel()) ** 0.5
    assert abs(m.mean().item() - q) < 5 * sigma  # the measured keep rate is the stated one
    assert torch.equal(m, dropout_mask(shape, seed=11, p=p, device=torch.device("cpu")))
    assert torch.equal(
        m.bfloat16(), dropout_mask(shape, seed=11, p=p, device=torch.device("cpu"), dtype=torch.bfloat16)
    )
    assert not torch.equal(m, dropout_mask(shape, seed=12, p=p, device=torch.device("cpu")))
