"""The DoRA Triton passes (kernels/_triton_dora.py) against the plain-PyTorch DoRA node they replace.

Runs on CUDA; on a CPU only under Triton's interpreter (`TRITON_INTERPRET=1` with triton installed), else skips.
"""

from __future__ import annotations

import os
import weakref

import pytest
import torch

from adapterkit.kernels import dora as dora_mod

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip("the DoRA Triton passes need CUDA (or TRITON_INTERPRET=1 on a CPU)", allow_module_level=True)
tk = pytest.importorskip("adapterkit.kernels._triton_dora", reason="triton is not installed")


def factors(n_out: int, n_in: int, r: int, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
    a = torch.randn(r, n_in, generator=gen) / n_in**0.5
    b = torch.randn(n_out, r, generator=gen) * 0.1
    m = (torch.linalg.vector_norm(w, dim=1) * (1 + 0.1 * torch.randn(n_out, generator=gen)))
    bias = torch.randn(n_out, generator=gen) * 0.1
    return [t.to(DEVICE, dtype) for t in (w, a, b, m, bias)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [4, 16, 24])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_weight_norm_matches_torch(dtype, r, transposed):
    w, a, b, _, _ = factors(200, 300, r, dtype)  # 300 columns: a partial last BK block of A
    stored = w.t().contiguous() if transposed else w  # Conv1D stores (in, out)
    w_lin = stored.t() if transposed else stored
    got = tk.weight_norm(dora_mod.row_sq_norm(w_lin), w_lin @ a.t(), a, b, 0.7)
    want = torch.linalg.vector_norm(w.float() + 0.7 * b.float() @ a.float(), dim=1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert got.dtype == torch.float32


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("rows", [37, 1100])  # one partial block, and several (GRAD_ROWS = 512)
def test_scale_and_grad_passes_match_torch(bias, rows):
    _, _, _, m, b = factors(300, 8, 4, torch.float32)
    gen = torch.Generator().manual_seed(3)
    n = (m.abs() + 0.5) * 1.1
    y = torch.randn(rows, 300, generator=gen).to(DEVICE)
    g = torch.randn(rows, 300, generator=gen).to(DEVICE)
    bias_t = b if bias else None
    c = m / n
    out = tk.scale_columns_(y.clone(), m, n, bias_t)
    torch.testing.assert_close(out, y * c + (b if bias else 0), rtol=1e-6, atol=1e-6)
    gc, dm = tk.scale_grad(g, out, m, n, bias_t, torch.float32)
    torch.testing.assert_close(gc, g * c, rtol=1e-6, atol=1e-6)
    want_dm = ((g * (out - (b if bias else 0))).sum(0)) / m
    torch.testing.assert_close(dm, want_dm, rtol=1e-5, atol=1e-4)
    gc2, none = tk.scale_grad(g, None, m, n, bias_t, torch.float32)
    assert none is None and torch.equal(gc2, gc)


def test_long_inputs_keep_the_partial_sums_within_one_program():
    for rows in (1, 512, 513, 8192, 131072, 400_000):
        per = tk._rows_per_program(rows)
        assert per >= tk.GRAD_ROWS and -(-rows // per) <= tk.MAX_PARTS


def _general_node(x, w, bias, a, b, m, norm, s, use_triton=True):
    return dora_mod._DoraLinearFn.apply(x, w, bias, a, b, m, norm, s, 0.0, None, True, True, use_triton)


def _lean_node(x, w, bias, a, b, m, norm, s):
    return dora_mod._DoraFastFn.apply(x, w, bias, a, b, m, norm, s)  # what dora_linear runs on CUDA without dropout


@pytest.mark.parametrize("node", [_general_node, _lean_node], ids=["general-node", "lean-node"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_dora_node_with_triton_passes_matches_plain_node(node, dtype, bias):
    """Each DoRA node running the Triton passes against the plain-PyTorch node: output and every gradient."""
    w, a, b, m, bvec = factors(160, 64, 8, dtype)
    bvec = bvec if bias else None
    x = torch.randn(3, 50, 64, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    norm = dora_mod.dora_weight_norm(w, a, b, 0.5)
    results = []
    for run in (lambda *t: _general_node(*t, use_triton=False), node):
        leaves = [t.clone().requires_grad_(True) for t in (x, a, b, m)]
        out = run(leaves[0], w, bvec, leaves[1], leaves[2], leaves[3], norm, 0.5)
        out.float().square().sum().backward()
        results.append([out.detach().float()] + [t.grad.float() for t in leaves])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for got, want in zip(results[1], results[0]):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


def test_scale_columns_refuses_a_non_contiguous_output():
    _, _, _, m, _ = factors(64, 8, 4, torch.float32)
    y = torch.randn(64, 10).to(DEVICE).t()  # (10, 64) view with strides (1, 10)
    with pytest.raises(ValueError, match="contiguous"):
        tk.scale_columns_(y, m, m.abs() + 1, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_norms_match_torch_for_every_item(dtype):
    """One launch for items of different rows, ranks, scalings and layouts (a transposed Conv1D view)."""
    specs = [(200, 4, False, 0.5), (64, 16, True, 2.0), (70, 24, False, 1.0), (129, 8, True, 0.25)]
    items, scalings = [], []
    for index, (rows, r, transposed, s) in enumerate(specs):
        w, a, b, _, _ = factors(rows, 300, r, dtype, seed=index)  # 300 columns: a partial last BK block
        items.append((w.t().contiguous().t() if transposed else w, a, b))
        scalings.append(s)
    got = tk.grouped_norms(items, scalings)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for (m, a, b), s, n in zip(items, scalings, got):
        want = torch.linalg.vector_norm(m.float() + s * b.float() @ a.float(), dim=1)
        assert n.dtype == torch.float32 and n.shape == (m.shape[0],)
        torch.testing.assert_close(n, want, rtol=tol, atol=tol)
    with torch.no_grad():  # the same storages with new values: the kept tables, the new norms
        items[1][1].mul_(-3.0)
    again = tk.grouped_norms(items, scalings)
    m, a, b = items[1]
    torch.testing.assert_close(again[1], torch.linalg.vector_norm(m.float() + 2.0 * b.float() @ a.float(), dim=1),
                               rtol=tol, atol=tol)
    assert not torch.allclose(again[1], got[1])
    torch.testing.assert_close(again[0], got[0], rtol=0, atol=0)


def test_dora_training_with_the_one_launch_norms_matches_per_layer_norms(monkeypatch):
    """A DoRA Llama trained 3 SGD steps with the real one-launch kernel computing every stale norm (on a CPU: under
    the interpreter, the rest of the step on the CPU paths) against per-layer norms: losses and weights."""
    import adapterkit as ak
    from adapterkit.kernels import dora_group
    from adapterkit.methods import dora as dora_method
    from helpers import build, sgd_steps

    def run(grouped: bool):
        if grouped and DEVICE == "cpu":
            monkeypatch.setattr(dora_group, "_use_triton", lambda t: True)  # the kernel, not the rest of the step
        if not grouped:
            monkeypatch.setattr(dora_method, "groupable", lambda m, a, b: False)
        monkeypatch.setattr(dora_method, "_live", weakref.WeakSet())  # this model's layers only
        calls = []
        real = dora_group.grouped_norms
        monkeypatch.setattr(dora_method, "grouped_norms", lambda items, s: calls.append(len(items)) or real(items, s))
        torch.manual_seed(0)
        model = ak.attach(build("llama"), ak.LoraConfig(r=4, use_dora=True, init_lora_weights=False,
                                                        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
        losses = [step[0] for step in sgd_steps(model.to(DEVICE), device=DEVICE)]
        monkeypatch.undo()
        return torch.stack(losses), [p.detach().clone() for p in ak.trainable_parameters(model)], calls

    loss_g, params_g, calls = run(True)
    loss_l, params_l, _ = run(False)
    assert calls[-2:] == [8, 8]
    torch.testing.assert_close(loss_g, loss_l, rtol=1e-5, atol=1e-5)
    for g, l in zip(params_g, params_l):
        torch.testing.assert_close(g, l, rtol=1e-5, atol=1e-5)
