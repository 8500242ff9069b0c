"""share_a: sibling adapters with one frozen A share u = A·dropout(x) (and its mask) when they read the same x."""

from __future__ import annotations

import pytest
import torch
from _saved import saved_bytes
from _tiny import VOCAB, tiny
from torch import nn

import lorafa
from lorafa.autograd import dropout_mask, keep_probability
from lorafa.inject import share_groups
from lorafa.layer import LoRAFALinear
from lorafa.models import enable_activation_checkpointing


def _cfg(share: bool, p: float = 0.0, **kw) -> lorafa.LoRAFAConfig:
    return lorafa.LoRAFAConfig(r=4, lora_alpha=8, lora_dropout=p, share_a=share, **kw)


def _head(family: str) -> list[str] | None:
    return ["classifier"] if family == "bert" else None


def _nonzero_b(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lorafa.inject.lorafa_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def test_groups_are_siblings_with_the_same_input_width():
    model = lorafa.add_lorafa(tiny("llama"), _cfg(True))
    groups = share_groups(model)
    attn = "model.layers.0.self_attn."
    mlp = "model.layers.0.mlp."
    assert groups[attn + "q_proj"] == [attn + n for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert groups[mlp + "gate_proj"] == [mlp + "gate_proj", mlp + "up_proj"]
    assert not any(mlp + "down_proj" in m for m in groups.values())  # alone: its input width differs
    for group, members in groups.items():
        a0 = model.get_submodule(group).lora_A.weight
        assert all(torch.equal(model.get_submodule(m).lora_A.weight, a0) for m in members)


def test_matches_unshared_layers_with_the_same_a_without_dropout():
    ids = torch.randint(0, VOCAB, (2, 9))
    shared = lorafa.add_lorafa(tiny("llama").train(), _cfg(True))
    _nonzero_b(shared)
    plain = lorafa.add_lorafa(tiny("llama").train(), _cfg(False))
    plain.load_state_dict(
        shared.state_dict()
    )  # the same (shared) A values, but every layer computes its own u
    grads = []
    for model in (shared, plain):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b)


def test_one_mask_and_one_u_per_shared_input_with_dropout():
    """Three layers sharing A on one x: plain-autograd reference with a single mask drawn from the same seed."""
    torch.manual_seed(0)
    n, d_in, r, p, s = 12, 16, 4, 0.3, 2.0
    layers = [LoRAFALinear(nn.Linear(d_in, d_out), r, 2 * r, p, name="l") for d_out in (8, 16, 24)]
    for layer in layers:
        layer.lora_A.weight.data.copy_(layers[0].lora_A.weight)
        layer.lora_B.weight.data.normal_()
        layer.share_group = "g"
    x = torch.randn(n, d_in, requires_grad=True)
    gs = [torch.randn(n, layer.out_features) for layer in layers]

    torch.manual_seed(7)
    kept, ys = saved_bytes(
        lambda: [layer(x) for layer in layers], [q for m in layers for q in m.parameters()]
    )
    sum((y * g).sum() for y, g in zip(ys, gs, strict=True)).backward()
    got = [x.grad.clone()] + [layer.lora_B.weight.grad.clone() for layer in layers]
    assert kept == n * r * 4  # one (n, r) fp32 u for all three layers

    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # what the first layer draws
    m = dropout_mask(torch.Size((n, d_in)), seed, p, x.device) / keep_probability(p)
    xr = x.detach().clone().requires_grad_(True)
    bs = [layer.lora_B.weight.detach().clone().requires_grad_(True) for layer in layers]
    loss = 0.0
    for layer, b, g in zip(layers, bs, gs, strict=True):
        lin = layer.base_layer
        y = xr @ lin.weight.t() + lin.bias + s * ((xr * m) @ layer.lora_A.weight.t()) @ b.t()
        loss = loss + (y * g).sum()
    loss.backward()
    for a, e in zip(got, [xr.grad] + [b.grad for b in bs], strict=True):
        torch.testing.assert_close(a, e)


def test_a_new_or_modified_input_gets_its_own_u():
    torch.manual_seed(0)
    layers = [LoRAFALinear(nn.Linear(8, 8), 2, 4, 0.0, name="l") for _ in range(2)]
    for layer in layers:
        layer.lora_A.weight.data.copy_(layers[0].lora_A.weight)
        layer.lora_B.weight.data.normal_()
        layer.share_group = "g"
    x = torch.randn(5, 8)
    layers[0](x)
    x.mul_(2.0)  # in place: the slot on x is stale and must not be reused
    expected = x @ layers[1].base_layer.weight.t() + layers[1].base_layer.bias
    expected += layers[1].scaling * (x @ layers[1].lora_A.weight.t()) @ layers[1].lora_B.weight.t()
    torch.testing.assert_close(layers[1](x), expected)


def test_saved_bytes_drop_to_one_u_per_input():
    ids = torch.randint(0, VOCAB, (2, 16))

    def saved(share: bool) -> int:
        model = lorafa.add_lorafa(tiny("llama").train(), _cfg(share, p=0.1))
        return saved_bytes(lambda: model(input_ids=ids, labels=ids).loss, model.parameters())[0]

    n, r, layers = 2 * 16, 4, 2
    # per layer: 7 u's unshared; shared: q/k/v/o group (q,k,v read one x; o its own) + gate/up + down = 4
    assert saved(False) - saved(True) == layers * (7 - 4) * n * r * 4


@pytest.mark.parametrize("family", ["llama", "bert", "t5"])
def test_checkpointing_recomputes_the_shared_mask(family):
    # llama: pre-norm, the shared input is made inside the checkpointed block, so the recompute gets a new tensor.
    # bert (post-norm) and t5 (cross-attention reads the encoder output): a group reads the block's own input, so the
    # recompute finds the slot its first forward filled; the CPU generator must still be drawn as often.
    ids = torch.randint(0, VOCAB, (2, 8))
    labels = {"bert": torch.tensor([0, 2])}.get(family, ids)

    def run(ckpt: bool):
        model = lorafa.add_lorafa(tiny(family).train(), _cfg(True, p=0.2, modules_to_save=_head(family)))
        _nonzero_b(model)
        if ckpt:
            enable_activation_checkpointing(model)
        torch.manual_seed(5)
        model(input_ids=ids, labels=labels).loss.backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(a, b)


def test_save_load_and_mismatched_a(tmp_path):
    model = lorafa.add_lorafa(tiny("llama"), _cfg(True))
    _nonzero_b(model)
    lorafa.save_adapter(model, tmp_path / "shared")
    again = lorafa.load_adapter(tiny("llama"), tmp_path / "shared")
    assert share_groups(again) == share_groups(model)
    ids = torch.randint(0, VOCAB, (1, 6))
    torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)

    plain = lorafa.add_lorafa(tiny("llama"), _cfg(False))  # independent A's
    lorafa.save_adapter(plain, tmp_path / "plain")
    target = lorafa.add_lorafa(tiny("llama"), _cfg(True))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="share_a needs layers"):
        lorafa.load_adapter(target, tmp_path / "plain")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing half loaded


def test_share_a_needs_lora_fa():
    with pytest.raises(ValueError, match="share_a"):
        lorafa.LoRAFAConfig(share_a=True, method="lora")
    with pytest.raises(ValueError, match="share_a"):
        lorafa.LoRAFAConfig(share_a="yes")  # type: ignore[arg-type]


def test_a_reused_input_after_a_new_adapter_and_nothing_left_on_outputs(tmp_path):
    # T5's cross-attention k/v read the encoder output itself; reusing it after load_adapter must not reuse the u
    # of the old A, and the model's outputs carry no lorafa state (they pickle with weights_only)
    ids = torch.randint(0, VOCAB, (2, 6))

    def adapted(seed):
        model = lorafa.add_lorafa(tiny("t5"), _cfg(True, init_seed=seed))
        _nonzero_b(model)
        return model

    lorafa.save_adapter(adapted(2), tmp_path / "a2")
    model = adapted(1)
    with torch.no_grad():
        enc = model.get_encoder()(input_ids=ids)
        model(encoder_outputs=enc, decoder_input_ids=ids)
        lorafa.load_adapter(model, tmp_path / "a2")
        reused = model(encoder_outputs=enc, decoder_input_ids=ids)
        fresh = lorafa.load_adapter(tiny("t5"), tmp_path / "a2")
        copy = type(enc)(last_hidden_state=enc.last_hidden_state.clone())  # the same values, another tensor
        want = fresh(encoder_outputs=copy, decoder_input_ids=ids).logits
    torch.testing.assert_close(reused.logits, want)
    torch.save(reused.encoder_last_hidden_state, tmp_path / "h.pt")
    torch.load(tmp_path / "h.pt", weights_only=True)


def test_torch_compile_traces_shared_layers():
    ids = torch.randint(0, VOCAB, (2, 8))
    model = lorafa.add_lorafa(tiny("llama"), _cfg(True))
    _nonzero_b(model)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = torch.compile(model, backend="eager")(input_ids=ids).logits  # dynamo tracing; no C++ compiler
    torch.testing.assert_close(got, want)
