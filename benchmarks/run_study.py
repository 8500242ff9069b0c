"""Issue 6's accuracy study: full FT, LoRA and LoRA-FA (± projection, half the layers) on the same budget.

Runs `lorafa.study.run_study` and writes docs/RESULTS.md, docs/study_*.png and, next to the runs, study.json.

    python benchmarks/run_study.py                       # the whole study (~35 min on 2 CPU cores)
    python benchmarks/run_study.py --part encoder --seeds 3
    python benchmarks/run_study.py --smoke               # tiny random-init models (what tests/test_study.py runs)

Each run is a `lorafa train` run in a process of its own (forked from a server that has imported the libraries),
so its time and peak memory are its own; `--in-process` runs them all in this process instead.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from lorafa.study import PARTS, StudyConfig, run_study
from lorafa.study_report import results_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part", choices=[*PARTS, "all"], default="all", help="which part to run (default all)"
    )
    parser.add_argument(
        "--seeds", type=int, help="seeds per setting of the encoder part (default 3; 2 with --smoke)"
    )
    parser.add_argument(
        "--budget", type=float, default=1.0, help="scale of every part's training examples, steps and tokens"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny random-init models on generated data")
    parser.add_argument(
        "--work-dir", default=None, help="runs and data (default runs/study, runs/study-smoke)"
    )
    parser.add_argument(
        "--docs-dir", default="docs", help="where RESULTS.md and the charts go (default docs)"
    )
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's default)")
    parser.add_argument("--in-process", action="store_true", help="run everything in this process")
    parser.add_argument(
        "--reuse", action="store_true", help="keep finished runs whose folder holds the same config (resume)"
    )
    args = parser.parse_args(argv)

    work = args.work_dir or ("runs/study-smoke" if args.smoke else "runs/study")
    cfg = StudyConfig(
        parts=list(PARTS) if args.part == "all" else [args.part],
        seeds=args.seeds,
        budget=args.budget,
        smoke=args.smoke,
        work_dir=work,
        docs_dir=args.docs_dir,
        isolate=not args.in_process,
        threads=args.threads,
        reuse=args.reuse,
        command=shlex.join(["python", "benchmarks/run_study.py", *(sys.argv[1:] if argv is None else argv)]),
    )
    try:
        cfg.validate()
    except ValueError as e:
        parser.error(str(e))
    results = run_study(cfg)
    (Path(work) / "study.json").write_text(json.dumps(results_json(results), indent=1) + "\n")
    print(f"wrote {Path(args.docs_dir) / 'RESULTS.md'} and {Path(work) / 'study.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
