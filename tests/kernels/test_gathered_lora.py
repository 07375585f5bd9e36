"""Gathered LoRA (one adapter per batch row) against a per-row loop of plain products; the Triton kernels.

CPU tests check the reference and RoutedLinear's dispatch; the Triton kernels (prefill and decode) run on CUDA, or
on a CPU under Triton's interpreter (`TRITON_INTERPRET=1` with triton installed), else skip; CUDA graphs need CUDA.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from adapterkit.errors import ConfigError
from helpers import triton_device
from adapterkit.kernels import gathered_lora as module
from adapterkit.kernels.gathered_lora import (
    RoutedLinear,
    gathered_embedding,
    gathered_embedding_reference,
    gathered_lora,
    gathered_lora_reference,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = triton_device()  # "cpu": Triton's interpreter runs the kernels on CPU tensors
kernel_device = pytest.mark.skipif(DEVICE is None, reason="the Triton kernels need CUDA (or TRITON_INTERPRET=1)")


@pytest.fixture
def kernels():
    return pytest.importorskip("adapterkit.kernels._triton_gathered", reason="triton is not installed")


def tables(ranks, n_in, n_out, r_max, dtype=torch.float32, device="cpu", seed=0):
    """Slot tables for adapters of the given ranks (slot 0 zero), and the unpadded factors per slot."""
    g = torch.Generator().manual_seed(seed)
    a_tab = torch.zeros(len(ranks) + 1, r_max, n_in)
    b_tab = torch.zeros(len(ranks) + 1, n_out, r_max)
    factors = [None]
    for slot, r in enumerate(ranks, start=1):
        a = torch.randn(r, n_in, generator=g) / n_in**0.5
        b = torch.randn(n_out, r, generator=g) / r**0.5
        s = 0.5 + slot  # a different scaling per adapter, folded into B
        a_tab[slot, :r] = a
        b_tab[slot, :, :r] = b * s
        factors.append((a, b, s))
    return a_tab.to(device, dtype), b_tab.to(device, dtype), factors


def per_row(x, index, factors, n_out):
    """Each row alone: (x Aᵀ) Bᵀ · s with its own unpadded factors, zero for slot 0."""
    out = []
    for row, slot in enumerate(index.tolist()):
        if slot == 0:
            out.append(torch.zeros(*x[row].shape[:-1], n_out, dtype=torch.float64))
            continue
        a, b, s = (t.double() if torch.is_tensor(t) else t for t in factors[slot])
        out.append(F.linear(F.linear(x[row].double(), a), b) * s)
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(5, 7), (6, 1), (4,), (3, 2, 3)], ids=["prefill", "decode", "2d", "4d"])
def test_reference_matches_per_row_loop(shape):
    n_in, n_out = 24, 40
    a_tab, b_tab, factors = tables([4, 1, 8, 3], n_in, n_out, r_max=8)
    rows = shape[0]
    x = torch.randn(*shape, n_in)
    index = torch.tensor([1, 0, 3, 2, 4, 1][:rows])
    got = gathered_lora_reference(x, a_tab, b_tab, index)
    assert got.shape == (*shape, n_out)
    torch.testing.assert_close(got.double(), per_row(x, index, factors, n_out), atol=1e-5, rtol=0)


def test_out_is_added_not_modified_and_zero_slot_is_exact():
    a_tab, b_tab, _ = tables([4, 2], 16, 12, r_max=4)
    x = torch.randn(3, 5, 16)
    out = torch.randn(3, 5, 12)
    before = out.clone()
    got = gathered_lora(x, a_tab, b_tab, torch.tensor([0, 2, 0]), out)
    assert torch.equal(out, before)
    assert torch.equal(got[0], out[0]) and torch.equal(got[2], out[2])  # no adapter: bit-identical base output
    assert not torch.allclose(got[1], out[1])


def test_rank_padding_is_exact():
    """The same adapter in a table padded to rank 4 and to rank 32 gives the same update."""
    small_a, small_b, _ = tables([3], 16, 8, r_max=4)
    big_a, big_b = torch.zeros(2, 32, 16), torch.zeros(2, 8, 32)
    big_a[:, :4], big_b[:, :, :4] = small_a, small_b
    x = torch.randn(2, 3, 16)
    index = torch.tensor([1, 1])
    torch.testing.assert_close(gathered_lora_reference(x, big_a, big_b, index),
                               gathered_lora_reference(x, small_a, small_b, index), atol=1e-6, rtol=0)


def test_non_contiguous_input_and_other_dtype():
    a_tab, b_tab, factors = tables([2, 5], 16, 8, r_max=5)
    x = torch.randn(16, 3, 4).transpose(0, 2)  # (4, 3, 16), not contiguous
    index = torch.tensor([2, 1, 0, 2])
    torch.testing.assert_close(gathered_lora_reference(x, a_tab, b_tab, index).double(),
                               per_row(x, index, factors, 8), atol=1e-5, rtol=0)
    got = gathered_lora_reference(x.bfloat16(), a_tab.bfloat16(), b_tab.bfloat16(), index)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), per_row(x, index, factors, 8), atol=0.05, rtol=0.05)


def test_row_count_mismatch_is_a_clear_error():
    a_tab, b_tab, _ = tables([2], 8, 8, r_max=2)
    with pytest.raises(ConfigError, match=r"routed batch has 2 rows but a layer got an input of shape \(3, 4, 8\)"):
        gathered_lora(torch.randn(3, 4, 8), a_tab, b_tab, torch.tensor([1, 0]))
    with pytest.raises(ConfigError, match="routed batch has 2 rows"):
        gathered_embedding(torch.zeros(3, 4, dtype=torch.long), torch.zeros(2, 5, 2), torch.zeros(2, 3, 2),
                           torch.tensor([1, 0]))


def test_embedding_reference_matches_per_row_lookup():
    num, dim, r_max = 11, 6, 4
    g = torch.Generator().manual_seed(1)
    a_tab, b_tab = torch.zeros(3, num, r_max), torch.zeros(3, dim, r_max)
    factors = [None]
    for slot, r in ((1, 2), (2, 4)):
        a, b = torch.randn(r, num, generator=g), torch.randn(dim, r, generator=g)
        a_tab[slot, :, :r], b_tab[slot, :, :r] = a.T, b * 0.7
        factors.append((a, b))
    ids = torch.randint(0, num, (4, 5), generator=g)
    index = torch.tensor([2, 0, 1, 2])
    got = gathered_embedding_reference(ids, a_tab, b_tab, index)
    for row, slot in enumerate(index.tolist()):
        want = torch.zeros(5, dim) if slot == 0 else F.embedding(ids[row], factors[slot][0].T) @ factors[slot][1].T * 0.7
        torch.testing.assert_close(got[row], want, atol=1e-5, rtol=0)


# -- RoutedLinear: the routed layer's update, its path settled once --------------------------------------------------
def test_routed_linear_without_kernel_is_gathered_lora(monkeypatch):
    monkeypatch.setattr(module, "_INTERPRET", False)
    a_tab, b_tab, _ = tables([4, 2], 16, 12, r_max=4)
    index = torch.tensor([2, 0, 1])
    routed = RoutedLinear(a_tab, b_tab, index)
    assert routed.decode is None  # CPU tables (without the interpreter): no kernel
    for x in (torch.randn(3, 1, 16), torch.randn(3, 5, 16)):
        out = torch.randn(*x.shape[:-1], 12)
        torch.testing.assert_close(routed(x, out), gathered_lora_reference(x, a_tab, b_tab, index, out),
                                   atol=0, rtol=0)
    with pytest.raises(ConfigError, match="routed batch has 3 rows"):
        routed(torch.randn(2, 1, 16), torch.randn(2, 1, 12))


def fake_decode(calls):
    """A stand-in for the bound decode launch: records its call and adds the reference update in place."""
    def run(x, index, out):
        calls.append(x.shape)
        out.copy_(gathered_lora_reference(x, run.a, run.b, index, out))
    return run


def test_routed_linear_dispatch_decode_only_without_autograd():
    a_tab, b_tab, _ = tables([4, 2], 16, 12, r_max=4)
    index = torch.tensor([2, 0, 1])
    routed = RoutedLinear(a_tab, b_tab, index)
    calls = []
    routed.decode = fake_decode(calls)
    routed.decode.a, routed.decode.b = a_tab, b_tab
    x = torch.randn(3, 1, 16)
    out = torch.randn(3, 1, 12)
    want = gathered_lora_reference(x, a_tab, b_tab, index, out)
    with torch.no_grad():
        assert routed(x, out) is out  # decode: the launch, in place
        torch.testing.assert_close(out, want, atol=0, rtol=0)
        routed(torch.randn(3, 16), torch.randn(3, 12))  # 2-d decode input
        routed(torch.randn(3, 4, 16), torch.randn(3, 4, 12))  # prefill: gathered_lora, not the decode launch
        routed(x.double(), out.double())  # another dtype than the tables: gathered_lora
        routed(torch.randn(3, 1, 32)[..., ::2], torch.randn(3, 1, 12))  # non-contiguous x: still decode
    assert calls == [(3, 1, 16), (3, 16), (3, 1, 16)]
    x.requires_grad_(True)
    got = routed(x, torch.randn(3, 1, 12))  # autograd: the reference, which has a backward
    assert got.grad_fn is not None and len(calls) == 3


def test_routed_linear_falls_back_when_the_kernel_fails(monkeypatch):
    monkeypatch.setattr(module, "_triton_mod", None)
    a_tab, b_tab, _ = tables([4], 16, 12, r_max=4)
    index = torch.tensor([1, 0])
    routed = RoutedLinear(a_tab, b_tab, index)

    def broken(x, index, out):
        raise RuntimeError("no kernel here")

    routed.decode = broken
    x, out = torch.randn(2, 1, 16), torch.randn(2, 1, 12)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"Triton kernel failed \(RuntimeError: no kernel here\)"):
        got = routed(x, out)
    torch.testing.assert_close(got, gathered_lora_reference(x, a_tab, b_tab, index, out), atol=0, rtol=0)
    assert routed.decode is None and module._triton_mod is False  # no second try, here or in new layers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(routed(x, out), got, atol=0, rtol=0)


def test_routed_linear_current_follows_tensors_and_backend(monkeypatch):
    a_tab, b_tab, _ = tables([4], 16, 12, r_max=4)
    index = torch.tensor([1, 0])
    routed = RoutedLinear(a_tab, b_tab, index)
    assert routed.current(a_tab, b_tab, index)
    assert not routed.current(a_tab, b_tab, index.clone())
    monkeypatch.setattr(module, "_BACKEND", "torch")
    assert not routed.current(a_tab, b_tab, index)


# -- the Triton kernels (CUDA, or the interpreter on a CPU) ---------------------------------------------------------
def _inputs(ranks, r_max, rows, tokens, n_in, n_out, dtype, seed=0, none_every=4):
    a_tab, b_tab, _ = tables(ranks, n_in, n_out, r_max, dtype=dtype, device=DEVICE, seed=seed)
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(1, len(ranks) + 1, (rows,), generator=g)
    index[::none_every] = 0  # rows without an adapter: slot 0
    x = torch.randn(rows, tokens, n_in, generator=g).to(DEVICE, dtype)
    y = torch.randn(rows, tokens, n_out, generator=g).to(DEVICE, dtype)
    return a_tab, b_tab, index.to(DEVICE), x, y


def _check(got, want, y, index, dtype):
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, atol=tol * want.abs().max().item(), rtol=tol)
    zero = (index == 0).nonzero().flatten()
    assert len(zero) and torch.equal(got[zero], y[zero])  # rows without an adapter are bit-identical
    assert not torch.equal(got, y)


SIZES = (2048, 512) if DEVICE == "cuda" else (300, 200)  # the interpreter is slow: small layers on a CPU


@kernel_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,tokens", [(64, 1), (7, 1), (32, 256) if DEVICE == "cuda" else (4, 40), (3, 37)],
                         ids=["decode64", "decode7", "prefill", "ragged"])
@pytest.mark.parametrize("ranks,r_max", [([16] * 8, 16), ([4, 12, 8, 12], 12), ([64, 8], 64)])
def test_triton_matches_reference(kernels, dtype, rows, tokens, ranks, r_max, monkeypatch):
    if DEVICE == "cpu" and tokens > 1 and dtype == torch.bfloat16:
        # Triton 3.6's interpreter returns garbage for tl.dot on bf16 tiles (a 16x16 bf16 tl.dot alone is off by
        # 1e10); the prefill kernel is a tl.dot kernel, so bf16 prefill is checked on CUDA only.
        pytest.skip("tl.dot on bf16 is broken in Triton's interpreter")
    monkeypatch.setattr(module, "_BACKEND", "triton")  # "auto" keeps prefill on the gather path
    n_in, n_out = SIZES
    a_tab, b_tab, index, x, y = _inputs(ranks, r_max, rows, tokens, n_in, n_out, dtype)
    want = gathered_lora_reference(x.double(), a_tab.double(), b_tab.double(), index, y.double())
    assert module._use_triton(x, a_tab, y)
    with torch.no_grad():
        out = y.clone()
        got = gathered_lora(x, a_tab, b_tab, index, out)
    assert got is out  # accumulated in place
    _check(got, want, y, index, dtype)


@kernel_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,n_in,n_out", [(1, 600, 5000), (2, 300, 200), (7, 600, 5000), (33, 1100, 1300),
                                             (70, 300, 200), (70, 96, 40)])
def test_decode_kernel_matches_reference(kernels, dtype, rows, n_in, n_out):
    """Decode (one token per row) through RoutedLinear: mixed ranks 4/8/16 padded to 16, slot-0 rows, K and N not
    multiples of the blocks, one and several splits and output chunks per row."""
    a_tab, b_tab, index, x, y = _inputs([4, 8, 16, 16, 8], 16, rows, 1, n_in, n_out, dtype, seed=rows,
                                        none_every=3)
    if rows == 1:
        index[0] = 2  # one row: make it adapted (slot-0 rows are covered by the other sizes)
    routed = RoutedLinear(a_tab, b_tab, index)
    assert routed.decode is not None
    want = gathered_lora_reference(x.double(), a_tab.double(), b_tab.double(), index, y.double())
    with torch.no_grad():
        out = y.clone()
        assert routed(x, out) is out
    if rows == 1:
        torch.testing.assert_close(out.double(), want, atol=3e-2 * want.abs().max().item(), rtol=3e-2)
        assert not torch.equal(out, y)
    else:
        _check(out, want, y, index, dtype)
    # A new route written into the same index tensor (as between CUDA graph replays) is read by the next launch.
    index.copy_(index.flip(0))
    want = gathered_lora_reference(x.double(), a_tab.double(), b_tab.double(), index, y.double())
    with torch.no_grad():
        out = routed(x, y.clone())
    torch.testing.assert_close(out.double(), want, atol=3e-2 * want.abs().max().item(), rtol=3e-2)


@kernel_device
def test_decode_kernel_rank_one_table(kernels):
    """Rank-1 adapters in a rank-1 table (the narrowest rank block), every row adapted."""
    a_tab, b_tab, index, x, y = _inputs([1, 1], 1, 5, 1, 40, 24, torch.float32, none_every=9)
    index[0] = 1
    routed = RoutedLinear(a_tab, b_tab, index)
    want = gathered_lora_reference(x.double(), a_tab.double(), b_tab.double(), index, y.double())
    with torch.no_grad():
        got = routed(x, y.clone())
    assert routed.decode.meta["BR"] == 4
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, y)


def test_decode_blocks_at_the_llama_shape(kernels):
    """Splits per linear at Llama-3.2-1B (64 rows, bf16, R=16), as the kernel's docstring counts its traffic."""
    shapes = {"q": (2048, 2048), "k": (2048, 512), "v": (2048, 512), "o": (2048, 2048), "gate": (2048, 8192),
              "up": (2048, 8192), "down": (8192, 2048)}
    splits = {}
    for name, (n_in, n_out) in shapes.items():
        a = torch.zeros(33, 16, n_in, dtype=torch.bfloat16)
        b = torch.zeros(33, n_out, 16, dtype=torch.bfloat16)
        run = kernels.decode_launch(64, a, b)
        meta = run.meta
        assert run.grid[1] <= kernels.MAX_SPLITS and run.grid[1] * meta["CHUNKS"] * meta["BN"] >= n_out
        assert (run.grid[1] - 1) * meta["CHUNKS"] * meta["BN"] < n_out  # every program has outputs
        assert meta["BR"] * meta["BK"] * 2 == kernels.TILE_BYTES
        splits[name] = run.grid[1]
    assert splits == {"q": 2, "k": 1, "v": 1, "o": 2, "gate": 4, "up": 4, "down": 1}
    # Few rows: more splits for parallelism, still capped by 2·N/K (A is read whole by every split).
    a, b = torch.zeros(33, 16, 2048, dtype=torch.bfloat16), torch.zeros(33, 8192, 16, dtype=torch.bfloat16)
    assert kernels.decode_launch(1, a, b).grid == (1, 8)
    assert kernels.decode_launch(1, b.transpose(1, 2).contiguous(), a.transpose(1, 2).contiguous()).grid == (1, 1)


@cuda
def test_triton_in_place_and_cuda_graph_capture():
    a_tab, b_tab, _ = tables([16] * 4, 1024, 256, 16, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(16, 1, 1024, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(16, 1, 256, device="cuda", dtype=torch.bfloat16)
    index = torch.arange(16, device="cuda") % 5
    routed = RoutedLinear(a_tab, b_tab, index)
    assert routed.decode is not None
    with torch.no_grad():
        want = gathered_lora_reference(x.float(), a_tab.float(), b_tab.float(), index, y.float())
        out = y.clone()
        assert gathered_lora(x, a_tab, b_tab, index, out) is out  # accumulated in place
        torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
        for fn in (lambda o: gathered_lora(x, a_tab, b_tab, index, o), lambda o: routed(x, o)):
            static = y.clone()
            graph = torch.cuda.CUDAGraph()
            fn(y.clone())  # warm up (compile) outside the capture
            index.copy_(torch.arange(16, device="cuda") % 5)
            with torch.cuda.graph(graph):
                fn(static)
            static.copy_(y)
            index.copy_(torch.arange(16, device="cuda").flip(0) % 5)  # a new route, same tensors
            graph.replay()
            want = gathered_lora_reference(x.float(), a_tab.float(), b_tab.float(), index, y.float())
            torch.testing.assert_close(static.float(), want, atol=3e-2, rtol=3e-2)




@cuda
def test_decode_launches_after_the_first_skip_the_jit_and_stay_exact(kernels):
    """From the second call on, the decode kernel is launched directly (DirectLaunch); each call, a new route, a
    misaligned input (through the JIT) and a captured graph still match the reference."""
    a_tab, b_tab, _ = tables([8, 16, 4], 512, 768, 16, dtype=torch.bfloat16, device="cuda")
    index = torch.arange(24, device="cuda") % 4
    run = kernels.decode_launch(24, a_tab, b_tab)
    storage = torch.randn(24 * 512 + 1, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(24, 1, 768, device="cuda", dtype=torch.bfloat16)
    for step, x in enumerate([storage[:-1], storage[:-1], storage[1:], storage[:-1]]):
        x = x.view(24, 1, 512)
        index.copy_((torch.arange(24, device="cuda") + step) % 4)
        out = y.clone()
        run(x, index, out)
        want = gathered_lora_reference(x.float(), a_tab.float(), b_tab.float(), index, y.float())
        torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
        if step == 0:
            assert [launcher is not None for launcher in run.launch.launchers.values()] == [True]  # bound
    static_x, static_out = storage[:-1].view(24, 1, 512), y.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(static_x, index, static_out)  # the direct launcher on the capture stream
    static_out.copy_(y)
    graph.replay()
    want = gathered_lora_reference(static_x.float(), a_tab.float(), b_tab.float(), index, y.float())
    torch.testing.assert_close(static_out.float(), want, atol=3e-2, rtol=3e-2)
