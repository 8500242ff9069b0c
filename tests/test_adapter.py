"""Adapter files: PEFT's format both ways, strict loading, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import HEADS, batch, tiny
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import lorafa
import lorafa.adapter as adapter_mod


def _randomise_trainables(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _inputs(family):
    b = batch(family)
    inputs = {"input_ids": b["input_ids"]}
    if family == "t5":
        inputs["decoder_input_ids"] = b["labels"]
    return inputs


def _trained(family, **kw):
    model = tiny(family)
    lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=4, lora_alpha=8, modules_to_save=HEADS.get(family), **kw))
    _randomise_trainables(model)
    return model


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2", "t5"])
def test_peft_loads_our_adapter_with_same_logits(family, tmp_path):
    model = _trained(family)
    with torch.no_grad():
        ours = model(**_inputs(family)).logits
    lorafa.save_adapter(model, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(tiny(family), tmp_path / "a")
    with torch.no_grad():
        theirs = peft_model(**_inputs(family)).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "family, saved",
    [
        (
            "bert",
            None,
        ),  # a classification model whose head stays frozen: PEFT's SEQ_CLS would expect its weights
        (
            "llama",
            ["norm"],
        ),  # PEFT's "norm" would also select every input_layernorm / post_attention_layernorm
        ("roberta", ["classifier"]),
    ],
)
def test_peft_loads_exactly_our_modules_to_save(family, saved, tmp_path, recwarn):
    model = tiny(family)
    lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=4, lora_alpha=8, modules_to_save=saved))
    _randomise_trainables(model)
    with torch.no_grad():
        ours = model(**_inputs(family)).logits
    lorafa.save_adapter(model, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(tiny(family), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**_inputs(family)).logits, ours, atol=1e-5, rtol=1e-4)
    wrapped = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if type(m).__name__ == "ModulesToSaveWrapper"
    }
    assert wrapped == set(model.lorafa_modules_to_save)
    # lorafa reads the PEFT fields alone too (a folder without lorafa_config.json, as PEFT writes them)
    (tmp_path / "a" / "lorafa_config.json").unlink()
    fresh = lorafa.load_adapter(tiny(family), tmp_path / "a")
    assert fresh.lorafa_modules_to_save == model.lorafa_modules_to_save
    with torch.no_grad():
        torch.testing.assert_close(fresh(**_inputs(family)).logits, ours, atol=0, rtol=0)


def test_a_tied_module_to_save_trains_its_own_copy_as_peft_does(tmp_path):
    # GPT-2's lm_head shares its weight with transformer.wte; PEFT trains a copy of lm_head and leaves wte alone.
    embedding = tiny("gpt2").transformer.wte.weight.detach().clone()
    model = lorafa.add_lorafa(tiny("gpt2"), lorafa.LoRAFAConfig(r=4, modules_to_save=["lm_head"]))
    model(**batch("gpt2")).loss.backward()
    assert model.transformer.wte.weight.grad is None and model.lm_head.weight.grad is not None
    _randomise_trainables(model)
    assert torch.equal(model.transformer.wte.weight, embedding)
    with torch.no_grad():
        ours = model(**_inputs("gpt2")).logits
    lorafa.save_adapter(model, tmp_path / "a")
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(tiny("gpt2"), tmp_path / "a")(**_inputs("gpt2")).logits
    torch.testing.assert_close(peft_logits, ours, atol=1e-5, rtol=1e-4)

    # The other way: a PEFT adapter with modules_to_save=["lm_head"] loaded by lorafa.
    peft_model = get_peft_model(tiny("gpt2"), LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    _randomise_trainables(peft_model, seed=1)
    with torch.no_grad():
        expected = peft_model(**_inputs("gpt2")).logits
    peft_model.save_pretrained(tmp_path / "p")
    loaded = lorafa.load_adapter(tiny("gpt2"), tmp_path / "p")
    assert torch.equal(loaded.transformer.wte.weight, embedding)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_inputs("gpt2")).logits, expected, atol=1e-5, rtol=1e-4)


def test_a_task_head_left_frozen_warns_and_is_never_adapted():
    with pytest.warns(UserWarning, match=r"head \['classifier'\] is not in modules_to_save"):
        lorafa.add_lorafa(tiny("roberta"), lorafa.LoRAFAConfig(r=2, target_modules="all-linear"))
    model = tiny("roberta")
    lorafa.add_lorafa(
        model, lorafa.LoRAFAConfig(r=2, target_modules="all-linear", modules_to_save=["classifier"])
    )
    adapted = [n for n, _ in lorafa.lorafa_layers(model)]
    assert adapted and not [n for n in adapted if n.startswith("classifier")]
    assert "roberta.encoder.layer.0.attention.self.query" in adapted


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_our_round_trip_and_loading_peft_adapter(family, tmp_path):
    model = _trained(family, target_modules="all-linear")
    with torch.no_grad():
        ours = model(**_inputs(family)).logits
    lorafa.save_adapter(model, tmp_path / "a")
    fresh = lorafa.load_adapter(tiny(family), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**_inputs(family)).logits, ours, atol=0, rtol=0)

    # An adapter written by PEFT itself: same logits, and it continues as LoRA-FA (A frozen, B trainable).
    targets = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "gpt2": ["c_attn"]}[family]
    peft_cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        modules_to_save=HEADS.get(family),
        fan_in_fan_out=family == "gpt2",
    )
    peft_model = get_peft_model(tiny(family), peft_cfg)
    _randomise_trainables(peft_model, seed=1)
    with torch.no_grad():
        expected = peft_model(**_inputs(family)).logits
    peft_model.save_pretrained(tmp_path / "p")
    loaded = lorafa.load_adapter(tiny(family), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_inputs(family)).logits, expected, atol=1e-5, rtol=1e-4)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and not any("lora_A" in n for n in trainable)
    assert all("lora_B" in n or any(n.startswith(h + ".") for h in HEADS.get(family, [])) for n in trainable)


def test_saved_keys_follow_peft_layout(tmp_path):
    model = _trained("bert")
    lorafa.save_adapter(model, tmp_path / "a")
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight" in keys
    assert "base_model.model.classifier.weight" in keys and "base_model.model.classifier.bias" in keys
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS" and cfg["r"] == 4


def test_strict_loading_errors(tmp_path):
    model = _trained("llama")
    good = tmp_path / "good"
    lorafa.save_adapter(model, good)
    weights = load_file(str(good / "adapter_model.safetensors"))

    def variant(name, mutate):
        folder = tmp_path / name
        lorafa.save_adapter(model, folder)
        state = dict(weights)
        mutate(state)
        save_file(state, str(folder / "adapter_model.safetensors"))
        return folder

    missing = variant("missing", lambda s: s.pop(next(k for k in s if "lora_B" in k)))
    target = tiny("llama")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    flags = {n: p.requires_grad for n, p in target.named_parameters()}
    with pytest.raises(ValueError, match="missing keys.*lora_B"):
        lorafa.load_adapter(target, missing)
    # a failed load leaves the model as it was given: no adapters, same weights and flags, loadable afterwards
    assert not list(lorafa.lorafa_layers(target)) and not hasattr(target, "lorafa_config")
    assert target.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    assert {n: p.requires_grad for n, p in target.named_parameters()} == flags
    lorafa.load_adapter(target, good)
    # a model whose adapters scale differently from the file's is refused, not silently kept
    other = lorafa.add_lorafa(tiny("llama"), lorafa.LoRAFAConfig(r=4, lora_alpha=2))
    with pytest.raises(ValueError, match="lora_alpha: file 8 vs model 2"):
        lorafa.load_adapter(other, good)
    # nor is a method asked for that the model's adapters do not have (it was ignored)
    same = lorafa.add_lorafa(tiny("llama"), lorafa.read_adapter_config(good)[0])
    with pytest.raises(ValueError, match=r"method='lora'.*already \['lora-fa'\]"):
        lorafa.load_adapter(same, good, method="lora")
    lorafa.load_adapter(same, good, method="lora-fa")
    extra = variant(
        "extra",
        lambda s: s.__setitem__("base_model.model.model.layers.0.mlp.up_proj.lora_C.weight", torch.zeros(1)),
    )
    with pytest.raises(ValueError, match="unexpected keys.*lora_C"):
        lorafa.load_adapter(tiny("llama"), extra)
    key = next(k for k in weights if "lora_A" in k)
    shape = variant("shape", lambda s: s.__setitem__(key, torch.zeros(3, s[key].shape[1])))
    with pytest.raises(ValueError, match="wrong shapes"):
        lorafa.load_adapter(tiny("llama"), shape)
    with pytest.raises(ValueError, match="model_type 'llama'.*'qwen2'"):
        lorafa.load_adapter(tiny("qwen2"), good)
    with pytest.raises(ValueError, match="does not match the model"):
        lorafa.load_adapter(tiny("gpt2"), _peft_style(good, tmp_path))
    with pytest.raises(FileNotFoundError, match="adapter folder not found"):
        lorafa.load_adapter(tiny("llama"), tmp_path / "nope")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        lorafa.load_adapter(tiny("llama"), tmp_path / "corrupt")
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        lorafa.load_adapter(tiny("llama"), tmp_path / "corrupt")
    (tmp_path / "corrupt" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lorafa.load_adapter(tiny("llama"), tmp_path / "corrupt")
    with pytest.raises(ValueError, match="no LoRA-FA adapters to save"):
        lorafa.save_adapter(tiny("llama"), tmp_path / "x")


def _peft_style(folder, tmp_path):
    """The same adapter without lorafa's side file, as PEFT would have written it (no model_type recorded)."""
    out = tmp_path / "peft_style"
    out.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (out / name).write_bytes((folder / name).read_bytes())
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["target_modules"] = ["c_attn"]  # a GPT-2 target so injection succeeds and the key check must catch it
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def test_write_is_atomic(tmp_path, monkeypatch):
    model = _trained("llama")
    out = tmp_path / "adapter"
    lorafa.save_adapter(model, out)
    before = (out / "adapter_model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(adapter_mod, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        lorafa.save_adapter(model, out)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left behind
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="disk full"):
        monkeypatch.setattr(adapter_mod, "save_file", boom)
        lorafa.save_adapter(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"lora_bias": True}, "lora_bias=True is not supported"),
        ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
        ({"init_lora_weights": "olora"}, "rewrites the base weights"),
        ({"init_lora_weights": "lora_ga"}, "rewrites the base weights"),
        ({"alora_invocation_tokens": [9, 10]}, "aLoRA"),
        ({"kasa_config": {}}, "KaSA"),  # an empty config turns KaSA on with its defaults
        ({"use_bdlora": {"lora_a_is_blockdiagonal": True}}, "BD-LoRA"),
        ({"arrow_config": {"top_k": 2}}, "Arrow"),
        ({"monteclora_config": {}}, "MonteCLoRA"),
        ({"velora_config": {}}, "VeLoRA"),
        ({"use_qalora": True}, "use_qalora=True is not supported"),
    ],
)
def test_peft_features_lorafa_does_not_compute_are_refused(tmp_path, extra, message):
    peft_model = get_peft_model(tiny("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({**cfg, **extra}))
    target = tiny("llama")
    with pytest.raises(ValueError, match=message):
        lorafa.load_adapter(target, tmp_path / "p")
    assert not list(lorafa.lorafa_layers(target))


@pytest.mark.parametrize("exclude", [["model.layers.0.self_attn.q_proj"], r".*layers\.0\.self_attn\.q_proj"])
def test_peft_exclude_modules_are_honoured(tmp_path, exclude):
    """A list names modules (or suffixes); a string is a regex over full names, as PEFT reads it."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], exclude_modules=exclude)
    peft_model = get_peft_model(tiny("llama"), cfg)
    _randomise_trainables(peft_model, seed=1)
    with torch.no_grad():
        expected = peft_model(**_inputs("llama")).logits
    peft_model.save_pretrained(tmp_path / "p")
    loaded = lorafa.load_adapter(tiny("llama"), tmp_path / "p")
    assert "model.layers.0.self_attn.q_proj" not in dict(lorafa.lorafa_layers(loaded))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_inputs("llama")).logits, expected, atol=1e-5, rtol=1e-4)
