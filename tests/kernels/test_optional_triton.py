"""Optional Triton modules: a module that cannot be imported is None (and not retried), one that can is returned."""

from __future__ import annotations

from adapterkit.kernels import optional_triton


def test_missing_module_is_none_and_remembered(monkeypatch):
    monkeypatch.setattr(optional_triton, "_loaded", {})
    assert optional_triton.kernels("_no_such_kernels") is None
    assert optional_triton._loaded == {"_no_such_kernels": False}
    assert optional_triton.kernels("reference").lora_linear_reference  # an importable module comes back as itself


class _OnGpu:
    """Stands in for a tensor on GPU `index` (this machine may have none)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def get_device(self) -> int:
        return self.index


def test_launches_run_on_their_first_tensors_gpu(monkeypatch):
    """Triton launches on the current device: a tensor on another GPU makes that one current for the launch."""
    import contextlib

    import torch

    entered = []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        yield

    monkeypatch.setattr(optional_triton, "torch", type("FakeTorch", (), {  # only what the guard reads
        "Tensor": _OnGpu, "cuda": type("C", (), {"current_device": staticmethod(lambda: 0),
                                                 "device": staticmethod(device)})}))
    seen = []

    @optional_triton.on_input_device
    def launch(*args):
        seen.append(list(entered))
        return "ran"

    assert launch(None, _OnGpu(1), 3) == "ran" and seen[-1] == [1]  # the first tensor argument decides
    assert launch(_OnGpu(0)) == "ran" and entered == [1]  # already current: no switch
    assert launch(_OnGpu(-1)) == "ran" and entered == [1]  # a CPU tensor (the interpreter): no switch
    assert launch(5) == "ran" and entered == [1]  # no tensor at all
    assert torch.Tensor is not _OnGpu


def test_launches_on_cpu_tensors_run_unguarded():
    import torch

    @optional_triton.on_input_device
    def launch(x, y):
        return x + y

    assert torch.equal(launch(torch.ones(2), torch.ones(2)), torch.full((2,), 2.0))
