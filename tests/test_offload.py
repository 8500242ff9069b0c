"""Activation offloading (hook logic with a fake device copy, CPU no-op, CUDA behind a marker) and the CPU
allocator settings: both decide where training memory lives."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import warnings
import weakref

import pytest
import torch
import transformers as tf
from torch import nn

import lorafa
from lorafa import allocator, offload
from lorafa.allocator import OPT_OUT_ENV, malloc_settings, reexec_with_malloc_tuning, should_tune_malloc
from lorafa.models import enable_activation_checkpointing
from lorafa.offload import OffloadStats, offload_activations
from lorafa.recompute import enable_cheap_recompute


class FakeCopier:
    """'Offloads' CPU tensors into fresh storages, as a device→host copy would, and records what it moved."""

    def __init__(self) -> None:
        self.moved: list[torch.Tensor] = []  # meta tensors: shape and dtype of what moved
        self.moved_ptrs: list[int] = []
        self.restores = 0

    def accepts(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu"

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        self.moved.append(torch.empty(t.shape, dtype=t.dtype, device="meta"))
        self.moved_ptrs.append(t.untyped_storage().data_ptr())
        return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype).copy_(t)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        self.restores += 1
        return torch.empty_strided(host.size(), host.stride(), dtype=host.dtype).copy_(host)


def tiny_llama(**kw):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **kw,
    )
    return tf.LlamaForCausalLM(cfg).train()


def batch(device="cpu"):
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    return {"input_ids": ids, "labels": ids}


def loss_and_grads(model, params, offload_ctx=None):
    torch.manual_seed(0)
    device = next(model.parameters()).device
    if offload_ctx is None:
        loss = model(**batch(device)).loss
    else:
        with offload_ctx:
            loss = model(**batch(device)).loss
    loss.backward()
    grads = tuple(p.grad.clone() for p in params)
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("min_bytes", [0, 4096])
def test_offloaded_gradients_are_identical(min_bytes):
    model = tiny_llama()
    params = list(model.parameters())
    want = loss_and_grads(model, params)
    copier = FakeCopier()
    got = loss_and_grads(model, params, offload_activations(min_bytes, copier=copier))
    assert_same(got, want)
    assert copier.moved and copier.restores >= len(copier.moved)
    assert all(m.numel() * m.element_size() >= min_bytes for m in copier.moved)


def test_parameters_and_their_views_stay_and_stats_count_moves():
    model = tiny_llama()
    model.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    copier = FakeCopier()
    with offload_activations(0, copier=copier) as stats:
        loss = model(**batch()).loss
    loss.backward()
    assert not param_ptrs & set(copier.moved_ptrs)  # Linear layers save weight.t(): a view, also skipped
    assert stats.tensors == len(copier.moved) > 0
    assert stats.bytes == sum(m.numel() * m.element_size() for m in copier.moved)


def test_offloaded_storage_is_released_and_duplicates_move_once():
    x = torch.randn(4096, requires_grad=True)

    def forward():
        tmp = x * 2.0  # saved by sin (its input) and by the product below: the same tensor twice
        ref = weakref.ref(tmp)
        out = (tmp.sin() * tmp).sum()
        del tmp
        return out, ref

    out, ref = forward()
    assert ref() is not None  # plain autograd keeps the temporary alive for backward
    (want,) = torch.autograd.grad(out, x)

    copier = FakeCopier()
    with offload_activations(1024, copier=copier) as stats:
        out, ref = forward()
    assert ref() is None  # only the copy remains
    assert len(copier.moved) == stats.tensors == 2  # tmp once, sin's output once
    (got,) = torch.autograd.grad(out, x)
    assert_same(got, want)


def test_excluded_tensors_stay():
    x, y = torch.randn(4096, requires_grad=True), torch.randn(4096, requires_grad=True)
    keep = torch.randn(4096)
    copier = FakeCopier()
    with offload_activations(0, exclude=[keep], copier=copier):
        (x * keep * y).sum()  # the first product saves keep, the second saves x·keep and y
    assert keep.untyped_storage().data_ptr() not in copier.moved_ptrs
    assert y.untyped_storage().data_ptr() in copier.moved_ptrs and len(copier.moved_ptrs) == 2


@pytest.mark.parametrize("reentrant", [False, True])
def test_composes_with_activation_checkpointing(reentrant):
    model = tiny_llama()
    params = list(model.parameters())
    want = loss_and_grads(model, params)
    enable_activation_checkpointing(model, use_reentrant=reentrant)
    copier = FakeCopier()
    got = loss_and_grads(model, params, offload_activations(0, copier=copier))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    assert copier.moved


def test_composes_with_lorafa_and_cheap_recompute():
    cfg = lorafa.LoRAFAConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear")
    model = lorafa.add_lorafa(tiny_llama(), cfg)
    for _, layer in lorafa.lorafa_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.02)
    enable_cheap_recompute(model)
    params = [p for p in model.parameters() if p.requires_grad]
    want = loss_and_grads(model, params)
    copier = FakeCopier()
    got = loss_and_grads(model, params, offload_activations(0, copier=copier))
    assert_same(got, want)
    assert copier.moved


def test_cpu_is_a_noop_that_warns_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    offload._warn_no_cuda.cache_clear()
    model = tiny_llama()
    params = list(model.parameters())
    want = loss_and_grads(model, params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = loss_and_grads(model, params, offload_activations())
        with offload_activations() as stats:
            pass
    assert_same(got, want)
    assert stats == OffloadStats()
    assert len(caught) == 1 and "CUDA is not available" in str(caught[0].message)


def test_negative_threshold_is_rejected():
    with pytest.raises(ValueError, match="min_bytes"), offload_activations(-1):
        pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_frees_device_memory_and_is_exact():
    model = tiny_llama().cuda()
    params = list(model.parameters())
    want = loss_and_grads(model, params)

    def held_after_forward(ctx):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        with ctx:
            loss = model(**batch("cuda")).loss
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() - base, loss

    held_plain, _ = held_after_forward(contextlib.nullcontext())
    with offload_activations(0) as stats:
        pass
    held_offloaded, loss = held_after_forward(offload_activations(0))
    assert held_offloaded < held_plain
    got = loss_and_grads(model, params, offload_activations(0))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert stats == OffloadStats()  # an empty block moves nothing


# ---- CPU allocator settings --------------------------------------------------------------------------------


def test_malloc_settings_and_when_they_apply():
    settings = malloc_settings()
    assert settings["MALLOC_MMAP_THRESHOLD_"] == "65536" and "MALLOC_TRIM_THRESHOLD_" in settings
    glibc_linux = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert should_tune_malloc("cpu", {}) is glibc_linux
    assert not should_tune_malloc("cuda:0", {})
    assert not should_tune_malloc("cpu", {OPT_OUT_ENV: "1"})
    assert not should_tune_malloc("cpu", {"MALLOC_MMAP_THRESHOLD_": "1048576"})  # the user's own value wins
    assert should_tune_malloc("cpu", {OPT_OUT_ENV: "0"}) is glibc_linux


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"), reason="glibc only"
)
@pytest.mark.parametrize("opt_out", [False, True])
def test_reexec_sets_the_environment_once(opt_out):
    # Load the module from its file, not through the package, so the child skips importing torch.
    code = (
        "import importlib.util as u, os; "
        f"s = u.spec_from_file_location('allocator', {allocator.__file__!r}); a = u.module_from_spec(s); "
        "s.loader.exec_module(a); print('start', flush=True); a.reexec_with_malloc_tuning('cpu'); "
        "print(os.environ.get('MALLOC_MMAP_THRESHOLD_'))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != OPT_OUT_ENV}
    if opt_out:
        env[OPT_OUT_ENV] = "1"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    # Re-executed once: the first process printed "start" and was replaced; the second one did not re-exec.
    assert out == (["start", "None"] if opt_out else ["start", "start", "65536"])


def test_reexec_is_a_noop_off_cpu():
    reexec_with_malloc_tuning("cuda")  # returns: nothing to do for a GPU run
