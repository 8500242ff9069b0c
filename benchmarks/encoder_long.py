"""Issue 6's encoder comparison at 5x the study's budget: LoRA vs LoRA-FA vs full fine-tuning.

MiniLM-L6 on Rotten Tomatoes as in `run_study.py --part encoder` (same model, adapters r=8/alpha 16 with the head
trained, max_length 48, batch 16, linear schedule, same dev and test files), but one pass over 9,600 reviews
(600 steps) instead of 1,920 (120 steps). Protocol, cheaper than the study's (2 CPU cores):

1. each method's learning rate is chosen on the dev split with seed 0 (LoRA 1e-3/2e-3, LoRA-FA 2e-3/5e-3,
   full 1e-4/3e-4: the study's dev-best at 1x and a neighbour on the side the method usually prefers);
2. seeds 1 and 2 are trained at the chosen lr;
3. the three chosen runs of each method are evaluated once on the test split.

    python benchmarks/encoder_long.py [--work runs/study-long] [--jobs 2]

Needs the study's encoder files (runs/study/encoder/{dev,test}.jsonl: `python benchmarks/run_study.py --part
encoder` writes them). Prints the table and writes WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lorafa.study import mean_std
from lorafa.study_plans import rotten_tomatoes_rows

GRID = {"lora": [1e-3, 2e-3], "lora-fa": [2e-3, 5e-3], "full": [1e-4, 3e-4]}
N_TRAIN = 9600
BASE = [
    "model=asset:all-minilm-l6-v2", "task=classification", "data.text_column=text",
    "data.label_column=category", "data.label_names=[rotten,fresh]", "data.max_length=48", "adapter.r=8",
    "adapter.lora_alpha=16", "adapter.lora_dropout=0.0", "adapter.modules_to_save=[classifier,pooler]",
    "batch_size=16", "epochs=1", "warmup_ratio=0.06", "schedule=linear", "eval_before=false", "eval_every=0",
    "logging_every=10", "eval_batch_size=64", "progress_bar=false",
]  # fmt: skip


def write_train(study: Path, work: Path) -> Path:
    """9,600 reviews in the study's shuffle order, none of them in its dev or test files."""
    path = work / "train.jsonl"
    if path.exists():
        return path
    held = set()
    for split in ("dev", "test"):
        held |= set((study / f"{split}.jsonl").read_text().splitlines(keepends=True))
    rows = rotten_tomatoes_rows()
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)  # the study's order: its 1,920 training reviews come first
    lines = [json.dumps(rows[i], ensure_ascii=False) + "\n" for i in order]
    train = [line for line in lines if line not in held][:N_TRAIN]
    work.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(train))
    tmp.replace(path)
    return path


def train(work: Path, train_file: Path, dev: Path, method: str, lr: float, seed: int) -> dict[str, float]:
    out = work / "runs" / f"{method}_lr{lr:g}_seed{seed}"
    if not (out / "metrics.json").exists():
        args = [*BASE, f"method={method}", f"lr={lr}", f"seed={seed}", f"adapter.init_seed={seed}",
                f"data.train_file={train_file}", f"data.eval_file={dev}", f"output_dir={out}"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        log = (work / "logs").joinpath(out.name + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            done = subprocess.run([sys.executable, "-m", "lorafa.cli", "train", *args], env=env, stdout=f,
                                  stderr=subprocess.STDOUT)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{out.name} failed; see {log}")
    print(f"done {out.name}", flush=True)
    return {**json.loads((out / "metrics.json").read_text()), "run_dir": str(out)}  # type: ignore[dict-item]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/study-long"))
    ap.add_argument("--study", type=Path, default=Path("runs/study/encoder"))
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    dev, test = args.study / "dev.jsonl", args.study / "test.jsonl"
    train_file = write_train(args.study, args.work)
    pool = ThreadPoolExecutor(args.jobs)

    def run(method: str, lr: float, seed: int):  # type: ignore[no-untyped-def]
        return pool.submit(train, args.work, train_file, dev, method, lr, seed)

    sweep = {(m, lr): run(m, lr, 0) for m, lrs in GRID.items() for lr in lrs}
    chosen = {}
    for m, lrs in GRID.items():
        chosen[m] = max(lrs, key=lambda lr: sweep[m, lr].result()["eval_accuracy"])
    later = {(m, s): run(m, chosen[m], s) for m in GRID for s in (1, 2)}
    from lorafa.evaluate import evaluate_run

    results: dict = {"n_train": N_TRAIN, "chosen_lr": chosen, "sweep_dev": {}, "test": {}}
    for (m, lr), fut in sweep.items():
        results["sweep_dev"][f"{m} {lr:g}"] = fut.result()["eval_accuracy"]
    for m in GRID:
        runs = [sweep[m, chosen[m]].result(), later[m, 1].result(), later[m, 2].result()]
        tests = [evaluate_run(r["run_dir"], eval_file=str(test)) for r in runs]
        results["test"][m] = {
            "lr": chosen[m],
            "accuracy": [t["eval_accuracy"] for t in tests],
            "f1": [t["eval_f1"] for t in tests],
            "train_runtime_s": [r["train_runtime_s"] for r in runs],
            "peak_memory_bytes": [r["peak_memory_bytes"] for r in runs],
            "trainable_params": runs[0]["trainable_params"],
        }
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print("dev (seed 0):", {k: round(100 * v, 2) for k, v in results["sweep_dev"].items()})
    for m, r in results["test"].items():
        acc, f1 = mean_std(r["accuracy"]), mean_std(r["f1"])
        t, mem = mean_std(r["train_runtime_s"]), max(r["peak_memory_bytes"]) / 2**30
        print(f"{m:8s} lr {r['lr']:g}: test accuracy {100 * acc[0]:.2f} ± {100 * acc[1]:.2f}, "
              f"macro-F1 {100 * f1[0]:.2f} ± {100 * f1[1]:.2f}, per seed {[round(100 * a, 2) for a in r['accuracy']]}, "
              f"train {t[0]:.0f} ± {t[1]:.0f} s, peak RSS {mem:.2f} GiB, {r['trainable_params']:.0f} trainable")  # fmt: skip


if __name__ == "__main__":
    main()
