"""The report of the accuracy study (`lorafa.study`): issue 6's acceptance checks, docs/RESULTS.md (one section
per part: reported table, learning-rate sweep, notes), the PNG charts (written atomically) and every run and
summary as plain data for study.json (`results_json`)."""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorafa.run_folder import read_log
from lorafa.study import METHODS, Cell, PartResult, RunResult, StudyConfig, _atomic_write

__all__ = [
    "Acceptance",
    "acceptance",
    "plot_eval_curves",
    "plot_final",
    "render_part",
    "render_report",
    "results_json",
    "write_report",
]

# ------------------------------------------------------------------------------------------------ the report


@dataclass
class Acceptance:
    """One acceptance check of issue 6, with the measured numbers."""

    claim: str
    measured: str
    passed: bool | None
    """None when a method it needs did not run."""

    @property
    def verdict(self) -> str:
        """The result cell of a report row: met, **missed** or not run."""
        return {True: "met", False: "**missed**", None: "not run"}[self.passed]


def lora_fa_flavours() -> list[str]:
    """The study's methods that are LoRA-FA (A frozen, only B trains) with some setting: A's init, rank, projection."""
    return [m for m, spec in METHODS.items() if spec.train_method == "lora-fa"]


def best_on_dev(dev: dict[str, float], higher: bool) -> str | None:
    """The LoRA-FA flavour with the best dev value among those in `dev` (method → dev metric at its chosen lr)."""
    flavours = lora_fa_flavours()
    fa = {m: v for m, v in dev.items() if m in flavours}
    if not fa:
        return None
    return max(fa, key=lambda m: fa[m] if higher else -fa[m])


def acceptance(results: dict[str, PartResult]) -> list[Acceptance]:
    """Issue 6's targets for the study's results (see `acceptance_from_means`); LoRA-FA's best setting is chosen by
    the dev mean at each flavour's chosen lr."""
    best = {}
    for name, part in results.items():
        dev = {m: c.mean[part.plan.metric] for m, c in part.chosen.items() if part.plan.metric in c.mean}
        best[name] = best_on_dev(dev, higher=part.plan.metric == "eval_accuracy")
    return acceptance_from_means(
        {name: {m: c.mean for m, c in part.final.items()} for name, part in results.items()}, best
    )


def acceptance_from_means(
    means: dict[str, dict[str, dict[str, float]]], best: dict[str, str | None] | None = None
) -> list[Acceptance]:
    """Issue 6's targets: encoder LoRA-FA accuracy ≥ LoRA − 1.0 pt and ≥ full − 2.0 pt; decoder loss ≤ 1.02 × LoRA.

    Rows for the paper's LoRA-FA (random A, LoRA's rank), then, where `best` names another LoRA-FA flavour for a
    part, for LoRA-FA "best of its sweep": the flavour (A's init, rank, projection) chosen on dev, never on test.

    Args:
        means: part name → method → metric → mean test value (accuracy as a fraction), for the parts that ran.
        best: part name → the LoRA-FA flavour with the best dev result (`best_on_dev`), if any.
    """
    checks: list[Acceptance] = []
    rows: dict[str, list[tuple[str, str]]] = {}
    for name in means:
        rows[name] = [("lora-fa", "LoRA-FA")]
        chosen = (best or {}).get(name)
        if chosen is not None and chosen != "lora-fa":
            rows[name].append((chosen, f"LoRA-FA best of its sweep on dev (`{chosen}`)"))
    enc = means.get("encoder")
    if enc is not None:
        acc = {m: 100 * c["eval_accuracy"] for m, c in enc.items() if "eval_accuracy" in c}
        for fa, label in rows["encoder"]:
            for other, margin in (("lora", 1.0), ("full", 2.0)):
                claim = f"encoder: {label} mean test accuracy ≥ {other} − {margin:.1f} points"
                if fa in acc and other in acc:
                    gap = acc[fa] - acc[other]
                    measured = f"{acc[fa]:.2f} vs {acc[other]:.2f} (gap {gap:+.2f} points)"
                    checks.append(Acceptance(claim, measured, gap >= -margin))
                else:
                    checks.append(Acceptance(claim, "not run", None))
    dec = means.get("decoder")
    if dec is not None:
        loss = {m: c["eval_loss"] for m, c in dec.items() if "eval_loss" in c}
        for fa, label in rows["decoder"]:
            claim = f"decoder: {label} test eval loss ≤ 1.02 × LoRA's"
            if fa in loss and "lora" in loss:
                ratio = loss[fa] / loss["lora"]
                measured = f"{loss[fa]:.4f} vs {loss['lora']:.4f} (ratio {ratio:.4f})"
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
        lines.append(f"| {a.claim} | {a.measured} | {a.verdict} |")
    lines += [
        "",
        '"LoRA-FA" is the paper\'s method at LoRA\'s rank (random A). "LoRA-FA best of its sweep" is the LoRA-FA '
        "flavour (A's init, rank, projection, share_a: the `lora-fa*` methods below) with the best dev result at its "
        "chosen lr, chosen on dev like an lr; its rows appear when that is not plain LoRA-FA. "
        "These rows are at this study's budgets (120 steps per part). The same comparisons with 4-5x the training "
        "data, same settings, dev and test files: [RESULTS_LONG.md](RESULTS_LONG.md) (`python "
        "benchmarks/long_budget.py`).",
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
            for record in read_log(Path(r.run_dir) / "train_log.jsonl"):
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
