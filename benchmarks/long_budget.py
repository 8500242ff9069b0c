"""Issue 6's comparisons at a longer budget than the study's: LoRA vs LoRA-FA (vs full fine-tuning).

The same settings as `run_study.py` (each part's model, adapters, schedule, batch size, dev and test files: every
run starts from the study's own `config.yaml` with only the overrides below), but more training data, one pass:

* encoder: MiniLM-L6 on Rotten Tomatoes, 9,600 reviews (600 steps, 5x the study), LoRA / LoRA-FA / full FT.
* decoder: SmolLM2-135M-Instruct on chatterbot, every distinct prompt outside dev and test: 935 pairs (468 steps,
  3.9x the study), LoRA / LoRA-FA.

The training rows are the study's shuffle order minus every row whose text is also in its dev or test files (so
the study's own training rows come first). Protocol, cheaper than the study's (2 CPU cores): each method's learning
rate is chosen on dev with seed 0 (the study's dev-best lr and a neighbour); seeds 1 and 2 are then trained at the
chosen lr; the three chosen runs are evaluated once on test. Variants (a part's `variants`) train every seed at a
fixed lr and are evaluated on test too; they are reported, not used for the acceptance rows.

    python benchmarks/long_budget.py [--part encoder|decoder] [--jobs 2]
    python benchmarks/long_budget.py --report-only      # rewrite docs/RESULTS_LONG.md from the results.json files

Needs the study's files (`python benchmarks/run_study.py --part PART` writes runs/study/PART). Finished runs are
reused. Prints the table, writes WORK/results.json and regenerates docs/RESULTS_LONG.md from every part's
results.json.
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

import yaml

from lorafa.study import METHODS, _atomic_write, mean_std
from lorafa.study_plans import chatterbot_rows, rotten_tomatoes_rows
from lorafa.study_report import acceptance_from_means, best_on_dev

PARTS: dict[str, dict[str, Any]] = {
    "encoder": {
        "grid": {"lora": [1e-3, 2e-3], "lora-fa": [2e-3, 5e-3], "full": [1e-4, 3e-4], "lora-fa+grad": [2e-3, 5e-3]},
        "n_train": 9600, "rows": rotten_tomatoes_rows, "work": "runs/study-long", "seeds": (0, 1, 2),
        "metric": "eval_accuracy", "higher": True, "overrides": [], "report": ["eval_accuracy", "eval_f1"],
    },
    # 1,015 distinct prompts (lorafa.study_plans.chatterbot_rows) minus the study's 40 dev and 40 test pairs: all
    # the rest. The grids first bracketed each method's study (1x) choice, 2e-3 for both; LoRA-FA was then best at
    # its top lr (5e-3) on dev, so 1e-2 was added before any seed beyond 0 or any test evaluation of LoRA-FA.
    # lora-fa+grad (A from the gradient, `init_lora_weights: gradient`; both parts) was added in a later session,
    # with its own sweep: its study (1x) choice, 2e-3, and LoRA-FA's 3.9x choice, 5e-3; 2e-3 came out best, at the
    # bottom, so the next session added 1e-3 (its test loss at 2e-3 had been read by then). That session also gave
    # lora-fa-2r (twice the rank, random A: LoRA's number of trainable parameters), until then a variant at 2e-3,
    # a sweep of its own (5e-3 had been tried on dev outside this script, runs-extra: moved in as it was), and added
    # lora-fa+inputs (A from the inputs' principal directions) at the gradient A's and plain LoRA-FA's choices.
    "decoder": {
        "grid": {"lora": [1e-3, 2e-3], "lora-fa": [1e-3, 2e-3, 5e-3, 1e-2], "lora-fa+grad": [1e-3, 2e-3, 5e-3],
                 "lora-fa-2r": [1e-3, 2e-3, 5e-3], "lora-fa+inputs": [2e-3, 5e-3]},
        "n_train": 935, "rows": chatterbot_rows, "work": "runs/study-long-decoder", "seeds": (0, 1, 2),
        "metric": "eval_loss", "higher": False, "overrides": [], "report": ["eval_loss", "eval_perplexity"],
        # lora-fa-2r+grad (added with lora-fa+grad): twice the rank with A from the gradient, at the lr both chose
        # (2e-3); informative only.
        "variants": {"lora-fa-2r+grad": {"method": "lora-fa", "lr": 2e-3,
                                         "overrides": ["adapter.r=16", "adapter.lora_alpha=32",
                                                       "adapter.init_lora_weights=gradient"]}},
    },
}  # fmt: skip
REPORT = Path("docs/RESULTS_LONG.md")


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
    ap.add_argument("--report-only", action="store_true", help="only rewrite docs/RESULTS_LONG.md")
    args = ap.parse_args()
    if not args.report_only:
        run_part(args.part, args.jobs)
    write_report(REPORT)


def run_part(name: str, jobs: int) -> None:
    part = PARTS[name]
    study, work = Path("runs/study") / name, Path(part["work"])
    base = base_config(name)
    base_adapter = yaml.safe_load(base.read_text())["adapter"]
    train_file = write_train(study, work, part["rows"](), part["n_train"])
    overrides = [f"data.train_file={train_file}", f"data.eval_file={study / 'dev.jsonl'}", *part["overrides"]]
    pool = ThreadPoolExecutor(jobs)
    grid, metric, sign = part["grid"], part["metric"], 1 if part["higher"] else -1
    variants: dict[str, dict[str, Any]] = part.get("variants", {})

    def run(
        label: str, lr: float, seed: int, method: str | None = None, extra: tuple[str, ...] = ()
    ) -> Future[dict[str, Any]]:
        out = work / "runs" / f"{label}_lr{lr:g}_seed{seed}"
        flavour: list[str] = []
        # A grid label is a study method (lorafa.study.METHODS): train with its method and adapter settings.
        if method is None:
            spec = METHODS[label]
            if spec.projection or spec.half_layers:
                raise ValueError(
                    f"grid method {label!r}: only its method, rank and adapter settings are applied here"
                )
            method, flavour = spec.train_method, [f"adapter.{k}={v}" for k, v in spec.adapter.items()]
            if spec.rank_factor != 1:
                flavour += [f"adapter.{k}={base_adapter[k] * spec.rank_factor}" for k in ("r", "lora_alpha")]
        return pool.submit(train, base, [*overrides, *flavour, *extra], out, method, lr, seed)

    sweep = {(m, lr): run(m, lr, 0) for m, lrs in grid.items() for lr in lrs}
    chosen = {
        m: max(lrs, key=lambda lr, m=m: sign * sweep[m, lr].result()[metric]) for m, lrs in grid.items()
    }
    later = {(m, s): run(m, chosen[m], s) for m in grid for s in part["seeds"] if s != 0}
    extra = {
        (v, s): run(v, spec["lr"], s, spec["method"], tuple(spec["overrides"]))
        for v, spec in variants.items()
        for s in part["seeds"]
    }
    from lorafa.evaluate import evaluate_run

    results: dict[str, Any] = {
        "part": name,
        "n_train": part["n_train"],
        "metric": metric,
        "chosen_lr": chosen,
        "variants": variants,
        "dev": {f"{m} {lr:g}": fut.result()[metric] for (m, lr), fut in sweep.items()},
        "test": {},
    }
    rows = {
        m: (chosen[m], [sweep[m, chosen[m]]] + [later[m, s] for s in part["seeds"] if s != 0]) for m in grid
    }
    rows.update({v: (spec["lr"], [extra[v, s] for s in part["seeds"]]) for v, spec in variants.items()})
    for m, (lr, futures) in rows.items():
        runs = [f.result() for f in futures]
        tests = [evaluate_run(r["run_dir"], eval_file=str(study / "test.jsonl")) for r in runs]
        results["test"][m] = {
            "lr": lr,
            **{k: [t[k] for t in tests] for k in tests[0] if k.startswith("eval_")},
            "dev": [r[metric] for r in runs],
            "train_runtime_s": [r["train_runtime_s"] for r in runs],
            "peak_memory_bytes": [r["peak_memory_bytes"] for r in runs],
            "trainable_params": runs[0]["trainable_params"],
        }
    _atomic_write(work / "results.json", json.dumps(results, indent=1).encode())
    print(f"dev ({metric}, seed 0):", {k: round(v, 4) for k, v in results["dev"].items()})
    for m, r in results["test"].items():
        cols = ", ".join(
            f"{k[5:]} {mean_std(r[k])[0]:.4f} ± {mean_std(r[k])[1]:.4f} {[round(v, 4) for v in r[k]]}"
            for k in part["report"]
        )
        t, mem = mean_std(r["train_runtime_s"]), max(r["peak_memory_bytes"]) / 2**30
        print(f"{m:10s} lr {r['lr']:g}: test {cols}; train {t[0]:.0f} ± {t[1]:.0f} s, peak RSS {mem:.2f} GiB, "
              f"{r['trainable_params']:.0f} trainable")  # fmt: skip


def write_report(path: Path) -> None:
    """docs/RESULTS_LONG.md from every part's WORK/results.json (parts without one are listed as not run)."""
    lines = [
        "# Accuracy at a longer budget (issue 6)",
        "",
        "Written by `python benchmarks/long_budget.py` (run per part; `--report-only` rewrites this file). The study "
        "([RESULTS.md](RESULTS.md)) trains 120 steps per part; here the same settings, dev and test files get about "
        "4-5x the training data, one pass. Machine: 2 CPU cores, torch CPU, float32; one thread per run, two runs side "
        "by side, so times are noisy.",
        "",
        "Protocol: each method's lr is chosen on dev with seed 0 (the grid below); seeds 1 and 2 then train at the "
        "chosen lr; the three chosen runs are evaluated once on test. Variants train all seeds at a fixed lr and are "
        "reported only. LoRA-FA's best setting (A's init, rank) is chosen like an lr: on dev with seed 0. No number "
        "here was tuned on test.",
    ]
    for name, part in PARTS.items():
        file = Path(part["work"]) / "results.json"
        lines += ["", f"## {name}", ""]
        if not file.exists():
            lines.append(f"Not run (`python benchmarks/long_budget.py --part {name}`).")
            continue
        res = json.loads(file.read_text())
        metric, keys = part["metric"], part["report"]
        steps = -(-part["n_train"] // yaml.safe_load(base_config(name).read_text())["batch_size"])
        lines.append(f"{part['n_train']} training rows, {steps} steps, seeds {list(part['seeds'])}; "
                     f"dev {metric} of each (method, lr) with seed 0:")  # fmt: skip
        lines += ["", "| method | lr | dev " + metric + " (seed 0) |", "|---|---:|---:|"]
        for key, value in res["dev"].items():
            m, lr = key.split()
            mark = " (chosen)" if float(lr) == res["chosen_lr"][m] else ""
            lines.append(f"| {m} | {lr}{mark} | {value:.4f} |")
        head = " | ".join(f"test {k[5:]}" for k in keys)
        # accuracy in percent with 2 decimals, losses as they are with 4
        fmt = (lambda v: f"{100 * v:.2f}") if keys[0] == "eval_accuracy" else (lambda v: f"{v:.4f}")
        lines += ["", f"| method | lr | {head} | per seed ({keys[0][5:]}) | dev (mean) | trainable | train time (s) | "
                  "peak RSS (GiB) |",
                  "|---|---:|" + "---:|" * (len(keys) + 5)]  # fmt: skip
        for m, r in res["test"].items():
            cells = " | ".join(f"{fmt(mean_std(r[k])[0])} ± {fmt(mean_std(r[k])[1])}" for k in keys)
            seeds = ", ".join(fmt(v) for v in r[keys[0]])
            t = mean_std(r["train_runtime_s"])
            dev = fmt(mean_std(r["dev"])[0]) if "dev" in r else "—"
            label = m + (" (variant)" if m in res.get("variants", {}) else "")
            lines.append(f"| {label} | {r['lr']:g} | {cells} | {seeds} | {dev} | {r['trainable_params'] / 1e3:.1f}k | "
                         f"{t[0]:.0f} ± {t[1]:.0f} | {max(r['peak_memory_bytes']) / 2**30:.2f} |")  # fmt: skip
        for v, spec in res.get("variants", {}).items():
            lines.append(
                f"\n`{v}`: method {spec['method']} with {' '.join(spec['overrides'])}, lr {spec['lr']:g}."
            )
        lines += ["", "| target (issue 6) | measured | result |", "|---|---|---|"]
        means = {m: {metric: mean_std(r[metric])[0]} for m, r in res["test"].items()}
        # LoRA-FA's setting is chosen as its lr is: on dev with seed 0 (the first of each row's dev values)
        best = best_on_dev({m: r["dev"][0] for m, r in res["test"].items()}, part["higher"])
        for a in acceptance_from_means({name: means}, {name: best}):
            lines.append(f"| {a.claim} | {a.measured} | {a.verdict} |")
    _atomic_write(path, ("\n".join(lines) + "\n").encode())
    print(f"wrote {path}")


def base_config(name: str) -> Path:
    """The config.yaml of one of the study's runs of part `name`: the settings every run here starts from."""
    return Path("runs/study") / name / "runs" / "lora_lr0.002_seed0" / "config.yaml"


if __name__ == "__main__":
    main()
