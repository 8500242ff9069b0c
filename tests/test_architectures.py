"""Many transformers architectures through lorafa: default targets, new task heads, save/load, PEFT parity.

Each architecture is a tiny random-init config (hidden 32, 2 layers, vocab 100) saved as the checkpoint a user
would start from (its masked-LM, causal-LM or seq2seq-LM class) and loaded through `lorafa.models.load_model`
for the task, so its task head is as new as on a real checkpoint. Which weights are new is found in the test
itself: the parameters that differ between two loads under different seeds.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

import lorafa
from lorafa.heads import classification_head_names, new_module_names
from lorafa.layer import is_conv1d
from lorafa.models import load_model, prepare_model

VOCAB = 100
_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=64,
)
_DECODER = dict(_SHAPE, num_key_value_heads=2, pad_token_id=0)

# model_type -> (class of the checkpoint: mlm | clm | s2s, config fields). Token ids 0-2 are pad/bos/eos here.
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "bert": ("mlm", _SHAPE),  # a masked-LM checkpoint has no pooler: bert.pooler is new too
    "roberta": ("mlm", dict(_SHAPE, max_position_embeddings=72, pad_token_id=1)),
    "distilbert": ("mlm", dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=48)),
    "albert": ("mlm", dict(_SHAPE, embedding_size=16)),
    "electra": ("mlm", dict(_SHAPE, embedding_size=16)),
    "deberta-v2": (
        "mlm",
        dict(_SHAPE, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8),
    ),
    "bart": (
        "s2s",
        dict(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            max_position_embeddings=64,
        ),
    ),
    "t5": (
        "s2s",
        dict(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        ),
    ),
    "gpt2": ("clm", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)),
    "gpt_neox": ("clm", _DECODER),
    "opt": ("clm", dict(_SHAPE, ffn_dim=48, word_embed_proj_dim=32, pad_token_id=1)),
    "bloom": ("clm", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0)),
    "falcon": ("clm", dict(_SHAPE, pad_token_id=0)),
    "phi": ("clm", _DECODER),
    "phi3": ("clm", _DECODER),
    "qwen2": ("clm", _DECODER),
    "qwen3": ("clm", dict(_DECODER, head_dim=8)),
    "mistral": ("clm", _DECODER),
    "gemma": ("clm", dict(_DECODER, head_dim=8)),
    "llama": ("clm", _DECODER),
}
# Architectures lorafa supports only in part (see the tests at the end), kept out of the sweep.
PARTIAL: dict[str, tuple[str, dict[str, Any]]] = {
    "xlnet": ("clm", dict(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_inner=48, pad_token_id=0)),
    "mixtral": ("clm", dict(_DECODER, num_local_experts=2, num_experts_per_tok=1)),
}
_PRETRAINED = {"mlm": AutoModelForMaskedLM, "clm": AutoModelForCausalLM, "s2s": AutoModelForSeq2SeqLM}
CASES = [(a, "classification") for a in ARCHS]
CASES += [(a, "sft") for a, (kind, _) in ARCHS.items() if kind == "clm"]
CASES += [(a, "seq2seq") for a, (kind, _) in ARCHS.items() if kind == "s2s"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """arch -> folder of a saved random-init checkpoint of its pretraining class (made once per module)."""
    made: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in made:
            kind, fields = {**ARCHS, **PARTIAL}[arch]
            torch.manual_seed(0)
            model = _PRETRAINED[kind].from_config(AutoConfig.for_model(arch, **fields))
            folder = tmp_path_factory.mktemp(arch)
            model.save_pretrained(folder)
            made[arch] = str(folder)
        return made[arch]

    return get


def _load(path: str, task: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # new weights are drawn from the global RNG
    return load_model(path, task, num_labels=3, pad_token_id=0)


def _inputs(model: nn.Module, task: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    if task == "classification":
        if model.config.is_encoder_decoder:
            ids[:, -1] = model.config.eos_token_id  # BART and T5 classify at the last <eos>
        return {"input_ids": ids}, torch.randint(0, 3, (2,), generator=g)
    if task == "seq2seq":
        target = torch.randint(3, VOCAB, (2, 6), generator=g)
        return {"input_ids": ids, "decoder_input_ids": target}, target
    return {"input_ids": ids}, ids


def _random_params(model: nn.Module, other: nn.Module) -> set[str]:
    """Parameters that differ between two loads under different seeds: those the checkpoint did not provide."""
    theirs = dict(other.named_parameters())
    return {n for n, p in model.named_parameters() if not torch.equal(p, theirs[n])}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The items of the outermost nn.ModuleLists that hold linear layers: the transformer blocks."""
    blocks: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(b + ".") for b, _ in blocks):
            items = [(f"{name}.{i}", m) for i, m in enumerate(module)]
            blocks += [(n, m) for n, m in items if any(_is_linear(x) for x in m.modules())]
    return blocks


def _randomise_B(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lorafa.lorafa_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def _prepared(path: str, task: str) -> tuple[nn.Module, set[str]]:
    """A LoRA-FA model with default settings, and the names of its randomly initialised weights."""
    model = _load(path, task, seed=0)
    new = _random_params(model, _load(path, task, seed=1))
    prepare_model(model, "lora-fa", task, lorafa.LoRAFAConfig(r=4, lora_alpha=8))
    return model, new


@pytest.mark.parametrize("arch, task", CASES)
def test_default_targets_new_heads_gradients_and_reload(arch, task, checkpoint, tmp_path):
    path = checkpoint(arch)
    model, new = _prepared(path, task)
    adapted = [n for n, _ in lorafa.lorafa_layers(model)]
    saved = model.lorafa_config.modules_to_save or []
    assert bool(new) == (task == "classification")  # a causal or seq2seq LM checkpoint provides its head

    # Every linear layer of every transformer block is adapted: attention and MLP.
    blocks = _blocks(model)
    assert blocks  # ALBERT has one, shared by all its layers
    for block, module in blocks:
        inside = [n[len(block) + 1 :].lower() for n in adapted if n.startswith(block + ".")]
        assert any("att" in n for n in inside), f"{block}: no attention layer adapted ({inside})"
        assert any("att" not in n for n in inside), f"{block}: no MLP layer adapted ({inside})"
        for n, m in module.named_modules():
            full = f"{block}.{n}"
            assert not _is_linear(m) or any(full.startswith(a + ".") for a in adapted), f"{full} not adapted"

    # The new head trains in full and is saved; none of it is adapted.
    for n in new:
        assert any(n.startswith(s + ".") for s in saved), f"new weight {n} is not in modules_to_save {saved}"
        assert model.get_parameter(n).requires_grad, n
    assert not [a for a in adapted for s in saved if a == s or a.startswith(s + ".")]

    # Gradients reach exactly the B's and the head.
    inputs, labels = _inputs(model, task)
    model.train()
    model(**inputs, labels=labels).loss.backward()
    model.eval()
    for n, p in model.named_parameters():
        trains = ".lora_B." in n or any(n.startswith(s + ".") for s in saved)
        assert (p.grad is not None) == trains, n

    # A fresh load (another seed, so another random head) plus the saved adapter gives the same logits.
    _randomise_B(model)
    with torch.no_grad():
        ours = model(**inputs).logits
    lorafa.save_adapter(model, tmp_path / "adapter")
    # PEFT wraps every module whose name in its PeftModel ends with a written key (str.endswith, no dot boundary):
    # the written keys must select exactly the saved modules.
    keys = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"] or []
    names = [n for n, _ in model.named_modules() if n]
    assert {n for n in names for k in keys if f"base_model.model.{n}".endswith(k)} == set(model.lorafa_modules_to_save)
    fresh = lorafa.load_adapter(_load(path, task, seed=2), tmp_path / "adapter", is_trainable=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, ours, atol=0, rtol=0)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_loads_our_classification_adapter(arch, checkpoint, tmp_path):
    path = checkpoint(arch)
    model, _ = _prepared(path, "classification")
    _randomise_B(model)
    inputs, _ = _inputs(model, "classification")
    with torch.no_grad():
        ours = model(**inputs).logits
    lorafa.save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(_load(path, "classification", seed=2), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_models_built_in_code_get_the_head_a_checkpoint_lacks(arch, checkpoint):
    """Without loading info the head is the task class's own top-level children; compare with a loaded model."""
    _, fields = ARCHS[arch]
    built = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(arch, **fields, num_labels=3))
    loaded = classification_head_names(_load(checkpoint(arch), "classification", seed=0))
    # A new pooler inside the backbone (bert.pooler of a masked-LM checkpoint) can't be told apart in code.
    assert classification_head_names(built) == [n for n in loaded if "." not in n]


def test_user_modules_to_save_must_cover_the_new_head(checkpoint):
    model = _load(checkpoint("distilbert"), "classification", seed=0)
    cfg = lorafa.LoRAFAConfig(r=4, modules_to_save=["classifier"])
    # DistilBERT has no default targets: "all-linear" leaves its task head (pre_classifier, classifier) out
    with pytest.raises(ValueError, match=r"\['pre_classifier'\] were newly initialised.*left frozen"):
        prepare_model(model, "lora-fa", "classification", cfg)
    cfg = lorafa.LoRAFAConfig(r=4, modules_to_save=["classifier"], target_modules=["q_lin", "pre_classifier"])
    with pytest.raises(ValueError, match=r"\['pre_classifier'\] were newly initialised.*adapted"):
        prepare_model(model, "lora-fa", "classification", cfg)
    model = _load(checkpoint("t5"), "classification", seed=0)
    with pytest.raises(ValueError, match=r"\['classification_head'\] were newly initialised.*left frozen"):
        lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=4))
    assert not list(lorafa.lorafa_layers(model))  # nothing was changed


def test_an_untied_lm_head_missing_from_the_checkpoint_trains(tmp_path):
    fields = dict(_DECODER, tie_word_embeddings=False)
    AutoModel.from_config(AutoConfig.for_model("llama", **fields)).save_pretrained(tmp_path / "base")
    model = _load(str(tmp_path / "base"), "sft", seed=0)
    assert new_module_names(model) == ["lm_head"]
    prepare_model(model, "lora-fa", "sft", lorafa.LoRAFAConfig(r=4))
    assert model.lorafa_modules_to_save == ["lm_head"] and model.lm_head.weight.requires_grad
    inputs, _ = _inputs(model, "sft")
    with torch.no_grad():
        ours = model(**inputs).logits
    lorafa.save_adapter(model, tmp_path / "adapter")
    fresh = lorafa.load_adapter(_load(str(tmp_path / "base"), "sft", seed=1), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, ours, atol=0, rtol=0)


def test_a_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **_DECODER)).save_pretrained(tmp_path)
    AutoConfig.for_model("gpt_neox", **_DECODER).save_pretrained(tmp_path)  # same folder, other architecture
    model = _load(str(tmp_path), "sft", seed=0)
    with pytest.raises(
        ValueError, match=r"none of the \d+ weights of 'gpt_neox', which holds a stack of layers"
    ):
        prepare_model(model, "lora-fa", "sft", lorafa.LoRAFAConfig(r=4))


def test_peft_written_adapter_with_its_suffix_matched_heads_loads(checkpoint, tmp_path):
    """PEFT's modules_to_save ["classifier", "score"] matches names by suffix, so it saves DistilBERT's
    pre_classifier too; lorafa selects the same modules, and the label count is read from the output layer."""
    from peft import LoraConfig, get_peft_model

    from lorafa.evaluate import _num_labels_from_adapter

    path = checkpoint("distilbert")
    peft_model = get_peft_model(
        _load(path, "classification", seed=0), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_lin"])
    )
    _randomise_B(peft_model.base_model.model)
    inputs, _ = _inputs(peft_model, "classification")
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    peft_model.save_pretrained(tmp_path / "peft")
    ours = lorafa.load_adapter(_load(path, "classification", seed=1), tmp_path / "peft")
    assert ours.lorafa_modules_to_save == ["pre_classifier", "classifier"]
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, expected, atol=1e-5, rtol=1e-4)
    lorafa.save_adapter(ours, tmp_path / "ours")
    assert _num_labels_from_adapter(tmp_path / "ours", ours.lorafa_config.modules_to_save) == 3


def test_xlnet_needs_explicit_targets_and_its_heads_are_found(checkpoint, tmp_path):
    """XLNet's attention projections are raw parameters, so its default would adapt only the feed-forward part."""
    path = checkpoint("xlnet")
    model = _load(path, "classification", seed=0)
    with pytest.raises(ValueError, match=r"no default for model_type 'xlnet'.*raw parameters"):
        prepare_model(model, "lora-fa", "classification", lorafa.LoRAFAConfig(r=4))
    with pytest.raises(ValueError, match=r"name parameters, not modules: \['transformer.layer.0.rel_attn.q'"):
        prepare_model(model, "lora-fa", "classification", lorafa.LoRAFAConfig(r=4, target_modules=["q"]))
    new = _random_params(model, _load(path, "classification", seed=1))
    cfg = lorafa.LoRAFAConfig(r=4, target_modules=["layer_1", "layer_2"])
    prepare_model(model, "lora-fa", "classification", cfg)
    assert model.lorafa_modules_to_save == ["sequence_summary", "logits_proj"]
    assert new and all(n.startswith(("sequence_summary.", "logits_proj.")) for n in new)
    _randomise_B(model)
    inputs, _ = _inputs(model, "classification")
    with torch.no_grad():
        ours = model(**inputs).logits
    lorafa.save_adapter(model, tmp_path / "adapter")
    fresh = lorafa.load_adapter(_load(path, "classification", seed=2), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, ours, atol=0, rtol=0)


def test_moe_experts_are_fused_parameters_so_only_attention_is_adapted(checkpoint):
    model = _load(checkpoint("mixtral"), "sft", seed=0)
    with pytest.raises(
        ValueError, match=r"name parameters, not modules: \['model.layers.0.mlp.experts.gate_up_proj'"
    ):
        lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=4, target_modules=["q_proj", "gate_up_proj"]))
    prepare_model(model, "lora-fa", "sft", lorafa.LoRAFAConfig(r=4))
    adapted = [n for n, _ in lorafa.lorafa_layers(model)]
    assert sorted(n.split(".")[-1] for n in adapted) == sorted(["q_proj", "k_proj", "v_proj", "o_proj"] * 2)
    bare = [
        n
        for n, m in model.named_modules()
        if _is_linear(m) and not any(n.startswith(a + ".") for a in adapted)
    ]
    assert bare == ["lm_head"]  # the experts and the router hold no linear layer


def test_a_head_of_another_size_is_new_and_a_fitting_one_still_trains(tmp_path):
    fields = dict(ARCHS["bert"][1], num_labels=2)
    AutoModelForSequenceClassification.from_config(AutoConfig.for_model("bert", **fields)).save_pretrained(
        tmp_path
    )
    other = load_model(str(tmp_path), "classification", num_labels=3)  # ignore_mismatched_sizes: a new head
    assert new_module_names(other) == ["classifier"]
    same = load_model(str(tmp_path), "classification", num_labels=2)  # an already fine-tuned head
    assert new_module_names(same) == [] and classification_head_names(same) == ["classifier"]


def test_layers_read_directly_by_their_model_are_not_adapted_by_default():
    # Falcon-H1's Mamba mixer reads in_proj/out_proj's weight and bias itself: the default adapts attention and MLP
    # only, and adapting them anyway fails with a message that says why, not a bare AttributeError.
    cfg = AutoConfig.for_model(
        "falcon_h1", vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    ids = torch.randint(3, 96, (2, 8))
    model = lorafa.add_lorafa(AutoModelForCausalLM.from_config(cfg).train(), lorafa.LoRAFAConfig(r=4))
    adapted = [n for n, _ in lorafa.lorafa_layers(model)]
    assert adapted and not [n for n in adapted if ".mamba." in n]
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    model = AutoModelForCausalLM.from_config(cfg).train()
    lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=4, target_modules="all-linear"))
    with pytest.raises(AttributeError, match="would bypass its adapter"):
        model(input_ids=ids, labels=ids, use_cache=False)


def test_moe_routers_and_one_output_gates_are_left_to_explicit_targets():
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    qwen = AutoConfig.for_model(
        "qwen2_moe", **base, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = lorafa.add_lorafa(AutoModelForCausalLM.from_config(qwen), lorafa.LoRAFAConfig(r=8))
    adapted = {n.split("layers.0.")[1] for n, _ in lorafa.lorafa_layers(model) if "layers.0." in n}
    assert adapted == {
        *(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
        *(f"mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")),
    }  # not mlp.shared_expert_gate, a Linear(32, 1)
    phi = AutoConfig.for_model("phimoe", **base, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    with pytest.warns(UserWarning, match=r"not adapting 2 MoE router or gate layers.*'model.layers.0.mlp.router'"):
        model = lorafa.add_lorafa(
            AutoModelForCausalLM.from_config(phi), lorafa.LoRAFAConfig(r=2, target_modules="all-linear")
        )
    assert not any("router" in n for n, _ in lorafa.lorafa_layers(model))
    named = lorafa.add_lorafa(
        AutoModelForCausalLM.from_config(phi), lorafa.LoRAFAConfig(r=2, target_modules=["q_proj", "router"])
    )
    assert sum("router" in n for n, _ in lorafa.lorafa_layers(named)) == 2


def test_all_linear_says_when_r_is_too_large_for_layers():
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **_DECODER))  # hidden 32, kv 16
    with pytest.warns(UserWarning, match=r"not adapting 4 layers narrower than r=20"):
        lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=20, target_modules="all-linear"))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **_DECODER))
    with pytest.raises(ValueError, match=r"r=64 is larger than every linear layer's min\(d_in, d_out\)"):
        lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=64, target_modules="all-linear"))


_VIT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8)
_W2V = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(8, 8),
    conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    vocab_size=12,
)  # fmt: skip
_IMAGE = {"pixel_values": torch.randn(2, 3, 16, 16)}
_AUDIO = {"input_values": torch.randn(2, 400)}


@pytest.mark.parametrize(
    "cls, config, inputs, head",
    [
        ("ViTForImageClassification", ("vit", _VIT), _IMAGE, ["classifier"]),
        (
            "DeiTForImageClassificationWithTeacher",
            ("deit", _VIT),
            _IMAGE,
            ["cls_classifier", "distillation_classifier"],
        ),
        ("Wav2Vec2ForCTC", ("wav2vec2", _W2V), _AUDIO, ["lm_head"]),  # CTC's lm_head is its (new) head
        ("Wav2Vec2ForSequenceClassification", ("wav2vec2", _W2V), _AUDIO, ["projector", "classifier"]),
        ("Wav2Vec2ForAudioFrameClassification", ("wav2vec2", _W2V), _AUDIO, ["classifier"]),
    ],
)
def test_image_and_audio_task_heads_are_found_like_text_classification_heads(cls, config, inputs, head):
    import transformers

    def build() -> nn.Module:
        torch.manual_seed(0)
        return getattr(transformers, cls)(AutoConfig.for_model(config[0], **config[1])).train()

    model = build()
    assert classification_head_names(model) == head
    with pytest.warns(UserWarning, match=re.escape(f"{cls}: its head {head!r} is not in modules_to_save")):
        lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=2, target_modules="all-linear"))
    assert not [n for n, _ in lorafa.lorafa_layers(model) if any(n.startswith(h) for h in head)]
    model = lorafa.add_lorafa(build(), lorafa.LoRAFAConfig(r=2, target_modules="all-linear", modules_to_save=head))
    out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    logits.float().square().mean().backward()
    for name in head:
        assert all(p.grad is not None for p in model.get_submodule(name).parameters()), name


def _randomise_all_B(model: nn.Module) -> None:
    # std 0.1: the adapters change the outputs clearly, without making them so large that fp32 rounding of merged
    # vs unmerged sums exceeds the tolerances below (std 1 gave |Δ| 7e-5 on outputs of ~0.1-1 in one CI run).
    torch.manual_seed(1)
    for _, layer in lorafa.lorafa_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.1)


def test_multihead_attention_projections_are_left_alone_and_named_ones_refused():
    # torch's nn.MultiheadAttention hands out_proj's weight and bias to F.multi_head_attention_forward itself.
    import transformers

    cfg = transformers.SiglipVisionConfig(**_VIT)
    model = transformers.SiglipVisionModel(cfg).eval()
    with pytest.warns(UserWarning, match=r"not adapting 1 projections of nn.MultiheadAttention.*head.attention.out"):
        lorafa.add_lorafa(model, lorafa.LoRAFAConfig(r=2))
    assert "head.attention.out_proj" not in dict(lorafa.lorafa_layers(model))
    _randomise_all_B(model)
    with torch.no_grad():
        unmerged = model(**_IMAGE).pooler_output
        merged = lorafa.merge_lorafa(model)(**_IMAGE).pooler_output
    torch.testing.assert_close(unmerged, merged, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"'head.attention.out_proj' is a projection of an nn.MultiheadAttention"):
        lorafa.add_lorafa(transformers.SiglipVisionModel(cfg), lorafa.LoRAFAConfig(r=2, target_modules=["out_proj"]))


def test_transformer_encoder_layer_fast_path_says_how_to_keep_the_adapter():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, batch_first=True), 2)
    with pytest.warns(UserWarning, match=r"inside nn.TransformerEncoderLayer.*set_fastpath_enabled\(False\)"):
        lorafa.add_lorafa(encoder, lorafa.LoRAFAConfig(r=2, target_modules=["linear1", "linear2"]))
    _randomise_all_B(encoder)
    reference = lorafa.remove_lorafa(copy.deepcopy(encoder), merge=True).eval()  # plain Linears: fast path works
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = reference(x)
        with pytest.raises(AttributeError, match=r"'layers.0.linear1'.*set_fastpath_enabled\(False\)"):
            encoder.eval()(x)
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            torch.testing.assert_close(encoder(x), want, atol=1e-5, rtol=1e-4)
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)
