"""Launching an already compiled Triton kernel again without the JIT's per-call work.

`kernel[grid](*args)` binds the arguments, computes each one's specialisation (dtype, 16-byte alignment, an int's
divisibility by 16), hashes them into a cache key, looks the compiled kernel up and checks the globals it read, then
launches it. At decode sizes that host work is most of a launch's cost (bench/host_cost.py: 26 µs through the JIT,
16 µs direct, on an H200's host), and eager decode is bound by the host. A `DirectLaunch` keeps, per specialisation
of its runtime arguments, the compiled kernel of the first call that had it, and calls that kernel's launcher
directly on later calls with the same specialisation.

The key is kept on the safe side of Triton's own: per tensor its device, dtype and whether its pointer is 16-byte
aligned; per int whether it is 1, whether it divides by 16 and whether it fits 32 bits. Constexpr arguments are fixed
per `DirectLaunch`. Nothing is bound where Triton's launch hooks (a profiler's) are set, which the direct path would
skip, or where the compiled object has no launcher (the interpreter, another Triton version). Without Triton
installed the module still imports (its binding logic is tested on any machine) and never binds.

With Triton 3.6 the bound launcher calls the compiled launcher's C entry itself, as the launcher's Python wrapper
would for a kernel without scratch memory (`_c_launch`). A caller on a hot path can also keep the bound launcher
(`bound`) and call it under a key of its own, where it knows more about its arguments than `_key` does.
"""

from __future__ import annotations

from typing import Callable

import torch

try:
    import triton
    from triton.runtime import driver
except ImportError:  # no Triton here: every call goes through `jit[grid]`, which then is not Triton's either
    triton = driver = None

_ALIGN = 16  # the pointer and int divisibility Triton specialises on
_UNSEEN = object()


def _key(args: tuple) -> tuple:
    key = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            key.append((arg.get_device(), arg.dtype, arg.data_ptr() % _ALIGN == 0))
        elif type(arg) is int:
            key.append((arg == 1, arg % _ALIGN == 0, -(2**31) <= arg < 2**31))
        else:
            key.append(type(arg))
    return tuple(key)


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
    """`launch(grid, *args)`: the kernel `jit` on `grid` with the runtime arguments `args` (a tensor first) and
    `constants` (the constexpr arguments, by name, which must be the kernel's last ones) after them.

    The first call of each specialisation of `args` goes through `jit[grid]`; the later ones call the compiled
    kernel's launcher with the current stream of the first argument's device. A launcher that refuses its arguments
    is dropped for good (that specialisation goes through the JIT from then on).
    """

    def __init__(self, jit, constants: dict, **options) -> None:
        names = jit.arg_names
        if tuple(names[len(names) - len(constants):]) != tuple(constants):
            raise ValueError(f"{jit.__name__}: constants must be its trailing arguments in order, {names}")
        self.jit = jit
        self.constants = dict(constants)
        self.values = tuple(constants.values())
        self.options = options
        self.launchers: dict[tuple, Callable | None] = {}  # specialisation -> launcher (None: the JIT's)

    def __call__(self, grid: tuple[int, ...], *args) -> None:
        key = _key(args)
        launcher = self.launchers.get(key, _UNSEEN)
        if launcher is not None and launcher is not _UNSEEN:
            try:
                launcher(grid, args)
                return
            except TypeError:  # the launcher refused its arguments (nothing was launched): the JIT from now on
                self.launchers[key] = launcher = None
        compiled = self.jit[grid](*args, **self.constants, **self.options)
        if launcher is _UNSEEN:
            self.launchers[key] = self._bind(compiled, args)

    def bound(self, grid: tuple[int, ...], *args) -> Callable | None:
        """Launch as a call does, and return the launcher that later calls with this specialisation of `args` may
        call directly (`launcher(grid, args)`), or None where none is bound. A caller that keeps it must itself make
        sure those calls have the same specialisation (device, dtype, alignment, int class) as these `args`."""
        self(grid, *args)
        return self.launchers.get(_key(args))

    def _bind(self, compiled, args: tuple) -> Callable | None:
        """A direct launcher for what `jit[grid](...)` returned, or None (see the module docstring)."""
        try:
            run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
        except AttributeError:
            return None
        if _hooks_set() or not args or not isinstance(args[0], torch.Tensor):
            return None
        values = self.values
        stream = driver.active.get_current_stream
        c_launch = _c_launch(run)
        if c_launch is not None:
            entry, cooperative, pdl = c_launch

            def launch(grid: tuple[int, ...], args: tuple) -> None:
                n = len(grid)
                entry(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream(args[0].get_device()), function,
                      cooperative, pdl, None, None, metadata, None, None, None, *args, *values)

            return launch

        def launch(grid: tuple[int, ...], args: tuple) -> None:
            n = len(grid)
            run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream(args[0].get_device()), function,
                metadata, None, None, None, *args, *values)

        return launch



class FastLaunch:
    """`run(grid, args, aligned)`: a `DirectLaunch` for a hot path whose own key already fixes every argument's
    specialisation but the pointers' alignment (shapes, dtypes, device). The first aligned call binds the launcher
    (`bound`), later aligned calls call it directly; a call with some pointer off 16-byte alignment goes through the
    DirectLaunch's keyed path. `fast` is the bound launcher, or None before the first aligned call (or where none
    binds: then every call takes the keyed path)."""

    __slots__ = ("launch", "fast")

    def __init__(self, launch: DirectLaunch) -> None:
        self.launch, self.fast = launch, None

    def __call__(self, grid: tuple[int, ...], args: tuple, aligned: bool) -> None:
        if not aligned:
            self.launch(grid, *args)
        elif self.fast is not None:
            self.fast(grid, args)
        else:
            self.fast = self.launch.bound(grid, *args)

def _c_launch(run) -> tuple[Callable, bool, bool] | None:
    """Triton 3.6's CUDA launcher as (its compiled `launch` entry, cooperative grid, PDL), where it needs no scratch
    buffers; else None. Calling that entry as the launcher's Python `__call__` would (scratch buffers None) skips that
    call's own Python (about 3.5 µs of host time of 9 on an H200's host). Only for the launcher this was written
    against: another Triton version, another backend or a kernel with scratch memory keeps the launcher's call."""
    if triton is None or not triton.__version__.startswith("3.6.") or type(run).__name__ != "CudaLauncher":
        return None
    try:
        if run.global_scratch_size or run.profile_scratch_size:
            return None
        return run.launch, bool(run.launch_cooperative_grid), bool(run.launch_pdl)
    except AttributeError:
        return None
