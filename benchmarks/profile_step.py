"""Where one training step's time goes: torch.profiler over a few steps of one bench (model, method, dropout).

    python benchmarks/profile_step.py --model llama-core --method lora-fa --dropout 0.05 [--device cuda]

Builds the model exactly as `lorafa bench` does (lorafa.bench_worker), runs warm-up steps, then profiles
`--steps` steps (forward, backward, optimizer step) and prints the ops sorted by self time on the device.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from lorafa.bench_models import MODELS
from lorafa.bench_settings import Job
from lorafa.bench_worker import _make_batch, _prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-core", choices=sorted(MODELS))
    ap.add_argument("--method", default="lora-fa")
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    job = Job(args.model, args.method, args.dropout, args.batch, args.seq, args.steps, 2, 16, 32.0, 1e-4,
              args.device, dtype, profile_live=False)  # fmt: skip
    device = torch.device(args.device)
    torch.manual_seed(0)
    with device:
        model = MODELS[args.model].build(getattr(torch, dtype))
    notes: list[str] = []
    model, optimizer, loss_fn = _prepare(model, MODELS[args.model].task, job, notes)
    model.train()
    batch = _make_batch(MODELS[args.model].task, model, job, device)

    def step() -> None:
        loss_fn(batch).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{args.model} {args.method} p={args.dropout} {args.batch}x{args.seq} {dtype} on {args.device}, "
          f"{args.steps} steps {' '.join(notes)}")  # fmt: skip
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
