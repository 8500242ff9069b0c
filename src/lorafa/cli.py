"""The `lorafa` command: thin subcommands over library functions (train, eval, merge, generate).

    lorafa train [CONFIG.yaml] [key=value ...] [--dry-run]   lorafa.train.train / dry_run
    lorafa eval RUN_OR_ADAPTER [key=value ...] [--data FILE]   lorafa.evaluate.evaluate_run
    lorafa merge RUN_OR_ADAPTER OUTPUT_DIR                     lorafa.evaluate.merge
    lorafa generate RUN_ADAPTER_OR_MODEL PROMPT                lorafa.evaluate.generate

Errors in configs, data or files print one line naming the culprit and exit with status 2 (1 for a diverged
training run, 130 after Ctrl-C); tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

EXIT_ERROR = 2
EXIT_DIVERGED = 1
EXIT_INTERRUPTED = 130  # as a shell reports a process ended by Ctrl-C (128 + SIGINT)


def main(argv: list[str] | None = None) -> int:
    """Run the `lorafa` command line; returns the exit status."""
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # argparse cannot take positionals after an option (`eval RUN --data F key=value`); overrides may go anywhere.
        overrides = [a for a in extra if "=" in a and not a.startswith("-")]
        if extra != overrides or (overrides and args.command not in ("train", "eval")):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "train":
            args.items += overrides
        elif args.command == "eval":
            args.overrides += overrides
    except SystemExit as e:  # --help, or a usage error already printed by argparse
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_ERROR
    if argv is None and args.command == "train" and not args.dry_run:
        _tune_malloc()
    if argv is None:  # a command line: warnings as one line each, not Python's file:line form
        warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    from lorafa.models import remote_code
    from lorafa.train import TrainingDiverged

    try:
        with remote_code(getattr(args, "trust_remote_code", False)):
            return int(args.run(args))
    except TrainingDiverged as e:
        print(f"lorafa {args.command}: stopped: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError, a folder that cannot be written, ...
        print(f"lorafa {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"lorafa {args.command}: interrupted{_resume_hint(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model's own code from its folder/repo (transformers' trust_remote_code; a run's config.yaml "
        "may set it)",
    )


def _resume_hint(args: argparse.Namespace) -> str:
    """'; resume=CHECKPOINT continues it' for an interrupted `lorafa train` that saved checkpoints."""
    out = getattr(args, "output_dir_used", None)
    if args.command != "train" or out is None:
        return ""
    from lorafa.checkpoint import list_checkpoints

    found = list_checkpoints(Path(out))
    return f"; resume={found[-1]} continues it" if found else " (no checkpoint was written yet)"


def _tune_malloc() -> None:
    """On CPU, re-execute this command with glibc malloc settings that return freed activations to the OS.

    Only for a real command line (`argv is None`): re-executing repeats `sys.orig_argv`, which inside a caller's
    process (tests, notebooks) would be the caller's own command. See `lorafa.allocator`.
    """
    from lorafa.allocator import reexec_with_malloc_tuning, should_tune_malloc

    if not should_tune_malloc("cpu"):  # already tuned (the re-executed process), opted out, or not glibc
        return
    import torch

    reexec_with_malloc_tuning("cuda" if torch.cuda.is_available() else "cpu")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafa", description="Memory-true LoRA-FA fine-tuning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="fine-tune a model (no arguments: the offline MiniLM + Rotten Tomatoes example)",
        description="Fine-tune with full, LoRA or LoRA-FA training. Settings come from CONFIG.yaml, then the "
        "key=value overrides. Without CONFIG, the overrides modify the built-in offline example "
        "(examples/minilm_rotten_tomatoes.yaml) unless they set model=..., in which case they start from the "
        "plain defaults.",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value]", help="config file and overrides")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, then exit")
    p.set_defaults(run=_train)

    p = sub.add_parser("eval", help="metrics of a trained run or adapter on its eval data or a data file")
    p.add_argument("source", help="a `lorafa train` output_dir, or an adapter folder")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides (e.g. data.eval_file=x.csv)"
    )
    p.add_argument("--data", help="evaluate on this data file instead of the run's eval data")
    p.add_argument("--model", help="base model of an adapter folder (default: the one it records)")
    p.add_argument("--task", help="task of an adapter folder (default: from its task_type)")
    p.add_argument("--batch-size", type=int, help="examples per forward pass")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON only")
    _add_trust_flag(p)
    p.set_defaults(run=_eval)

    p = sub.add_parser("merge", help="fold a trained adapter into its base model and save a plain HF model")
    p.add_argument("source", help="a `lorafa train` output_dir, or an adapter folder")
    p.add_argument("output_dir", help="where to save the merged model (save_pretrained)")
    p.add_argument("--model", help="base model of an adapter folder (default: the one it records)")
    p.add_argument("--task", help="task of an adapter folder (default: from its task_type)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace output_dir if it holds a saved model (config.json + weights, e.g. an earlier merge)",
    )
    _add_trust_flag(p)
    p.set_defaults(run=_merge)

    p = sub.add_parser(
        "generate", help="continue a prompt with a causal/seq2seq LM (+ adapter) for a quick look"
    )
    p.add_argument(
        "source", help="a `lorafa train` output_dir, an adapter folder, or a model (id, folder, asset:)"
    )
    p.add_argument("prompt", help="the text to answer")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding")
    p.add_argument("--no-chat-template", action="store_true", help="format the prompt as plain text")
    p.add_argument("--system", help="a system message before the prompt")
    p.add_argument("--model", help="base model of an adapter folder (default: the one it records)")
    p.add_argument(
        "--task", choices=["sft", "clm", "seq2seq"], help="task of an adapter folder (clm: continue raw text)"
    )
    _add_trust_flag(p)
    p.set_defaults(run=_generate)

    from lorafa.bench import add_bench_subparser
    from lorafa.planner import add_memory_subparser

    add_memory_subparser(sub)  # `lorafa memory`: the planner (meta device, no weights); sets run=memory_main
    add_bench_subparser(sub)  # `lorafa bench`: side-by-side memory and speed; sets run=bench_main
    return parser


# ------------------------------------------------------------------------------------------------- train


def _train(args: argparse.Namespace) -> int:
    from lorafa.train_config import default_config, load_config

    # An existing file is the config even when its path holds "=" (runs/lr=1e-3/config.yaml).
    configs = [a for a in args.items if "=" not in a or Path(a).is_file()]
    overrides = [a for a in args.items if a not in configs]
    if len(configs) > 1:
        raise ValueError(f"expected at most one CONFIG.yaml before the key=value overrides, got {configs}")
    if configs:
        cfg = _in_its_run_folder(Path(configs[0]), load_config(configs[0], overrides), overrides)
    elif any(o.split("=", 1)[0].strip() == "model" for o in overrides):
        cfg = load_config(None, overrides)  # a run described entirely on the command line
    else:
        cfg = default_config(overrides)  # tweaks of the offline example, e.g. `lorafa train method=lora`
    # "~" in a YAML file or a quoted override reaches lorafa unexpanded: messages show the folder written to.
    cfg = replace(cfg, output_dir=os.path.expanduser(cfg.output_dir))
    args.output_dir_used = cfg.output_dir  # for the resume hint after Ctrl-C

    if args.dry_run:
        from lorafa.train import dry_run

        print(cfg.with_absolute_paths().to_yaml().rstrip())
        report = dry_run(cfg)
        print("---")
        print(f"data: {report['data']}")
        print(f"optimizer steps: {report['steps']}")
        print(f"trainable parameters: {_params(report['trainable_params'], report['total_params'])}")
        if "memory" in report:
            print(f"memory estimate: {report['memory']}")
        return 0

    from lorafa.train import train

    main_process = int(os.environ.get("RANK", "0")) == 0
    if not args.items and main_process:
        print(
            "lorafa: fine-tuning all-MiniLM-L6-v2 (a 22M-parameter BERT encoder) with LoRA-FA to tell fresh from "
            "rotten Rotten Tomatoes reviews, offline on this machine's CPU.\n"
            f"        {cfg.data.max_train_samples} training and {cfg.data.max_eval_samples} held-out reviews, "
            f"{cfg.epochs} epoch; outputs go to {cfg.output_dir}/",
            flush=True,
        )
    metrics = train(cfg)
    if main_process:
        print(summary(cfg, metrics))
    return 0


def _in_its_run_folder(path: Path, cfg: Any, overrides: list[str]) -> Any:
    """A run's own config.yaml, in a folder the run was moved or copied to, writes to that folder, not to the
    output_dir it names (the original place, which a resume or a repeat would otherwise overwrite)."""
    from lorafa.run_folder import is_run_folder

    folder = path.expanduser().resolve().parent
    ran = is_run_folder(folder) or (folder / "checkpoints").exists()
    if path.name != "config.yaml" or not ran or any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides):
        return cfg  # only the config.yaml a run wrote into its own folder
    if Path(cfg.output_dir).expanduser().resolve() == folder:
        return cfg
    print(
        f"lorafa: {path} belongs to the run in {folder}, moved or copied from {cfg.output_dir}: writing to {folder} "
        "(set output_dir= to choose)",
        file=sys.stderr,
    )
    return replace(cfg, output_dir=str(folder))


def _local_typo(given: str, source: Path) -> bool:
    """Whether a `generate` source that does not exist is a mistyped local path rather than a Hub id: it starts
    with . / ~, or its parent folder holds runs or adapters (runs/typo)."""
    if given.startswith((".", "/", "~")):
        return True
    from lorafa.evaluate import is_run_dir

    parent = source.parent
    return bool(parent.name) and parent.is_dir() and any(
        is_run_dir(child) or (child / "adapter_config.json").is_file() for child in parent.iterdir()
    )


def _count(n: float) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _params(trainable: float, total: float) -> str:
    return f"{_count(trainable)} of {_count(total)} ({100 * trainable / max(total, 1):.2f}%)"


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def summary(cfg: Any, metrics: dict[str, float]) -> str:
    """The end-of-training report: before → after for each metric, time, speed, memory, trainable parameters."""
    steps = int(metrics["steps"])
    trained = metrics.get("tokens_per_s", 0.0) > 0
    lines = [
        f"\nDone in {metrics['train_runtime_s']:.0f} s ({steps} optimizer step{'' if steps == 1 else 's'})."
        if trained
        else f"\nNothing left to train: the checkpoint resumed is at step {steps}, the run's last."
    ]
    names = {
        "eval_accuracy": ("accuracy", True),
        "eval_f1": ("macro-F1", True),
        "eval_f1_class1": ("F1 of class 1", True),
        "eval_mcc": ("Matthews corr.", False),
        "eval_pearson": ("Pearson", False),
        "eval_spearman": ("Spearman", False),
        "eval_exact_match": ("exact match", True),
        "eval_perplexity": ("perplexity", False),
        "eval_loss": ("eval loss", False),
    }
    shown = [k for k in names if k in metrics]
    if shown:
        samples = int(metrics.get("eval_samples", 0))
        lines.append(f"On {samples} held-out examples (before training → after):")
        for key in shown:
            label, percent = names[key]
            after = metrics[key]
            before = metrics.get(f"initial_{key}")
            fmt = (lambda v: f"{100 * v:.1f}%") if percent else (lambda v: f"{v:.4g}")
            lines.append(f"  {label:<15} {fmt(before) if before is not None else '?':>9} → {fmt(after)}")
    memory_kind = (
        "peak GPU memory allocated" if _on_gpu() else "peak process memory (RSS: Python, PyTorch, model)"
    )
    memory = f"{memory_kind}: {_bytes(metrics['peak_memory_bytes'])}"
    lines += [
        f"Trained {_params(metrics['trainable_params'], metrics['total_params'])} parameters with "
        f"{_METHOD_NAMES.get(cfg.method, cfg.method)}"
        + (
            " and the task head."
            if cfg.task in ("classification", "regression") and cfg.method != "full"
            else "."
        ),
        f"Speed {metrics['tokens_per_s']:.0f} tokens/s; {memory}." if trained else f"{memory[0].upper()}{memory[1:]}.",
        f"Outputs in {cfg.output_dir}/: adapter/ metrics.json train_log.jsonl loss.png config.yaml"
        + (" labels.json" if cfg.task == "classification" else ""),
        f"Next: lorafa eval {shlex.quote(str(cfg.output_dir))}",
    ]
    return "\n".join(lines)


_METHOD_NAMES = {
    "lora-fa": "LoRA-FA (A frozen, only B learns)",
    "lora": "LoRA (A and B learn)",
    "full": "full fine-tuning",
}


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------- eval, merge, generate


def _eval(args: argparse.Namespace) -> int:
    from lorafa.evaluate import evaluate_run

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    metrics = evaluate_run(
        args.source,
        args.overrides,
        model=args.model,
        task=args.task,
        eval_file=args.data,
        batch_size=args.batch_size,
    )
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for key, value in metrics.items():
            print(f"{key:<20} {value:.6g}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from lorafa.evaluate import merge

    out = merge(args.source, args.output_dir, model=args.model, task=args.task, overwrite=args.overwrite)
    print(f"merged model saved to {out} (load it with transformers' from_pretrained)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from lorafa.evaluate import generate, is_run_dir, load_trained
    from lorafa.models import load_model, load_tokenizer

    source = Path(args.source).expanduser()
    if not source.exists() and _local_typo(args.source, source):
        raise FileNotFoundError(f"no such run, adapter or model folder: {source}")
    if is_run_dir(source) or (source / "adapter_config.json").is_file():
        model, tokenizer, cfg = load_trained(source, model=args.model, task=args.task)
        if cfg is not None and cfg.task not in ("sft", "clm", "seq2seq"):
            raise ValueError(f"{source} is a {cfg.task} run; generate needs an sft, clm or seq2seq model")
    else:
        from transformers import AutoConfig

        from lorafa.models import from_pretrained

        encoder_decoder = getattr(from_pretrained(AutoConfig, args.source), "is_encoder_decoder", False)
        tokenizer = load_tokenizer(args.source)
        model = load_model(args.source, "seq2seq" if encoder_decoder else "sft")
        cfg = None
    text = generate(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        # As the run was trained: an sft run's data.use_chat_template decides (clm and seq2seq runs train on raw
        # text), unless turned off here.
        use_chat_template=not args.no_chat_template
        and (cfg is None or (cfg.task == "sft" and cfg.data.use_chat_template)),
        raw_text=(cfg.task if cfg is not None else args.task) == "clm",
        temperature=args.temperature,
        system=args.system,
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
