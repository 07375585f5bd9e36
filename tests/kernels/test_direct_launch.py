"""DirectLaunch and FastLaunch: which calls go through the JIT and which through a bound launcher, checked with a stand-in JIT
(the real kernels on CUDA are checked in test_gathered_lora.py and test_lora_decode.py)."""

from __future__ import annotations

import types

import pytest
import torch

from adapterkit.kernels import direct_launch as module
from adapterkit.kernels.direct_launch import DirectLaunch, FastLaunch


class FakeCompiled:
    def __init__(self, log):
        self.log = log
        self.function, self.packed_metadata = "function", "metadata"

    def run(self, *args):
        self.log.append(("direct", args))


class FakeJit:
    """Stands in for a @triton.jit function: `jit[grid](*args, **kw)` records the call, returns a compiled kernel."""

    __name__ = "fake_kernel"
    arg_names = ["x_ptr", "out_ptr", "M", "K", "BN"]

    def __init__(self, compiled=True):
        self.log = []
        self.compiled = compiled

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return FakeCompiled(self.log) if self.compiled else None

        return call


@pytest.fixture
def bindable(monkeypatch):
    monkeypatch.setattr(module, "driver", types.SimpleNamespace(
        active=types.SimpleNamespace(get_current_stream=lambda index: f"stream{index}")))
    monkeypatch.setattr(module, "_hooks_set", lambda: False)


def kinds(jit):
    return [entry[0] for entry in jit.log]


def test_first_call_compiles_then_the_launcher_runs(bindable):
    jit = FakeJit()
    launch = DirectLaunch(jit, {"K": 64, "BN": 32}, num_warps=8)
    x, out = torch.zeros(8), torch.zeros(8)
    launch((4, 2), x, out, 8)
    launch((5,), x, out, 8)
    kind, grid, args, kwargs = jit.log[0]
    assert (kind, grid, kwargs) == ("jit", (4, 2), {"K": 64, "BN": 32, "num_warps": 8})
    assert args[0] is x and args[1] is out and args[2] == 8
    kind, args = jit.log[1]
    assert kind == "direct"
    assert args[:9] == (5, 1, 1, "stream-1", "function", "metadata", None, None, None)  # CPU tensors: device -1
    assert args[9] is x and args[10] is out and args[11:] == (8, 64, 32)
    assert len(jit.log) == 2


def test_each_specialisation_compiles_once_then_runs_direct(bindable):
    """Another dtype, alignment or int class is another compiled kernel: its first call goes through the JIT, its
    later ones run direct; ints of one class (not 1, same divisibility by 16) share a kernel."""
    jit = FakeJit()
    launch = DirectLaunch(jit, {"K": 4, "BN": 16})
    x, out = torch.zeros(8), torch.zeros(8)
    calls = [(x, out, 8), (x, out, 24), (x[1:], out, 8), (x.double(), out, 8), (x, out.half(), 8), (x, out, 1),
             (x, out, 32), (x, out, 2**33)]
    for args in calls:
        launch((1,), *args)
    assert kinds(jit) == ["jit", "direct", "jit", "jit", "jit", "jit", "jit", "jit"]
    for args in calls:
        launch((1,), *args)
    assert kinds(jit)[8:] == ["direct"] * 8
    assert len(launch.launchers) == 7


def test_no_compiled_kernel_or_hooks_set_never_binds(bindable, monkeypatch):
    jit = FakeJit(compiled=False)  # Triton's interpreter returns no compiled kernel
    launch = DirectLaunch(jit, {"K": 4, "BN": 16})
    x = torch.zeros(4)
    for _ in range(3):
        launch((1,), x, x, 4)
    assert kinds(jit) == ["jit"] * 3
    monkeypatch.setattr(module, "_hooks_set", lambda: True)
    jit = FakeJit()
    launch = DirectLaunch(jit, {"K": 4, "BN": 16})
    for _ in range(3):
        launch((1,), x, x, 4)
    assert kinds(jit) == ["jit"] * 3
    jit = FakeJit()  # no tensor first: nothing to take the stream's device from
    launch = DirectLaunch(jit, {"K": 4, "BN": 16})
    monkeypatch.setattr(module, "_hooks_set", lambda: False)
    for _ in range(2):
        launch((1,), 4, x, 4)
    assert kinds(jit) == ["jit"] * 2


def test_a_launcher_that_refuses_its_arguments_is_dropped(bindable):
    jit = FakeJit()
    launch = DirectLaunch(jit, {"K": 4, "BN": 16})
    x = torch.zeros(4)
    launch((1,), x, x, 4)
    (key,) = launch.launchers

    def refuse(grid, args):
        raise TypeError("function takes 13 arguments")

    launch.launchers[key] = refuse
    launch((1,), x, x, 4)
    launch((1,), x, x, 4)
    assert kinds(jit) == ["jit"] * 3
    assert launch.launchers[key] is None


def test_constants_must_be_the_trailing_arguments():
    with pytest.raises(ValueError, match="fake_kernel: constants must be its trailing arguments"):
        DirectLaunch(FakeJit(), {"BN": 16, "K": 4})
    with pytest.raises(ValueError, match="trailing"):
        DirectLaunch(FakeJit(), {"M": 1})


def test_hooks_set_reads_triton_3_6_hook_chains(monkeypatch):
    chain = types.SimpleNamespace(calls=[])
    runtime = types.SimpleNamespace(launch_enter_hook=chain, launch_exit_hook=None)
    monkeypatch.setattr(module, "triton", types.SimpleNamespace(knobs=types.SimpleNamespace(runtime=runtime)))
    assert module._hooks_set() is False
    chain.calls.append(print)
    assert module._hooks_set() is True
    runtime.launch_enter_hook = print  # an older Triton's plain callable
    assert module._hooks_set() is True
    monkeypatch.setattr(module, "triton", types.SimpleNamespace())  # no knobs: assume hooks, do not bind
    assert module._hooks_set() is True
    monkeypatch.setattr(module, "triton", None)
    assert module._hooks_set() is True


def test_bound_launches_and_returns_the_launcher_for_those_arguments(bindable):
    """`bound` launches (through the JIT the first time) and hands back the launcher a caller may keep; where
    nothing can be bound it launches all the same and returns None."""
    jit = FakeJit()
    launch = DirectLaunch(jit, {"K": 4, "BN": 16})
    x = torch.zeros(4)
    fast = launch.bound((2,), x, x, 4)
    assert kinds(jit) == ["jit"] and fast is not None
    fast((3,), (x, x, 4))
    assert jit.log[1][0] == "direct" and jit.log[1][1][:3] == (3, 1, 1)
    assert launch.bound((2,), x, x, 4) is fast and kinds(jit) == ["jit", "direct", "direct"]
    jit = FakeJit(compiled=False)
    assert DirectLaunch(jit, {"K": 4, "BN": 16}).bound((1,), x, x, 4) is None and kinds(jit) == ["jit"]


def test_fast_launch_binds_on_the_first_aligned_call_and_keys_misaligned_ones(bindable):
    """FastLaunch: an aligned call binds (through the JIT once), later aligned calls go to the bound launcher; a
    misaligned call takes the DirectLaunch's keyed path (its own specialisation, compiled once); with nothing to
    bind every call takes the keyed path."""
    jit = FakeJit()
    run = FastLaunch(DirectLaunch(jit, {"K": 4, "BN": 16}))
    x = torch.zeros(4)
    run((2,), (x, x, 4), True)
    assert kinds(jit) == ["jit"] and run.fast is not None
    run((3,), (x, x, 4), True)
    assert kinds(jit) == ["jit", "direct"] and jit.log[1][1][:3] == (3, 1, 1)
    odd = torch.zeros(5)[1:]  # off 16-byte alignment
    run((1,), (odd, odd, 4), False)
    run((1,), (odd, odd, 4), False)
    assert kinds(jit) == ["jit", "direct", "jit", "direct"]  # its own kernel, then its own launcher
    jit = FakeJit(compiled=False)
    run = FastLaunch(DirectLaunch(jit, {"K": 4, "BN": 16}))
    run((1,), (x, x, 4), True)
    run((1,), (x, x, 4), True)
    assert run.fast is None and kinds(jit) == ["jit", "jit"]


class CudaLauncher:
    """Stands in for Triton 3.6's launcher object: its C entry `launch` and the attributes its `__call__` reads."""

    def __init__(self, log, scratch=0):
        self.log = log
        self.global_scratch_size = scratch
        self.profile_scratch_size = 0
        self.launch_cooperative_grid = False
        self.launch_pdl = True

    def launch(self, *args):
        self.log.append(("c entry", args))

    def __call__(self, *args):
        self.log.append(("direct", args))


class Returning(FakeJit):
    """A stand-in JIT whose calls return a given compiled object."""

    def __init__(self, log, compiled):
        super().__init__()
        self.log, self.result = log, compiled

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(("jit", grid)) or self.result


def test_triton_3_6_launchers_are_entered_in_c(bindable, monkeypatch):
    """With Triton 3.6 and a kernel without scratch memory, the bound launcher calls the launcher's C entry with the
    arguments its Python `__call__` would pass (scratch buffers None); another version, or scratch memory, keeps the
    launcher's call."""
    for version, scratch, expect in (("3.6.0", 0, "c entry"), ("3.5.1", 0, "direct"), ("3.6.0", 64, "direct")):
        monkeypatch.setattr(module, "triton", types.SimpleNamespace(__version__=version))
        log = []
        compiled = FakeCompiled(log)
        compiled.run = CudaLauncher(log, scratch)
        launch = DirectLaunch(Returning(log, compiled), {"K": 4, "BN": 16})
        x = torch.zeros(4)
        launch((1,), x, x, 4)
        launch((2, 3), x, x, 4)
        assert [entry[0] for entry in log] == ["jit", expect]
        kind, args = log[-1]
        assert kind == expect, version
        if expect == "c entry":
            assert args[:13] == (2, 3, 1, "stream-1", "function", False, True, None, None, "metadata", None, None,
                                 None)
            assert args[13] is x and args[14] is x and args[15:] == (4, 4, 16)

