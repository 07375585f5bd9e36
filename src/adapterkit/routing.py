"""Per-row adapter routing: one batch in which each row runs with its own LoRA adapter, or none, on the user's model.

    with ak.routed(model, ["a", "b", None, "a"]):     # batch row i uses adapter rows[i] (None: the base alone)
        model(input_ids=ids)  /  model.generate(...)

Each LoRA layer gets a table of every routed adapter's factors, stacked into fixed slots and padded to one rank
(zero padding keeps the math exact) with the scaling folded into B; slot 0 is zeros. The layer's forward adds the
gathered update (kernels/gathered_lora.py). A table made with `serving_table(model, capacity, max_rank)` stays on the
model: putting, replacing or removing an adapter is a copy into a slot, so a torch.compile'd model never recompiles.
Entering a block writes the route into one index tensor per device and gives each linear layer a `RoutedLinear`
(its path and kernel launch settled once), so a decode step's layer call does no per-call setup.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint.format import file_key
from .checkpoint.load import read_adapter
from .errors import ConfigError, MergeError
from .kernels.gathered_lora import RoutedLinear
from .methods.lora import LoraEmbedding, LoraLinear
from .methods.lora_config import LoraConfig
from .state import require_state, unwrap

TABLE_ATTR = "_adapterkit_serving"
ROUTED_ATTR = "_adapterkit_routed"
_LINEAR_KEYS = ("lora_A.weight", "lora_B.weight")
_EMBEDDING_KEYS = ("lora_embedding_A", "lora_embedding_B")


@dataclass
class _Layer:
    """One LoRA layer's slot tables. Linear: a (slots, R, in), b (slots, out, R). Embedding: a (slots, num, R) = Aᵀ."""

    path: str
    wrapper: LoraLinear | LoraEmbedding
    a: torch.Tensor
    b: torch.Tensor
    embedding: bool
    # Last installed, reused while the index tensor is the same: linear a RoutedLinear, embedding (a, b, index).
    routed: RoutedLinear | tuple | None = None


class AdapterTable:
    """Fixed-capacity adapter slots on every LoRA layer of a model (slot 0: no adapter).

    capacity: how many adapters it holds at once. max_rank: the padded rank R (an adapter of higher rank is refused).
    dtype: the tables' dtype (default: the first LoRA layer's base compute dtype).
    """

    def __init__(self, model: nn.Module, capacity: int, max_rank: int, dtype: torch.dtype | None = None) -> None:
        if not isinstance(capacity, int) or capacity < 1 or not isinstance(max_rank, int) or max_rank < 1:
            raise ConfigError(f"capacity and max_rank must be positive integers, got {capacity!r} and {max_rank!r}.")
        state = require_state(model)
        self.model = unwrap(model)
        self.capacity, self.max_rank = capacity, max_rank
        self.slots: dict[str, int] = {}  # adapter name -> slot (1..capacity)
        self.dropout: dict[str, float] = {}  # adapter name -> lora_dropout (routing refuses it while training)
        self._index: dict[torch.device, torch.Tensor] = {}  # device -> (rows,) slot per batch row
        self.layers: list[_Layer] = []
        for path, wrapper in state.wrappers.items():
            if not isinstance(wrapper, (LoraLinear, LoraEmbedding)):
                continue
            base = wrapper.base_layer
            factory = {"device": wrapper.view.device(base), "dtype": dtype or wrapper.view.compute_dtype(base)}
            n = capacity + 1
            if isinstance(wrapper, LoraEmbedding):
                a = torch.zeros(n, wrapper.num_embeddings, max_rank, **factory)
                b = torch.zeros(n, wrapper.embedding_dim, max_rank, **factory)
            else:
                a = torch.zeros(n, max_rank, wrapper.in_features, **factory)
                b = torch.zeros(n, wrapper.out_features, max_rank, **factory)
            self.layers.append(_Layer(path, wrapper, a, b, isinstance(wrapper, LoraEmbedding)))

    # -- slots ----------------------------------------------------------------------------------------------------
    def put(self, name: str, source: str | os.PathLike | None = None) -> int:
        """Copy adapter `name` into a slot (its own slot if already held: a replacement); returns the slot.

        source: None to copy the model's attached adapter `name`, or a PEFT-format adapter directory (read from
        disk; the adapter is never attached to the model). Everything is checked before any slot changes.
        """
        factors, dropout = (self._from_model(name) if source is None else self._from_dir(name, source))
        slot = self.slots.get(name)
        if slot is None:
            free = sorted(set(range(1, self.capacity + 1)) - set(self.slots.values()))
            if not free:
                raise ConfigError(
                    f"the serving table is full ({self.capacity} adapters: {sorted(self.slots)}); remove one first "
                    "or make a table with a larger capacity."
                )
            slot = free[0]
        with torch.no_grad():
            for layer in self.layers:
                layer.a[slot].zero_()
                layer.b[slot].zero_()
                pair = factors.get(layer.path)
                if pair is None:
                    continue  # this adapter has no update on this layer: the slot stays zero
                a, b, scaling = pair  # a (r, in) or (r, num); b (out, r) or (dim, r)
                r = a.shape[0]
                if layer.embedding:
                    layer.a[slot, :, :r].copy_(a.T)
                else:
                    layer.a[slot, :r].copy_(a)
                layer.b[slot, :, :r].copy_(b.float() * scaling)
        self.slots[name] = slot
        self.dropout[name] = dropout
        return slot

    def remove(self, name: str) -> None:
        """Free adapter `name`'s slot (zeroed, so a stale index reads the base)."""
        slot = self.slots.pop(name, None)
        if slot is None:
            raise ConfigError(f"the serving table holds no adapter {name!r}; it holds {sorted(self.slots)}.")
        self.dropout.pop(name, None)
        with torch.no_grad():
            for layer in self.layers:
                layer.a[slot].zero_()
                layer.b[slot].zero_()

    @property
    def names(self) -> list[str]:
        return sorted(self.slots, key=self.slots.get)

    def _check_rank(self, name: str, path: str, r: int) -> None:
        if r > self.max_rank:
            raise ConfigError(
                f"adapter {name!r} has rank {r} at {path!r}, above the table's max_rank {self.max_rank}; "
                "make the serving table with a larger max_rank."
            )

    def _from_model(self, name: str) -> tuple[dict[str, tuple], float]:
        """{layer path: (A, B, scaling)} of attached adapter `name`, after checking every layer can be routed."""
        state = require_state(self.model)
        if name not in state.configs:
            raise ConfigError(f"no adapter named {name!r}; attached adapters: {sorted(state.configs)}.")
        layers = {layer.path: layer for layer in self.layers}
        factors = {}
        for path, wrapper in state.wrappers.items():
            if name not in wrapper.adapter_names:
                continue
            check_routable(path, wrapper, name)
            layer = layers.get(path)
            if layer is None or layer.wrapper is not wrapper:
                raise ConfigError(
                    f"layer {path!r} (adapter {name!r}) was adapted after the serving table was made; "
                    "make a new table so it covers every LoRA layer."
                )
            if layer.embedding:
                a, b = wrapper.factors(name)
            else:
                a, b = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight
            self._check_rank(name, path, a.shape[0])
            factors[path] = (a.detach(), b.detach(), wrapper.records[name].scaling)
        return factors, float(getattr(state.configs[name], "lora_dropout", 0.0))

    def _from_dir(self, name: str, source: str | os.PathLike) -> tuple[dict[str, tuple], float]:
        """{layer path: (A, B, scaling)} read from a PEFT directory; every file tensor must land on a table layer."""
        folder, cfg, tensors, _ = read_adapter(source)
        if type(cfg) is not LoraConfig:
            raise ConfigError(f"{folder}: peft_type {cfg.peft_type} cannot be routed; only plain LoRA adapters can.")
        for field, bad in (("use_dora", cfg.use_dora), ("modules_to_save", bool(cfg.modules_to_save)),
                           ("trainable_token_indices", cfg.trainable_token_indices is not None)):
            if bad:
                raise ConfigError(
                    f"{folder}: {field} is set; routed batches compute plain LoRA only (x + s·B·A x per layer), "
                    "so this adapter would be served wrongly. Serve it alone (set_active) instead."
                )
        remaining = dict(tensors)
        factors = {}
        for layer in self.layers:
            names = _EMBEDDING_KEYS if layer.embedding else _LINEAR_KEYS
            keys = [file_key(layer.path, suffix) for suffix in names]
            if not any(k in remaining for k in keys):
                continue
            missing = [k for k in keys if k not in remaining]
            if missing:
                raise ConfigError(f"{folder}: {missing[0]} is missing (its pair is in the file).")
            a, b = remaining.pop(keys[0]), remaining.pop(keys[1])
            w = layer.wrapper
            want = (w.num_embeddings, w.embedding_dim) if layer.embedding else (w.in_features, w.out_features)
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != want[0] or b.shape[0] != want[1] or b.shape[1] != a.shape[0]:
                raise ConfigError(
                    f"{folder}: {keys[0]} {tuple(a.shape)} / {keys[1]} {tuple(b.shape)} do not fit layer "
                    f"{layer.path!r} ({want[0]} -> {want[1]})."
                )
            r = a.shape[0]
            if cfg.rank_for(layer.path) != r:
                raise ConfigError(f"{folder}: {keys[0]} has rank {r}, the config says {cfg.rank_for(layer.path)}.")
            self._check_rank(name, layer.path, r)
            factors[layer.path] = (a, b, cfg.scaling_for(layer.path))
        if remaining:
            key = sorted(remaining)[0]
            raise ConfigError(
                f"{folder}: {key} has no LoRA layer of this model to go to (the serving table covers "
                f"{len(self.layers)} layers); attach an adapter targeting that module before making the table."
            )
        return factors, float(cfg.lora_dropout)

    # -- routing --------------------------------------------------------------------------------------------------
    def index_for(self, rows: Sequence[str | None], device: torch.device) -> torch.Tensor:
        """The (rows,) slot tensor on `device`, written in place into the previous one when the batch size is the same
        (so a compiled or graph-captured model keeps reading the same tensor)."""
        slots = torch.tensor([0 if n is None else self.slots[n] for n in rows], dtype=torch.long)
        index = self._index.get(device)
        if index is None or index.shape != slots.shape:
            with torch.inference_mode(False):  # a normal tensor, so later calls may write it in or out of that mode
                index = self._index[device] = torch.empty(slots.shape, dtype=torch.long, device=device)
        index.copy_(slots)
        return index

    def install(self, rows: Sequence[str | None]) -> None:
        """Write the route (one index per device, not one per layer) and hand each layer its routed update."""
        indexes: dict[torch.device, torch.Tensor] = {}
        for layer in self.layers:
            device = layer.a.device
            index = indexes.get(device)
            if index is None:
                index = indexes[device] = self.index_for(rows, device)
            if layer.embedding:
                if layer.routed is None or layer.routed[2] is not index:
                    layer.routed = (layer.a, layer.b, index)
            elif layer.routed is None or not layer.routed.current(layer.a, layer.b, index):
                layer.routed = RoutedLinear(layer.a, layer.b, index)  # path and launch settled once, not per call
            layer.wrapper._set_plain(_routed=layer.routed)

    def uninstall(self) -> None:
        for layer in self.layers:
            layer.wrapper._set_plain(_routed=None)


def check_routable(path: str, wrapper: nn.Module, name: str) -> None:
    """ConfigError / MergeError when adapter `name` on this layer is not plain, unmerged LoRA."""
    if not isinstance(wrapper, (LoraLinear, LoraEmbedding)):
        raise ConfigError(
            f"adapter {name!r} has a {wrapper.method} layer at {path!r} ({type(wrapper).__name__}); routed batches "
            "compute plain LoRA only. Serve this adapter alone (set_active), or save it without that part."
        )
    if name in wrapper.merged_names:
        raise MergeError(f"adapter {name!r} is merged into {path!r}; unmerge it before routing rows to it.")
    if wrapper.records[name].use_dora:
        raise ConfigError(
            f"adapter {name!r} is DoRA at {path!r}; routed batches compute plain LoRA only (DoRA renormalises the "
            "whole weight per adapter). Serve it alone (set_active), or export it as LoRA first."
        )


def serving_table(
    model: nn.Module, capacity: int, max_rank: int, names: Sequence[str] = (), dtype: torch.dtype | None = None
) -> AdapterTable:
    """Make a fixed-capacity table on `model` that `routed` uses from now on; `names`: attached adapters to put."""
    table = AdapterTable(model, capacity, max_rank, dtype)
    for name in names:
        table.put(name)
    unwrap(model).__dict__[TABLE_ATTR] = table
    return table


def drop_serving_table(model: nn.Module) -> None:
    unwrap(model).__dict__.pop(TABLE_ATTR, None)


def _check_rows(rows: Sequence[str | None]) -> list[str | None]:
    if isinstance(rows, str) or not isinstance(rows, Sequence) or not rows:
        raise ConfigError(f"rows must be a non-empty list of adapter names or None (one per batch row), got {rows!r}.")
    bad = [r for r in rows if r is not None and not isinstance(r, str)]
    if bad:
        raise ConfigError(f"rows must hold adapter names (str) or None, got {bad[0]!r}.")
    return list(rows)


@contextlib.contextmanager
def routed(model: nn.Module, rows: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, batch row i of every forward (and generate step) uses adapter rows[i]; None: no adapter.

    Uses the model's serving table when it has one (every name must be in it), else a table of the named attached
    adapters built for this block. Layers of other methods are switched off for the block; merged adapters, DoRA,
    modules_to_save and trainable tokens on a routed adapter are refused before anything changes.
    """
    rows = _check_rows(rows)
    inner = unwrap(model)
    state = require_state(inner)
    if inner.__dict__.get(ROUTED_ATTR):
        raise ConfigError("routed() blocks do not nest; leave the current block first.")
    names = sorted({n for n in rows if n is not None})
    table = inner.__dict__.get(TABLE_ATTR)
    for path, wrapper in state.wrappers.items():
        if wrapper.merged_names:
            raise MergeError(
                f"adapter {wrapper.merged_names[0]!r} is merged into {path!r}, so every row would get it; "
                "unmerge before routing."
            )
    if table is None:
        unknown = [n for n in names if n not in state.configs]
        if unknown:
            raise ConfigError(f"no adapter named {unknown[0]!r}; attached adapters: {sorted(state.configs)}.")
        for path, wrapper in state.wrappers.items():
            for name in names:
                if name in wrapper.adapter_names:
                    check_routable(path, wrapper, name)
        max_rank = max([w.records[n].r for w in state.wrappers.values() for n in names if n in w.adapter_names] or [1])
        dtypes = [p.dtype for w in state.wrappers.values() for n in names for p in w.adapter_parameters(n)]
        dtype = None
        for d in dtypes:
            dtype = d if dtype is None else torch.promote_types(dtype, d)
        table = AdapterTable(inner, max(1, len(names)), max_rank, dtype)
        for name in names:
            table.put(name)
    else:
        unknown = [n for n in names if n not in table.slots]
        if unknown:
            raise ConfigError(
                f"the serving table holds no adapter {unknown[0]!r} (it holds {table.names}); put it first."
            )
        covered = {id(layer.wrapper) for layer in table.layers}
        for path, wrapper in state.wrappers.items():
            if isinstance(wrapper, (LoraLinear, LoraEmbedding)) and id(wrapper) not in covered:
                raise ConfigError(
                    f"layer {path!r} was adapted after the serving table was made; make a new table."
                )
    if any(table.dropout.get(n, 0.0) > 0 for n in names) and any(l.wrapper.training for l in table.layers):
        raise ConfigError("routed batches run adapters without dropout; call model.eval() before routing.")

    # Layers of other methods (modules_to_save copies, token rows) belong to no routed adapter: off for the block.
    others = [w for w in state.wrappers.values() if not isinstance(w, (LoraLinear, LoraEmbedding))]
    saved = [(w, w.active_names) for w in others]
    inner.__dict__[ROUTED_ATTR] = True
    try:
        for w in others:
            w.set_active(())
        table.install(rows)
        yield model
    finally:
        table.uninstall()
        for w, names_before in saved:
            w.set_active(names_before)
        inner.__dict__[ROUTED_ATTR] = False
