"""Gathered LoRA (one adapter per batch row) against a per-row loop of plain products; the Triton kernel on CUDA.

CPU tests check the reference; CUDA tests (Triton, prefill and decode shapes, CUDA graphs) skip without a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapterkit.errors import ConfigError
from adapterkit.kernels.gathered_lora import (
    gathered_embedding,
    gathered_embedding_reference,
    gathered_lora,
    gathered_lora_reference,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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


# -- CUDA: the Triton kernel ----------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,tokens", [(64, 1), (7, 1), (32, 256), (3, 37)], ids=["decode64", "decode7",
                                                                                  "prefill", "ragged"])
@pytest.mark.parametrize("ranks,r_max", [([16] * 8, 16), ([4, 12, 8, 12], 12), ([64, 8], 64)])
def test_triton_matches_reference(dtype, rows, tokens, ranks, r_max, monkeypatch):
    from adapterkit.kernels import gathered_lora as module

    monkeypatch.setattr(module, "_BACKEND", "triton")  # "auto" keeps prefill on the gather path

    n_in, n_out = 2048, 512
    a_tab, b_tab, _ = tables(ranks, n_in, n_out, r_max, dtype=dtype, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, tokens, n_in, device="cuda", generator=g).to(dtype)
    index = torch.randint(0, len(ranks) + 1, (rows,), device="cuda", generator=g)
    y = torch.randn(rows, tokens, n_out, device="cuda", generator=g).to(dtype)
    want = gathered_lora_reference(x.double(), a_tab.double(), b_tab.double(), index, y.double())
    assert module._use_triton(x, a_tab, y)
    with torch.no_grad():
        got = gathered_lora(x, a_tab, b_tab, index, y.clone())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, atol=tol * want.abs().max().item(), rtol=tol)
    zero = (index == 0).nonzero().flatten()
    assert torch.equal(got[zero], y[zero])  # rows without an adapter are bit-identical


@cuda
def test_triton_in_place_and_cuda_graph_capture():
    a_tab, b_tab, _ = tables([16] * 4, 1024, 256, 16, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(16, 1, 1024, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(16, 1, 256, device="cuda", dtype=torch.bfloat16)
    index = torch.arange(16, device="cuda") % 5
    with torch.no_grad():
        want = gathered_lora_reference(x.float(), a_tab.float(), b_tab.float(), index, y.float())
        out = y.clone()
        assert gathered_lora(x, a_tab, b_tab, index, out) is out  # accumulated in place
        torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
        static = y.clone()
        graph = torch.cuda.CUDAGraph()
        gathered_lora(x, a_tab, b_tab, index, y.clone())  # warm up (compile) outside the capture
        with torch.cuda.graph(graph):
            gathered_lora(x, a_tab, b_tab, index, static)
        static.copy_(y)
        index.copy_(torch.arange(16, device="cuda").flip(0) % 5)  # a new route, same tensors
        graph.replay()
        want = gathered_lora_reference(x.float(), a_tab.float(), b_tab.float(), index, y.float())
        torch.testing.assert_close(static.float(), want, atol=3e-2, rtol=3e-2)
