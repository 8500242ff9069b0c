"""Chunked linear + cross-entropy equals the plain head + transformers' causal-LM loss (value and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _saved import saved_bytes
from transformers.loss.loss_utils import ForCausalLMLoss

from lorafa.loss import chunked_causal_lm_loss, default_chunk_size, linear_cross_entropy

V, D = 37, 16


def make_case(dtype=torch.float32, bias=True, seed=0, batch=3, seq=11):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / math.sqrt(D)).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < 0.3] = -100  # padding-like holes
    labels[0, :4] = -100  # a masked prompt
    return h, w, b, labels


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, None])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_transformers_loss_fp32(chunk_size, bias):
    h, w, b, labels = make_case(bias=bias)
    ref = ForCausalLMLoss(F.linear(h, w, b), labels, V)
    out = linear_cross_entropy(h, w, labels, b, chunk_size=chunk_size)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads(out, [h, w, b]), grads(ref, [h, w, b]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_frozen_head_gets_no_gradient_and_input_grad_matches():
    h, w, _, labels = make_case(bias=False)
    w.requires_grad_(False)
    out = linear_cross_entropy(h, w, labels, chunk_size=5)
    ref = ForCausalLMLoss(F.linear(h, w), labels, V)
    (dh,) = torch.autograd.grad(out, h)
    (dh_ref,) = torch.autograd.grad(ref, h)
    torch.testing.assert_close(dh, dh_ref, rtol=1e-5, atol=1e-7)


def test_only_head_trainable():
    h, w, b, labels = make_case()
    h.requires_grad_(False)
    out = linear_cross_entropy(h, w, labels, b, chunk_size=4)
    ref = ForCausalLMLoss(F.linear(h, w, b), labels, V)
    for got, want in zip(grads(out, [w, b]), grads(ref, [w, b]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_bf16_close_to_plain_bf16_path():
    h, w, b, labels = make_case(dtype=torch.bfloat16, seq=20)
    out = linear_cross_entropy(h, w, labels, b, chunk_size=6)
    ref = ForCausalLMLoss(F.linear(h, w, b), labels, V)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    for got, want in zip(grads(out, [h, w, b]), grads(ref, [h, w, b]), strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-3)


def test_cpu_autocast_matches_plain_autocast():
    h, w, b, labels = make_case(seq=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(h, w, labels, b, chunk_size=5)
        ref = ForCausalLMLoss(F.linear(h, w, b), labels, V)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    for got, want in zip(grads(out, [h, w, b]), grads(ref, [h, w, b]), strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_num_items_in_batch_and_unshifted_labels():
    h, w, b, labels = make_case()
    out = linear_cross_entropy(h, w, labels, b, chunk_size=4, num_items_in_batch=torch.tensor(50))
    ref = ForCausalLMLoss(F.linear(h, w, b), labels, V, num_items_in_batch=torch.tensor(50))
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads(out, [h, w, b]), grads(ref, [h, w, b]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)

    plain = F.cross_entropy(F.linear(h, w, b).reshape(-1, V), labels.reshape(-1))
    torch.testing.assert_close(linear_cross_entropy(h, w, labels, b, shift_labels=False, chunk_size=3), plain)


@pytest.mark.parametrize(("scale", "softcap"), [(0.25, None), (1.0, 3.0), (2.0, 5.0)])
def test_logit_scale_and_softcap(scale, softcap):
    h, w, b, labels = make_case()
    z = F.linear(h, w, b) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ref = ForCausalLMLoss(z, labels, V)
    out = linear_cross_entropy(h, w, labels, b, chunk_size=5, logit_scale=scale, softcap=softcap)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads(out, [h, w, b]), grads(ref, [h, w, b]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_no_grad_and_all_ignored():
    h, w, b, labels = make_case()
    with torch.no_grad():
        torch.testing.assert_close(
            linear_cross_entropy(h, w, labels, b, chunk_size=2), ForCausalLMLoss(F.linear(h, w, b), labels, V)
        )
    ignored = torch.full_like(labels, -100)
    assert torch.isnan(linear_cross_entropy(h, w, ignored, b)) and torch.isnan(
        ForCausalLMLoss(F.linear(h, w, b), ignored, V)
    )


def test_saves_gradients_not_logits():
    h, w, _, labels = make_case(seq=40)
    w.requires_grad_(False)
    chunked, _ = saved_bytes(lambda: linear_cross_entropy(h, w, labels, chunk_size=8), [w])
    plain, _ = saved_bytes(lambda: ForCausalLMLoss(F.linear(h, w), labels, V), [w])
    n_valid = int((F.pad(labels, (0, 1), value=-100)[..., 1:] != -100).sum())
    # dh for the counted rows plus their int64 indices, nothing of size vocab.
    assert chunked == n_valid * D * 4 + n_valid * 8
    assert chunked < plain


def test_validation_errors():
    h, w, b, labels = make_case()
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, labels, chunk_size=0)
    with pytest.raises(ValueError, match="labels shape"):
        linear_cross_entropy(h, w, labels[:, :-1])
    with pytest.raises(ValueError, match="weight shape"):
        linear_cross_entropy(h, w[:, :-1], labels)
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(h, w, labels, softcap=0.0)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        linear_cross_entropy(h, w, labels, num_items_in_batch=0)
    assert default_chunk_size(1 << 30) == 1 and default_chunk_size(49152) % 8 == 0


# ---- whole models ---------------------------------------------------------------------------------------


def tiny_model(kind: str):
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        return tf.GPT2LMHeadModel(cfg)
    llama_like = dict(common, intermediate_size=96, num_key_value_heads=2)
    configs = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**llama_like)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama_like)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(
            tf.Gemma2Config(**llama_like, head_dim=16, final_logit_softcapping=2.0, sliding_window=8)
        ),
        "granite": lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**llama_like, logits_scaling=4.0)),
        "cohere": lambda: tf.CohereForCausalLM(tf.CohereConfig(**llama_like, logit_scale=0.5)),
    }
    return configs[kind]()


def make_batch(seed=0, batch=2, seq=13, vocab=97):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :5] = -100  # prompt tokens
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "gemma2", "granite", "cohere"])
def test_model_loss_and_all_gradients_match(kind):
    torch.manual_seed(0)
    model = tiny_model(kind).eval()  # eval: no dropout, so both passes see the same function
    batch = make_batch()
    params = [p for p in model.parameters() if p.requires_grad]

    ref = model(**batch).loss
    ref_grads = torch.autograd.grad(ref, params)
    out = chunked_causal_lm_loss(model, batch, chunk_size=5)
    out_grads = torch.autograd.grad(out, params)

    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(out_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_model_with_frozen_body_saves_less():
    torch.manual_seed(0)
    model = tiny_model("llama").train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)  # the frozen floor: gradients reach the input
    batch = make_batch(seq=24)
    params = list(model.parameters())

    plain, ref = saved_bytes(lambda: model(**batch).loss, params)
    chunked, out = saved_bytes(lambda: chunked_causal_lm_loss(model, batch, chunk_size=8), params)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    (g_out,) = torch.autograd.grad(out, model.get_input_embeddings().weight)
    (g_ref,) = torch.autograd.grad(ref, model.get_input_embeddings().weight)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-7)
    assert chunked < plain


def test_model_errors():
    model = tiny_model("llama")
    batch = make_batch()
    with pytest.raises(ValueError, match="labels"):
        chunked_causal_lm_loss(model, {k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(ValueError, match="body"):
        chunked_causal_lm_loss(model.model, batch)


def test_heads_and_transforms_it_does_not_model_are_refused():
    import transformers as tf

    batch = make_batch()
    # a BERT/RoBERTa-style LM head (dense -> act -> norm -> decoder): the decoder alone is not the head
    roberta = tf.RobertaForCausalLM(
        tf.RobertaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=96, is_decoder=True)
    )  # fmt: skip
    with pytest.raises(ValueError, match="inside a prediction head"):
        chunked_causal_lm_loss(roberta, batch)
    # logits_scaling means "divide" for Granite only (HyperCLOVAX multiplies by it)
    model = tiny_model("llama")
    model.config.logits_scaling = 4.0
    with pytest.raises(ValueError, match="logits_scaling"):
        chunked_causal_lm_loss(model, batch)
    # Losses that are not the shifted cross-entropy of one decoder: a router's auxiliary loss, BART's unshifted
    # decoder-only labels, an encoder-decoder's target labels.
    sizes = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    mixtral = tf.MixtralForCausalLM(tf.MixtralConfig(**sizes, num_local_experts=2, output_router_logits=True))
    with pytest.raises(ValueError, match="router auxiliary loss"):
        chunked_causal_lm_loss(mixtral, batch)
    bart = dict(vocab_size=97, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96)  # fmt: skip
    for model in (
        tf.BartForCausalLM(tf.BartConfig(**bart)),
        tf.MBartForCausalLM(tf.MBartConfig(**bart)),
        tf.BartForConditionalGeneration(tf.BartConfig(**bart)),
    ):
        with pytest.raises(ValueError, match="no decoder-only causal LM with shifted labels"):
            chunked_causal_lm_loss(model, batch)


def test_mismatch_check_finds_a_transform_it_does_not_know(monkeypatch):
    from lorafa import loss

    torch.manual_seed(0)
    model = tiny_model("llama").train()
    batch = make_batch()
    assert loss.chunked_loss_mismatch(model, batch) is None
    assert model.training  # its mode is given back
    # a model that transforms its logits in a way the chunked loss does not know (here: pretend a scale)
    monkeypatch.setattr(loss, "_head_transform", lambda config: (3.0, None))
    problem = loss.chunked_loss_mismatch(model, batch)
    assert problem is not None and "own loss" in problem


def test_fp16_gradients_survive_until_the_loss_scale_arrives():
    # fp16 training scales the loss (GradScaler) so that small gradients do not underflow; the chunked loss computes
    # its gradients in forward, before that factor exists, so it must keep them scaled itself.
    torch.manual_seed(0)
    n, d, vocab, scale = 2048, 16, 32000, 65536.0
    h32, w32 = torch.randn(n, d), torch.randn(vocab, d) * 0.05
    labels = torch.randint(0, vocab, (n,))

    def grads(fn, dtype):
        h = h32.clone().to(dtype).requires_grad_()
        w = w32.clone().to(dtype).requires_grad_()
        (fn(h, w) * (scale if dtype == torch.float16 else 1.0)).backward()
        k = scale if dtype == torch.float16 else 1.0
        return h.grad.float() / k, w.grad.float() / k

    def plain(h, w):
        return F.cross_entropy(F.linear(h, w).float(), labels)

    def chunked(h, w):
        return linear_cross_entropy(h[None], w, labels[None], shift_labels=False, chunk_size=256)

    def error(x: torch.Tensor, want: torch.Tensor) -> float:
        return float((x - want).norm() / want.norm())

    ref = grads(plain, torch.float32)
    for ours, theirs, want in zip(
        grads(chunked, torch.float16), grads(plain, torch.float16), ref, strict=True
    ):
        assert error(ours, want) < 3 * error(theirs, want) + 1e-3  # dh, then dW


def test_an_fp32_head_on_a_half_precision_body():
    # lorafa.models trains a new head in fp32 on a bf16 model; the chunked loss upcasts the rows as that head does
    torch.manual_seed(0)
    model = tiny_model("llama").to(torch.bfloat16).eval()
    model.lm_head = torch.nn.Linear(64, 97, bias=False)  # fp32, untied
    batch = make_batch()
    out = chunked_causal_lm_loss(model, batch, chunk_size=5)
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    ref = ForCausalLMLoss(model.lm_head(hidden.float()), batch["labels"], vocab_size=97)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.dtype == torch.float32
