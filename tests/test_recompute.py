"""Cheap-op recomputation: bit-identical outputs and gradients, fewer saved bytes, composes with adapters."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from _saved import saved_bytes
from torch import nn
from transformers.activations import GELUActivation, NewGELUActivation

import lorafa
from lorafa.models import enable_activation_checkpointing
from lorafa.recompute import (
    GatedMLP,
    RecomputedLeaf,
    RegeneratedDropout,
    disable_cheap_recompute,
    enable_cheap_recompute,
)


def assert_same(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def assert_equal_loss_close_grads(got, want):
    """Forward is op-for-op the same (exact); gradients of a tensor with several consumers are summed by
    autograd in another order when a module's ops become one node, so they may differ by float round-off."""
    assert_same(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)


def grads_of(fn, inputs, seed=0):
    torch.manual_seed(seed)
    out = fn()
    grads = torch.autograd.grad(out.float().square().sum(), inputs)
    return out.detach(), grads


# ---- single modules ----------------------------------------------------------------------------------------


def llama_config(**kw):
    base = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return tf.LlamaConfig(**(base | kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trainable", [False, True])
def test_gated_mlp_is_exact_and_saves_less(dtype, trainable):
    torch.manual_seed(0)
    mlp = tf.models.llama.modeling_llama.LlamaMLP(llama_config()).to(dtype).requires_grad_(trainable)
    holder = nn.ModuleList([mlp])  # enable_cheap_recompute replaces children, so give the MLP a parent
    plain_mlp = holder[0]
    x = torch.randn(2, 5, 64, dtype=dtype, requires_grad=True)
    params = list(plain_mlp.parameters())
    want_bytes, _ = saved_bytes(lambda: plain_mlp(x), params)
    want = grads_of(lambda: plain_mlp(x), [x, *[p for p in params if p.requires_grad]])

    assert enable_cheap_recompute(holder) == 1 and isinstance(holder[0], GatedMLP)
    got_bytes, _ = saved_bytes(lambda: holder[0](x), params)
    got = grads_of(lambda: holder[0](x), [x, *[p for p in params if p.requires_grad]])
    assert_same(got, want)
    assert got_bytes < want_bytes


@pytest.mark.parametrize(
    "make",
    [
        lambda: tf.models.llama.modeling_llama.LlamaRMSNorm(64),
        lambda: nn.LayerNorm(64),
        lambda: nn.LayerNorm(64, elementwise_affine=False),  # OLMo's norm has no parameters
        lambda: nn.Sequential(NewGELUActivation()),
    ],
    ids=["rmsnorm", "layernorm", "layernorm-no-params", "newgelu"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leaf_modules_are_exact_and_save_less(make, dtype):
    torch.manual_seed(0)
    holder = nn.ModuleList([make().to(dtype)])
    for p in holder.parameters():
        p.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 64, dtype=dtype, requires_grad=True)
    params = list(holder.parameters())
    want_bytes, _ = saved_bytes(lambda: holder[0](x), params)
    want = grads_of(lambda: holder[0](x), [x, *params])
    assert enable_cheap_recompute(holder) == 1
    got_bytes, _ = saved_bytes(lambda: holder[0](x), params)
    got = grads_of(lambda: holder[0](x), [x, *params])
    assert_same(got, want)
    assert got_bytes < want_bytes
    assert sorted(holder.state_dict()) == sorted(n for n, _ in holder.named_parameters())


class SwappedGateMLP(nn.Module):
    """Same children as a gated MLP, different function: must not be replaced."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(6, 8)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


def test_structure_lookalikes_are_verified_not_trusted():
    holder = nn.ModuleList([SwappedGateMLP()])
    assert enable_cheap_recompute(holder) == 0 and isinstance(holder[0], SwappedGateMLP)


def test_ops_that_already_keep_only_their_input_are_left_alone():
    holder = nn.ModuleList([GELUActivation(), nn.SiLU(), nn.Tanh(), nn.Identity(), nn.Linear(4, 4)])
    assert enable_cheap_recompute(holder) == 0


def test_regenerated_dropout_draws_the_same_masks():
    holder = nn.ModuleList([nn.Dropout(0.3)])
    x = torch.randn(4, 16, 64, requires_grad=True)
    want_bytes, _ = saved_bytes(lambda: holder[0](x), [])
    want = grads_of(lambda: holder[0](x), [x], seed=3)
    assert enable_cheap_recompute(holder) == 1 and isinstance(holder[0], RegeneratedDropout)
    got_bytes, _ = saved_bytes(lambda: holder[0](x), [])
    got = grads_of(lambda: holder[0](x), [x], seed=3)
    assert_same(got, want)
    assert got_bytes < want_bytes
    # Same RNG consumption as nn.Dropout: what is drawn next is unaffected.
    torch.manual_seed(5)
    holder[0](x)
    a = torch.rand(3)
    torch.manual_seed(5)
    nn.Dropout(0.3)(x)
    assert_same(a, torch.rand(3))
    assert holder[0].p == 0.3 and isinstance(holder[0], nn.Dropout)



def test_wrapped_modules_expose_the_original_attributes():
    model = tf.LlamaForCausalLM(llama_config())
    enable_cheap_recompute(model)
    norm = model.model.layers[0].input_layernorm
    assert isinstance(norm, RecomputedLeaf) and norm.variance_epsilon == model.config.rms_norm_eps
    assert model.model.layers[0].mlp.intermediate_size == 96


# ---- whole models ------------------------------------------------------------------------------------------


def tiny(kind):
    torch.manual_seed(0)
    if kind == "llama":
        return tf.LlamaForCausalLM(llama_config())
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama_config().to_diff_dict()))
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        )
    if kind == "bert":
        cfg = tf.BertConfig(
            vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        )
        return tf.BertForSequenceClassification(cfg)
    raise ValueError(kind)


def batch_for(kind, seq=24):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    if kind == "bert":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, batch, params, seed=0):
    torch.manual_seed(seed)  # dropout masks (BERT, GPT-2) are drawn from the global generator
    loss = model(**batch).loss
    return loss.detach(), torch.autograd.grad(loss, params)


KINDS = ["llama", "qwen2", "gpt2", "bert"]


@pytest.mark.parametrize("kind", KINDS)
def test_whole_model_gradients_identical_full_finetuning(kind):
    model = tiny(kind).train()  # train mode: BERT/GPT-2 dropout active in both runs
    batch = batch_for(kind)
    params = list(model.parameters())
    keys = list(model.state_dict())
    want = loss_and_grads(model, batch, params)

    assert enable_cheap_recompute(model) > 0
    assert list(model.state_dict()) == keys
    assert enable_cheap_recompute(model) == 0  # idempotent
    assert_equal_loss_close_grads(loss_and_grads(model, batch, params), want)

    disable_cheap_recompute(model)
    assert not any(isinstance(m, (GatedMLP, RecomputedLeaf, RegeneratedDropout)) for m in model.modules())
    assert_same(loss_and_grads(model, batch, params), want)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_floor_is_smaller_and_exact(kind):
    model = tiny(kind).train()
    model.requires_grad_(False)
    emb = model.get_input_embeddings().weight.requires_grad_(True)  # gradients reach the input: the floor
    batch = batch_for(kind)
    params = list(model.parameters())
    plain_bytes, _ = saved_bytes(lambda: model(**batch).loss, params)
    want = loss_and_grads(model, batch, [emb])

    enable_cheap_recompute(model)
    cheap_bytes, _ = saved_bytes(lambda: model(**batch).loss, params)
    assert_equal_loss_close_grads(loss_and_grads(model, batch, [emb]), want)
    assert cheap_bytes < plain_bytes


@pytest.mark.parametrize("order", ["adapters_first", "recompute_first"])
def test_composes_with_lorafa_adapters(order):
    cfg = lorafa.LoRAFAConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear")
    batch = batch_for("llama")

    reference = lorafa.add_lorafa(tiny("llama").train(), cfg)
    for _, layer in lorafa.lorafa_layers(reference):
        nn.init.normal_(layer.lora_B.weight, std=0.02)  # non-zero B so gradients flow everywhere
    trainable = [n for n, p in reference.named_parameters() if p.requires_grad]
    want = loss_and_grads(reference, batch, [p for p in reference.parameters() if p.requires_grad])

    model = tiny("llama").train()
    if order == "adapters_first":
        lorafa.add_lorafa(model, cfg)
        enable_cheap_recompute(model)
    else:
        enable_cheap_recompute(model)
        lorafa.add_lorafa(model, cfg)
    model.load_state_dict(reference.state_dict())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    assert list(model.state_dict()) == list(reference.state_dict())
    got = loss_and_grads(model, batch, [p for p in model.parameters() if p.requires_grad])
    assert_equal_loss_close_grads(got, want)

    n_adapters = len(list(lorafa.lorafa_layers(model)))
    disable_cheap_recompute(model)
    assert len(list(lorafa.lorafa_layers(model))) == n_adapters == 14


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_composes_with_activation_checkpointing(kind, reentrant):
    model = tiny(kind).train()
    batch = batch_for(kind)
    params = list(model.parameters())
    want = loss_and_grads(model, batch, params)

    enable_cheap_recompute(model)
    enable_activation_checkpointing(model, use_reentrant=reentrant)
    torch.manual_seed(0)
    loss = model(**batch).loss
    loss.backward()  # reentrant checkpointing only supports .backward()
    assert_equal_loss_close_grads((loss.detach(), tuple(p.grad for p in params)), want)


def test_meta_device_model_is_selected_by_structure():
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(llama_config())
    # Two gated MLPs and 2·2 + 1 RMSNorms.
    assert enable_cheap_recompute(model) == 7
