"""Tiny random-init models with word-level tokenizers saved to disk, and small learnable data files, for training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ["good", "bad", "red", "blue", "cat", "dog", "big", "small", "one", "two", "sun", "moon"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>", "<s>", "user", "assistant", ":", "ok", "done"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def save_tokenizer(folder: Path, chat: bool = False) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        eos_token="</s>", bos_token="<s>",
    )  # fmt: skip
    if chat:
        hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(folder)


VOCAB = len(SPECIAL) + len(WORDS)


def save_model(folder: Path, family: str, dropout: float = 0.0, seed: int = 0) -> Path:
    """A tiny random-init `family` model + tokenizer in `folder` (bert, llama, gpt2, t5)."""
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(seed)
    if family == "bert":
        cfg = BertConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            pad_token_id=0,
        )  # fmt: skip
        model = BertModel(cfg)  # a backbone without a head, like a pretrained encoder
    elif family == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=5, eos_token_id=4, pad_token_id=0,
        )  # fmt: skip
        model = LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=5, eos_token_id=4,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        )  # fmt: skip
        model = GPT2LMHeadModel(cfg)
    elif family == "t5":
        cfg = T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=4, dropout_rate=dropout,
        )  # fmt: skip
        model = T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(family)
    model.save_pretrained(folder)
    save_tokenizer(folder, chat=family == "llama")
    return folder


def _sentence(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(WORDS[2:]) for _ in range(n)]


def write_data(folder: Path, task: str, n: int = 64, seed: int = 0, fmt: str = "csv") -> Path:
    """A learnable toy data file for `task`.

    classification: label "pos" iff the text contains "good" ("neg" if it contains "bad").
    regression: label = number of "good" words. sft: response "ok done" after any prompt.
    seq2seq: target = source. clm: a repeated word pattern.
    """
    rng = random.Random(seed)
    records: list[dict[str, object]] = []
    for i in range(n):
        words = _sentence(rng, rng.randint(3, 8))
        if task == "classification":
            key = "good" if i % 2 == 0 else "bad"
            words.insert(rng.randrange(len(words) + 1), key)
            records.append({"text": " ".join(words), "label": "pos" if key == "good" else "neg"})
        elif task == "regression":
            k = i % 3
            for _ in range(k):
                words.insert(rng.randrange(len(words) + 1), "good")
            records.append({"text": " ".join(words), "score": float(k)})
        elif task == "sft":
            records.append({"prompt": " ".join(words), "response": "ok done"})
        elif task == "seq2seq":
            records.append({"source": " ".join(words[:4]), "target": " ".join(words[:4])})
        elif task == "clm":
            records.append({"text": " ".join(["cat dog sun moon"] * 6)})
        else:
            raise ValueError(task)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path = folder / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path
    import csv

    path = folder / f"{task}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


FAMILY_OF_TASK = {
    "classification": "bert",
    "regression": "bert",
    "sft": "llama",
    "seq2seq": "t5",
    "clm": "gpt2",
}
COLUMNS = {"regression": ["data.label_column=score"]}


_BUILT: dict[str, Path] = {}


def toy_root(tmp_path_factory) -> Path:  # noqa: ANN001 (a pytest fixture object)
    """Build the toy models and data once per test session (shared by test_train.py and test_cli.py)."""
    if "root" not in _BUILT:
        root = tmp_path_factory.mktemp("toys")
        for family in ("bert", "llama", "gpt2", "t5"):
            save_model(root / family, family)
        save_model(root / "bert-dropout", "bert", dropout=0.1)
        for task in FAMILY_OF_TASK:
            write_data(root / "data", task)
        _BUILT["root"] = root
    return _BUILT["root"]


def run_args(root: Path, task: str, out: Path, *extra: str) -> list[str]:
    """`lorafa train` arguments for a short run of `task` on its toy model and data."""
    family = FAMILY_OF_TASK[task]
    return [
        "train",
        f"model={root / family}",
        f"task={task}",
        f"data.train_file={root / 'data' / f'{task}.csv'}",
        f"output_dir={out}",
        "data.max_length=32",
        "data.block_size=16",
        "batch_size=8",
        "max_steps=4",
        "lr=1e-2",
        "adapter.r=4",
        "progress_bar=false",
        "logging_every=2",
        *COLUMNS.get(task, []),
        *extra,
    ]
