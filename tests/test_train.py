"""The training loop, its config and its metrics: references computed here, on tiny random-init models."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from _toys import run_args, toy_root, write_data
from safetensors.torch import load_file

import lorafa.train as train_module
from lorafa import metrics
from lorafa.cli import main
from lorafa.train import dry_run, epoch_batches, make_scheduler, train
from lorafa.train_config import DEFAULT_RUN, TrainConfig, config_from_dict, default_config, load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return toy_root(tmp_path_factory)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(out_a: Path, out_b: Path, atol: float, rtol: float, trained: bool = False) -> None:
    """The adapters two runs saved hold the same tensors within tolerance; with `trained`, some B moved from 0."""
    a, b = _adapter(out_a), _adapter(out_b)
    if trained:
        assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol)


def _config(toys: Path, out: Path, *overrides: str) -> TrainConfig:
    args = run_args(toys, "classification", out, *overrides)[1:]
    return load_config(None, args)


# ---------------------------------------------------------------------------------------------- config


def test_overrides_are_coerced_to_the_field_types():
    cfg = load_config(
        None,
        [
            "model=m",
            "data.train_file=t.csv",
            "lr=1e-4",
            "adapter.r=32",
            "adapter.lora_alpha=64",
            "adapter.target_modules=[query,value]",
            "data.eval_file=null",
            "max_steps=1e3",
            "gradient_checkpointing=yes",
            "mixed_precision=no",
            "data.label_names=rotten,fresh",
        ],
    )
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.adapter.r == 32 and cfg.adapter.lora_alpha == 64.0
    assert cfg.adapter.target_modules == ["query", "value"]
    assert cfg.data.eval_file is None and cfg.max_steps == 1000 and cfg.gradient_checkpointing is True
    assert cfg.mixed_precision == "no" and cfg.data.label_names == ["rotten", "fresh"]
    assert (
        load_config(
            None, ["model=m", "data.train_file=t", "adapter.target_modules=all-linear"]
        ).adapter.target_modules
        == "all-linear"
    )
    # A field that is a name or a list of names: brackets make a list, a bare name stays a name.
    listed = load_config(None, ["model=m", "data.train_file=t", "data.prompt_column=[instruction,input]"])
    assert listed.data.prompt_column == ["instruction", "input"]
    assert load_config(None, ["model=m", "data.train_file=t", "data.prompt_column=q"]).data.prompt_column == "q"
    assert load_config(None, ["model=m", "data.train_file=t", "adapter.target_modules=All-Linear"]).adapter.target_modules == "all-linear"
    assert load_config(None, ["model=m", "data.train_file=t", "resume=no"]).resume is None
    # null is the architecture's default, not a module named "null"
    assert load_config(None, ["model=m", "data.train_file=t", "adapter.target_modules=null"]).adapter.target_modules is None
    # In the module fields a plain name or dotted suffix is a name (a regex "o_proj" would match nothing).
    for given, read in (("o_proj", ["o_proj"]), ("self_attn.o_proj", ["self_attn.o_proj"]), (".*o_proj", ".*o_proj")):
        adapter = load_config(None, ["model=m", "data.train_file=t", f"adapter.exclude_modules={given}"]).adapter
        assert adapter.exclude_modules == read
        raw = {"model": "m", "data": {"train_file": "t"}, "adapter": {"target_modules": given}}
        assert config_from_dict(raw).adapter.target_modules == read


def test_yaml_values_are_coerced_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    # PyYAML reads 1e-4 as a string and `no` as false; both must still mean what the user wrote.
    path.write_text("model: m\ndata: {train_file: t.csv}\nlr: 1e-4\nmixed_precision: no\nmethod: lora\n")
    cfg = load_config(path)
    assert cfg.lr == 1e-4 and cfg.mixed_precision == "no"
    assert cfg.adapter.method == "lora"  # the section follows the top-level method
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert load_config(again) == cfg


def test_adapter_method_may_not_contradict_method():
    with pytest.raises(ValueError, match="adapter.method='lora' contradicts method='lora-fa'"):
        load_config(None, ["model=m", "data.train_file=t", "adapter.method=lora"])


def test_missing_model_is_named():
    with pytest.raises(ValueError, match="^model must be"):
        load_config(None, ["data.train_file=t.csv"])
    with pytest.raises(ValueError, match="data.train_file must be"):
        load_config(None, ["model=m"])


def test_examples_load_and_the_default_matches_its_yaml():
    names = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
    assert {"minilm_rotten_tomatoes.yaml", "smollm2_chatterbot_sft.yaml"} <= set(names)
    for path in EXAMPLES.glob("*.yaml"):
        load_config(path)
    assert load_config(EXAMPLES / "minilm_rotten_tomatoes.yaml") == default_config()
    assert default_config(["adapter.r=4"]).adapter.r == 4 and DEFAULT_RUN["adapter"]["r"] != 4


# --------------------------------------------------------------------------------------------- metrics


def _ranks(x):
    return [sum(v < xi for v in x) + (sum(v == xi for v in x) + 1) / 2 for xi in x]


def _corr(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(
        np.sum((a - a.mean()) * (b - b.mean()))
        / math.sqrt(np.sum((a - a.mean()) ** 2) * np.sum((b - b.mean()) ** 2))
    )


@pytest.mark.parametrize("seed", range(3))
def test_metrics_equal_their_definitions(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, 40)
    p = np.where(rng.random(40) < 0.6, y, rng.integers(0, 3, 40))
    assert metrics.accuracy(p, y) == np.mean(p == y)
    f1 = []
    for c in range(3):
        tp, fp, fn = np.sum((p == c) & (y == c)), np.sum((p == c) & (y != c)), np.sum((p != c) & (y == c))
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        f1.append(2 * precision * recall / (precision + recall))
    assert metrics.macro_f1(p, y) == pytest.approx(np.mean(f1))
    # Binary MCC from its textbook formula; the multi-class code must reduce to it.
    yb, pb = y % 2, p % 2
    tp, tn = np.sum((pb == 1) & (yb == 1)), np.sum((pb == 0) & (yb == 0))
    fp, fn = np.sum((pb == 1) & (yb == 0)), np.sum((pb == 0) & (yb == 1))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics.matthews_corrcoef(pb, yb) == pytest.approx(mcc)
    assert metrics.f1(pb, yb) == pytest.approx(2 * tp / (2 * tp + fp + fn))  # the positive class, id 1
    binary = metrics.classification_metrics(pb, yb, num_classes=2)
    assert binary["eval_f1_class1"] == metrics.f1(pb, yb)
    assert "eval_f1_class1" not in metrics.classification_metrics(p, y, 3)
    # Multi-class MCC equals the correlation of one-hot indicator matrices (Gorodkin's definition).
    onehot_p, onehot_y = np.eye(3)[p], np.eye(3)[y]
    cov = lambda a, b: np.sum((a - a.mean(0)) * (b - b.mean(0)))  # noqa: E731
    expected = cov(onehot_p, onehot_y) / math.sqrt(cov(onehot_p, onehot_p) * cov(onehot_y, onehot_y))
    assert metrics.matthews_corrcoef(p, y) == pytest.approx(expected)
    a = rng.normal(size=30).round(1)  # rounding makes ties
    b = a + rng.normal(size=30)
    assert metrics.pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert metrics.spearman(a, b) == pytest.approx(_corr(_ranks(list(a)), _ranks(list(b))))


def test_metrics_degenerate_inputs():
    assert metrics.matthews_corrcoef([1, 1, 1], [1, 1, 1]) == 0.0
    assert metrics.pearson([1, 1, 1], [1, 2, 3]) == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        metrics.accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="at least one"):
        metrics.accuracy([], [])


# ------------------------------------------------------------------------------------- data order, schedule


@pytest.mark.parametrize("n, batch, world", [(64, 4, 2), (50, 3, 2), (17, 2, 3)])
def test_epoch_batches_split_the_global_batch_across_processes(n, batch, world):
    single = epoch_batches(n, batch * world, epoch=1, seed=3)
    shards = [epoch_batches(n, batch, epoch=1, seed=3, rank=r, world=world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every process runs the same number of batches
    assert sorted(i for b in single for i in b) == list(range(n))
    for i, global_batch in enumerate(single):
        together = [j for s in shards for j in s[i]]
        if n % (batch * world) == 0:
            assert together == global_batch
        else:
            assert set(global_batch) <= set(together) or i == len(single) - 1
    assert epoch_batches(n, batch, 1, 3) == epoch_batches(n, batch, 1, 3)
    assert epoch_batches(n, batch, 1, 3) != epoch_batches(n, batch, 2, 3)


def _padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("n, batch, world", [(1000, 8, 1), (999, 4, 3), (130, 3, 2), (131, 3, 2)])
def test_group_by_length_pads_less_and_keeps_the_order_seeded(n, batch, world):
    lengths = torch.randint(1, 200, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    plain = epoch_batches(n, batch * world, epoch=1, seed=3)
    grouped = epoch_batches(n, batch * world, epoch=1, seed=3, lengths=lengths)
    # Every example once per epoch, in as many batches of the same sizes.
    assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)
    assert sorted(map(len, grouped)) == sorted(map(len, plain))
    # Less padding than random batches, and no less than the optimum (the whole epoch sorted, then cut).
    optimum = sorted(range(n), key=lambda i: -lengths[i])
    cut = [optimum[i : i + batch * world] for i in range(0, n, batch * world)]
    assert _padding(cut, lengths) <= _padding(grouped, lengths) < _padding(plain, lengths)
    assert max(lengths) in [lengths[i] for i in grouped[0]]  # the longest batch first
    # Within a window (50 global batches) the batches are shuffled, not sorted by length.
    maxima = [max(lengths[i] for i in b) for b in grouped[1:]]
    assert maxima != sorted(maxima, reverse=True)
    # Processes split each global batch, as without grouping (where n is no multiple of the process count the
    # order wraps around, as without grouping); repeatable per (seed, epoch).
    shards = [epoch_batches(n, batch, 1, 3, r, world, lengths) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    if n % world == 0:
        assert [[j for s in shards for j in s[i]] for i in range(len(grouped))] == grouped
    assert epoch_batches(n, batch, 1, 3, lengths=lengths) == epoch_batches(n, batch, 1, 3, lengths=lengths)
    assert epoch_batches(n, batch, 1, 3, lengths=lengths) != epoch_batches(n, batch, 2, 3, lengths=lengths)
    with pytest.raises(ValueError, match="lengths"):
        epoch_batches(n, batch, 1, 3, lengths=lengths[:-1])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_model_trains_its_head_in_fp32(toys, tmp_path, dtype):
    from lorafa.evaluate import load_trained

    out = tmp_path / "run"
    metrics = train(_config(toys, out, f"model_dtype={dtype}", "max_steps=4", "lr=2e-3"))
    assert math.isfinite(metrics["eval_loss"])  # fp16 AdamW on the head turned it NaN within two steps before
    head = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {v.dtype for k, v in head.items() if "classifier" in k} == {torch.float32}
    model, _, _ = load_trained(out)
    assert next(model.parameters()).dtype == getattr(torch, dtype)  # the rest stays as loaded


def test_yaml_booleans_in_text_fields_and_flag_types(tmp_path):
    from lorafa.config import LoRAFAConfig

    config = tmp_path / "c.yaml"
    config.write_text("model: m\ndata: {train_file: t, label_names: [false, true]}\nmixed_precision: no\n")
    cfg = load_config(config)
    assert cfg.data.label_names == ["false", "true"] and cfg.mixed_precision == "no"
    for bad in (
        dict(use_rslora="no"),
        dict(projection="yes"),
        dict(exclude_modules="(query"),  # a string is a regex (as in PEFT): this one does not compile
        dict(exclude_modules=[""]),
        dict(lora_alpha=True),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LoRAFAConfig(**bad)
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match=r"broken.yaml is not valid YAML \(line"):
        load_config(tmp_path / "broken.yaml")


def test_yaml_yes_no_stay_words_in_text_fields_and_flags_take_every_spelling(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: m\ndata: {train_file: t, label_names: [no, yes, on, off]}\nmixed_precision: no\n"
        "gradient_checkpointing: 1\neval_before: yes\ntensorboard: off\nprogress_bar: False\n"
        "adapter: {use_rslora: true, projection: on}\n"
    )
    cfg = load_config(config)
    assert cfg.data.label_names == ["no", "yes", "on", "off"] and cfg.mixed_precision == "no"
    assert cfg.gradient_checkpointing is True and cfg.eval_before is True
    assert cfg.tensorboard is False and cfg.progress_bar is False
    assert cfg.adapter.use_rslora is True and cfg.adapter.projection is True
    assert load_config(
        None, ["model=m", "data.train_file=t", "data.label_names=[no,yes]"]
    ).data.label_names == [
        "no",
        "yes",
    ]
    # The command line and YAML agree: 1/0 for flags, off/false for mixed_precision.
    for text, cli in (
        ("gradient_checkpointing: 0", "gradient_checkpointing=0"),
        ("mixed_precision: off", "mixed_precision=off"),
    ):
        config.write_text(f"model: m\ndata: {{train_file: t}}\n{text}\n")
        assert load_config(config) == load_config(None, ["model=m", "data.train_file=t", cli])
    assert (
        load_config(None, ["model=m", "data.train_file=t", "mixed_precision=false"]).mixed_precision == "no"
    )
    with pytest.raises(ValueError, match="gradient_checkpointing must be true/false"):
        load_config(None, ["model=m", "data.train_file=t", "gradient_checkpointing=2"])


@pytest.mark.parametrize("key", ["seed", "data.seed"])
@pytest.mark.parametrize("value", ["-5", "99999999999", str(2**32)])
def test_seeds_must_fit_numpy(key, value):
    with pytest.raises(ValueError, match=rf"^{key} must be an integer in \[0, 2\*\*32\), got {value}"):
        load_config(None, ["model=m", "data.train_file=t", f"{key}={value}"])
    assert load_config(None, ["model=m", "data.train_file=t", f"{key}={2**32 - 1}"])


@pytest.mark.parametrize(
    "override, hint",
    [
        ("r=4", "did you mean 'adapter.r'?"),
        ("eval_file=x", "did you mean 'data.eval_file'?"),
        ("max_length=128", "did you mean 'data.max_length'?"),
        ("lora_dropout=0.1", "did you mean 'adapter.lora_dropout'?"),
        ("adapter.lr=1", "did you mean 'lr'?"),
        ("max_lenght=3", "did you mean 'data.max_length'?"),
        ("learning_rate=1e-3", "lorafa calls it 'lr'"),
        ("per_device_train_batch_size=2", "lorafa calls it 'batch_size'"),
        ("gradient_accumulation_steps=2", "lorafa calls it 'grad_accum'"),
        ("num_train_epochs=2", "lorafa calls it 'epochs'"),
        ("save_steps=10", "lorafa calls it 'checkpoint_every'"),
        ("eval_steps=10", "lorafa calls it 'eval_every'"),
        ("bf16=true", "lorafa calls it 'mixed_precision: bf16'"),
    ],
)
def test_unknown_keys_are_looked_up_in_every_section(override, hint):
    with pytest.raises(ValueError, match="unknown config key") as e:
        load_config(None, ["model=m", "data.train_file=t", override])
    assert hint in str(e.value)


def test_yaml_mistakes_are_named(tmp_path):
    config = tmp_path / "c.yaml"
    for text, message in (
        ("- a\n- b\n", "must hold a mapping"),
        ("model: [unclosed\n", "not valid YAML"),
        ("model: m\ndata: {train_file: t}\ndata.max_length: 3\n", "'data.max_length' \\(in a YAML file, nest it: `data:`"),
        ("model: m\ndata: {train_file: t}\nlr: 1e-3\nlr: 1e-4\n", r"not valid YAML \(line 4, column 1\): duplicate key 'lr'"),
    ):
        config.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_config(config)
    config.write_text("model: m\ndata: {train_file: t}\nresume: false\nadapter: {exclude_modules: null}\n")
    cfg = load_config(config)
    assert cfg.resume is None and cfg.adapter.exclude_modules == []
    cli = load_config(None, ["model=m", "data.train_file=t", "resume=false", "adapter.exclude_modules=null"])
    assert cli.resume is None and cli.adapter.exclude_modules == []
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"run is a folder, not a YAML file$"):
        load_config(folder)
    (folder / "config.yaml").write_text("model: m\n")
    with pytest.raises(
        FileNotFoundError, match=r"is a folder, not a YAML file \(did you mean .*config.yaml\?\)"
    ):
        load_config(folder)


def test_a_comma_list_of_names_on_the_command_line_is_a_list():
    cfg = load_config(
        None,
        [
            "model=m",
            "data.train_file=t",
            "data.prompt_column=instruction,input",
            "adapter.target_modules=query,value",
            "adapter.exclude_modules=.*attention.(key|value)",
        ],
    )
    assert cfg.data.prompt_column == ["instruction", "input"]
    assert cfg.adapter.target_modules == ["query", "value"]
    assert cfg.adapter.exclude_modules == ".*attention.(key|value)"  # a regex stays one string


def test_resume_follows_this_runs_lr_and_leaves_a_finished_run_alone(toys, tmp_path):
    common = ["schedule=constant", "logging_every=1", "eval_before=false", "checkpoint_every=2"]
    out, more = tmp_path / "run", tmp_path / "more"
    train(_config(toys, out, "max_steps=4", *common))
    checkpoint = out / "checkpoints" / "checkpoint-4"
    train(_config(toys, more, "max_steps=6", "lr=0.005", f"resume={checkpoint}", *common))
    records = [r for r in map(json.loads, (more / "train_log.jsonl").read_text().splitlines()) if "lr" in r]
    # steps 1-4 come from the source run's log; 5 and 6 ran at the new lr, not the checkpoint's 0.01
    assert [(r["step"], r["lr"]) for r in records if r["step"] > 4] == [(5, 0.005), (6, 0.005)]
    before = (out / "metrics.json").read_text()
    log = (out / "train_log.jsonl").read_text()
    train(_config(toys, out, "max_steps=4", f"resume={out}", *common))  # nothing left to train
    assert (out / "metrics.json").read_text() == before and (out / "train_log.jsonl").read_text() == log


def test_output_dir_rules_protect_what_a_run_did_not_write(toys, tmp_path, monkeypatch):
    """Refused before any work: a file, an unfinished run with checkpoints (rerunning without resume deleted them),
    a folder that is not a run but holds names a run writes. Other folders are written into, keeping their files;
    a resume into another folder starts its log from the source run's, up to the checkpoint."""
    common = ["max_steps=4", "checkpoint_every=2", "logging_every=1", "eval_before=false"]
    run = tmp_path / "run"
    train(_config(toys, run, *common))
    (run / "metrics.json").unlink()  # as a run interrupted after its last checkpoint leaves it
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"holds an unfinished run with checkpoints.*checkpoint-4.*resume="):
        train(_config(toys, run, *common))
    with pytest.raises(ValueError, match="holds an unfinished run"):
        dry_run(_config(toys, run, *common))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before

    mine = tmp_path / "mine"
    (mine / "checkpoints" / "x").mkdir(parents=True)
    (mine / "checkpoints" / "x" / "w.bin").write_text("important")
    (mine / "config.yaml").write_text("mine")
    with pytest.raises(ValueError, match=r"not a lorafa run folder but holds \['checkpoints', 'config.yaml'\]"):
        train(_config(toys, mine, *common))
    assert (mine / "checkpoints" / "x" / "w.bin").read_text() == "important"
    assert (mine / "config.yaml").read_text() == "mine"

    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(ValueError, match="output_dir: .*afile"):
            train(_config(toys, out, *common))

    notes = tmp_path / "project"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep")
    monkeypatch.setenv("HOME", str(tmp_path))
    train(_config(toys, Path("~/project"), "max_steps=2", "eval_before=false"))  # "~" is the home folder
    assert (notes / "notes.txt").read_text() == "keep" and (notes / "metrics.json").is_file()

    # A run that stopped before its first log record (an empty log, config.yaml, labels.json) is rerun in place;
    # a folder holding only someone's config.yaml is not a run (that file would be overwritten).
    early = tmp_path / "early"
    early.mkdir()
    (early / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(ValueError, match=r"not a lorafa run folder but holds \['config.yaml'\]"):
        train(_config(toys, early, "max_steps=2", "eval_before=false"))
    (early / "train_log.jsonl").write_text("")  # what a run writes first
    (early / "labels.json").write_text((run / "labels.json").read_text())
    train(_config(toys, early, "max_steps=2", "eval_before=false"))
    assert (early / "metrics.json").is_file()

    other = tmp_path / "other"  # a finished run of its own, replaced by the resumed one
    train(_config(toys, other, "max_steps=2", "logging_every=1", "eval_before=false"))
    train(_config(toys, other, "max_steps=6", "logging_every=1", "eval_before=false", f"resume={run}"))
    records = [json.loads(line) for line in (other / "train_log.jsonl").read_text().splitlines()]
    source = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r for r in records if r["step"] <= 4] == [r for r in source if r["step"] <= 4]
    assert [r["step"] for r in records if "lr" in r] == [1, 2, 3, 4, 5, 6]  # none of its own earlier run


def test_dry_run_checks_a_resume_but_not_the_launchers_process_count(toys, tmp_path, caplog):
    run = tmp_path / "run"
    train(_config(toys, run, "max_steps=4", "checkpoint_every=2", "eval_before=false"))
    state = run / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "processes": 2}))  # as torchrun on 2 GPUs
    assert dry_run(_config(toys, run, "max_steps=8", f"resume={run}"))["steps"] == 8
    with pytest.raises(ValueError, match="past this run's 3 steps"):
        dry_run(_config(toys, run, "max_steps=3", f"resume={run}"))
    data = _config(toys, run).data.train_file
    caplog.clear()
    dry_run(_config(toys, tmp_path / "x", f"data.eval_file={data}"))
    assert "data.eval_file is data.train_file" in caplog.text


def test_resume_refuses_another_batch_size_seed_and_writes_a_repeatable_config(toys, tmp_path):
    out = tmp_path / "run"
    train(_config(toys, out, "max_steps=4", "batch_size=4", "checkpoint_every=2"))
    checkpoint = out / "checkpoints" / "checkpoint-2"
    for change, field in (
        ("batch_size=8", "batch_size"),
        ("seed=3", "seed"),
        ("group_by_length=true", "group_by_length"),
    ):
        with pytest.raises(ValueError, match=rf"resume: .*checkpoint-2 was trained with a different {field}"):
            train(_config(toys, tmp_path / "other", "max_steps=4", "batch_size=4", change, f"resume={checkpoint}"))
    # Only the fields that differ are named, not the whole section.
    with pytest.raises(ValueError, match=r"different data.max_length \(32, now 12\)$"):
        train(_config(toys, tmp_path / "other", "max_steps=4", "batch_size=4", "data.max_length=12", f"resume={checkpoint}"))
    # A checkpoint past this run's last step is refused, not "resumed" into a run of zero steps.
    with pytest.raises(ValueError, match=r"checkpoint-2 is at step 2, past this run's 1 steps"):
        train(_config(toys, tmp_path / "other", "max_steps=1", "batch_size=4", f"resume={checkpoint}"))
    # Every difference is named at once, not only the first.
    with pytest.raises(ValueError, match=r"different batch_size \(4, now 8\), seed \(0, now 3\)"):
        train(_config(toys, tmp_path / "other", "max_steps=4", "batch_size=8", "seed=3", f"resume={checkpoint}"))
    resumed = tmp_path / "resumed"
    # The held-out cap and the cache folder leave the training data alone: they may change.
    train(
        _config(
            toys, resumed, "max_steps=4", "batch_size=4", "grad_accum=2", f"resume={checkpoint}",
            "data.max_eval_samples=3", f"data.cache_dir={tmp_path / 'cache'}",
        )
    )  # fmt: skip
    # Its config.yaml repeats the run: it does not resume again.
    assert load_config(resumed / "config.yaml").resume is None


def test_eval_every_without_eval_data_warns(toys, tmp_path, caplog):
    train(_config(toys, tmp_path / "run", "data.eval_split=0", "eval_every=1", "max_steps=2"))
    assert "there is no eval data" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="trains on the GPU where there is one")
def test_fp16_on_cpu_is_refused(toys, tmp_path):
    with pytest.raises(ValueError, match="mixed_precision: fp16 does nothing on CPU"):
        train(_config(toys, tmp_path / "run", "mixed_precision=fp16"))
    with pytest.raises(ValueError, match="mixed_precision: fp16 does nothing on CPU"):
        train_module.dry_run(_config(toys, tmp_path / "run", "mixed_precision=fp16"))


def test_the_log_records_the_lr_each_step_used(toys, tmp_path):
    out = tmp_path / "run"
    train(_config(toys, out, "max_steps=4", "warmup_steps=2", "logging_every=1", "lr=0.01"))
    logged = [
        r["lr"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "lr" in r
    ]
    # the schedule's factors for steps 1..4 (warm-up 1/3, 2/3; then linear decay from the peak over 2 steps)
    assert logged == pytest.approx([0.01 / 3, 0.02 / 3, 0.01, 0.005])


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_warms_up_then_decays(schedule):
    total, warmup, lr = 20, 5, 0.1
    cfg = load_config(
        None, ["model=m", "data.train_file=t", f"lr={lr}", f"warmup_steps={warmup}", f"schedule={schedule}"]
    )
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_scheduler(opt, cfg, total)
    got = []
    for _ in range(total):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for step, value in enumerate(got):
        if step < warmup:
            expected = lr * (step + 1) / (warmup + 1)
        else:
            progress = (step - warmup) / (total - warmup)
            expected = {
                "linear": lr * (1 - progress),
                "cosine": lr * 0.5 * (1 + math.cos(math.pi * progress)),
                "constant": lr,
            }[schedule]
        assert value == pytest.approx(expected), step


# ------------------------------------------------------------------------------------------------- loop


def test_loss_decreases_on_a_learnable_task(toys, tmp_path):
    out = tmp_path / "run"
    m = train(_config(toys, out, "max_steps=16", "lr=2e-2", "warmup_steps=0", "logging_every=1"))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 16
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.05
    assert m["eval_loss"] < m["initial_eval_loss"]


def test_gradient_accumulation_equals_a_bigger_batch(toys, tmp_path):
    big = train(_config(toys, tmp_path / "big", "batch_size=8", "max_steps=3"))
    acc = train(_config(toys, tmp_path / "acc", "batch_size=4", "grad_accum=2", "max_steps=3"))
    _assert_same_adapter(tmp_path / "big", tmp_path / "acc", atol=2e-6, rtol=1e-5, trained=True)
    assert big["eval_loss"] == pytest.approx(acc["eval_loss"], abs=1e-5)


@pytest.mark.parametrize("task", ["sft", "seq2seq"])
def test_gradient_accumulation_weights_micro_batches_by_their_target_tokens(toys, tmp_path, task):
    # Answers of different lengths: the micro-batches hold different numbers of target tokens, so a mean of their
    # mean losses would differ from one batch of all of them; token-weighted accumulation does not.
    data = toys / "data" / f"{task}.csv"
    if task == "sft":
        data = _varied_answers(shutil.copy(data, tmp_path / "sft.csv"))

    def run(out, *extra):
        args = run_args(toys, task, out, "max_steps=3", "eval_before=false", f"data.train_file={data}", *extra)
        return train(load_config(None, args[1:]))

    big = run(tmp_path / "big", "batch_size=8")
    acc = run(tmp_path / "acc", "batch_size=2", "grad_accum=4")
    _assert_same_adapter(tmp_path / "big", tmp_path / "acc", atol=2e-6, rtol=1e-5, trained=True)
    assert big["eval_loss"] == pytest.approx(acc["eval_loss"], abs=1e-5)
    logged = [
        [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
        for out in (tmp_path / "big", tmp_path / "acc")
    ]
    assert logged[0] == pytest.approx(logged[1], abs=1e-5)


def test_gradient_checkpointing_gives_the_same_adapter(toys, tmp_path):
    train(
        _config(
            toys,
            tmp_path / "plain",
            "max_steps=3",
            f"model={toys / 'bert-dropout'}",
            "adapter.lora_dropout=0.1",
        )
    )
    train(
        _config(
            toys, tmp_path / "ckpt", "max_steps=3", f"model={toys / 'bert-dropout'}", "adapter.lora_dropout=0.1",
            "gradient_checkpointing=true",
        )
    )  # fmt: skip
    _assert_same_adapter(tmp_path / "plain", tmp_path / "ckpt", atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_is_bit_identical(toys, tmp_path, monkeypatch, group_by_length):
    # Dropout in the model and the adapters, warm-up, cosine decay, accumulation and two epochs: every piece of
    # state that resume restores (RNG, optimizer, schedule, data position) shows up in the result.
    common = (
        f"model={toys / 'bert-dropout'}", "adapter.lora_dropout=0.1", "batch_size=4", "grad_accum=2",
        "max_steps=null", "epochs=2", "warmup_ratio=0.2", "schedule=cosine", "eval_every=3",
        f"group_by_length={str(group_by_length).lower()}",
    )  # fmt: skip
    whole = train(_config(toys, tmp_path / "whole", *common))

    out = tmp_path / "parts"
    saved = train_module.save_checkpoint
    calls = []

    def crash_after_second_checkpoint(*args, **kwargs):
        saved(*args, **kwargs)
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # an interruption right after a checkpoint was written

    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(_config(toys, out, *common, "checkpoint_every=5"))
    monkeypatch.setattr(train_module, "save_checkpoint", saved)
    assert calls[-1].name == "checkpoint-10" and (calls[-1] / "adapter").is_dir()
    resumed = train(_config(toys, out, *common, "checkpoint_every=5", f"resume={out}"))

    a, b = _adapter(tmp_path / "whole"), _adapter(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["eval_loss"] == whole["eval_loss"]
    assert resumed["initial_eval_loss"] == whole["initial_eval_loss"]
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    whole_steps = [
        json.loads(line)["step"] for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()
    ]
    assert steps == whole_steps  # the log was cut at the checkpoint and continued without duplicates


def test_resume_full_fine_tuning(toys, tmp_path, monkeypatch):
    common = ("method=full", "max_steps=4", "lr=1e-3")
    train(_config(toys, tmp_path / "whole", *common))
    out = tmp_path / "parts"
    train(_config(toys, out, *common, "checkpoint_every=2", "max_steps=4"))
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    shutil.rmtree(out / "adapter")
    train(_config(toys, out, *common, f"resume={out / 'checkpoints' / 'checkpoint-2'}"))
    a = load_file(str(tmp_path / "whole" / "adapter" / "model.safetensors"))
    b = load_file(str(out / "adapter" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(toys, tmp_path, capsys):
    # A regression label of 1e30 squares to inf in float32: the step that sees it has an infinite loss.
    data = tmp_path / "data"
    rows = write_data(data, "regression", n=32).read_text().splitlines()
    bad = epoch_batches(32, 4, epoch=0, seed=0)[3][0]  # an example of the 4th step
    header, body = rows[0], rows[1:]
    text, _ = body[bad].rsplit(",", 1)
    body[bad] = f"{text},1e30"
    (data / "bad.csv").write_text("\n".join([header, *body]) + "\n")
    eval_file = write_data(tmp_path / "eval", "regression", n=8, seed=1)
    out = tmp_path / "run"
    args = run_args(
        toys, "regression", out, f"data.train_file={data / 'bad.csv'}", f"data.eval_file={eval_file}"
    )
    assert main([*args, "batch_size=4", "max_steps=8", "checkpoint_every=2", "max_grad_norm=null"]) == 1
    err = capsys.readouterr().err
    assert "loss became inf at step 4" in err and "checkpoint-2" in err
    assert "with it. The last good checkpoint is" in err  # a sentence starts with a capital
    assert (out / "checkpoints" / "checkpoint-2" / "adapter").is_dir()
    assert not (out / "checkpoints" / "checkpoint-4").exists()
    assert not (out / "metrics.json").exists()


def _varied_answers(path: Path) -> Path:
    """The toy sft file with answers of 1-4 words of their prompt (the toy answers all have two tokens)."""
    rows = pd.read_csv(path)
    rows["response"] = [" ".join(p.split()[: i % 4 + 1]) for i, p in enumerate(rows["prompt"])]
    rows.to_csv(out := path.with_name(f"varied-{path.name}"), index=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "sft"])
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(toys, tmp_path, task):
    # sft with answers of different lengths: each process's share of the step's target tokens differs, so the
    # micro-batch weights must count the targets of both processes.
    if 0 < torch.cuda.device_count() < 2:
        pytest.skip("two processes need two GPUs (NCCL) or none (gloo on CPU)")
    train_file = write_data(tmp_path / "train", task, n=64)  # divisible by the global batch
    eval_file = write_data(tmp_path / "eval", task, n=16, seed=1)
    if task == "sft":
        train_file = _varied_answers(train_file)
    family = {"classification": "bert", "sft": "llama"}[task]
    common = [
        f"model={toys / family}", f"task={task}", f"data.train_file={train_file}", "data.max_length=32",
        f"data.eval_file={eval_file}", "epochs=2", "lr=1e-2", "adapter.r=4", "progress_bar=false",
    ]  # fmt: skip
    single = train(load_config(None, [*common, f"output_dir={tmp_path / 'single'}", "batch_size=8"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "lorafa.cli", "train", *common, f"output_dir={tmp_path / 'ddp'}", "batch_size=4", "checkpoint_every=8",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Done in") == 1  # only the main process reports
    _assert_same_adapter(tmp_path / "single", tmp_path / "ddp", atol=1e-5, rtol=1e-4)
    # Every process wrote its RNG state into the shared checkpoint.
    checkpoint = tmp_path / "ddp" / "checkpoints" / "checkpoint-16"
    assert {p.name for p in checkpoint.glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["steps"] == single["steps"] == 16
    assert ddp["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-5)


def test_saved_config_reloads_to_the_same_config(toys, tmp_path):
    cfg = _config(toys, tmp_path / "run", "max_steps=1")
    train(cfg)
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["adapter"]["r"] == 4


def _sft_config(toys: Path, out: Path, *overrides: str) -> TrainConfig:
    return load_config(None, run_args(toys, "sft", out, "max_steps=3", *overrides)[1:])


def test_chunked_loss_trains_like_the_plain_loss(toys, tmp_path):
    chunked = train(_sft_config(toys, tmp_path / "chunked", "chunked_loss=true"))
    plain = train(_sft_config(toys, tmp_path / "plain", "chunked_loss=false"))
    _assert_same_adapter(tmp_path / "chunked", tmp_path / "plain", atol=1e-5, rtol=1e-4, trained=True)
    assert chunked["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)


def test_chunked_loss_is_confirmed_on_a_batch_before_training(toys, tmp_path, monkeypatch, caplog):
    from lorafa import loss

    # a model whose logits transform the chunked loss does not know: the default falls back, asking for it fails
    monkeypatch.setattr(loss, "_head_transform", lambda config: (3.0, None))
    with caplog.at_level("WARNING", logger="lorafa"):
        train(_sft_config(toys, tmp_path / "auto", "max_steps=1"))
    assert "chunked_loss off" in caplog.text
    with pytest.raises(ValueError, match="chunked_loss: on a training batch the chunked loss is"):
        train(_sft_config(toys, tmp_path / "asked", "max_steps=1", "chunked_loss=true"))


def test_cheap_recompute_trains_like_the_plain_model(toys, tmp_path):
    train(_config(toys, tmp_path / "plain", "max_steps=3"))
    train(_config(toys, tmp_path / "cheap", "max_steps=3", "cheap_recompute=true"))
    _assert_same_adapter(tmp_path / "plain", tmp_path / "cheap", atol=1e-6, rtol=1e-5)


def test_prepare_model_applies_the_memory_options(toys):
    from lorafa.config import LoRAFAConfig
    from lorafa.models import load_model, prepare_model

    model = load_model(str(toys / "bert"), "classification", num_labels=2)
    modules_before = {type(m).__name__ for m in model.modules()}
    prepare_model(
        model,
        "lora-fa",
        "classification",
        LoRAFAConfig(r=2),
        gradient_checkpointing=True,
        cheap_recompute=True,
    )
    on = (
        model.is_activation_checkpointing
        if hasattr(model, "is_activation_checkpointing")
        else model.is_gradient_checkpointing
    )
    assert on
    assert {type(m).__name__ for m in model.modules()} - modules_before >= {"LoRAFALinear", "RecomputedLeaf"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_B" in n or n.startswith("classifier.") for n in trainable)
    full = prepare_model(
        load_model(str(toys / "bert"), "classification", num_labels=2),
        "full",
        "classification",
        LoRAFAConfig(),
    )
    assert all(p.requires_grad for p in full.parameters())


@pytest.mark.parametrize(("init", "share"), [("gradient", "a_gradient_share"), ("inputs", "a_input_share")])
def test_gradient_init_of_a_runs_inside_train(toys, tmp_path, init, share):
    # init_lora_weights=gradient|inputs: train() sets A from its first training batches before the first step.
    args = (f"adapter.init_lora_weights={init}", "adapter.init_batches=2", "max_steps=3")
    m = train(_config(toys, tmp_path / "a", *args))
    assert 0.0 < m[share] <= 1.0
    again = train(_config(toys, tmp_path / "b", *args))
    _assert_same_adapter(tmp_path / "a", tmp_path / "b", atol=0, rtol=0, trained=True)
    assert again[share] == m[share]
    for k, a in _adapter(tmp_path / "a").items():
        if "lora_A" in k:  # orthogonal rows, not Kaiming's random ones
            gram = a @ a.t()
            torch.testing.assert_close(
                gram, torch.diag(gram.diagonal()), atol=1e-5 * float(gram.max()), rtol=0
            )


def test_gradient_init_resume_reloads_a_instead_of_recomputing(toys, tmp_path, monkeypatch):
    common = ("adapter.init_lora_weights=gradient", "adapter.init_batches=2", "max_steps=4", "eval_every=0")
    whole = train(_config(toys, tmp_path / "whole", *common))
    out = tmp_path / "parts"
    saved = train_module.save_checkpoint

    def crash_after_first_checkpoint(*args, **kwargs):
        saved(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(_config(toys, out, *common, "checkpoint_every=2"))
    monkeypatch.setattr(train_module, "save_checkpoint", saved)
    calls = []
    monkeypatch.setattr(train_module, "init_a_from_gradients", lambda *a, **k: calls.append(1))
    resumed = train(_config(toys, out, *common, "checkpoint_every=2", f"resume={out}"))
    assert calls == []  # A came from the checkpoint
    _assert_same_adapter(tmp_path / "whole", out, atol=0, rtol=0, trained=True)
    assert resumed["eval_loss"] == whole["eval_loss"]


def test_the_dry_run_memory_estimate_plans_the_runs_own_loss(toys, tmp_path):
    from lorafa.planner import PlannerArgs, format_bytes, run_planner
    from lorafa.train import memory_estimate

    def estimate(*extra: str) -> str:
        return memory_estimate(load_config(None, run_args(toys, "sft", tmp_path / "run", *extra)[1:]))

    def planned(chunked: bool) -> str:
        args = PlannerArgs(config=str(toys / "llama"), batch_size=8, seq_len=32, dtype="float32", r=4,
                           lora_alpha=8, methods=["lora-fa"], checkpointing="off", device="cpu",
                           task="causal-lm", chunked_loss=chunked)  # fmt: skip
        return format_bytes(run_planner(args)["methods"][0]["activations"])

    # sft trains with the chunked loss by default (no logits kept): the estimate must plan that, not the logits.
    assert f"activations {planned(True)};" in estimate()
    assert f"activations {planned(False)};" in estimate("chunked_loss=false")
    assert planned(True) != planned(False)
    # A rotary model runs past max_position_embeddings (64 here): the estimate plans the run's length, not 64.
    assert "at batch 8 × 128 tokens" in estimate("data.max_length=128", "data.block_size=128")
    # Targets given as a regex, and exclusions, are planned too (both were dropped: the default was planned).
    fewer = estimate(r"adapter.target_modules=.*self_attn\.(q|v)_proj")
    assert fewer != estimate() and fewer == estimate("adapter.target_modules=[q_proj,v_proj]")
    assert estimate("adapter.exclude_modules=[gate_proj,up_proj,down_proj,k_proj,o_proj]") == fewer
