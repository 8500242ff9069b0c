"""The `lorafa memory` planner: training memory per method for any Hugging Face config, without weights.

The model is instantiated on the `meta` device (shapes, no storage), adapters are added exactly as in training
(`lorafa.add_lorafa`, or a real PEFT model for "peft-lora"), and one forward + loss runs under
`lorafa.memory.SavedTensorTracker`, which counts the bytes autograd keeps for backward. Weights, gradients and
optimizer states come from `lorafa.memory.static_memory`. Nothing is extrapolated: every activation figure is a
measured meta forward of the real model code at the requested batch and sequence length.

Attention kernel. On the meta device PyTorch's SDPA has no fused kernel and decomposes into the math path, which
keeps the T×T probabilities. On a GPU, SDPA runs FlashAttention (or the memory-efficient kernel when there is an
additive mask, e.g. T5's position bias), which keeps only q, k, v, the output and a log-sum-exp per query and head
(plus the additive mask when there is one). `attention="sdpa-flash"` (default) models that by routing
`F.scaled_dot_product_attention` to `_SimulatedFlashAttention`, a meta-only autograd Function that saves exactly
those tensors, with the output in the kernels' token-major layout so that the `o_proj` input is a view of it, as on
the GPU. `attention="eager"` runs transformers' eager attention, which keeps the probabilities (and their dropout
mask). PyTorch's own CPU flash kernel keeps the same tensors as the simulated one; tests/test_planner.py checks the
planner against it.

Options below the LoRA-FA floor (issue 7), each modelled by running lorafa's own code on meta:
`chunked_loss` (causal LMs only) replaces ``model(**batch).loss`` by `lorafa.loss.chunked_causal_lm_loss`, which
keeps dh (tokens, d) (and dW for a trainable head) instead of the fp32 (tokens × vocab) log-probabilities; the one
chunk of logits alive at a time is transient and not counted. The labels of that run are real CPU values (no
ignored token but the shift's last position per row), as the loss selects counted tokens by value.
`cheap_recompute` applies `lorafa.recompute.enable_cheap_recompute` after the adapters; the local graphs it
rebuilds in backward (e.g. a recomputed RMSNorm's rsqrt) live one module at a time and are not counted, and the
RNG state each regenerated dropout keeps is host memory (on CUDA 16 bytes), so it costs no device memory with
device "cuda" (with device "cpu" it is CPU memory and counted). `offload` models `lorafa.offload.offload_activations`
(GPU only; with device "cpu" a no-op, like the library without CUDA): the library's own pack hook decides which
saved tensors move to pinned host memory (dense, non-parameter, at least `offload_min_bytes`); they are reported
as `activations_offloaded` (host) instead of device memory. Backward copies each back right before its node uses
it and frees it after, so the planner adds a transient: the offloaded bytes of the largest checkpointable layer
(or, outside the layers, of the largest offloaded tensor), an upper bound on what is back on the device at once.
Not modelled: copies still in flight when the forward outruns the host link (device memory then grows until the
copies catch up), and pinned host memory limits.

This file holds the command line (`add_memory_subparser`, `memory_main`, `main`); the parts live in
`planner_args` (`PlannerArgs`, presets, size and dtype parsing), `planner_models` (config, model, batch, adapters,
checkpointing), `planner_meta` (the simulated kernels and `planning_mode`), `planner_measure` (activation
measurement), `planner_plan` (`run_planner`, the budget search, the notes) and `planner_report` (table and
chart). The public names stay importable from here.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lorafa.data_files import one_line
from lorafa.planner_args import (
    ATTENTIONS,
    CHECKPOINTING,
    DEVICES,
    METHODS,
    PRESETS,
    SEARCHES,
    TASKS,
    PlannerArgs,
    format_bytes,
    parse_dtype,
    parse_size,
)
from lorafa.planner_measure import Activations, measure_activations
from lorafa.planner_meta import planning_mode
from lorafa.planner_models import (
    adapter_config,
    build_model,
    checkpointed_layers,
    load_config,
    make_batch,
    prepare_method,
    resolve_task,
    set_checkpointing,
)
from lorafa.planner_plan import largest_fitting, run_planner
from lorafa.planner_report import format_table, plot_report
from lorafa.targets import module_spec

__all__ = [
    "ATTENTIONS",
    "CHECKPOINTING",
    "DEVICES",
    "METHODS",
    "PRESETS",
    "SEARCHES",
    "TASKS",
    "Activations",
    "PlannerArgs",
    "adapter_config",
    "add_memory_subparser",
    "args_from_namespace",
    "build_model",
    "checkpointed_layers",
    "format_bytes",
    "format_table",
    "largest_fitting",
    "load_config",
    "main",
    "make_batch",
    "measure_activations",
    "memory_main",
    "parse_dtype",
    "parse_size",
    "planning_mode",
    "plot_report",
    "prepare_method",
    "resolve_task",
    "run_planner",
    "set_checkpointing",
]


# ---- command line ---------------------------------------------------------------------------------------------
def _add_arguments(p: argparse.ArgumentParser) -> None:
    d = PlannerArgs()
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    src.add_argument("--config", help="path to a transformers config.json (or its folder)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument(
        "--target-len", type=int, default=None, help="decoder length of encoder-decoders (default: seq len)"
    )
    p.add_argument("--dtype", default=d.dtype, help="float32/fp32, bfloat16/bf16, float16/fp16")
    p.add_argument("--r", type=int, default=d.r)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument(
        "--targets",
        nargs="+",
        default=None,
        help="adapted module names, or one regex or all-linear (default: per architecture)",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"from {list(METHODS)}")
    p.add_argument("--checkpointing", default=d.checkpointing, help="off, on or both")
    p.add_argument("--attention", default=d.attention, help="sdpa-flash (GPU kernels, default) or eager")
    p.add_argument("--device", default=d.device, help="cuda (default) or cpu: whose dropout kernel to model")
    p.add_argument("--task", default=d.task, help=f"one of {list(TASKS)}")
    p.add_argument("--num-labels", type=int, default=d.num_labels)
    p.add_argument("--optimizer", default=d.optimizer, help="adamw, sgd or none")
    p.add_argument("--no-mixed-precision", dest="mixed_precision", action="store_false")
    p.add_argument(
        "--gpu-memory", default=None, help="e.g. 24GB, 24GiB, 80G: find the largest batch that fits"
    )
    p.add_argument("--reserve", default=d.reserve, help="memory kept aside from --gpu-memory, e.g. 1GiB")
    p.add_argument("--search", default=d.search, help="what --gpu-memory maximises: batch or seq")
    p.add_argument("--max-search", type=int, default=d.max_search)
    p.add_argument("--plot", default=None, help="write stacked bars to this PNG")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--chunked-loss", action="store_true", help="causal LMs: chunked linear + cross-entropy (lorafa.loss)"
    )
    p.add_argument(
        "--cheap-recompute", action="store_true", help="recompute norms/activations/dropout in backward"
    )
    p.add_argument(
        "--offload", action="store_true", help="saved activations in pinned host memory (GPU only)"
    )
    p.add_argument(
        "--offload-min-bytes",
        default=d.offload_min_bytes,
        help="with a unit, e.g. 1MiB: smaller tensors stay",
    )


def _targets(given: list[str] | None) -> list[str] | str | None:
    """--targets as LoRAFAConfig takes them, read as `lorafa train` reads one value (`targets.module_spec`):
    "all-linear", a plain name, or a regex; several values are names/suffixes."""
    if given is None or len(given) > 1:
        return given
    return module_spec(given[0]) or given[0]


def add_memory_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `memory` subcommand to an argparse subparsers object; its handler (`run`, also `func`) is `memory_main`."""
    p = subparsers.add_parser(
        "memory",
        help="plan training memory per method (no weights needed)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    _add_arguments(p)
    p.set_defaults(run=memory_main, func=memory_main)
    return p


def args_from_namespace(ns: argparse.Namespace) -> PlannerArgs:
    """A PlannerArgs from parsed command-line arguments."""
    return PlannerArgs(
        preset=ns.preset,
        config=ns.config,
        batch_size=ns.batch_size,
        seq_len=ns.seq_len,
        target_len=ns.target_len,
        dtype=ns.dtype,
        r=ns.r,
        lora_alpha=ns.lora_alpha,
        lora_dropout=ns.lora_dropout,
        target_modules=_targets(ns.targets),
        methods=ns.methods,
        checkpointing=ns.checkpointing,
        attention=ns.attention,
        device=ns.device,
        task=ns.task,
        num_labels=ns.num_labels,
        optimizer=ns.optimizer,
        mixed_precision=ns.mixed_precision,
        gpu_memory=ns.gpu_memory,
        reserve=ns.reserve,
        search=ns.search,
        max_search=ns.max_search,
        plot=ns.plot,
        json=ns.json,
        chunked_loss=ns.chunked_loss,
        cheap_recompute=ns.cheap_recompute,
        offload=ns.offload,
        offload_min_bytes=ns.offload_min_bytes,
    )


def memory_main(ns: argparse.Namespace) -> int:
    """Run the planner for parsed arguments; print a table (or JSON); 0 on success, 2 on bad input."""
    try:
        args = args_from_namespace(ns)
        report = run_planner(args)
    except (ValueError, FileNotFoundError) as e:
        text = one_line(e, with_type=False)  # transformers' errors list every model type
        if "attn_implementation" in str(e):
            text += " (lorafa memory: pass --attention eager)"
        print(f"lorafa memory: error: {text}", file=sys.stderr)
        return 2
    except (RuntimeError, NotImplementedError) as e:
        # A model whose forward reads its inputs' values (transformers' padding and mask checks) cannot run on
        # the meta device the planner uses.
        print(
            f"lorafa memory: error: this model's forward cannot run without data on the meta device "
            f"({one_line(e)}); try --attention eager, or measure real steps with `lorafa bench`",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    if args.plot:
        try:
            plot_report(report, args.plot)
        except OSError as e:
            print(f"lorafa memory: error: cannot write the chart {args.plot}: {one_line(e)}", file=sys.stderr)
            return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m lorafa.planner ...`: the same as `lorafa memory ...`."""
    p = argparse.ArgumentParser(prog="python -m lorafa.planner", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    return memory_main(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
