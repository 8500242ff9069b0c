"""Tiny random-init transformers models of the families lorafa supports, built offline for tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96


def tiny(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random-init model of `family` in eval mode (hidden 32, 2 layers)."""
    torch.manual_seed(seed)
    decoder = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    encoder = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**decoder))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**decoder))
    elif family == "bert":
        model = BertForSequenceClassification(BertConfig(**encoder, max_position_embeddings=64, num_labels=3))
    elif family == "roberta":
        model = RobertaForSequenceClassification(
            RobertaConfig(**encoder, max_position_embeddings=72, num_labels=2)
        )
    elif family == "t5":
        cfg = T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
        model = T5ForConditionalGeneration(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    return model.eval()


def batch(family: str, seed: int = 0, n: int = 2, t: int = 12) -> dict[str, torch.Tensor]:
    """Inputs with a loss target for `family`'s model."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, t), generator=g)
    if family in ("bert", "roberta"):
        return {"input_ids": ids, "labels": torch.randint(0, 2, (n,), generator=g)}
    if family == "t5":
        return {"input_ids": ids, "labels": torch.randint(1, VOCAB, (n, t // 2), generator=g)}
    return {"input_ids": ids, "labels": ids}


FAMILIES = ["bert", "roberta", "t5", "llama", "qwen2", "gpt2"]
HEADS = {"bert": ["classifier"], "roberta": ["classifier"]}
