"""Data files or Hub datasets → tokenized Hugging Face datasets and a padding collator, per task (issue 3).

`build_datasets(cfg, tokenizer, task)` reads a CSV / TSV / JSON / JSONL / Parquet / text file (optionally
compressed: .gz, .bz2, .xz), a folder of such files, a `save_to_disk` folder or a Hugging Face Hub dataset
(`OWNER/NAME:CONFIG@SPLIT`) through `datasets` (`lorafa.data_files`), checks it (missing file or column, empty
set, labels that do not parse, eval labels unseen in training), holds out a seeded eval split when no eval file is
given, and tokenizes it for one task:

- `classification`: one text or a text pair → input_ids, attention_mask (token_type_ids), labels = class id
- `regression`: the same with a float label
- `sft`: prompt/response pairs or whole conversations → input_ids with labels = -100 outside the assistant's
  turns (see `lorafa.sft`)
- `seq2seq`: source → input_ids, target → labels (encoder–decoder models)
- `clm`: raw text → concatenated and cut into `block_size` blocks, labels = input_ids

`make_collator(task, tokenizer)` pads a list of such examples into a batch (right padding; labels with -100).
Datasets are processed in memory: nothing is written next to the user's files, and DDP ranks cannot race on
cache files.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from lorafa.assets import resolve
from lorafa.data_files import folder_validation_split, load_table, token_lengths
from lorafa.sft import (
    CONVERSATION_COLUMNS,
    IGNORE_INDEX,
    KNOWN_ROLES,
    Message,
    conversation,
    short_repr,
    tokenize_conversations,
)

logger = logging.getLogger(__name__)

_BatchFn = Callable[[dict[str, list[Any]]], dict[str, list[Any]]]

TASKS = ("classification", "regression", "sft", "seq2seq", "clm")

# The config fields naming the columns each task reads; `_select_roles` renames the columns to these fields.
_ROLES = {
    "classification": ("text_column", "text_pair_column", "label_column"),
    "regression": ("text_column", "text_pair_column", "label_column"),
    "sft": ("prompt_column", "response_column"),
    "seq2seq": ("source_column", "target_column"),
    "clm": ("text_column",),
}


@dataclass
class DataConfig:
    """Where the data is and how to read it. `validate()` raises ValueError naming the first invalid field."""

    train_file: str = ""
    """Training data: a .csv/.tsv/.json/.jsonl/.parquet/.arrow/.txt file (.gz/.bz2/.xz too), a folder of such files (its
    `train` split), a `save_to_disk` folder, `asset:NAME` (see `lorafa.assets`), or, when no such local path
    exists, a Hub dataset `OWNER/NAME[:CONFIG][@SPLIT]` (default split `train`)."""
    eval_file: str | None = None
    """Evaluation data in the same forms (a folder's or Hub dataset's default split is the first of validation,
    eval, test); None: the validation (or eval, dev) split of a train_file folder, else `eval_split` of the
    training data held out."""
    eval_split: float = 0.1
    """Fraction of train_file held out (seeded) for evaluation when eval_file is None and train_file is no folder
    with a validation split; 0 means no evaluation."""
    text_column: str = "text"
    """Input text (classification, regression) or raw text (clm)."""
    text_pair_column: str | None = None
    """Second text of a sentence pair (GLUE-style pair tasks); None for single sentences."""
    label_column: str = "label"
    """Class (string or integer) for classification, number for regression."""
    label_names: list[str] | None = None
    """Classes in id order; rows with any other label are dropped. None: the sorted labels found in train_file."""
    prompt_column: str | list[str] = "prompt"
    """Instruction / user turn (sft); a list of columns is joined with blank lines, empty cells skipped (Alpaca:
    [instruction, input]). A cell may hold a list of messages (TRL's conversational prompt-completion form)."""
    response_column: str = "response"
    """Answer the model learns to produce (sft); a cell may hold a list of assistant messages."""
    system_column: str | None = None
    """sft pairs: a column with each row's system message (e.g. OpenOrca's system_prompt); None: no system
    message."""
    messages_column: str | None = None
    """sft: a column of whole conversations, read instead of prompt_column/response_column: each row a list of
    {"role", "content"} messages (ShareGPT's {"from": "human"|"gpt", "value"} too; a JSON string in CSV; text-part
    contents joined). Every assistant turn is learned, everything else masked. None: the `messages` (else
    `conversations`) column of each file that has no prompt_column."""
    source_column: str = "source"
    """Encoder input (seq2seq)."""
    target_column: str = "target"
    """Decoder output the model learns to produce (seq2seq)."""
    max_length: int = 256
    """Tokens kept per example (the source, for seq2seq); longer examples are truncated on the right."""
    max_target_length: int | None = None
    """Tokens kept per seq2seq target; None uses max_length."""
    use_chat_template: bool = True
    """sft: format with the tokenizer's chat template when it has one; else "prompt\\nresponse<eos>"."""
    block_size: int = 128
    """clm: tokens per training block."""
    max_train_samples: int | None = None
    """Keep a seeded random subset of this many training rows (blocks, for clm); None keeps all."""
    max_eval_samples: int | None = None
    """Keep a seeded random subset of this many eval rows (blocks, for clm); None keeps all."""
    seed: int = 0
    """Seed of the eval split and of the subsets."""
    cache_dir: str | None = None
    """Where `datasets` keeps its Arrow copy of data files; None uses its default (~/.cache/huggingface)."""

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if not isinstance(self.train_file, str) or not self.train_file:
            raise ValueError(
                f"train_file must be a path, Hub dataset id or asset:NAME, got {self.train_file!r}"
            )
        if self.eval_file is not None and (not isinstance(self.eval_file, str) or not self.eval_file):
            raise ValueError(
                f"eval_file must be a path, Hub dataset id, asset:NAME or None, got {self.eval_file!r}"
            )
        if isinstance(self.eval_split, bool) or not isinstance(self.eval_split, int | float):
            raise ValueError(f"eval_split must be a number in [0, 1), got {self.eval_split!r}")
        if not 0.0 <= self.eval_split < 1.0:
            raise ValueError(f"eval_split must be in [0, 1), got {self.eval_split!r}")
        prompt = self.prompt_column
        if isinstance(prompt, list | tuple):
            if not prompt or not all(isinstance(c, str) and c for c in prompt):
                raise ValueError(f"prompt_column must be a column name or a list of them, got {prompt!r}")
        elif not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt_column must be a non-empty column name, got {prompt!r}")
        for name in (
            "text_column",
            "label_column",
            "response_column",
            "source_column",
            "target_column",
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty column name, got {value!r}")
        for name in ("text_pair_column", "messages_column", "system_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a column name or None, got {value!r}")
        if self.label_names is not None:
            names = self.label_names
            if not isinstance(names, list | tuple) or not all(
                isinstance(n, str | int) and not isinstance(n, bool) for n in names
            ):
                raise ValueError(f"label_names must be a list of labels or None, got {names!r}")
            keys = [_label_key(n) for n in names]
            if len(keys) < 2 or None in keys or len(set(keys)) != len(keys):
                raise ValueError(
                    f"label_names must hold at least 2 distinct, non-empty labels, got {names!r}"
                )
        for name in ("max_length", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_target_length", "max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.use_chat_template, bool):
            raise ValueError(f"use_chat_template must be true or false, got {self.use_chat_template!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ValueError(f"cache_dir must be a path or None, got {self.cache_dir!r}")


@dataclass
class PreparedData:
    """Tokenized datasets ready for `make_collator`, plus what the model head needs."""

    train: Any
    """`datasets.Dataset` of training examples."""
    eval: Any | None
    """`datasets.Dataset` of evaluation examples, or None (eval_split 0 and no eval_file)."""
    label_names: list[str] | None
    """Classification only: class names in id order (label id i is label_names[i]); save it with the output."""
    num_labels: int | None
    """Classification: len(label_names); regression: 1; other tasks: None."""

    @property
    def id2label(self) -> dict[int, str] | None:
        """The `id2label` a Hugging Face config expects, or None outside classification."""
        return None if self.label_names is None else dict(enumerate(self.label_names))


# sft layouts found when a file lacks the configured default prompt/response columns, tried in order: (name,
# prompt columns: the first required, the others joined when the file has them, response column).
_SFT_LAYOUTS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("TRL prompt/completion", ("prompt",), "completion"),
    ("Alpaca instruction/input/output", ("instruction", "input"), "output"),
    ("Dolly instruction/context/response", ("instruction", "context"), "response"),
    ("OpenOrca question/response", ("question",), "response"),
)
# A found layout's system message: the first of these columns the file has (OpenOrca's system_prompt).
_SYSTEM_COLUMNS = ("system", "system_prompt")
# Columns that usually belong in the prompt; named in a warning when the configured columns leave them out.
_PROMPT_EXTRAS = ("input", "context", "system", "system_prompt")

Columns = dict[str, Any]
"""Config field → column name (prompt_column: a list of names for sft), as `_required_columns` found them."""


def _required_columns(cfg: DataConfig, task: str, ds: Any) -> Columns:
    """Config field → column name, for the columns `task` reads from `ds`. sft: messages_column if set; else the
    prompt/response columns when the file has them; else its conversation column (messages, conversations); else
    a known layout (`_SFT_LAYOUTS`) when the columns are the defaults."""
    if task != "sft":
        return {role: getattr(cfg, role) for role in _ROLES[task] if getattr(cfg, role) is not None}
    if cfg.messages_column is not None:
        return {"messages_column": cfg.messages_column}
    names = ds.column_names
    prompt = [cfg.prompt_column] if isinstance(cfg.prompt_column, str) else list(cfg.prompt_column)
    configured: Columns = {"prompt_column": prompt, "response_column": cfg.response_column}
    if cfg.system_column is not None:
        configured["system_column"] = cfg.system_column
    if all(c in names for c in [*prompt, cfg.response_column]):
        unused = [c for c in _PROMPT_EXTRAS if c in names and c not in configured.values() and c not in prompt]
        if unused:
            logger.warning(
                "sft: column(s) %s are not part of the prompt (prompt_column %r); to include them set "
                "prompt_column: %s (joined with blank lines) or system_column", unused, cfg.prompt_column,
                [*prompt, *[c for c in unused if "system" not in c]],
            )  # fmt: skip
        return configured
    column = next((c for c in CONVERSATION_COLUMNS if c in names), None)
    if column is not None:
        logger.info("sft: no %r/%r columns; training on the conversations in %r", prompt, cfg.response_column,
                    column)  # fmt: skip
        return {"messages_column": column}
    if prompt == ["prompt"] and cfg.response_column == "response" and cfg.system_column is None:
        for name, prompts, response in _SFT_LAYOUTS:
            if prompts[0] in names and response in names:
                found: Columns = {"prompt_column": [c for c in prompts if c in names], "response_column": response}
                system = next((c for c in _SYSTEM_COLUMNS if c in names), None)
                if system is not None:
                    found["system_column"] = system
                logger.warning("sft: no prompt/response columns; reading the %s layout: %s", name, found)
                return found
    return configured


def _check_columns(ds: Any, columns: Columns, field: str) -> None:
    """ValueError naming a missing column, the file's columns and what to set."""
    for role, value in columns.items():
        for column in [value] if isinstance(value, str) else value:
            if column not in ds.column_names:
                raise ValueError(
                    f"{field}: column {column!r} ({role}) not found; the columns are {ds.column_names}"
                    f"{_column_hint(role, ds.column_names)}"
                )


def _column_hint(role: str, names: list[str]) -> str:
    """What to set when a column is missing, from the columns the file has."""
    if len(names) == 1 and any(sep in names[0] for sep in (";", "\t", "|")):
        return f"; the file has one column named {names[0]!r}: is it separated by something else than commas?"
    if role in ("prompt_column", "response_column"):
        if "chosen" in names:
            return "; preference data: set response_column: chosen (sft learns the chosen answer)"
        if "text" in names:
            return "; one text column is language modelling: use task: clm"
        return (
            "; set prompt_column / response_column (prompt_column may list several columns), or "
            "messages_column for a column of whole conversations"
        )
    if names == ["text"]:  # a .txt file, or a one-column table
        return f"; set data.{role}=text"
    return ""


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _column(ds: Any, name: str) -> list[Any]:
    """Every value of one column as a list, read at once: datasets' lazy Column costs tens of microseconds per row
    when indexed or iterated row by row."""
    return list(ds[name][:])


def _conversation_table(ds: Any, columns: Columns, field: str) -> Any:
    """A dataset of checked conversations ([{"role", "content"}, ...]) in column messages_column, from the
    messages_column or the prompt/response columns of `ds`, with each row's index in `ds` (column row). Rows
    without an assistant turn are dropped with a warning (before any split, so no split can end up empty)."""
    import datasets

    rows: list[list[Message]] = []
    if "messages_column" not in columns:
        prompts = [_column(ds, c) for c in columns["prompt_column"]]
        responses = _column(ds, columns["response_column"])
        system = columns.get("system_column")
        systems = _column(ds, system) if system is not None else [None] * len(ds)
        for i in range(len(ds)):
            try:
                rows.append(_pair_row([p[i] for p in prompts], responses[i], systems[i]))
            except ValueError as e:
                raise ValueError(f"{field}: row {i}: {e} (columns {columns})") from None
    else:
        column = columns["messages_column"]
        for i, value in enumerate(_column(ds, column)):
            try:
                rows.append(conversation(value))
            except ValueError as e:
                raise ValueError(f"{field}: column {column!r} (messages_column), row {i}: {e}") from None
    _warn_unknown_roles(rows, field)
    kept = [i for i, c in enumerate(rows) if any(m["role"] == "assistant" for m in c)]
    if len(kept) < len(rows):
        roles = sorted({m["role"] for c in rows for m in c})
        if not kept:
            raise ValueError(f"{field}: no row has an assistant turn to learn (roles found: {roles})")
        missing = sorted(set(range(len(rows))) - set(kept))
        logger.warning("%s: dropped %s without an assistant turn, e.g. rows %s", field, _rows(len(missing)),
                       missing[:5])  # fmt: skip
    return datasets.Dataset.from_dict({"messages_column": [rows[i] for i in kept], "row": kept})


def _warn_unknown_roles(rows: list[list[Message]], field: str) -> None:
    unknown = sorted({m["role"] for c in rows for m in c} - set(KNOWN_ROLES))
    if unknown:
        logger.warning(
            "%s: roles %s are none of %s: they are passed to the chat template as they are and never learned",
            field, unknown, list(KNOWN_ROLES),
        )  # fmt: skip


def _pair_row(prompts: list[Any], response: Any, system: Any) -> list[Message]:
    """One prompt/response row as a conversation: string prompt parts joined with blank lines (empty optional
    parts skipped), or a list of messages (TRL's conversational prompt-completion); the response a string or a
    list of assistant messages."""
    head = _text(prompts[0], "prompt")
    rest = [p for p in (_text(v, "prompt") for v in prompts[1:] if v is not None) if p]
    if isinstance(head, list):
        if rest:
            raise ValueError("a prompt given as messages cannot be joined with the other prompt columns")
        messages = head
    else:
        if any(isinstance(p, list) for p in rest):
            raise ValueError("only the first prompt column may hold a list of messages")
        messages = [{"role": "user", "content": "\n\n".join([head, *cast(list[str], rest)])}]
    if system is not None and _text(system, "system"):
        if any(m["role"] == "system" for m in messages):
            raise ValueError("the row has a system column and a system message in its prompt")
        messages = [{"role": "system", "content": str(system)}, *messages]
    answer = _text(response, "response")
    if isinstance(answer, list):
        if not answer or any(m["role"] != "assistant" for m in answer):
            raise ValueError("a response given as messages must hold assistant messages only")
        return [*messages, *answer]
    if not answer.strip():
        raise ValueError("the response is empty (it would teach the model to answer nothing)")
    return [*messages, {"role": "assistant", "content": answer}]


def _text(value: Any, what: str) -> str | list[Message]:
    """A cell as text (numbers written out) or, for a list, as messages; None and other objects are errors."""
    if value is None:
        raise ValueError(f"the {what} is empty")
    if isinstance(value, list | tuple):
        return conversation(value)
    if isinstance(value, dict):
        raise ValueError(f"the {what} is an object {short_repr(value)}, not text or a list of messages")
    return value if isinstance(value, str) else str(value)


def _refuse_nested(values: list[Any], what: str, expected: str) -> None:
    """ValueError naming the first row whose value is a list or an object, not a single value."""
    row = next((i for i, v in enumerate(values) if isinstance(v, list | tuple | dict)), None)
    if row is not None:
        kind = "an object" if isinstance(values[row], dict) else "a list"
        raise ValueError(f"{what} holds {kind} in row {row} ({short_repr(values[row])}), not {expected}")


def _scalar(feature: Any) -> bool:
    """Whether a datasets feature holds one value per row (a string, number, bool or class label)."""
    import datasets

    return isinstance(feature, datasets.Value | datasets.ClassLabel)


def _null_rows(ds: Any, column: str) -> list[int]:
    """Rows whose value in `column` is missing, found by Arrow (no Python object per row)."""
    import pyarrow.compute as pc

    return cast(list[int], pc.indices_nonzero(pc.is_null(ds.with_format("arrow")[column])).to_pylist())


def _check_texts(ds: Any, columns: dict[str, str], field: str, label_ids: list[int] | None) -> None:
    """ValueError for missing text values, ignoring rows that label_names drops (label id -1)."""
    for role, column in columns.items():
        if role == "label_column":
            continue  # labels get their own checks
        if not _scalar(ds.features[column]):  # lists or objects (or a Json column holding some): find one
            _refuse_nested(_column(ds, column), f"{field}: column {column!r} ({role})", "text")
        empty = [i for i in _null_rows(ds, column) if label_ids is None or label_ids[i] >= 0]
        if empty:
            raise ValueError(
                f"{field}: column {column!r} ({role}) is empty in {len(empty)} rows, e.g. rows {empty[:5]}"
            )


# ----------------------------------------------------------------------------------------------------- labels


def _label_key(value: Any) -> str | None:
    """Canonical string of a class label (1, 1.0 and "1" agree); None when it is missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    key = str(value).strip()
    if re.fullmatch(r"-?\d+\.0+", key):  # "1.0" as a CSV file holds a float column's 1.0
        key = key.split(".")[0]
    return key or None


# The key of a ClassLabel row labelled -1: Hugging Face's "no label" (GLUE's test splits), dropped with a warning.
UNLABELED = "\x00unlabeled"


def _label_keys(ds: Any, column: str, field: str) -> list[str | None]:
    """Label keys of every row; integer ClassLabel values become their names (as load_from_disk stores them), and
    a ClassLabel -1 becomes UNLABELED."""
    feature = ds.features[column]
    values = _column(ds, column)
    what = "one class (multi-label classification, several classes per row, is not supported)"
    _refuse_nested(values, f"{field}: label_column {column!r}", what)
    names = _class_label_names(ds, column)
    if names is not None:
        values = [
            UNLABELED if v == -1 else feature.int2str(v) if isinstance(v, int) and 0 <= v < len(names) else v
            for v in values
        ]
    return [_label_key(v) for v in values]


def _class_label_names(ds: Any, column: str) -> list[str] | None:
    """The class names of a ClassLabel column, in the dataset's id order; None for other columns."""
    import datasets

    feature = ds.features[column]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _sorted_labels(keys: set[str]) -> list[str]:
    """Integers in numeric order (so 0..K-1 keep their ids), anything else alphabetically."""
    if all(re.fullmatch(r"-?\d+", k) for k in keys):
        return sorted(keys, key=lambda k: (int(k), k))  # "01" and "1" tie on int: keep a fixed order
    return sorted(keys)


def _class_ids(
    cfg: DataConfig, train: Any, eval_ds: Any | None
) -> tuple[list[str], list[int], list[int] | None]:
    """Label names in id order and each row's label id (-1 for labels outside a given label_names)."""
    column = cfg.label_column
    keys = {"train_file": _label_keys(train, column, "train_file")}
    if eval_ds is not None:
        keys["eval_file"] = _label_keys(eval_ds, column, "eval_file")
    for field, ks in keys.items():
        missing = [i for i, k in enumerate(ks) if k is None]
        if missing:
            raise ValueError(
                f"{field}: label_column {column!r} is empty in {len(missing)} rows, e.g. rows {missing[:5]}"
            )
    for field, ks in keys.items():
        unlabeled = sum(k == UNLABELED for k in ks)
        if unlabeled:
            logger.warning("%s: %d rows are labelled -1 (no label, as in GLUE's test splits): dropped", field,
                           unlabeled)  # fmt: skip
    if cfg.label_names is not None:
        names = [str(_label_key(n)) for n in cfg.label_names]
    else:
        found = {k for k in keys["train_file"] if k not in (None, UNLABELED)}
        # A ClassLabel column keeps the dataset's own class order (a model's id 0 is the dataset's id 0).
        declared = _class_label_names(train, column)
        names = [str(_label_key(n)) for n in declared] if declared is not None else _sorted_labels(found)
        unseen = sorted({k for k in keys.get("eval_file", []) if k not in (None, UNLABELED)} - set(names))
        if unseen:
            raise ValueError(
                f"eval_file: labels {unseen} never occur in train_file, whose labels are {names}"
            )
        if len(found) < 2:
            raise ValueError(
                f"train_file: label_column {column!r} needs at least 2 distinct labels, found {sorted(found)}"
            )
        _warn_case_variants(names, column)
        n = len(keys["train_file"])
        if any(_is_fraction(k) for k in names) or len(names) > max(20, n // 2):
            logger.warning(
                "train_file: label_column %r has %d distinct values in %d rows; classification makes one class "
                "per value (for a numeric target use task=regression)", column, len(names), n,
            )  # fmt: skip
    ids = {name: i for i, name in enumerate(names)}
    train_ids = [ids.get(k, -1) for k in keys["train_file"]]  # type: ignore[arg-type]
    eval_ids = [ids.get(k, -1) for k in keys["eval_file"]] if "eval_file" in keys else None  # type: ignore[arg-type]
    return names, train_ids, eval_ids


def _warn_case_variants(names: list[str], column: str) -> None:
    """Warn when classes differ only in case (`Pos`, `pos`): most likely one class written two ways. (Surrounding
    spaces are stripped by `_label_key` already.)"""
    by_case: dict[str, list[str]] = {}
    for name in names:
        by_case.setdefault(name.casefold(), []).append(name)
    variants = [group for group in by_case.values() if len(group) > 1]
    if variants:
        logger.warning(
            "train_file: label_column %r has labels that differ only in case, which are separate classes: %s; "
            "write each class one way, or set label_names", column, variants[:5],
        )  # fmt: skip


def _is_fraction(key: str) -> bool:
    try:
        return not float(key).is_integer()
    except ValueError:
        return False


def _drop_unlisted(ds: Any, field: str, names: list[str]) -> Any:
    """Drop rows whose label id is -1 (not in label_names); ValueError when none is left."""
    desc = f"{field}: keeping label_names"
    kept = ds.filter(lambda x: x >= 0, input_columns="label_column", desc=desc, **_in_memory())
    if len(kept) < len(ds):
        logger.warning(
            "%s: dropped %s whose label is not one of the classes %s", field, _rows(len(ds) - len(kept)), names
        )
    if len(kept) == 0:
        raise ValueError(f"{field}: no row has a label in label_names {names}")
    return kept


def _float_labels(ds: Any, column: str, field: str) -> list[float]:
    """Each row's label as a float; ValueError listing rows whose label is not a finite number."""
    values: list[float] = []
    bad: list[tuple[int, Any]] = []
    for i, v in enumerate(_column(ds, column)):
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = math.nan
        if isinstance(v, bool) or not math.isfinite(x):
            bad.append((i, v))
        values.append(x)
    if bad:
        raise ValueError(
            f"{field}: label_column {column!r} must hold numbers for regression; {len(bad)} rows do not, "
            f"e.g. (row, value) {bad[:5]}"
        )
    return values


def _select_roles(ds: Any, columns: dict[str, str], labels: list[Any] | None) -> Any:
    """A dataset whose only columns are the roles ("text_column", ..., "label_column") the task reads.

    Naming columns by role keeps user column names (which may be "labels" or "input_ids") away from the
    tokenizer's outputs: `datasets.map` casts an output back to the type of a same-named input column.
    """
    texts = {role: column for role, column in columns.items() if role != "label_column"}
    ds = ds.select_columns(list(dict.fromkeys(texts.values())))
    # A map copies rather than renames, because two roles may read one column.
    ds = ds.map(
        lambda b: {role: b[column] for role, column in texts.items()},
        batched=True,
        remove_columns=ds.column_names,
        desc="selecting columns",
        **_in_memory(),
    )
    return ds if labels is None else ds.add_column("label_column", labels)


# ----------------------------------------------------------------------------------------------- tokenization


def _in_memory() -> dict[str, Any]:
    # A fresh fingerprint skips datasets' hashing of the tokenizer (slow, and warns for some); nothing is cached
    # because everything stays in memory.
    return {"keep_in_memory": True, "new_fingerprint": uuid.uuid4().hex}


def _texts(batch: dict[str, list[Any]], role: str) -> list[str]:
    return [str(v) for v in batch[role]]


def _tokenize_classification(tokenizer: Any, cfg: DataConfig, pair: bool) -> _BatchFn:
    # A tokenizer that marks pairs with special tokens (BERT, RoBERTa, T5...) encodes a pair itself; one that adds
    # none (GPT-2, SmolLM2) would run the two texts together, so they get its EOS (else a line break) between them.
    marks_pairs = tokenizer.num_special_tokens_to_add(pair=True) > 0
    sep: list[int] = []
    if pair and not marks_pairs:
        eos = tokenizer.eos_token_id
        sep = [eos] if eos is not None else list(tokenizer("\n", add_special_tokens=False)["input_ids"])

    def fn(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts = _texts(batch, "text_column")
        pairs = _texts(batch, "text_pair_column") if pair else None
        if pairs is not None and sep:
            enc = _joined_pairs(tokenizer, texts, pairs, sep, cfg.max_length)
        else:
            enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length)
        return {**enc, "labels": batch["label_column"]}

    return fn


def _joined_pairs(
    tokenizer: Any, firsts: list[str], seconds: list[str], sep: list[int], max_length: int
) -> dict[str, list[list[int]]]:
    """`a sep b` for a tokenizer that marks no pairs: each text tokenized alone and cut longest first (a token at a
    time from the longer, as the tokenizer's own pair truncation does), so a long first text cannot push the
    second out of max_length."""
    budget = max_length - len(sep)
    input_ids = []
    for a, b in zip(
        tokenizer(firsts, add_special_tokens=False)["input_ids"],
        tokenizer(seconds, add_special_tokens=False)["input_ids"],
        strict=True,
    ):
        a, b = list(a), list(b)
        while len(a) + len(b) > budget:
            (a if len(a) > len(b) else b).pop()
        input_ids.append(a + sep + b)
    return {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids]}


def _tokenize_sft(tokenizer: Any, cfg: DataConfig) -> _BatchFn:
    def fn(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        # Conversations checked and normalised by _conversation_table; errors name the row of the file.
        return tokenize_conversations(
            tokenizer, batch["messages_column"], cfg.use_chat_template, cfg.max_length, batch["row"]
        )

    return fn


def _tokenize_seq2seq(tokenizer: Any, cfg: DataConfig) -> _BatchFn:
    def fn(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        enc = tokenizer(_texts(batch, "source_column"), truncation=True, max_length=cfg.max_length)
        target_length = cfg.max_target_length or cfg.max_length
        targets = tokenizer(
            text_target=_texts(batch, "target_column"), truncation=True, max_length=target_length
        )
        return {**enc, "labels": targets["input_ids"]}

    return fn


def _tokenize_clm(tokenizer: Any, cfg: DataConfig) -> _BatchFn:
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def fn(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        # Rows are joined into one stream cut into equal blocks (the map runs over all rows at once, so only the
        # stream's last partial block is dropped). A row ending in a line break (a text file's lines, read with
        # them) continues into the next; any other row is a document and ends with EOS.
        texts = [t for t in _texts(batch, "text_column") if t.strip() or t.endswith("\n")]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        stream = [
            tok
            for t, ids in zip(texts, encoded, strict=True)
            for tok in ids + ([] if t.endswith("\n") else eos)
        ]
        n = len(stream) // cfg.block_size * cfg.block_size
        blocks = [stream[i : i + cfg.block_size] for i in range(0, n, cfg.block_size)]
        return {
            "input_ids": blocks,
            "attention_mask": [[1] * len(b) for b in blocks],
            "labels": [list(b) for b in blocks],
        }

    return fn


_TOKENIZERS: dict[str, Callable[[Any, DataConfig], _BatchFn]] = {
    "classification": lambda tok, cfg: _tokenize_classification(tok, cfg, cfg.text_pair_column is not None),
    "regression": lambda tok, cfg: _tokenize_classification(tok, cfg, cfg.text_pair_column is not None),
    "sft": _tokenize_sft,
    "seq2seq": _tokenize_seq2seq,
    "clm": _tokenize_clm,
}


def _has_answer(labels: list[int]) -> bool:
    return any(x != IGNORE_INDEX for x in labels)


def _subset(ds: Any, n: int | None, seed: int) -> Any:
    return ds if n is None or n >= len(ds) else ds.shuffle(seed=seed).select(range(n))


def _check_room(cfg: DataConfig, tokenizer: Any, task: str) -> None:
    """ValueError when max_length leaves no token for the text after the tokenizer's special tokens (the
    tokenizer would silently skip truncation, or cut every text away)."""
    if task not in ("classification", "regression", "seq2seq"):
        return
    pair = task != "seq2seq" and cfg.text_pair_column is not None
    special = tokenizer.num_special_tokens_to_add(pair=pair)
    needed = special + (2 if pair else 1)  # at least one token of each text
    if cfg.max_length < needed:
        raise ValueError(
            f"max_length: {cfg.max_length} tokens leave no room for the text: the tokenizer adds "
            f"{special} special tokens{' to a pair' if pair else ''}; use at least {needed}"
        )


def _prepare(ds: Any, cfg: DataConfig, tokenizer: Any, task: str, field: str, cap: int | None) -> Any:
    """Cap the rows, tokenize, and check that something is left."""
    if task != "clm":
        ds = _subset(ds, cap, cfg.seed)
    tokenize = _TOKENIZERS[task](tokenizer, cfg)
    desc = f"{field}: tokenizing for {task}"
    rows_per_call = {"batch_size": None} if task == "clm" else {}  # clm: one stream, one partial block lost
    try:
        ds = ds.map(
            tokenize, batched=True, remove_columns=ds.column_names, desc=desc, **rows_per_call, **_in_memory()
        )
    except ValueError as e:  # e.g. a chat template that refuses a conversation
        raise ValueError(f"{field}: {e}") from None
    if task == "sft":
        # An example whose prompt fills max_length has no answer token to learn from (rows without an assistant
        # turn were dropped by _conversation_table).
        before = len(ds)
        ds = ds.filter(_has_answer, input_columns="labels", desc=f"{field}: checking answers", **_in_memory())
        if len(ds) < before:
            logger.warning(
                "%s: dropped %d sft examples with no answer token within max_length (the prompt fills it)", field,
                before - len(ds),
            )  # fmt: skip
    if task == "clm":
        ds = _subset(ds, cap, cfg.seed)
    if len(ds) == 0:
        reason = {
            "sft": "no example has an answer token within max_length",
            "clm": "too few tokens for one block of block_size",
        }
        raise ValueError(f"{field}: no examples left after tokenization ({reason.get(task, 'no rows')})")
    return ds


def same_data_file(a: str, b: str) -> bool:
    """Whether two data paths name one existing file (a folder serves both fields by its splits)."""
    try:
        pa, pb = (Path(resolve(p)).expanduser() for p in (a, b))
    except FileNotFoundError:  # a missing asset: load_table reports it, naming the field
        return False
    return pa.is_file() and pb.is_file() and pa.samefile(pb)


def build_datasets(cfg: DataConfig, tokenizer: Any, task: str) -> PreparedData:
    """Read, check, split and tokenize the data of `cfg` for `task`.

    Args:
        cfg: Data configuration (validated here).
        tokenizer: A Hugging Face tokenizer.
        task: One of `TASKS`.

    Returns:
        PreparedData with tokenized train/eval datasets (columns input_ids, attention_mask, labels and, when the
        tokenizer makes them, token_type_ids) and, for classification, the label names in id order.

    Raises:
        FileNotFoundError: train_file or eval_file does not exist (or is a missing asset).
        ValueError: an invalid config field, unknown task, missing column, empty data, labels that do not parse,
            eval labels unseen in training, or nothing left after tokenization.
    """
    cfg.validate()
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    train = load_table(cfg.train_file, "train_file", cfg.cache_dir)
    eval_ds = load_table(cfg.eval_file, "eval_file", cfg.cache_dir) if cfg.eval_file is not None else None
    if eval_ds is None and cfg.eval_split > 0:
        found = folder_validation_split(cfg.train_file, cfg.cache_dir)
        if found is not None:
            logger.warning("eval_file not set: evaluating on the %r split of %s", found[0], cfg.train_file)
            eval_ds = found[1]
    # sft: each file may hold prompt/response pairs or conversations, whatever the other holds.
    columns = _required_columns(cfg, task, train)
    _check_columns(train, columns, "train_file")
    eval_columns = columns
    if eval_ds is not None:
        eval_columns = _required_columns(cfg, task, eval_ds)
        _check_columns(eval_ds, eval_columns, "eval_file")

    label_names: list[str] | None = None
    num_labels: int | None = None
    train_labels: list[Any] | None = None
    eval_labels: list[Any] | None = None
    if task == "classification":
        label_names, train_labels, eval_labels = _class_ids(cfg, train, eval_ds)
        num_labels = len(label_names)
    elif task == "regression":
        train_labels = _float_labels(train, cfg.label_column, "train_file")
        eval_labels = _float_labels(eval_ds, cfg.label_column, "eval_file") if eval_ds is not None else None
        num_labels = 1
    if task == "sft":  # every sft table becomes conversations (a pair is a one-turn one)
        if cfg.use_chat_template and not getattr(tokenizer, "chat_template", None):
            logger.warning(
                "sft: the tokenizer has no chat template, so conversations use the plain format (each message's "
                "text on its own line, answers followed by EOS; roles are not marked); set use_chat_template: false "
                "to say so, or give the tokenizer a template"
            )
        train = _conversation_table(train, columns, "train_file")
        eval_ds = _conversation_table(eval_ds, eval_columns, "eval_file") if eval_ds is not None else None
    else:
        _check_texts(train, columns, "train_file", train_labels if task == "classification" else None)
        if eval_ds is not None:
            _check_texts(eval_ds, columns, "eval_file", eval_labels if task == "classification" else None)
        train = _select_roles(train, columns, train_labels)
        eval_ds = _select_roles(eval_ds, columns, eval_labels) if eval_ds is not None else None
    if label_names is not None:
        train = _drop_unlisted(train, "train_file", label_names)
        eval_ds = _drop_unlisted(eval_ds, "eval_file", label_names) if eval_ds is not None else None

    held_out = eval_ds is None and cfg.eval_split > 0
    if held_out:
        n_eval = math.ceil(len(train) * cfg.eval_split)
        if n_eval >= len(train):
            raise ValueError(
                f"eval_split: holding out {cfg.eval_split} of {len(train)} rows leaves none to train on"
            )
        split = train.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
        train, eval_ds = split["train"], split["test"]
        if label_names is not None:
            unseen = set(_column(eval_ds, "label_column")) - set(_column(train, "label_column"))
            if unseen:
                logger.warning(
                    "eval_split: labels %s of the held-out rows never occur in the rows left to train on",
                    sorted(label_names[i] for i in unseen)[:10],
                )

    _check_room(cfg, tokenizer, task)
    train = _prepare(train, cfg, tokenizer, task, "train_file", cfg.max_train_samples)
    if eval_ds is not None:
        field = "eval_split (the rows held out of train_file)" if held_out else "eval_file"
        eval_ds = _prepare(eval_ds, cfg, tokenizer, task, field, cfg.max_eval_samples)
    return PreparedData(train=train, eval=eval_ds, label_names=label_names, num_labels=num_labels)


# -------------------------------------------------------------------------------------------------- collation


@dataclass
class DataCollator:
    """Pads a list of tokenized examples into a batch of tensors, on the right.

    Sequence fields are padded to the longest in the batch (rounded up to `pad_to_multiple_of`): input_ids with
    `pad_token_id`, labels with -100 (ignored by the loss), everything else (attention_mask, token_type_ids) with
    0. Scalar labels are stacked: float32 for regression, int64 otherwise. Right padding keeps position ids of real
    tokens at 0..n-1, which training needs; left padding is for batched generation only.
    """

    pad_token_id: int
    """Id written into padded input_ids positions (they are masked out, so its value does not matter)."""
    float_labels: bool = False
    """Scalar labels are floats (regression)."""
    pad_to_multiple_of: int | None = None
    """Round padded lengths up to a multiple of this (tensor-core friendly shapes); None pads to the longest."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for key in features[0]:
            values = [f[key].tolist() if isinstance(f[key], torch.Tensor) else f[key] for f in features]
            if not isinstance(values[0], list | tuple):
                batch[key] = torch.tensor(values, dtype=torch.float32 if self.float_labels else torch.long)
                continue
            length = max(len(v) for v in values)
            if self.pad_to_multiple_of:
                length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
            pad = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
            batch[key] = torch.tensor([list(v) + [pad] * (length - len(v)) for v in values], dtype=torch.long)
        return batch


def example_lengths(data: Any, task: str) -> list[int]:
    """Tokens per example (the key of group_by_length, and of evaluation's batching): input ids, plus label ids
    for seq2seq (whose targets are padded separately)."""
    lengths = token_lengths(data, "input_ids")
    if task == "seq2seq":
        lengths = [n + m for n, m in zip(lengths, token_lengths(data, "labels"), strict=True)]
    return lengths


def make_collator(task: str, tokenizer: Any, pad_to_multiple_of: int | None = None) -> DataCollator:
    """The batch collator for examples made by `build_datasets(..., task)`.

    Args:
        task: One of `TASKS`.
        tokenizer: The tokenizer used to build the data; its pad token (else EOS, else UNK, else id 0) pads
            input_ids.
        pad_to_multiple_of: Optional multiple for padded lengths.

    Raises:
        ValueError: unknown task.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    # Padding is masked (attention_mask 0, labels -100), so any id the embedding has will do.
    candidates = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    pad = next((i for i in candidates if i is not None), 0)
    return DataCollator(
        pad_token_id=pad, float_labels=task == "regression", pad_to_multiple_of=pad_to_multiple_of
    )
