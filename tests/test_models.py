"""add_lorafa on tiny real transformers models: what trains, what stays frozen, merging."""

from __future__ import annotations

import pytest
import torch
from _tiny import FAMILIES, HEADS, batch, tiny
from transformers import LlamaConfig, LlamaForCausalLM

import lorafa


def _nonzero_B(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorafa.lorafa_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["lora-fa", "lora"])
def test_only_adapters_and_saved_modules_train(family, method):
    model = tiny(family)
    cfg = lorafa.LoRAFAConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, method=method, modules_to_save=HEADS.get(family)
    )
    lorafa.add_lorafa(model, cfg)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss = model(**batch(family, seed=step)).loss
        loss.backward()
        for n, p in model.named_parameters():
            allowed = ".lora_B." in n or (method == "lora" and ".lora_A." in n)
            allowed = allowed or any(n.startswith(h + ".") for h in HEADS.get(family, []))
            assert (p.grad is not None) == allowed, n
        opt.step()
        opt.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        if ".lora_A." in n:
            assert changed == (method == "lora"), n
        elif ".lora_B." in n or any(n.startswith(h + ".") for h in HEADS.get(family, [])):
            assert changed, n
        else:
            assert not changed, n  # base weights (W), embeddings, norms


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_unmerged_and_unmerge_restores(family):
    model = tiny(family)
    plain = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorafa.add_lorafa(
        model, lorafa.LoRAFAConfig(r=4, lora_alpha=8, lora_dropout=0.2, modules_to_save=HEADS.get(family))
    )
    _nonzero_B(model)
    inputs = {k: v for k, v in batch(family).items() if k != "labels"}
    if family == "t5":
        inputs["decoder_input_ids"] = batch(family)["labels"]
    with torch.no_grad():
        unmerged = model(**inputs).logits
        lorafa.merge_lorafa(model)
        once = model(**inputs).logits
        lorafa.merge_lorafa(model)
        twice = model(**inputs).logits
        lorafa.unmerge_lorafa(model)
        restored = model(**inputs).logits
    torch.testing.assert_close(once, unmerged, atol=1e-5, rtol=1e-4)
    assert torch.equal(once, twice)
    torch.testing.assert_close(restored, unmerged, atol=1e-5, rtol=1e-4)
    for name, layer in lorafa.lorafa_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, plain[name + ".weight"], atol=1e-6, rtol=0)
    # remove_lorafa(merge=True) gives back a plain model with the same function.
    lorafa.remove_lorafa(model, merge=True)
    assert not list(lorafa.lorafa_layers(model))
    assert set(n for n, _ in model.named_parameters()) == set(plain)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, unmerged, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear and Conv1D
def test_a_merged_models_state_dict_is_the_unmerged_one(family):
    model = lorafa.add_lorafa(tiny(family), lorafa.LoRAFAConfig(r=4, lora_alpha=8))
    _nonzero_B(model)
    inputs = {"input_ids": batch(family)["input_ids"]}
    with torch.no_grad():
        want = model(**inputs).logits
    unmerged = {k: v.clone() for k, v in model.state_dict().items()}  # state_dict() shares storage
    lorafa.merge_lorafa(model)
    merged = model.state_dict()
    assert merged.keys() == unmerged.keys()
    for key, value in unmerged.items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=1e-5, msg=key)
    # Into a fresh unmerged model: s·B·A is applied once, not twice.
    fresh = lorafa.add_lorafa(tiny(family, seed=3), lorafa.LoRAFAConfig(r=4, lora_alpha=8, init_seed=7))
    fresh.load_state_dict(merged)
    # Into a merged model (its own state dict): the loaded W gets its s·B·A added, so the adapter is kept.
    model.load_state_dict(merged)
    assert all(layer.merged for _, layer in lorafa.lorafa_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model(**inputs).logits, want, atol=1e-5, rtol=1e-4)
    lorafa.unmerge_lorafa(model)
    for key, value in unmerged.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_merging_a_parametrized_weight_is_refused(norm):
    torch.manual_seed(0)
    base = getattr(torch.nn.utils.parametrizations, norm)(torch.nn.Linear(8, 6))
    model = torch.nn.ModuleDict({"proj": base}).eval()
    lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=2, lora_alpha=4, target_modules=["proj"]))
    _nonzero_B(model)
    layer = model["proj"]
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = base(x) + layer.scaling * x @ layer.lora_A.weight.t() @ layer.lora_B.weight.t()
        with pytest.raises(ValueError, match=r"'proj'.*parametrization"):
            lorafa.merge_lorafa(model)
        assert not layer.merged
        torch.testing.assert_close(layer(x), want)


class _Aliased(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = self.a  # one layer under two names, called through both

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_a_layer_registered_under_two_names_is_adapted_under_both():
    torch.manual_seed(0)
    model = _Aliased()
    W, bias = model.a.weight.detach().clone(), model.a.bias.detach().clone()
    lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=2, lora_alpha=4, target_modules=["a"]))
    assert model.a is model.b and isinstance(model.b, lorafa.LoRAFALinear)
    _nonzero_B(model)
    x = torch.randn(3, 8)
    model(x).square().sum().backward()
    # Reference: plain autograd with W + s·B·A in both calls.
    A = model.a.lora_A.weight.detach()
    B = model.a.lora_B.weight.detach().clone().requires_grad_(True)
    w = W + model.a.scaling * B @ A
    (torch.tanh(x @ w.t() + bias) @ w.t() + bias).square().sum().backward()
    torch.testing.assert_close(model.a.lora_B.weight.grad, B.grad)
    lorafa.remove_lorafa(model, merge=False)
    assert model.a is model.b and isinstance(model.a, torch.nn.Linear)


def _tied_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
        vocab_size=64, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_a_layer_whose_weight_is_tied_warns_trains_unmerged_and_refuses_to_merge(tmp_path):
    model = _tied_llama()
    with pytest.warns(UserWarning, match=r"lm_head.weight is tied to \['model.embed_tokens.weight'\]"):
        lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    _nonzero_B(model)
    ids = torch.randint(0, 64, (2, 8))
    embedding = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        want = model(ids).logits
    for fn in (lorafa.merge_lorafa, lambda m: lorafa.remove_lorafa(m, merge=True)):
        with pytest.raises(ValueError, match=r"'lm_head'.*also \['model.embed_tokens.weight'\]"):
            fn(model)
        assert not any(layer.merged for _, layer in lorafa.lorafa_layers(model))  # q_proj not merged either
        assert torch.equal(model.model.embed_tokens.weight, embedding)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)
    # Unmerged it saves and loads as usual.
    lorafa.save_adapter(model, tmp_path / "a")
    with pytest.warns(UserWarning, match="tied"):
        fresh = lorafa.load_adapter(_tied_llama(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, want)


def test_two_linears_sharing_a_weight_refuse_to_merge():
    shared = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(shared, torch.nn.Linear(8, 8))
    model[1].weight = shared.weight  # tied after construction, as transformers' tie_weights does
    with pytest.warns(UserWarning, match=r"1.weight is tied to \['0.weight'\]"):
        lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=2, target_modules=["1"]))
    with pytest.raises(ValueError, match=r"'1'.*also \['0.weight'\]"):
        lorafa.merge_lorafa(model)


def test_eval_mode_never_touches_weights():
    model = tiny("llama")
    lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=4))
    _nonzero_B(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.eval()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_target_module_forms():
    model = tiny("llama")
    lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert sorted({n.split(".")[-1] for n, _ in lorafa.lorafa_layers(model)}) == ["q_proj", "v_proj"]
    model = tiny("llama")
    lorafa.add_lorafa(
        model, lorafa.LoRAFAConfig(r=2, target_modules=r"model\.layers\.1\.mlp\.(up|down)_proj")
    )
    assert [n for n, _ in lorafa.lorafa_layers(model)] == [
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ]
    model = tiny("llama")
    lorafa.add_lorafa(
        model, lorafa.LoRAFAConfig(r=2, target_modules="all-linear", exclude_modules=["o_proj"])
    )
    names = [n for n, _ in lorafa.lorafa_layers(model)]
    assert len(names) == 12 and "lm_head" not in names and not any(n.endswith("o_proj") for n in names)
    # A string is a regex over full names (PEFT's reading); one that leaves nothing out is most likely a mistake.
    model = lorafa.add_lorafa(tiny("llama"), lorafa.LoRAFAConfig(r=2, exclude_modules=r".*layers\.0\..*_proj"))
    kept = [n for n, _ in lorafa.lorafa_layers(model)]
    assert len(kept) == 7 and all(n.startswith("model.layers.1.") for n in kept)
    with pytest.warns(UserWarning, match=r"exclude_modules \['o_proj'\] matched no module"):
        lorafa.add_lorafa(tiny("llama"), lorafa.LoRAFAConfig(r=2, exclude_modules="o_proj"))
    both = lorafa.LoRAFAConfig(r=2, target_modules=["q_proj"], exclude_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"matched only modules that exclude_modules=\['q_proj'\] leaves out"):
        lorafa.add_lorafa(tiny("llama"), both)
    everything = lorafa.LoRAFAConfig(r=2, target_modules="all-linear", exclude_modules=".*")
    with pytest.raises(ValueError, match=r"e.g. \['model.layers.0.self_attn.q_proj'"):  # excluded targets
        lorafa.add_lorafa(tiny("llama"), everything)
    model = tiny("bert")
    lorafa.add_lorafa(
        model, lorafa.LoRAFAConfig(r=2, target_modules="all-linear", modules_to_save=["classifier"])
    )
    names = [n for n, _ in lorafa.lorafa_layers(model)]
    assert "classifier" not in names and "bert.pooler.dense" in names


def test_init_is_seeded_and_documented_options_differ():
    a = tiny("llama")
    b = tiny("llama")
    lorafa.add_lorafa(a, lorafa.LoRAFAConfig(r=4, init_seed=5))
    torch.manual_seed(999)  # the global RNG must not matter when init_seed is set
    lorafa.add_lorafa(b, lorafa.LoRAFAConfig(r=4, init_seed=5))
    for (_, la), (_, lb) in zip(lorafa.lorafa_layers(a), lorafa.lorafa_layers(b), strict=True):
        assert torch.equal(la.lora_A.weight, lb.lora_A.weight)
        assert torch.count_nonzero(la.lora_B.weight) == 0
    c = tiny("llama")
    lorafa.add_lorafa(c, lorafa.LoRAFAConfig(r=4, init_seed=6))
    assert not torch.equal(
        next(lorafa.lorafa_layers(a))[1].lora_A.weight, next(lorafa.lorafa_layers(c))[1].lora_A.weight
    )
    for init in ("kaiming", "gaussian", "orthogonal"):
        m = tiny("llama")
        lorafa.add_lorafa(m, lorafa.LoRAFAConfig(r=4, init_lora_weights=init))
        A = next(lorafa.lorafa_layers(m))[1].lora_A.weight
        d_in = A.shape[1]
        if init == "kaiming":
            assert A.abs().max() <= 1 / d_in**0.5
        elif init == "orthogonal":
            torch.testing.assert_close(A @ A.t(), torch.eye(4) / 3, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "r must be"),
        ({"r": -2}, "r must be"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"lora_dropout": 0.999995}, "lora_dropout must be below 1 - 2"),  # a keep probability of 0 at 1/65536
        ({"method": "qlora"}, "method"),
        ({"init_lora_weights": "zeros"}, "init_lora_weights"),
        ({"target_modules": "("}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
        ({"method": "lora", "projection": True}, "projection"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lorafa.LoRAFAConfig(**kwargs)


def test_injection_errors():
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"no module matched.*q_proj"):
        lorafa.add_lorafa(model, lorafa.LoRAFAConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="r=64 must satisfy"):
        lorafa.add_lorafa(tiny("llama"), lorafa.LoRAFAConfig(r=64))
    with pytest.raises(ValueError, match="not an nn.Linear"):
        lorafa.add_lorafa(tiny("llama"), lorafa.LoRAFAConfig(target_modules=["mlp"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        lorafa.add_lorafa(tiny("llama"), lorafa.LoRAFAConfig(modules_to_save=["classifier"]))
    lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=2))
    with pytest.raises(ValueError, match="applied twice"):
        lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=2))
    with pytest.raises(ValueError, match="no LoRA-FA adapters"):
        lorafa.merge_lorafa(tiny("llama"))


def test_quantized_linear_layers_are_refused():
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear and hold packed weights once on the GPU; lorafa's
    # layer multiplies by the base weight itself, so it must not take them for plain linears.
    int8 = torch.nn.Sequential(torch.nn.Linear(8, 8))
    int8[0].weight = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"target module '0' is a quantized layer .*torch.int8"):
        lorafa.add_lorafa(int8, lorafa.LoRAFAConfig(r=2, target_modules=["0"]))

    class Linear4bit(torch.nn.Linear):  # stands in for bitsandbytes.nn.Linear4bit (not installed here)
        pass

    Linear4bit.__module__ = "bitsandbytes.nn.modules"
    bnb = torch.nn.Sequential(Linear4bit(8, 8), torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"quantized layer \(bitsandbytes.nn.modules.Linear4bit"):
        lorafa.add_lorafa(bnb, lorafa.LoRAFAConfig(r=2, target_modules="all-linear"))


def test_token_ids_outside_the_embedding_table_are_a_clear_error():
    from datasets import Dataset

    from lorafa.models import check_token_ids

    model = tiny("llama")
    rows = model.get_input_embeddings().num_embeddings

    class Tok:
        def __len__(self):
            return rows + 1

    check_token_ids(model, [Dataset.from_dict({"input_ids": [[1, rows - 1]]}), None], Tok())
    bad = Dataset.from_dict({"input_ids": [[1, 2], [rows]]})
    with pytest.raises(ValueError, match=f"token id {rows}.*{rows} rows"):
        check_token_ids(model, [bad], Tok())


@pytest.mark.parametrize("model_type", ["bert", "roberta", "camembert", "mpnet", "xlm-roberta"])
def test_position_limit_is_the_longest_sequence_the_model_runs(model_type):
    from transformers import AutoConfig, AutoModel

    from lorafa.models import position_limit

    config = AutoConfig.for_model(
        model_type, vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=24,
    )  # fmt: skip
    model = AutoModel.from_config(config).eval()
    limit = position_limit(config)
    assert limit is not None
    with torch.no_grad():
        model(input_ids=torch.full((1, limit), 5))  # runs
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=torch.full((1, limit + 1), 5))


@pytest.mark.parametrize(
    "family, task, field, error",
    [
        ("bert", "classification", "data.max_length", True),  # learned positions: 64
        ("roberta", "classification", "data.max_length", True),  # 72 - 2 (positions start after padding)
        ("gpt2", "clm", "data.block_size", True),
        ("llama", "sft", "data.max_length", False),  # rotary: runs past max_position_embeddings; a warning
    ],
)
def test_inputs_longer_than_the_positions_are_refused_or_warned(family, task, field, error, caplog):
    import datasets

    from lorafa.models import check_positions, position_limit

    model = tiny(family)
    limit = position_limit(model.config)
    fits = datasets.Dataset.from_dict({"input_ids": [[1] * limit, [1] * 3]})
    check_positions(model, [fits, None], task)  # exactly the limit: fine
    assert caplog.text == ""
    too_long = datasets.Dataset.from_dict({"input_ids": [[1] * 3, [1] * (limit + 1)]})
    if error:
        with pytest.raises(ValueError, match=rf"input_ids of {limit + 1} tokens.* {limit} positions; set {field}"):
            check_positions(model, [fits, too_long], task)
        with pytest.raises((IndexError, RuntimeError)):  # what the model itself does with it
            model(input_ids=torch.full((1, limit + 1), 5))
    else:
        check_positions(model, [fits, too_long], task)
        assert f"consider {field} <= {limit}" in caplog.text


def test_a_model_without_the_tasks_form_names_the_tasks_it_fits(tmp_path):
    from lorafa.models import load_model

    tiny("llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"task seq2seq: transformers cannot load .* decoder-only models take"):
        load_model(str(tmp_path / "llama"), "seq2seq")


def test_seq2seq_targets_are_checked_against_the_decoders_own_positions():
    import datasets
    from transformers import LEDConfig, LEDForConditionalGeneration

    from lorafa.models import check_positions

    # LED: no max_position_embeddings, separate encoder and decoder tables (allenai/led-base-16384: 16384 / 1024).
    config = LEDConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, attention_window=[4],
        max_encoder_position_embeddings=64, max_decoder_position_embeddings=8,
    )  # fmt: skip
    model = LEDForConditionalGeneration(config)
    ok = datasets.Dataset.from_dict({"input_ids": [[5] * 40], "labels": [[5] * 8]})
    check_positions(model, [ok], "seq2seq")
    long_targets = datasets.Dataset.from_dict({"input_ids": [[5] * 40], "labels": [[5] * 9]})
    with pytest.raises(ValueError, match=r"labels of 9 tokens, but led has 8 positions; set data.max_target_length"):
        check_positions(model, [long_targets], "seq2seq")
    long_inputs = datasets.Dataset.from_dict({"input_ids": [[5] * 65], "labels": [[5] * 8]})
    with pytest.raises(ValueError, match=r"input_ids of 65 tokens, but led has 64 positions; set data.max_length"):
        check_positions(model, [long_inputs], "seq2seq")


def test_a_decoder_classifier_pools_the_last_real_token_whatever_its_configs_pad_id(tmp_path, caplog):
    from lorafa.models import load_model

    # huggyllama/open_llama pattern: the config says pad_token_id 0, the tokenizer has no pad token, and lorafa
    # pads with the borrowed EOS (here 2): pooling must skip id 2, not look for 0.
    backbone = tiny("llama")
    backbone.config.pad_token_id = 0
    backbone.save_pretrained(tmp_path / "llama")
    model = load_model(str(tmp_path / "llama"), "classification", num_labels=2, pad_token_id=2).eval()
    assert model.config.pad_token_id == 2 and "is not the tokenizer's pad id 2" in caplog.text
    long, short = [5, 6, 7, 8, 9], [5, 6, 7]
    batch = torch.tensor([long, short + [2, 2]])
    mask = (torch.arange(5) < torch.tensor([[5], [3]])).long()
    with torch.no_grad():
        together = model(input_ids=batch, attention_mask=mask).logits
        alone = model(input_ids=torch.tensor([short])).logits
    torch.testing.assert_close(together[1], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["lora", "lora-fa"])
def test_gradients_equal_peft_lora_on_the_same_weights(family, method, tmp_path):
    # The paper's LoRA baseline (method lora) and LoRA-FA run through lorafa's layer; PEFT's LoRA on the same A, B
    # and head is the reference: the loss and every trainable gradient must agree (LoRA-FA: B's and the head's).
    from peft import PeftModel

    model = tiny(family)
    lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=4, lora_alpha=8, method=method, modules_to_save=HEADS.get(family)))
    _nonzero_B(model)  # so A's gradient is not zero
    lorafa.save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(tiny(family), str(tmp_path / "adapter"), is_trainable=True)
    inputs = batch(family)
    ours_loss, peft_loss = model(**inputs).loss, peft_model(**inputs).loss
    ours_loss.backward()
    peft_loss.backward()
    torch.testing.assert_close(ours_loss, peft_loss, atol=1e-6, rtol=1e-6)
    peft_grads = {
        n.removeprefix("base_model.model.").replace(".default", "").replace(".modules_to_save", ""): p.grad
        for n, p in peft_model.named_parameters()
        if p.grad is not None
    }
    ours = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    if method == "lora-fa":
        peft_grads = {n: g for n, g in peft_grads.items() if ".lora_A." not in n}
    assert ours.keys() == peft_grads.keys()
    for n, g in ours.items():
        torch.testing.assert_close(g, peft_grads[n], atol=1e-6, rtol=1e-5, msg=n)
