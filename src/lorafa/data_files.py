"""Reading data files and Hub datasets into `datasets.Dataset`s: the first step of `lorafa.data.build_datasets`.

`load_table(path, field)` reads a CSV / TSV / JSON / JSONL / Parquet / Arrow / text file (optionally compressed:
.gz, .bz2, .xz), a folder of such files (its train split), a `save_to_disk` folder, an `asset:NAME`, or, when no
such local path exists, a Hub dataset `OWNER/NAME[:CONFIG][@SPLIT]`; errors name the config field and the file.
`folder_validation_split` finds a folder's validation split; `one_line` shortens library errors for messages.
"""

from __future__ import annotations

import csv
import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

from lorafa.assets import resolve

logger = logging.getLogger(__name__)

# File type → the `datasets.Dataset.from_*` reader. These build the packaged builders directly; `load_dataset`
# would also ping the Hub to count downloads, which stalls for seconds without a network.
_READERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".arrow": "arrow",
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
    from file names as `datasets.load_dataset` infers them, e.g. `train.csv`, `test.csv`, `data/train-*.parquet`;
    each CSV/TSV/text file read as it is read alone, see `_folder_split`) or a
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
    resolved = Path(resolve(path)).expanduser()
    if not resolved.exists():
        hub = parse_hub_id(path)
        if hub is None:
            raise FileNotFoundError(f"{field}: no such file or folder: {resolved}")
        _refuse_local_typo(hub[0], field)
        ds = _load_hub(path, hub, field, cache_dir)
    elif resolved.is_dir():
        ds = _load_folder(resolved.resolve(), field, cache_dir)
    else:
        ds = _read_file(resolved, field, cache_dir)
    if len(ds) == 0:
        raise ValueError(f"{field}: {resolved} holds no rows")
    return ds


def _file_type(path: Path) -> str:
    """A data file's suffix under any compression suffix: ".csv" for "train.csv.gz"."""
    name = path.name.lower()
    return Path(next((name[: -len(c)] for c in _COMPRESSIONS if name.endswith(c)), name)).suffix


def _reader_of(path: Path) -> str | None:
    """The reader of a data file's type (`_READERS`), or None."""
    return _READERS.get(_file_type(path))


def _supported() -> str:
    return ", ".join(list(_READERS) + [f"(+{c})" for c in _COMPRESSIONS])


def _read_file(resolved: Path, field: str, cache_dir: str | None) -> Any:
    """One data file as a Dataset, read by its type (see `_READERS`)."""
    reader = _reader_of(resolved)
    if reader is None:
        raise ValueError(f"{field}: cannot read {resolved}: supported file types are {_supported()}")
    if resolved.stat().st_size == 0:
        raise ValueError(f"{field}: {resolved} is empty")
    if reader == "csv":
        return _read_csv(resolved, _file_type(resolved) == ".tsv", field, cache_dir)
    if reader == "arrow":  # an Arrow stream file, as save_to_disk and the datasets cache write them
        return _read("file", resolved, field, None, {})
    # clm: line breaks, see _tokenize_clm; utf-8-sig drops a byte-order mark, which would be the first character
    text = {"keep_linebreaks": True, "encoding": "utf-8-sig"}
    ds = _read(reader, resolved, field, cache_dir, text if reader == "text" else {})
    if reader == "json":
        _refuse_nested_records(ds, resolved, field)
    return ds


def _refuse_nested_records(ds: Any, path: Path, field: str) -> None:
    """ValueError for a JSON file read as one row of objects or lists of objects: its records nested under a key
    ({"data": [...]}) or written by pandas' `to_json` default orient="columns" ({"text": {"0": ...}}). A list of
    messages (one conversation) is no such case."""
    if len(ds) != 1:
        return
    row = ds[0]

    def records(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(m, dict) for m in v)

    def messages(v: Any) -> bool:
        return records(v) and all("role" in m or "from" in m for m in v)

    if all(isinstance(v, dict) or records(v) for v in row.values()) and not any(map(messages, row.values())):
        raise ValueError(
            f"{field}: {path} reads as one row whose cells {list(row)} hold objects: records nested under a key "
            "(e.g. {\"data\": [...]}) or a pandas to_json with the default orient='columns'? Write JSON Lines (one "
            "record per line) or a JSON array of records (df.to_json(path, orient='records'))"
        )


def _read(reader: str, path: Path, field: str, cache_dir: str | None, kwargs: dict[str, Any]) -> Any:
    """`datasets.Dataset.from_<reader>(path)`; a ValueError naming the file and the parser's reason."""
    cache: dict[str, Any] = {} if reader == "file" else {"cache_dir": cache_dir}
    scratch = None
    if reader != "file" and path.stat().st_mtime < _NORMALIZED_MTIME:
        # datasets keys its cache on (path, mtime): a file with a normalised mtime (Nix, reproducible archives)
        # could be replaced by another with the same key, and its old rows served. Read such files afresh.
        scratch = tempfile.mkdtemp(prefix="lorafa-data-")
        cache = {"cache_dir": scratch, "keep_in_memory": True}
    try:
        return _read_checked(reader, path, field, cache, kwargs)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)  # read into memory, or failed


def _read_checked(reader: str, path: Path, field: str, cache: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """`_read`'s reading and its errors: not UTF-8, a cache that cannot be written, else the parser's reason."""
    import datasets

    try:
        ds = getattr(datasets.Dataset, f"from_{reader}")(str(path), **cache, **kwargs)
    except Exception as e:  # datasets wraps parser errors in several types; all mean "bad file" here
        chain = [e]
        while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
            chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
        if any(isinstance(c, UnicodeDecodeError) for c in chain):
            _refuse_non_utf8(path, field)
        denied = (errno.EROFS, errno.EACCES)
        unwritable = next((c for c in chain if isinstance(c, OSError) and c.errno in denied), None)
        if unwritable is not None and Path(str(unwritable.filename or "")) != path:
            raise ValueError(
                f"{field}: datasets could not write its cache while reading {path} ({one_line(unwritable)}); set "
                "data.cache_dir (or HF_DATASETS_CACHE) to a writable folder"
            ) from e
        cause = f" ({one_line(e.__cause__)})" if isinstance(e.__cause__, Exception) else ""
        raise ValueError(
            f"{field}: could not read {path} as {reader} (is it empty or malformed?): {one_line(e)}{cause}"
        ) from e
    if reader == "json":  # pyarrow's JSON reader keeps invalid UTF-8 in its strings, to fail on first use
        import pyarrow as pa

        try:
            ds.data.table.validate(full=True)
        except pa.ArrowInvalid:
            _refuse_non_utf8(path, field)
    return ds


# Modification times before 2000-01-01: normalised ones (0, 1, SOURCE_DATE_EPOCH-style), not an edit's.
_NORMALIZED_MTIME = 946684800


def _refuse_non_utf8(path: Path, field: str) -> None:
    """ValueError naming the first byte of `path` (decompressed) that is not UTF-8, by line and column."""
    with _open_data_file(path) as f:
        for n, line in enumerate(f, 1):  # a UTF-8 character never holds a line-break byte
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{field}: {path} is not UTF-8: byte {line[e.start]:#04x} at line {n}, column {e.start + 1} "
                    "(a Latin-1 or Windows-1252 file?); re-save it as UTF-8"
                ) from None


# A cell as a CSV writer quotes it: wrapped in quotes, inner quotes doubled (RE2 syntax, for pyarrow).
_QUOTED_CELL = r'(?s)^"(?:[^"]|"")*"$'


def _read_csv(path: Path, tsv: bool, field: str, cache_dir: str | None) -> Any:
    """A CSV/TSV file with every column read as strings (pandas would read "007" as 7.0 and "1e3" as 1000.0;
    labels are parsed later, per task) and only empty cells missing ("NA", "null", "None" are text).

    In a TSV a quote is an ordinary character (GLUE's files hold unpaired quotes, and whole sentences in quotes).
    The file is read with CSV quoting instead when reading it so fails, or when some cell reads as a whole quoted
    field (quotes around it, inner quotes doubled, as pandas and Excel write TSVs) and the quoted reading does not
    join rows at a stray quote: it gives the same number of rows, or each of its cells that spans lines is written
    in the file as a quoted field (a cell made by running rows together from a stray quote is not)."""
    base: dict[str, Any] = {"keep_default_na": False, "na_values": [""], **({"sep": "\t"} if tsv else {})}

    warned: list[bool] = []  # the file is read twice (literal, quoted): its header's warning once

    def read(kwargs: dict[str, Any]) -> Any:
        features = _string_features(path, kwargs, field, warn=not warned)
        warned.append(True)
        return _read("csv", path, field, cache_dir, {**kwargs, "features": features})

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
    if len(quoted) != len(literal) and not _multiline_cells_quoted_in_file(quoted, path):
        return literal
    logger.info("%s: %s holds CSV-quoted cells; read with quoting", field, path)
    return quoted


def _multiline_cells_quoted_in_file(ds: Any, path: Path) -> bool:
    """Whether every cell of `ds` (a quoted reading of `path`) that spans lines appears in the file as a CSV-quoted
    field: in quotes, inner quotes doubled."""
    import pyarrow.compute as pc

    cells = [
        v for c in _string_columns(ds) for v in c.filter(pc.fill_null(pc.match_substring(c, "\n"), False)).to_pylist()
    ]
    if not cells:
        return True
    with _open_data_file(path) as f:
        text = f.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
    return all('"' + v.replace("\r\n", "\n").replace('"', '""') + '"' in text for v in cells)


def _open_data_file(path: Path) -> Any:
    """`path` opened for reading bytes, decompressed by its suffix (.gz, .bz2, .xz)."""
    import bz2
    import gzip
    import lzma

    opener: Any = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower(), open)
    return opener(path, "rb")


def _has_quoted_cells(ds: Any) -> bool:
    """Whether any cell of any row is a whole CSV-quoted field (pandas and Excel quote only the cells that need it,
    which may first occur far down the file)."""
    return _any_cell(ds, _QUOTED_CELL)


def _any_cell(ds: Any, pattern: str) -> bool:
    """Whether any string cell of a freshly read Dataset matches the RE2 `pattern` (a scan of its Arrow columns)."""
    import pyarrow.compute as pc

    return any(pc.any(pc.match_substring_regex(c, pattern)).as_py() is True for c in _string_columns(ds))


def _string_columns(ds: Any) -> list[Any]:
    """The Arrow columns of a freshly read Dataset (no index mapping) that hold strings."""
    import pyarrow as pa

    return [c for c in ds.data.table.columns if pa.types.is_string(c.type) or pa.types.is_large_string(c.type)]


def _refuse_local_typo(name: str, field: str) -> None:
    """FileNotFoundError for an OWNER/NAME whose OWNER is a local folder (`data/train` where `data/` holds no
    `train`): a mistyped local path, which the Hub would be asked about, with retries, for half a minute."""
    owner, _, rest = name.partition("/")
    folder = Path(owner)
    if rest and folder.is_dir():
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        shown = ", ".join(held[:20]) + (f", ... ({len(held)} in all)" if len(held) > 20 else "")
        raise FileNotFoundError(
            f"{field}: no such file or folder: {folder.resolve() / rest}; the folder {owner}/ holds: "
            f"{shown or 'nothing'}"
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
            f"({what}) failed: {one_line(e)}{offline_hint()}"
        ) from e
    if isinstance(loaded, datasets.DatasetDict):
        hint = f"; name one as {name}{f':{config}' if config else ''}@SPLIT"
        return loaded[_pick_split(loaded, field, spec, hint)]
    return loaded


def _string_features(path: Path, read_kwargs: dict[str, Any], field: str, warn: bool = True) -> Any:
    """datasets Features declaring every column of a CSV/TSV file (its header, read by pandas) a string; a
    ValueError for a header without rows, a warning for a column name written twice."""
    import datasets
    import pandas as pd

    try:
        first = pd.read_csv(path, nrows=1, **read_kwargs)
        raw = pd.read_csv(path, nrows=1, header=None, dtype=str, **read_kwargs).iloc[0].tolist()  # as written
    except Exception:  # an unreadable file: let datasets' reader report it
        return None
    if first.empty:
        raise ValueError(f"{field}: {path} has a header ({list(map(str, first.columns))}) but no rows")
    doubled = sorted({str(c) for c in raw if raw.count(c) > 1})
    if doubled and warn:
        logger.warning("%s: %s names columns %s more than once; pandas renames the repeats (%s.1, ...)", field,
                       path, doubled, doubled[0])  # fmt: skip
    return datasets.Features({str(c): datasets.Value("string") for c in first.columns})


def _load_folder(resolved: Path, field: str, cache_dir: str | None) -> Any:
    """The split of a local folder that `field` means (see `_pick_split`): of a save_to_disk folder, or of a folder
    of data files, each split read as `_folder_split` reads it."""
    import datasets

    if _is_saved(resolved):
        loaded = _load_saved(resolved, field)
        return loaded[_pick_split(loaded, field, resolved)] if isinstance(loaded, datasets.DatasetDict) else loaded
    splits = _folder_splits(resolved, field, cache_dir)
    name = _pick_split(splits, field, resolved)
    return _folder_split(resolved, name, splits[name], field, cache_dir)


def _is_saved(resolved: Path) -> bool:
    # save_to_disk writes dataset_dict.json (a DatasetDict) or state.json (a Dataset); load_from_disk reads
    # exactly these. Any other folder is data files.
    return any((resolved / name).is_file() for name in ("dataset_dict.json", "state.json"))


def _load_saved(resolved: Path, field: str) -> Any:
    import datasets

    try:
        return datasets.load_from_disk(str(resolved))
    except FileNotFoundError as e:
        raise ValueError(f"{field}: {resolved} is an incomplete Dataset.save_to_disk folder ({e})") from e


# Shards of one split, as the Hub names them: "train-00000-of-00002.parquet".
_SHARD = re.compile(r".*-\d+-of-\d+(\.\w+)+")


def _folder_splits(resolved: Path, field: str, cache_dir: str | None, warn: bool = True) -> dict[str, list[Path]]:
    """Split name → data files of a folder, as `datasets.load_dataset` infers them from the file names (its
    packaged builder's `data_files`, so a dataset card's `configs` count too). Files that a single-file path
    would not read (`train.csv.bak`) are left out; with `warn`, so are the folder's data files in no split
    (`holdout.csv` beside `train.csv`), each with a warning."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(resolved), cache_dir=cache_dir)
    except Exception as e:  # no data files, mixed formats: each its own type
        raise ValueError(
            f"{field}: {resolved} is neither a Dataset.save_to_disk folder nor a folder of data files "
            f"that datasets.load_dataset reads ({one_line(e)})"
        ) from e
    found = {str(split): [Path(f) for f in files] for split, files in (builder.config.data_files or {}).items()}
    splits = {split: [f for f in files if _reader_of(f) is not None] for split, files in found.items()}
    if not warn:
        return splits
    left_out = sorted({f for files in found.values() for f in files if _reader_of(f) is None})
    if left_out:
        logger.warning("%s: %s: left out %s, which are not data files (supported types: %s)", field, resolved,
                       [str(f.relative_to(resolved)) for f in left_out], _supported())  # fmt: skip
    used = {f for files in found.values() for f in files}
    orphans = sorted(
        f
        for f in resolved.rglob("*")
        if f.is_file()
        and _reader_of(f) is not None
        and f not in used
        and not any(part.startswith((".", "__")) for part in f.relative_to(resolved).parts)
    )
    if orphans:
        logger.warning(
            "%s: %s: %s belong to no split (split names come from file names: train, validation/dev/eval, "
            "test; see datasets' split patterns) and are not read", field, resolved,
            [str(f.relative_to(resolved)) for f in orphans],
        )  # fmt: skip
    return splits


def _folder_split(resolved: Path, split: str, files: list[Path], field: str, cache_dir: str | None) -> Any:
    """One split of a folder of data files as one Dataset. CSV, TSV and text files are each read as a single file
    is (`_read_file`: every CSV column a string, TSV quoting, line breaks kept) and concatenated; other formats go
    through `datasets.load_dataset`, which reconciles their column types."""
    import datasets

    names = [str(f.relative_to(resolved)) for f in files]
    logger.info("%s: split %r of %s is %s", field, split, resolved, names)
    if len(files) > 1 and not all(_SHARD.fullmatch(f.name) for f in files):
        logger.warning(
            "%s: split %r of %s is made of %d files, read as one: %s", field, split, resolved, len(files), names
        )
    if not files:
        raise ValueError(
            f"{field}: split {split!r} of {resolved} has no data file of a supported type ({_supported()})"
        )
    if all(_reader_of(f) in ("csv", "text") for f in files):
        return datasets.concatenate_datasets([_read_file(f, field, cache_dir) for f in files])
    try:
        return datasets.load_dataset(str(resolved), data_files={split: [str(f) for f in files]}, split=split,
                                     cache_dir=cache_dir)  # fmt: skip
    except Exception as e:  # parser errors, columns that differ between files: each its own type
        raise ValueError(f"{field}: could not read split {split!r} of {resolved} ({names}): {one_line(e)}") from e


# A train_file folder's own held-out split, used when no eval_file is set (never its test split).
_VALIDATION_SPLITS = ("validation", "eval", "dev")


def folder_validation_split(path: str, cache_dir: str | None = None) -> tuple[str, Any] | None:
    """(split name, Dataset) of the validation / eval / dev split of a local data folder, or None."""
    import datasets

    resolved = Path(resolve(path)).expanduser()
    if not resolved.is_dir():
        return None
    resolved = resolved.resolve()
    if _is_saved(resolved):
        loaded = _load_saved(resolved, "train_file")
        found = [n for n in _VALIDATION_SPLITS if isinstance(loaded, datasets.DatasetDict) and n in loaded]
        return (found[0], loaded[found[0]]) if found else None
    # load_table has warned about the folder's files already.
    splits = _folder_splits(resolved, "train_file", cache_dir, warn=False)
    name = next((n for n in _VALIDATION_SPLITS if n in splits), None)
    return None if name is None else (name, _folder_split(resolved, name, splits[name], "train_file", cache_dir))


def token_lengths(ds: Any, column: str) -> list[int]:
    """The length of every row's list in `column` (token ids), computed by Arrow: reading the lists into Python
    would hold every token as a Python int (gigabytes for a large corpus)."""
    import pyarrow.compute as pc

    return cast(list[int], pc.list_value_length(ds.with_format("arrow")[column]).to_pylist())


def max_token(ds: Any, column: str) -> int:
    """The largest id in a column of token-id lists (-1 when there is none), computed by Arrow."""
    import pyarrow.compute as pc

    top = pc.max(pc.list_flatten(ds.with_format("arrow")[column])).as_py()
    return -1 if top is None else int(top)


def offline_hint() -> str:
    """' (without a network, set HF_HUB_OFFLINE=1 ...)', unless it is set already."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return ""
    return " (without a network, set HF_HUB_OFFLINE=1 to skip the Hub's retries)"


def one_line(e: Exception, limit: int = 300, with_type: bool = True) -> str:
    """`Type: first line of the message` (or the line alone), cut to `limit` characters (datasets' and
    transformers' errors can span many lines)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    text = f"{type(e).__name__}: {lines[0]}" if with_type else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pick_split(splits: Any, field: str, source: Path | str, hint: str = "") -> str:
    """The name of the split `field` means among `splits` (a DatasetDict or a dict keyed by split): train for
    train_file, the first of validation/eval/test for eval_file, a lone split whatever its name."""
    wanted = ("train",) if field == "train_file" else _EVAL_SPLITS
    for split in wanted:
        if split in splits:
            return split
    if len(splits) == 1:
        return str(next(iter(splits)))
    raise ValueError(f"{field}: {source} has splits {list(splits)}; expected one of {list(wanted)}{hint}")
