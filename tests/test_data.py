"""Tests of lorafa.data: local files → tokenized datasets per task, every bad-data error, and the collator.

The tokenizers are built here from a word-level vocabulary, so every expected token sequence is computed in the
test by looking words up in that vocabulary, independently of the code under test.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafa.data import IGNORE_INDEX, DataConfig, build_datasets, make_collator
from lorafa.data_files import load_table, parse_hub_id
from lorafa.sft import _in_span

WORDS = [
    "user",
    "assistant",
    "good",
    "bad",
    "fine",
    "great",
    "awful",
    "movie",
    "plot",
    "was",
    "is",
    "the",
    "a",
    "an",
    "film",
    "really",
    "not",
    "very",
    "system",
]
SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>"]
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
PAD, BOS, EOS = VOCAB["[PAD]"], VOCAB["<s>"], VOCAB["</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def ids(text: str) -> list[int]:
    """Reference tokenization: one id per whitespace-separated word."""
    return [VOCAB[w] for w in text.split()]


def make_tokenizer(bert_like: bool, pad: bool = True, eos: bool = True):
    """A word-level fast tokenizer; `bert_like` wraps sequences as <s> A </s> (B </s>) with token_type_ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {}
    if bert_like:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1", special_tokens=[("<s>", BOS), ("</s>", EOS)]
        )
        kwargs["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        bos_token="<s>",
        pad_token="[PAD]" if pad else None,
        eos_token="</s>" if eos else None,
        **kwargs,
    )


@pytest.fixture(scope="module")
def bert_tok():
    return make_tokenizer(bert_like=True)


@pytest.fixture(scope="module")
def gpt_tok():
    return make_tokenizer(bert_like=False)


def cfg(tmp_path: Path, train_file: Path | str, **kw) -> DataConfig:
    kw.setdefault("eval_split", 0.0)
    return DataConfig(train_file=str(train_file), cache_dir=str(tmp_path / "hf-cache"), **kw)


SENTIMENT = pd.DataFrame(
    {
        "text": ["good movie", "bad plot", "great film", "awful movie", "the film was fine", "not very good"],
        "label": ["pos", "neg", "pos", "neg", "pos", "neg"],
    }
)


def write(df: pd.DataFrame, path: Path) -> Path:
    name = path.name
    if ".csv" in name or ".tsv" in name:
        df.to_csv(path, index=False, sep="\t" if ".tsv" in name else ",")
    elif ".jsonl" in name:
        df.to_json(path, orient="records", lines=True)
    elif ".json" in name:
        df.to_json(path, orient="records")
    elif name.endswith(".parquet"):
        df.to_parquet(path)
    else:
        raise AssertionError(name)
    return path


# ------------------------------------------------------------------------------------------------ classification


def test_classification_string_labels(tmp_path, bert_tok):
    train = write(SENTIMENT, tmp_path / "train.csv")
    evals = write(SENTIMENT.iloc[:2], tmp_path / "eval.jsonl")
    data = build_datasets(cfg(tmp_path, train, eval_file=str(evals)), bert_tok, "classification")
    assert data.label_names == ["neg", "pos"] and data.num_labels == 2
    assert data.id2label == {0: "neg", 1: "pos"}
    assert data.train.column_names == ["input_ids", "token_type_ids", "attention_mask", "labels"]
    for row, example in zip(SENTIMENT.itertuples(), data.train, strict=True):
        assert example["input_ids"] == [BOS, *ids(row.text), EOS]
        assert example["labels"] == data.label_names.index(row.label)
    assert data.eval["labels"] == [1, 0]


def test_sentence_pairs_and_truncation(tmp_path, bert_tok):
    df = pd.DataFrame({"a": ["good movie", "the plot was bad"], "b": ["great film", "awful"], "y": [1, 0]})
    data = build_datasets(
        cfg(tmp_path, write(df, tmp_path / "p.csv"), text_column="a", text_pair_column="b", label_column="y"),
        bert_tok,
        "classification",
    )
    first = data.train[0]
    assert first["input_ids"] == [BOS, *ids("good movie"), EOS, *ids("great film"), EOS]
    assert first["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    short = build_datasets(
        cfg(
            tmp_path,
            tmp_path / "p.csv",
            text_column="a",
            text_pair_column="b",
            label_column="y",
            max_length=5,
        ),
        bert_tok,
        "classification",
    )
    assert max(len(x) for x in short.train["input_ids"]) == 5


def test_integer_labels_keep_their_ids(tmp_path, bert_tok):
    # Integers sort numerically (10 after 2) and 1.0 / "1" / 1 are the same class.
    df = pd.DataFrame({"text": ["good", "bad", "fine", "great"], "label": [2, 0, 10, 1]})
    data = build_datasets(cfg(tmp_path, write(df, tmp_path / "t.csv")), bert_tok, "classification")
    assert data.label_names == ["0", "1", "2", "10"]
    assert data.train["labels"] == [2, 0, 3, 1]
    evals = pd.DataFrame({"text": ["good"], "label": ["1"]})
    data = build_datasets(
        cfg(tmp_path, tmp_path / "t.csv", eval_file=str(write(evals, tmp_path / "e.json"))),
        bert_tok,
        "classification",
    )
    assert data.eval["labels"] == [1]


def test_label_names_fix_order_and_drop_other_rows(tmp_path, bert_tok):
    # Like Rotten Tomatoes: "plot" rows (one with no text) are not reviews and are dropped by label_names.
    df = pd.DataFrame(
        {"text": ["good", None, "bad", "the plot"], "category": ["fresh", "plot", "rotten", "plot"]}
    )
    data = build_datasets(
        cfg(
            tmp_path, write(df, tmp_path / "rt.csv"), label_column="category", label_names=["rotten", "fresh"]
        ),
        bert_tok,
        "classification",
    )
    assert data.label_names == ["rotten", "fresh"]
    assert data.train["labels"] == [1, 0]
    assert data.train["input_ids"] == [[BOS, *ids("good"), EOS], [BOS, *ids("bad"), EOS]]


def test_user_column_named_labels(tmp_path, bert_tok):
    # A user column called "labels" must not leak its string type into our integer labels.
    df = SENTIMENT.rename(columns={"label": "labels"})
    data = build_datasets(
        cfg(tmp_path, write(df, tmp_path / "t.csv"), label_column="labels"), bert_tok, "classification"
    )
    assert data.train["labels"] == [1, 0, 1, 0, 1, 0]


def test_regression_float_labels(tmp_path, bert_tok):
    df = pd.DataFrame(
        {"s1": ["good", "bad", "fine"], "s2": ["great", "awful", "fine"], "score": [4.5, 0.25, 5]}
    )
    data = build_datasets(
        cfg(
            tmp_path,
            write(df, tmp_path / "sts.parquet"),
            text_column="s1",
            text_pair_column="s2",
            label_column="score",
        ),
        bert_tok,
        "regression",
    )
    assert data.num_labels == 1 and data.label_names is None
    assert data.train["labels"] == [4.5, 0.25, 5.0]
    batch = make_collator("regression", bert_tok)([data.train[i] for i in range(3)])
    assert batch["labels"].dtype == torch.float32
    assert torch.equal(batch["labels"], torch.tensor([4.5, 0.25, 5.0]))


# --------------------------------------------------------------------------------------------- formats and splits


@pytest.mark.parametrize(
    "name",
    [
        "d.csv",
        "d.tsv",
        "d.csv.gz",
        "d.csv.bz2",
        "d.json",
        "d.jsonl",
        "d.jsonl.gz",
        "d.parquet",
        "disk",
        "dict",
    ],
)
def test_every_format_reads_the_same(tmp_path, bert_tok, name):
    import datasets

    path = tmp_path / name
    if name == "disk":
        datasets.Dataset.from_pandas(SENTIMENT).save_to_disk(str(path))
    elif name == "dict":
        ds = datasets.Dataset.from_pandas(SENTIMENT)
        datasets.DatasetDict({"train": ds, "validation": ds.select([0, 1])}).save_to_disk(str(path))
    else:
        write(SENTIMENT, path)
    data = build_datasets(cfg(tmp_path, path), bert_tok, "classification")
    assert data.train["input_ids"] == [[BOS, *ids(t), EOS] for t in SENTIMENT.text]
    assert data.train["labels"] == [1, 0, 1, 0, 1, 0]


def test_dataset_dict_folder_splits_and_class_label(tmp_path, bert_tok):
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    train = datasets.Dataset.from_dict(
        {"text": ["good", "bad", "great"], "label": [1, 0, 1]}, features=features
    )
    valid = datasets.Dataset.from_dict({"text": ["awful"], "label": [0]}, features=features)
    datasets.DatasetDict({"train": train, "validation": valid}).save_to_disk(str(tmp_path / "glue"))
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "glue").rglob("*"))
    data = build_datasets(
        cfg(tmp_path, tmp_path / "glue", eval_file=str(tmp_path / "glue")), bert_tok, "classification"
    )
    assert data.label_names == ["neg", "pos"]  # names come from the ClassLabel feature, not its integers
    assert data.train["labels"] == [1, 0, 1] and data.eval["labels"] == [0]
    assert data.eval["input_ids"] == [[BOS, *ids("awful"), EOS]]
    # Processing stays in memory: no cache files appear next to the user's data.
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "glue").rglob("*")) == before


@pytest.mark.parametrize("save", ["save_to_disk", "parquet"])
def test_class_label_keeps_the_datasets_order_and_drops_unlabelled_rows(tmp_path, bert_tok, save, caplog):
    import datasets

    # CoLA's order (not alphabetical) and its test split's -1 ("no label").
    names = ["unacceptable", "acceptable"]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    rows = {"text": ["good", "bad", "great", "awful", "fine"], "label": [1, 0, 1, -1, 0]}
    table = datasets.Dataset.from_dict(rows, features=features)
    if save == "parquet":
        path = tmp_path / "cola.parquet"
        table.to_parquet(str(path))
    else:
        path = tmp_path / "cola"
        datasets.DatasetDict({"train": table}).save_to_disk(str(path))
    data = build_datasets(cfg(tmp_path, path), bert_tok, "classification")
    assert data.label_names == names  # id i is the dataset's id i
    assert data.train["labels"] == [1, 0, 1, 0]  # the -1 row dropped
    assert "1 rows are labelled -1" in caplog.text


# ---------------------------------------------------------------------------------- data folders, Hub datasets


def write_folder(folder: Path, files: dict[str, pd.DataFrame]) -> Path:
    for name, df in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        write(df, folder / name)
    return folder


FOLDER_LAYOUTS = {
    "csv": {"train.csv": SENTIMENT, "test.csv": SENTIMENT.iloc[:2]},
    "parquet-shards": {
        "data/train-00000-of-00002.parquet": SENTIMENT.iloc[:3],
        "data/train-00001-of-00002.parquet": SENTIMENT.iloc[3:],
        "data/validation-00000-of-00001.parquet": SENTIMENT.iloc[:2],
    },
}


@pytest.mark.parametrize("layout", list(FOLDER_LAYOUTS))
def test_folder_of_data_files_splits_by_field(tmp_path, bert_tok, layout):
    folder = write_folder(tmp_path / "my_data", FOLDER_LAYOUTS[layout])
    before = sorted(p.relative_to(tmp_path) for p in folder.rglob("*"))
    train = load_table(str(folder), "train_file", cache_dir=str(tmp_path / "hf-cache"))
    evals = load_table(str(folder), "eval_file", cache_dir=str(tmp_path / "hf-cache"))
    assert train["text"] == list(SENTIMENT.text) and evals["text"] == list(SENTIMENT.text[:2])

    # End to end: the same folder as train_file and eval_file of a classification run.
    data = build_datasets(cfg(tmp_path, folder, eval_file=str(folder)), bert_tok, "classification")
    assert data.label_names == ["neg", "pos"]
    assert data.train["input_ids"] == [[BOS, *ids(t), EOS] for t in SENTIMENT.text]
    assert data.train["labels"] == [1, 0, 1, 0, 1, 0] and data.eval["labels"] == [1, 0]
    # datasets' Arrow copies go to cache_dir, never next to the user's files.
    assert sorted(p.relative_to(tmp_path) for p in folder.rglob("*")) == before


def test_a_folder_validation_split_is_the_eval_data_without_eval_file(tmp_path, bert_tok):
    layout = FOLDER_LAYOUTS["parquet-shards"]  # train + validation
    folder = write_folder(tmp_path / "my_data", layout)
    data = build_datasets(cfg(tmp_path, folder, eval_split=0.5), bert_tok, "classification")
    assert len(data.train) == len(SENTIMENT) and data.eval["labels"] == [1, 0]  # validation, nothing held out
    # train + test only: the test split is never taken for it; eval_split holds out part of train
    folder = write_folder(tmp_path / "csv_data", FOLDER_LAYOUTS["csv"])
    data = build_datasets(cfg(tmp_path, folder, eval_split=0.5), bert_tok, "classification")
    assert len(data.train) == 3 and len(data.eval) == 3
    assert (
        build_datasets(cfg(tmp_path, folder), bert_tok, "classification").eval is None
    )  # eval_split 0: none


def test_folder_with_one_file_serves_both_fields(tmp_path):
    folder = write_folder(tmp_path / "reviews", {"reviews.jsonl": SENTIMENT})
    for field in ("train_file", "eval_file"):
        table = load_table(str(folder), field, cache_dir=str(tmp_path / "hf-cache"))
        assert table["text"] == list(SENTIMENT.text)


def test_folder_without_the_split_a_field_means(tmp_path):
    folder = write_folder(tmp_path / "d", {"dev.csv": SENTIMENT, "test.csv": SENTIMENT})
    with pytest.raises(ValueError, match=r"train_file: .* has splits \['validation', 'test'\]"):
        load_table(str(folder), "train_file", cache_dir=str(tmp_path / "hf-cache"))
    # dev.csv is datasets' validation split, which eval_file prefers to test.
    assert len(load_table(str(folder), "eval_file", cache_dir=str(tmp_path / "hf-cache"))) == len(SENTIMENT)


# Cells that pandas' defaults would change: a TSV's stray quote joins lines, "00501" and "1e3" become numbers,
# "NA" and "null" become missing.
TRICKY_TSV = 'text\tlabel\n"Yes."\t1\n"Well, maybe\t0\nfine movie\t1\n00501\t0\n1e3\t1\nNA\t0\nnull\t1\n'


@pytest.mark.parametrize("name", ["train.tsv", "train.csv", "train.txt"])
def test_a_folder_reads_each_file_as_the_file_alone_is_read(tmp_path, name):
    text = TRICKY_TSV if name.endswith(".tsv") else TRICKY_TSV.replace("\t", ",").replace('"Well,', "Well")
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / name).write_text(text)
    (folder / f"test{Path(name).suffix}").write_text(text)
    cache = str(tmp_path / "hf-cache")
    alone = load_table(str(folder / name), cache_dir=cache)
    for field, table in [("train_file", load_table(str(folder), cache_dir=cache)),
                         ("eval_file", load_table(str(folder), "eval_file", cache_dir=cache))]:  # fmt: skip
        assert table.to_list() == alone.to_list(), field


def test_a_folder_says_which_files_make_each_split(tmp_path, caplog):
    cache = str(tmp_path / "hf-cache")
    folder = write_folder(tmp_path / "d", {"train.csv": SENTIMENT.iloc[:2], "holdout.csv": SENTIMENT.iloc[2:]})
    (folder / "train.csv.bak").write_text((folder / "train.csv").read_text() + "bad plot,neg\n")
    with caplog.at_level("INFO", logger="lorafa.data_files"):
        table = load_table(str(folder), cache_dir=cache)
    assert table["text"] == list(SENTIMENT.text[:2])  # the backup is no data file
    assert re.search(r"split 'train' of .* is \['train.csv'\]", caplog.text)
    assert re.search(r"left out \['train.csv.bak'\]", caplog.text)
    assert re.search(r"\['holdout.csv'\] belong to no split", caplog.text)
    # Files that all fall into one split are read as one, with a warning naming them.
    caplog.clear()
    folder = write_folder(tmp_path / "e", {"train.csv": SENTIMENT.iloc[:2], "old/train.csv": SENTIMENT.iloc[2:]})
    assert sorted(load_table(str(folder), cache_dir=cache)["text"]) == sorted(SENTIMENT.text)
    assert re.search(r"split 'train' of .* is made of 2 files", caplog.text)
    # ... but a split's shards (train-00000-of-00002.parquet, ...) are no surprise.
    caplog.clear()
    load_table(str(write_folder(tmp_path / "f", FOLDER_LAYOUTS["parquet-shards"])), cache_dir=cache)
    assert "made of" not in caplog.text


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("rotten_tomatoes", ("rotten_tomatoes", None, None)),
        ("stanfordnlp/imdb", ("stanfordnlp/imdb", None, None)),
        ("stanfordnlp/imdb@test", ("stanfordnlp/imdb", None, "test")),
        ("nyu-mll/glue:sst2", ("nyu-mll/glue", "sst2", None)),
        ("nyu-mll/glue:sst2@validation", ("nyu-mll/glue", "sst2", "validation")),
        ("wikimedia/wikipedia:20231101.en@train", ("wikimedia/wikipedia", "20231101.en", "train")),
    ],
)
def test_parse_hub_id(spec, parsed):
    assert parse_hub_id(spec) == parsed


@pytest.mark.parametrize(
    "spec",
    [
        "train.csv",
        "data.jsonl.gz",
        "owner/train.parquet",
        "glue:sst2.tsv",
        "./my_data",
        "../data",
        ".hidden",
        "/data/train",
        "~/data",
        "a/b/c",
        "my data",
        "owner/name:a:b",
        "owner/name@",
        r"C:\data\train",
        "",
    ],
)
def test_parse_hub_id_rejects_paths(spec):
    assert parse_hub_id(spec) is None


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset for Hub ids (local folders still load for real); record the calls."""
    import datasets

    real = datasets.load_dataset
    calls: list[tuple] = []
    splits = {
        name: datasets.Dataset.from_pandas(SENTIMENT.iloc[i:], preserve_index=False)
        for i, name in enumerate(["train", "validation", "test"])
    }

    def load_dataset(path, name=None, split=None, cache_dir=None, **kwargs):
        if Path(path).exists():
            return real(path, name, split=split, cache_dir=cache_dir, **kwargs)
        calls.append((path, name, split, cache_dir))
        return splits[split] if split else datasets.DatasetDict(splits)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, splits


def test_hub_id_loads_the_split_the_field_means(tmp_path, fake_hub, monkeypatch):
    calls, splits = fake_hub
    cache = str(tmp_path / "hf-cache")
    assert load_table("nyu-mll/glue:sst2", "train_file", cache)["text"] == splits["train"]["text"]
    assert load_table("nyu-mll/glue:sst2", "eval_file", cache)["text"] == splits["validation"]["text"]
    assert load_table("stanfordnlp/imdb@test", "train_file", cache)["text"] == splits["test"]["text"]
    assert calls == [
        ("nyu-mll/glue", "sst2", None, cache),
        ("nyu-mll/glue", "sst2", None, cache),
        ("stanfordnlp/imdb", None, "test", cache),
    ]
    # A local folder of the same name wins over the Hub.
    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "rotten_tomatoes", {"train.csv": SENTIMENT.iloc[:2]})
    assert load_table("rotten_tomatoes", "train_file", cache)["text"] == list(SENTIMENT.text[:2])
    assert len(calls) == 3


def test_hub_dataset_without_the_split_a_field_means(tmp_path, monkeypatch):
    import datasets

    one = datasets.Dataset.from_pandas(SENTIMENT, preserve_index=False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: datasets.DatasetDict({"a": one, "b": one}))
    with pytest.raises(ValueError, match=r"eval_file: .* has splits \['a', 'b'\].*nyu-mll/glue:sst2@SPLIT"):
        load_table("nyu-mll/glue:sst2", "eval_file", str(tmp_path / "hf-cache"))


def test_hub_id_offline_fails_fast_naming_the_field(tmp_path, bert_tok, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # datasets and huggingface_hub read these variables at import time, so their flags are patched too.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    for field in ("train_file", "eval_file"):
        with pytest.raises(FileNotFoundError) as info:
            load_table("lorafa-tests/no-such-dataset:cfg@train", field, str(tmp_path / "hf-cache"))
        message = str(info.value)
        assert message.startswith(
            f"{field}: no local file or folder named 'lorafa-tests/no-such-dataset:cfg@train'"
        )
        assert "loading it as a Hugging Face Hub dataset" in message and "failed" in message
        assert "\n" not in message
    train = write(SENTIMENT, tmp_path / "t.csv")
    with pytest.raises(FileNotFoundError, match="eval_file: .*Hub dataset"):
        build_datasets(cfg(tmp_path, train, eval_file="rotten_tomatoes"), bert_tok, "classification")


@pytest.mark.parametrize(
    "spec", ["nope.csv", "data/train.parquet", "./my_data", "~/lorafa-no-such-folder", "a/b/c", "ABSOLUTE"]
)
def test_missing_paths_never_reach_the_hub(tmp_path, monkeypatch, spec):
    import datasets

    def load_dataset(*args, **kwargs):
        raise AssertionError(f"load_dataset called with {args}")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)
    spec = str(tmp_path / "missing") if spec == "ABSOLUTE" else spec
    with pytest.raises(FileNotFoundError, match="eval_file: no such file or folder"):
        load_table(spec, "eval_file", str(tmp_path / "hf-cache"))


def test_a_local_folder_shaped_like_a_hub_owner_never_reaches_the_hub(tmp_path, monkeypatch):
    import datasets

    def load_dataset(*args, **kwargs):
        raise AssertionError(f"load_dataset called with {args}")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "data", {"train.csv": SENTIMENT, "dev/valid.csv": SENTIMENT})
    with pytest.raises(FileNotFoundError, match=r"train_file: no such file or folder: .*data/train; the folder "
                                                r"data/ holds: dev/, train.csv$"):  # fmt: skip
        load_table("data/train", "train_file", str(tmp_path / "hf-cache"))


def test_a_hub_error_says_how_to_skip_the_network(tmp_path, monkeypatch):
    import datasets

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"ConnectionError: Couldn't reach the Hub .*HF_HUB_OFFLINE=1"):
        load_table("glue/sst2", "train_file", str(tmp_path / "hf-cache"))


def test_seeded_split_is_reproducible(tmp_path, bert_tok):
    n = 40
    df = pd.DataFrame(
        {
            "text": [" ".join(WORDS[i % 7 : i % 7 + 1 + i % 5]) for i in range(n)],
            "label": [i % 2 for i in range(n)],
        }
    )
    df["text"] = df["text"] + [f" {'very ' * (i // 8)}" for i in range(n)]  # rows become distinguishable
    path = write(df, tmp_path / "t.jsonl")

    def split(seed):
        d = build_datasets(cfg(tmp_path, path, eval_split=0.25, seed=seed), bert_tok, "classification")
        return list(d.train["input_ids"]), list(d.eval["input_ids"])

    train_a, eval_a = split(0)
    train_b, eval_b = split(0)
    _, eval_c = split(1)
    assert (train_a, eval_a) == (train_b, eval_b)
    assert eval_a != eval_c
    assert len(eval_a) == math.ceil(0.25 * n) and len(train_a) + len(eval_a) == n
    everything = sorted(map(tuple, train_a + eval_a))
    assert everything == sorted(tuple([BOS, *ids(t), EOS]) for t in df.text)


def test_sample_caps_are_seeded_subsets(tmp_path, bert_tok):
    path = write(SENTIMENT, tmp_path / "t.csv")
    full = build_datasets(cfg(tmp_path, path), bert_tok, "classification").train["input_ids"]

    def capped(seed):
        return build_datasets(
            cfg(tmp_path, path, max_train_samples=3, seed=seed), bert_tok, "classification"
        ).train["input_ids"]

    assert capped(0) == capped(0) and len(capped(0)) == 3
    assert all(x in full for x in capped(0))
    evals = build_datasets(
        cfg(tmp_path, path, eval_file=str(path), max_eval_samples=2), bert_tok, "classification"
    ).eval
    assert len(evals) == 2


# ------------------------------------------------------------------------------------------------------ sft etc.


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 60), min_size=0, max_size=12, unique=True),
    st.lists(st.tuples(st.integers(0, 64), st.integers(0, 4)), max_size=30),
)
def test_token_in_span_matches_checking_every_span(edges: list[int], tokens: list[tuple[int, int]]) -> None:
    """The bisect lookup labels a token exactly as testing it against every span: overlap for a token with
    characters, strictly inside for a zero-width one (spans sorted and disjoint, as chat_spans makes them)."""
    cuts = sorted(edges)
    spans = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
    for s, width in tokens:
        e = s + width
        every = any((s < end and e > start) if e > s else start < s < end for start, end in spans)
        assert _in_span(spans, s, e) == every, (spans, s, e)



def _sft_file(tmp_path: Path) -> Path:
    rows = [
        {"prompt": "was the movie good", "response": "the movie was great"},
        {"prompt": "the plot", "response": "not very good"},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bert_like", [False, True])
def test_sft_plain_format_masks_the_prompt(tmp_path, bert_like):
    tok = make_tokenizer(bert_like=bert_like)
    data = build_datasets(cfg(tmp_path, _sft_file(tmp_path), use_chat_template=False), tok, "sft")
    # BOS only when the tokenizer itself starts sequences with it; the answer always ends with EOS.
    bos = [BOS] if bert_like else []
    prompt = bos + ids("was the movie good")
    answer = ids("the movie was great") + [EOS]
    first = data.train[0]
    assert first["input_ids"] == prompt + answer
    assert first["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert first["attention_mask"] == [1] * len(prompt + answer)


def test_sft_without_a_template_says_it_uses_the_plain_format(tmp_path, gpt_tok, caplog):
    asked = build_datasets(cfg(tmp_path, _sft_file(tmp_path)), gpt_tok, "sft")  # use_chat_template: true
    assert "has no chat template" in caplog.text
    caplog.clear()
    plain = build_datasets(cfg(tmp_path, _sft_file(tmp_path), use_chat_template=False), gpt_tok, "sft")
    assert "has no chat template" not in caplog.text
    assert asked.train["input_ids"] == plain.train["input_ids"]


def test_sft_chat_template_masks_the_prompt(tmp_path):
    tok = make_tokenizer(bert_like=False)
    tok.chat_template = CHAT_TEMPLATE
    data = build_datasets(cfg(tmp_path, _sft_file(tmp_path)), tok, "sft")
    prompt = ids("<s> user the plot </s> <s> assistant")
    answer = ids("not very good </s>")
    second = data.train[1]
    assert second["input_ids"] == prompt + answer
    assert second["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    # The flag turns the template off.
    plain = build_datasets(cfg(tmp_path, _sft_file(tmp_path), use_chat_template=False), tok, "sft")
    assert plain.train[1]["input_ids"] == ids("the plot not very good </s>")


def test_sft_truncation_drops_examples_without_answer_tokens(tmp_path, gpt_tok):
    # Prompt 1 has 4 tokens, prompt 2 has 2: with max_length 4 only example 2 keeps answer tokens.
    data = build_datasets(cfg(tmp_path, _sft_file(tmp_path), max_length=4), gpt_tok, "sft")
    assert len(data.train) == 1
    assert data.train[0]["input_ids"] == ids("the plot not very")
    assert data.train[0]["labels"] == [IGNORE_INDEX] * 2 + ids("not very")


def test_sft_template_that_is_not_prefix_consistent(tmp_path):
    tok = make_tokenizer(bert_like=False)
    tok.chat_template = (
        "{% if add_generation_prompt %}a {% endif %}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    )
    with pytest.raises(ValueError, match="use_chat_template"):
        build_datasets(cfg(tmp_path, _sft_file(tmp_path)), tok, "sft")


CHAT = [
    {"role": "system", "content": "the plot"},
    {"role": "user", "content": "was the movie good"},
    {"role": "assistant", "content": "the movie was great"},
    {"role": "user", "content": "the plot"},
    {"role": "assistant", "content": "not very good"},
]


def _expect(segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Reference input_ids and labels from (text, learned) pieces written out in the test."""
    input_ids, labels = [], []
    for text, learned in segments:
        input_ids += ids(text)
        labels += ids(text) if learned else [IGNORE_INDEX] * len(ids(text))
    return input_ids, labels


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_conversations_learn_every_assistant_turn(tmp_path):
    tok = make_tokenizer(bert_like=False)
    tok.chat_template = CHAT_TEMPLATE
    # No prompt column: the `messages` column is read as conversations.
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT, "id": 1}])
    example = build_datasets(cfg(tmp_path, path), tok, "sft").train[0]
    input_ids, labels = _expect(
        [
            ("<s> system the plot </s> <s> user was the movie good </s> <s> assistant", False),
            ("the movie was great </s>", True),
            ("<s> user the plot </s> <s> assistant", False),
            ("not very good </s>", True),
        ]
    )
    assert example["input_ids"] == input_ids == ids(tok.apply_chat_template(CHAT, tokenize=False))
    assert example["labels"] == labels
    # The same rows in ShareGPT form, in a column named by messages_column, from a CSV cell holding JSON.
    share = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
             for m in CHAT]  # fmt: skip
    csv_path = write(pd.DataFrame({"chat": [json.dumps(share)], "prompt": ["unused"]}), tmp_path / "chat.csv")
    other = build_datasets(cfg(tmp_path, csv_path, messages_column="chat"), tok, "sft").train[0]
    assert (other["input_ids"], other["labels"]) == (input_ids, labels)
    # Contents as OpenAI-style text parts.
    parts = [
        {**m, "content": [{"type": "text", "text": w + " "} for w in m["content"].split()]} for m in CHAT
    ]
    split = build_datasets(cfg(tmp_path, _jsonl(tmp_path / "parts.jsonl", [{"messages": parts}])), tok, "sft")
    assert (split.train[0]["input_ids"], split.train[0]["labels"]) == (input_ids, labels)
    # Truncation on the right keeps what fits of the first answer.
    head = "<s> system the plot </s> <s> user was the movie good </s> <s> assistant"
    cut = build_datasets(cfg(tmp_path, path, max_length=len(ids(head)) + 2), tok, "sft").train[0]
    assert cut["labels"][-2:] == ids("the movie")


def test_sft_conversations_without_a_template(tmp_path, gpt_tok):
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    example = build_datasets(cfg(tmp_path, path, use_chat_template=False), gpt_tok, "sft").train[0]
    # Other roles: content + line break, masked; the assistant's content + EOS, learned (no BOS for this tokenizer).
    input_ids, labels = _expect(
        [("the plot was the movie good", False), ("the movie was great </s>", True), ("the plot", False),
         ("not very good </s>", True)]
    )  # fmt: skip
    assert (example["input_ids"], example["labels"]) == (input_ids, labels)


@pytest.mark.parametrize("template", [True, False])
def test_a_one_turn_conversation_is_a_prompt_response_pair(tmp_path, template):
    tok = make_tokenizer(bert_like=True)
    tok.chat_template = CHAT_TEMPLATE
    pairs = build_datasets(cfg(tmp_path, _sft_file(tmp_path), use_chat_template=template), tok, "sft").train
    rows = [json.loads(line) for line in _sft_file(tmp_path).read_text().splitlines()]
    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
             for r in rows]  # fmt: skip
    convs = build_datasets(
        cfg(tmp_path, _jsonl(tmp_path / "c.jsonl", chats), use_chat_template=template), tok, "sft"
    )
    assert convs.train["input_ids"] == pairs["input_ids"] and convs.train["labels"] == pairs["labels"]


def test_sft_conversation_errors_name_file_column_and_row(tmp_path, gpt_tok, caplog):
    bad = [{"messages": CHAT}, {"messages": [{"role": "user"}]}]
    with pytest.raises(
        ValueError, match=r"train_file: column 'messages' \(messages_column\), row 1: message 0 needs"
    ):
        build_datasets(cfg(tmp_path, _jsonl(tmp_path / "bad.jsonl", bad)), gpt_tok, "sft")
    with pytest.raises(ValueError, match=r"column 'chat' \(messages_column\) not found"):
        build_datasets(cfg(tmp_path, _jsonl(tmp_path / "ok.jsonl", [{"messages": CHAT}]), messages_column="chat"),
                       gpt_tok, "sft")  # fmt: skip
    with pytest.raises(ValueError, match="messages_column must be a column name or None"):
        cfg(tmp_path, "x.jsonl", messages_column="").validate()
    # A conversation without an assistant turn has nothing to learn: dropped with a warning.
    rows = [{"messages": CHAT}, {"messages": CHAT[:2]}]
    data = build_datasets(cfg(tmp_path, _jsonl(tmp_path / "two.jsonl", rows)), gpt_tok, "sft")
    assert len(data.train) == 1 and "without an assistant turn" in caplog.text
    # A template that refuses a conversation: the error names the file and the template.
    tok = make_tokenizer(bert_like=False)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }} {% endfor %}"
    )
    with pytest.raises(
        ValueError, match="train_file: row 0: use_chat_template: .*chat template fails.*no system role"
    ):
        build_datasets(cfg(tmp_path, _jsonl(tmp_path / "sys.jsonl", [{"messages": CHAT}])), tok, "sft")


def _chat_tok(template: str):
    tok = make_tokenizer(bert_like=False)
    tok.chat_template = template
    return tok


# A default system prompt when the conversation has none (as SmolLM2's, Qwen2.5's and Llama-3.1's templates add).
DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<s> system the plot </s> {% endif %}"
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def test_a_conversation_opening_with_the_assistant_learns_only_the_answers(tmp_path):
    chat = [{"role": "assistant", "content": "good"}, {"role": "user", "content": "bad"},
            {"role": "model", "content": "great"}]  # fmt: skip  # "model": Gemini's name for the assistant
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": chat}])
    example = build_datasets(cfg(tmp_path, path), _chat_tok(DEFAULT_SYSTEM), "sft").train[0]
    assert (example["input_ids"], example["labels"]) == _expect(
        [("<s> system the plot </s> <s> assistant", False), ("good </s>", True),
         ("<s> user bad </s> <s> assistant", False), ("great </s>", True)]
    )  # fmt: skip


def test_text_a_template_writes_only_after_a_conversations_last_turn_is_not_learned_mid_conversation(
    tmp_path,
):
    # Phi-3's template ends a conversation with EOS unless it adds the generation prompt: the first answer's
    # turn, rendered last, ends "</s> [PAD]", but in the whole conversation "</s> <s> user ...".
    tok = _chat_tok(
        "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% else %}[PAD] {% endif %}"
    )
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    example = build_datasets(cfg(tmp_path, path), tok, "sft").train[0]
    assert (example["input_ids"], example["labels"]) == _expect(
        [("<s> system the plot </s> <s> user was the movie good </s> <s> assistant", False),
         ("the movie was great </s>", True), ("<s> user the plot </s> <s> assistant", False),
         ("not very good </s> [PAD]", True)]
    )  # fmt: skip


def test_a_template_that_rewrites_earlier_answers_is_refused_with_the_reason(tmp_path):
    # Like Qwen3's, which drops the reasoning of answers before the last user turn.
    tok = _chat_tok(
        "{% for m in messages %}<s> {{ m['role'] }} "
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'] | replace('great', 'fine') }}"
        "{% else %}{{ m['content'] }}{% endif %} </s> {% endfor %}{% if add_generation_prompt %}<s> assistant {% endif %}"
    )
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": CHAT}])
    with pytest.raises(
        ValueError, match=r"train_file: row 0: .*earlier turns differently.*one assistant turn per row"
    ):
        build_datasets(cfg(tmp_path, path), tok, "sft")


def test_train_and_eval_files_may_hold_different_sft_forms(tmp_path, gpt_tok):
    pairs = _sft_file(tmp_path)
    chats = _jsonl(tmp_path / "chats.jsonl", [{"conversations": [{"from": "human", "value": "the plot"},
                                                                  {"from": "gpt", "value": "not very good"}]}])  # fmt: skip
    for train_file, eval_file in ((pairs, chats), (chats, pairs)):
        data = build_datasets(cfg(tmp_path, train_file, eval_file=str(eval_file)), gpt_tok, "sft")
        assert ids("the plot not very good </s>") in [*data.train["input_ids"], *data.eval["input_ids"]]


def test_seq2seq_source_and_target(tmp_path, gpt_tok):
    df = pd.DataFrame({"src": ["the movie was good", "bad"], "tgt": ["great film", "not very good"]})
    path = write(df, tmp_path / "s.csv")
    data = build_datasets(
        cfg(tmp_path, path, source_column="src", target_column="tgt", max_target_length=2), gpt_tok, "seq2seq"
    )
    assert data.train[0]["input_ids"] == ids("the movie was good")
    assert data.train["labels"] == [ids("great film"), ids("not very")]


def test_clm_blocks(tmp_path, gpt_tok):
    lines = ["the movie was good", "", "bad plot", "a film", "not very good really"]
    path = tmp_path / "raw.txt"
    path.write_text("\n".join(lines) + "\n")
    data = build_datasets(cfg(tmp_path, path, block_size=4), gpt_tok, "clm")
    # A text file is one stream: its lines keep their line breaks (which this word-level tokenizer drops) and run
    # on into the next, with no EOS between them.
    stream = [t for line in lines for t in ids(line)]
    blocks = [stream[i : i + 4] for i in range(0, len(stream) // 4 * 4, 4)]
    assert data.train["input_ids"] == blocks
    assert data.train["labels"] == blocks
    capped = build_datasets(cfg(tmp_path, path, block_size=4, max_train_samples=2), gpt_tok, "clm")
    assert len(capped.train) == 2 and all(b in blocks for b in capped.train["input_ids"])
    # A held-out split too short for one block names eval_split, not an eval_file that was never set.
    with pytest.raises(ValueError, match=r"eval_split \(the rows held out of train_file\): no examples left"):
        build_datasets(cfg(tmp_path, path, block_size=8, eval_split=0.2), gpt_tok, "clm")


@pytest.mark.parametrize("pair, max_length", [(False, 2), (True, 4)])
def test_max_length_must_leave_room_for_the_text(tmp_path, bert_tok, pair, max_length):
    # The BERT-like tokenizer adds <s> A </s> (B </s>): 2 special tokens, 3 for a pair (which needs 2 text tokens).
    path = write(SENTIMENT.assign(other=SENTIMENT.text), tmp_path / "s.csv")
    extra = {"text_pair_column": "other"} if pair else {}
    with pytest.raises(ValueError, match=rf"max_length: {max_length} tokens leave no room for the text"):
        build_datasets(cfg(tmp_path, path, max_length=max_length, **extra), bert_tok, "classification")
    build_datasets(cfg(tmp_path, path, max_length=max_length + 1, **extra), bert_tok, "classification")


def test_clm_documents_end_with_eos_and_only_the_last_partial_block_is_lost(tmp_path, gpt_tok):
    docs = [" ".join(["good", "film"][: 1 + i % 2]) for i in range(2500)]  # more rows than one map batch
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = build_datasets(cfg(tmp_path, path, block_size=7), gpt_tok, "clm")
    stream = [t for d in docs for t in ids(d) + [EOS]]
    assert data.train["input_ids"] == [stream[i : i + 7] for i in range(0, len(stream) // 7 * 7, 7)]


def test_csv_cells_are_read_as_written(tmp_path, bert_tok, gpt_tok):
    (tmp_path / "n.csv").write_text("text,label\n007,1.0\n1e3,0\ngood,1\n")
    table = load_table(str(tmp_path / "n.csv"), cache_dir=str(tmp_path / "hf-cache"))
    assert table["text"] == ["007", "1e3", "good"]
    data = build_datasets(cfg(tmp_path, tmp_path / "n.csv"), bert_tok, "classification")
    assert data.label_names == ["0", "1"] and data.train["labels"] == [1, 0, 1]  # "1.0" is the class "1"
    # TSV: a quote is an ordinary character
    (tmp_path / "q.tsv").write_text('text\tlabel\n"good" movie\tpos\n"bad plot\tneg\n')
    assert load_table(str(tmp_path / "q.tsv"), cache_dir=str(tmp_path / "hf-cache"))["text"] == [
        '"good" movie',
        '"bad plot',
    ]
    # ... unless the file is quoted as pandas, Excel and csv writers quote it (quotes doubled, tabs and line
    # breaks inside quoted cells): then the cells come back as written.
    texts = ['she said "hi"', "a\ttab", "two\nlines", "plain", '"quoted"']
    pd.DataFrame({"text": texts, "label": ["pos"] * 5}).to_csv(tmp_path / "w.tsv", sep="\t", index=False)
    assert load_table(str(tmp_path / "w.tsv"), cache_dir=str(tmp_path / "hf-cache"))["text"] == texts
    # A GLUE-style file with a whole quoted sentence beside a stray quote stays as written (reading it with
    # quoting would join lines or fail).
    for name, rows in {
        "a.tsv": ['"Yes."\t1', '"Well, maybe\t0', "fine movie\t1", "good\t0"],
        "c.tsv": ['"Yes."\t1', '"Well, maybe\t0', 'he said" twice\t1', "good\t0"],
    }.items():
        (tmp_path / name).write_text("text\tlabel\n" + "\n".join(rows) + "\n")
        table = load_table(str(tmp_path / name), cache_dir=str(tmp_path / "hf-cache"))
        assert table["text"] == [r.split("\t")[0] for r in rows], name
    # Only an empty cell is missing: NA, None, null and N/A are text.
    (tmp_path / "na.csv").write_text("text,label\nNA,None\nnull,N/A\n,x\n")
    na = load_table(str(tmp_path / "na.csv"), cache_dir=str(tmp_path / "hf-cache"))
    assert na["text"] == ["NA", "null", None] and na["label"] == ["None", "N/A", "x"]


def test_a_tsv_whose_first_quoted_cell_comes_late_is_read_with_quoting(tmp_path):
    # pandas and Excel quote only the cells that need it: here none of the first few thousand.
    texts = [f"movie {i}" for i in range(3000)] + ['she said "hi"', "two\nlines"]
    pd.DataFrame({"text": texts, "label": ["pos"] * len(texts)}).to_csv(tmp_path / "w.tsv", sep="\t", index=False)
    assert load_table(str(tmp_path / "w.tsv"), cache_dir=str(tmp_path / "hf-cache"))["text"] == texts


def test_sentence_pairs_are_separated_for_tokenizers_that_do_not_mark_pairs(tmp_path, gpt_tok):
    df = pd.DataFrame({"a": ["good movie"], "b": ["great film"], "y": ["pos"]})
    path = write(df, tmp_path / "p.csv")
    data = build_datasets(
        cfg(
            tmp_path,
            path,
            text_column="a",
            text_pair_column="b",
            label_column="y",
            label_names=["neg", "pos"],
        ),
        gpt_tok,
        "classification",
    )
    assert data.train["input_ids"][0] == [*ids("good movie"), EOS, *ids("great film")]


@pytest.mark.parametrize("max_length", [4, 6, 9])
def test_pairs_joined_with_eos_are_cut_longest_first(tmp_path, gpt_tok, max_length):
    # A long first text must not push the second out: the same cut as the tokenizer's own pair truncation.
    first, second = "the movie was really not very good", "great film"
    df = pd.DataFrame({"a": [first, "good"], "b": [second, "bad"], "y": ["pos", "neg"]})
    columns = dict(text_column="a", text_pair_column="b", label_column="y", max_length=max_length)
    data = build_datasets(cfg(tmp_path, write(df, tmp_path / "p.csv"), **columns), gpt_tok, "classification")
    # Reference: the tokenizer's own longest-first pair truncation to max_length minus the EOS between them.
    enc = gpt_tok(first, second, truncation="longest_first", max_length=max_length - 1, add_special_tokens=False)
    which = enc.encodings[0].sequence_ids
    a = [t for t, s in zip(enc["input_ids"], which, strict=True) if s == 0]
    b = [t for t, s in zip(enc["input_ids"], which, strict=True) if s == 1]
    assert data.train["input_ids"][0] == [*a, EOS, *b] and len(b) > 0


def test_integer_labels_that_tie_keep_one_order():
    from lorafa.data import _sorted_labels

    assert _sorted_labels({"1", "01", "2"}) == ["01", "1", "2"]


@pytest.fixture
def row_reads(monkeypatch):
    """Counts reads of single rows through datasets' lazy Column (iterating it, or indexing it by an int)."""
    from datasets.arrow_dataset import Column

    reads = {"n": 0}
    get, iterate = Column.__getitem__, Column.__iter__

    def counted_get(self, key):
        reads["n"] += isinstance(key, int)
        return get(self, key)

    def counted_iter(self):
        for value in iterate(self):
            reads["n"] += 1
            yield value

    monkeypatch.setattr(Column, "__getitem__", counted_get)
    monkeypatch.setattr(Column, "__iter__", counted_iter)
    return reads


def test_data_preparation_reads_each_column_at_once(tmp_path, bert_tok, gpt_tok, row_reads):
    from lorafa.data import example_lengths

    n = 200  # many more rows than columns: one read per row would show
    big = pd.DataFrame({"text": [f"good movie {i}" for i in range(n)], "label": ["pos", "neg"] * (n // 2)})
    data = build_datasets(cfg(tmp_path, write(big, tmp_path / "c.csv"), eval_split=0.2), bert_tok, "classification")
    example_lengths(data.train, "classification")
    scores = big.assign(label=[i / n for i in range(n)])
    build_datasets(cfg(tmp_path, write(scores, tmp_path / "r.csv")), bert_tok, "regression")
    pairs = pd.DataFrame({"prompt": ["good movie"] * n, "response": ["great film"] * n})
    data = build_datasets(cfg(tmp_path, write(pairs, tmp_path / "p.jsonl"), eval_split=0.2), gpt_tok, "sft")
    example_lengths(data.train, "seq2seq")
    assert row_reads["n"] == 0


# ----------------------------------------------------------------------------------------------------- errors


def test_missing_files(tmp_path, bert_tok):
    with pytest.raises(FileNotFoundError, match="train_file"):
        build_datasets(cfg(tmp_path, tmp_path / "nope.csv"), bert_tok, "classification")
    train = write(SENTIMENT, tmp_path / "t.csv")
    with pytest.raises(FileNotFoundError, match="eval_file"):
        build_datasets(cfg(tmp_path, train, eval_file=str(tmp_path / "nope.csv")), bert_tok, "classification")


def test_unreadable_and_empty_inputs(tmp_path, bert_tok):
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(ValueError, match="supported file types"):
        load_table(str(tmp_path / "d.xlsx"), cache_dir=str(tmp_path / "hf-cache"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_table(str(tmp_path / "empty.csv"), cache_dir=str(tmp_path / "hf-cache"))
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="header.csv"):
        load_table(str(tmp_path / "header.csv"), cache_dir=str(tmp_path / "hf-cache"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        load_table(str(tmp_path / "folder"), cache_dir=str(tmp_path / "hf-cache"))


@pytest.mark.parametrize("name", ["l.csv", "l.tsv", "l.txt", "l.jsonl", "l.csv.gz"])
def test_a_file_that_is_not_utf8_is_named_with_the_byte(tmp_path, name):
    import gzip

    text = {".jsonl": '{"text": "good"}\n{"text": "caf\u00e9"}\n'}.get(Path(name).suffixes[0], "text\ngood\ncaf\u00e9\n")
    data = text.encode("latin-1")
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    line = text.splitlines().index(next(t for t in text.splitlines() if "\u00e9" in t))
    column = text.splitlines()[line].index("\u00e9") + 1
    with pytest.raises(ValueError, match=rf"{name} is not UTF-8: byte 0xe9 at line {line + 1}, column {column}.*UTF-8"):
        load_table(str(tmp_path / name), cache_dir=str(tmp_path / "hf-cache"))


def test_small_file_problems(tmp_path, bert_tok, caplog):
    import datasets

    cache = str(tmp_path / "hf-cache")
    # A text file's byte-order mark is no character of the text.
    (tmp_path / "bom.txt").write_bytes("\ufeffgood movie\nbad plot\n".encode("utf-8"))
    assert load_table(str(tmp_path / "bom.txt"), cache_dir=cache)["text"] == ["good movie\n", "bad plot\n"]
    # A single Arrow file reads as a folder of them does.
    saved = datasets.Dataset.from_pandas(SENTIMENT, preserve_index=False)
    saved.save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    assert load_table(str(arrow), cache_dir=cache).to_list() == saved.to_list()
    # A CSV with a header and no rows says so.
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match=r"header.csv has a header \(\['text', 'label'\]\) but no rows"):
        load_table(str(tmp_path / "header.csv"), cache_dir=cache)
    # A column name written twice is named.
    (tmp_path / "dup.csv").write_text("text,text,label\ngood,movie,pos\n")
    assert load_table(str(tmp_path / "dup.csv"), cache_dir=cache).column_names == ["text", "text.1", "label"]
    assert "dup.csv names columns ['text'] more than once" in caplog.text
    # Classes that differ only in case are separate classes, with a warning.
    cased = SENTIMENT.assign(label=["Pos", "neg", "pos", "neg", "pos", "neg"])
    data = build_datasets(cfg(tmp_path, write(cased, tmp_path / "c.csv")), bert_tok, "classification")
    assert data.label_names == ["Pos", "neg", "pos"]
    assert "differ only in case, which are separate classes: [['Pos', 'pos']]" in caplog.text
    # One file named twice (lorafa train warns that it evaluates on training rows; eval --data does this on purpose).
    from lorafa.data import same_data_file

    path = write(SENTIMENT, tmp_path / "t.csv")
    assert same_data_file(str(path), str(tmp_path / "." / "t.csv"))
    assert not same_data_file(str(path), str(tmp_path / "c.csv"))


def test_missing_column_lists_existing_columns(tmp_path, bert_tok):
    path = write(SENTIMENT, tmp_path / "t.csv")
    with pytest.raises(ValueError, match=r"'sentence' \(text_column\).*\['text', 'label'\]"):
        build_datasets(cfg(tmp_path, path, text_column="sentence"), bert_tok, "classification")
    with pytest.raises(ValueError, match=r"'prompt' \(prompt_column\)"):
        build_datasets(cfg(tmp_path, path), bert_tok, "sft")


def test_empty_text_values(tmp_path, bert_tok):
    df = pd.DataFrame({"text": ["good", None, "bad"], "label": ["a", "b", "a"]})
    with pytest.raises(ValueError, match=r"'text' \(text_column\) is empty in 1 rows.*\[1\]"):
        build_datasets(cfg(tmp_path, write(df, tmp_path / "t.jsonl")), bert_tok, "classification")


def test_labels_that_do_not_parse(tmp_path, bert_tok):
    df = pd.DataFrame({"text": ["good", "bad", "fine"], "label": ["0.5", "high", "1"]})
    with pytest.raises(ValueError, match=r"must hold numbers.*\(1, 'high'\)"):
        build_datasets(cfg(tmp_path, write(df, tmp_path / "r.csv")), bert_tok, "regression")
    df = pd.DataFrame({"text": ["good", "bad", "fine"], "label": ["pos", None, "neg"]})
    with pytest.raises(ValueError, match=r"label_column 'label' is empty.*\[1\]"):
        build_datasets(cfg(tmp_path, write(df, tmp_path / "c.jsonl")), bert_tok, "classification")


def test_list_labels_are_refused_as_multi_label(tmp_path, bert_tok):
    import datasets

    # GoEmotions' form: a Sequence(ClassLabel) column; and a JSON Lines list.
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.Sequence(datasets.ClassLabel(names=["joy", "anger"]))}
    )
    rows = {"text": ["good", "bad", "fine"], "label": [[0], [1], [0, 1]]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "go.parquet"))
    jsonl = _jsonl(tmp_path / "l.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": [1]}])
    for path, row in [(tmp_path / "go.parquet", 0), (jsonl, 1)]:
        with pytest.raises(ValueError, match=rf"train_file: label_column 'label' holds a list in row {row} .*multi-label"):
            build_datasets(cfg(tmp_path, path), bert_tok, "classification")


@pytest.mark.parametrize("task", ["classification", "seq2seq", "clm"])
def test_text_cells_holding_lists_or_objects_are_refused(tmp_path, bert_tok, gpt_tok, task):
    column = {"seq2seq": "source", "classification": "text", "clm": "text"}[task]
    rows = [{column: "good movie", "target": "a", "label": "pos"}, {column: "bad", "target": "b", "label": "neg"},
            {column: {"body": "great film"}, "target": "c", "label": "pos"}]  # fmt: skip
    path = _jsonl(tmp_path / "t.jsonl", rows)
    role = "source_column" if task == "seq2seq" else "text_column"
    with pytest.raises(ValueError, match=rf"train_file: column '{column}' \({role}\) holds an object in row 2"):
        build_datasets(cfg(tmp_path, path), bert_tok if task == "classification" else gpt_tok, task)
    rows[2][column] = ["great", "film"]
    with pytest.raises(ValueError, match=rf"column '{column}' \({role}\) holds a list in row 2"):
        build_datasets(cfg(tmp_path, _jsonl(tmp_path / "l.jsonl", rows)), gpt_tok, task)


@pytest.mark.parametrize("orient", ["columns", "index", "nested"])
def test_json_records_nested_in_one_object_are_refused(tmp_path, orient):
    path = tmp_path / "train.json"
    if orient == "nested":
        path.write_text(json.dumps({"data": SENTIMENT.to_dict(orient="records")}))
    else:
        SENTIMENT.to_json(path, orient=orient)
    with pytest.raises(ValueError, match=r"train_file: .*train.json reads as one row .*orient='records'"):
        load_table(str(path), cache_dir=str(tmp_path / "hf-cache"))
    # One conversation is one row of a list of messages: read as it is.
    (tmp_path / "chat.json").write_text(json.dumps({"messages": CHAT}))
    assert load_table(str(tmp_path / "chat.json"), cache_dir=str(tmp_path / "hf-cache"))["messages"] == [CHAT]


def test_eval_labels_unseen_in_training(tmp_path, bert_tok):
    train = write(SENTIMENT, tmp_path / "t.csv")
    evals = write(pd.DataFrame({"text": ["fine", "good"], "label": ["neutral", "pos"]}), tmp_path / "e.csv")
    with pytest.raises(ValueError, match=r"eval_file: labels \['neutral'\] never occur in train_file"):
        build_datasets(cfg(tmp_path, train, eval_file=str(evals)), bert_tok, "classification")


def test_label_problems(tmp_path, bert_tok):
    one = write(pd.DataFrame({"text": ["good", "bad"], "label": ["pos", "pos"]}), tmp_path / "one.csv")
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        build_datasets(cfg(tmp_path, one), bert_tok, "classification")
    path = write(SENTIMENT, tmp_path / "t.csv")
    with pytest.raises(ValueError, match=r"no row has a label in label_names \['fresh', 'rotten'\]"):
        build_datasets(cfg(tmp_path, path, label_names=["fresh", "rotten"]), bert_tok, "classification")


def test_nothing_left_after_split_or_tokenization(tmp_path, gpt_tok):
    one = write(SENTIMENT.iloc[:1], tmp_path / "one.csv")
    with pytest.raises(ValueError, match="eval_split"):
        build_datasets(cfg(tmp_path, one, eval_split=0.5), gpt_tok, "clm")
    with pytest.raises(ValueError, match="block_size"):
        build_datasets(cfg(tmp_path, one, block_size=64), gpt_tok, "clm")
    with pytest.raises(ValueError, match="no example has an answer token within max_length"):
        build_datasets(cfg(tmp_path, _sft_file(tmp_path), max_length=2), gpt_tok, "sft")
    with pytest.raises(ValueError, match="task must be one of"):
        build_datasets(cfg(tmp_path, one), gpt_tok, "translation")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("train_file", ""),
        ("eval_file", ""),
        ("eval_split", 1.0),
        ("eval_split", -0.1),
        ("text_column", ""),
        ("text_pair_column", ""),
        ("label_names", ["only"]),
        ("label_names", ["a", "a"]),
        ("max_length", 0),
        ("max_target_length", -1),
        ("block_size", 1.5),
        ("max_train_samples", 0),
        ("max_eval_samples", True),
        ("use_chat_template", "yes"),
        ("seed", None),
    ],
)
def test_config_validation_names_the_field(field, value):
    config = DataConfig(train_file="x.csv")
    config.validate()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=field):
        config.validate()


# --------------------------------------------------------------------------------------------------- collator


def test_collator_pads_right(bert_tok):
    features = [
        {"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 0], "labels": 1},
        {"input_ids": [2, 3], "attention_mask": [1, 1], "token_type_ids": [0, 0], "labels": 0},
    ]
    batch = make_collator("classification", bert_tok, pad_to_multiple_of=4)(features)
    assert batch["input_ids"].tolist() == [[2, 5, 3, PAD], [2, 3, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    # Examples already in torch format (dataset.set_format("torch")) collate the same.
    as_tensors = [{k: torch.tensor(v) for k, v in f.items()} for f in features]
    again = make_collator("classification", bert_tok, pad_to_multiple_of=4)(as_tensors)
    assert all(torch.equal(batch[k], again[k]) for k in batch)


def test_collator_pads_token_labels_with_ignore_index(tmp_path):
    tok = make_tokenizer(bert_like=False, pad=False)  # no pad token: EOS pads (masked out anyway)
    data = build_datasets(cfg(tmp_path, _sft_file(tmp_path)), tok, "sft")
    long, short = data.train[0], data.train[1]
    n, k = len(long["input_ids"]), len(long["input_ids"]) - len(short["input_ids"])
    assert k > 0
    batch = make_collator("sft", tok)([long, short])
    assert batch["input_ids"].tolist() == [long["input_ids"], short["input_ids"] + [EOS] * k]
    assert batch["labels"].tolist() == [long["labels"], short["labels"] + [IGNORE_INDEX] * k]
    assert batch["attention_mask"].tolist() == [[1] * n, [1] * (n - k) + [0] * k]
    # seq2seq: labels are padded to their own longest length, not the inputs'.
    s2s = make_collator("seq2seq", tok)(
        [
            {"input_ids": [4, 5, 6], "attention_mask": [1, 1, 1], "labels": [7]},
            {"input_ids": [4], "attention_mask": [1], "labels": [7, 8]},
        ]
    )
    assert s2s["input_ids"].tolist() == [[4, 5, 6], [4, EOS, EOS]]
    assert s2s["labels"].tolist() == [[7, IGNORE_INDEX], [7, 8]]


def test_collator_pads_with_unk_without_pad_and_eos_tokens():
    # Padding is masked, so a tokenizer without pad and EOS tokens pads with UNK.
    tok = make_tokenizer(bert_like=False, pad=False, eos=False)
    batch = make_collator("clm", tok)(
        [
            {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [5, 6]},
            {"input_ids": [5], "attention_mask": [1], "labels": [5]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6], [5, VOCAB["[UNK]"]]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]] and batch["labels"][1, 1] == IGNORE_INDEX
    with pytest.raises(ValueError, match="task"):
        make_collator("nope", make_tokenizer(bert_like=False))


def test_collated_batch_runs_a_model(tmp_path, bert_tok):
    """The batch's keys and dtypes are what a Hugging Face model takes: its loss equals a per-example reference."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        pad_token_id=PAD,
    )
    model = BertForSequenceClassification(config).eval()
    data = build_datasets(cfg(tmp_path, write(SENTIMENT, tmp_path / "t.csv")), bert_tok, "classification")
    batch = make_collator("classification", bert_tok)([data.train[i] for i in range(4)])
    with torch.no_grad():
        loss = model(**batch).loss
        singles = [model(**make_collator("classification", bert_tok)([data.train[i]])).loss for i in range(4)]
    torch.testing.assert_close(loss, torch.stack(singles).mean(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- the offline assets


@pytest.mark.assets
def test_rotten_tomatoes_with_minilm(tmp_path):
    """The offline default's data: fresh/rotten reviews only, a 10% seeded eval split, MiniLM's tokenizer."""
    from transformers import AutoTokenizer

    from lorafa import assets

    try:
        tok = AutoTokenizer.from_pretrained(assets.minilm_path())
        csv = assets.rotten_tomatoes_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    reviews = pd.read_csv(csv)
    reviews = reviews[reviews.category.isin(["rotten", "fresh"])]
    config = DataConfig(
        train_file="asset:rotten-tomatoes",
        label_column="category",
        label_names=["rotten", "fresh"],
        max_length=64,
        cache_dir=str(tmp_path / "hf-cache"),
    )
    data = build_datasets(config, tok, "classification")
    assert data.label_names == ["rotten", "fresh"]
    assert len(data.eval) == math.ceil(0.1 * len(reviews))
    assert len(data.train) + len(data.eval) == len(reviews)
    labels = list(data.train["labels"]) + list(data.eval["labels"])
    assert sum(labels) == (reviews.category == "fresh").sum()
    assert max(len(x) for x in data.train["input_ids"]) <= 64


@pytest.mark.assets
def test_chatterbot_sft_with_smollm2_chat_template(tmp_path):
    """The LLaMA example's data: masked positions are exactly the rendered prompt, the rest the answer turn."""
    from transformers import AutoTokenizer

    from lorafa import assets

    try:
        gguf = assets.smollm2_gguf_path()
        pairs = assets.chatterbot_pairs_path(cache_dir=tmp_path)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()[:8]]
    small = tmp_path / "pairs.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_datasets(cfg(tmp_path, small, max_length=512), tok, "sft")
    for row, example in zip(rows, data.train, strict=True):
        user = [{"role": "user", "content": row["prompt"]}]
        head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(
            [*user, {"role": "assistant", "content": row["response"]}], tokenize=False
        )
        assert full == head + row["response"] + "<|im_end|>\n"
        # Tokenizing prompt and answer apart gives the same ids as tokenizing the whole conversation.
        assert example["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
        n_prompt = len(tok(head, add_special_tokens=False)["input_ids"])
        assert example["labels"] == [IGNORE_INDEX] * n_prompt + example["input_ids"][n_prompt:]


@pytest.mark.assets
def test_multi_turn_conversation_with_smollm2_chat_template(tmp_path):
    """A real template (default system prompt, turn markers): exactly the assistant turns and their end-of-turn
    markers are learned, and the pieces join into the ids of the whole rendered conversation."""
    from transformers import AutoTokenizer

    from lorafa import assets

    try:
        gguf = assets.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    chat = [
        {"role": "user", "content": "Hi there, who are you?"},
        {"role": "assistant", "content": "A small language model."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4."},
    ]
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": chat}])
    example = build_datasets(cfg(tmp_path, path), tok, "sft").train[0]
    whole = tok.apply_chat_template(chat, tokenize=False)
    assert example["input_ids"] == tok(whole, add_special_tokens=False)["input_ids"]
    learned, span = [], []
    for i, label in zip(example["input_ids"], example["labels"], strict=True):
        if label == IGNORE_INDEX:
            if span:
                learned.append(tok.decode(span))
            span = []
        else:
            assert label == i
            span.append(i)
    learned.append(tok.decode(span))
    assert learned == ["A small language model.<|im_end|>\n", "It is 4.<|im_end|>\n"]


def test_metaspace_tokenizer_learns_the_ids_of_the_whole_conversation(tmp_path):
    """Llama-2/Mistral-style tokenizers mark a word start with "▁" and prepend one at the start of a text, so an
    answer tokenized on its own would begin with a "▁" token that inference never produces after the header."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["hello", "▁hello", "▁there", "good", "▁good", "▁movie", "[UNK]"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    specials = ["<|user|>", "<|assistant|>", "<|end|>"]
    backend.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|end|>")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    chat = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "good movie"}]
    example = build_datasets(
        cfg(tmp_path, _jsonl(tmp_path / "c.jsonl", [{"messages": chat}])), tok, "sft"
    ).train[0]
    whole = tok.apply_chat_template(chat, tokenize=False)
    assert example["input_ids"] == tok(whole, add_special_tokens=False)["input_ids"]
    learned = [
        i for i, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX
    ]
    assert tok.convert_ids_to_tokens(learned) == ["good", "▁movie", "<|end|>"]


class _SlowView:
    """A fast tokenizer seen as a slow one (no character offsets), to test the path slow tokenizers take."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kwargs):
        assert not kwargs.pop("return_offsets_mapping", False), "a slow tokenizer has no offsets"
        return self._tok(text, **kwargs)


def test_slow_tokenizers_find_the_same_answer_tokens(tmp_path):
    from lorafa.sft import tokenize_conversations

    tok = _chat_tok(DEFAULT_SYSTEM)
    chats = [CHAT, [{"role": "assistant", "content": "good"}, {"role": "user", "content": "bad"},
                    {"role": "assistant", "content": "great"}]]  # fmt: skip
    fast = tokenize_conversations(tok, chats, True, 64)
    slow = tokenize_conversations(_SlowView(tok), chats, True, 64)
    assert slow == fast and any(x != IGNORE_INDEX for x in fast["labels"][0])


@pytest.mark.assets
def test_trimmed_offsets_do_not_learn_the_prompts_trailing_space(tmp_path):
    """Byte-level tokenizers with trim_offsets give the prompt's trailing space token (before an answer that starts
    with a space of its own) a zero-width offset at the answer's start: it belongs to the prompt."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from lorafa import assets
    from lorafa.sft import tokenize_conversations

    try:
        gguf = assets.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\nAssistant: "
        "{% else %}{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    )
    chat = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": " Paris"}]
    plain = tokenize_conversations(tok, [chat], True, 64)
    tok._tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trimmed = tokenize_conversations(tok, [chat], True, 64)
    assert trimmed == plain
    learned = [i for i, x in zip(plain["input_ids"][0], plain["labels"][0], strict=True) if x != IGNORE_INDEX]
    assert tok.decode(learned) == " Paris" + tok.eos_token + "\n"


# ------------------------------------------------------------------------------------- sft layouts and cells


def _same_as_messages(tmp_path: Path, rows: list[dict], chats: list[list[dict]], **kw) -> None:
    """`rows` (some sft layout) tokenize exactly as the conversations `chats` given as a messages file."""
    tok = _chat_tok(CHAT_TEMPLATE)
    got = build_datasets(cfg(tmp_path, _jsonl(tmp_path / "rows.jsonl", rows), **kw), tok, "sft").train
    ref = build_datasets(
        cfg(tmp_path, _jsonl(tmp_path / "ref.jsonl", [{"messages": c} for c in chats])), tok, "sft"
    ).train
    assert got["input_ids"] == ref["input_ids"] and got["labels"] == ref["labels"]


def _csv(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False)
    return path


def _turns(prompt: str, answer: str, system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return [*head, {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def test_sft_reads_the_common_layouts_when_the_default_columns_are_missing(tmp_path, caplog):
    # TRL prompt/completion
    _same_as_messages(tmp_path, [{"prompt": "the plot", "completion": "not very good"}],
                      [_turns("the plot", "not very good")])  # fmt: skip
    # Alpaca: instruction + input (skipped when empty) -> output
    alpaca = [
        {"instruction": "was the movie good", "input": "the plot", "output": "not very good"},
        {"instruction": "the plot", "input": "", "output": "great"},
    ]
    chats = [_turns("was the movie good\n\nthe plot", "not very good"), _turns("the plot", "great")]
    _same_as_messages(tmp_path, alpaca, chats)
    assert "Alpaca" in caplog.text
    # ... and the same with the columns named explicitly
    _same_as_messages(tmp_path, alpaca, chats, prompt_column=["instruction", "input"], response_column="output")
    # Dolly: instruction + context -> response
    dolly = [{"instruction": "the plot", "context": "a film", "response": "good", "category": "qa"}]
    _same_as_messages(tmp_path, dolly, [_turns("the plot\n\na film", "good")])
    # OpenOrca: system_prompt + question -> response; a system column serves any found layout
    orca = [{"system_prompt": "really", "question": "the plot", "response": "fine"}]
    _same_as_messages(tmp_path, orca, [_turns("the plot", "fine", system="really")])
    with_system = [{"prompt": "the plot", "completion": "fine", "system": "really"}]
    _same_as_messages(tmp_path, with_system, [_turns("the plot", "fine", system="really")])
    # A prompt column beside a conversation column (UltraChat's layout): the conversations
    _same_as_messages(tmp_path, [{"prompt": "the plot", "prompt_id": "1", "messages": CHAT}], [CHAT])


def test_sft_prompt_completion_cells_may_hold_messages(tmp_path):
    # TRL's conversational prompt-completion: prompt and completion are lists of messages.
    tok = _chat_tok(CHAT_TEMPLATE)
    both = _jsonl(tmp_path / "both.jsonl", [{"prompt": CHAT[:2], "completion": "good", "system": "really"}])
    with pytest.raises(ValueError, match="row 0: the row has a system column and a system message"):
        build_datasets(cfg(tmp_path, both), tok, "sft")
    rows = [{"prompt": CHAT[:4], "completion": CHAT[4:]}, {"prompt": CHAT[:2], "completion": "good"}]
    _same_as_messages(tmp_path, rows, [CHAT, [*CHAT[:2], {"role": "assistant", "content": "good"}]])
    tok = _chat_tok(CHAT_TEMPLATE)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "good"}, {"prompt": {"x": 1}, "response": "b"}])
    with pytest.raises(ValueError, match=r"train_file: row 1: the prompt is an object"):
        build_datasets(cfg(tmp_path, bad), tok, "sft")
    user_answer = _jsonl(tmp_path / "ua.jsonl", [{"prompt": "a", "completion": CHAT[:2]}])
    with pytest.raises(ValueError, match="row 0: a response given as messages must hold assistant messages only"):
        build_datasets(cfg(tmp_path, user_answer), tok, "sft")


def test_sft_columns_left_out_of_the_prompt_are_named(tmp_path, caplog):
    alpaca = [{"instruction": "the plot", "input": "a film", "output": "good"}]
    path = _jsonl(tmp_path / "a.jsonl", alpaca)
    columns = {"prompt_column": "instruction", "response_column": "output"}
    build_datasets(cfg(tmp_path, path, **columns), make_tokenizer(bert_like=False), "sft")
    assert "['input'] are not part of the prompt" in caplog.text


@pytest.mark.parametrize(
    "row, hint",
    [
        ({"text": "the plot"}, "task: clm"),
        ({"prompt": "the plot", "chosen": "good", "rejected": "bad"}, "response_column: chosen"),
        ({"question": "the plot", "answer": "good"}, "prompt_column may list several columns"),
    ],
)
def test_sft_missing_columns_say_what_to_set(tmp_path, row, hint):
    with pytest.raises(ValueError, match=re.escape(hint)):
        build_datasets(cfg(tmp_path, _jsonl(tmp_path / "x.jsonl", [row])), make_tokenizer(bert_like=False), "sft")


def test_sft_roles_are_normalised_and_empty_answers_refused(tmp_path, caplog):
    other_names = [
        {"role": "Prompter", "content": "was the movie good"},
        {"role": "Assistant", "content": "the movie was great"},
        {"role": "user", "content": "the plot"},
        {"role": "bot", "content": "not very good"},
    ]
    _same_as_messages(tmp_path, [{"messages": other_names}], [CHAT[1:]])
    odd = [{"role": "narrator", "content": "the plot"}, *CHAT[1:3]]
    tok = make_tokenizer(bert_like=False)
    build_datasets(cfg(tmp_path, _jsonl(tmp_path / "odd.jsonl", [{"messages": odd}])), tok, "sft")
    assert "roles ['narrator'] are none of" in caplog.text
    json_rows = [{"prompt": "a", "response": "good"}, {"prompt": "b", "response": " "}]
    csv_rows = pd.DataFrame({"prompt": ["a", "b"], "response": ["good", None]})
    for path in (_jsonl(tmp_path / "e.jsonl", json_rows), _csv(tmp_path / "e.csv", csv_rows)):
        with pytest.raises(ValueError, match=r"train_file: row 1: the response is empty"):
            build_datasets(cfg(tmp_path, path), make_tokenizer(bert_like=False), "sft")
    only_users = _jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    with pytest.raises(ValueError, match=r"no row has an assistant turn to learn \(roles found: \['user'\]\)"):
        build_datasets(cfg(tmp_path, only_users), make_tokenizer(bert_like=False), "sft")


@pytest.mark.parametrize("seed", range(6))
def test_sft_rows_without_an_answer_are_dropped_before_the_eval_split(tmp_path, seed):
    rows = [{"messages": CHAT} for _ in range(9)] + [{"messages": CHAT[:2]}]
    path = _jsonl(tmp_path / "c.jsonl", rows)
    data = build_datasets(cfg(tmp_path, path, eval_split=0.1, seed=seed), make_tokenizer(bert_like=False), "sft")
    assert len(data.train) + len(data.eval) == 9 and len(data.eval) == 1


def test_a_file_read_as_one_column_asks_about_its_separator(tmp_path, bert_tok):
    (tmp_path / "semi.csv").write_text("text;label\ngood movie;pos\nbad plot;neg\n")
    with pytest.raises(ValueError, match="one column named 'text;label': is it separated by something else"):
        build_datasets(cfg(tmp_path, tmp_path / "semi.csv"), bert_tok, "classification")


def test_token_lengths_and_max_token_follow_a_split_datasets_rows():
    """Computed by Arrow over the rows a split (an indices mapping) selects, as Python would over the lists."""
    import datasets

    from lorafa.data_files import max_token, token_lengths

    rows = [[i % 7] * (i % 5) for i in range(200)]
    part = datasets.Dataset.from_dict({"ids": rows}).train_test_split(test_size=0.25, seed=1)["test"]
    assert token_lengths(part, "ids") == [len(r) for r in part["ids"]]
    assert max_token(part, "ids") == max(max(r, default=-1) for r in part["ids"])
    assert max_token(datasets.Dataset.from_dict({"ids": [[], []]}), "ids") == -1


def test_a_stray_quote_in_a_one_column_tsv_keeps_its_rows_and_ndjson_folders_load(tmp_path):
    """A quoted reading that runs rows together from a stray opening quote (no tab to tell) is not taken; a
    pandas-written multi-line cell is. A folder of .ndjson files (JSON Lines) loads."""
    import pandas as pd

    (tmp_path / "one.tsv").write_text('text\n"Hello there"\n"Stray opening quote\nsecond row\nthird row\nend "x" here\n')
    assert len(load_table(str(tmp_path / "one.tsv"))) == 5
    texts = [f"plain {i}" for i in range(5)] + ['she said "hi"', "two\nlines", "end"]
    pd.DataFrame({"text": texts}).to_csv(tmp_path / "multi.tsv", sep="\t", index=False)
    assert load_table(str(tmp_path / "multi.tsv"))["text"][:] == texts
    folder = tmp_path / "nd"
    folder.mkdir()
    (folder / "train.ndjson").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    assert load_table(str(folder))["text"][:] == ["a", "b"]


def test_a_text_file_read_with_another_column_name_is_told_its_column(tmp_path, bert_tok):
    (tmp_path / "t.txt").write_text("one line of text\nanother line\n")
    cfg = DataConfig(train_file=str(tmp_path / "t.txt"), text_column="body", block_size=4)
    with pytest.raises(ValueError, match=r"column 'body' \(text_column\) not found.*set data.text_column=text"):
        build_datasets(cfg, bert_tok, "clm")
