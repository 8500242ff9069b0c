"""The accuracy study of issue 6: does freezing A cost accuracy? Full FT, LoRA and LoRA-FA on the same budget.

Three parts, after the paper's three model families (Zhang et al. 2023, LoRA-FA, §4):

- `encoder`: all-MiniLM-L6-v2 on Rotten Tomatoes sentiment (the RoBERTa/GLUE setting). Methods full, lora, lora-fa,
  lora-fa+proj and lora-half (LoRA on the top half of the layers, the paper's "fewer LoRA layers" baseline); a small
  learning-rate sweep per method; several seeds.
- `decoder`: SmolLM2-135M-Instruct, `sft` on chatterbot prompt→response pairs (the LLaMA setting): eval loss and
  perplexity for lora, lora-fa, lora-fa+proj and full.
- `seq2seq`: a random-init T5-small-shaped model on a synthetic task (reverse a short sequence of letters): shows
  that LoRA-FA trains an encoder–decoder; it says nothing about pretrained T5 quality.

Protocol. Every method of a part trains on the same examples, in the same order for a given seed (the loop's data
order depends only on the seed), with the same max_length, batch size and number of steps: the same token budget.
The data is split once, seeded, into train / dev / test files. When a method has several learning rates, each
(method, lr) is trained with every seed, the lr with the best *dev* mean is chosen, and only the chosen runs are
scored on *test*; variants (lora-fa+proj, lora-half) train at the lr chosen for their parent (lora-fa, lora); with
a single lr per method the runs are scored on test directly. So no number in the report was tuned on the split it is
reported on. The seed also seeds A's initialisation (`adapter.init_seed`).

Each run is one `lorafa.train.train` call, in a fresh forked process when `isolate` is set (the real study), so that
its peak RSS is its own; `smoke` mode runs tiny random-init models on tiny generated data in-process, for tests.
`run_study` writes `docs/RESULTS.md` and PNG charts (atomically: temp file, then rename).

This file holds the data classes, the aggregation (`aggregate`, `best_cells`) and the running (`run_study`,
`run_part`, `Runner`); the grids and their generated data and models live in `lorafa.study_plans`, the report
(RESULTS.md, charts, `results_json`) in `lorafa.study_report`. Both import this module, so `run_study` imports
them when it runs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PARTS = ("encoder", "decoder", "seq2seq")


@dataclass(frozen=True)
class MethodSpec:
    """One column of the study: how a `lorafa train` run is configured for it."""

    train_method: str
    """TrainConfig.method: full | lora | lora-fa."""
    projection: bool = False
    """LoRA-FA's gradient projection g_B ← g_B·(A·Aᵀ)⁻¹/s² (`lorafa.projection`)."""
    half_layers: bool = False
    """Adapt only the top half of the transformer blocks (the paper's "fewer LoRA layers" baseline)."""
    adapter: dict[str, Any] = field(default_factory=dict)
    """LoRAFAConfig fields set on top of the part's adapter settings (e.g. share_a, init_lora_weights)."""
    rank_factor: int = 1
    """Multiply the part's r and lora_alpha by this (same scaling s, more directions)."""
    label: str = ""
    """What the method is, for the report."""


METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec("full", label="full fine-tuning (every weight trains)"),
    "lora": MethodSpec("lora", label="LoRA (A and B train)"),
    "lora-fa": MethodSpec("lora-fa", label="LoRA-FA (A frozen, only B trains)"),
    "lora-fa+proj": MethodSpec("lora-fa", projection=True, label="LoRA-FA + gradient projection of B"),
    "lora-half": MethodSpec("lora", half_layers=True, label="LoRA on the top half of the layers only"),
    "lora-fa+shared": MethodSpec(
        "lora-fa",
        adapter={"share_a": True},
        label="LoRA-FA with one A shared by sibling layers (opt-in share_a)",
    ),
    "lora-fa+orth": MethodSpec(
        "lora-fa", adapter={"init_lora_weights": "orthogonal"}, label="LoRA-FA with orthogonal rows of A"
    ),
    "lora-fa+grad": MethodSpec(
        "lora-fa",
        adapter={"init_lora_weights": "gradient"},
        label="LoRA-FA with A from the gradient of the first training batches (opt-in init, not in the paper)",
    ),
    "lora-fa+inputs": MethodSpec(
        "lora-fa",
        adapter={"init_lora_weights": "inputs"},
        label="LoRA-FA with A from the principal directions of the layers' inputs (EVA-like; opt-in, not in the paper)",
    ),
    "lora-fa-2r": MethodSpec(
        "lora-fa",
        rank_factor=2,
        label="LoRA-FA at twice the rank (about LoRA's number of trainable parameters)",
    ),
    "lora-fa-2r+grad": MethodSpec(
        "lora-fa",
        rank_factor=2,
        adapter={"init_lora_weights": "gradient"},
        label="LoRA-FA at twice the rank with A from the gradient (opt-in init, not in the paper)",
    ),
}


@dataclass
class PartPlan:
    """One part of the study: a model, data files, shared training settings and the (method → lrs) grid."""

    name: str
    """encoder | decoder | seq2seq."""
    title: str
    """One line for the report, e.g. "all-MiniLM-L6-v2 on Rotten Tomatoes"."""
    task: str
    """TrainConfig.task."""
    model: str
    """Model id, folder or asset:NAME."""
    files: dict[str, str]
    """train / dev / test data files (dev only when some method sweeps several learning rates)."""
    data: dict[str, Any]
    """DataConfig fields shared by every run (columns, max_length, label_names, ...)."""
    train: dict[str, Any]
    """TrainConfig fields shared by every run (batch_size, epochs or max_steps, warm-up, eval_every, ...)."""
    adapter: dict[str, Any]
    """LoRAFAConfig fields shared by every adapter method (r, lora_alpha, lora_dropout)."""
    grid: dict[str, list[float]]
    """Method name (a key of METHODS) → learning rates to try."""
    seeds: list[int]
    """Training seeds; each (method, lr) is trained once per seed."""
    notes: list[str] = field(default_factory=list)
    """Sentences for the report: what the part shows and what it does not."""
    inherit: dict[str, str] = field(default_factory=dict)
    """Variant method → the grid method whose dev-chosen lr it trains with (e.g. lora-fa+proj → lora-fa), so a
    variant costs one run per seed instead of a sweep."""

    @property
    def methods(self) -> list[str]:
        """Every method of the part, grid methods first."""
        return [*self.grid, *self.inherit]

    @property
    def selects(self) -> bool:
        """True when some method sweeps several learning rates (chosen on dev, reported on test)."""
        return any(len(lrs) > 1 for lrs in self.grid.values())

    @property
    def metric(self) -> str:
        """The metric that chooses the learning rate: dev accuracy (classification) or dev loss."""
        return "eval_accuracy" if self.task == "classification" else "eval_loss"


@dataclass
class StudyConfig:
    """Options of `run_study`. `validate()` raises ValueError naming the field."""

    parts: list[str] = field(default_factory=lambda: list(PARTS))
    """Parts to run, a subset of encoder / decoder / seq2seq."""
    seeds: int | None = None
    """Seeds per (method, lr) of the encoder part (the others use 1); None: 3 (2 in smoke mode)."""
    budget: float = 1.0
    """Scale of every part's training examples (and so of its steps and tokens); 1.0 is the documented grid."""
    smoke: bool = False
    """Tiny random-init models on tiny generated data, for tests (the numbers mean nothing)."""
    work_dir: str = "runs/study"
    """Where data files, generated models and every run's output_dir go."""
    docs_dir: str = "docs"
    """Where RESULTS.md and the PNG charts are written."""
    isolate: bool = False
    """Run each training/evaluation in a fresh forked process (its own peak RSS, no state carried over)."""
    threads: int | None = None
    """torch threads per run; None leaves torch's default. On a CPU shared with other jobs, 1 avoids OpenMP
    threads spinning against each other (2 threads ran ~10× slower than 1 on the busy 2-core study machine)."""
    reuse: bool = False
    """Reuse finished runs whose folder holds the same resolved config (an interrupted study resumes)."""
    command: str = ""
    """The command line that ran the study, for the report."""

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if not self.parts or any(p not in PARTS for p in self.parts):
            raise ValueError(f"parts must be a non-empty subset of {list(PARTS)}, got {self.parts!r}")
        if self.seeds is not None and (isinstance(self.seeds, bool) or self.seeds < 1):
            raise ValueError(f"seeds must be a positive integer, got {self.seeds!r}")
        if isinstance(self.budget, bool) or not self.budget > 0:
            raise ValueError(f"budget must be a number > 0, got {self.budget!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")


@dataclass
class RunResult:
    """One training run: its final metrics on the selection split and, when chosen, on test."""

    part: str
    method: str
    lr: float
    seed: int
    run_dir: str
    metrics: dict[str, float]
    """metrics.json of the run: eval_* on dev (parts that select an lr) or test, plus time and memory."""
    test: dict[str, float] | None = None
    """eval_* on test, for the runs of the chosen lr of a part that selects on dev."""
    error: str | None = None
    """Why the run failed (its metrics are then empty)."""
    reused: bool = False
    """Taken from an earlier invocation's run folder (`StudyConfig.reuse`) instead of trained again."""


@dataclass
class Cell:
    """Mean and sample standard deviation (n−1; 0 for one run) of each metric over the seeds of one setting."""

    part: str
    method: str
    lr: float
    n: int
    mean: dict[str, float]
    std: dict[str, float]


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with n−1; 0.0 for a single value)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: Iterable[RunResult], split: str = "metrics") -> list[Cell]:
    """Group successful runs by (part, method, lr) and summarise every metric they all report.

    Args:
        results: Runs, in any order.
        split: "metrics" (the selection split, i.e. metrics.json) or "test".

    Returns:
        One Cell per (part, method, lr) with at least one run reporting `split`, in first-seen order.
    """
    groups: dict[tuple[str, str, float], list[dict[str, float]]] = {}
    for r in results:
        values = r.metrics if split == "metrics" else r.test
        if r.error is None and values:
            groups.setdefault((r.part, r.method, r.lr), []).append(values)
    cells = []
    for (part, method, lr), runs in groups.items():
        keys = [k for k in runs[0] if all(k in m for m in runs)]
        stats = {k: mean_std([float(m[k]) for m in runs]) for k in keys}
        cells.append(
            Cell(
                part,
                method,
                lr,
                len(runs),
                {k: s[0] for k, s in stats.items()},
                {k: s[1] for k, s in stats.items()},
            )
        )
    return cells


def best_cells(cells: Iterable[Cell], metric: str) -> dict[str, Cell]:
    """Per method, the cell (learning rate) with the best mean `metric`: highest for accuracy/F1, lowest for losses.

    Ties go to the first cell in order (the smaller lr of a grid listed in increasing order).
    """
    higher = not metric.endswith(("loss", "perplexity"))
    best: dict[str, Cell] = {}
    for c in cells:
        if metric not in c.mean:
            continue
        old = best.get(c.method)
        if old is None or (
            c.mean[metric] > old.mean[metric] if higher else c.mean[metric] < old.mean[metric]
        ):
            best[c.method] = c
    return best


# ------------------------------------------------------------------------------------------- the study


@dataclass
class PartResult:
    """What a part produced: its plan, every run, the dev sweep, the chosen lr per method and the reported cells."""

    plan: PartPlan
    runs: list[RunResult]
    sweep: list[Cell]
    """Per (method, lr) summary on the selection split (dev, or test when there is no sweep)."""
    chosen: dict[str, Cell]
    """Per method, the sweep cell of the chosen learning rate."""
    final: dict[str, Cell]
    """Per method, the reported numbers: test metrics of the chosen lr's runs."""
    wall_s: float


def run_study(cfg: StudyConfig) -> dict[str, PartResult]:
    """Run the configured parts, then write `docs_dir/RESULTS.md` and the charts.

    Args:
        cfg: Which parts, how many seeds, the budget scale, smoke mode, folders.

    Returns:
        Part name → its results, in the order run.
    """
    # Imported here: both modules import this one (its data classes, Runner and _atomic_write).
    from lorafa.study_plans import real_plan, smoke_plan
    from lorafa.study_report import write_report

    cfg.validate()
    started = time.perf_counter()
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(cfg.isolate, cfg.threads)
    results: dict[str, PartResult] = {}
    for name in cfg.parts:
        plan = (smoke_plan if cfg.smoke else real_plan)(name, cfg, work / name, runner)
        results[name] = run_part(plan, work / name / "runs", runner, cfg.reuse)
    wall = time.perf_counter() - started
    write_report(results, cfg, Path(cfg.docs_dir), wall)
    return results


def run_part(plan: PartPlan, runs_dir: Path, runner: Runner, reuse: bool = False) -> PartResult:
    """Train every (method, lr, seed) of `plan`, choose each method's lr and score the chosen runs on test.

    With `reuse`, a run folder whose metrics.json exists, whose config.yaml equals this run's resolved config and
    whose recorded data fingerprint (if any) matches the files now at those paths is not trained again (nor a test
    score recomputed for a test file with the same path and contents).
    """
    started = time.perf_counter()
    runs: list[RunResult] = []

    def train_all(method: str, lrs: list[float]) -> None:
        for lr in lrs:
            for seed in plan.seeds:
                out = runs_dir / f"{method}_lr{lr:g}_seed{seed}"
                raw = run_config(plan, method, lr, seed, str(out))
                value, error = (_finished(out, raw), None) if reuse else (None, None)
                reused = value is not None
                if not reused:
                    value, error = runner.call(_train_run, raw)
                    if error is None:
                        _atomic_write(out / _FINGERPRINT, json.dumps(data_fingerprint(raw)).encode())
                runs.append(
                    RunResult(plan.name, method, lr, seed, str(out), value or {}, error=error, reused=reused)
                )
                _log(f"[{plan.name}] {method} lr={lr:g} seed={seed}: " + (error or _brief(value or {})))

    for method, lrs in plan.grid.items():
        train_all(method, lrs)
    chosen = best_cells(aggregate(runs), plan.metric)
    for method, parent in plan.inherit.items():
        if parent in chosen:
            train_all(method, [chosen[parent].lr])
    sweep = aggregate(runs)
    chosen = best_cells(sweep, plan.metric)
    if plan.selects:
        digest = _sha256(plan.files["test"])  # once per part: every chosen run is scored on the same file
        for r in runs:
            cell = chosen.get(r.method)
            if r.error is None and cell is not None and cell.lr == r.lr:
                saved = Path(r.run_dir) / "test_metrics.json"
                old = json.loads(saved.read_text()) if reuse and saved.is_file() else {}
                if old.get("test_file") == plan.files["test"] and old.get("test_sha256") == digest:
                    test, error = old["metrics"], None
                else:
                    test, error = runner.call(_test_eval, r.run_dir, plan.files["test"])
                    if error is None:
                        record = {"test_file": plan.files["test"], "test_sha256": digest, "metrics": test}
                        _atomic_write(saved, json.dumps(record).encode())
                r.test = {**(test or {}), **_cost(r.metrics)} if error is None else None
                r.error = r.error or error
                _log(
                    f"[{plan.name}] {r.method} lr={r.lr:g} seed={r.seed} on test: "
                    + (error or _brief(test or {}))
                )
        final = {c.method: c for c in aggregate(runs, "test")}
    else:
        final = dict(chosen)
    return PartResult(plan, runs, sweep, chosen, final, time.perf_counter() - started)


def run_config(plan: PartPlan, method: str, lr: float, seed: int, output_dir: str) -> dict[str, Any]:
    """The nested TrainConfig dict of one run (`lorafa.train_config.config_from_dict` validates it)."""
    spec = METHODS[method]
    adapter = {**plan.adapter, "init_seed": seed}
    if spec.projection:
        adapter["projection"] = True
    if spec.half_layers:
        adapter["target_modules"] = half_layer_targets(plan.model)
    adapter.update(spec.adapter)
    if spec.rank_factor != 1:
        adapter["r"] = adapter["r"] * spec.rank_factor
        adapter["lora_alpha"] = adapter["lora_alpha"] * spec.rank_factor
    eval_file = plan.files["dev"] if plan.selects else plan.files["test"]
    return {
        **plan.train,
        "model": plan.model,
        "task": plan.task,
        "method": spec.train_method,
        "output_dir": output_dir,
        "seed": seed,
        "lr": lr,
        "adapter": adapter,
        "data": {**plan.data, "train_file": plan.files["train"], "eval_file": eval_file},
        "progress_bar": False,
    }


def half_layer_targets(model: str) -> str:
    """A target_modules regex for the architecture's default targets in the top half of its blocks.

    E.g. for a 6-layer BERT: `(?:.*\\.)?(?:layer|layers|block|h)\\.(?:3|4|5)\\.(?:.*\\.)?(?:query|...)`. For an
    encoder–decoder, the top half of each stack.
    """
    from transformers import AutoConfig

    from lorafa.assets import resolve
    from lorafa.targets import DEFAULT_TARGETS

    config = AutoConfig.from_pretrained(resolve(model))
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    targets = DEFAULT_TARGETS.get(str(config.model_type))
    if not layers or not targets:
        raise ValueError(
            f"lora-half: cannot tell the layers or default targets of model type {config.model_type!r}"
        )
    top = "|".join(str(i) for i in range(layers // 2, layers))
    names = "|".join(re.escape(t) for t in targets)
    return rf"(?:.*\.)?(?:layer|layers|block|h)\.(?:{top})\.(?:.*\.)?(?:{names})"


def _finished(out: Path, raw: dict[str, Any]) -> dict[str, float] | None:
    """metrics.json of a finished run in `out` trained with exactly the config `raw`, else None."""
    from lorafa.train_config import config_from_dict, read_yaml

    metrics, config = out / "metrics.json", out / "config.yaml"
    if not (metrics.is_file() and config.is_file()):
        return None
    # Compare resolved configs, so that a field added to lorafa since the run (at its default) still matches.
    # Local paths compare as absolute paths (config.yaml holds them so since a later version).
    try:
        old = config_from_dict(read_yaml(config)).with_absolute_paths().to_yaml()
    except ValueError:
        return None
    if old != config_from_dict(raw).with_absolute_paths().to_yaml():
        return None
    # Same paths can hold other data (a split rewritten by a later version of the grid): compare contents too.
    # Runs from before fingerprints were written have none and are taken as they are.
    saved = out / _FINGERPRINT
    if saved.is_file() and json.loads(saved.read_text()) != data_fingerprint(raw):
        return None
    return dict(json.loads(metrics.read_text()))


_FINGERPRINT = "data_sha256.json"


def data_fingerprint(raw: dict[str, Any]) -> dict[str, str]:
    """sha256 of each data file a run config names (train_file, eval_file): path → hex digest."""
    data = raw.get("data", {})
    files = [data.get(key) for key in ("train_file", "eval_file")]
    return {f: _sha256(f) for f in files if f and Path(f).is_file()}


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _train_run(raw: dict[str, Any]) -> dict[str, float]:
    from lorafa.train import train
    from lorafa.train_config import config_from_dict

    return train(config_from_dict(raw))


def _test_eval(run_dir: str, test_file: str) -> dict[str, float]:
    from lorafa.evaluate import evaluate_run

    return evaluate_run(run_dir, eval_file=test_file)


_COST_KEYS = (
    "train_runtime_s",
    "peak_memory_bytes",
    "trainable_params",
    "total_params",
    "steps",
    "tokens_per_s",
)


def _cost(metrics: dict[str, float]) -> dict[str, float]:
    """The training-cost entries of metrics.json, carried next to the test metrics."""
    return {k: metrics[k] for k in _COST_KEYS if k in metrics}


def _brief(m: dict[str, float]) -> str:
    shown = [
        f"{k}={m[k]:.4g}" for k in ("eval_accuracy", "eval_f1", "eval_loss", "train_runtime_s") if k in m
    ]
    return " ".join(shown)


def _log(line: str) -> None:
    print(f"{datetime.datetime.now():%H:%M:%S} {line}", flush=True)


class Runner:
    """Calls a function in this process, or in a fresh process forked from a clean server (`isolate`).

    The fork server (multiprocessing "forkserver") imports torch and transformers once and never runs a torch op,
    so each child starts without import cost, without OpenMP state (forking a process that has run torch ops
    can hang), and with a peak RSS of its own. As with any non-fork start method, a script that isolates must
    guard its entry point with `if __name__ == "__main__":` (each child re-imports the main module).
    """

    PRELOAD = ["torch", "transformers", "datasets", "accelerate", "lorafa.train", "lorafa.evaluate"]

    def __init__(self, isolate: bool, threads: int | None = None) -> None:
        self.isolate, self.threads = isolate, threads
        self._ctx: Any = None

    def call(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, str | None]:
        """(fn(*args), None), or (None, "Type: message") when it raised or its process died."""
        if not self.isolate:
            import torch

            before = torch.get_num_threads()
            try:
                if self.threads:
                    torch.set_num_threads(self.threads)
                return fn(*args), None
            except Exception as e:  # a failed run is reported, the study goes on
                traceback.print_exc()
                return None, f"{type(e).__name__}: {e}"
            finally:
                torch.set_num_threads(before)
        if self._ctx is None:
            import multiprocessing

            self._ctx = multiprocessing.get_context("forkserver")
            self._ctx.set_forkserver_preload(self.PRELOAD)
        fd, result = tempfile.mkstemp(prefix="lorafa-study-", suffix=".json")
        os.close(fd)
        try:
            proc = self._ctx.Process(target=_child, args=(fn, args, result, self.threads))
            proc.start()
            proc.join()
            text = Path(result).read_text()
            if not text:
                return None, f"the run's process exited with status {proc.exitcode} and no result"
            out = json.loads(text)
            return out.get("value"), out.get("error")
        finally:
            os.unlink(result)


def _child(fn: Callable[..., Any], args: tuple[Any, ...], result: str, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        out: dict[str, Any] = {"value": fn(*args)}
    except Exception as e:
        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {e}"}
    Path(result).write_text(json.dumps(out))


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would survive the rename
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
