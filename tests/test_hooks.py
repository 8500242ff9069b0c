"""Adapted layers whose base layer runs hooks (a user's, accelerate's offloading), an unfrozen base weight, and
float64 inputs under autocast: each against the plain computation."""

from __future__ import annotations

import copy

import pytest
import torch
from _saved import saved_bytes
from _tiny import batch, tiny
from torch import nn

import lorafa


def _layer(p: float = 0.0, bias: bool = True) -> lorafa.LoRAFALinear:
    torch.manual_seed(0)
    layer = lorafa.LoRAFALinear(nn.Linear(12, 10, bias=bias), r=3, lora_alpha=6, lora_dropout=p, name="x")
    nn.init.normal_(layer.lora_B.weight)
    return layer


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_a_hooked_base_layer_runs_its_hooks_and_gives_the_fused_result(p):
    plain, hooked = _layer(p), _layer(p)
    seen = []
    hooked.base_layer.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    x = torch.randn(2, 5, 12, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1)  # the dropout seed is drawn from the global generator: the same draw in both
    y = plain(x)
    torch.manual_seed(1)
    y2 = hooked(x2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(hooked.lora_B.weight.grad, plain.lora_B.weight.grad)
    assert len(seen) == 1  # the hook saw what the base layer alone computes, as with PEFT
    torch.testing.assert_close(seen[0], hooked.base_layer(x.detach()))


def test_a_backward_hook_on_the_base_layer_runs():
    layer = _layer()
    grads = []
    layer.base_layer.register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0].detach().clone()))
    x = torch.randn(3, 12, requires_grad=True)
    g = torch.randn(3, 10)
    layer(x).backward(g)
    assert len(grads) == 1
    torch.testing.assert_close(grads[0], g)  # the base layer's output gradient is the layer's


def test_a_hooked_base_layer_keeps_only_u_for_backward():
    layer = _layer(0.1)
    layer.base_layer.register_forward_pre_hook(lambda m, args: None)
    x = torch.randn(4, 7, 12, requires_grad=True)
    nbytes, _ = saved_bytes(lambda: layer(x), layer.parameters())
    assert nbytes == 4 * 7 * 3 * 4  # u = A·dropout(x), (N, r) fp32: neither x, nor a mask, nor a dropout copy


def test_accelerate_offloading_before_and_after_adding_adapters_gives_the_unoffloaded_model():
    accelerate = pytest.importorskip("accelerate")
    cfg = lorafa.LoRAFAConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    inputs = batch("llama")
    reference = lorafa.add_lorafa(tiny("llama"), cfg)
    torch.manual_seed(3)
    for _, layer in lorafa.lorafa_layers(reference):
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    reference.train()
    out = reference(**inputs)
    out.loss.backward()
    grads = {n: layer.lora_B.weight.grad for n, layer in lorafa.lorafa_layers(reference)}

    # Offloaded first (as device_map with "cpu"/"disk" leaves a model): the adapters are made on the execution
    # device and train; the offloaded base weights are loaded by accelerate's hooks for each forward.
    first = tiny("llama")
    accelerate.cpu_offload(first, execution_device=torch.device("cpu"))
    assert first.model.layers[0].self_attn.q_proj.weight.is_meta
    lorafa.add_lorafa(first, cfg)
    for (_, mine), (_, ref) in zip(lorafa.lorafa_layers(first), lorafa.lorafa_layers(reference), strict=True):
        assert not mine.lora_A.weight.is_meta
        torch.testing.assert_close(mine.lora_A.weight, ref.lora_A.weight)
        with torch.no_grad():
            mine.lora_B.weight.copy_(ref.lora_B.weight)
    first.train()
    out_first = first(**inputs)
    out_first.loss.backward()
    torch.testing.assert_close(out_first.logits, out.logits)
    for name, layer in lorafa.lorafa_layers(first):
        torch.testing.assert_close(layer.lora_B.weight.grad, grads[name])
    with pytest.raises(ValueError, match="offloaded"):
        lorafa.merge_lorafa(first)

    # Offloaded after add_lorafa (the adapters' weights are offloaded too): inference gives the same logits.
    after, ids = copy.deepcopy(reference).eval(), inputs["input_ids"]
    accelerate.cpu_offload(after, execution_device=torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(after(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("conv1d", [False, True])
def test_an_unfrozen_base_weight_gets_its_gradient(conv1d):
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base: nn.Module = Conv1D(10, 12)
        nn.init.normal_(base.weight)
    else:
        base = nn.Linear(12, 10)
    layer = lorafa.LoRAFALinear(base, r=3, lora_alpha=6, name="x")
    nn.init.normal_(layer.lora_B.weight)
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(6, 12, dtype=torch.float32)
    layer(x).square().sum().backward()

    w = base.weight.detach().clone().requires_grad_(True)
    w_eff = w.t() if conv1d else w  # (d_out, d_in)
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    y = x @ w_eff.t() + base.bias.detach() + layer.scaling * (x @ a.t()) @ b.t()
    y.square().sum().backward()
    torch.testing.assert_close(layer.base_layer.weight.grad, w.grad)


def test_float64_inputs_stay_float64_under_autocast():
    layer = _layer().double()
    x = torch.randn(3, 12, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        plain = nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    assert y.dtype == plain.dtype == torch.float64
    expected = plain + layer.scaling * (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    torch.testing.assert_close(y, expected)
