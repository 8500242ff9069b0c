"""`save_pretrained` of an adapted model and transformers.Trainer: one folder that transformers, PEFT and lorafa
read back as the trained model, and Trainer checkpoints that resume exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import HEADS, VOCAB, batch, tiny
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

import lorafa

_AUTO = {
    "llama": AutoModelForCausalLM,
    "gpt2": AutoModelForCausalLM,
    "t5": AutoModelForSeq2SeqLM,
    "bert": AutoModelForSequenceClassification,
}


def _trained(family: str) -> torch.nn.Module:
    cfg = lorafa.LoRAFAConfig(r=4, lora_dropout=0.1, modules_to_save=HEADS.get(family))
    model = lorafa.add_lorafa(tiny(family), cfg)
    torch.manual_seed(1)
    for _, layer in lorafa.lorafa_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight)
    for name in model.lorafa_modules_to_save:
        for p in model.get_submodule(name).parameters():
            p.data.add_(1.0)
    return model.eval()


def _logits(model: torch.nn.Module, family: str) -> torch.Tensor:
    inputs = {k: v for k, v in batch(family).items() if family == "t5" or k != "labels"}
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "bert"])
def test_save_pretrained_folder_is_the_trained_model_for_every_reader(family, tmp_path):
    model = _trained(family)
    want = _logits(model, family)
    model.save_pretrained(tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= names
    # transformers (PEFT installed): the base from the folder, then its adapter.
    torch.testing.assert_close(_logits(_AUTO[family].from_pretrained(tmp_path / "out"), family), want)
    # PEFT and lorafa on a fresh base model.
    peft = PeftModel.from_pretrained(tiny(family), tmp_path / "out")
    torch.testing.assert_close(_logits(peft, family), want)
    ours = lorafa.load_adapter(tiny(family), tmp_path / "out")
    torch.testing.assert_close(_logits(ours, family), want, atol=0, rtol=0)


def test_saved_weights_resume_into_an_adapted_model_and_merge_state_is_kept(tmp_path):
    from safetensors.torch import load_file

    model = _trained("llama")
    want = _logits(model, "llama")
    lorafa.merge_lorafa(model)
    model.save_pretrained(tmp_path / "out")
    assert all(layer.merged for _, layer in lorafa.lorafa_layers(model))
    # What Trainer's resume does: the folder's model weights into an adapted model of other values, non-strictly.
    other = lorafa.add_lorafa(tiny("llama", seed=5), lorafa.LoRAFAConfig(r=4, init_seed=9))
    result = other.load_state_dict(load_file(str(tmp_path / "out" / "model.safetensors")), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(_logits(other, "llama"), want)
    # Saved unmerged: loading base + adapter does not add s·B·A twice.
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), "llama"), want)


def test_copies_carry_a_working_save_pretrained_and_after_remove_lorafa_it_saves_the_plain_model(tmp_path):
    model = _trained("llama")
    copied = copy.deepcopy(model)
    assert copied.save_pretrained.model is copied
    copied.save_pretrained(tmp_path / "copy")
    torch.testing.assert_close(
        _logits(lorafa.load_adapter(tiny("llama"), tmp_path / "copy"), "llama"), _logits(model, "llama")
    )
    model.save_pretrained(tmp_path / "plain")  # adapted: adapter files written
    lorafa.remove_lorafa(model)  # merged into the base weights
    model.save_pretrained(tmp_path / "plain")  # the same folder: the earlier adapter files go
    assert not (tmp_path / "plain" / "adapter_config.json").exists()
    torch.testing.assert_close(
        _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "plain"), "llama"), _logits(model, "llama")
    )


def test_positional_arguments_push_to_hub_and_a_callers_merged_state_dict(tmp_path):
    model = _trained("llama")
    want = _logits(model, "llama")
    model.save_pretrained(tmp_path / "rank1", False)  # is_main_process=False, positionally: no adapter files
    assert not (tmp_path / "rank1" / "adapter_config.json").exists()
    with pytest.raises(ValueError, match=r"push_to_hub=True.*call model.push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    lorafa.merge_lorafa(model)
    copied = {k: v.clone() for k, v in model.state_dict().items()}  # e.g. gathered under ZeRO-3: still merged
    model.save_pretrained(tmp_path / "out", state_dict=copied)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), "llama"), want)


def test_a_data_initialised_a_is_ready_after_load_state_dict(tmp_path):
    model = lorafa.add_lorafa(tiny("llama"), lorafa.LoRAFAConfig(r=4, init_lora_weights="gradient"))
    for _, layer in lorafa.lorafa_layers(model):
        layer.a_pending = False  # as init_a_from_gradients leaves it
    model.save_pretrained(tmp_path / "ckpt")
    from safetensors.torch import load_file

    other = lorafa.add_lorafa(tiny("llama"), lorafa.LoRAFAConfig(r=4, init_lora_weights="gradient"))
    other.load_state_dict(load_file(str(tmp_path / "ckpt" / "model.safetensors")), strict=False)  # Trainer's resume
    other.train()(**batch("llama")).loss.backward()  # no "A is not set yet"


def test_adding_adapters_to_a_model_transformers_gave_a_peft_adapter_is_a_clear_error(tmp_path):
    model = _trained("llama")
    model.save_pretrained(tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # base + PEFT adapter
    for targets in (None, "all-linear"):  # all-linear would otherwise adapt the PEFT layers' inner Linears
        with pytest.raises(ValueError, match="already has a PEFT adapter"):
            lorafa.add_lorafa(loaded, lorafa.LoRAFAConfig(r=4, target_modules=targets))


def test_an_adapted_model_is_freed_when_deleted():
    import weakref

    model = _trained("llama")
    ref = weakref.ref(model)
    del model  # no reference cycle through save_pretrained: freed at once, without the cycle collector
    assert ref() is None


def _trainer(model: torch.nn.Module, out, max_steps: int):
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": (ids := torch.randint(1, VOCAB, (12,), generator=g)), "labels": ids} for _ in range(16)
    ]
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", save_steps=2, report_to=[], use_cpu=True, seed=0, logging_steps=100,
        disable_tqdm=True,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=rows)


def test_trainer_save_model_and_checkpoint_resume(tmp_path):
    def fresh() -> torch.nn.Module:
        return lorafa.add_lorafa(tiny("llama").train(), lorafa.LoRAFAConfig(r=4, lora_dropout=0.1)).train()

    whole = fresh()
    _trainer(whole, tmp_path / "a", 4).train()
    stopped = fresh()
    # Writes checkpoint-2; with a constant lr its two steps are the uninterrupted run's first two.
    _trainer(stopped, tmp_path / "b", 2).train()
    resumed = fresh()
    _trainer(resumed, tmp_path / "b", 4).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for (_, a), (_, b) in zip(lorafa.lorafa_layers(whole), lorafa.lorafa_layers(resumed), strict=True):
        assert a.lora_B.weight.abs().sum() > 0
        torch.testing.assert_close(b.lora_B.weight, a.lora_B.weight)
    trainer = _trainer(whole, tmp_path / "a", 4)
    trainer.save_model(str(tmp_path / "final"))
    loaded = lorafa.load_adapter(tiny("llama"), tmp_path / "final")
    torch.testing.assert_close(_logits(loaded, "llama"), _logits(whole, "llama"), atol=0, rtol=0)


def test_a_class_with_its_own_load_adapter_gets_the_adapter_in_a_subfolder(tmp_path, caplog):
    # Wav2Vec2's load_adapter loads MMS language adapters: from_pretrained(folder) failed on PEFT files there.
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        vocab_size=12,
    )  # fmt: skip
    torch.manual_seed(0)
    model = lorafa.add_lorafa(Wav2Vec2ForCTC(config).eval(), lorafa.LoRAFAConfig(r=2, modules_to_save=["lm_head"]))
    for _, layer in lorafa.lorafa_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
        audio = torch.randn(2, 400)
        want = model(audio).logits
    with caplog.at_level("WARNING", logger="lorafa.hf_save"):
        model.save_pretrained(tmp_path / "out")
    assert "lorafa.load_adapter(model, " in caplog.text
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    base = Wav2Vec2ForCTC.from_pretrained(tmp_path / "out").eval()  # the base weights, unmerged
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out" / "adapter")
    ours = lorafa.load_adapter(base, tmp_path / "out" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(peft(audio).logits, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours(audio).logits, want, atol=0, rtol=0)
