"""The planner's output: the plain-text table of a `run_planner` report with its notes (`format_table`) and the
stacked-bar chart per method (`plot_report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafa.files import atomic_write
from lorafa.planner_args import format_bytes

__all__ = ["format_table", "plot_report"]


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of `report` (from `run_planner`), with its notes."""
    s = report["settings"]
    lines = [
        f"{report['model']} ({report['model_type']}, {report['task']}): batch {s['batch_size']} × seq "
        f"{s['seq_len']}"
        + (f" (targets {s['target_len']})" if s["target_len"] else "")
        + f", {s['dtype']}, r={s['r']}, dropout {s['lora_dropout']}, attention {s['attention']}, "
        f"device {s['device']}" + "".join(f", {o}" for o in _option_names(s)),
    ]
    search_key = None
    if report["gpu_memory"] is not None:
        search_key = "max_batch_size" if report["search"] == "batch" else "max_seq_len"
        lines.append(f"budget {format_bytes(report['gpu_memory'])}")
    header = ["method", "ckpt", "trainable", "weights", "grads+optim", "activations", "total"]
    offloading = s["offload_min_bytes"] is not None
    if offloading:
        header.append("host (offloaded)")
    if search_key:
        header.append("max batch" if report["search"] == "batch" else "max seq")
    rows = [header]
    for e in report["methods"]:
        row = [
            e["method"],
            "on" if e["checkpointing"] else "off",
            f"{e['trainable_params'] / 1e6:.2f}M",
            format_bytes(e["weights"]),
            format_bytes(e["grads"] + e["optimizer_states"] + e["master_weights"]),
            format_bytes(e["activations"]),
            format_bytes(e["total"]),
        ]
        if offloading:
            row.append(format_bytes(e["activations_offloaded"]))
        if search_key:
            row.append(str(e[search_key]))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.extend(f"- {n}" for n in report["notes"])
    return "\n".join(lines)


def _option_names(settings: dict[str, Any]) -> list[str]:
    """The below-the-floor options a report's settings turn on, e.g. ["chunked loss", "offload"]."""
    names = [("chunked_loss", "chunked loss"), ("cheap_recompute", "cheap recompute")]
    out = [label for key, label in names if settings[key]]
    if settings["offload_min_bytes"] is not None:
        out.append("offload")
    return out


def plot_report(report: dict[str, Any], path: str) -> None:
    """Stacked bars per method (weights / grads + optimizer states / activations) written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = report["methods"]
    labels = [e["method"] + (" +ckpt" if e["checkpointing"] else "") for e in entries]
    gib = 2**30
    weights = [e["weights"] / gib for e in entries]
    optim = [(e["grads"] + e["optimizer_states"] + e["master_weights"]) / gib for e in entries]
    acts = [e["activations"] / gib for e in entries]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(entries)), 4.5))
    x = range(len(entries))
    ax.bar(x, weights, label="weights")
    ax.bar(x, optim, bottom=weights, label="grads + optimizer states")
    ax.bar(x, acts, bottom=[a + b for a, b in zip(weights, optim, strict=True)], label="activations")
    if report["gpu_memory"] is not None:
        ax.axhline(report["gpu_memory"] / gib, color="k", linestyle="--", linewidth=1, label="budget")
    ax.set_xticks(list(x), labels, rotation=30, ha="right")
    ax.set_ylabel("GiB")
    s = report["settings"]
    options = "".join(f", {o}" for o in _option_names(s))
    ax.set_title(
        f"{report['model']}: batch {s['batch_size']} × {s['seq_len']}, {s['dtype']}, r={s['r']}{options}"
    )
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)
