"""The grids of the accuracy study (`lorafa.study`): the documented grid of each part (`real_plan`) and its tiny
smoke version for tests (`smoke_plan`), with the data they train on (seeded train / dev / test JSONL splits) and
the random-init models they generate (a T5-small-shaped model; tiny BERT, LLaMA and T5 for smoke mode)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from lorafa.study import PartPlan, Runner, StudyConfig, _atomic_write

__all__ = [
    "T5_SMALL_SHAPE",
    "chatterbot_rows",
    "make_seq2seq_model",
    "make_smoke_model",
    "real_plan",
    "reversal_rows",
    "rotten_tomatoes_rows",
    "save_word_tokenizer",
    "smoke_plan",
    "write_splits",
]

# ------------------------------------------------------------------------------------------ the real grid


def real_plan(name: str, cfg: StudyConfig, work: Path, runner: Runner) -> PartPlan:
    """The documented grid of part `name`, its data files written under `work`."""
    work.mkdir(parents=True, exist_ok=True)
    seeds = list(range(cfg.seeds or 3))
    if name == "encoder":
        n_train = _scaled(1920, cfg.budget)
        files = write_splits(
            rotten_tomatoes_rows(), work, {"train": n_train, "dev": 250, "test": 800}, seed=0
        )
        return PartPlan(
            name="encoder",
            title="all-MiniLM-L6-v2 (22.7M parameters, BERT encoder) on Rotten Tomatoes sentiment",
            task="classification",
            model="asset:all-minilm-l6-v2",
            files=files,
            data={"text_column": "text", "label_column": "category", "label_names": ["rotten", "fresh"],
                  "max_length": 48},
            train={"batch_size": 16, "epochs": 1, "warmup_ratio": 0.06, "schedule": "linear",
                   "eval_before": False, "eval_every": 0, "logging_every": 10, "eval_batch_size": 64},
            adapter={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "modules_to_save": ["classifier", "pooler"]},
            grid={"full": [1e-4, 3e-4], "lora": [5e-4, 1e-3, 2e-3, 5e-3], "lora-fa": [1e-3, 2e-3, 5e-3],
                  "lora-fa+grad": [1e-3, 2e-3, 5e-3], "lora-fa-2r": [1e-3, 2e-3, 5e-3],
                  "lora-fa-2r+grad": [5e-4, 1e-3, 2e-3, 5e-3], "lora-fa+inputs": [1e-3, 2e-3, 5e-3]},
            inherit={"lora-fa+proj": "lora-fa", "lora-half": "lora", "lora-fa+shared": "lora-fa",
                     "lora-fa+orth": "lora-fa"},
            seeds=seeds,
            notes=[
                "Rows with category `plot` (plot summaries, not critic snippets) are dropped; the classes are "
                "`rotten` and `fresh` (about 42 % / 58 %; always answering `fresh` scores about 58 %).",
                "The adapter methods train BERT's whole classification head (`pooler` + `classifier`, "
                "modules_to_save), as RoBERTa's head (dense + out_proj) trains in the paper's GLUE runs.",
                "One pass over 1,920 reviews in batches of 16 (120 steps). A first version of this grid (640 "
                "reviews, batches of 8, 80 steps) left LoRA-FA 1.75 points below LoRA; its learning rates "
                "(LoRA 1e-3…1e-2, LoRA-FA 1e-3…1e-2, full 3e-4) set this grid's: LoRA and LoRA-FA collapsed to "
                "the majority class at ≥ 5e-3 (LoRA) and 1e-2 (LoRA-FA) there, and LoRA's best was its smallest "
                "lr, so 5e-4 is added. After the first launch of this grid LoRA was best at its top lr (2e-3) on "
                "dev, so 5e-3 was added; and, LoRA-FA trailing, three LoRA-FA variants at its dev-chosen lr were "
                "added to see what the gap depends on: orthogonal A, twice the rank (r=16, lora_alpha=32: about "
                "LoRA's number of trainable parameters) and share_a.",
                "lora-fa+grad (added in a later session, with its own sweep over LoRA-FA's lrs): A from the top-r "
                "right singular vectors of the base weights' gradient on the first 8 training batches "
                "(`init_lora_weights: gradient`, `lorafa.gradient_init`); still LoRA-FA (A frozen, only B trains, "
                "same memory), but not the paper's random A.",
                "lora-fa-2r (a variant at LoRA-FA's lr until a later session, which gave it, and lora-fa-2r+grad, a "
                "sweep over LoRA-FA's lrs in both parts; lora-fa-2r+grad was best at 1e-3, the bottom, so 5e-4 was "
                "added): the paper's LoRA-FA with a random A at r=16, lora_alpha=32, "
                "about LoRA's number of trainable parameters and AdamW state, still keeping 16 numbers per token and "
                "adapted layer for backward (LoRA keeps the layer's whole input, 384 or 1536 numbers here). The same "
                "session added lora-fa+inputs (A from the principal directions of each layer's inputs on the first "
                "8 training batches, EVA-like, scaled like the gradient A) with LoRA-FA's lrs.",
            ],
        )  # fmt: skip
    if name == "decoder":
        n_train = _scaled(240, cfg.budget)
        files = write_splits(chatterbot_rows(), work, {"train": n_train, "dev": 40, "test": 40}, seed=0)
        return PartPlan(
            name="decoder",
            title="SmolLM2-135M-Instruct (LLaMA architecture) instruction-tuned on chatterbot prompt→response pairs",
            task="sft",
            model="asset:smollm2-135m-instruct",
            files=files,
            data={"prompt_column": "prompt", "response_column": "response", "max_length": 128},
            train={"batch_size": 2, "epochs": 1, "warmup_ratio": 0.06, "schedule": "linear",
                   "eval_before": True, "eval_every": 30, "logging_every": 5, "eval_batch_size": 8},
            adapter={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            grid={"lora": [1e-3, 2e-3, 5e-3], "lora-fa": [1e-3, 2e-3, 5e-3, 1e-2], "full": [3e-5],
                  "lora-fa+grad": [1e-3, 2e-3, 5e-3], "lora-fa-2r": [5e-4, 1e-3, 2e-3, 5e-3],
                  "lora-fa-2r+grad": [5e-4, 1e-3, 2e-3, 5e-3], "lora-fa+inputs": [1e-3, 2e-3, 5e-3]},
            inherit={"lora-fa+proj": "lora-fa"},
            seeds=[0],
            notes=[
                "One seed (the machine's budget: a 135M model steps at ~2 s per 2 examples on a 2-core CPU); "
                "LoRA and LoRA-FA sweep learning rates chosen on a dev split of 40 pairs, full FT keeps 3e-5. A "
                "first version (120 pairs, 60 steps, LoRA 5e-4 and LoRA-FA 1e-3 fixed) gave LoRA-FA 1.039× "
                "LoRA's loss with the gap opening late, so version 2 trained twice as long and swept. Its first "
                "launch swept LoRA 5e-4, 1e-3 and LoRA-FA 1e-3, 2e-3, 5e-3; both were best at the top of their "
                "range on dev, so LoRA 2e-3 and LoRA-FA 1e-2 were added, and then (LoRA best at 2e-3) LoRA 5e-3 and LoRA-FA "
                "2e-2, so that each sweep brackets its best lr.",
                "The tokenizer's chat template formats each pair (SmolLM2 adds its default system prompt); the "
                "prompt tokens are masked out of the loss. Eval loss is per response token on held-out pairs.",
                "Version 3 (this one) keeps one pair per prompt before splitting (`chatterbot_rows`): the corpus "
                "repeats about half of its pairs, and version 2's random split had 21 of its 40 dev and 23 of its 40 "
                "test pairs verbatim in training, so its eval losses (LoRA 1.128, LoRA-FA 1.161) measured recall of "
                "seen pairs. None of its numbers carry over. For the session's time, version 3 sweeps the three lrs "
                "around each method's version-2 choice (LoRA 1e-3…5e-3, LoRA-FA 2e-3…1e-2; LoRA-FA was best at 2e-3, "
                "the bottom, on dev, so 1e-3 was added) and drops the share_a variant.",
                "lora-fa+grad (added in a later session): A from the top-r right singular vectors of the base "
                "weights' gradient on the first 8 training batches, each row scaled so that u = A·x has the random "
                "init's RMS (`init_lora_weights: gradient`). Before it joined the grid, single-seed dev runs outside "
                "the study (runs/gi) chose that scaling: without it (rows of norm 1/√3) u was ~10× larger, training "
                "was unstable at ≥ 1e-3 and the best dev loss was 2.0193 at 5e-4; with it, 2.0109 at 2e-3.",
                "lora-fa-2r and lora-fa-2r+grad (added in a later session, each with a sweep over LoRA-FA's lower "
                "three lrs; both were best at 1e-3, the bottom, so 5e-4 was added): LoRA-FA at r=16, "
                "lora_alpha=32 (about LoRA's number of trainable parameters) with the "
                "paper's random A or the gradient A; 16 numbers per token and adapted layer kept for backward "
                "against LoRA's 576 or 1536. lora-fa+inputs (same session): A from the principal directions of "
                "each layer's inputs on the first 8 training batches (EVA-like), LoRA-FA's lower three lrs.",
            ],
        )  # fmt: skip
    if name == "seq2seq":
        model_dir = work / "t5-small-random"
        vocab = [chr(c) for c in range(ord("a"), ord("a") + 16)]
        runner.call(make_seq2seq_model, str(model_dir), vocab, T5_SMALL_SHAPE)
        n_train = _scaled(960, cfg.budget)
        files = write_splits(
            reversal_rows(n_train + 200, vocab, seed=0), work, {"train": n_train, "test": 200}, seed=0
        )
        return PartPlan(
            name="seq2seq",
            title="random-init T5-small shape (6+6 layers, d_model 512) reversing sequences of 3–6 letters",
            task="seq2seq",
            model=str(model_dir),
            files=files,
            data={"source_column": "source", "target_column": "target", "max_length": 16},
            train={"batch_size": 16, "epochs": 1, "warmup_ratio": 0.06, "schedule": "linear",
                   "eval_before": True, "eval_every": 20, "logging_every": 5, "exact_match_samples": 64},
            adapter={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            grid={"full": [1e-3], "lora": [3e-3], "lora-fa": [3e-3]},  # one seed, fixed lrs, not tuned
            seeds=[0],
            notes=[
                "No pretrained T5 can be installed offline, so the model is randomly initialised: adapters here "
                "train on top of random frozen weights, which is not what LoRA is for.",
                "It shows that LoRA-FA (and LoRA, full FT) train end to end on an encoder–decoder through "
                "`lorafa train` (cross-attention included) and how the losses move on the same budget; it does "
                "not show how LoRA-FA compares with LoRA when fine-tuning a pretrained T5.",
            ],
        )  # fmt: skip
    raise ValueError(f"unknown part {name!r}")


T5_SMALL_SHAPE = {
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_decoder_layers": 6,
    "num_heads": 8,
}
"""T5-small's layout (t5-small config), with the synthetic task's tiny vocabulary."""


def _scaled(n: int, budget: float) -> int:
    return max(8, round(n * budget))


def rotten_tomatoes_rows() -> list[dict[str, str]]:
    """Critic snippets of the offline Rotten Tomatoes corpus with a fresh/rotten label (plot summaries dropped)."""
    from lorafa.data_files import load_table

    table = load_table("asset:rotten-tomatoes")
    return [
        {"text": t, "category": c}
        for t, c in zip(table["text"], table["category"], strict=True)
        if isinstance(t, str) and t.strip() and c in ("fresh", "rotten")
    ]


def chatterbot_rows() -> list[dict[str, str]]:
    """The chatterbot corpus's prompt→response pairs (the `asset:chatterbot` JSONL), one per prompt.

    The corpus repeats about half of its 2,306 pairs across categories (1,015 distinct prompts): without this, a
    random split puts many dev/test prompts in the training set too (version 2 of the study's decoder grid had 21 of
    its 40 dev and 23 of its 40 test pairs verbatim in training). The first pair of each prompt is kept.
    """
    from lorafa.assets import resolve

    with open(resolve("asset:chatterbot"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            unique.append(row)
    return unique


def reversal_rows(
    n: int, vocab: list[str], seed: int, lengths: tuple[int, int] = (3, 6)
) -> list[dict[str, str]]:
    """`n` examples "a c b" → "b c a" of random sequences over `vocab` (length drawn in `lengths`, inclusive)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        seq = [rng.choice(vocab) for _ in range(rng.randint(*lengths))]
        rows.append({"source": " ".join(seq), "target": " ".join(reversed(seq))})
    return rows


def write_splits(
    rows: list[dict[str, Any]], folder: Path, sizes: dict[str, int], seed: int
) -> dict[str, str]:
    """Shuffle `rows` (seeded) and write disjoint JSONL splits of the given sizes; returns split → path."""
    if sum(sizes.values()) > len(rows):
        raise ValueError(f"the splits {sizes} need {sum(sizes.values())} rows; the data has {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    folder.mkdir(parents=True, exist_ok=True)
    paths, start = {}, 0
    for split, n in sizes.items():
        path = folder / f"{split}.jsonl"
        text = "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in order[start : start + n])
        _atomic_write(path, text.encode())
        paths[split], start = str(path), start + n
    return paths


# ------------------------------------------------------------------------------ generated models (smoke, T5)

_SPECIAL = ["[PAD]", "</s>", "[UNK]", "[CLS]", "[SEP]"]


def save_word_tokenizer(folder: Path, words: list[str], append_eos: bool) -> Any:
    """A whitespace word-level tokenizer over `words` (ids: [PAD]=0, </s>=1, [UNK]=2, [CLS], [SEP], words...).

    `append_eos` ends every encoding with </s>, as T5's tokenizer does (a seq2seq target must teach the model to
    stop).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", eos_token="</s>", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]",
    )  # fmt: skip
    hf.save_pretrained(folder)
    return hf


def make_seq2seq_model(folder: str, words: list[str], shape: dict[str, int], seed: int = 0) -> str:
    """Write a random-init T5 of `shape` with a word-level tokenizer over `words` to `folder` (kept if present)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    out = Path(folder)
    if (out / "config.json").is_file():
        return folder
    tmp = out.with_name(f".tmp-{out.name}")
    save_word_tokenizer(tmp, words, append_eos=True)
    torch.manual_seed(seed)
    settings: dict[str, Any] = {
        "vocab_size": len(_SPECIAL) + len(words), "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0, "dropout_rate": 0.0, **shape,
    }  # fmt: skip
    config = T5Config(**settings)
    T5ForConditionalGeneration(config).save_pretrained(tmp)
    tmp.rename(out)
    return folder


def make_smoke_model(folder: str, family: str, words: list[str], seed: int = 0) -> str:
    """A tiny random-init `family` model (bert backbone, llama, t5) with a word-level tokenizer, in `folder`."""
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    out = Path(folder)
    if (out / "config.json").is_file():
        return folder
    if family == "t5":
        return make_seq2seq_model(folder, words, {"d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2,
                                                  "num_decoder_layers": 2, "num_heads": 4}, seed)  # fmt: skip
    tmp = out.with_name(f".tmp-{out.name}")
    save_word_tokenizer(tmp, words, append_eos=False)
    torch.manual_seed(seed)
    vocab = len(_SPECIAL) + len(words)
    small: dict[str, Any] = {"vocab_size": vocab, "pad_token_id": 0, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
             "max_position_embeddings": 64}  # fmt: skip
    model: Any
    if family == "bert":
        model = BertModel(BertConfig(**small))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(eos_token_id=1, bos_token_id=1, num_key_value_heads=2, **small))  # fmt: skip
    else:
        raise ValueError(f"family must be bert, llama or t5, got {family!r}")
    model.save_pretrained(tmp)
    tmp.rename(out)
    return folder


_SMOKE_WORDS = ["good", "bad", "red", "blue", "cat", "dog", "big", "small", "sun", "moon"]


def smoke_plan(name: str, cfg: StudyConfig, work: Path, runner: Runner) -> PartPlan:
    """A tiny version of part `name` (random-init models, generated data, a few steps) with the same structure."""
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    common = {"batch_size": 8, "epochs": 1, "eval_before": False, "logging_every": 1, "eval_batch_size": 16}
    adapter = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    if name == "encoder":
        model = runner.call(make_smoke_model, str(work / "bert"), "bert", _SMOKE_WORDS)[0]
        rows = []
        for _ in range(120):
            words = [rng.choice(_SMOKE_WORDS[2:]) for _ in range(4)] + [rng.choice(["good", "bad"])]
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "category": "fresh" if "good" in words else "rotten"})
        files = write_splits(rows, work, {"train": _scaled(32, cfg.budget), "dev": 16, "test": 24}, seed=0)
        return PartPlan(
            "encoder", "tiny random-init BERT on generated sentences", "classification", model, files,
            {"text_column": "text", "label_column": "category", "label_names": ["rotten", "fresh"], "max_length": 12},
            {**common, "eval_every": 2}, adapter,
            {"full": [1e-3], "lora": [1e-2], "lora-fa": [1e-2, 2e-2]},
            list(range(cfg.seeds or 2)), ["Smoke mode: the numbers mean nothing."],
            {"lora-fa+proj": "lora-fa", "lora-half": "lora", "lora-fa+shared": "lora-fa"},
        )  # fmt: skip
    if name == "decoder":
        model = runner.call(make_smoke_model, str(work / "llama"), "llama", _SMOKE_WORDS)[0]
        rows = [{"prompt": w, "response": _SMOKE_WORDS[(i + 1) % len(_SMOKE_WORDS)]}
                for i, w in enumerate(_SMOKE_WORDS)] * 6  # fmt: skip
        files = write_splits(rows, work, {"train": _scaled(32, cfg.budget), "test": 16}, seed=0)
        return PartPlan(
            "decoder", "tiny random-init LLaMA on generated word pairs", "sft", model, files,
            {"prompt_column": "prompt", "response_column": "response", "max_length": 16, "use_chat_template": False},
            {**common, "eval_every": 2, "eval_before": True}, adapter,
            {"lora": [1e-2], "lora-fa": [1e-2], "full": [1e-3]}, [0],
            ["Smoke mode: the numbers mean nothing."],
        )  # fmt: skip
    if name == "seq2seq":
        vocab = _SMOKE_WORDS
        model = runner.call(make_smoke_model, str(work / "t5"), "t5", vocab)[0]
        files = write_splits(
            reversal_rows(64, vocab, seed=0), work, {"train": _scaled(32, cfg.budget), "test": 16}, 0
        )
        return PartPlan(
            "seq2seq", "tiny random-init T5 reversing word sequences", "seq2seq", model, files,
            {"source_column": "source", "target_column": "target", "max_length": 12},
            {**common, "eval_every": 2, "exact_match_samples": 8}, adapter,
            {"lora": [1e-2], "lora-fa": [1e-2]}, [0], ["Smoke mode: the numbers mean nothing."],
        )  # fmt: skip
    raise ValueError(f"unknown part {name!r}")
