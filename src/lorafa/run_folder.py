"""A run's output folder: what a run writes there, whether a new or resumed run may write there, and its log.

`check_output_dir` runs before any work; `clear_outputs` removes an earlier run's outputs; `TrainLog` writes
train_log.jsonl (and TensorBoard); `plot_losses` draws loss.png from it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from lorafa.checkpoint import list_checkpoints

logger = logging.getLogger(__name__)

# What a run writes into its output_dir; an earlier run's are removed when a new one (not a resume) starts there.
# (TensorBoard's event files stay: the writer is already open, and TensorBoard tells runs apart by time.)
RUN_OUTPUTS = ("adapter", "checkpoints", "metrics.json", "loss.png", "labels.json", "config.yaml")


def is_run_folder(out: Path) -> bool:
    """Whether `out` holds a lorafa run's outputs: a started run writes train_log.jsonl first. (A config.yaml alone
    does not make one: it may be the user's own, which a run would overwrite.)"""
    return (out / "train_log.jsonl").is_file() or (out / "metrics.json").is_file()


def run_of_checkpoint(checkpoint: Path) -> Path | None:
    """The run folder of `RUN/checkpoints/checkpoint-N`, resolved; None for a checkpoint kept elsewhere."""
    return checkpoint.resolve().parent.parent if checkpoint.resolve().parent.name == "checkpoints" else None


def check_output_dir(out: Path, checkpoint: Path | None) -> None:
    """Raise ValueError when a run (resumed from `checkpoint`, or new) may not write its outputs to `out`.

    Allowed: a new or empty folder, a folder of other files that holds none of the names a run writes, the run
    being resumed, and a finished run or one without checkpoints (replaced, with a warning). Refused: a file, a
    folder that cannot be written, an unfinished run with checkpoints (rerunning a command without `resume` would
    delete them), and a folder that is not a run but holds names a run writes (adapter/, config.yaml, ...).
    """
    if out.is_symlink() and not out.exists():
        raise ValueError(f"output_dir: {out} is a symbolic link to nothing ({os.readlink(out)})")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir: {out} is a file, not a folder")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir: cannot create or write {out} ({existing} is not a writable folder)")
    if not out.is_dir() or (checkpoint is not None and run_of_checkpoint(checkpoint) == out.resolve()):
        return
    if is_run_folder(out):
        saved = list_checkpoints(out) if not (out / "metrics.json").is_file() else []
        if saved:
            raise ValueError(
                f"output_dir: {out} holds an unfinished run with checkpoints (the last: {saved[-1].name}); "
                f"resume={out} continues it, or delete the folder (or choose another output_dir) to start over"
            )
        return
    clash = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if clash:
        raise ValueError(
            f"output_dir: {out} is not a lorafa run folder but holds {clash}, which a run writes; choose a new or "
            "empty folder"
        )


def read_metrics(path: Path) -> dict[str, float]:
    try:
        return dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to let the run write it again") from None


def clear_outputs(out: Path) -> None:
    """Remove an earlier run's outputs from `out` (`check_output_dir` allowed it: a run folder, or none of them)."""
    if (out / "metrics.json").exists():
        logger.warning(
            "output_dir %s holds a finished run; replacing it (resume=%s would continue it)", out, out
        )
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class TrainLog:
    """train_log.jsonl (one JSON object per line: training records and evaluations), mirrored to TensorBoard."""

    def __init__(self, path: Path, enabled: bool, tensorboard: bool = False) -> None:
        self.path, self.enabled = path, enabled
        self.writer = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError(
                    "tensorboard: true needs the tensorboard package (pip install tensorboard)"
                ) from e
            self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def reset(self) -> None:
        """Start an empty log: its presence marks the folder as a run's (`is_run_folder`) from the start."""
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after a resumed checkpoint (the resumed run writes them again)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line) if line else None
            except json.JSONDecodeError:
                logger.warning("%s: dropped a line that is not JSON (an interrupted write?): %.60s", self.path, line)
                continue
            if isinstance(record, dict) and record.get("step", step + 1) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(
                        key if key.startswith("eval_") else f"train/{key}", value, record["step"]
                    )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a train_log.jsonl ([] when there is none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(log_path: Path, png: Path) -> None:
    """loss.png: training loss per logged step and eval loss per evaluation (matplotlib, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_log(log_path)
    train_pts = [(r["step"], r["loss"]) for r in records if "loss" in r]
    eval_pts = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train_pts:
        ax.plot(*zip(*train_pts, strict=True), label="train loss")
    if eval_pts:
        ax.plot(*zip(*eval_pts, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
