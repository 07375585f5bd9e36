"""Launching an already compiled Triton kernel again without the JIT's per-call work.

`kernel[grid](*args)` binds the arguments, computes each one's specialisation (dtype, 16-byte alignment), hashes them
into a cache key, looks the compiled kernel up and checks the globals it read, then launches it. At decode sizes
that host work is most of a launch's cost (bench/host_cost.py: about 30 µs on an H200's host for a launch whose
kernel runs for 3 µs), and eager decode is bound by the host. A launch bound here keeps the compiled kernel of its
first call and calls its launcher directly for as long as the runtime tensors keep the specialisation that kernel
was compiled for (device, dtypes, alignment); anything else goes back through `kernel[grid]`.

Only for kernels whose non-tensor arguments are all compile-time constants (nothing else is re-specialised here), and
only without Triton's launch hooks (a profiler's), which the direct path would skip. Without Triton installed the
module still imports (its binding logic is tested on any machine) and never binds.
"""

from __future__ import annotations

from typing import Callable

import torch

try:
    import triton
    from triton.runtime import driver
except ImportError:  # no Triton here: every call goes through `jit[grid]`, which then is not Triton's either
    triton = driver = None

_ALIGN = 16  # the pointer divisibility Triton specialises on


def _key(tensors: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((t.get_device(), t.dtype, t.data_ptr() % _ALIGN == 0) for t in tensors)


def _hooks_set() -> bool:
    """Whether a launch hook is set (or this Triton keeps them where this module does not look)."""
    if triton is None:
        return True
    try:
        runtime = triton.knobs.runtime
        hooks = (runtime.launch_enter_hook, runtime.launch_exit_hook)
    except AttributeError:
        return True
    # Triton 3.6 keeps each as a chain of calls (empty: no hook); a plain callable counts as set.
    return any(hook is not None and getattr(hook, "calls", True) for hook in hooks)


class DirectLaunch:
    """`launch(*tensors)`: the kernel `jit` on `grid` with the tensors first and `constants` (the constexpr
    arguments, by name) after them.

    The first call, and any call whose tensors differ in device, dtype or alignment from the first, goes through
    `jit[grid]`; the others call the compiled kernel's launcher with the current stream. A launcher that refuses
    its arguments is dropped for good.
    """

    def __init__(self, jit, grid: tuple[int, ...], constants: dict, **options) -> None:
        names = jit.arg_names
        self.n_tensors = len(names) - len(constants)
        if tuple(names[self.n_tensors:]) != tuple(constants):
            raise ValueError(f"{jit.__name__}: constants must be its trailing arguments in order, {names}")
        self.jit = jit[grid]
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.constants = dict(constants)
        self.values = tuple(constants.values())
        self.options = options
        self.key: tuple | None = None  # the specialisation the bound launcher was compiled for
        self.launcher: Callable | None = None

    def __call__(self, *tensors: torch.Tensor) -> None:
        launcher = self.launcher
        if launcher is not None and _key(tensors) == self.key:
            try:
                launcher(*tensors)
                return
            except TypeError:  # the launcher refused its arguments (nothing was launched): the JIT from now on
                self.launcher = None
        compiled = self.jit(*tensors, **self.constants, **self.options)
        if self.launcher is None and self.key is None:
            self.key = _key(tensors)
            self.launcher = self._bind(compiled)

    def _bind(self, compiled) -> Callable | None:
        """A direct launcher for what `jit[grid](...)` returned, or None where this Triton's compiled kernel does not
        offer one (another version's internals, the interpreter) or launch hooks are set."""
        try:
            run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
        except AttributeError:
            return None
        if _hooks_set():
            return None
        g0, g1, g2 = self.grid
        values = self.values
        stream = driver.active.get_current_stream

        def launch(*tensors: torch.Tensor) -> None:
            run(g0, g1, g2, stream(tensors[0].get_device()), function, metadata, None, None, None, *tensors, *values)

        return launch
