"""`lorafa train / eval / merge / generate` end to end on tiny random-init models and toy data files."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from _toys import FAMILY_OF_TASK, run_args, toy_root, write_data

import lorafa
from lorafa.cli import main
from lorafa.evaluate import load_trained
from lorafa.models import load_model

EVAL_KEYS = {
    "classification": {"eval_loss", "eval_accuracy", "eval_f1", "eval_mcc"},
    "regression": {"eval_loss", "eval_pearson", "eval_spearman"},
    "sft": {"eval_loss", "eval_perplexity"},
    "clm": {"eval_loss", "eval_perplexity"},
    "seq2seq": {"eval_loss", "eval_perplexity"},
}
RUN_KEYS = {"train_runtime_s", "tokens_per_s", "peak_memory_bytes", "trainable_params"}


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return toy_root(tmp_path_factory)


def _outputs_complete(out: Path, task: str, method: str) -> dict[str, float]:
    for name in ("metrics.json", "train_log.jsonl", "config.yaml", "loss.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert EVAL_KEYS[task] | RUN_KEYS <= set(metrics), sorted(metrics)
    assert metrics["trainable_params"] > 0 and metrics["tokens_per_s"] > 0
    if method == "full":
        assert (out / "adapter" / "config.json").is_file()
    else:
        assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "labels.json").is_file() == (task == "classification")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [2, 4]
    return metrics


@pytest.mark.parametrize(
    "task, method, extra",
    [
        ("classification", "lora-fa", []),
        ("classification", "lora", []),
        ("classification", "full", []),
        ("classification", "lora-fa", ["gradient_checkpointing=true"]),
        ("classification", "lora-fa", ["adapter.projection=true"]),
        ("regression", "lora-fa", []),
        ("sft", "lora-fa", []),
        ("sft", "full", ["gradient_checkpointing=true", "chunked_loss=false"]),
        ("seq2seq", "lora-fa", ["exact_match_samples=4"]),
        ("seq2seq", "lora", ["gradient_checkpointing=true", "exact_match_samples=0"]),
        ("clm", "lora-fa", []),
        ("clm", "lora", ["adapter.projection=false", "mixed_precision=bf16"]),
    ],
)
def test_train_every_task_and_method(toys, tmp_path, task, method, extra):
    out = tmp_path / "run"
    assert main(run_args(toys, task, out, f"method={method}", *extra)) == 0
    metrics = _outputs_complete(out, task, method)
    if task == "seq2seq":
        assert ("eval_exact_match" in metrics) == ("exact_match_samples=0" not in extra)
    # The trained model loads back (our loader for adapters, transformers for full) and evaluates.
    model, _, cfg = load_trained(out)
    assert cfg is not None and cfg.method == method
    if method != "full":
        assert any(True for _ in lorafa.lorafa_layers(model))


@pytest.mark.parametrize("task, precision", [("classification", "no"), ("sft", "bf16")])
def test_eval_reproduces_metrics_json(toys, tmp_path, capsys, task, precision):
    out = tmp_path / "run"
    assert main(run_args(toys, task, out, f"mixed_precision={precision}")) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "metrics.json").read_text())
    for key in EVAL_KEYS[task]:  # bf16 runs are evaluated under the run's autocast, as in training
        assert again[key] == pytest.approx(saved[key], abs=1e-6), key


def test_eval_on_another_file_and_adapter_folder(toys, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(toys, "classification", out, "data.max_eval_samples=4")) == 0
    other = write_data(tmp_path / "other", "classification", n=12, seed=5, fmt="jsonl")
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(other), "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert from_run["eval_samples"] == 12
    assert main(["eval", str(out), "--data", str(other), "data.max_eval_samples=5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_samples"] == 5
    # The bare adapter folder records its base model and head size; the same metrics come out.
    assert main(["eval", str(out / "adapter"), "--data", str(other), "--json"]) == 0
    from_adapter = json.loads(capsys.readouterr().out)
    assert from_adapter["eval_accuracy"] == from_run["eval_accuracy"]
    assert from_adapter["eval_loss"] == pytest.approx(from_run["eval_loss"], abs=1e-6)


def test_a_copied_adapter_keeps_its_class_ids(toys, tmp_path, capsys):
    # Classes in a non-alphabetical order, and an eval file holding only one of them: sorting the eval file's
    # labels would give that class id 0.
    out = tmp_path / "run"
    assert main(run_args(toys, "classification", out, "data.label_names=[pos,neg]")) == 0
    both = write_data(tmp_path / "d", "classification", n=12, seed=5, fmt="jsonl")
    rows = [r for r in map(json.loads, both.read_text().splitlines()) if r["label"] == "pos"]
    only_pos = tmp_path / "pos.jsonl"
    only_pos.write_text("".join(json.dumps(r) + "\n" for r in rows))
    copy = shutil.copytree(out / "adapter", tmp_path / "elsewhere" / "adapter")
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(only_pos), "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["eval", str(copy), "--data", str(only_pos), "--json"]) == 0
    from_copy = json.loads(capsys.readouterr().out)
    assert from_copy["eval_accuracy"] == from_run["eval_accuracy"]
    assert from_copy["eval_loss"] == pytest.approx(from_run["eval_loss"], abs=1e-6)
    # Without the names (an adapter from elsewhere): an error, not silently renumbered classes.
    (copy / "labels.json").unlink()
    assert main(["eval", str(copy), "--data", str(both)]) == 2
    assert "class names of training are unknown" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["classification", "sft"])
def test_peft_loads_the_adapter_with_the_same_outputs(toys, tmp_path, task):
    from peft import PeftModel

    out = tmp_path / "run"
    assert main(run_args(toys, task, out)) == 0
    ours, tokenizer, cfg = load_trained(out)
    labels = (
        json.loads((out / "labels.json").read_text())["label_names"] if task == "classification" else None
    )
    base = load_model(cfg.model, task, len(labels) if labels else None, pad_token_id=tokenizer.pad_token_id)
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    ids = tokenizer(["good cat dog", "bad red sun moon"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = ours(**ids).logits
        b = peft_model(**ids).logits
    assert any(layer.lora_B.weight.abs().sum() > 0 for _, layer in lorafa.lorafa_layers(ours))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_merge_writes_a_plain_model_with_the_same_logits(toys, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    assert main(run_args(toys, "classification", out)) == 0
    assert main(["merge", str(out), str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ours, tokenizer, _ = load_trained(out)
    ids = tokenizer(["good cat dog", "bad red sun moon"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, ours(**ids).logits, atol=1e-5, rtol=1e-5)
    assert merged.config.id2label == {0: "neg", 1: "pos"}


def test_generate_matches_the_merged_model(toys, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(toys, "sft", out)) == 0
    assert main(["merge", str(out), str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "cat dog", "--max-new-tokens", "5"]) == 0
    with_adapter = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "merged"), "cat dog", "--max-new-tokens", "5"]) == 0
    merged = capsys.readouterr().out
    assert with_adapter == merged and with_adapter.strip()


def test_dry_run_prints_config_and_plan_without_training(toys, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*run_args(toys, "classification", out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    resolved = yaml.safe_load(text.split("---")[0])
    assert resolved["task"] == "classification" and resolved["adapter"]["r"] == 4
    assert "trainable parameters:" in text and "optimizer steps: 4" in text
    assert "memory estimate:" in text and "activations" in text and "at batch 8 × 32 tokens" in text
    assert not out.exists()


def test_config_file_plus_overrides(toys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(toys / "bert"),
                "task": "classification",
                "data": {"train_file": str(toys / "data" / "classification.csv"), "max_length": 16},
                "output_dir": str(tmp_path / "run"),
                "max_steps": 2,
                "progress_bar": False,
                "mixed_precision": False,  # what YAML makes of `mixed_precision: no`
            }
        )
    )
    assert main(["train", str(config), "adapter.r=2", "lr=1e-3"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["adapter"]["r"] == 2 and saved["lr"] == 1e-3 and saved["mixed_precision"] == "no"
    assert saved["data"]["max_length"] == 16


@pytest.mark.parametrize(
    "args, message",
    [
        (["adapter.rr=3"], "unknown config key 'adapter.rr' (did you mean 'adapter.r'?)"),
        (["learning_rate=3"], "unknown config key 'learning_rate'"),
        (["adapter.r=0"], "adapter.r must be a positive integer"),
        (["adapter.r=abc"], "adapter.r must be an integer"),
        (["lr=fast"], "lr must be a number"),
        (["lr=0"], "lr must be a number > 0"),
        (["lr=inf"], "lr must be a number > 0, got inf"),
        (["weight_decay=nan"], "weight_decay must be a number >= 0, got nan"),
        (["adapter.lora_alpha=nan"], "lora_alpha must be a finite number > 0"),
        (["output_dir=null"], "output_dir must be a string; it cannot be null"),
        (["method=full", "model_dtype=float16"], "model_dtype float16 with method full"),
        (["method=qlora"], "method must be one of"),
        (["task=ner"], "task must be one of"),
        (["schedule=step"], "schedule must be one of"),
        (["mixed_precision=fp8"], "mixed_precision must be one of"),
        (["batch_size=0"], "batch_size must be an integer >= 1"),
        (["warmup_ratio=0.1", "warmup_steps=3"], "set only one of them"),
        (["adapter.lora_dropout=1.5"], "adapter.lora_dropout must be in [0, 1)"),
        (["method=lora", "adapter.projection=true"], "adapter.projection=True needs method='lora-fa'"),
        (["chunked_loss=true"], "chunked_loss applies to causal LM tasks"),
        (["adapter=3"], "adapter is a section"),
        (["data.eval_split=2"], "data.eval_split must be in [0, 1)"),
        (["gradient_checkpointing=maybe"], "gradient_checkpointing must be true/false"),
        (["adapter.target_modules=nothing_like_this"], "no module matched target_modules"),
        (
            ["data.text_column=body"],
            "column 'body' (text_column) not found; the columns are ['text', 'label']",
        ),
        (["data.train_file=/nonexistent/x.csv"], "train_file: no such file or folder"),
        (["model=/nonexistent/model"], "model: no such folder: /nonexistent/model"),
        (["resume=/nonexistent/run"], "resume: no such folder"),
        (["tensorboard=true"], "pip install tensorboard"),
        (["=3"], "must look like key=value"),
        (["a.yaml", "b.yaml"], "at most one CONFIG.yaml"),
        (["/nonexistent/config.yaml"], "config file not found"),
    ],
)
def test_bad_config_errors_name_the_culprit(toys, tmp_path, capsys, args, message):
    if "tensorboard=true" in args and importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed, so tensorboard=true is valid")
    out = tmp_path / "run"
    base = run_args(toys, "classification", out)
    if any(a.endswith(".yaml") for a in args):
        base = ["train"]
    assert main([*base, *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (out / "metrics.json").exists()


def test_resume_refuses_another_adapter(toys, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(toys, "classification", out, "checkpoint_every=2")) == 0
    assert main(run_args(toys, "classification", tmp_path / "b", f"resume={out}", "adapter.r=2")) == 2
    assert "different adapter" in capsys.readouterr().err


def test_cli_without_a_command_prints_help(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out
    assert main(["--help"]) == 0


def _assets_or_skip() -> None:
    from lorafa.assets import resolve

    try:
        resolve("asset:all-minilm-l6-v2")
        resolve("asset:rotten-tomatoes")
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.assets
def test_offline_default_dry_run(tmp_path, capsys):
    _assets_or_skip()
    assert main(["train", "--dry-run", f"output_dir={tmp_path / 'run'}"]) == 0
    text = capsys.readouterr().out
    assert "2000 training examples, 500 eval examples, 2 labels ['rotten', 'fresh']" in text


@pytest.mark.assets
def test_offline_default_trains_a_few_steps(tmp_path, capsys):
    _assets_or_skip()
    out = tmp_path / "run"
    args = [
        "train",
        f"output_dir={out}",
        "max_steps=3",
        "data.max_train_samples=48",
        "data.max_eval_samples=32",
    ]
    assert main([*args, "eval_every=0", "progress_bar=false"]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "→" in text and "peak process memory" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"initial_eval_accuracy", "eval_accuracy"} <= set(metrics)


def test_every_task_has_a_toy_family():
    assert set(FAMILY_OF_TASK) == set(EVAL_KEYS)


def test_training_without_eval_data(toys, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(toys, "regression", out, "data.eval_split=0")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert not any(k.startswith(("eval_", "initial_")) for k in metrics)
    assert metrics["train_samples"] == 64
    capsys.readouterr()
    assert main(["eval", str(out)]) == 2
    assert "no evaluation data" in capsys.readouterr().err


def test_merge_never_replaces_the_source_or_another_folder(toys, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(toys, "classification", out)) == 0
    before = sorted(p.name for p in out.iterdir())
    for target in (out, out / "merged", tmp_path):
        assert main(["merge", str(out), str(target)]) == 2
        assert "inside or around it" in capsys.readouterr().err
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("x")
    assert main(["merge", str(out), str(notes)]) == 2
    assert "is not empty" in capsys.readouterr().err and (notes / "keep.txt").is_file()
    # --overwrite replaces a saved model only, never a folder of other files.
    assert main(["merge", str(out), str(notes), "--overwrite"]) == 2
    assert "holds files but no saved model" in capsys.readouterr().err and (notes / "keep.txt").is_file()
    assert sorted(p.name for p in out.iterdir()) == before


def test_save_adapter_refuses_a_folder_that_is_not_an_adapter(toys, tmp_path):
    model, _, _ = load_trained(_trained_run(toys, tmp_path))
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not an adapter folder"):
        lorafa.save_adapter(model, tmp_path / "work")
    assert (tmp_path / "work" / "notes.txt").is_file()
    lorafa.save_adapter(model, tmp_path / "a")
    lorafa.save_adapter(model, tmp_path / "a")  # an earlier adapter is replaced


def _trained_run(toys, tmp_path, task="classification", *extra):
    out = tmp_path / f"run-{task}"
    assert main(run_args(toys, task, out, *extra)) == 0
    return out


def test_a_new_run_replaces_every_output_of_a_finished_one(toys, tmp_path):
    out = _trained_run(toys, tmp_path, "classification", "checkpoint_every=2")
    assert (out / "labels.json").is_file() and (out / "checkpoints").is_dir()
    args = run_args(toys, "regression", out)  # another task into the same output_dir
    assert main(args) == 0
    assert not (out / "labels.json").exists() and not (out / "checkpoints").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["task"] == "regression"


def test_interrupts_os_errors_and_corrupt_weights_end_with_one_line(toys, tmp_path, monkeypatch, capsys):
    import lorafa.train

    out = _trained_run(toys, tmp_path, "classification", "checkpoint_every=2", "max_steps=4")

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(lorafa.train, "train", interrupted)
    assert main(run_args(toys, "classification", out)) == 130
    err = capsys.readouterr().err
    assert f"interrupted; resume={out / 'checkpoints' / 'checkpoint-4'} continues it" in err
    assert "Traceback" not in err
    assert main(run_args(toys, "classification", tmp_path / "fresh")) == 130
    assert "interrupted (no checkpoint was written yet)" in capsys.readouterr().err

    def unwritable(cfg):
        raise PermissionError(13, "Permission denied", "/sys/x")

    monkeypatch.setattr(lorafa.train, "train", unwritable)
    assert main(run_args(toys, "classification", out)) == 2
    assert "error: [Errno 13] Permission denied: '/sys/x'" in capsys.readouterr().err
    monkeypatch.undo()

    broken = tmp_path / "broken-model"
    shutil.copytree(toys / "bert", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    args = run_args(toys, "classification", tmp_path / "run2")
    args[1] = f"model={broken}"
    assert main(args) == 2
    assert "its weights file cannot be read" in capsys.readouterr().err


_CUSTOM_CONFIG = """from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "lorafa_tiny_custom"
"""
_CUSTOM_MODEL = """from transformers import LlamaForCausalLM

from .configuration_tiny import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


def test_a_model_with_its_own_code_needs_trust_remote_code(toys, tmp_path, capsys):
    """A checkpoint whose classes live in its folder (auto_map) trains, evaluates and merges with
    trust_remote_code, and is refused by transformers, named, without it."""
    custom = tmp_path / "custom"
    shutil.copytree(toys / "llama", custom)
    (custom / "configuration_tiny.py").write_text(_CUSTOM_CONFIG)
    (custom / "modeling_tiny.py").write_text(_CUSTOM_MODEL)
    config = json.loads((custom / "config.json").read_text())
    config["model_type"] = "lorafa_tiny_custom"
    config["architectures"] = ["TinyCustomForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_tiny.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM",
    }
    (custom / "config.json").write_text(json.dumps(config))
    args = run_args(toys, "sft", tmp_path / "run")
    args[1] = f"model={custom}"
    assert main(args) == 2  # refused at once (transformers would ask on the terminal), in one line
    err = capsys.readouterr().err
    assert "comes with its own code (auto_map in its config); set trust_remote_code: true" in err, err
    out = tmp_path / "run"
    assert main([*args, "trust_remote_code=true"]) == 0
    assert load_trained(out)[0].__class__.__name__ == "TinyCustomForCausalLM"  # the run's config trusts it
    assert main(["merge", str(out / "adapter"), str(tmp_path / "merged"), "--trust-remote-code"]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    # A checkpoint folder itself is not what eval reads: its adapter is named.
    assert main([*args, "trust_remote_code=true", "checkpoint_every=2", f"output_dir={tmp_path / 'ck'}"]) == 0
    capsys.readouterr()
    checkpoint = tmp_path / "ck" / "checkpoints" / "checkpoint-4"
    assert main(["eval", str(checkpoint)]) == 2
    assert f"a checkpoint's adapter is {checkpoint / 'adapter'}" in capsys.readouterr().err


def test_weights_are_saved_before_the_final_evaluation(toys, tmp_path, monkeypatch):
    import lorafa.train

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(lorafa.train, "evaluate", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation failed"):
        main(run_args(toys, "classification", out, "eval_before=false"))
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "metrics.json").exists()


def test_seq2seq_with_a_tokenizer_that_makes_token_type_ids(toys, tmp_path):
    import shutil

    model = tmp_path / "t5-tti"
    shutil.copytree(toys / "t5", model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]  # as BERT's (bert2bert)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    args = run_args(toys, "seq2seq", tmp_path / "run", "exact_match_samples=4")
    args[1] = f"model={model}"
    assert main(args) == 0
    assert "eval_exact_match" in json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_eval_data_errors_name_the_file_given(toys, tmp_path, capsys):
    out = _trained_run(toys, tmp_path)
    other = tmp_path / "other.csv"
    other.write_text("sentence,label\nfoo,pos\n")
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"eval data {other}: column 'text' (text_column) not found" in err, err


def test_a_run_folder_works_from_any_working_folder(toys, tmp_path, monkeypatch, capsys):
    import shutil

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copy(toys / "data" / "classification.csv", work / "data" / "train.csv")
    monkeypatch.chdir(work)
    args = run_args(toys, "classification", Path("runs/a"))
    args[3] = "data.train_file=data/train.csv"  # relative, as users type it
    assert main(args) == 0
    saved = yaml.safe_load((work / "runs" / "a" / "config.yaml").read_text())
    assert saved["data"]["train_file"] == str(work / "data" / "train.csv")
    assert saved["output_dir"] == str(work / "runs" / "a")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", str(work / "runs" / "a"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_accuracy"] >= 0


def test_classification_warns_about_numeric_labels_and_unseen_held_out_classes(toys, tmp_path, caplog):
    rows = "text,score\n" + "".join(f"cat dog {i},{i / 7:.3f}\n" for i in range(30))
    (tmp_path / "num.csv").write_text(rows)
    args = run_args(toys, "classification", tmp_path / "run", "data.label_column=score", "max_steps=1")
    args[3] = f"data.train_file={tmp_path / 'num.csv'}"
    with caplog.at_level("WARNING", logger="lorafa"):
        assert main(args) == 0
    text = caplog.text
    assert "has 30 distinct values in 30 rows" in text and "task=regression" in text
    assert "of the held-out rows never occur in the rows left to train on" in text


def test_generate_continues_raw_text_for_a_clm_run(toys, tmp_path):
    from lorafa.evaluate import generate

    model, tokenizer, _ = load_trained(_trained_run(toys, tmp_path, "clm"))
    model.eval()
    ids = tokenizer("cat dog", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert generate(model, tokenizer, "cat dog", max_new_tokens=4, raw_text=True) == expected


def test_a_clm_adapter_folder_is_evaluated_and_continued_as_clm(toys, tmp_path, capsys):
    out = _trained_run(toys, tmp_path, "clm")
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["eval", str(out / "adapter"), "--json"]) == 0  # inside its run: read as the run
    assert json.loads(capsys.readouterr().out) == from_run
    copy = shutil.copytree(out / "adapter", tmp_path / "copy")
    assert main(["generate", str(out), "cat dog", "--max-new-tokens", "4"]) == 0
    from_run_text = capsys.readouterr().out
    assert main(["generate", str(copy), "cat dog", "--max-new-tokens", "4", "--task", "clm"]) == 0
    assert capsys.readouterr().out == from_run_text
    # A system message belongs to a chat prompt: refused for raw-text continuation instead of dropped.
    assert main(["generate", str(out), "cat dog", "--system", "sun"]) == 2
    assert "a system message is part of a chat prompt" in capsys.readouterr().err


def test_a_checkpoints_adapter_is_evaluated_with_its_runs_data(toys, tmp_path, capsys):
    out = _trained_run(toys, tmp_path, "classification", "checkpoint_every=2")
    checkpoint = out / "checkpoints" / "checkpoint-2" / "adapter"
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--json"]) == 0  # no --data: the run's eval data and columns
    at_2 = json.loads(capsys.readouterr().out)
    assert main(["eval", str(out), "--json"]) == 0
    final = json.loads(capsys.readouterr().out)
    assert at_2["eval_samples"] == final["eval_samples"] and at_2["eval_loss"] != final["eval_loss"]


def test_generate_prompts_as_training_formatted_a_conversation_with_a_system_message(
    toys, tmp_path, monkeypatch
):
    from transformers import AutoTokenizer

    from lorafa import evaluate as evaluate_module
    from lorafa.models import load_model

    tok = AutoTokenizer.from_pretrained(toys / "llama")
    model = load_model(str(toys / "llama"), "sft")
    seen = []
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw["input_ids"]) or kw["input_ids"])
    evaluate_module.generate(model, tok, "cat dog", system="sun moon", max_new_tokens=2)
    chat = [{"role": "system", "content": "sun moon"}, {"role": "user", "content": "cat dog"}]
    want = tok(
        tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    assert seen[0][0].tolist() == want["input_ids"]
    # Without the template: the prompt is exactly what plain-format sft training put before the answer.
    from lorafa.sft import tokenize_conversations

    trained = tokenize_conversations(tok, [[*chat, {"role": "assistant", "content": "one"}]], False, 64)
    first_learned = next(i for i, x in enumerate(trained["labels"][0]) if x != -100)
    evaluate_module.generate(model, tok, "cat dog", system="sun moon", use_chat_template=False, max_new_tokens=2)
    assert seen[1][0].tolist() == trained["input_ids"][0][:first_learned]


def test_model_and_task_flags_may_not_contradict_a_run(toys, tmp_path, capsys):
    run, sft = _trained_run(toys, tmp_path), _trained_run(toys, tmp_path, "sft")
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert main(["merge", str(run), str(merged), "--task", "sft"]) == 2
    assert f"--task sft: {run} was trained with task classification" in capsys.readouterr().err
    assert not merged.exists()
    assert main(["eval", str(run), "--model", str(toys / "llama")]) == 2
    assert f"--model {toys / 'llama'}: {run} was trained on {toys / 'bert'}" in capsys.readouterr().err
    assert main(["eval", str(run / "adapter"), "--task", "regression"]) == 2
    assert "--task regression" in capsys.readouterr().err
    # Repeating what the run says is fine.
    assert main(["eval", str(run), "--model", str(toys / "bert"), "--task", "classification"]) == 0
    # An sft run is not continued as raw text, so its --system is not silently dropped either.
    assert main(["generate", str(sft), "cat", "--task", "clm", "--system", "s", "--max-new-tokens", "2"]) == 2
    assert "--task clm" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["0", "-3"])
def test_eval_batch_size_must_be_positive(toys, tmp_path, capsys, size):
    run = _trained_run(toys, tmp_path)
    capsys.readouterr()
    assert main(["eval", str(run), "--batch-size", size]) == 2
    assert f"--batch-size must be >= 1, got {size}" in capsys.readouterr().err


def test_a_config_path_with_an_equals_sign_is_the_config(toys, tmp_path, capsys):
    folder = tmp_path / "runs" / "lr=1e-3"
    folder.mkdir(parents=True)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump({"lr": 1e-3}))
    args = run_args(toys, "classification", folder / "out")[1:]
    assert main(["train", str(config), *args, "lr=1e-3", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out.split("---")[0])["lr"] == 1e-3


def test_a_model_folder_without_a_tokenizer_is_named(toys, tmp_path, capsys):
    run = _trained_run(toys, tmp_path)
    (tmp_path / "empty").mkdir()
    for folder, hint in (
        (run, "it is a lorafa run folder; use it with `lorafa eval/merge/generate"),
        (run / "adapter", "it is an adapter folder"),
        (tmp_path / "empty", "(the folder is empty)"),
    ):
        capsys.readouterr()
        args = run_args(toys, "classification", tmp_path / "out", f"model={folder}", "--dry-run")
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"model '{folder}': {folder} holds no tokenizer" in err and hint in err, err
    # A folder that has tokenizer files which fail to load gets transformers' reason, not "no tokenizer".
    broken = tmp_path / "broken"
    shutil.copytree(toys / "bert", broken)
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text('{"tokenizer_class": "NoSuchTokenizerClass"}')
    assert main(run_args(toys, "classification", tmp_path / "out", f"model={broken}", "--dry-run")) == 2
    err = capsys.readouterr().err
    assert f"model '{broken}': its tokenizer cannot be loaded" in err and "holds no tokenizer" not in err, err


def test_a_full_runs_adapter_folder_is_evaluated_as_the_run(toys, tmp_path, capsys):
    run = _trained_run(toys, tmp_path, "classification", "method=full")
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run / "adapter"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == whole
    assert main(["merge", str(run / "adapter"), str(tmp_path / "merged")]) == 2
    assert "was trained with method full" in capsys.readouterr().err


def test_merge_keeps_out_of_the_run_and_the_base_model(toys, tmp_path, capsys):
    run = _trained_run(toys, tmp_path)
    capsys.readouterr()
    assert main(["merge", str(run / "adapter"), str(run / "merged")]) == 2
    assert f"is the run folder {run} or lies inside or around it" in capsys.readouterr().err
    assert not (run / "merged").exists()
    assert main(["merge", str(run), str(toys / "bert"), "--overwrite"]) == 2
    assert "is the base model folder" in capsys.readouterr().err
    assert (toys / "bert" / "config.json").is_file()
    # --overwrite replaces an earlier merge, and only that.
    merged = tmp_path / "merged"
    assert main(["merge", str(run), str(merged)]) == 0
    assert main(["merge", str(run), str(merged), "--overwrite"]) == 0
    assert (merged / "config.json").is_file()


def test_eval_data_warnings_name_the_file_given(toys, tmp_path, caplog, capsys):
    run = _trained_run(toys, tmp_path)
    data = tmp_path / "other.csv"
    rows = (toys / "data" / "classification.csv").read_text().splitlines()
    data.write_text("\n".join([*rows[:9], "cat dog,maybe"]) + "\n")
    caplog.clear()
    assert main(["eval", str(run), "--data", str(data)]) == 0
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert dropped == [f"eval data {data}: dropped 1 row whose label is not one of the classes ['neg', 'pos']"]
    assert "training rows" not in caplog.text  # --data names one file for both fields on purpose
    # data_files' warnings are renamed too, once: a header naming a column twice
    doubled = tmp_path / "doubled.csv"
    doubled.write_text("\n".join(["text,label,label", *[f"{r},x" for r in rows[1:9]]]) + "\n")
    caplog.clear()
    main(["eval", str(run), "--data", str(doubled)])
    named = [r.getMessage() for r in caplog.records if "more than once" in r.getMessage()]
    assert len(named) == 1 and named[0].startswith(f"eval data {doubled}: "), named


def test_the_summary_counts_one_step_in_the_singular():
    from types import SimpleNamespace

    from lorafa.cli import summary

    metrics = {
        "train_runtime_s": 1.0,
        "steps": 1,
        "trainable_params": 10,
        "total_params": 100,
        "tokens_per_s": 5.0,
        "peak_memory_bytes": 2**20,
    }
    cfg = SimpleNamespace(method="lora-fa", task="sft", output_dir="out")
    assert "(1 optimizer step)." in summary(cfg, metrics)
    # A resumed checkpoint already at the last step trains nothing: no "Done in 0 s", no speed of 0.
    idle = summary(cfg, {**metrics, "tokens_per_s": 0.0, "train_runtime_s": 0.0})
    assert "Nothing left to train" in idle and "Speed" not in idle and "Peak process memory" in idle
    assert "(2 optimizer steps)." in summary(cfg, {**metrics, "steps": 2})


def test_generate_names_a_missing_local_folder_without_asking_the_hub(tmp_path, monkeypatch, capsys):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "runs/typo", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no such" in err and "folder: runs/typo" in err, err


def test_only_a_runs_own_config_follows_a_moved_run(toys, tmp_path, monkeypatch, capsys):
    """A config file in a folder that is not a run (or is not the run's config.yaml) writes where it says."""
    project = tmp_path / "proj"
    project.mkdir()
    args = run_args(toys, "classification", tmp_path / "runs" / "x", "max_steps=1", "eval_before=false")[1:]
    mine = dict(a.split("=", 1) for a in args)
    (project / "config.yaml").write_text(yaml.safe_dump({"model": mine["model"], "task": "classification",
                                                         "method": "lora-fa"}))  # fmt: skip
    (project / "exp.yaml").write_text(yaml.safe_dump({"model": mine["model"], "task": "classification"}))
    overrides = [a for a in args if not a.startswith(("model=", "task="))]
    assert main(["train", str(project / "exp.yaml"), *overrides]) == 0
    assert "belongs to the run" not in capsys.readouterr().err
    assert (tmp_path / "runs" / "x" / "metrics.json").is_file() and not (project / "metrics.json").exists()


def test_generate_leaves_a_hub_id_to_the_hub_beside_a_plain_owner_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "openai-community" / "other").mkdir(parents=True)  # e.g. another model downloaded with --local-dir
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "openai-community/gpt2", "hi"]) == 2
    assert "no such run, adapter or model folder" not in capsys.readouterr().err
