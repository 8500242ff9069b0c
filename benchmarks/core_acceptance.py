"""Issue 2 acceptance: saved-for-backward bytes and step time of lorafa LoRA-FA vs PEFT LoRA on a LLaMA-shaped model.

Workload: random-init LLaMA (hidden 512, 4 layers, 8 heads, intermediate 1376, vocab 1000), batch 4 x 256 tokens,
r=16, lora_alpha=32, q,k,v,o,gate,up,down, fp32, CPU, SDPA attention.

Run:  python benchmarks/core_acceptance.py [--steps 15] [--out docs/core_benchmark.md]
Saved bytes are unique storages recorded by `lorafa.memory.SavedTensorTracker` (parameters excluded). Step times
are medians of forward+backward, with the methods interleaved step by step in one process so that machine load
affects them alike.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lorafa
from lorafa.memory import SavedTensorTracker

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 16, 32


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg)
    model.train()
    return model


def floor_model() -> torch.nn.Module:
    """No adapters; the embedding output requires grad so every frozen layer keeps what backward through it needs."""
    model = base_model()
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    return model


def lorafa_model(method: str, dropout: float) -> torch.nn.Module:
    model = base_model()
    cfg = lorafa.LoRAFAConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=TARGETS, method=method
    )
    return lorafa.add_lorafa(model, cfg)


def peft_model(dropout: float, freeze_A: bool) -> torch.nn.Module:
    model = get_peft_model(
        base_model(), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=TARGETS)
    )
    if freeze_A:  # what PEFT's create_lorafa_optimizer does
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    return model


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    with SavedTensorTracker(model) as tracker:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return tracker.total_bytes


def step(model: torch.nn.Module, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return dt


def interleaved_medians(
    models: dict[str, torch.nn.Module], ids: torch.Tensor, steps: int
) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():  # warm-up
        step(m, ids)
    for i in range(steps):
        order = list(models) if i % 2 == 0 else list(reversed(models))
        for k in order:
            times[k].append(step(models[k], ids))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = ap.parse_args(argv)
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "frozen floor (no adapters)": floor_model,
        "lorafa LoRA-FA, dropout 0.05": lambda: lorafa_model("lora-fa", 0.05),
        "lorafa LoRA-FA, dropout 0": lambda: lorafa_model("lora-fa", 0.0),
        "lorafa LoRA, dropout 0.05": lambda: lorafa_model("lora", 0.05),
        "PEFT LoRA, dropout 0.05": lambda: peft_model(0.05, freeze_A=False),
        "PEFT LoRA + frozen A (PEFT's LoRA-FA), dropout 0.05": lambda: peft_model(0.05, freeze_A=True),
        "PEFT LoRA, dropout 0": lambda: peft_model(0.0, freeze_A=False),
    }
    mib = 2**20
    rows = []
    sb: dict[str, int] = {}
    for name, build in builders.items():
        sb[name] = saved_bytes(build(), ids)
        rows.append(f"| {name} | {sb[name] / mib:.1f} |")
    floor = sb["frozen floor (no adapters)"]
    fa = sb["lorafa LoRA-FA, dropout 0.05"]
    checks = [
        ("LoRA-FA (p=0.05) / frozen floor", fa / floor, "<= 1.01"),
        ("PEFT LoRA / LoRA-FA (p=0.05)", sb["PEFT LoRA, dropout 0.05"] / fa, ">= 2.0"),
        (
            "PEFT LoRA frozen A / LoRA-FA (p=0.05)",
            sb["PEFT LoRA + frozen A (PEFT's LoRA-FA), dropout 0.05"] / fa,
            ">= 1.5",
        ),
    ]

    timing = {}
    for p in (0.0, 0.05):
        med = interleaved_medians(
            {"lorafa": lorafa_model("lora-fa", p), "peft": peft_model(p, False)}, ids, args.steps
        )
        timing[p] = med
        checks.append(
            (
                f"step time LoRA-FA / PEFT LoRA (p={p})",
                med["lorafa"] / med["peft"],
                "<= 0.9" if p == 0 else "<= 1.0",
            )
        )
    # The frozen model alone, for scale (no exact adapter can be faster), in an interleaving of its own: a third
    # model in the same rotation would break its symmetry (the middle one would never follow itself).
    floor_vs_fa = interleaved_medians(
        {"lorafa": lorafa_model("lora-fa", 0.0), "floor": floor_model()}, ids, args.steps
    )

    lines = [
        "# Core benchmark (issue 2 acceptance)",
        "",
        f"{datetime.date.today()} · {platform.processor() or platform.machine()} · {torch.get_num_threads()} threads · "
        f"torch {torch.__version__}",
        "",
        f"LLaMA-shaped random-init model (hidden 512, 4 layers, 8 heads, intermediate 1376, vocab 1000), batch "
        f"{args.batch} x {args.seq}, r={R}, lora_alpha={ALPHA}, q,k,v,o,gate,up,down, fp32, CPU, SDPA.",
        "Reproduce: `python benchmarks/core_acceptance.py --out docs/core_benchmark.md`",
        "",
        "| configuration | saved for backward (MiB) |",
        "|---|---:|",
        *rows,
        "",
        f"| step time (forward+backward, median of {args.steps}) | lorafa LoRA-FA (s) | PEFT LoRA (s) |",
        "|---|---:|---:|",
        *[f"| dropout {p} | {m['lorafa']:.3f} | {m['peft']:.3f} |" for p, m in timing.items()],
        "",
        f"Frozen floor (no adapters), interleaved with LoRA-FA at dropout 0: LoRA-FA = "
        f"{floor_vs_fa['lorafa'] / floor_vs_fa['floor']:.3f} x the floor.",
        "",
        "| check | value | target |",
        "|---|---:|---|",
        *[f"| {n} | {v:.3f} | {t} |" for n, v, t in checks],
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(report)
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
