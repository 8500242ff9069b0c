"""CUDA checks (skipped without a GPU): the same properties as on CPU, on the device users train on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafa.layer import LoRAFALinear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_layer_matches_plain_autograd_and_saves_only_u(dtype):
    torch.manual_seed(0)
    base = nn.Linear(256, 128).cuda().to(dtype)
    layer = LoRAFALinear(base, r=8, lora_alpha=16, lora_dropout=0.0)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(4, 64, 256, device="cuda", dtype=dtype, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    kept = [t for t in saved if t.untyped_storage().data_ptr() not in params]
    assert [tuple(t.shape) for t in kept] == [(256, 8)]
    g = torch.randn_like(y)
    y.backward(g)
    xr = x.detach().float().requires_grad_(True)
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach().clone().requires_grad_(True)
    ref = xr @ base.weight.float().t() + base.bias.float() + layer.scaling * (xr @ A.t()) @ B.t()
    ref.backward(g.float())
    tol = {"atol": 5e-2, "rtol": 5e-2} if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-3}
    torch.testing.assert_close(y.float(), ref, **tol)
    torch.testing.assert_close(x.grad.float(), xr.grad, **tol)
    if dtype == torch.float32:
        torch.testing.assert_close(layer.lora_B.weight.grad, B.grad, **tol)
    # dB = s·Σ gᵀ·u for the u kept in forward (in bf16, u itself is rounded: a sum over 256 tokens of rounded
    # products differs from the fp32 reference by ~1 % of its scale, so compare against the kept u).
    (u,) = kept
    torch.testing.assert_close(u.float(), (xr @ A.t()).detach().reshape(-1, 8), **tol)
    expected = layer.scaling * (g.reshape(-1, 128).float().t() @ u.float())
    scale = expected.abs().max().item()
    torch.testing.assert_close(layer.lora_B.weight.grad, expected, atol=1e-2 * scale, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dropout_mask_rate_and_determinism(dtype):
    from lorafa.autograd import dropout_mask, keep_probability

    dev, shape, p = torch.device("cuda"), torch.Size((512, 384)), 0.1
    m = dropout_mask(shape, seed=3, p=p, device=dev, dtype=dtype)
    assert m.dtype == dtype and set(m.unique().tolist()) <= {0.0, 1.0}
    q = keep_probability(p)
    assert abs(m.float().mean().item() - q) < 5 * (q * (1 - q) / shape.numel()) ** 0.5
    assert torch.equal(m, dropout_mask(shape, seed=3, p=p, device=dev, dtype=dtype))
    assert not torch.equal(m, dropout_mask(shape, seed=4, p=p, device=dev, dtype=dtype))


def test_cuda_dropout_is_reproducible_under_checkpoint():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = LoRAFALinear(nn.Linear(64, 32).cuda(), r=4, lora_alpha=8, lora_dropout=0.3)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(16, 64, device="cuda")

    def grads(use_ckpt):
        torch.manual_seed(5)
        xg = x.clone().requires_grad_(True)
        out = checkpoint(layer, xg, use_reentrant=False) if use_ckpt else layer(xg)
        out.pow(2).sum().backward()
        g = (xg.grad.clone(), layer.lora_B.weight.grad.clone())
        layer.zero_grad(set_to_none=True)
        return g

    a, b = grads(False), grads(True)
    for ga, gb in zip(a, b, strict=True):
        torch.testing.assert_close(ga, gb, atol=0, rtol=0)


def test_cuda_gradient_init_budget_is_a_share_of_free_memory():
    from lorafa.gradient_init import gradient_init_budget

    device = torch.device("cuda")
    free, _ = torch.cuda.mem_get_info(device)
    budget = gradient_init_budget(device)
    assert budget is not None and 0 < budget <= free // 4 + 1
    assert gradient_init_budget(torch.device("cpu")) is None
