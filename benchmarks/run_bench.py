"""Issue 5/7 benchmark: memory and speed of lorafa LoRA-FA vs PEFT LoRA, full fine-tuning and checkpointing.

A thin wrapper over `lorafa.bench` (the same as `lorafa bench` / `python -m lorafa.bench`); see `--help`.
Each method runs in its own fresh process; the report goes to docs/BENCHMARKS.md and docs/benchmarks.png.

The acceptance run of issues 5 and 7 (SmolLM2-135M, batch 8 x 256, r=16, fp32 CPU; about 1.5 h on 2 cores):

    python benchmarks/run_bench.py --models smollm2-135m --batch 8 --seq 256 --dropout 0.05 0
"""

from __future__ import annotations

import sys

from lorafa.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
