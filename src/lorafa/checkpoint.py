"""Resumable training checkpoints: trained weights, optimizer, scheduler, RNG states and the data position.

A checkpoint is a folder `output_dir/checkpoints/checkpoint-<step>` holding

    adapter/               the adapter (PEFT format, `lorafa.save_adapter`), or model.pt for method full
    optimizer.pt           optimizer.state_dict()
    scheduler.pt           scheduler.state_dict()
    rng_state_<rank>.pt    python, numpy, torch CPU (and CUDA) generator states of each process
    trainer_state.json     step, epoch, batch position within the epoch, and bookkeeping

It is written under a temporary name and renamed when complete, so a crash never leaves a half-written
checkpoint that `resume` could pick up. Restoring all of the above makes a resumed run on CPU bit-identical to an
uninterrupted one: the data order is a function of (seed, epoch), and dropout draws from the restored generators.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorafa.adapter import load_adapter, save_adapter

STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current pass over the data (0-based)."""
    batch_in_epoch: int = 0
    """Per-process batches of the current epoch already consumed."""
    tokens_seen: int = 0
    """Input tokens processed so far, over all processes."""
    initial_metrics: dict[str, float] = field(default_factory=dict)
    """Evaluation before training (reported as initial_* in metrics.json)."""


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator training draws from (python, numpy, torch CPU and CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the generators back to a `capture_rng_state` result."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    full: bool,
    optimizer: Any,
    scheduler: Any,
    state: TrainState,
    rank: int,
    is_main: bool,
    barrier: Any,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `folder` atomically; every process calls it (each writes its own RNG state).

    Args:
        folder: Final path, e.g. output_dir/checkpoints/checkpoint-100.
        model: The unwrapped model.
        full: Method full (save the whole state dict) rather than the adapter.
        optimizer: Its state_dict() is saved.
        scheduler: Its state_dict() is saved.
        state: The data position and bookkeeping.
        rank: This process's index.
        is_main: Whether this process writes the shared files.
        barrier: Callable that waits for every process.
        extra: More JSON-serialisable fields for trainer_state.json.
    """
    tmp = folder.with_name(f".tmp-{folder.name}")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(capture_rng_state(), tmp / f"rng_state_{rank}.pt")
    if is_main:
        if full:
            torch.save(model.state_dict(), tmp / "model.pt")
        else:
            save_adapter(model, tmp / "adapter")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_NAME).write_text(json.dumps({**asdict(state), **(extra or {})}, indent=2) + "\n")
    barrier()
    if is_main:
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    barrier()
    return folder


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints under `folder`/checkpoints, oldest first."""
    root = folder / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT_RE.fullmatch(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_NAME).is_file()]


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint `resume` names: the folder itself, or the newest checkpoint of an output_dir.

    Raises:
        FileNotFoundError: `path` does not exist or holds no checkpoint.
    """
    p = Path(path).expanduser()
    if (p / STATE_NAME).is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"resume: no such folder: {p}")
    found = list_checkpoints(p)
    if not found:
        raise FileNotFoundError(
            f"resume: {p} is neither a checkpoint (no {STATE_NAME}) nor an output_dir with checkpoints/; "
            "checkpoints are written when checkpoint_every > 0"
        )
    return found[-1]


def read_state(folder: Path) -> tuple[TrainState, dict[str, Any]]:
    """(TrainState, the whole trainer_state.json) of a checkpoint."""
    raw = json.loads((folder / STATE_NAME).read_text())
    known = TrainState.__dataclass_fields__
    return TrainState(**{k: v for k, v in raw.items() if k in known}), raw


def load_checkpoint(folder: Path, model: nn.Module, full: bool, optimizer: Any, scheduler: Any) -> TrainState:
    """Load weights, optimizer and scheduler state from `folder` into the given objects; returns the position.

    RNG states are restored separately (`load_rng_state`), as the very last thing before training continues.
    """
    if full:
        model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    else:
        load_adapter(model, folder / "adapter")
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))
    state, _ = read_state(folder)
    return state


def load_rng_state(folder: Path, rank: int) -> None:
    """Restore this process's generators from a checkpoint."""
    path = folder / f"rng_state_{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"resume: {path} is missing; the checkpoint was written by fewer processes than this run uses"
        )
    restore_rng_state(torch.load(path, weights_only=False))
