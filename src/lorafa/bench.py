"""`lorafa bench`: memory and speed of LoRA-FA side by side with PEFT LoRA, full fine-tuning and checkpointing.

Every (model, method, LoRA dropout) runs in its own fresh worker process (`python -m lorafa.bench --worker JOB`,
one JSON result on stdout), one after the other, so that one method's allocations cannot hide another's peak and
every method starts from the same empty heap (issue 5). All workers get the same allocator setting: by default
the glibc malloc thresholds `lorafa train` uses on CPU (`lorafa.allocator`), because with glibc's default a freed
large block stays in the heap and peak RSS then measures fragmentation rather than the method (issue 5 measured
one LoRA-FA step at 6.9 GiB by default and 3.9 GiB with `MALLOC_MMAP_THRESHOLD_=65536`).

The parent expands `BenchSettings` into one `Job` per (model, method, dropout), runs each in a worker and takes
the medians over repeats, pairs every method with PEFT LoRA at the same dropout, writes `BENCHMARKS.md`, a PNG
chart and the raw results as JSON, and prints the table.

This file holds the parent and the command line (`run_benchmark`, `bench_main`, `main`); the parts live in
`bench_models` (models and methods), `bench_settings` (settings, jobs, worker allocator), `bench_worker` (one
measurement), `bench_checks` (ratios, acceptance checks), `bench_meta` (machine and command for the report)
and `bench_report` (markdown, chart, JSON, terminal table). The public names stay importable from here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lorafa.bench_checks import add_ratios as _add_ratios
from lorafa.bench_checks import checks
from lorafa.bench_meta import default_command, load_averages, run_metadata
from lorafa.bench_models import DEFAULT_METHODS, METHODS, MODELS
from lorafa.bench_report import format_table, workload_note, write_report
from lorafa.bench_settings import ALLOCATORS, BenchSettings, Job, malloc_env
from lorafa.bench_worker import RESULT_PREFIX, run_job, worker_main

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "MODELS",
    "BenchSettings",
    "Job",
    "add_bench_subparser",
    "bench_main",
    "checks",
    "main",
    "malloc_env",
    "run_benchmark",
    "run_job",
]


# ---- the parent: spawn workers, aggregate ----------------------------------------------------------------------
def _jobs(settings: BenchSettings) -> list[Job]:
    common: dict[str, Any] = {
        k: getattr(settings, k) for k in ("batch", "seq", "steps", "warmup", "r", "lora_alpha")
    }
    common |= {"lr": settings.lr, "seed": settings.seed, "threads": settings.threads}
    common |= {"device": settings.resolved_device(), "dtype": settings.resolved_dtype()}
    return [
        Job(model=model, method=method, dropout=p, **common)
        for model in settings.models
        for method in settings.methods
        for p in (settings.dropout if METHODS[method].uses_dropout else [None])
    ]


def _worker_env(settings: BenchSettings) -> dict[str, str]:
    env = dict(os.environ)
    malloc = malloc_env(settings.allocator)
    if malloc is not None:
        env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")} | malloc
    # Workers must import this very lorafa, also when it is run from a source tree that isn't installed.
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _spawn(job: Job, settings: BenchSettings) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "lorafa.bench", "--worker", json.dumps(asdict(job))]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=_worker_env(settings), timeout=settings.timeout
        )
    except subprocess.TimeoutExpired:
        return {**asdict(job), "status": "error", "error": f"timed out after {settings.timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if lines:
        return dict(json.loads(lines[-1][len(RESULT_PREFIX) :]))
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
    return {**asdict(job), "status": "error", "error": f"worker {why}: {tail}"}


_MEDIAN_KEYS = (
    "setup_peak_rss_bytes",
    "saved_bytes",
    "peak_rss_bytes",
    "rss_after_setup_bytes",
    "cuda_peak_allocated_bytes",
    "peak_live_bytes",
    "step_s",
    "setup_s",
)


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the repeats of a job: the median of each metric over the successful repeats."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return runs[-1]
    row = dict(ok[0])
    for key in _MEDIAN_KEYS:
        values = [r[key] for r in ok if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    row["step_times_s"] = [t for r in ok for t in r["step_times_s"]]
    row["peak_rss_bytes"] = int(row["peak_rss_bytes"])
    row["tokens_per_s"] = row["batch"] * row["seq"] / row["step_s"]
    row["repeats"] = len(ok)
    return row


def run_benchmark(
    models: Sequence[str],
    methods: Sequence[str],
    batch: int,
    seq: int,
    steps: int,
    dropout: float | Sequence[float],
    out_dir: str | Path | None,
    *,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Run every (model, method, dropout) in its own worker process and write the report.

    Args:
        models: Names from `MODELS`.
        methods: Names from `METHODS`.
        batch: Sequences per step.
        seq: Tokens per sequence.
        steps: Timed steps per method.
        dropout: LoRA dropout value(s); each adapter method runs once per value.
        out_dir: Folder for `BENCHMARKS.md`, `benchmarks.png` and `benchmarks.json`; None writes nothing.
        command: The command line to print as "reproduce" in the report (default: the equivalent
            `python -m lorafa.bench ...`).
        log: Progress lines (default: stderr).
        **options: Further `BenchSettings` fields (warmup, r, lora_alpha, lr, device, dtype,
            allocator, threads, repeats, timeout, seed).

    Returns:
        One dict per (model, method, dropout), in run order: the job's settings, `status` ("ok" or "error"),
        and for "ok" the metrics (`saved_bytes`, `peak_live_bytes`, `peak_rss_bytes`, `cuda_peak_allocated_bytes`,
        `step_s`, `tokens_per_s`, `trainable_params`, ...) and ratios to PEFT LoRA at the same dropout
        (`vs_peft`: metric name -> this ÷ PEFT LoRA).

    Raises:
        ValueError: An unknown model/method or an invalid setting (the message names the option).
    """
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file, not a folder")  # before hours of workers, not after
    drop = [float(dropout)] if isinstance(dropout, int | float) else [float(p) for p in dropout]
    settings = BenchSettings(
        models=list(models), methods=list(methods), batch=batch, seq=seq, steps=steps, dropout=drop, **options
    )
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if "smollm2-135m" in settings.models:
        from lorafa.assets import smollm2_model_dir

        smollm2_model_dir()  # convert the GGUF once here, not inside a measured worker
    jobs = _jobs(settings)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = load_averages()
    runs: list[list[dict[str, Any]]] = [[] for _ in jobs]
    for rep in range(settings.repeats):
        # Alternate the order between repeats, so slow drifts in machine load touch all methods alike.
        order = list(range(len(jobs))) if rep % 2 == 0 else list(reversed(range(len(jobs))))
        for n, i in enumerate(order, 1):
            job = jobs[i]
            t = time.perf_counter()
            result = _spawn(job, settings)
            runs[i].append(result)
            what = f"{job.model} {job.method}" + ("" if job.dropout is None else f" p={job.dropout}")
            status = result["status"] if result["status"] != "ok" else f"{result['step_s']:.3f} s/step"
            say(f"[{rep + 1}.{n}/{len(jobs)}] {what}: {status} ({time.perf_counter() - t:.0f} s)")
    rows = [_aggregate(r) for r in runs]
    _add_ratios(rows)
    meta = run_metadata(settings, started, load_start, command or default_command(settings, out_dir))
    if out_dir is not None:
        write_report(rows, meta, Path(out_dir))
    return rows


# ---- command line ---------------------------------------------------------------------------------------------
def _add_arguments(ap: argparse.ArgumentParser) -> None:
    d = BenchSettings()
    ap.add_argument("--models", nargs="+", default=d.models, help="model names (listed above)")
    ap.add_argument("--methods", nargs="+", default=d.methods, help="method names (listed above)")
    ap.add_argument("--batch", type=int, default=d.batch, help="sequences per step")
    ap.add_argument("--seq", type=int, default=d.seq, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=d.steps, help="timed steps per method (median)")
    ap.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps before the timed ones")
    ap.add_argument("--dropout", type=float, nargs="+", default=d.dropout, help="LoRA dropout value(s)")
    ap.add_argument("--r", type=int, default=d.r, help="adapter rank")
    ap.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    ap.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16"])
    ap.add_argument(
        "--allocator",
        default=d.allocator,
        choices=ALLOCATORS,
        help="workers' malloc settings: lorafa (as `lorafa train` on CPU), glibc (defaults) or inherit",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    ap.add_argument("--repeats", type=int, default=d.repeats, help="runs per method, alternating order")
    ap.add_argument("--timeout", type=float, default=d.timeout, help="seconds per worker")
    ap.add_argument(
        "--out-dir",
        type=Path,
        default=Path("runs/bench"),
        help="where BENCHMARKS.md, benchmarks.json and the chart go (default runs/bench; the repository's "
        "docs/BENCHMARKS.md is written with --out-dir docs)",
    )
    ap.add_argument("--no-write", action="store_true", help="print the table only")


_DESCRIPTION = (
    """\
Memory and speed of lorafa LoRA-FA side by side with PEFT LoRA, full fine-tuning and activation checkpointing.
Each (model, method, LoRA dropout) runs in its own fresh process; writes BENCHMARKS.md, benchmarks.png and
benchmarks.json to --out-dir and prints the table.

models:  """
    + ", ".join(MODELS)
    + """
methods: """
    + ", ".join(METHODS)
    + "\n"
)


def add_bench_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to an argparse subparsers object; it sets `run=bench_main` (the CLI's convention)."""
    ap = subparsers.add_parser(
        "bench",
        help="memory and speed benchmark vs PEFT LoRA and full fine-tuning",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(ap)
    ap.set_defaults(run=bench_main)
    return ap


def bench_main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments; print the table. Returns 0, or 1 if a method failed."""
    options = {
        "warmup": args.warmup,
        "r": args.r,
        "lora_alpha": args.lora_alpha,
        "device": args.device,
        "dtype": args.dtype,
        "allocator": args.allocator,
        "threads": args.threads,
        "repeats": args.repeats,
        "timeout": args.timeout,
    }
    try:
        rows = run_benchmark(
            args.models,
            args.methods,
            args.batch,
            args.seq,
            args.steps,
            args.dropout,
            None if args.no_write else args.out_dir,
            **options,
        )
    except ValueError as e:
        print(f"lorafa bench: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    for model in dict.fromkeys(r["model"] for r in rows):
        found = checks(rows, model)
        if found:
            # lorafa's own acceptance targets (its issue tracker's numbers), meant for fixed reference workloads
            row = next(r for r in rows if r["model"] == model)
            print(f"{model}: lorafa's acceptance targets, {workload_note(row, model)}")
        for c in found:
            mark = "met" if c["passed"] else "not met"
            print(f"  {c['check']} = {c['value']:.3f} (target {c['target']}): {mark}")
    if not args.no_write:
        print(f"wrote {args.out_dir / 'BENCHMARKS.md'}")
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m lorafa.bench [options]` (same as `lorafa bench`), or `--worker JOB` for one measurement."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"] and len(argv) == 2:
        return worker_main(argv[1])
    ap = argparse.ArgumentParser(
        prog="python -m lorafa.bench",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(ap)
    return bench_main(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
