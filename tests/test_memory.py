"""lorafa.memory: unique-storage accounting of saved tensors, per-module attribution, static memory, peak memory."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorafa.memory import CATEGORIES, SavedTensorTracker, peak_memory_bytes, static_memory


def raw_saved(fn, params):
    """Reference: every tensor autograd saves while running fn, deduplicated by storage address by hand."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    excluded = {p.untyped_storage().data_ptr() for p in params}
    storages = {}
    for t in saved:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            storages[ptr] = t.untyped_storage().nbytes()
    return out, sum(storages.values()), len(saved)


def test_views_and_parameters_count_once():
    lin = nn.Linear(8, 6)
    x = torch.randn(5, 8, requires_grad=True)

    def step():
        y = x.exp()  # saves y (its output)
        z = y[1:] * y[:-1]  # saves two views of y: nothing new
        w = lin(z)  # saves z and lin.weight (a parameter)
        return (w @ lin.weight).sum()  # saves w and a parameter again

    with SavedTensorTracker(lin) as tracker:
        step()
    _, expected, n_saved = raw_saved(step, list(lin.parameters()))
    assert n_saved > len(tracker.records)  # the dedup did something
    assert tracker.total_bytes == expected
    y_bytes, z_bytes, w_bytes = 5 * 8 * 4, 4 * 8 * 4, 4 * 6 * 4
    assert tracker.total_bytes == y_bytes + z_bytes + w_bytes
    # A view of a parameter is a parameter too: with a frozen weight, mm saves only weight.t().t().
    lin.weight.requires_grad_(False)
    with SavedTensorTracker(lin) as tracker:
        torch.randn(3, 6, requires_grad=True) @ lin.weight.t().t()
    assert tracker.total_bytes == 0


def test_without_model_parameters_of_running_modules_are_excluded():
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorTracker() as tracker:
        lin(torch.tanh(x))  # tanh saves its output; linear saves that output and its weight
    assert tracker.total_bytes == 4 * 8 * 4
    assert tracker.by_module == {"": 4 * 8 * 4}


def test_by_module_attribution_and_categories():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

        def forward(self, x):
            return x + self.mlp(self.norm(x))

    model = nn.Sequential(Block(), Block())
    x = torch.randn(3, 7, 16, requires_grad=True)
    with SavedTensorTracker(model) as tracker:
        loss = model(x).pow(2).sum()  # pow saves its input outside any submodule of `model`
    loss.backward()  # tracked tensors still work in backward
    by_module = tracker.by_module
    assert sum(by_module.values()) == tracker.total_bytes
    _, expected, _ = raw_saved(lambda: model(x).pow(2).sum(), list(model.parameters()))
    assert tracker.total_bytes == expected
    assert by_module["0.mlp.1"] == 3 * 7 * 32 * 4  # GELU saves its input
    assert by_module["0.mlp.2"] == 3 * 7 * 32 * 4  # the second linear saves GELU's output
    cats = tracker.by_category()
    assert set(cats) == set(CATEGORIES) and sum(cats.values()) == tracker.total_bytes
    assert cats["norm"] > 0 and cats["mlp"] > 0 and cats["loss"] == 3 * 7 * 16 * 4


def test_non_reentrant_checkpointing_counts_only_what_is_kept():
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)) for _ in range(3))
    x = torch.randn(4, 16, requires_grad=True)

    def forward():
        h = x
        for block in blocks:
            h = checkpoint(block, h, use_reentrant=False)
        return h.sum()

    with SavedTensorTracker(blocks) as tracker:
        loss = forward()
    # Kept: the input of each checkpointed block (x and two block outputs), nothing from inside the blocks.
    assert tracker.total_bytes == 3 * 4 * 16 * 4
    loss.backward()  # recomputation in backward is not counted and still works
    with SavedTensorTracker(blocks) as plain:
        sum(b(x) for b in blocks).sum()
    assert plain.total_bytes > tracker.total_bytes


def test_meta_device_matches_real_device():
    def build(device):
        torch.manual_seed(0)
        with torch.device(device):
            return nn.Sequential(
                nn.Embedding(50, 16), nn.LayerNorm(16), nn.Linear(16, 40), nn.ReLU(), nn.Linear(40, 50)
            )

    results = {}
    for device in ("cpu", "meta"):
        model = build(device)
        ids = torch.randint(0, 50, (3, 9)).to(device)
        with SavedTensorTracker(model) as tracker:
            logits = model(ids)
            nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
        results[device] = (tracker.total_bytes, tracker.by_module)
    assert results["meta"] == results["cpu"]
    assert results["cpu"][0] > 0


def test_freed_storage_reused_is_counted_again():
    x = torch.randn(64, 64, requires_grad=True)
    addresses = []
    with SavedTensorTracker() as tracker:
        for _ in range(20):
            y = x.exp()  # saves y
            addresses.append(y.untyped_storage()._cdata)
            del y  # frees y's graph: the next storage may get the same address, and must count again
    assert len(set(addresses)) < len(addresses), "the allocator reused no address; the test proves nothing"
    assert tracker.total_bytes == 20 * 64 * 64 * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_memory_matches_a_real_adamw_step(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.LayerNorm(20), nn.Linear(20, 3)).to(dtype)
    model[1].requires_grad_(False)
    model.register_buffer("scale", torch.ones(5, dtype=torch.float32))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(4, 12, dtype=dtype)).sum().backward()
    opt.step()

    st = static_memory(model, "adamw", mixed_precision=False)  # what torch's AdamW does on these parameters
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert st.grads == sum(p.grad.nbytes for p in trainable)
    state_bytes = sum(
        v.nbytes for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")
    )
    assert st.optimizer == state_bytes
    assert st.master_weights == 0
    all_tensors = [*model.parameters(), *model.buffers()]
    assert st.weights == sum(t.nbytes for t in all_tensors)
    assert st.weights_by_dtype["float32"] == sum(t.nbytes for t in all_tensors if t.dtype == torch.float32)
    assert st.trainable_params == sum(p.numel() for p in trainable)

    mp = static_memory(model, "adamw", mixed_precision=True)
    n = st.trainable_params
    assert mp.optimizer == 8 * n
    assert mp.master_weights == (4 * n if dtype == torch.bfloat16 else 0)
    assert static_memory(model, "none").grads == 0 and static_memory(model, "sgd").optimizer == 0
    with pytest.raises(ValueError, match="optimizer"):
        static_memory(model, "adam-typo")


def test_static_memory_counts_tied_weights_once():
    emb = nn.Embedding(30, 8)
    head = nn.Linear(8, 30, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    assert static_memory(model).weights == 30 * 8 * 4


def test_peak_memory_on_cpu_is_at_least_current_rss():
    with open(f"/proc/{os.getpid()}/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert peak_memory_bytes("cpu") >= rss * 0.99
