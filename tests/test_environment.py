"""Runs as they meet real machines: other working folders, moved runs, normalised file times, permissions, broken
writes, caches and links."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from _toys import run_args, toy_root

from lorafa.cli import main
from lorafa.train import train
from lorafa.train_config import load_config


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return toy_root(tmp_path_factory)


def _args(toys: Path, out: Path, *extra: str) -> list[str]:
    return run_args(toys, "classification", out, "eval_before=false", *extra)


def test_a_run_resumes_from_another_working_folder_and_where_it_was_moved(toys, tmp_path, monkeypatch, capsys):
    first, second = tmp_path / "w1", tmp_path / "w2"
    first.mkdir()
    second.mkdir()
    shutil.copy(toys / "data" / "classification.csv", first / "train.csv")
    monkeypatch.chdir(first)  # relative paths, as typed
    args = _args(toys, Path("runs/a"), "data.train_file=train.csv", "checkpoint_every=2", "max_steps=2")
    assert main(args) == 0
    monkeypatch.chdir(second)  # the checkpoint's config holds absolute paths: the same files compare equal
    run = first / "runs" / "a"
    assert main(["train", str(run / "config.yaml"), f"resume={run}", "max_steps=4"]) == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()
    assert main(["train", str(copy / "config.yaml"), f"resume={copy}", "max_steps=6"]) == 0
    assert f"belongs to the run in {copy}" in capsys.readouterr().err
    assert json.loads((copy / "metrics.json").read_text())["steps"] == 6  # the copy went on
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4  # the original was left alone
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_a_file_with_a_normalised_time_is_read_afresh(tmp_path):
    from lorafa.data_files import load_table

    path = tmp_path / "t.csv"
    path.write_text("text,label\na,0\nb,1\nc,0\n")
    os.utime(path, (1, 1))  # as Nix and reproducible archives leave files
    assert len(load_table(str(path), cache_dir=str(tmp_path / "cache"))) == 3
    path.write_text("text,label\nz,1\n")
    os.utime(path, (1, 1))  # same path and time: datasets' cache key
    assert load_table(str(path), cache_dir=str(tmp_path / "cache"))["text"][:] == ["z"]


def test_saved_folders_are_readable_as_the_umask_allows(toys, tmp_path):
    out = tmp_path / "run"
    assert main(_args(toys, out, "max_steps=1")) == 0
    mask = os.umask(0)
    os.umask(mask)
    adapter = out / "adapter"
    assert adapter.stat().st_mode & 0o777 == 0o777 & ~mask  # mkdtemp made it 0700
    for f in adapter.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f  # safetensors writes 0600


def test_broken_writes_and_links_are_named(toys, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    cfg = load_config(None, _args(toys, out, "checkpoint_every=2", "max_steps=2", "logging_every=1")[1:])
    train(cfg)
    with (out / "train_log.jsonl").open("a") as f:
        f.write('{"step": 3, "epoch": 0, "lo')  # a write cut short
    (out / "metrics.json").write_text('{"steps": 2, "eval_')
    with pytest.raises(ValueError, match=r"metrics.json is not valid JSON"):
        train(load_config(None, _args(toys, out, "max_steps=2", f"resume={out}")[1:]))
    (out / "metrics.json").unlink()
    train(load_config(None, _args(toys, out, "max_steps=3", "logging_every=1", f"resume={out}")[1:]))
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps[-1] == 3  # every line parses (the cut one was dropped) and step 3 was logged again

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert main(_args(toys, dangling, "--dry-run")) == 2
    assert "is a symbolic link to nothing" in capsys.readouterr().err


def test_caches_that_cannot_be_written_are_named(tmp_path, monkeypatch):
    import datasets

    from lorafa import assets
    from lorafa.data_files import load_table, offline_hint

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "home" / ".cache"))

    path = tmp_path / "t.csv"
    path.write_text("text,label\na,0\n")
    monkeypatch.setattr(datasets.Dataset, "from_csv", read_only)
    with pytest.raises(ValueError, match=r"datasets could not write its cache .* set data.cache_dir"):
        load_table(str(path))
    monkeypatch.setenv("LORAFA_CACHE", "")  # set but empty: the default, not the working folder
    assert assets.cache_root() == Path("~/.cache/lorafa").expanduser()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline_hint() == ""  # not told to set what is set


def test_eval_expands_a_home_folder(toys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(_args(toys, out, "max_steps=1")) == 0
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["eval", "~/run", "--json"]) == 0
