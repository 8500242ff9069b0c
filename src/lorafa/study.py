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
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import random
import re
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
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
    "lora-fa-2r": MethodSpec(
        "lora-fa",
        rank_factor=2,
        label="LoRA-FA at twice the rank (about LoRA's number of trainable parameters)",
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

    With `reuse`, a run folder whose metrics.json exists and whose config.yaml equals this run's resolved config
    is not trained again (nor a test score recomputed for the same test file).
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
        for r in runs:
            cell = chosen.get(r.method)
            if r.error is None and cell is not None and cell.lr == r.lr:
                saved = Path(r.run_dir) / "test_metrics.json"
                old = json.loads(saved.read_text()) if reuse and saved.is_file() else {}
                if old.get("test_file") == plan.files["test"]:
                    test, error = old["metrics"], None
                else:
                    test, error = runner.call(_test_eval, r.run_dir, plan.files["test"])
                    if error is None:
                        _atomic_write(
                            saved, json.dumps({"test_file": plan.files["test"], "metrics": test}).encode()
                        )
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
    from lorafa.inject import DEFAULT_TARGETS

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
    try:
        old = config_from_dict(read_yaml(config)).to_yaml()
    except ValueError:
        return None
    if old != config_from_dict(raw).to_yaml():
        return None
    return dict(json.loads(metrics.read_text()))


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


# ------------------------------------------------------------------------------------------ the real grid


def real_plan(name: str, cfg: StudyConfig, work: Path, runner: Runner) -> PartPlan:
    """The documented grid of part `name`, its data files written under `work`."""
    work.mkdir(parents=True, exist_ok=True)
    seeds = list(range(cfg.seeds or 3))
    if name == "encoder":
        n_train = _scaled(1920, cfg.budget)
        files = write_splits(
            rotten_tomatoes_rows(), work, {"train": n_train, "dev": 250, "test": 800}, seed=0
        )
        return PartPlan(
            name="encoder",
            title="all-MiniLM-L6-v2 (22.7M parameters, BERT encoder) on Rotten Tomatoes sentiment",
            task="classification",
            model="asset:all-minilm-l6-v2",
            files=files,
            data={"text_column": "text", "label_column": "category", "label_names": ["rotten", "fresh"],
                  "max_length": 48},
            train={"batch_size": 16, "epochs": 1, "warmup_ratio": 0.06, "schedule": "linear",
                   "eval_before": False, "eval_every": 0, "logging_every": 10, "eval_batch_size": 64},
            adapter={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "modules_to_save": ["classifier", "pooler"]},
            grid={"full": [1e-4, 3e-4], "lora": [5e-4, 1e-3, 2e-3, 5e-3], "lora-fa": [1e-3, 2e-3, 5e-3]},
            inherit={"lora-fa+proj": "lora-fa", "lora-half": "lora", "lora-fa+shared": "lora-fa",
                     "lora-fa+orth": "lora-fa", "lora-fa-2r": "lora-fa"},
            seeds=seeds,
            notes=[
                "Rows with category `plot` (plot summaries, not critic snippets) are dropped; the classes are "
                "`rotten` and `fresh` (about 42 % / 58 %; always answering `fresh` scores about 58 %).",
                "The adapter methods train BERT's whole classification head (`pooler` + `classifier`, "
                "modules_to_save), as RoBERTa's head (dense + out_proj) trains in the paper's GLUE runs.",
                "One pass over 1,920 reviews in batches of 16 (120 steps). A first version of this grid (640 "
                "reviews, batches of 8, 80 steps) left LoRA-FA 1.75 points below LoRA; its learning rates "
                "(LoRA 1e-3…1e-2, LoRA-FA 1e-3…1e-2, full 3e-4) set this grid's: LoRA and LoRA-FA collapsed to "
                "the majority class at ≥ 5e-3 (LoRA) and 1e-2 (LoRA-FA) there, and LoRA's best was its smallest "
                "lr, so 5e-4 is added. After the first launch of this grid LoRA was best at its top lr (2e-3) on "
                "dev, so 5e-3 was added; and, LoRA-FA trailing, three LoRA-FA variants at its dev-chosen lr were "
                "added to see what the gap depends on: orthogonal A, twice the rank (r=16, lora_alpha=32: about "
                "LoRA's number of trainable parameters) and share_a. The acceptance rows use plain LoRA-FA at r=8.",
            ],
        )  # fmt: skip
    if name == "decoder":
        n_train = _scaled(240, cfg.budget)
        files = write_splits(chatterbot_rows(), work, {"train": n_train, "dev": 40, "test": 40}, seed=0)
        return PartPlan(
            name="decoder",
            title="SmolLM2-135M-Instruct (LLaMA architecture) instruction-tuned on chatterbot prompt→response pairs",
            task="sft",
            model="asset:smollm2-135m-instruct",
            files=files,
            data={"prompt_column": "prompt", "response_column": "response", "max_length": 128},
            train={"batch_size": 2, "epochs": 1, "warmup_ratio": 0.06, "schedule": "linear",
                   "eval_before": True, "eval_every": 30, "logging_every": 5, "eval_batch_size": 8},
            adapter={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            grid={"lora": [5e-4, 1e-3, 2e-3, 5e-3], "lora-fa": [1e-3, 2e-3, 5e-3, 1e-2, 2e-2], "full": [3e-5]},
            inherit={"lora-fa+proj": "lora-fa", "lora-fa+shared": "lora-fa"},
            seeds=[0],
            notes=[
                "One seed (the machine's budget: a 135M model steps at ~2 s per 2 examples on a 2-core CPU); "
                "LoRA and LoRA-FA sweep learning rates chosen on a dev split of 40 pairs, full FT keeps 3e-5. A "
                "first version (120 pairs, 60 steps, LoRA 5e-4 and LoRA-FA 1e-3 fixed) gave LoRA-FA 1.039× "
                "LoRA's loss with the gap opening late, so this one trains twice as long and sweeps. The first "
                "launch swept LoRA 5e-4, 1e-3 and LoRA-FA 1e-3, 2e-3, 5e-3; both were best at the top of their "
                "range on dev, so LoRA 2e-3 and LoRA-FA 1e-2 were added, and then (LoRA best at 2e-3) LoRA 5e-3 and LoRA-FA "
                "2e-2, so that each sweep brackets its best lr.",
                "The tokenizer's chat template formats each pair (SmolLM2 adds its default system prompt); the "
                "prompt tokens are masked out of the loss. Eval loss is per response token on held-out pairs.",
            ],
        )  # fmt: skip
    if name == "seq2seq":
        model_dir = work / "t5-small-random"
        vocab = [chr(c) for c in range(ord("a"), ord("a") + 16)]
        runner.call(make_seq2seq_model, str(model_dir), vocab, T5_SMALL_SHAPE)
        n_train = _scaled(960, cfg.budget)
        files = write_splits(
            reversal_rows(n_train + 200, vocab, seed=0), work, {"train": n_train, "test": 200}, seed=0
        )
        return PartPlan(
            name="seq2seq",
            title="random-init T5-small shape (6+6 layers, d_model 512) reversing sequences of 3–6 letters",
            task="seq2seq",
            model=str(model_dir),
            files=files,
            data={"source_column": "source", "target_column": "target", "max_length": 16},
            train={"batch_size": 16, "epochs": 1, "warmup_ratio": 0.06, "schedule": "linear",
                   "eval_before": True, "eval_every": 20, "logging_every": 5, "exact_match_samples": 64},
            adapter={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            grid={"full": [1e-3], "lora": [3e-3], "lora-fa": [3e-3]},  # one seed, fixed lrs, not tuned
            seeds=[0],
            notes=[
                "No pretrained T5 can be installed offline, so the model is randomly initialised: adapters here "
                "train on top of random frozen weights, which is not what LoRA is for.",
                "It shows that LoRA-FA (and LoRA, full FT) train end to end on an encoder–decoder through "
                "`lorafa train` (cross-attention included) and how the losses move on the same budget; it does "
                "not show how LoRA-FA compares with LoRA when fine-tuning a pretrained T5.",
            ],
        )  # fmt: skip
    raise ValueError(f"unknown part {name!r}")


T5_SMALL_SHAPE = {
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_decoder_layers": 6,
    "num_heads": 8,
}
"""T5-small's layout (t5-small config), with the synthetic task's tiny vocabulary."""


def _scaled(n: int, budget: float) -> int:
    return max(8, round(n * budget))


def rotten_tomatoes_rows() -> list[dict[str, str]]:
    """Critic snippets of the offline Rotten Tomatoes corpus with a fresh/rotten label (plot summaries dropped)."""
    from lorafa.data import load_table

    table = load_table("asset:rotten-tomatoes")
    return [
        {"text": t, "category": c}
        for t, c in zip(table["text"], table["category"], strict=True)
        if isinstance(t, str) and t.strip() and c in ("fresh", "rotten")
    ]


def chatterbot_rows() -> list[dict[str, str]]:
    """The chatterbot corpus's prompt→response pairs (the `asset:chatterbot` JSONL)."""
    from lorafa.assets import resolve

    with open(resolve("asset:chatterbot"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def reversal_rows(
    n: int, vocab: list[str], seed: int, lengths: tuple[int, int] = (3, 6)
) -> list[dict[str, str]]:
    """`n` examples "a c b" → "b c a" of random sequences over `vocab` (length drawn in `lengths`, inclusive)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        seq = [rng.choice(vocab) for _ in range(rng.randint(*lengths))]
        rows.append({"source": " ".join(seq), "target": " ".join(reversed(seq))})
    return rows


def write_splits(
    rows: list[dict[str, Any]], folder: Path, sizes: dict[str, int], seed: int
) -> dict[str, str]:
    """Shuffle `rows` (seeded) and write disjoint JSONL splits of the given sizes; returns split → path."""
    if sum(sizes.values()) > len(rows):
        raise ValueError(f"the splits {sizes} need {sum(sizes.values())} rows; the data has {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    folder.mkdir(parents=True, exist_ok=True)
    paths, start = {}, 0
    for split, n in sizes.items():
        path = folder / f"{split}.jsonl"
        text = "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in order[start : start + n])
        _atomic_write(path, text.encode())
        paths[split], start = str(path), start + n
    return paths


# ------------------------------------------------------------------------------ generated models (smoke, T5)

_SPECIAL = ["[PAD]", "</s>", "[UNK]", "[CLS]", "[SEP]"]


def save_word_tokenizer(folder: Path, words: list[str], append_eos: bool) -> Any:
    """A whitespace word-level tokenizer over `words` (ids: [PAD]=0, </s>=1, [UNK]=2, [CLS], [SEP], words...).

    `append_eos` ends every encoding with </s>, as T5's tokenizer does (a seq2seq target must teach the model to
    stop).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", eos_token="</s>", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]",
    )  # fmt: skip
    hf.save_pretrained(folder)
    return hf


def make_seq2seq_model(folder: str, words: list[str], shape: dict[str, int], seed: int = 0) -> str:
    """Write a random-init T5 of `shape` with a word-level tokenizer over `words` to `folder` (kept if present)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    out = Path(folder)
    if (out / "config.json").is_file():
        return folder
    tmp = out.with_name(f".tmp-{out.name}")
    save_word_tokenizer(tmp, words, append_eos=True)
    torch.manual_seed(seed)
    settings: dict[str, Any] = {
        "vocab_size": len(_SPECIAL) + len(words), "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0, "dropout_rate": 0.0, **shape,
    }  # fmt: skip
    config = T5Config(**settings)
    T5ForConditionalGeneration(config).save_pretrained(tmp)
    tmp.rename(out)
    return folder


def make_smoke_model(folder: str, family: str, words: list[str], seed: int = 0) -> str:
    """A tiny random-init `family` model (bert backbone, llama, t5) with a word-level tokenizer, in `folder`."""
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    out = Path(folder)
    if (out / "config.json").is_file():
        return folder
    if family == "t5":
        return make_seq2seq_model(folder, words, {"d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2,
                                                  "num_decoder_layers": 2, "num_heads": 4}, seed)  # fmt: skip
    tmp = out.with_name(f".tmp-{out.name}")
    save_word_tokenizer(tmp, words, append_eos=False)
    torch.manual_seed(seed)
    vocab = len(_SPECIAL) + len(words)
    small: dict[str, Any] = {"vocab_size": vocab, "pad_token_id": 0, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
             "max_position_embeddings": 64}  # fmt: skip
    model: Any
    if family == "bert":
        model = BertModel(BertConfig(**small))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(eos_token_id=1, bos_token_id=1, num_key_value_heads=2, **small))  # fmt: skip
    else:
        raise ValueError(f"family must be bert, llama or t5, got {family!r}")
    model.save_pretrained(tmp)
    tmp.rename(out)
    return folder


_SMOKE_WORDS = ["good", "bad", "red", "blue", "cat", "dog", "big", "small", "sun", "moon"]


def smoke_plan(name: str, cfg: StudyConfig, work: Path, runner: Runner) -> PartPlan:
    """A tiny version of part `name` (random-init models, generated data, a few steps) with the same structure."""
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    common = {"batch_size": 8, "epochs": 1, "eval_before": False, "logging_every": 1, "eval_batch_size": 16}
    adapter = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    if name == "encoder":
        model = runner.call(make_smoke_model, str(work / "bert"), "bert", _SMOKE_WORDS)[0]
        rows = []
        for _ in range(120):
            words = [rng.choice(_SMOKE_WORDS[2:]) for _ in range(4)] + [rng.choice(["good", "bad"])]
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "category": "fresh" if "good" in words else "rotten"})
        files = write_splits(rows, work, {"train": _scaled(32, cfg.budget), "dev": 16, "test": 24}, seed=0)
        return PartPlan(
            "encoder", "tiny random-init BERT on generated sentences", "classification", model, files,
            {"text_column": "text", "label_column": "category", "label_names": ["rotten", "fresh"], "max_length": 12},
            {**common, "eval_every": 2}, adapter,
            {"full": [1e-3], "lora": [1e-2], "lora-fa": [1e-2, 2e-2]},
            list(range(cfg.seeds or 2)), ["Smoke mode: the numbers mean nothing."],
            {"lora-fa+proj": "lora-fa", "lora-half": "lora", "lora-fa+shared": "lora-fa"},
        )  # fmt: skip
    if name == "decoder":
        model = runner.call(make_smoke_model, str(work / "llama"), "llama", _SMOKE_WORDS)[0]
        rows = [{"prompt": w, "response": _SMOKE_WORDS[(i + 1) % len(_SMOKE_WORDS)]}
                for i, w in enumerate(_SMOKE_WORDS)] * 6  # fmt: skip
        files = write_splits(rows, work, {"train": _scaled(32, cfg.budget), "test": 16}, seed=0)
        return PartPlan(
            "decoder", "tiny random-init LLaMA on generated word pairs", "sft", model, files,
            {"prompt_column": "prompt", "response_column": "response", "max_length": 16, "use_chat_template": False},
            {**common, "eval_every": 2, "eval_before": True}, adapter,
            {"lora": [1e-2], "lora-fa": [1e-2], "full": [1e-3]}, [0],
            ["Smoke mode: the numbers mean nothing."],
        )  # fmt: skip
    if name == "seq2seq":
        vocab = _SMOKE_WORDS
        model = runner.call(make_smoke_model, str(work / "t5"), "t5", vocab)[0]
        files = write_splits(
            reversal_rows(64, vocab, seed=0), work, {"train": _scaled(32, cfg.budget), "test": 16}, 0
        )
        return PartPlan(
            "seq2seq", "tiny random-init T5 reversing word sequences", "seq2seq", model, files,
            {"source_column": "source", "target_column": "target", "max_length": 12},
            {**common, "eval_every": 2, "exact_match_samples": 8}, adapter,
            {"lora": [1e-2], "lora-fa": [1e-2]}, [0], ["Smoke mode: the numbers mean nothing."],
        )  # fmt: skip
    raise ValueError(f"unknown part {name!r}")


# ------------------------------------------------------------------------------------------------ the report


@dataclass
class Acceptance:
    """One acceptance check of issue 6, with the measured numbers."""

    claim: str
    measured: str
    passed: bool | None
    """None when a method it needs did not run."""


def acceptance(results: dict[str, PartResult]) -> list[Acceptance]:
    """Issue 6's targets: encoder LoRA-FA accuracy ≥ LoRA − 1.0 pt and ≥ full − 2.0 pt; decoder loss ≤ 1.02 × LoRA."""
    checks: list[Acceptance] = []
    enc = results.get("encoder")
    if enc is not None:
        acc = {m: 100 * c.mean["eval_accuracy"] for m, c in enc.final.items() if "eval_accuracy" in c.mean}
        for other, margin in (("lora", 1.0), ("full", 2.0)):
            claim = f"encoder: LoRA-FA mean test accuracy ≥ {other} − {margin:.1f} points"
            if "lora-fa" in acc and other in acc:
                gap = acc["lora-fa"] - acc[other]
                measured = f"{acc['lora-fa']:.2f} vs {acc[other]:.2f} (gap {gap:+.2f} points)"
                checks.append(Acceptance(claim, measured, gap >= -margin))
            else:
                checks.append(Acceptance(claim, "not run", None))
    dec = results.get("decoder")
    if dec is not None:
        loss = {m: c.mean["eval_loss"] for m, c in dec.final.items() if "eval_loss" in c.mean}
        claim = "decoder: LoRA-FA test eval loss ≤ 1.02 × LoRA's"
        if "lora-fa" in loss and "lora" in loss:
            ratio = loss["lora-fa"] / loss["lora"]
            measured = f"{loss['lora-fa']:.4f} vs {loss['lora']:.4f} (ratio {ratio:.4f})"
            checks.append(Acceptance(claim, measured, ratio <= 1.02))
        else:
            checks.append(Acceptance(claim, "not run", None))
    return checks


def write_report(results: dict[str, PartResult], cfg: StudyConfig, docs: Path, wall_s: float) -> Path:
    """Write docs/RESULTS.md and the charts (study_*.png) atomically; returns the report's path."""
    docs.mkdir(parents=True, exist_ok=True)
    charts: dict[str, list[str]] = {}
    for name, part in results.items():
        charts[name] = []
        if plot_final(part, docs / f"study_{name}_final.png"):
            charts[name].append(f"study_{name}_final.png")
        if plot_eval_curves(part, docs / f"study_{name}_eval_loss.png"):
            charts[name].append(f"study_{name}_eval_loss.png")
    path = docs / "RESULTS.md"
    _atomic_write(path, render_report(results, cfg, wall_s, charts).encode())
    return path


def render_report(
    results: dict[str, PartResult], cfg: StudyConfig, wall_s: float, charts: dict[str, list[str]]
) -> str:
    """The Markdown text of RESULTS.md."""
    import torch
    import transformers

    lines = [
        "# Accuracy study: LoRA-FA vs LoRA vs full fine-tuning"
        + (" (SMOKE MODE: numbers mean nothing)" if cfg.smoke else ""),
        "",
        "Written by `lorafa.study` (issue 6). Does freezing LoRA's A (LoRA-FA) cost accuracy against LoRA and full "
        "fine-tuning, when every method gets the same data, steps and tokens and its own learning rate?",
        "",
        f"- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {_wall_time(results, wall_s)}",
        f"- Command: `{cfg.command or 'python benchmarks/run_study.py'}`",
        f"- Machine: {platform.machine()} CPU, {os.cpu_count()} cores (shared with other jobs while it ran), "
        f"torch {torch.__version__} ({cfg.threads or torch.get_num_threads()} thread(s) per run), transformers "
        f"{transformers.__version__}, Python {platform.python_version()}, float32, no GPU.",
        "- Each run is one `lorafa train` run (its resolved `config.yaml` is in its folder under "
        f"`{cfg.work_dir}/PART/runs/`; `lorafa train that/config.yaml` repeats it).",
        "",
        "## Acceptance (issue 6)",
        "",
        "| target | measured | result |",
        "|---|---|---|",
    ]
    for a in acceptance(results):
        verdict = {True: "met", False: "**missed**", None: "not run"}[a.passed]
        lines.append(f"| {a.claim} | {a.measured} | {verdict} |")
    lines += [
        "",
        "## Protocol",
        "",
        "- Same budget: within a part every method trains on the same training file for the same number of steps; "
        "for a given seed the batches are identical across methods (the loop's data order depends only on the seed), "
        "so every method sees the same tokens.",
        "- Splits: the data is shuffled once (seed 0) into disjoint train / dev / test files. Where a method sweeps "
        "several learning rates, every (method, lr) is trained with every seed, the lr with the best dev mean is "
        "chosen, and only the chosen runs are evaluated on test. Variants ("
        + ", ".join(sorted({f"`{v}`" for r in results.values() for v in r.plan.inherit}))
        + ") train once per seed at the lr chosen on dev for their parent method. Where a part has one "
        "lr per method, runs are evaluated on test directly. No reported number was tuned on the split it is "
        "reported on.",
        "- The seed sets the data order, dropout, the classification head's initialisation and A's initialisation "
        "(`adapter.init_seed`). Means ± sample standard deviations (n−1) over seeds.",
        "- Time is the training loop's wall time (`train_runtime_s`, evaluations included); memory is the peak RSS "
        "of the run's own process (each run is forked fresh from a server holding the imported libraries, ~0.4 GiB "
        "of which is counted in every run)."
        if cfg.isolate
        else "- Time is the training loop's wall time; runs shared one process, so peak memory is the process's running "
        "peak and does not compare methods.",
        "",
        "Methods:",
        "",
    ]
    used = [m for m in METHODS if any(m in part.plan.methods for part in results.values())]
    lines += [f"- `{m}`: {METHODS[m].label}" for m in used]
    for name, part in results.items():
        lines += ["", *render_part(part, charts.get(name, []))]
    lines += [
        "",
        "## Reproduce",
        "",
        "```",
        "python benchmarks/run_study.py --part all --threads 1   # the whole study: this file, docs/study_*.png",
        "python benchmarks/run_study.py --part all --threads 1 --reuse   # resume: keep finished runs",
        "python benchmarks/run_study.py --part encoder --seeds 3 --budget 2   # one part, twice the training data",
        "python benchmarks/run_study.py --smoke              # tiny random-init models, seconds (what the tests run)",
        "```",
        "",
    ]
    return "\n".join(lines)


def render_part(part: PartResult, charts: list[str]) -> list[str]:
    """The report section of one part: settings, the reported table, the learning-rate sweep, charts, notes."""
    plan = part.plan
    token_task = plan.task != "classification"
    n_train = _count_lines(plan.files["train"])
    n_test = _count_lines(plan.files["test"])
    split_text = (
        f"{n_train} train / "
        + (f"{_count_lines(plan.files['dev'])} dev / " if plan.selects else "")
        + f"{n_test} test"
    )
    steps = _first(part.runs, "steps")
    shared = {**plan.train}
    shared.pop("progress_bar", None)
    lines = [
        f"## {plan.name}: {plan.title}",
        "",
        f"- Task `{plan.task}`, model `{plan.model}`; data {split_text} examples; max_length {plan.data.get('max_length')}.",
        f"- Shared settings: {_kv(shared)}; {int(steps) if steps else '?'} optimizer steps per run; adapters "
        f"{_kv(plan.adapter)} on the architecture's default target modules.",
        f"- Seeds: {', '.join(map(str, plan.seeds))}; learning rates tried: "
        + "; ".join(f"{m} {', '.join(f'{lr:g}' for lr in lrs)}" for m, lrs in plan.grid.items())
        + "".join(f"; {m} the lr chosen for {parent}" for m, parent in plan.inherit.items())
        + f". Part wall time {part.wall_s / 60:.1f} min"
        + (
            f" ({reused} runs reused from an earlier invocation)."
            if (reused := sum(r.reused for r in part.runs))
            else "."
        ),
        *[f"- {note}" for note in plan.notes],
        "",
        "Reported (test split" + (", at each method's dev-chosen lr" if plan.selects else "") + "):",
        "",
    ]
    if token_task:
        extra = "exact match (%) | " if any("eval_exact_match" in c.mean for c in part.final.values()) else ""
        lines += [f"| method | lr | runs | eval loss | perplexity | {extra}trainable params | train time (s) | peak RSS (GiB) |",
                  "|---|---|---|---|---|---|---|---|" + ("---|" if extra else "")]  # fmt: skip
    else:
        lines += ["| method | lr | runs | accuracy (%) | macro-F1 (%) | trainable params | train time (s) | peak RSS (GiB) |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for method in plan.methods:
        c = part.final.get(method)
        if c is None:
            lines.append(f"| {method} | – | 0 | failed: {_errors(part, method)} |")
            continue
        if token_task:
            em = f" {_pm(c, 'eval_exact_match', 100, 1)} |" if extra else ""
            row = f" {_pm(c, 'eval_loss', 1, 4)} | {_pm(c, 'eval_perplexity', 1, 2)} |{em}"
        else:
            row = f" {_pm(c, 'eval_accuracy', 100, 2)} | {_pm(c, 'eval_f1', 100, 2)} |"
        lines.append(
            f"| {method} | {c.lr:g} | {c.n} |{row} {_params(c.mean.get('trainable_params'))} | "
            f"{_pm(c, 'train_runtime_s', 1, 1)} | {_pm(c, 'peak_memory_bytes', 2**-30, 2)} |"
        )
    if plan.selects:
        name = "accuracy (%)" if plan.metric == "eval_accuracy" else "eval loss"
        scale, digits = (100, 2) if plan.metric == "eval_accuracy" else (1, 4)
        classes = plan.task == "classification"
        lines += (
            ["", "Learning-rate sweep (dev split, mean ± std over seeds; ✓ = chosen; single-class runs: runs whose "
             "dev predictions are all one class, Matthews correlation exactly 0):", "",
             f"| method | lr | runs | dev {name} | dev macro-F1 (%) | single-class runs | |",
             "|---|---|---|---|---|---|---|"]
            if classes else
            ["", "Learning-rate sweep (dev split, mean ± std over seeds; ✓ = chosen):", "",
             f"| method | lr | runs | dev {name} | |", "|---|---|---|---|---|"]
        )  # fmt: skip
        for c in part.sweep:
            mark = "✓" if part.chosen.get(c.method) is c else ""
            value = _pm(c, plan.metric, scale, digits)
            if not classes:
                lines.append(f"| {c.method} | {c.lr:g} | {c.n} | {value} | {mark} |")
                continue
            f1 = _pm(c, "eval_f1", 100, 2) if "eval_f1" in c.mean else "–"
            collapsed = sum(
                1 for r in part.runs
                if (r.method, r.lr) == (c.method, c.lr) and r.metrics.get("eval_mcc", 1.0) == 0.0
            )  # fmt: skip
            lines.append(f"| {c.method} | {c.lr:g} | {c.n} | {value} | {f1} | {collapsed} | {mark} |")
        edges = [
            f"`{m}` ({c.lr:g} is the {'smallest' if c.lr == min(plan.grid[m]) else 'largest'} lr tried)"
            for m, c in part.chosen.items()
            if len(plan.grid.get(m, [])) > 1 and c.lr in (min(plan.grid[m]), max(plan.grid[m]))
        ]
        if edges:
            lines += ["", "At the edge of its sweep: " + ", ".join(edges) + "; a learning rate beyond it might "
                      "do better."]  # fmt: skip
    failed = [r for r in part.runs if r.error]
    if failed:
        lines += ["", "Failed runs:", ""] + [
            f"- {r.method} lr={r.lr:g} seed={r.seed}: {r.error}" for r in failed
        ]
    if charts:
        lines += [""] + [f"![{c}]({c})" for c in charts]
    return lines


def _wall_time(results: dict[str, PartResult], wall_s: float) -> str:
    runs = [r for part in results.values() for r in part.runs]
    reused = sum(r.reused for r in runs)
    loops = sum(r.metrics.get("train_runtime_s", 0.0) for r in runs) / 60
    text = f"wall time of this invocation: {wall_s / 60:.1f} min"
    if reused:
        text += f" ({reused} of {len(runs)} runs reused from an earlier invocation of the same grid)"
    return f"{text}; the {len(runs)} training loops took {loops:.1f} min together."


def _pm(c: Cell, key: str, scale: float, digits: int) -> str:
    if key not in c.mean:
        return "–"
    mean = c.mean[key] * scale
    return f"{mean:.{digits}f}" if c.n == 1 else f"{mean:.{digits}f} ± {c.std[key] * scale:.{digits}f}"


def _params(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _kv(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _first(runs: list[RunResult], key: str) -> float | None:
    return next((r.metrics[key] for r in runs if key in r.metrics), None)


def _errors(part: PartResult, method: str) -> str:
    return (
        "; ".join(sorted({r.error or "" for r in part.runs if r.method == method and r.error})) or "no result"
    )


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


# ------------------------------------------------------------------------------------------------------ charts


def plot_final(part: PartResult, png: Path) -> bool:
    """Bar chart of the reported metric per method with ±std error bars (accuracy, or eval loss); False if empty."""
    methods = [m for m in part.plan.methods if m in part.final]
    if not methods:
        return False
    key, scale, ylabel = (
        ("eval_accuracy", 100, "test accuracy (%)") if part.plan.task == "classification" else ("eval_loss", 1, "test eval loss")
    )  # fmt: skip
    means = [part.final[m].mean.get(key, math.nan) * scale for m in methods]
    stds = [part.final[m].std.get(key, 0.0) * scale for m in methods]
    fig, ax = _figure()
    ax.bar(methods, means, yerr=stds, capsize=4, color="#4c72b0")
    finite = [m for m in means if math.isfinite(m)]
    if finite:
        low, high = min(finite), max(finite)
        pad = max(max(stds, default=0.0), (high - low) * 0.5, abs(high) * 0.01)
        ax.set_ylim(low - 2 * pad, high + 2 * pad)
    for i, (m, s) in enumerate(zip(means, stds, strict=True)):
        ax.annotate(
            f"{m:.2f}" if scale == 100 else f"{m:.3f}", (i, m + s), ha="center", va="bottom", fontsize=8
        )
    n = max(part.final[m].n for m in methods)
    ax.set_ylabel(ylabel)
    ax.set_title(
        f"{part.plan.name}: {ylabel} per method ({'mean ± std over ' + str(n) + ' seeds' if n > 1 else '1 seed'})",
        fontsize=9,
    )
    ax.tick_params(axis="x", labelsize=8)
    _save(fig, png)
    return True


def plot_eval_curves(part: PartResult, png: Path) -> bool:
    """Eval loss against optimizer step (mean over seeds) per method at its chosen lr, from train_log.jsonl."""
    fig, ax = _figure()
    drawn = False
    for method in part.plan.methods:
        cell = part.chosen.get(method)
        if cell is None:
            continue
        by_step: dict[int, list[float]] = {}
        for r in part.runs:
            if r.method != method or r.lr != cell.lr or r.error:
                continue
            for record in _read_log(Path(r.run_dir) / "train_log.jsonl"):
                if "eval_loss" in record:
                    by_step.setdefault(int(record["step"]), []).append(float(record["eval_loss"]))
        if len(by_step) < 2:
            continue
        steps = sorted(by_step)
        ax.plot(
            steps,
            [statistics.fmean(by_step[s]) for s in steps],
            marker="o",
            label=f"{method} (lr {cell.lr:g})",
        )
        drawn = True
    if not drawn:
        return False
    split = "dev" if part.plan.selects else "test"
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{split} eval loss")
    ax.set_title(f"{part.plan.name}: {split} eval loss during training", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, png)
    return True


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _figure() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Any, png: Path) -> None:
    """Save a figure as PNG under a temporary name in the same folder, then rename it into place."""
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{png.stem}.", suffix=".png", dir=png.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, png)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_write(path: Path, data: bytes) -> None:
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


def results_json(results: dict[str, PartResult]) -> dict[str, Any]:
    """Every run and summary as plain data (the script saves it next to the runs as study.json)."""
    return {
        name: {
            "runs": [asdict(r) for r in part.runs],
            "sweep": [asdict(c) for c in part.sweep],
            "chosen": {m: c.lr for m, c in part.chosen.items()},
            "final": {m: asdict(c) for m, c in part.final.items()},
            "wall_s": part.wall_s,
        }
        for name, part in results.items()
    }
