"""lorafa.planner: the meta-device plan equals the bytes a real CPU step saves; search, CLI and input errors.

The reference in each comparison is a real step on CPU: a random-init model built from the same config with
transformers, adapters added with lorafa (or PEFT), one forward + loss under SavedTensorTracker. The planner
instead runs on the meta device, with PyTorch's SDPA replaced by its memory model of the GPU kernels for
"sdpa-flash". On CPU, SDPA really runs a flash kernel (for inputs without attention dropout), which keeps the same
tensors as the GPU kernels, so the comparison checks that memory model against a real kernel.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)
from transformers.modeling_layers import GradientCheckpointingLayer

import lorafa
import lorafa.planner
from lorafa.loss import chunked_causal_lm_loss
from lorafa.memory import SavedTensorTracker
from lorafa.models import enable_activation_checkpointing
from lorafa.offload import offload_activations
from lorafa.planner import (
    PRESETS,
    PlannerArgs,
    format_table,
    largest_fitting,
    main,
    parse_dtype,
    parse_size,
    run_planner,
)
from lorafa.recompute import enable_cheap_recompute
from lorafa.targets import resolve_targets

B, T, TT = 2, 16, 8  # batch, sequence length, T5 target length
R = 4


def tiny_config(family: str, attention: str, attention_dropout: float | None = None) -> dict:
    # By default no attention dropout with SDPA (GPU and CPU keep the same then), and dropout with eager attention,
    # to count its masks.
    p = (0.0 if attention == "sdpa-flash" else 0.1) if attention_dropout is None else attention_dropout
    if family == "llama":
        return dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    attention_dropout=p if attention_dropout is not None else 0.0)  # fmt: skip
    if family in ("phi3", "gpt_neox"):  # partial rotary: q and k are concatenated, head-major
        sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64)  # fmt: skip
        if family == "phi3":
            return dict(model_type="phi3", num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=0, **sizes)
        return dict(model_type="gpt_neox", rotary_pct=0.5, attention_dropout=0.0, hidden_dropout=0.0, **sizes)
    if family == "roberta":
        return dict(model_type="roberta", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=72, attention_probs_dropout_prob=p)  # fmt: skip
    return dict(model_type="t5", vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2,
                num_heads=4, decoder_start_token_id=0, pad_token_id=0, dropout_rate=p)  # fmt: skip


_AUTO = {
    "llama": AutoModelForCausalLM,
    "phi3": AutoModelForCausalLM,
    "gpt_neox": AutoModelForCausalLM,
    "roberta": AutoModelForSequenceClassification,
    "t5": AutoModelForSeq2SeqLM,
}


class CudaDropout(TorchFunctionMode):
    """`F.dropout` as CUDA runs it: the fused `torch.native_dropout`, which keeps a bool mask. Runs on CPU too."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            a = inspect.signature(F.dropout).bind(*args, **kwargs)
            a.apply_defaults()
            x, p, training, inplace = a.args
            if training and 0 < p < 1 and not inplace:
                return torch.native_dropout(x, p, True)[0]
        return func(*args, **kwargs)


def real_step(
    family: str,
    attention: str,
    method: str,
    checkpointing: bool,
    cuda_dropout: bool = False,
    attention_dropout: float | None = None,
    **options,
) -> SavedTensorTracker:
    """The reference: one real training step on CPU of a random-init tiny model, tracked (options: tracked_step's)."""
    d = tiny_config(family, attention, attention_dropout)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    impl = "sdpa" if attention == "sdpa-flash" else "eager"
    model = _AUTO[family].from_config(config, attn_implementation=impl)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 128, (B, T), generator=g)
    batch = {"input_ids": ids}
    if family == "roberta":
        batch["labels"] = torch.zeros(B, dtype=torch.long)
    elif family == "t5":
        batch.update(labels=torch.randint(2, 128, (B, TT), generator=g), use_cache=False)
    else:
        batch.update(labels=ids, use_cache=False)
    heads = ["classifier"] if family == "roberta" else None
    with CudaDropout() if cuda_dropout else contextlib.nullcontext():
        return tracked_step(model, method, checkpointing, batch, heads, **options)


def tracked_step(
    model,
    method: str,
    checkpointing: bool,
    batch: dict,
    heads: list[str] | None,
    chunked_loss: bool = False,
    cheap_recompute: bool = False,
    offload: dict | None = None,
) -> SavedTensorTracker:
    """Set `model` up for `method` (lorafa, or PEFT as its users do) and run one tracked forward + backward.

    The tracker keeps what the forward saved. With `cheap_recompute`, backward rebuilds each recomputed module's
    local graph, which saves tensors of its own while that module's backward runs (e.g. a recomputed RMSNorm keeps
    its rsqrt, (B, T, 1) fp32): transient, not what the forward keeps for backward, so those records are dropped.
    They were the 512 bytes (4 norms × B·T fp32) by which an earlier comparison's "loss" category differed.
    `offload`: keyword arguments of `lorafa.offload.offload_activations`; the step then runs a second time,
    offloaded (its saved tensors pass the offload hooks, not the tracker's; the copier sees what moves).
    """
    model.train()
    cfg = lorafa.LoRAFAConfig(r=R, lora_alpha=2 * R, lora_dropout=0.05, method="lora", modules_to_save=heads)
    if method in ("lora", "lora-fa"):
        cfg.method = method
        lorafa.add_lorafa(model, cfg)
    elif method == "peft-lora":
        from peft import LoraConfig, get_peft_model

        targets = resolve_targets(model, cfg)
        peft_cfg = LoraConfig(
            r=R, lora_alpha=2 * R, lora_dropout=0.05, target_modules=targets, modules_to_save=heads
        )
        model = get_peft_model(model, peft_cfg)
    hf = model.base_model.model if method == "peft-lora" else model
    if cheap_recompute:
        enable_cheap_recompute(model)
    if checkpointing:
        enable_activation_checkpointing(hf)

    def loss():
        return chunked_causal_lm_loss(hf, batch) if chunked_loss else model(**batch).loss

    with SavedTensorTracker(model) as tracker:
        value = loss()
        saved_by_forward = len(tracker.records)
        value.backward()  # a whole step: backward must work with the tracker on
    assert len(tracker.records) == saved_by_forward or cheap_recompute
    del tracker.records[saved_by_forward:]
    if offload is not None:
        with offload_activations(**offload):
            value = loss()
        value.backward()
    return tracker


def plan(tmp_path, family: str, attention: str, attention_dropout: float | None = None, **kw) -> dict:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config(family, attention, attention_dropout)))
    args = dict(
        device="cpu",  # the reference runs on CPU, whose dropout keeps a float noise tensor
        config=str(path),
        batch_size=B,
        seq_len=T,
        target_len=TT,
        dtype="float32",
        r=R,
        attention=attention,
    )
    args.update(kw)
    return run_planner(PlannerArgs(**args))


# Every method with the default kernel; with eager attention (which only changes the attention part) the two
# whose adapters differ most.
METHODS = {"sdpa-flash": ["full", "lora", "lora-fa", "peft-lora"], "eager": ["lora-fa", "peft-lora"]}


@pytest.mark.parametrize("attention", ["sdpa-flash", "eager"])
@pytest.mark.parametrize("family", ["llama", "roberta", "t5"])
def test_planner_equals_a_real_cpu_step(tmp_path, family, attention):
    compare_methods(
        tmp_path, family, attention, [m for m in METHODS[attention] if m in ("full", "peft-lora")]
    )


@pytest.mark.parametrize("family", ["phi3", "gpt_neox"])
def test_planner_follows_the_layout_of_a_head_major_q(tmp_path, family):
    # Their q is a new head-major tensor (partial rotary concatenates), so the attention output is head-major too
    # and the transpose before the output projection copies: that copy is what the projection keeps.
    compare_methods(tmp_path, family, "sdpa-flash", ["full", "peft-lora"])


@pytest.mark.parametrize("attention", ["sdpa-flash", "eager"])
@pytest.mark.parametrize("family", ["llama", "roberta", "t5"])
def test_planner_equals_a_real_cpu_step_lorafa_methods(tmp_path, family, attention):
    compare_methods(tmp_path, family, attention, [m for m in METHODS[attention] if m in ("lora", "lora-fa")])


@pytest.mark.parametrize("family", ["llama", "roberta", "t5"])
def test_cpu_sdpa_with_attention_dropout_is_planned_as_its_math_path(tmp_path, family):
    compare_methods(tmp_path, family, "sdpa-flash", ["lora-fa", "peft-lora"], attention_dropout=0.1)


def compare_methods(
    tmp_path, family: str, attention: str, methods: list[str], attention_dropout: float | None = None
) -> None:
    report = plan(tmp_path, family, attention, attention_dropout, methods=methods)
    expected = [(m, c) for m in methods for c in (False, True)]
    assert [(e["method"], e["checkpointing"]) for e in report["methods"]] == expected
    entries = report["methods"]
    for off, on in zip(entries[::2], entries[1::2], strict=True):
        check_against_real_step(
            family, attention, off["method"], off, on, attention_dropout=attention_dropout
        )


def check_against_real_step(family: str, attention: str, method: str, off: dict, on: dict, **options) -> None:
    # (T5's full fine-tuning trains its relative position bias, so SDPA gets an additive mask that needs a
    # gradient: CPU SDPA then runs its math path, which the planner models for device cpu, as with dropout.)
    real_off = real_step(family, attention, method, False, **options)
    assert off["activations_saved"] == real_off.total_bytes, method
    assert off["activations_recompute"] == 0
    assert on["activations_saved"] == real_step(family, attention, method, True, **options).total_bytes, (
        method
    )
    # With checkpointing, backward re-creates one layer's activations: the largest layer of the plain step.
    assert real_off.model is not None
    layers = [n for n, m in real_off.model.named_modules() if isinstance(m, GradientCheckpointingLayer)]
    per_layer = [
        sum(b for n, b in real_off.by_module.items() if n == x or n.startswith(x + ".")) for x in layers
    ]
    assert on["activations_recompute"] == max(per_layer)
    assert on["activations"] == on["activations_saved"] + on["activations_recompute"]
    for e in (off, on):
        assert sum(e["activations_by_category"].values()) == e["activations_saved"]
        assert (
            e["total"]
            == e["weights"] + e["grads"] + e["optimizer_states"] + e["master_weights"] + e["activations"]
        )


@pytest.mark.parametrize(
    "family, attention, method",
    [("roberta", "eager", "peft-lora"), ("t5", "eager", "full"), ("llama", "sdpa-flash", "peft-lora")],
)
def test_device_cuda_models_the_fused_dropout_mask(tmp_path, family, attention, method):
    # Reference: the real CPU step with F.dropout run as on CUDA (torch.native_dropout, a bool mask).
    cuda, cpu = (
        plan(tmp_path, family, attention, methods=[method], checkpointing="off", device=d)["methods"][0]
        for d in ("cuda", "cpu")
    )
    assert (
        cuda["activations_saved"]
        == real_step(family, attention, method, False, cuda_dropout=True).total_bytes
    )
    assert cuda["activations_saved"] < cpu["activations_saved"]  # 1 byte per mask element instead of 4


def test_lorafa_keeps_less_than_lora_and_peft(tmp_path):
    report = plan(tmp_path, "llama", "sdpa-flash", checkpointing="off")
    acts = {e["method"]: e["activations"] for e in report["methods"]}
    assert acts["lora-fa"] < acts["lora"] < acts["peft-lora"]
    cats = {e["method"]: e["activations_by_category"] for e in report["methods"]}
    # LoRA-FA's adapters keep u (N, r) per adapted layer: 7 layers x 2 blocks x B·T·r floats.
    assert cats["lora-fa"]["adapter"] == 7 * 2 * B * T * R * 4


def test_static_parts_follow_the_methods(tmp_path):
    report = plan(
        tmp_path, "llama", "sdpa-flash", methods=["full", "peft-lora"], checkpointing="off", dtype="bf16"
    )
    full, peft = report["methods"]
    assert full["trainable_params"] == full["total_params"]
    n = full["trainable_params"]
    assert full["grads"] == 2 * n and full["optimizer_states"] == 8 * n and full["master_weights"] == 4 * n
    assert sum(full["weights_by_dtype"].values()) == full["weights"]
    assert full["weights_by_dtype"]["bfloat16"] == 2 * full["total_params"]  # the rest: fp32 rotary buffers
    # PEFT keeps its adapters in fp32 on a bf16 model: fp32 grads, fp32 moments, no master copies.
    m = peft["trainable_params"]
    assert 0 < m < n and peft["grads"] == 4 * m and peft["optimizer_states"] == 8 * m
    assert peft["master_weights"] == 0


# ---- largest batch ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("upper", [1, 7, 64, 1000])
def test_largest_fitting_finds_the_edge_of_a_monotone_predicate(upper):
    for edge in [0, 1, 2, 3, 5, 8, 63, 64, 65, 700, 5000]:
        calls: list[int] = []

        def fits(n, edge=edge, calls=calls):
            calls.append(n)
            return n <= edge

        assert largest_fitting(fits, upper) == min(edge, upper)
        assert len(calls) <= 2 * math.log2(upper + 1) + 3
        assert all(1 <= c <= upper for c in calls)
        # A guess: right costs three calls; wrong ones (either side, or out of range) still find the edge.
        for guess in {min(edge, upper), edge - 3, edge + 5, 1, upper, 0, upper + 9}:
            calls.clear()
            assert largest_fitting(fits, upper, guess) == min(edge, upper)
            assert all(1 <= c <= upper for c in calls)
            if guess == min(edge, upper) >= 1:
                assert len(calls) <= 3


@pytest.mark.parametrize("method", ["full", "lora-fa"])
def test_planner_batch_search_is_exact_at_its_edge(tmp_path, method):
    kw = dict(methods=[method], checkpointing="off")
    totals = {
        b: plan(tmp_path, "llama", "sdpa-flash", batch_size=b, **kw)["methods"][0]["total"] for b in (5, 6)
    }
    assert totals[6] > totals[5]
    at_edge = plan(tmp_path, "llama", "sdpa-flash", gpu_memory=f"{totals[5]}B", **kw)
    assert at_edge["methods"][0]["max_batch_size"] == 5
    below = plan(tmp_path, "llama", "sdpa-flash", gpu_memory=f"{totals[5] - 1}B", **kw)
    assert below["methods"][0]["max_batch_size"] == 4
    reserve = plan(tmp_path, "llama", "sdpa-flash", gpu_memory=f"{totals[6] + 1000}B", reserve="1000B", **kw)
    assert reserve["methods"][0]["max_batch_size"] == 6
    nothing = plan(tmp_path, "llama", "sdpa-flash", gpu_memory="1KB", **kw)
    assert nothing["methods"][0]["max_batch_size"] == 0


@pytest.mark.parametrize("checkpointing", ["off", "on"])
def test_planner_seq_search_is_exact_at_its_edge(tmp_path, checkpointing):
    # With checkpointing the search measures checkpointed and plain models in turn: turning checkpointing off must
    # leave nothing behind (transformers' input-grad hook made later plain measurements keep more).
    # (lora-fa: under full fine-tuning the embedding output requires grad anyway.)
    kw = dict(methods=["lora-fa"], checkpointing=checkpointing, attention="eager")
    total_20 = plan(tmp_path, "llama", **kw, seq_len=20)["methods"][0]["total"]
    found = plan(tmp_path, "llama", **kw, gpu_memory=f"{total_20}B", search="seq")["methods"][0][
        "max_seq_len"
    ]
    assert found == 20
    capped = plan(tmp_path, "llama", **kw, gpu_memory="1TB", search="seq")["methods"][0]["max_seq_len"]
    assert capped == 64  # max_position_embeddings


# ---- input errors -----------------------------------------------------------------------------------------------
def test_sizes_parse_with_si_and_binary_units():
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("80G") == 80 * 2**30
    assert parse_size("141GB") == 141 * 10**9
    assert parse_size("1.5 gib") == int(1.5 * 2**30)
    assert parse_size("40") == 40 * 10**9
    assert parse_size("512MiB") == 512 * 2**20


@pytest.mark.parametrize("bad", ["24 GiBs", "GB", "-4GB", "24GiB2", "", "24 gigs"])
def test_unparseable_sizes_are_rejected_naming_the_flag(bad):
    with pytest.raises(ValueError, match="--gpu-memory: cannot parse memory size"):
        parse_size(bad)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(preset="llama-9000"), "--preset: unknown preset 'llama-9000'"),
        (dict(preset="llama-2-7b", batch_size=0), "--batch-size must be a positive integer"),
        (dict(preset="llama-2-7b", batch_size=-3), "--batch-size"),
        (dict(preset="llama-2-7b", seq_len=0), "--seq-len"),
        (dict(preset="llama-2-7b", dtype="fp12"), "--dtype: unknown dtype 'fp12'"),
        (dict(preset="llama-2-7b", gpu_memory="24 GiBs"), "--gpu-memory: cannot parse"),
        (dict(preset="llama-2-7b", methods=["qlora"]), "--methods"),
        (dict(preset="llama-2-7b", attention="flash3"), "--attention"),
        (dict(preset="llama-2-7b", gpu_memory="1GiB", reserve="2GiB"), "--reserve 2GiB leaves nothing"),
        (dict(preset="roberta-base", seq_len=513), "--seq-len 513 exceeds the model's 512 positions"),
        (dict(preset="roberta-base", seq_len=513), "--seq-len 513 exceeds the model's 512 positions"),
        (dict(), "exactly one of --preset or --config"),
    ],
)
def test_bad_arguments_raise_naming_the_flag(kw, match):
    with pytest.raises(ValueError, match=match):
        run_planner(PlannerArgs(**kw))


def test_unreadable_configs_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="--config: no such file"):
        run_planner(PlannerArgs(config=str(tmp_path / "missing.json")))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="--config: cannot read"):
        run_planner(PlannerArgs(config=str(broken)))
    (tmp_path / "nomodel.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="no 'model_type'"):
        run_planner(PlannerArgs(config=str(tmp_path / "nomodel.json")))
    (tmp_path / "alien.json").write_text(json.dumps({"model_type": "not-a-model"}))
    with pytest.raises(ValueError, match="unsupported model_type"):
        run_planner(PlannerArgs(config=str(tmp_path / "alien.json")))
    (tmp_path / "odd.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 5}))
    with pytest.raises(ValueError, match="--config: llama config rejected"):
        run_planner(PlannerArgs(config=str(tmp_path / "odd.json")))


def test_a_config_without_its_sizes_says_it_plans_defaults(tmp_path, caplog):
    from lorafa.planner_models import load_config

    (tmp_path / "bare.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 128}))
    load_config(PlannerArgs(config=str(tmp_path / "bare.json")))
    assert "sets no hidden_size, num_hidden_layers, num_attention_heads" in caplog.text


def test_dtype_names():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32


def test_presets_build_on_meta():
    # Every preset instantiates and its parameter count is that of the public model (±1% for heads).
    from lorafa.planner import build_model, load_config, resolve_task

    expected = {"roberta-base": 125e6, "t5-base": 223e6, "llama-2-7b": 6.74e9, "qwen2.5-7b": 7.62e9}
    for name, n in expected.items():
        config = load_config(PlannerArgs(preset=name))
        model = build_model(config, resolve_task(config, "auto"), torch.bfloat16, "sdpa-flash")
        params = sum(p.numel() for p in model.parameters())
        assert abs(params - n) / n < 0.01, (name, params)
    assert set(expected) <= set(PRESETS)


# ---- command line ------------------------------------------------------------------------------------------------
def test_cli_table_json_and_plot(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config("llama", "sdpa-flash")))
    common = ["--config", str(path), "--batch-size", "2", "--seq-len", "8", "--methods", "full", "peft-lora"]
    assert main([*common, "--json", "--gpu-memory", "3MB", "--max-search", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [e["method"] for e in report["methods"]] == ["full", "full", "peft-lora", "peft-lora"]
    assert all(e["max_batch_size"] > 0 for e in report["methods"])
    png = tmp_path / "plan.png"
    assert main([*common, "--checkpointing", "off", "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    assert table.startswith(str(path)) and "peft-lora" in table and "activations" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert format_table(report).count("\n") > 4
    # A chart that cannot be written: one line, exit 2, and the earlier chart kept whole.
    before = png.read_bytes()
    (tmp_path / "dir.png").mkdir()
    assert main([*common, "--checkpointing", "off", "--plot", str(tmp_path / "dir.png")]) == 2
    assert "cannot write the chart" in capsys.readouterr().err

    def broken(self, path, **kw):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    import matplotlib.figure

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.figure.Figure, "savefig", broken)
        assert main([*common, "--checkpointing", "off", "--plot", str(png)]) == 2
    assert png.read_bytes() == before


def test_cli_errors_exit_2_with_a_message(capsys, monkeypatch):
    assert main(["--preset", "nope"]) == 2
    assert "--preset: unknown preset 'nope'" in capsys.readouterr().err
    assert main(["--preset", "llama-2-7b", "--gpu-memory", "24 GiBs"]) == 2
    assert "24 GiBs" in capsys.readouterr().err
    from lorafa.planner_args import parse_size

    assert parse_size("80") == 80 * 10**9 and parse_size("1048576", "--offload-min-bytes", bare=1) == 2**20

    # A model whose forward reads its inputs' values cannot run on meta (BART's mask check with SDPA): one line.
    def meta_failure(args):
        raise RuntimeError("Tensor.item() cannot be called on meta tensors\n  more detail")

    monkeypatch.setattr(lorafa.planner, "run_planner", meta_failure)
    assert main(["--preset", "llama-2-7b"]) == 2
    err = capsys.readouterr().err
    assert "cannot run without data on the meta device" in err and "--attention eager" in err
    assert len(err.strip().splitlines()) == 1


def test_memory_subparser_wires_into_an_argparse_cli(tmp_path, capsys):
    import argparse

    from lorafa.planner import add_memory_subparser

    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config("llama", "sdpa-flash")))
    parser = argparse.ArgumentParser(prog="lorafa")
    add_memory_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["memory", "--config", str(path), "--seq-len", "8", "--methods", "full", "--json"]
    )
    assert args.run(args) == 0
    assert json.loads(capsys.readouterr().out)["methods"][0]["method"] == "full"


# ---- real small models (offline assets) ---------------------------------------------------------------------------
def _asset(name: str):
    from lorafa import assets

    try:
        return getattr(assets, name)()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _compare_pretrained(folder, auto, task: str, attention: str, method: str, seq_len: int) -> None:
    report = run_planner(
        PlannerArgs(
            config=str(folder),
            batch_size=B,
            seq_len=seq_len,
            dtype="float32",
            r=R,
            methods=[method],
            device="cpu",
            checkpointing="off",
            task=task,
            attention=attention,
        )
    )
    impl = "sdpa" if attention == "sdpa-flash" else "eager"
    model = auto.from_pretrained(folder, dtype=torch.float32, attn_implementation=impl)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (B, seq_len), generator=g)
    if task == "seq-cls":
        batch = {"input_ids": ids, "labels": torch.zeros(B, dtype=torch.long)}
        heads = ["classifier"]
    else:
        batch = {"input_ids": ids, "labels": ids, "use_cache": False}
        heads = None
    real = tracked_step(model, method, False, batch, heads)
    assert report["methods"][0]["activations_saved"] == real.total_bytes


@pytest.mark.assets
@pytest.mark.parametrize("method", ["full", "lora-fa", "peft-lora"])
def test_planner_equals_real_minilm_step(method):
    # MiniLM (BERT) trains with attention dropout 0.1, for which CPU SDPA has no flash kernel: compare eager.
    from transformers import AutoModelForSequenceClassification

    folder = _asset("minilm_path")
    _compare_pretrained(folder, AutoModelForSequenceClassification, "seq-cls", "eager", method, 16)


@pytest.mark.assets
@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora-fa", "peft-lora"])
def test_planner_equals_real_smollm2_step(method):
    # SmolLM2 (LLaMA-shaped, 30 layers, GQA) has no attention dropout: CPU SDPA runs its flash kernel.
    from transformers import AutoModelForCausalLM

    folder = _asset("smollm2_model_dir")  # converted from the GGUF once (~20 s), then cached
    _compare_pretrained(folder, AutoModelForCausalLM, "causal-lm", "sdpa-flash", method, 16)


# ---- below-the-floor options: chunked loss, cheap recompute, offloading -----------------------------------------
def compare_option(tmp_path, family: str, attention: str, method: str, **options) -> dict:
    """The planner with `options` against real CPU steps with the same options, checkpointing off and on."""
    flags = {"chunked_loss": "chunked_loss", "cheap_recompute": "cheap_recompute"}
    report = plan(tmp_path, family, attention, methods=[method], **{flags[k]: v for k, v in options.items()})
    off, on = report["methods"]
    check_against_real_step(family, attention, method, off, on, **options)
    return report


@pytest.mark.parametrize("method", ["full", "lora-fa", "peft-lora"])
def test_planner_chunked_loss_equals_a_real_cpu_step(tmp_path, method):
    report = compare_option(tmp_path, "llama", "sdpa-flash", method, chunked_loss=True)
    plain = plan(tmp_path, "llama", "sdpa-flash", methods=[method], checkpointing="off")["methods"][0]
    off = report["methods"][0]
    if (
        method != "full"
    ):  # a trainable head makes the chunked loss keep dW (V, d), more than this tiny model's logits
        # No fp32 (tokens × vocab) log-probabilities: the vocabulary (128) is larger than d (64), so it saves less.
        assert off["activations_by_category"]["loss"] < plain["activations_by_category"]["loss"]
        assert off["activations_saved"] < plain["activations_saved"]
    assert report["settings"]["chunked_loss"] and "chunked loss" in format_table(report)


@pytest.mark.parametrize(
    "family, attention, method",
    [
        ("llama", "sdpa-flash", "full"),
        ("llama", "sdpa-flash", "lora-fa"),
        ("llama", "sdpa-flash", "peft-lora"),
        ("roberta", "eager", "lora-fa"),  # attention and hidden dropout: regenerated masks
        ("roberta", "sdpa-flash", "lora"),
    ],
)
def test_planner_cheap_recompute_equals_a_real_cpu_step(tmp_path, family, attention, method):
    report = compare_option(tmp_path, family, attention, method, cheap_recompute=True)
    plain = plan(tmp_path, family, attention, methods=[method], checkpointing="off")["methods"][0]
    assert report["methods"][0]["activations_saved"] < plain["activations_saved"]


def test_planner_chunked_loss_with_cheap_recompute_equals_a_real_cpu_step(tmp_path):
    compare_option(tmp_path, "llama", "sdpa-flash", "lora-fa", chunked_loss=True, cheap_recompute=True)


def test_recompute_on_cuda_counts_no_host_rng_state(tmp_path):
    # RegeneratedDropout keeps an RNG state, a host tensor (on CUDA, 16 bytes): no device memory with device cuda.
    kw = dict(methods=["lora-fa"], checkpointing="off", cheap_recompute=True)
    cuda = plan(tmp_path, "roberta", "eager", device="cuda", **kw)["methods"][0]
    real = real_step("roberta", "eager", "lora-fa", False, cuda_dropout=True, cheap_recompute=True)
    rng_states = [
        r for r in real.records if r.dtype == torch.uint8 and r.shape == tuple(torch.get_rng_state().shape)
    ]
    assert rng_states  # one per dropout that ran
    assert cuda["activations_saved"] == real.total_bytes - sum(r.nbytes for r in rng_states)


class CpuCopier:
    """An offload copier that "moves" CPU tensors to CPU copies: the library's hooks run as on a GPU.

    Records the storages it moves: OffloadStats.bytes counts each moved view, and one storage may be saved as
    several views (e.g. a tensor and its transpose).
    """

    def __init__(self):
        self.storages = {}  # data_ptr -> storage, kept alive so that no address is reused meanwhile

    def accepts(self, t):
        return t.device.type == "cpu"

    def to_host(self, t):
        self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage()
        return t.clone(memory_format=torch.preserve_format)

    def to_device(self, handle):
        return handle


@pytest.mark.parametrize("method", ["full", "lora-fa"])
def test_planner_offload_equals_a_real_offloaded_step(tmp_path, method):
    # The reference offloads a real CPU step with the library's hooks and a CPU "host" copier (device cuda's
    # dropout kernel), so what stays is what the planner counts on the device.
    min_bytes = 4096  # tiny model: its (B, T, d) fp32 tensors (8 KiB) move, LoRA-FA's u (512 B) stays
    report = plan(
        tmp_path, "llama", "sdpa-flash", methods=[method], device="cuda", offload=True,
        offload_min_bytes=f"{min_bytes}B",
    )  # fmt: skip
    plain = plan(tmp_path, "llama", "sdpa-flash", methods=[method], device="cuda")["methods"]
    for entry, no_offload, ckpt in zip(report["methods"], plain, (False, True), strict=True):
        copier = CpuCopier()
        offload = {"min_bytes": min_bytes, "copier": copier}
        real = real_step("llama", "sdpa-flash", method, ckpt, cuda_dropout=True, offload=offload)
        moved = sum(st.nbytes() for st in copier.storages.values())
        assert 0 < moved < real.total_bytes
        assert entry["activations_offloaded"] == moved
        assert entry["activations_saved"] == real.total_bytes - moved
        assert entry["activations_saved"] + entry["activations_offloaded"] == no_offload["activations_saved"]
        assert 0 < entry["activations_transient"] <= entry["activations_offloaded"]
        assert entry["activations"] == (
            entry["activations_saved"] + entry["activations_recompute"] + entry["activations_transient"]
        )
        assert entry["activations"] < no_offload["activations"]
    assert "host (offloaded)" in format_table(report)


def test_offload_on_cpu_is_a_no_op(tmp_path):
    kw = dict(methods=["lora-fa"], checkpointing="off")
    with_offload = plan(tmp_path, "llama", "sdpa-flash", offload=True, **kw)
    without = plan(tmp_path, "llama", "sdpa-flash", **kw)
    assert with_offload["methods"] == without["methods"]
    assert with_offload["settings"]["offload_min_bytes"] is None
    assert any("no-op" in n for n in with_offload["notes"])


def test_options_change_the_batch_search(tmp_path):
    kw = dict(methods=["lora-fa"], checkpointing="off", gpu_memory="4MB")
    plain = plan(tmp_path, "llama", "sdpa-flash", **kw)["methods"][0]["max_batch_size"]
    chunked = plan(tmp_path, "llama", "sdpa-flash", chunked_loss=True, cheap_recompute=True, **kw)
    assert chunked["methods"][0]["max_batch_size"] > plain > 0


@pytest.mark.parametrize(
    "family, kw, match",
    [
        (
            "roberta",
            dict(chunked_loss=True),
            "--chunked-loss: the chunked loss is for causal LMs; .*'seq-cls'",
        ),
        ("t5", dict(chunked_loss=True), "--chunked-loss: .*'seq2seq'"),
        ("llama", dict(chunked_loss=True, task="seq-cls"), "--chunked-loss: .*'seq-cls'"),
        ("llama", dict(offload=True, offload_min_bytes="lots"), "--offload-min-bytes: cannot parse"),
    ],
)
def test_bad_option_combinations_raise_naming_the_flag(tmp_path, family, kw, match):
    with pytest.raises(ValueError, match=match):
        plan(tmp_path, family, "sdpa-flash", **kw)


def test_cli_options(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config("llama", "sdpa-flash")))
    common = ["--config", str(path), "--batch-size", "2", "--seq-len", "8", "--methods", "lora-fa"]
    flags = ["--chunked-loss", "--cheap-recompute", "--offload", "--offload-min-bytes", "2KiB"]
    assert main([*common, *flags, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    s = report["settings"]
    assert s["chunked_loss"] and s["cheap_recompute"] and s["offload"] and s["offload_min_bytes"] == 2048
    args = PlannerArgs(config=str(path), batch_size=2, seq_len=8, methods=["lora-fa"], chunked_loss=True,
                       cheap_recompute=True, offload=True, offload_min_bytes="2KiB")  # fmt: skip
    assert report == json.loads(json.dumps(run_planner(args)))
    png = tmp_path / "plan.png"
    assert main([*common, *flags, "--checkpointing", "off", "--plot", str(png)]) == 0
    assert "chunked loss, cheap recompute, offload" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --targets takes one regex or all-linear as lorafa train does (a list was matched as names: nothing matched)
    def trainable(*targets: str) -> int:
        assert main([*common, "--checkpointing", "off", "--json", "--targets", *targets]) == 0
        return json.loads(capsys.readouterr().out)["methods"][0]["trainable_params"]

    assert trainable("all-linear") == trainable("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj")  # fmt: skip
    assert trainable(r".*self_attn\.(q|v)_proj") == trainable("q_proj", "v_proj")
    roberta = tmp_path / "roberta.json"
    roberta.write_text(json.dumps(tiny_config("roberta", "sdpa-flash")))
    assert main(["--config", str(roberta), "--seq-len", "8", "--chunked-loss"]) == 2
    assert "--chunked-loss" in capsys.readouterr().err


def test_a_decoder_classifier_without_a_pad_id_is_planned(tmp_path):
    # GPT-2/Qwen2/Llama-3 configs have no pad_token_id; transformers' classifier then refuses batches > 1, while
    # lorafa train sets one from the tokenizer. The planner must plan it too.
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(model_type="gpt2", vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)))
    report = run_planner(PlannerArgs(config=str(path), task="seq-cls", batch_size=2, seq_len=8, methods=["lora-fa"]))
    assert report["methods"][0]["activations"] > 0
