"""The accuracy-study tool (issue 6): smoke mode end to end, aggregation against hand-computed statistics."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import yaml

from lorafa.study import (
    PARTS,
    Cell,
    RunResult,
    StudyConfig,
    aggregate,
    best_cells,
    half_layer_targets,
    mean_std,
    run_study,
)
from lorafa.study_plans import make_smoke_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    root = tmp_path_factory.mktemp("study")
    # One torch thread: on a CPU shared with other jobs, tiny ops with 2 OpenMP threads wait on each other.
    cfg = StudyConfig(
        smoke=True,
        work_dir=str(root / "work"),
        docs_dir=str(root / "docs"),
        threads=1,
        command="pytest smoke",
    )
    return run_study(cfg), root / "docs", root / "work"


def test_smoke_writes_report_and_charts(smoke: tuple[dict, Path, Path]) -> None:
    results, docs, work = smoke
    assert list(results) == list(PARTS)
    for part in results.values():
        assert all(r.error is None for r in part.runs), [r.error for r in part.runs if r.error]
        for r in part.runs:
            assert json.loads((Path(r.run_dir) / "metrics.json").read_text()) == pytest.approx(r.metrics)
    report = (docs / "RESULTS.md").read_text()
    assert "SMOKE MODE" in report and "## Acceptance (issue 6)" in report
    for name in PARTS:
        assert f"## {name}:" in report
        for chart in (f"study_{name}_final.png", f"study_{name}_eval_loss.png"):
            assert (docs / chart).read_bytes().startswith(PNG_MAGIC)
            assert f"]({chart})" in report
    assert "pytest smoke" in report
    # no temporary files left behind by the atomic writes
    assert not [p for p in docs.iterdir() if p.name.startswith(".")]


def test_smoke_aggregation_matches_hand_computed_statistics(smoke: tuple[dict, Path, Path]) -> None:
    results, docs, _ = smoke
    enc = results["encoder"]
    assert len(enc.plan.seeds) == 2 and enc.plan.selects
    # Dev sweep: every (method, lr) cell is the mean / sample std of its seeds' metrics.json.
    for cell in enc.sweep:
        runs = [r for r in enc.runs if (r.method, r.lr) == (cell.method, cell.lr)]
        assert cell.n == len(runs) == 2
        for key in ("eval_accuracy", "eval_f1", "eval_loss"):
            values = [json.loads((Path(r.run_dir) / "metrics.json").read_text())[key] for r in runs]
            a, b = values
            assert cell.mean[key] == pytest.approx((a + b) / 2)
            assert cell.std[key] == pytest.approx(abs(a - b) / math.sqrt(2))  # n−1 std of two values
    # The chosen lr per method has the best dev mean accuracy among that method's cells.
    for method, chosen in enc.chosen.items():
        others = [c.mean["eval_accuracy"] for c in enc.sweep if c.method == method]
        assert chosen.mean["eval_accuracy"] == max(others)
    # Variants train only at the lr chosen on dev for their parent method.
    assert enc.plan.inherit == {"lora-fa+proj": "lora-fa", "lora-half": "lora", "lora-fa+shared": "lora-fa"}
    for variant, parent in enc.plan.inherit.items():
        assert {r.lr for r in enc.runs if r.method == variant} == {enc.chosen[parent].lr}
    for r in enc.runs:  # the share_a variant differs from LoRA-FA by exactly that flag
        adapter = yaml.safe_load((Path(r.run_dir) / "config.yaml").read_text())["adapter"]
        assert adapter["share_a"] == (r.method == "lora-fa+shared")
    # Reported numbers are test metrics of exactly the chosen lr's runs, and the report prints them.
    for method, final in enc.final.items():
        runs = [r for r in enc.runs if r.method == method and r.test is not None]
        assert {r.lr for r in runs} == {enc.chosen[method].lr} and len(runs) == 2
        acc = [100 * r.test["eval_accuracy"] for r in runs]
        row = f"| {method} | {final.lr:g} | 2 | {statistics.mean(acc):.2f} ± {statistics.stdev(acc):.2f} |"
        assert row in (docs / "RESULTS.md").read_text()
    # Without a sweep (one lr per method) the eval file is the test split and the runs are reported as they are.
    dec = results["decoder"]
    assert not dec.plan.selects
    for method, final in dec.final.items():
        (run,) = [r for r in dec.runs if r.method == method]
        assert final.mean["eval_loss"] == run.metrics["eval_loss"] and final.std["eval_loss"] == 0.0
        assert Path(json.loads(json.dumps(run.run_dir))).joinpath("train_log.jsonl").is_file()


def test_same_batches_and_budget_for_every_method(smoke: tuple[dict, Path, Path]) -> None:
    results, _, _ = smoke
    for part in results.values():
        steps = {r.metrics["steps"] for r in part.runs}
        samples = {r.metrics["train_samples"] for r in part.runs}
        assert len(steps) == 1 and len(samples) == 1, (part.plan.name, steps, samples)


def test_mean_std_best_cells_and_aggregate() -> None:
    assert mean_std([2.0]) == (2.0, 0.0)
    m, s = mean_std([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3)
    assert s == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    with pytest.raises(ValueError):
        mean_std([])
    runs = [
        RunResult("p", "lora", 1e-3, 0, "", {"eval_accuracy": 0.8, "eval_loss": 0.5}),
        RunResult("p", "lora", 1e-3, 1, "", {"eval_accuracy": 0.6, "eval_loss": 0.7}),
        RunResult("p", "lora", 2e-3, 0, "", {"eval_accuracy": 0.75, "eval_loss": 0.4}),
        RunResult("p", "lora", 2e-3, 1, "", {}, error="RuntimeError: boom"),  # failed runs are left out
    ]
    cells = aggregate(runs)
    assert [(c.lr, c.n) for c in cells] == [(1e-3, 2), (2e-3, 1)]
    assert cells[0].mean["eval_accuracy"] == pytest.approx(0.7)
    assert cells[0].std["eval_accuracy"] == pytest.approx(math.sqrt(0.02))
    assert best_cells(cells, "eval_accuracy")["lora"].lr == 2e-3  # 0.75 > 0.70
    assert best_cells(cells, "eval_loss")["lora"].lr == 2e-3  # lower is better for losses
    tie = [
        Cell("p", "m", 1.0, 1, {"eval_accuracy": 0.5}, {}),
        Cell("p", "m", 2.0, 1, {"eval_accuracy": 0.5}, {}),
    ]
    assert best_cells(tie, "eval_accuracy")["m"].lr == 1.0


def test_half_layer_targets_adapt_only_the_top_half(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    import lorafa
    from lorafa.config import LoRAFAConfig

    folder = make_smoke_model(str(tmp_path / "bert"), "bert", ["a", "b"])
    regex = half_layer_targets(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    lorafa.add_lorafa(model, LoRAFAConfig(target_modules=regex, method="lora"))
    names = [name for name, _ in lorafa.lorafa_layers(model)]
    assert names and all(re.search(r"\.layer\.1\.", n) for n in names)  # 2 layers: only layer 1
    # every default target (query, key, value, attention.output.dense, intermediate.dense, output.dense) of it
    assert len(names) == 6


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [("parts", {"parts": ["vision"]}), ("parts", {"parts": []}), ("seeds", {"seeds": 0}),
     ("budget", {"budget": 0}), ("threads", {"threads": 0})],
)  # fmt: skip
def test_config_errors_name_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=field):
        StudyConfig(**kwargs).validate()


def test_reuse_matches_resolved_configs_not_text(tmp_path: Path) -> None:
    """A finished run is reused when its config resolves to the same TrainConfig, even if written by an older
    lorafa that lacked a field now at its default; any changed value means it is trained again."""
    from lorafa.study import _finished
    from lorafa.train_config import config_from_dict

    raw = {"model": "m", "task": "classification", "method": "lora-fa", "output_dir": str(tmp_path), "lr": 1e-3,
           "adapter": {"r": 4}, "data": {"train_file": "t.csv"}}  # fmt: skip
    full = yaml.safe_load(config_from_dict(raw).to_yaml())
    del full["adapter"]["share_a"]  # as an older lorafa wrote it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(full))
    assert _finished(tmp_path, raw) is None  # no metrics.json: not finished
    (tmp_path / "metrics.json").write_text(json.dumps({"eval_accuracy": 0.5}))
    assert _finished(tmp_path, raw) == {"eval_accuracy": 0.5}
    assert _finished(tmp_path, {**raw, "lr": 2e-3}) is None
    assert _finished(tmp_path, {**raw, "adapter": {"r": 4, "share_a": True}}) is None
    # A recorded data fingerprint must match the files now at the config's paths.
    from lorafa.study import data_fingerprint

    train_file = tmp_path / "t.jsonl"
    train_file.write_text('{"text": "a", "label": 0}\n')
    raw = {**raw, "data": {"train_file": str(train_file)}}
    (tmp_path / "config.yaml").write_text(config_from_dict(raw).to_yaml())
    (tmp_path / "data_sha256.json").write_text(json.dumps(data_fingerprint(raw)))
    assert _finished(tmp_path, raw) == {"eval_accuracy": 0.5}
    train_file.write_text('{"text": "b", "label": 1}\n')  # same path, other rows
    assert _finished(tmp_path, raw) is None


def test_acceptance_rows_for_plain_lora_fa_and_its_dev_chosen_flavour() -> None:
    from lorafa.study_report import acceptance_from_means, best_on_dev

    enc = {
        "lora": {"eval_accuracy": 0.80},
        "full": {"eval_accuracy": 0.80},
        "lora-fa": {"eval_accuracy": 0.785},
        "lora-fa+grad": {"eval_accuracy": 0.795},
        "lora-fa-2r": {"eval_accuracy": 0.799},
    }
    dec = {"lora": {"eval_loss": 2.0}, "lora-fa": {"eval_loss": 2.05}, "lora-fa-2r": {"eval_loss": 2.03}}
    rows = acceptance_from_means({"encoder": enc, "decoder": dec})
    assert [r.passed for r in rows] == [
        False,
        True,
        False,
    ]  # gap −1.5 vs LoRA (≥ −1.0 needed), vs full (≥ −2.0)
    assert "(gap -1.50 points)" in rows[0].measured and "(ratio 1.0250)" in rows[2].measured
    # The flavour is chosen on dev: +grad (dev 0.83 > 0.82), although 2r is better on test (0.799 > 0.795)
    best = {
        "encoder": best_on_dev(
            {"lora": 0.9, "lora-fa": 0.81, "lora-fa+grad": 0.83, "lora-fa-2r": 0.82}, True
        ),
        "decoder": best_on_dev({"lora": 1.0, "full": 1.0, "lora-fa": 2.2, "lora-fa-2r": 2.1}, False),
    }
    assert best == {"encoder": "lora-fa+grad", "decoder": "lora-fa-2r"}  # never a method that is not LoRA-FA
    rows = acceptance_from_means({"encoder": enc, "decoder": dec}, best)
    extra = [r for r in rows if "best of its sweep" in r.claim]
    assert len(rows) == 6 and [r.passed for r in extra] == [True, True, True]
    assert "`lora-fa+grad`" in extra[0].claim and "(gap -0.50 points)" in extra[0].measured
    assert "`lora-fa-2r`" in extra[2].claim and "(ratio 1.0150)" in extra[2].measured
    rows = acceptance_from_means({"encoder": enc, "decoder": dec}, {"encoder": "lora-fa", "decoder": None})
    assert len(rows) == 3  # plain LoRA-FA chosen (or nothing to choose): no second set of rows
    assert best_on_dev({"lora": 0.9}, True) is None
