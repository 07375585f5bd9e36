"""The DoRA weight norms of many layers at once: a launch or two per step instead of two per layer.

Training changes every adapter's A and B at each optimizer step, so every DoRA layer's norm n = ‖M + s·B A‖ is
recomputed once per step. Per layer that is a handful of host calls; on a GPU whose step is bound by the host issuing
it, those calls (not the GPU work, one read of each weight) are what the norms cost. `grouped_norms` takes all the
layers' (M, A, B) and, on CUDA with Triton, computes every norm in one launch (`_triton_dora.grouped_norms`); anywhere
else it runs `dora_weight_norm` per layer, which is also the reference the kernel is tested against.
"""

from __future__ import annotations

import warnings

import torch

from .dora import _TRITON_DTYPES, _triton, _use_triton, dora_weight_norm

MAX_GROUPED_RANK = 128  # the kernel keeps B's rows for a block of M in registers: (64, r)
_failed: list[str] = []  # why the one-launch kernel could not run here (then every item goes one by one)

Item = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # M (rows, cols), A (r, cols), B (rows, r)


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not a tensor subclass such as FSDP2's DTensor: those go one by one


def _fits(m: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """The kernel's demands on one item: plain tensors of one float dtype on one device, contiguous factors, a rank
    it holds."""
    return (type(m) in _PLAIN and type(a) in _PLAIN and type(b) in _PLAIN
            and m.dtype in _TRITON_DTYPES and a.dtype is m.dtype and b.dtype is m.dtype and m.dim() == 2
            and a.is_contiguous() and b.is_contiguous() and a.shape[0] <= MAX_GROUPED_RANK
            and a.device == m.device and b.device == m.device)


def groupable(m: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether (M, A, B) can go through the one-launch kernel here: Triton on M's device (CUDA) and `_fits`."""
    return not _failed and _use_triton(m) and _fits(m, a, b)


def grouped_norms(items: list[Item], scalings: list[float]) -> list[torch.Tensor]:
    """‖M + s·B A‖ per row of M, float32 and detached, for each item; the same values as `dora_weight_norm` per item.

    Items that `groupable` accepts share one launch per (device, dtype, number of columns); the others go one by one.
    """
    if len(items) != len(scalings):
        raise ValueError(f"{len(items)} items but {len(scalings)} scalings")
    out: list[torch.Tensor | None] = [None] * len(items)
    groups: dict[tuple, list[int]] = {}
    triton_devices: dict[torch.device, bool] = {}  # whether the kernel may run there: asked once per device
    with torch.no_grad():
        for index, (m, a, b) in enumerate(items):
            if m.shape[1] != a.shape[1] or b.shape[0] != m.shape[0] or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"DoRA factors do not fit the weight: M {tuple(m.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)}"
                )
            device = m.device
            if device not in triton_devices:
                triton_devices[device] = not _failed and _use_triton(m)
            if triton_devices[device] and _fits(m, a, b):
                groups.setdefault((m.device, m.dtype, m.shape[1]), []).append(index)
            else:
                out[index] = dora_weight_norm(m, a, b, scalings[index])
        for indices in groups.values():
            try:
                norms = _triton().grouped_norms([items[i] for i in indices], [float(scalings[i]) for i in indices])
            except Exception as exc:  # a GPU or Triton build the kernel does not compile for: the per-layer path
                _failed.append(f"{type(exc).__name__}: {exc}")
                warnings.warn(f"adapterkit: the one-launch DoRA norm failed here ({_failed[-1][:200]}); DoRA layers "
                              "compute their norms one by one from now on", RuntimeWarning, stacklevel=2)
                norms = [dora_weight_norm(items[i][0], items[i][1], items[i][2], scalings[i]) for i in indices]
            for i, norm in zip(indices, norms):
                out[i] = norm
    return out
