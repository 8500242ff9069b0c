"""init_lora_weights="gradient": A from the top right singular vectors of the base weights' gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import batch, tiny

import lorafa
from lorafa.layer import LoRAFALinear

R = 4


def _gradient_model(family: str, **extra) -> torch.nn.Module:
    targets = None if family in ("bert", "t5") else "all-linear"
    cfg = lorafa.LoRAFAConfig(
        r=R, lora_alpha=8, target_modules=targets, **{"init_lora_weights": "gradient", **extra}
    )
    return lorafa.add_lorafa(tiny(family), cfg)


def _reference_gradients(family: str, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """∂L/∂W of every linear weight, summed over `batches`, by plain autograd on the unadapted model (eval mode)."""
    ref = tiny(family)
    ref.requires_grad_(True)
    for b in batches:
        ref(**b).loss.backward()
    return {n: m.weight.grad for n, m in ref.named_modules() if getattr(m, "weight", None) is not None}


def _reference_inputs(
    family: str, batches: list[dict[str, torch.Tensor]], names: list[str]
) -> dict[str, torch.Tensor]:
    """Every token's input (N, d_in) to each named linear layer over `batches`, from the unadapted model."""
    ref, seen = tiny(family), {n: [] for n in names}
    hooks = [
        ref.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for n in names
    ]
    with torch.no_grad():
        for b in batches:
            ref(**b)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "t5"])
def test_a_spans_the_top_right_singular_vectors_of_the_weight_gradient(family):
    model = _gradient_model(family)
    batches = [batch(family, seed=s) for s in range(3)]
    kept = lorafa.init_a_from_gradients(model, batches, lambda b: model(**b).loss)
    grads = _reference_gradients(family, batches)
    layers = dict(lorafa.lorafa_layers(model))
    inputs = _reference_inputs(family, batches, list(layers))
    assert kept.keys() == layers.keys()
    for name, layer in layers.items():
        G = grads[f"{name}"].double()
        G = G.t() if layer.fan_in_fan_out else G  # Conv1D stores (d_in, d_out)
        _, S, Vh = torch.linalg.svd(G, full_matrices=False)
        A = layer.lora_A.weight.detach().double()
        # Orthogonal rows ...
        gram = A @ A.t()
        torch.testing.assert_close(gram, torch.diag(gram.diagonal()), atol=1e-6, rtol=0)
        # ... spanning the top-r right singular subspace of G (compared as projectors: sign- and rotation-free) ...
        unit = A / A.norm(dim=1, keepdim=True)
        torch.testing.assert_close(unit.t() @ unit, Vh[:R].t() @ Vh[:R], atol=1e-5, rtol=0)
        assert kept[name] == pytest.approx(float((S[:R] ** 2).sum() / (S**2).sum()), abs=1e-5)
        # ... each scaled so that u_i = a_i·x has the mean square a Kaiming-uniform row gives: E‖x‖²/(3·d_in).
        x = inputs[name]
        target = float(x.square().sum(1).mean()) / (3 * x.shape[1])
        torch.testing.assert_close(
            (x @ A.t()).square().mean(0), torch.full((R,), target, dtype=x.dtype), rtol=1e-4, atol=0
        )
        # No rank-r row space keeps more of G than this one; the random (Kaiming) A it replaced keeps less.
        rand = torch.empty_like(A)
        torch.nn.init.kaiming_uniform_(rand, a=5**0.5)
        q, _ = torch.linalg.qr(rand.t())
        assert kept[name] >= float((G @ q).square().sum() / G.square().sum()) - 1e-9


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_inputs_statistic_gives_the_inputs_principal_directions(family):
    model = _gradient_model(family, init_lora_weights="inputs")
    batches = [batch(family, seed=s) for s in range(3)]
    model.train()
    with pytest.raises(RuntimeError, match="not set yet"):
        model(**batches[0])
    grouped = copy.deepcopy(model)
    kept = lorafa.init_a_from_gradients(model, batches, lambda b: model(**b).loss, statistic="inputs")
    layers = dict(lorafa.lorafa_layers(model))
    inputs = _reference_inputs(family, batches, list(layers))
    for name, layer in layers.items():
        x = inputs[name]  # (N, d_in), from the unadapted model
        _, S, Vh = torch.linalg.svd(x, full_matrices=False)
        A = layer.lora_A.weight.detach().double()
        unit = A / A.norm(dim=1, keepdim=True)
        torch.testing.assert_close(unit.t() @ unit, Vh[:R].t() @ Vh[:R], atol=1e-5, rtol=0, msg=name)
        assert kept[name] == pytest.approx(float((S[:R] ** 2).sum() / (S**2).sum()), abs=1e-5)
        target = float(x.square().sum(1).mean()) / (3 * x.shape[1])
        torch.testing.assert_close(
            (x @ A.t()).square().mean(0), torch.full((R,), target, dtype=x.dtype), rtol=1e-4, atol=0
        )
    lorafa.init_a_from_gradients(
        grouped, batches, lambda b: grouped(**b).loss, max_bytes=1, statistic="inputs"
    )
    for (name, la), (_, lb) in zip(lorafa.lorafa_layers(model), lorafa.lorafa_layers(grouped), strict=True):
        torch.testing.assert_close(lb.lora_A.weight, la.lora_A.weight, atol=0, rtol=0, msg=name)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="statistic"):
        lorafa.init_a_from_gradients(
            _gradient_model(family), batches, lambda b: model(**b).loss, statistic="weights"
        )


def test_training_refuses_a_pending_a_and_gradients_are_cleared():
    model = _gradient_model("llama")
    model.train()
    with pytest.raises(RuntimeError, match="init_a_from_gradients"):
        model(**batch("llama")).loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    model(**batch("llama"))  # inference does not need A
    lorafa.init_a_from_gradients(model, [batch("llama")], lambda b: model(**b).loss)
    assert all(p.grad is None for p in model.parameters())
    assert model.training is False  # the caller's mode is restored
    model.train()
    model(**batch("llama")).loss.backward()  # now it trains; only B receives gradients
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_B" in n), n


def test_deterministic_and_independent_of_the_random_placeholder():
    a = _gradient_model("llama", init_seed=0)
    b = _gradient_model("llama", init_seed=1)
    batches = [batch("llama", seed=s) for s in range(2)]
    for m in (a, b):
        lorafa.init_a_from_gradients(m, batches, lambda x, m=m: m(**x).loss)
    for (name, la), (_, lb) in zip(lorafa.lorafa_layers(a), lorafa.lorafa_layers(b), strict=True):
        pa, pb = la.lora_A.weight.t() @ la.lora_A.weight, lb.lora_A.weight.t() @ lb.lora_A.weight
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4, msg=name)


def test_layers_in_groups_under_a_byte_budget_give_the_same_a():
    batches = [batch("llama", seed=s) for s in range(2)]
    whole, grouped = _gradient_model("llama"), _gradient_model("llama")
    calls = {"whole": 0, "grouped": 0}

    def loss_of(model, key):
        def fn(b):
            calls[key] += 1
            return model(**b).loss

        return fn

    kept = lorafa.init_a_from_gradients(whole, batches, loss_of(whole, "whole"))
    layers = dict(lorafa.lorafa_layers(grouped))
    sizes = [4 * la.out_features * la.lora_A.weight.shape[1] for la in layers.values()]
    budget = 2 * max(sizes)  # room for two of the largest accumulators, fewer than all of them
    kept_g = lorafa.init_a_from_gradients(grouped, batches, loss_of(grouped, "grouped"), max_bytes=budget)
    # One forward+backward pass over the batches per group, plus the forward pass for the row scales.
    groups, used = 1, 0
    for size in sizes:
        if used and used + size > budget:
            groups, used = groups + 1, 0
        used += size
    assert groups > 2
    assert calls == {"whole": 2 * len(batches), "grouped": (groups + 1) * len(batches)}
    assert kept_g == kept
    for (name, la), (_, lb) in zip(lorafa.lorafa_layers(whole), layers.items(), strict=True):
        torch.testing.assert_close(lb.lora_A.weight, la.lora_A.weight, atol=0, rtol=0, msg=name)
        assert not lb.a_pending
    assert all(p.grad is None for p in grouped.parameters())
    one_each = _gradient_model("llama")  # a budget below one layer's accumulator: one layer per pass
    lorafa.init_a_from_gradients(one_each, batches, lambda b: one_each(**b).loss, max_bytes=1)
    for (name, la), (_, lc) in zip(lorafa.lorafa_layers(whole), lorafa.lorafa_layers(one_each), strict=True):
        torch.testing.assert_close(lc.lora_A.weight, la.lora_A.weight, atol=0, rtol=0, msg=name)
    with pytest.raises(ValueError, match="max_bytes"):
        lorafa.init_a_from_gradients(
            _gradient_model("llama"), batches, lambda b: whole(**b).loss, max_bytes=0
        )


def test_saved_adapter_reloads_exactly_and_is_not_pending(tmp_path):
    model = _gradient_model("llama")
    lorafa.init_a_from_gradients(model, [batch("llama")], lambda b: model(**b).loss)
    with torch.no_grad():
        for _, layer in lorafa.lorafa_layers(model):
            layer.lora_B.weight.normal_()
    lorafa.save_adapter(model, tmp_path / "ad")
    fresh = lorafa.load_adapter(tiny("llama"), tmp_path / "ad")
    assert not any(layer.a_pending for _, layer in lorafa.lorafa_layers(fresh))
    ids = batch("llama")["input_ids"]
    model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    fresh.train()
    fresh(**batch("llama")).loss.backward()  # trainable straight away


def test_bad_use_is_named():
    with pytest.raises(ValueError, match="init_batches"):
        lorafa.LoRAFAConfig(init_lora_weights="gradient", init_batches=0)
    with pytest.raises(ValueError, match="share_a"):
        lorafa.LoRAFAConfig(init_lora_weights="gradient", share_a=True)
    with pytest.raises(ValueError, match="no adapters"):
        lorafa.init_a_from_gradients(tiny("llama"), [batch("llama")], lambda b: torch.zeros(()))
    model = _gradient_model("llama")
    with pytest.raises(ValueError, match="no gradient reached"):
        lorafa.init_a_from_gradients(model, [], lambda b: model(**b).loss)
    with pytest.raises(ValueError, match="without a gradient path"):
        lorafa.init_a_from_gradients(model, [batch("llama")], lambda b: model(**b).loss.detach())
    with torch.no_grad():
        next(layer for _, layer in lorafa.lorafa_layers(model)).lora_B.weight.fill_(1.0)
    with pytest.raises(ValueError, match="B is not zero"):
        lorafa.init_a_from_gradients(model, [batch("llama")], lambda b: model(**b).loss)


def test_lora_method_also_takes_a_gradient_a():
    cfg = lorafa.LoRAFAConfig(r=R, lora_alpha=8, method="lora", init_lora_weights="gradient")
    model = lorafa.add_lorafa(tiny("llama"), cfg)
    ref = copy.deepcopy(model)
    lorafa.init_a_from_gradients(model, [batch("llama")], lambda b: model(**b).loss)
    changed = [
        n
        for (n, la), (_, lb) in zip(lorafa.lorafa_layers(model), lorafa.lorafa_layers(ref), strict=True)
        if not torch.equal(la.lora_A.weight, lb.lora_A.weight)
    ]
    assert changed and all(isinstance(model.get_submodule(n), LoRAFALinear) for n in changed)
    model.train()
    model(**batch("llama")).loss.backward()
    assert all(layer.lora_A.weight.grad is not None for _, layer in lorafa.lorafa_layers(model))
