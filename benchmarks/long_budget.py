"""Issue 6's comparisons at a longer budget than the study's: LoRA vs LoRA-FA (vs full fine-tuning).

The same settings as `run_study.py` (each part's model, adapters, schedule, batch size, dev and test files: every
run starts from the study's own `config.yaml` with only the overrides below), but more training data, one pass:

* encoder: MiniLM-L6 on Rotten Tomatoes, 9,600 reviews (600 steps, 5x the study), LoRA / LoRA-FA / full FT.
* decoder: SmolLM2-135M-Instruct on chatterbot, every distinct prompt outside dev and test: 935 pairs (468 steps,
  3.9x the study), LoRA / LoRA-FA.

The training rows are the study's shuffle order minus every row whose text is also in its dev or test files (so
the study's own training rows come first). Protocol, cheaper than the study's (2 CPU cores): each method's learning
rate is chosen on dev with seed 0 (the study's dev-best lr and a neighbour); seeds 1 and 2 are then trained at the
chosen lr; the three chosen runs are evaluated once on test.

    python benchmarks/long_budget.py [--part encoder] [--jobs 2]

Needs the study's files (`python benchmarks/run_study.py --part PART` writes runs/study/PART). Finished runs are
reused. Prints the table and writes WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lorafa.study import _atomic_write, mean_std
from lorafa.study_plans import chatterbot_rows, rotten_tomatoes_rows

PARTS: dict[str, dict[str, Any]] = {
    "encoder": {
        "grid": {"lora": [1e-3, 2e-3], "lora-fa": [2e-3, 5e-3], "full": [1e-4, 3e-4]},
        "n_train": 9600, "rows": rotten_tomatoes_rows, "work": "runs/study-long", "seeds": (0, 1, 2),
        "metric": "eval_accuracy", "higher": True, "overrides": [], "report": ["eval_accuracy", "eval_f1"],
    },
    # 1,015 distinct prompts (lorafa.study_plans.chatterbot_rows) minus the study's 40 dev and 40 test pairs: all
    # the rest. The grids first bracketed each method's study (1x) choice, 2e-3 for both; LoRA-FA was then best at
    # its top lr (5e-3) on dev, so 1e-2 was added before any seed beyond 0 or any test evaluation of LoRA-FA.
    "decoder": {
        "grid": {"lora": [1e-3, 2e-3], "lora-fa": [1e-3, 2e-3, 5e-3, 1e-2]},
        "n_train": 935, "rows": chatterbot_rows, "work": "runs/study-long-decoder", "seeds": (0, 1, 2),
        "metric": "eval_loss", "higher": False, "overrides": [], "report": ["eval_loss", "eval_perplexity"],
    },
}  # fmt: skip


def write_train(study: Path, work: Path, rows: list[dict[str, Any]], n: int) -> Path:
    """`n` rows in the study's shuffle order, none of them in its dev or test files."""
    path = work / "train.jsonl"
    if path.exists():
        return path
    held = set()
    for split in ("dev", "test"):
        held |= set((study / f"{split}.jsonl").read_text().splitlines(keepends=True))
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)  # the study's order (lorafa.study_plans.write_splits)
    lines = [json.dumps(rows[i], ensure_ascii=False) + "\n" for i in order]
    train = [line for line in lines if line not in held][:n]
    if len(train) < n:
        raise ValueError(f"only {len(train)} rows are left outside dev and test; {n} asked")
    work.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, "".join(train).encode())
    return path


def train(base: Path, overrides: list[str], out: Path, method: str, lr: float, seed: int) -> dict[str, Any]:
    if not (out / "metrics.json").exists():
        args = [str(base), *overrides, f"method={method}", f"lr={lr}", f"seed={seed}", f"adapter.init_seed={seed}",
                f"output_dir={out}"]  # fmt: skip
        log = out.parent.parent / "logs" / f"{out.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            done = subprocess.run([sys.executable, "-m", "lorafa.cli", "train", *args], stdout=f,
                                  stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{out.name} failed; see {log}")
    print(f"done {out.name}", flush=True)
    return {**json.loads((out / "metrics.json").read_text()), "run_dir": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=sorted(PARTS), default="encoder")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    part = PARTS[args.part]
    study, work = Path("runs/study") / args.part, Path(part["work"])
    base = study / "runs" / "lora_lr0.002_seed0" / "config.yaml"  # the study's settings for this part
    train_file = write_train(study, work, part["rows"](), part["n_train"])
    overrides = [f"data.train_file={train_file}", f"data.eval_file={study / 'dev.jsonl'}", *part["overrides"]]
    pool = ThreadPoolExecutor(args.jobs)
    grid, metric, sign = part["grid"], part["metric"], 1 if part["higher"] else -1

    def run(method: str, lr: float, seed: int) -> Future[dict[str, Any]]:
        out = work / "runs" / f"{method}_lr{lr:g}_seed{seed}"
        return pool.submit(train, base, overrides, out, method, lr, seed)

    sweep = {(m, lr): run(m, lr, 0) for m, lrs in grid.items() for lr in lrs}
    chosen = {
        m: max(lrs, key=lambda lr, m=m: sign * sweep[m, lr].result()[metric]) for m, lrs in grid.items()
    }
    later = {(m, s): run(m, chosen[m], s) for m in grid for s in part["seeds"] if s != 0}
    from lorafa.evaluate import evaluate_run

    results: dict[str, Any] = {
        "part": args.part,
        "n_train": part["n_train"],
        "chosen_lr": chosen,
        "dev": {},
        "test": {},
    }
    for (m, lr), fut in sweep.items():
        results["dev"][f"{m} {lr:g}"] = fut.result()[metric]
    for m in grid:
        runs = [sweep[m, chosen[m]].result()] + [later[m, s].result() for s in part["seeds"] if s != 0]
        tests = [evaluate_run(r["run_dir"], eval_file=str(study / "test.jsonl")) for r in runs]
        results["test"][m] = {
            "lr": chosen[m],
            **{k: [t[k] for t in tests] for k in tests[0] if k.startswith("eval_")},
            "train_runtime_s": [r["train_runtime_s"] for r in runs],
            "peak_memory_bytes": [r["peak_memory_bytes"] for r in runs],
            "trainable_params": runs[0]["trainable_params"],
        }
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"dev ({metric}, seed 0):", {k: round(v, 4) for k, v in results["dev"].items()})
    keys = part["report"]
    for m, r in results["test"].items():
        cols = ", ".join(
            f"{k[5:]} {mean_std(r[k])[0]:.4f} ± {mean_std(r[k])[1]:.4f} {[round(v, 4) for v in r[k]]}"
            for k in keys
        )
        t, mem = mean_std(r["train_runtime_s"]), max(r["peak_memory_bytes"]) / 2**30
        print(f"{m:8s} lr {r['lr']:g}: test {cols}; train {t[0]:.0f} ± {t[1]:.0f} s, peak RSS {mem:.2f} GiB, "
              f"{r['trainable_params']:.0f} trainable")  # fmt: skip


if __name__ == "__main__":
    main()
