"""The benchmark tool: a smoke run through real worker processes, in-process jobs, ratios, checks and the CLI.

Every expectation is derived in the test from the models themselves (parameter shapes, token counts) or from
other numbers of the same run; nothing is a number copied from an earlier run.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from lorafa import bench
from lorafa.bench import Job, run_benchmark, run_job

R = 4


def _adapted_linears(model_name: str) -> list[nn.Linear]:
    """The linear layers lorafa adapts by default in `model_name` (all block linears), from a fresh model."""
    from lorafa.config import LoRAFAConfig
    from lorafa.heads import classification_head_names
    from lorafa.targets import resolve_targets

    model = bench.MODELS[model_name].build(torch.float32)
    heads = classification_head_names(model)
    names = resolve_targets(model, LoRAFAConfig(r=R, modules_to_save=heads or None))
    return [model.get_submodule(n) for n in names]  # type: ignore[misc]


def _param_bytes(model_name: str) -> int:
    model = bench.MODELS[model_name].build(torch.float32)
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def test_smoke_run_writes_report_with_consistent_numbers(tmp_path):
    batch, seq = 2, 32
    rows = run_benchmark(
        ["tiny-llama"],
        ["peft-lora", "lora-fa", "floor"],
        batch=batch,
        seq=seq,
        steps=2,
        dropout=0.05,
        out_dir=tmp_path,
        warmup=0,
        r=R,
        lora_alpha=8,
        threads=1,
        log=lambda s: None,
    )
    assert [r["status"] for r in rows] == ["ok"] * 3, [r.get("error") for r in rows]
    by = {r["method"]: r for r in rows}
    peft, fa, floor = by["peft-lora"], by["lora-fa"], by["floor"]

    # Files: the report names every method, the settings and the command; the chart is a PNG; JSON round-trips.
    md = (tmp_path / "BENCHMARKS.md").read_text()
    for row in rows:
        assert bench.METHODS[row["method"]].label in md
    assert "python -m lorafa.bench --models tiny-llama" in md and "--allocator lorafa" in md
    assert all(f"{k}={v}" in md for k, v in bench.malloc_env("lorafa").items())
    assert (tmp_path / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        json.loads((tmp_path / "benchmarks.json").read_text())["rows"][1]["saved_bytes"] == fa["saved_bytes"]
    )

    # The allocator setting (by default the one `lorafa train` uses on CPU) reached every worker.
    assert all(r["malloc_env"] == bench.malloc_env("lorafa") for r in rows)

    # LoRA-FA keeps fewer bytes than PEFT LoRA, and at most the floor plus one (tokens, r) tensor per adapter.
    linears = _adapted_linears("tiny-llama")
    u_bytes = len(linears) * batch * seq * R * 4
    assert fa["saved_bytes"] < peft["saved_bytes"]
    assert fa["saved_bytes"] <= floor["saved_bytes"] + u_bytes

    # Trainable parameters: B only (d_out x r) for LoRA-FA; A and B for PEFT LoRA; none for the floor.
    assert fa["trainable_params"] == sum(m.out_features * R for m in linears)
    assert peft["trainable_params"] == sum((m.in_features + m.out_features) * R for m in linears)
    assert floor["trainable_params"] == 0

    for row in rows:
        # Live tensors at the peak include the weights and what backward keeps; the process holds all of it.
        assert row["peak_live_bytes"] >= _param_bytes("tiny-llama") + row["saved_bytes"]
        assert row["peak_rss_bytes"] >= row["peak_live_bytes"]
        assert not row["notes"]  # the RSS high-water mark was reset after setup (Linux)
        assert row["tokens_per_s"] == pytest.approx(batch * seq / row["step_s"])
        assert len(row["step_times_s"]) == 2
        assert row["vs_peft"]["saved_bytes"] == pytest.approx(row["saved_bytes"] / peft["saved_bytes"])
    assert peft["vs_peft"]["step_s"] == 1.0

    found = {c["check"]: c for c in bench.checks(rows, "tiny-llama")}
    ratio = fa["saved_bytes"] / floor["saved_bytes"]
    assert found["saved: lora-fa ÷ floor"]["value"] == pytest.approx(ratio)
    assert found["saved: lora-fa ÷ floor"]["passed"] == (ratio <= 1.01)


def _job(model: str, method: str, **kw) -> Job:
    p = 0.05 if bench.METHODS[method].uses_dropout else None
    settings = dict(
        batch=2, seq=16, steps=1, warmup=0, r=R, lora_alpha=8, lr=1e-3, device="cpu", dtype="float32"
    )
    return Job(model=model, method=method, dropout=p, **{**settings, **kw})


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert", "tiny-t5"])
def test_in_process_jobs_on_decoder_encoder_and_seq2seq_models(model):
    methods = ("full", "peft-lora", "lora-fa", "lora-fa-ckpt", "lora-fa-lean", "lora-fa-shared")
    res = {m: run_job(_job(model, m, profile_live=False)) for m in methods}
    assert all(r["status"] == "ok" for r in res.values())
    assert res["lora-fa"]["saved_bytes"] < res["peft-lora"]["saved_bytes"]
    # Every family has sibling projections reading one input (q/k/v; T5's cross-attention k/v): fewer u's kept.
    assert res["lora-fa-shared"]["saved_bytes"] < res["lora-fa"]["saved_bytes"]
    if (
        bench.MODELS[model].task == "causal-lm"
    ):  # no model dropout, whose masks depend on how many seeds LoRA drew
        assert res["lora-fa-shared"]["first_loss"] == pytest.approx(res["lora-fa"]["first_loss"], rel=1e-5)
    # Checkpointing keeps only block inputs; cheap recompute (+ chunked loss) never keeps more than LoRA-FA.
    assert res["lora-fa-ckpt"]["saved_bytes"] < res["lora-fa"]["saved_bytes"]
    assert res["lora-fa-lean"]["saved_bytes"] <= res["lora-fa"]["saved_bytes"]
    if bench.MODELS[model].task == "causal-lm":
        # The chunked loss never keeps the (tokens x vocab) logits, and it is exact.
        assert res["lora-fa-lean"]["saved_bytes"] < res["lora-fa"]["saved_bytes"]
        assert res["lora-fa-lean"]["first_loss"] == pytest.approx(res["lora-fa"]["first_loss"], rel=1e-5)
    else:
        assert any("chunked loss n/a" in n for n in res["lora-fa-lean"]["notes"])
    assert res["full"]["trainable_params"] == res["full"]["total_params"]
    # Classification heads train alongside the adapters (modules_to_save); B (d_out x r) otherwise.
    built = bench.MODELS[model].build(torch.float32)
    head = sum(p.numel() for p in getattr(built, "classifier", nn.Identity()).parameters())
    assert (
        res["lora-fa"]["trainable_params"] == sum(m.out_features * R for m in _adapted_linears(model)) + head
    )


def test_sequence_longer_than_the_model_is_a_clear_error():
    with pytest.raises(ValueError, match="--seq 200"):
        run_job(_job("tiny-bert", "floor", seq=200))


def test_ratios_and_checks_pair_methods_at_the_same_dropout():
    def row(method: str, p: float | None, saved: int, step: float) -> dict:
        metrics = {
            "saved_bytes": saved,
            "step_s": step,
            "peak_rss_bytes": 10 * saved,
            "peak_live_bytes": 2 * saved,
        }
        return {"model": "m", "method": method, "dropout": p, "status": "ok", **metrics}

    rows = [
        row("full", None, 300, 1.0),
        row("peft-lora", 0.05, 200, 2.0),
        row("peft-lora", 0.0, 180, 1.0),
        row("lora-fa", 0.05, 100, 1.5),
        row("lora-fa", 0.0, 90, 1.2),
        row("floor", None, 99, 0.5),
    ]
    bench._add_ratios(rows)
    assert rows[3]["vs_peft"]["saved_bytes"] == 100 / 200
    assert rows[4]["vs_peft"]["step_s"] == 1.2 / 1.0  # paired with PEFT LoRA at p=0, not p=0.05
    assert rows[0]["vs_peft"]["saved_bytes"] == 300 / 200  # no dropout: the first dropout value's PEFT LoRA
    found = {c["check"]: c for c in bench.checks(rows, "m")}
    assert found["saved: lora-fa ÷ floor"]["value"] == 100 / 99
    assert found["saved: lora-fa ÷ floor"]["passed"] is False  # 1.0101 > 1.01
    assert found["step: lora-fa@0 ÷ peft-lora@0"]["passed"] is False  # 1.2 > 0.9
    assert found["step: lora-fa ÷ peft-lora"]["passed"] is True  # 0.75 <= 1.0
    assert found["peak RSS: full ÷ lora-fa"]["value"] == 3000 / 1000
    assert not any("lean" in c for c in found)  # no lean rows, no lean checks
    # On CUDA the host's RSS holds no activations: its checks give way to the CUDA peak (peak-live rows).
    for r in rows:
        r["cuda_peak_allocated_bytes"] = r["peak_live_bytes"]
    on_gpu = {c["check"] for c in bench.checks(rows, "m")}
    assert not any(c.startswith("peak RSS") for c in on_gpu) and "peak live: full ÷ lora-fa" in on_gpu


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"models": ["no-such-model"]}, "--models"),
        ({"methods": []}, "--methods"),
        ({"batch": 0}, "--batch"),
        ({"dropout": [1.0]}, "--dropout"),
        ({"device": "tpu"}, "--device"),
        ({"allocator": "tcmalloc"}, "--allocator"),
    ],
)
def test_invalid_settings_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        bench.BenchSettings(**kwargs)


def test_cli_subcommand_parses_and_rejects_bad_input(capsys):
    parser = argparse.ArgumentParser(prog="lorafa")
    bench.add_bench_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["bench", "--models", "tiny-llama", "--dropout", "0.05", "0", "--allocator", "glibc"]
    )
    assert args.run is bench.bench_main
    assert args.dropout == [0.05, 0.0] and args.allocator == "glibc"
    assert args.methods == bench.DEFAULT_METHODS
    bad = parser.parse_args(["bench", "--models", "tiny-llama", "--methods", "nope"])
    assert bench.bench_main(bad) == 2  # rejected before any worker starts
    assert "--methods" in capsys.readouterr().err
    for extra, message in ((["--threads", "-2"], "--threads must be >= 1"), (["--timeout", "nan"], "finite")):
        assert bench.bench_main(parser.parse_args(["bench", "--models", "tiny-llama", *extra])) == 2
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.bench_main(parser.parse_args(["bench", "--models", "tiny-llama", "--device", "cuda"])) == 2
        assert "--device cuda: this torch has no CUDA device" in capsys.readouterr().err
