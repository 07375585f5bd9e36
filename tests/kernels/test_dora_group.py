"""kernels/dora_group.py: many layers' DoRA norms at once; on a CPU every item takes the per-layer reference."""

from __future__ import annotations

import pytest
import torch

from adapterkit.kernels import dora as dora_mod
from adapterkit.kernels import dora_group


def _item(rows: int, cols: int, r: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=gen), torch.randn(r, cols, generator=gen),
            torch.randn(rows, r, generator=gen))


def test_each_norm_is_the_per_layer_norm():
    items = [_item(12, 20, 4, 0), _item(7, 33, 2, 1), _item(12, 20, 8, 2)]
    got = dora_group.grouped_norms(items, [0.5, 1.0, 2.0])
    for (m, a, b), s, n in zip(items, [0.5, 1.0, 2.0], got):
        torch.testing.assert_close(n, dora_mod.dora_weight_norm(m, a, b, s), rtol=0, atol=0)
        torch.testing.assert_close(n, torch.linalg.vector_norm(m + s * b @ a, dim=1), rtol=1e-5, atol=1e-5)


def test_cpu_items_are_not_groupable():
    assert not dora_group.groupable(*_item(4, 4, 2, 0))


def test_factors_that_do_not_fit_are_refused_with_their_shapes():
    m, a, b = _item(12, 20, 4, 0)
    with pytest.raises(ValueError, match=r"M \(12, 20\), A \(4, 19\), B \(12, 4\)"):
        dora_group.grouped_norms([(m, a[:, :19], b)], [1.0])
    with pytest.raises(ValueError, match="2 items but 1 scalings"):
        dora_group.grouped_norms([(m, a, b), (m, a, b)], [1.0])


def test_a_kernel_that_fails_here_falls_back_with_a_warning(monkeypatch):
    """A Triton build or GPU the kernel does not compile for: one warning, the per-layer values, no more tries."""
    calls = []

    class Broken:
        @staticmethod
        def grouped_norms(items, scalings):
            calls.append(len(items))
            raise RuntimeError("no kernel for this architecture")

    monkeypatch.setattr(dora_group, "_failed", [])
    monkeypatch.setattr(dora_group, "_use_triton", lambda t: True)
    monkeypatch.setattr(dora_group, "_triton", lambda: Broken)
    items = [_item(12, 20, 4, 0), _item(9, 20, 2, 1)]
    assert dora_group.groupable(*items[0])
    with pytest.warns(RuntimeWarning, match="no kernel for this architecture.*one by one"):
        got = dora_group.grouped_norms(items, [0.5, 1.0])
    for (m, a, b), s, n in zip(items, [0.5, 1.0], got):
        torch.testing.assert_close(n, dora_mod.dora_weight_norm(m, a, b, s), rtol=0, atol=0)
    assert calls == [2] and not dora_group.groupable(*items[0])


def test_tensor_subclasses_are_not_grouped(monkeypatch):
    """A sharded parameter (FSDP2's DTensor) has no single storage to point the kernel at: it goes one by one."""

    class Sharded(torch.Tensor):
        pass

    monkeypatch.setattr(dora_group, "_use_triton", lambda t: True)
    m, a, b = _item(12, 20, 4, 0)
    assert dora_group.groupable(m, torch.nn.Parameter(a), b)
    assert not dora_group.groupable(m.as_subclass(Sharded), a, b)
    assert not dora_group.groupable(m, a.as_subclass(Sharded), b)
