"""`lorafa.evaluate.evaluate` against a reference computed here: every eval example forwarded on its own (no
padding), losses averaged over targets, metrics from those predictions."""

from __future__ import annotations

import pytest
import torch
from _toys import run_args, toy_root

from lorafa.data import build_datasets, make_collator
from lorafa.evaluate import evaluate
from lorafa.metrics import classification_metrics, regression_metrics
from lorafa.models import load_model, load_tokenizer
from lorafa.train_config import load_config


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return toy_root(tmp_path_factory)


@pytest.mark.parametrize("task", ["classification", "regression", "sft", "seq2seq"])
def test_evaluate_equals_one_example_at_a_time(toys, tmp_path, task):
    cfg = load_config(None, run_args(toys, task, tmp_path / "run", "data.eval_split=0.4")[1:])
    tokenizer = load_tokenizer(cfg.model)
    data = build_datasets(cfg.data, tokenizer, cfg.task)
    model = load_model(cfg.model, task, data.num_labels, data.id2label, "float32", tokenizer.pad_token_id)
    model.eval()
    collator = make_collator(task, tokenizer)
    lengths = {len(ids) for ids in data.eval["input_ids"]}
    assert len(lengths) > 1  # batches pad, so padding must not change the result

    loss_sum, targets, predictions, labels = 0.0, 0, [], []
    with torch.no_grad():
        for i in range(len(data.eval)):
            batch = collator([data.eval[i]])
            out = model(**batch)
            if task in ("classification", "regression"):
                n = 1
                logits = out.logits.float()[0]
                predictions.append(float(logits[0]) if task == "regression" else int(logits.argmax()))
                labels.append(float(batch["labels"][0]))
            else:
                shifted = batch["labels"][:, 1:] if task == "sft" else batch["labels"]
                n = int((shifted != -100).sum())
            loss_sum += float(out.loss) * n
            targets += n

    metrics = evaluate(model, data.eval, task, collator, batch_size=5)
    assert metrics["eval_samples"] == len(data.eval)
    assert metrics["eval_loss"] == pytest.approx(loss_sum / targets, rel=1e-5)
    if task == "classification":
        expected = classification_metrics(predictions, labels, model.config.num_labels)
    elif task == "regression":
        expected = regression_metrics(predictions, labels)
    else:
        expected = {}
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
