"""Reading data files and Hub datasets into `datasets.Dataset`s: the first step of `lorafa.data.build_datasets`.

`load_table(path, field)` reads a CSV / TSV / JSON / JSONL / Parquet / text file (optionally compressed: .gz, .bz2,
.xz), a folder of such files (its train split), a `save_to_disk` folder, an `asset:NAME`, or, when no such local
path exists, a Hub dataset `OWNER/NAME[:CONFIG][@SPLIT]`; errors name the config field and the file.
`folder_validation_split` finds a folder's validation split; `one_line` shortens library errors for messages.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Any

from lorafa.assets import resolve

logger = logging.getLogger(__name__)

# File type → the `datasets.Dataset.from_*` reader. These build the packaged builders directly; `load_dataset`
# would also ping the Hub to count downloads, which stalls for seconds without a network.
_READERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz")
_EVAL_SPLITS = ("validation", "eval", "test")
# A Hub dataset id with optional config and split: "rotten_tomatoes", "stanfordnlp/imdb@test", "nyu-mll/glue:sst2".
_HUB_ID = re.compile(r"(?P<id>[\w.-]+(?:/[\w.-]+)?)(?::(?P<config>[\w.-]+))?(?:@(?P<split>[\w.-]+))?")

def parse_hub_id(spec: str) -> tuple[str, str | None, str | None] | None:
    """Split a Hub dataset spec `OWNER/NAME[:CONFIG][@SPLIT]` into (dataset id, config, split).

    Only strings shaped like Hub ids count, so a mistyped local path never reaches the network: None for anything
    starting with `.`, `/` or `~`, holding more than one `/` or other characters outside `[A-Za-z0-9_.-]`, or
    whose id, config or split ends in a data file extension (`.csv`, `.gz`, ...).

    Args:
        spec: E.g. `rotten_tomatoes`, `stanfordnlp/imdb@test`, `nyu-mll/glue:sst2@validation`.

    Returns:
        (id, config or None, split or None), or None when `spec` is not shaped like a Hub id.
    """
    m = _HUB_ID.fullmatch(spec)
    if m is None or spec.startswith(".") or any(_is_data_file_name(p) for p in m.groups() if p):
        return None
    return m["id"], m["config"], m["split"]


def _is_data_file_name(name: str) -> bool:
    suffix = Path(name.lower()).suffix
    return suffix in _READERS or suffix in _COMPRESSIONS


def load_table(path: str, field: str = "train_file", cache_dir: str | None = None) -> Any:
    """Read a data file, a folder of them, a `save_to_disk` folder or a Hub dataset into a `datasets.Dataset`.

    A local path wins over a Hub dataset of the same name. From a folder of data files (split names inferred
    from file names by `datasets.load_dataset`, e.g. `train.csv`, `test.csv`, `data/train-*.parquet`) or a
    Hub dataset without `@SPLIT`, `field` picks the split: train for train_file, the first of validation / eval /
    test for eval_file; a lone split is taken whatever its name.

    Args:
        path: A file path, a folder, `asset:NAME`, or a Hub dataset `OWNER/NAME[:CONFIG][@SPLIT]`
            (see `parse_hub_id`).
        field: The config field that named it, for error messages and the default split.
        cache_dir: Forwarded to `datasets` (its Arrow copies of files and downloads).

    Raises:
        FileNotFoundError: nothing exists at `path`, and it is not shaped like a Hub id or loading that Hub
            dataset failed (offline, unknown id, config or split); the message gives the reason in one line.
        ValueError: unknown file type, unreadable or empty file or folder, no split that `field` means.
    """
    import datasets

    resolved = Path(resolve(path)).expanduser()
    if not resolved.exists():
        hub = parse_hub_id(path)
        if hub is None:
            raise FileNotFoundError(f"{field}: no such file or folder: {resolved}")
        ds = _load_hub(path, hub, field, cache_dir)
    elif resolved.is_dir():
        loaded = _load_folder(resolved, field, cache_dir)
        ds = _pick_split(loaded, field, resolved) if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        name = resolved.name.lower()
        stem = next((name[: -len(c)] for c in _COMPRESSIONS if name.endswith(c)), name)
        reader = _READERS.get(Path(stem).suffix)
        if reader is None:
            supported = ", ".join(list(_READERS) + [f"(+{c})" for c in _COMPRESSIONS])
            raise ValueError(f"{field}: cannot read {resolved}: supported file types are {supported}")
        if resolved.stat().st_size == 0:
            raise ValueError(f"{field}: {resolved} is empty")
        if reader == "csv":
            ds = _read_csv(resolved, Path(stem).suffix == ".tsv", field, cache_dir)
        else:
            kwargs: dict[str, Any] = {"keep_linebreaks": True} if reader == "text" else {}  # clm: see _tokenize_clm
            ds = _read(reader, resolved, field, cache_dir, kwargs)
    if len(ds) == 0:
        raise ValueError(f"{field}: {resolved} holds no rows")
    return ds


def _read(reader: str, path: Path, field: str, cache_dir: str | None, kwargs: dict[str, Any]) -> Any:
    """`datasets.Dataset.from_<reader>(path)`; a ValueError naming the file and the parser's reason."""
    import datasets

    try:
        return getattr(datasets.Dataset, f"from_{reader}")(str(path), cache_dir=cache_dir, **kwargs)
    except Exception as e:  # datasets wraps parser errors in several types; all mean "bad file" here
        cause = f" ({one_line(e.__cause__)})" if isinstance(e.__cause__, Exception) else ""
        raise ValueError(
            f"{field}: could not read {path} as {reader} (is it empty or malformed?): {one_line(e)}{cause}"
        ) from e


# A cell as a CSV writer quotes it: wrapped in quotes, inner quotes doubled.
_QUOTED_CELL = re.compile(r'"(?:[^"]|"")*"', re.DOTALL)


def _read_csv(path: Path, tsv: bool, field: str, cache_dir: str | None) -> Any:
    """A CSV/TSV file with every column read as strings (pandas would read "007" as 7.0 and "1e3" as 1000.0;
    labels are parsed later, per task) and only empty cells missing ("NA", "null", "None" are text).

    In a TSV a quote is an ordinary character (GLUE's files hold unpaired quotes, and whole sentences in quotes).
    The file is read with CSV quoting instead when reading it so fails, or when some cell reads as a whole quoted
    field (quotes around it, inner quotes doubled, as pandas and Excel write TSVs) and the quoted reading gives the
    same rows (a stray quote would make it join lines)."""
    base: dict[str, Any] = {"keep_default_na": False, "na_values": [""], **({"sep": "\t"} if tsv else {})}

    def read(kwargs: dict[str, Any]) -> Any:
        return _read("csv", path, field, cache_dir, {**kwargs, "features": _string_features(path, kwargs)})

    if not tsv:
        return read(base)
    try:
        literal = read({**base, "quoting": csv.QUOTE_NONE})
    except ValueError:
        return read(base)  # reports the quoted reading's error if that fails too
    if not _has_quoted_cells(literal):
        return literal
    try:
        quoted = read(base)
    except ValueError:
        return literal
    if len(quoted) != len(literal):
        return literal
    logger.info("%s: %s holds CSV-quoted cells; read with quoting", field, path)
    return quoted


def _has_quoted_cells(ds: Any, rows: int = 1000) -> bool:
    """Whether a cell of the first `rows` rows is a whole CSV-quoted field."""
    sample = ds.select(range(min(rows, len(ds))))
    return any(
        isinstance(v, str) and len(v) >= 2 and _QUOTED_CELL.fullmatch(v) is not None
        for column in sample.column_names
        for v in sample[column]
    )


def _load_hub(spec: str, hub: tuple[str, str | None, str | None], field: str, cache_dir: str | None) -> Any:
    """The Dataset of a Hub spec; FileNotFoundError with the reason in one line when it cannot be loaded."""
    import datasets

    name, config, split = hub
    try:
        loaded = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except Exception as e:  # offline, unknown id / config / split, gated repo: each its own exception type
        parts = {"id": name, "config": config, "split": split}
        what = ", ".join(f"{k} {v!r}" for k, v in parts.items() if v is not None)
        raise FileNotFoundError(
            f"{field}: no local file or folder named {spec!r}, and loading it as a Hugging Face Hub dataset "
            f"({what}) failed: {one_line(e)}"
        ) from e
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(
            loaded, field, spec, hint=f"; name one as {name}{f':{config}' if config else ''}@SPLIT"
        )
    return loaded


def _string_features(path: Path, read_kwargs: dict[str, Any]) -> Any:
    """datasets Features declaring every column of a CSV/TSV file (its header, read by pandas) a string."""
    import datasets
    import pandas as pd

    try:
        header = pd.read_csv(path, nrows=0, **read_kwargs).columns
    except Exception:  # an unreadable file: let datasets' reader report it
        return None
    return datasets.Features({str(c): datasets.Value("string") for c in header})


def _load_folder(resolved: Path, field: str, cache_dir: str | None) -> Any:
    """A local folder as a Dataset or DatasetDict: a save_to_disk folder, or a folder of data files."""
    import datasets

    # save_to_disk writes dataset_dict.json (a DatasetDict) or state.json (a Dataset); load_from_disk reads
    # exactly these. Any other folder is data files, whose splits load_dataset infers from their names (it
    # makes no Hub request for a local folder).
    saved = ("dataset_dict.json", "state.json")
    if any((resolved / name).is_file() for name in saved):
        try:
            return datasets.load_from_disk(str(resolved))
        except FileNotFoundError as e:
            raise ValueError(f"{field}: {resolved} is an incomplete Dataset.save_to_disk folder ({e})") from e
    try:
        return datasets.load_dataset(str(resolved), cache_dir=cache_dir)
    except Exception as e:  # no data files, mixed formats, parser errors: each its own type
        raise ValueError(
            f"{field}: {resolved} is neither a Dataset.save_to_disk folder nor a folder of data files "
            f"that datasets.load_dataset reads ({one_line(e)})"
        ) from e


# A train_file folder's own held-out split, used when no eval_file is set (never its test split).
_VALIDATION_SPLITS = ("validation", "eval", "dev")


def folder_validation_split(path: str, cache_dir: str | None = None) -> tuple[str, Any] | None:
    """(split name, Dataset) of the validation / eval / dev split of a local data folder, or None."""
    import datasets

    resolved = Path(resolve(path)).expanduser()
    if not resolved.is_dir():
        return None
    loaded = _load_folder(resolved, "train_file", cache_dir)
    if isinstance(loaded, datasets.DatasetDict):
        for name in _VALIDATION_SPLITS:
            if name in loaded:
                return name, loaded[name]
    return None


def one_line(e: Exception, limit: int = 300, with_type: bool = True) -> str:
    """`Type: first line of the message` (or the line alone), cut to `limit` characters (datasets' and
    transformers' errors can span many lines)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    text = f"{type(e).__name__}: {lines[0]}" if with_type else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pick_split(dataset_dict: Any, field: str, source: Path | str, hint: str = "") -> Any:
    """The split of a DatasetDict that `field` means: train for train_file, validation/eval/test for eval_file."""
    wanted = ("train",) if field == "train_file" else _EVAL_SPLITS
    for split in wanted:
        if split in dataset_dict:
            return dataset_dict[split]
    if len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    raise ValueError(
        f"{field}: {source} has splits {list(dataset_dict)}; expected one of {list(wanted)}{hint}"
    )
