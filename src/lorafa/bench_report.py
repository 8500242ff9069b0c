"""The `lorafa bench` report: `BENCHMARKS.md` (one section per model with ratios and acceptance checks), the PNG
chart, the raw `benchmarks.json`, and the plain-text table for the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lorafa.bench_checks import checks
from lorafa.bench_models import METHODS, MODELS
from lorafa.files import atomic_write

__all__ = ["MIB", "format_table", "render_report", "write_chart", "write_report"]

MIB = 2**20


def _mib(x: float | None) -> str:
    return "–" if x is None else f"{x / MIB:,.1f}"


def _ratio(row: dict[str, Any], key: str) -> str:
    value = row.get("vs_peft", {}).get(key)
    return "–" if value is None else f"{value:.2f}"


def _row_name(row: dict[str, Any]) -> str:
    p = row["dropout"]
    return METHODS[row["method"]].label + ("" if p is None else f", p={p:g}")


def _model_section(rows: list[dict[str, Any]], model: str) -> list[str]:
    cuda = any(r.get("cuda_peak_allocated_bytes") for r in rows)
    mem_cols = "saved for backward | peak live tensors | peak RSS" + (" | CUDA peak" if cuda else "")
    head = f"| method | trainable params | {mem_cols} | step (s) | tokens/s | ÷ PEFT LoRA: saved / live / RSS / step |"
    lines = [f"## {model}: {MODELS[model].description}", "", head, "|---|" + "---:|" * (6 + cuda) + "---|"]
    for row in rows:
        if row.get("status") != "ok":
            lines.append(f"| {_row_name(row)} | {row.get('status')}: {row.get('error', '')} |")
            continue
        mem = [_mib(row["saved_bytes"]), _mib(row["peak_live_bytes"]), _mib(row["peak_rss_bytes"])]
        if cuda:
            mem.append(_mib(row.get("cuda_peak_allocated_bytes")))
        ratios = " / ".join(
            _ratio(row, k) for k in ("saved_bytes", "peak_live_bytes", "peak_rss_bytes", "step_s")
        )
        notes = f" ({'; '.join(row['notes'])})" if row.get("notes") else ""
        lines.append(
            f"| {_row_name(row)}{notes} | {row['trainable_params']:,} | {' | '.join(mem)} | {row['step_s']:.3f} | "
            f"{row['tokens_per_s']:,.0f} | {ratios} |"
        )
    lines += ["", "Memory in MiB. Saved for backward, by category (MiB):", ""]
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        cats = [c for c in ok[0]["saved_by_category"] if any(r["saved_by_category"].get(c) for r in ok)]
        lines += ["| method | " + " | ".join(cats) + " |", "|---|" + "---:|" * len(cats)]
        for row in ok:
            cells = " | ".join(_mib(row["saved_by_category"].get(c, 0)) for c in cats)
            lines.append(f"| {_row_name(row)} | {cells} |")
    found = checks(rows, model)
    if found:
        lines += ["", f"Acceptance checks ({workload_note(rows[0], model)}):", ""]
        lines += ["| issue | check | value | target | |", "|---|---|---:|---|---|"]
        for c in found:
            mark = "pass" if c["passed"] else "**miss**"
            lines.append(f"| {c['issue']} | {c['check']} | {c['value']:.4f} | {c['target']} | {mark} |")
    return lines + [""]


# The workloads the acceptance targets were written for: model -> (issues, batch, seq).
_ACCEPTANCE = {"smollm2-135m": ("5 and 7", 8, 256), "llama-core": ("2", 4, 256)}


def workload_note(row: dict[str, Any], model: str) -> str:
    if model not in _ACCEPTANCE:
        return "no issue sets targets for this model: for reference only"
    issues, batch, seq = _ACCEPTANCE[model]
    settings = (row["batch"], row["seq"], row["r"], row["lora_alpha"], row["dtype"], row["device"])
    if settings == (batch, seq, 16, 32.0, "float32", "cpu"):
        return f"the workload of issue {issues}"
    return f"NOT the workload of issue {issues} ({batch} x {seq}, r=16, lora_alpha=32, fp32 CPU): for reference only"


_METHOD_NOTES = """\
## How the numbers are measured

- **Each method in its own process.** A fresh `python -m lorafa.bench --worker` process per (model, method,
  dropout), run one after another, so one method's allocations cannot hide another's peak.
- **Saved for backward**: the unique storages autograd keeps after the forward pass of one training step
  (`lorafa.memory.SavedTensorTracker`: `saved_tensors_hooks`, each storage counted once, parameters excluded;
  under activation checkpointing what is really kept, i.e. the checkpoint inputs).
- **Peak live tensors**: on CPU, the bytes of all tensors alive before one steady-state step (weights, optimizer
  states; found through the garbage collector) plus the peak of the running sum of the step's allocation and free
  events from the PyTorch profiler (`profile_memory=True`). It does not depend on the allocator. On CUDA it is
  `torch.cuda.max_memory_allocated` over all steps.
- **Peak RSS**: the worker's whole-process peak resident memory (`getrusage` `ru_maxrss`) over the training
  steps, before the profiled step: Python, libraries, weights, gradients, optimizer states and activations. The
  high-water mark is reset (Linux `/proc/self/clear_refs`) once the model, optimizer and batch are set up, so
  the transient peak of loading or initialising the model, the same for every method, doesn't mask the step's
  (it is kept in `benchmarks.json` as `setup_peak_rss_bytes`).
- **Step**: median wall time of the timed steps, each forward + backward + optimizer step + `zero_grad`;
  tokens/s = batch × sequence length ÷ step time. The floor has no optimizer step (nothing trains).
- **Ratios** (÷ PEFT LoRA): this method's value divided by PEFT LoRA's at the same LoRA dropout, measured in the
  same run (for full fine-tuning and the floor, PEFT LoRA at the first dropout value).
- **Methods.** Targets are all linear layers of the transformer blocks (`lorafa.targets.DEFAULT_TARGETS`); the
  PEFT baselines get exactly the same module names. Classification heads are trained (`modules_to_save`).
  Optimizer AdamW (PEFT LoRA + create_lorafa_optimizer: PEFT's `LoraFAOptimizer`, which freezes lora_A and
  projects B's gradient). Checkpointing is Hugging Face's per-layer activation checkpointing, non-reentrant.
  The frozen floor has no adapters and its embedding output requires grad: what every frozen layer keeps to
  pass gradients back. "Lean" is LoRA-FA + `lorafa.loss.chunked_causal_lm_loss` (causal LMs only) +
  `lorafa.recompute.enable_cheap_recompute`.
- **Acceptance checks** use dropout 0.05 unless marked; their targets belong to the issues' workloads (issues 5
  and 7: SmolLM2-135M, batch 8 × 256, r=16, fp32 CPU; issue 2: the LLaMA shape at batch 4 × 256); on other
  settings they are shown for reference.
"""


def render_report(rows: list[dict[str, Any]], meta: dict[str, Any], chart: str | None) -> str:
    """The markdown report: settings, machine, date, reproduce command, one section per model, the chart."""
    s = meta["settings"]
    lines = [
        "# Benchmarks: LoRA-FA vs PEFT LoRA, full fine-tuning and activation checkpointing",
        "",
        "<!-- Written by `lorafa bench` (src/lorafa/bench.py); rerun the command below rather than editing. -->",
        "",
        "Reproduce:",
        "",
        f"    {meta['command']}",
        "",
        f"- **Date**: {meta['date']} (took {meta['duration_s'] / 60:.1f} min)",
        f"- **Machine**: {meta['machine']}",
        f"- **Device**: {meta['device']}",
        f"- **Software**: {meta['software']}",
        f"- **Allocator**: {meta['allocator']}",
        f"- **Load**: {meta['load']}",
        *(
            [
                "- **Busy machine**: the load average exceeded the number of cores, so other processes competed "
                "for the CPUs: step times and their ratios are noisy; the memory numbers are not affected."
            ]
            if meta.get("busy")
            else []
        ),
        f"- **Settings**: batch {s['batch']} × {s['seq']} tokens, r={s['r']}, lora_alpha={s['lora_alpha']:g}, "
        f"LoRA dropout {', '.join(f'{p:g}' for p in s['dropout'])}, {s['dtype']} on {s['device']}, "
        f"AdamW lr {s['lr']:g}, {s['warmup']} warm-up + {s['steps']} timed steps, {s['repeats']} repeat(s), "
        f"torch threads per worker: {s['threads'] or f'default ({torch.get_num_threads()})'}, seed {s['seed']}",
        "",
        _METHOD_NOTES,
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += _model_section([r for r in rows if r["model"] == model], model)
    if chart:
        lines += [f"![peak memory and step time per method]({chart})", ""]
    return "\n".join(lines)


def write_chart(rows: list[dict[str, Any]], path: Path) -> bool:
    """A PNG with, per model, peak memory (RSS, live tensors, saved) and step time per method. False if no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [
        m
        for m in dict.fromkeys(r["model"] for r in rows)
        if any(r["model"] == m and r.get("status") == "ok" for r in rows)
    ]
    if not models:
        return False
    sizes = [sum(1 for r in rows if r["model"] == m and r.get("status") == "ok") for m in models]
    fig, axes = plt.subplots(
        len(models),
        2,
        figsize=(13, sum(0.42 * n + 1.4 for n in sizes)),
        squeeze=False,
        gridspec_kw={"height_ratios": sizes, "width_ratios": [3, 2]},
    )
    for (ax_mem, ax_time), model in zip(axes, models, strict=True):
        ok = [r for r in rows if r["model"] == model and r.get("status") == "ok"]
        names = [_row_name(r) for r in ok]
        ys = range(len(ok))
        series = [("peak RSS", "peak_rss_bytes"), ("peak live tensors", "peak_live_bytes")]
        series += [("saved for backward", "saved_bytes")]
        for k, (label, key) in enumerate(series):
            values = [(r.get(key) or 0) / MIB for r in ok]
            ax_mem.barh([y + (k - 1) * 0.27 for y in ys], values, height=0.27, label=label)
        ax_mem.set_yticks(list(ys), names, fontsize=8)
        ax_mem.invert_yaxis()
        ax_mem.set_xlabel("MiB")
        ax_mem.set_title(f"{model}: memory", fontsize=10)
        ax_mem.legend(fontsize=7)
        ax_time.barh(list(ys), [r["step_s"] for r in ok], color="tab:gray")
        ax_time.set_yticks(list(ys), [""] * len(ok))
        ax_time.invert_yaxis()
        ax_time.set_xlabel("seconds per step (median)")
        ax_time.set_title(f"{model}: step time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(rows: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path) -> Path:
    """Write `BENCHMARKS.md`, `benchmarks.png` and `benchmarks.json` into `out_dir`; return the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "benchmarks.png"
    has_chart = [False]

    def chart(tmp: Path) -> None:
        has_chart[0] = write_chart(rows, tmp)
        if not has_chart[0]:
            tmp.write_bytes(b"")

    atomic_write(png, chart)
    if not has_chart[0]:
        png.unlink()
    md = out_dir / "BENCHMARKS.md"
    text = render_report(rows, meta, png.name if has_chart[0] else None)
    atomic_write(md, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    payload = {"meta": meta, "rows": rows}
    atomic_write(out_dir / "benchmarks.json", lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
    return md


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table for the terminal."""
    head = f"{'model':<13} {'method':<58} {'saved':>9} {'live':>9} {'RSS':>9} {'step s':>8} {'tok/s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        name = _row_name(r)
        if r.get("status") != "ok":
            lines.append(f"{r['model']:<13} {name:<58} {r.get('status')}: {r.get('error', '')}"[:200])
            continue
        lines.append(
            f"{r['model']:<13} {name:<58} {_mib(r['saved_bytes']):>9} {_mib(r['peak_live_bytes']):>9} "
            f"{_mib(r['peak_rss_bytes']):>9} {r['step_s']:>8.3f} {r['tokens_per_s']:>8.0f}"
        )
    return "\n".join(lines) + "\n(memory in MiB)"
