"""Evaluation, generation and merging of trained models: the library behind `lorafa eval / generate / merge`.

`evaluate` computes a task's metrics on a tokenized dataset (classification: eval_loss, eval_accuracy, eval_f1
(macro), eval_mcc, and with two classes eval_f1_class1; regression: eval_loss (MSE), eval_pearson, eval_spearman;
sft/clm/seq2seq: eval_loss (mean over target tokens), eval_perplexity, and for seq2seq eval_exact_match of greedy
generations on a sample).
`load_trained` rebuilds a trained model from a run folder (config.yaml + adapter/) or a bare adapter folder.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lorafa.adapter import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    load_adapter,
    read_adapter_config,
)
from lorafa.assets import resolve
from lorafa.data import IGNORE_INDEX, build_datasets, example_lengths, make_collator
from lorafa.files import atomic_write_dir
from lorafa.inject import remove_lorafa
from lorafa.metrics import classification_metrics, regression_metrics
from lorafa.models import load_model, load_tokenizer, quiet_loading, remote_code, remote_code_trusted
from lorafa.sft import plain_prompt_ids
from lorafa.train_config import TOKEN_TASKS, TrainConfig, load_config

LABELS_NAME = "labels.json"
_TASK_OF_PEFT = {"SEQ_CLS": "classification", "CAUSAL_LM": "sft", "SEQ_2_SEQ_LM": "seq2seq"}


def rows(dataset: Any, indices: list[int]) -> list[dict[str, Any]]:
    """Examples `indices` of a `datasets.Dataset` as a list of dicts (one fast column read)."""
    columns = dataset[indices]
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def count_targets(labels: torch.Tensor, task: str) -> int:
    """Label tokens a causal/seq2seq loss averages over (causal LMs predict token t+1, so the first is skipped)."""
    if task in ("sft", "clm"):
        labels = labels[:, 1:]
    return int((labels != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    task: str,
    collator: Any,
    batch_size: int = 16,
    accelerator: Any = None,
    tokenizer: Any = None,
    exact_match_samples: int = 0,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
) -> dict[str, float]:
    """Metrics of `model` on a tokenized dataset from `lorafa.data.build_datasets`.

    With an Accelerate `accelerator` each process evaluates every num_processes-th example and the results are
    gathered, so all processes return the same metrics. Pass the unwrapped model (not the DDP wrapper): ranks may
    run different numbers of batches, and a DDP forward would wait for the others.

    Args:
        model: A transformers model (adapters attached or merged).
        dataset: Tokenized examples.
        task: classification | regression | sft | clm | seq2seq.
        collator: `lorafa.data.make_collator(task, tokenizer)`.
        batch_size: Examples per forward pass.
        accelerator: Optional `accelerate.Accelerator` (device, autocast, gathering).
        tokenizer: Needed for seq2seq exact match (decoding).
        exact_match_samples: seq2seq: greedy-generate this many examples and report eval_exact_match.
        autocast: Without an accelerator, a context (factory) the forward passes run in, e.g. the run's
            `torch.autocast` (generation for exact match runs outside it, as under an accelerator).

    Returns:
        Metric name → value, plus eval_samples.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(dataset), world))
    # Batches of similar lengths pad little; the metrics do not depend on the order (longest first: an
    # out-of-memory shows in the first batch).
    lengths = example_lengths(dataset, task)
    by_length = sorted(mine, key=lambda i: -lengths[i])
    loss_sum, weight = 0.0, 0.0
    predictions: list[float] = []
    labels: list[float] = []
    for start in range(0, len(by_length), batch_size):
        batch = collator(rows(dataset, by_length[start : start + batch_size]))
        batch = {k: v.to(device) for k, v in batch.items()}
        with accelerator.autocast() if accelerator else (autocast or nullcontext)():
            out = model(**batch)
        if task in TOKEN_TASKS:
            n = count_targets(batch["labels"], task)
        else:
            n = batch["labels"].shape[0]
            logits = out.logits.float()
            pred = logits.squeeze(-1) if task == "regression" else logits.argmax(dim=-1)
            predictions += pred.tolist()
            labels += batch["labels"].tolist()
        loss_sum += float(out.loss.float()) * n
        weight += n
    if task == "seq2seq" and exact_match_samples > 0:
        if tokenizer is None:
            raise ValueError("evaluate: seq2seq exact match needs the tokenizer")
        hits, tried = _exact_matches(
            model, dataset, collator, tokenizer, mine, exact_match_samples, world, device
        )
    else:
        hits, tried = 0, 0

    if accelerator is not None and world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([(loss_sum, weight, predictions, labels, hits, tried)])
        loss_sum, weight = sum(p[0] for p in parts), sum(p[1] for p in parts)
        predictions = [x for p in parts for x in p[2]]
        labels = [x for p in parts for x in p[3]]
        hits, tried = sum(p[4] for p in parts), sum(p[5] for p in parts)
    model.train(was_training)

    loss = loss_sum / max(weight, 1)
    metrics = {"eval_loss": loss, "eval_samples": float(len(dataset))}
    if task == "classification":
        metrics.update(classification_metrics(predictions, labels, getattr(model.config, "num_labels", None)))
    elif task == "regression":
        metrics.update(regression_metrics(predictions, labels))
    else:
        metrics["eval_perplexity"] = math.exp(min(loss, 700.0))  # exp overflows float64 above ~709
    if tried:
        metrics["eval_exact_match"] = hits / tried
    return metrics


def _exact_matches(
    model: nn.Module,
    dataset: Any,
    collator: Any,
    tokenizer: Any,
    mine: list[int],
    samples: int,
    world: int,
    device: torch.device,
) -> tuple[int, int]:
    """(exact matches, examples tried) of greedy generations on this process's share of the first `samples`."""
    chosen = [i for i in mine if i < samples]
    hits = 0
    for start in range(0, len(chosen), 8):
        batch = collator(rows(dataset, chosen[start : start + 8]))
        target = batch.pop("labels")
        target = target.masked_fill(target == IGNORE_INDEX, tokenizer.pad_token_id)
        max_new = int(target.shape[1]) + 1
        # The encoder's inputs only: generate refuses keys the model's forward does not take (a BERT tokenizer's
        # token_type_ids in an encoder-decoder, for one).
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask") if k in batch}
        out = cast(Any, model).generate(
            **inputs,
            max_new_tokens=max_new,
            do_sample=False,
            num_beams=1,
        )
        got = tokenizer.batch_decode(out, skip_special_tokens=True)
        want = tokenizer.batch_decode(target, skip_special_tokens=True)
        hits += sum(g.strip() == w.strip() for g, w in zip(got, want, strict=True))
    return hits, len(chosen)


# ------------------------------------------------------------------------------------------ trained models


def read_labels(run_dir: Path) -> list[str] | None:
    """Class names saved with a classification run (labels.json), or None."""
    path = run_dir / LABELS_NAME
    if not path.is_file():
        return None
    return list(json.loads(path.read_text())["label_names"])


def write_labels(run_dir: Path, label_names: list[str]) -> None:
    """Save the class names in id order (labels.json: label_names, id2label, label2id)."""
    data = {
        "label_names": label_names,
        "id2label": {str(i): n for i, n in enumerate(label_names)},
        "label2id": {n: i for i, n in enumerate(label_names)},
    }
    (run_dir / LABELS_NAME).write_text(json.dumps(data, indent=2) + "\n")


def _adapter_labels(folder: Path) -> list[str] | None:
    """Class names of a classification adapter: its own labels.json (lorafa train writes one into adapter/),
    else its run folder's (an adapter inside a run, or a checkpoint's run/checkpoints/checkpoint-N/adapter)."""
    run = _run_of_adapter(folder)
    places = [folder, folder.parent, *([run] if run is not None else [])]
    return next((names for names in map(read_labels, places) if names is not None), None)


def _run_of_adapter(folder: Path) -> Path | None:
    """The run folder of RUN/adapter (an adapter, or a method-full run's model folder) or
    RUN/checkpoints/checkpoint-N/adapter, else None."""
    if folder.name != "adapter" or not (
        (folder / CONFIG_NAME).is_file() or (folder / "config.json").is_file()
    ):
        return None
    if is_run_dir(folder.parent):
        return folder.parent
    run = folder.parent.parent.parent
    return run if folder.parent.parent.name == "checkpoints" and is_run_dir(run) else None


def is_run_dir(path: Path) -> bool:
    """A `lorafa train` output folder (config.yaml next to adapter/)."""
    return (path / "config.yaml").is_file() and (path / "adapter").is_dir()


def _num_labels_from_adapter(folder: Path, heads: list[str]) -> int | None:
    """Rows of the classification head's output layer stored in an adapter file (BERT `classifier.weight`,
    RoBERTa `classifier.out_proj.weight`, LLaMA `score.weight`, BART `classification_head.out_proj.weight`)."""
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        # Heads are saved in model order, so the output layer is the last one: DistilBERT's ["pre_classifier",
        # "classifier"] has a hidden × hidden pre_classifier.weight first.
        for head in reversed(heads):
            for key in (f"{PREFIX}{head}.weight", f"{PREFIX}{head}.out_proj.weight"):
                if key in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                    return int(f.get_slice(key).get_shape()[0])
    return None


def load_trained(
    source: str | Path,
    model: str | None = None,
    task: str | None = None,
    num_labels: int | None = None,
    overrides: list[str] | None = None,
) -> tuple[nn.Module, Any, TrainConfig | None]:
    """Rebuild a trained model for inference from a run folder or an adapter folder.

    Args:
        source: A `lorafa train` output_dir (config.yaml + adapter/), its adapter/ or a checkpoint's
            (checkpoints/checkpoint-N/adapter; read with the run's config), or any adapter folder (ours or PEFT's).
        model: Base model for an adapter folder; default its `base_model_name_or_path`.
        task: Task for an adapter folder; default from its PEFT task_type (CAUSAL_LM → sft).
        num_labels: Classes of a classification adapter; default read from the head's weights.
        overrides: `key=value` config overrides for a run folder (e.g. `data.eval_file=other.csv`).

    Returns:
        (model in eval mode, tokenizer, the run's TrainConfig or None for a bare adapter folder).

    Raises:
        FileNotFoundError: no run or adapter at `source`. ValueError: what is needed cannot be determined.
    """
    folder = Path(source).expanduser()
    adapter = folder / "adapter"
    # A run's adapter, or a checkpoint's: the run knows its task, classes and data columns. With another base model
    # (--model) RUN/adapter is read as a bare adapter folder.
    run = _run_of_adapter(folder) if model is None else None
    if run is not None:
        folder, adapter = run, folder
    if is_run_dir(folder):
        cfg = load_config(folder / "config.yaml", overrides)
        _check_run_flags(folder, cfg, model, task)
        with remote_code(cfg.trust_remote_code or remote_code_trusted()):
            return _load_run(folder, adapter, cfg)
    return _load_adapter_folder(folder, model, task, num_labels)


def _load_run(folder: Path, adapter: Path, cfg: TrainConfig) -> tuple[nn.Module, Any, TrainConfig]:
    """A run's model with its adapter (or, for method full, its saved model), in eval mode, and its tokenizer."""
    tokenizer = load_tokenizer(cfg.model)
    names = read_labels(folder)
    id2label = dict(enumerate(names)) if names else None
    if cfg.method == "full":
        net = load_model(str(folder / "adapter"), cfg.task, len(names) if names else None, id2label)
    else:
        with quiet_loading():  # the base's new head is reported missing, but the adapter holds it
            net = load_model(
                cfg.model,
                cfg.task,
                len(names) if names else None,
                id2label,
                cfg.model_dtype,
                tokenizer.pad_token_id,
            )
        load_adapter(net, adapter, is_trainable=False)
    return net.eval(), tokenizer, cfg


def _load_adapter_folder(
    folder: Path, model: str | None, task: str | None, num_labels: int | None
) -> tuple[nn.Module, Any, None]:
    """A bare adapter folder's base model (`model`, or the one it records) with the adapter, and its tokenizer."""
    if not (folder / CONFIG_NAME).is_file():
        inner = folder / "adapter"
        raise FileNotFoundError(
            f"{folder} is neither a lorafa run folder (config.yaml + adapter/) nor an adapter folder ({CONFIG_NAME})"
            + (f"; a checkpoint's adapter is {inner}" if (inner / CONFIG_NAME).is_file() else "")
        )
    lora_cfg, peft, _ = read_adapter_config(folder)
    base = model or peft.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder}: the adapter does not record its base model; pass the model (--model)")
    task = task or _TASK_OF_PEFT.get(str(peft.get("task_type")))  # CAUSAL_LM: sft (a clm adapter: --task clm)
    if task is None:
        raise ValueError(
            f"{folder}: cannot tell the task from task_type={peft.get('task_type')!r}; pass --task"
        )
    if task == "classification" and num_labels is None:
        num_labels = _num_labels_from_adapter(folder, lora_cfg.modules_to_save or ["classifier", "score"])
        if num_labels is None:
            raise ValueError(
                f"{folder}: cannot find the classification head's size in the adapter (in Python pass num_labels=)"
            )
    names = _adapter_labels(folder) if task == "classification" else None
    id2label = dict(enumerate(names)) if names and len(names) == num_labels else None
    tokenizer = load_tokenizer(base)
    with quiet_loading():
        net = load_model(base, task, num_labels, id2label, pad_token_id=tokenizer.pad_token_id)
    load_adapter(net, folder, is_trainable=False)
    return net.eval(), tokenizer, None


def _check_run_flags(run: Path, cfg: TrainConfig, model: str | None, task: str | None) -> None:
    """--model and --task are for bare adapter folders: for a run they may only repeat what its config says."""
    if task is not None and task != cfg.task:
        raise ValueError(
            f"--task {task}: {run} was trained with task {cfg.task} (its config.yaml); --task is for adapter "
            "folders, leave it out"
        )
    if model is not None and base_model_path(model) != base_model_path(cfg.model):
        hint = (
            ""
            if cfg.method == "full"
            else f" (to put its adapter on another base model: {run / 'adapter'} --model M)"
        )
        raise ValueError(
            f"--model {model}: {run} was trained on {cfg.model} (its config.yaml); leave --model out{hint}"
        )


def evaluate_run(
    source: str | Path,
    overrides: list[str] | None = None,
    model: str | None = None,
    task: str | None = None,
    eval_file: str | None = None,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Metrics of a trained run (or adapter) on its eval data, or on `eval_file`.

    For a run folder, the data comes from its config.yaml (with `overrides`), so with no overrides this
    reproduces the final eval_* values of its metrics.json. Class ids follow the run's labels.json.

    Raises:
        ValueError: no evaluation data (set data.eval_file or pass eval_file).
    """
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    net, tokenizer, cfg = load_trained(source, model=model, task=task, overrides=overrides)
    if cfg is None:
        if eval_file is None:
            raise ValueError("eval of an adapter folder needs a data file (--data FILE)")
        raw = {"model": model or "unused", "task": task or _task_of(net), "data": {"train_file": eval_file}}
        cfg = load_config(None, overrides, base=raw)
    data_cfg = cfg.data
    if eval_file is not None:
        # build_datasets reads train_file too (labels, split); point it at the eval file and keep one row of it.
        data_cfg.eval_file = eval_file
        data_cfg.train_file = eval_file
        data_cfg.max_train_samples = 1
        # The run's cap was for its own held-out split; an explicit file is evaluated whole unless asked.
        if not any(o.split("=", 1)[0].strip() == "data.max_eval_samples" for o in overrides or []):
            data_cfg.max_eval_samples = None
    known_names = False
    if cfg.task == "classification":
        # Class ids must mean what they meant in training: the run's labels.json, else the model config's names
        # unless they are transformers' placeholders (LABEL_0, ...), else the sorted labels of the data.
        id2label = getattr(net.config, "id2label", None) or {}
        names = [str(id2label[i]) for i in sorted(id2label)]
        known_names = data_cfg.label_names is not None
        if names and names != [f"LABEL_{i}" for i in range(len(names))]:
            data_cfg.label_names, known_names = names, True
    try:
        with _warnings_name(f"eval data {eval_file}") if eval_file is not None else nullcontext():
            data = build_datasets(data_cfg, tokenizer, cfg.task)
    except (ValueError, FileNotFoundError) as e:
        if eval_file is None:
            raise
        # Both data fields point at the file given here; name it, not the config field it went through.
        message = re.sub(r"^(train_file|eval_file): ", "", str(e))
        if task is None and cfg.task == "sft" and "not found" in message:
            message += " (a causal LM adapter is read as sft; for raw text pass --task clm)"
        raise type(e)(f"eval data {eval_file}: {message}") from e
    if data.eval is None:
        raise ValueError("no evaluation data: set data.eval_file=FILE (or data.eval_split > 0)")
    if cfg.task == "classification" and not known_names and data.label_names != [
        str(i) for i in range(len(data.label_names or []))
    ]:
        # Sorted labels of the eval file need not be the training ids (another order, or a class it lacks).
        raise ValueError(
            f"{source}: the class names of training are unknown (no labels.json beside the adapter) and the "
            f"eval labels {data.label_names} are not the ids 0..K-1; pass data.label_names=[...] in training order"
        )
    # As training evaluated: on the GPU when there is one, under the run's autocast.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    if amp == torch.float16 and device.type == "cpu":
        amp = None  # Accelerate trains fp16 on CPU in fp32 (lorafa train now refuses it)
    return evaluate(
        net,
        data.eval,
        cfg.task,
        make_collator(cfg.task, tokenizer),
        batch_size if batch_size is not None else cfg.eval_batch_size or 2 * cfg.batch_size,
        tokenizer=tokenizer,
        exact_match_samples=cfg.exact_match_samples,
        autocast=(lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else None,
    )


@contextmanager
def _warnings_name(what: str) -> Iterator[None]:
    """Inside, the warnings of lorafa.data and lorafa.data_files about `train_file`/`eval_file` name `what`
    instead, once: with --data both fields point at that one file, so each warning would come twice under a field
    the user never set."""
    seen: set[str] = set()

    def rename(record: logging.LogRecord) -> bool:
        named = isinstance(record.args, tuple) and record.args[:1] in (("train_file",), ("eval_file",))
        if named and str(record.msg).startswith("%s:"):
            assert isinstance(record.args, tuple)
            record.args = (what, *record.args[1:])
        text = record.getMessage()
        new = text not in seen
        seen.add(text)
        return new

    loggers = [logging.getLogger(name) for name in ("lorafa.data", "lorafa.data_files")]
    for data_logger in loggers:
        data_logger.addFilter(rename)
    try:
        yield
    finally:
        for data_logger in loggers:
            data_logger.removeFilter(rename)


def _task_of(model: nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "regression" if getattr(model.config, "num_labels", 2) == 1 else "classification"
    return "seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "sft"


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    use_chat_template: bool = True,
    temperature: float = 0.0,
    raw_text: bool = False,
    system: str | None = None,
) -> str:
    """Continue `prompt` with a causal or seq2seq LM and return the new text only.

    The prompt is formatted as in sft training: with the tokenizer's chat template (a user turn followed by the
    assistant's generation prompt) when it has one and `use_chat_template`, else in sft's plain format (BOS where
    the tokenizer uses one, `prompt + "\\n"`, no other special token); with `raw_text` (a clm run) it is
    continued as it is.

    Args:
        model: A causal LM or encoder–decoder LM (adapters attached or merged).
        tokenizer: Its tokenizer.
        prompt: The user's text.
        max_new_tokens: Generation length limit.
        use_chat_template: Format with the chat template when the tokenizer has one.
        temperature: 0 decodes greedily; > 0 samples.
        raw_text: Continue the prompt as plain text (as clm trains), without template or newline.
        system: A system message before the user turn (as in a conversation's rows).

    Raises:
        ValueError: a negative or non-finite temperature, max_new_tokens < 1, or a system message for a seq2seq or
            raw-text model.
    """
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    plain = getattr(model.config, "is_encoder_decoder", False) or raw_text
    if system is not None and plain:
        raise ValueError(
            "--system: a system message is part of a chat prompt (sft); a seq2seq or clm model continues the "
            "prompt as plain text"
        )
    model.eval()
    device = next(model.parameters()).device
    if plain:
        enc = tokenizer(prompt, return_tensors="pt")
    else:
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": prompt})
        if use_chat_template and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        else:  # the plain format sft trained on: no special token but BOS (an EOS here was never seen)
            ids = torch.tensor([plain_prompt_ids(tokenizer, messages)])
            enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask") if k in enc}
    sampling: dict[str, Any] = {"do_sample": False, "num_beams": 1}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature}
    out = cast(Any, model).generate(
        **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling
    )
    new = (
        out[0] if getattr(model.config, "is_encoder_decoder", False) else out[0, enc["input_ids"].shape[1] :]
    )
    return str(tokenizer.decode(new, skip_special_tokens=True))


def merge(
    source: str | Path,
    output_dir: str | Path,
    model: str | None = None,
    task: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Fold a trained adapter into its base model and save a plain Hugging Face model folder.

    Args:
        source: A run folder or an adapter folder (see `load_trained`).
        output_dir: Where `save_pretrained` writes the merged model and tokenizer (written atomically).
        model: Base model of an adapter folder (default: the one it records).
        task: Task of an adapter folder (default: from its PEFT task_type).
        overwrite: replace `output_dir` if it holds a saved model (config.json and weights), as an earlier merge
            leaves; never the source, its run folder, the base model folder or a folder inside or around them.

    Returns:
        The output folder.

    Raises:
        ValueError: the run was trained with method full (its adapter/ already is a plain model); `output_dir` is
            the source, its run folder or the base model folder, inside or around one of them; `output_dir` holds
            files and `overwrite` is False or they are not a saved model.
    """
    src, out = Path(source).expanduser(), Path(output_dir).expanduser()
    run = src if is_run_dir(src) else _run_of_adapter(src) if model is None else None
    cfg = load_config(run / "config.yaml") if run is not None else None
    base = model or (cfg.model if cfg is not None else None)
    if base is None and (src / CONFIG_NAME).is_file():
        base = read_adapter_config(src)[1].get("base_model_name_or_path")
    kept = [(src, str(source)), *([(run, f"the run folder {run}")] if run is not None else [])]
    if base:
        kept.append((Path(base_model_path(base)), f"the base model folder {base}"))
    b = out.resolve()
    for folder, what in kept:
        a = folder.resolve()
        if folder.exists() and (a == b or a in b.parents or b in a.parents):
            raise ValueError(
                f"output_dir {out} is {what} or lies inside or around it; merge into another folder"
            )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ValueError(
                f"output_dir {out} exists and is not empty; choose a new folder or pass --overwrite"
            )
        if not _holds_a_saved_model(out):
            raise ValueError(
                f"output_dir {out} holds files but no saved model (config.json and weights): --overwrite only "
                "replaces an earlier merge or another save_pretrained folder; choose a new folder"
            )
    if cfg is not None and cfg.method == "full":
        assert run is not None
        raise ValueError(
            f"{run} was trained with method full: {run / 'adapter'} already is a plain model folder"
        )
    net, tokenizer, _ = load_trained(src, model=model, task=task)
    remove_lorafa(net, merge=True)

    def write(tmp: Path) -> None:
        cast(Any, net).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_write_dir(out, write)
    return out


def _holds_a_saved_model(folder: Path) -> bool:
    """A save_pretrained model folder: config.json and weights (what merge may replace with --overwrite)."""
    weights = (
        "model.safetensors",
        "pytorch_model.bin",
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    )
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in weights)


def base_model_path(model: str) -> str:
    """What an adapter records as its base model: the local path of an `asset:` model, the absolute path of a local
    folder, else `model` (a Hub id)."""
    if model.startswith("asset:"):
        return resolve(model)
    local = Path(model).expanduser()
    return str(local.resolve()) if local.exists() else model
