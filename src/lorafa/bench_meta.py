"""Where and how a `lorafa bench` run happened, for the report's header: machine, device, software, allocator,
load averages and the command that reproduces it (`run_metadata`, `default_command`)."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lorafa.bench_settings import BenchSettings, malloc_env

__all__ = ["default_command", "load_averages", "run_metadata"]


def _busy(loadavg: str) -> bool:
    """Whether the 1-minute load average exceeds the number of cores: other work competes for the CPUs."""
    try:
        return float(loadavg.split()[0]) > (os.cpu_count() or 1)
    except (ValueError, IndexError):
        return False


def load_averages() -> str:
    """The 1/5/15-minute load averages as text, or "n/a"."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> str:
    try:
        return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        return "RAM n/a"


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


def default_command(settings: BenchSettings, out_dir: str | Path | None = None) -> str:
    """The `python -m lorafa.bench ...` command line equivalent to `settings` (writing to `out_dir`)."""
    parts = ["python", "-m", "lorafa.bench", "--models", *settings.models, "--methods", *settings.methods]
    parts += ["--batch", str(settings.batch), "--seq", str(settings.seq), "--steps", str(settings.steps)]
    parts += ["--warmup", str(settings.warmup), "--dropout", *(f"{p:g}" for p in settings.dropout)]
    parts += ["--r", str(settings.r), "--lora-alpha", f"{settings.lora_alpha:g}"]
    parts += ["--device", settings.device, "--dtype", settings.dtype, "--repeats", str(settings.repeats)]
    parts += ["--allocator", settings.allocator]
    if out_dir is not None:
        parts += ["--out-dir", str(out_dir)]
    if settings.threads:
        parts += ["--threads", str(settings.threads)]
    return shlex.join(parts)


def run_metadata(
    settings: BenchSettings, started: datetime.datetime, load_start: str, command: str
) -> dict[str, Any]:
    """The report's header: command, date and duration, machine, device, software, allocator, load, settings."""
    device = settings.resolved_device()
    if device == "cuda":
        device_line = f"CUDA: {torch.cuda.get_device_name(0)} (peak memory = torch.cuda.max_memory_allocated)"
    else:
        device_line = "CPU only: no CUDA device was available, so CUDA peak memory and bf16 timings are not recorded here"
    malloc = malloc_env(settings.allocator)
    if malloc is None:
        inherited = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
        allocator = f"glibc malloc, environment inherited ({_env_text(inherited)})"
    else:
        allocator = f"glibc malloc with {_env_text(malloc)} in every worker's environment"
        allocator += (
            " (what `lorafa train` uses on CPU, lorafa.allocator)" if settings.allocator == "lorafa" else ""
        )
    return {
        "command": command,
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "machine": f"{_cpu_name()}, {os.cpu_count()} logical cores, {_ram_gib()}, {platform.platform()}",
        "device": device_line,
        "software": f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{_version('transformers')}, peft {_version('peft')}, lorafa {_version('lorafa')}",
        "allocator": allocator,
        "load": f"{load_start} at start, {load_averages()} at end (1/5/15-min load averages)",
        "busy": _busy(load_start) or _busy(load_averages()),
        "settings": asdict(settings) | {"device": device, "dtype": settings.resolved_dtype()},
    }


def _env_text(env: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(env.items())) or "no MALLOC_* variables: glibc's defaults"
