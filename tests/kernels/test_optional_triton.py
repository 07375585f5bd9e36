"""Optional Triton modules: a module that cannot be imported is None (and not retried), one that can is returned."""

from __future__ import annotations

from adapterkit.kernels import optional_triton


def test_missing_module_is_none_and_remembered(monkeypatch):
    monkeypatch.setattr(optional_triton, "_loaded", {})
    assert optional_triton.kernels("_no_such_kernels") is None
    assert optional_triton._loaded == {"_no_such_kernels": False}
    assert optional_triton.kernels("reference").lora_linear_reference  # an importable module comes back as itself
