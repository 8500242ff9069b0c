"""The LoRA-FA gradient projection g_B ← g_B·(A·Aᵀ)⁻¹/s²: closed form and parity with PEFT's LoraFAOptimizer."""

from __future__ import annotations

import peft.optimizers.lorafa as peft_lorafa
import pytest
import torch
from _tiny import VOCAB, batch, tiny
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_lorafa_optimizer
from torch import nn

import lorafa
from lorafa.layer import LoRAFALinear
from lorafa.projection import DAMPING


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "orthogonal"])
def test_projected_gradient_equals_closed_form(init):
    torch.manual_seed(0)
    layer = LoRAFALinear(
        nn.Linear(20, 12).double(), r=5, lora_alpha=7, projection=True, init_lora_weights=init
    )
    nn.init.normal_(layer.lora_B.weight)
    plain = LoRAFALinear(nn.Linear(20, 12).double(), r=5, lora_alpha=7, init_lora_weights=init)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(9, 20, dtype=torch.float64)
    g = torch.randn(9, 12, dtype=torch.float64)
    layer(x).backward(g)
    plain(x).backward(g)
    A, s = layer.lora_A.weight.detach(), layer.scaling
    expected = (
        plain.lora_B.weight.grad @ torch.linalg.inv(A @ A.t() + DAMPING * torch.eye(5, dtype=A.dtype)) / s**2
    )
    torch.testing.assert_close(layer.lora_B.weight.grad, expected, atol=1e-8, rtol=1e-6)
    # The inverse is cached: A is frozen, so the same tensor serves every step.
    assert layer.projection_matrix() is layer.projection_matrix()


def test_adamw_with_projection_matches_peft_lorafa_optimizer(monkeypatch):
    # PEFT computes the projected gradient under bf16 autocast when the machine supports bf16; compare the math
    # in fp32 on both sides instead.
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
    r, alpha, lr = 4, 8, 1e-2
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(tiny("llama"), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    peft_opt = create_lorafa_optimizer(peft_model, r=r, lora_alpha=alpha, lr=lr, weight_decay=0.0)

    ours = tiny("llama")
    lorafa.add_lorafa(
        ours, lorafa.LoRAFAConfig(r=r, lora_alpha=alpha, target_modules=targets, projection=True)
    )
    peft_A = {n: p for n, p in peft_model.named_parameters() if "lora_A" in n}
    with torch.no_grad():
        for name, layer in lorafa.lorafa_layers(ours):
            layer.lora_A.weight.copy_(peft_A[f"base_model.model.{name}.lora_A.default.weight"])
    opt = torch.optim.AdamW(
        [p for p in ours.parameters() if p.requires_grad], lr=lr, eps=1e-6, weight_decay=0.0
    )

    # PEFT's Adam adds eps before bias correction (BERT-style), torch's after: equal updates need |g| >> eps/√(1-β₂),
    # so the loss is scaled up (the same factor on both sides).
    for step in range(4):
        b = batch("llama", seed=step)
        for model, o in ((peft_model, peft_opt), (ours, opt)):
            (1e6 * model(**b).loss).backward()
            o.step()
            o.zero_grad(set_to_none=True)
    peft_B = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    for name, layer in lorafa.lorafa_layers(ours):
        theirs = peft_B[f"base_model.model.{name}.lora_B.default.weight"]
        assert torch.count_nonzero(theirs) > 0
        torch.testing.assert_close(layer.lora_B.weight, theirs, atol=1e-5, rtol=1e-4)


def test_torch_compile_fullgraph_with_projection():
    """The projection's cache check (data_ptr) cannot be traced: under compile P is computed in the graph, and the
    gradients equal eager ones, also after an eager step filled the cache."""
    ids = torch.randint(0, VOCAB, (2, 8))

    def grads(compiled: bool) -> list[torch.Tensor]:
        model = lorafa.add_lorafa(tiny("llama"), lorafa.LoRAFAConfig(r=4, projection=True, init_seed=3))
        for m in model.modules():
            if isinstance(m, LoRAFALinear):
                nn.init.normal_(m.lora_B.weight)
        model(input_ids=ids, labels=ids).loss.backward()  # eager: fills the cache
        model.zero_grad()
        run = torch.compile(model, backend="eager", fullgraph=True) if compiled else model
        run(input_ids=ids, labels=ids).loss.backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    for got, want in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(got, want)
