"""LoRA layers: `W x + s * B(A(dropout(x)))` around nn.Linear, transformers Conv1D and nn.Embedding (DoRA: dora.py).

Parameter names follow PEFT (`lora_A.<name>.weight`, `lora_B.<name>.weight`, `lora_embedding_A.<name>`), so the
model's own state dict reads like a PEFT model's. A (r, in) starts kaiming-uniform(a=sqrt(5)), B (out, r) at zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..kernels.lora_linear import lora_infer, lora_linear
from ..kernels.dora import dora_linear
from ..kernels.gathered_lora import gathered_embedding
from . import dora, lora_init
from .base import AdapterWrapper, AttachContext
from .lora_config import LoraConfig


@dataclass
class LoraRecord:
    """One LoRA adapter on one layer: the scalars its forward and merge need."""

    r: int
    scaling: float
    dropout: float = 0.0
    use_dora: bool = False
    initial: tuple[torch.Tensor, torch.Tensor] | None = None  # (A0, B0) of a PiSSA / OLoRA init (lora_init.py)


def _linear_pair(
    r: int, n_in: int, n_out: int, init: bool | str | None, factory: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, n_in) and B (n_out, r) as PEFT starts them: A kaiming-uniform(a=sqrt(5)) (bound 1/sqrt(n_in)) or
    normal(0, 1/r) for "gaussian"; B zero, or random like A when `init is False` (a non-zero adapter, for tests);
    `init is None`: both left uninitialised, for a load that fills them."""
    if init is None:
        return torch.empty(r, n_in, **factory), torch.empty(n_out, r, **factory)
    # Fresh tensors that do not require grad: no autograd context is needed to fill them.
    if init == "gaussian":
        a = torch.empty(r, n_in, **factory).normal_(std=1 / r)
    else:
        bound = 1 / math.sqrt(n_in)
        a = torch.empty(r, n_in, **factory).uniform_(-bound, bound)
    if init is False:
        b = torch.empty(n_out, r, **factory).uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r))
    else:
        b = torch.zeros(n_out, r, **factory)
    return a, b


def product_bound(a: torch.Tensor, b: torch.Tensor, scaling: float) -> float:
    """Upper bound on every entry of s * B @ A (A (r, n), B (m, r)): |sum_k B_ik A_kj| <= ||B_i,:|| ||A_:,j||."""
    a, b = a.detach().float(), b.detach().float()
    return float(b.norm(dim=1).max() * a.norm(dim=0).max() * abs(scaling))


class _Factor(nn.Module):
    """One LoRA factor: a bias-free linear map around a ready weight, so `lora_A.<name>.weight` reads as in PEFT.

    Not an nn.Linear: that constructor would allocate and kaiming-initialise a weight only for it to be replaced (with
    ~400 factors on a 135M model this dominated `attach`), and code that scans a model for nn.Linear layers (to
    quantize or target them) should not mistake a factor for a layer of the model.
    """

    def __init__(self, weight: torch.Tensor, training: bool) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.__dict__.update(in_features=in_features, out_features=out_features, training=training)
        self.register_parameter("weight", nn.Parameter(weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class LoraLinear(AdapterWrapper):
    """LoRA (and DoRA) around a linear layer. For Conv1D (weight stored (in, out)) the delta is transposed on merge.

    Dropout on the adapter's input is functional (the record's `dropout`, applied while the layer is training), so it
    costs no module per adapter.
    """

    method = "LORA"
    containers = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, view=None) -> None:
        super().__init__(base_layer, view)
        self._set_plain(
            # Hot path: ((A module, B module, magnitude holder or None, dropout p, scaling), ...) for the live adapters,
            # and whether the fused single-adapter kernel applies.
            _active_lora=(),
            _fused=None,
            # Per-row routing (routing.py sets and clears it): a RoutedLinear (A table (slots, R, in), B table
            # (slots, out, R), slot per batch row (rows,)); routed(x, base output) adds the update; or None.
            _routed=None,
            # Sibling projections read one input (q/k/v, gate/up): their SiblingGroup (lora_siblings.py), or None.
            _siblings=None,
        )
        self.lora_A = self._container(nn.ModuleDict)
        self.lora_B = self._container(nn.ModuleDict)
        self.lora_magnitude_vector = self._container(nn.ModuleDict)

    def add_adapter(self, name: str, cfg: LoraConfig, path: str, ctx: AttachContext | None = None) -> None:
        r = cfg.rank_for(path)
        init = cfg.init_lora_weights if ctx is None or ctx.init else None
        factory = self._factory(ctx)
        a, b = _linear_pair(r, self.in_features, self.out_features, init, factory)
        self.lora_A[name] = _Factor(a, self.training)
        self.lora_B[name] = _Factor(b, self.training)
        record = LoraRecord(r=r, scaling=cfg.scaling_for(path), dropout=float(cfg.lora_dropout), use_dora=cfg.use_dora)
        self.records[name] = record
        if init is not None and lora_init.is_residual_init(init):
            lora_init.init_residual(self, name, init)  # PiSSA / OLoRA: factors from W, W replaced by the residual
        if cfg.use_dora:
            self.lora_magnitude_vector[name] = dora.Magnitude(self, name, record, init is not None, factory)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        lora_a = self._modules["lora_A"]._modules.get(name)
        if lora_a is None:
            return []
        params = [lora_a._parameters["weight"], self._modules["lora_B"]._modules[name]._parameters["weight"]]
        magnitude = self._modules["lora_magnitude_vector"]._modules.get(name)
        return params + ([magnitude._parameters["weight"]] if magnitude is not None else [])

    def _refresh(self) -> None:
        lora_a, lora_b = self._modules["lora_A"]._modules, self._modules["lora_B"]._modules
        magnitudes = self._modules["lora_magnitude_vector"]._modules
        active = tuple(
            (lora_a[n], lora_b[n], magnitudes.get(n), self.records[n].dropout, self.records[n].scaling)
            for n in self._live()
        )
        base = self._modules["base_layer"]
        # One unmerged adapter: one autograd node. Plain LoRA on nn.Linear: the fused kernel (only x saved); on a
        # packed base that can hand its dequantized weight over (bitsandbytes 4-bit): the same kernel, dequantizing in
        # forward and backward as the layer itself does; DoRA on a float nn.Linear / Conv1D: the DoRA node. Anything
        # else (8-bit and torchao bases, DoRA on a packed base, several adapters) loops.
        fused = None
        if len(active) == 1 and not self.view.quantized(base):
            if active[0][2] is None and type(base) is nn.Linear:
                fused = "lora"
            elif active[0][2] is not None:
                fused = "dora"
        elif len(active) == 1 and active[0][2] is None and self.view.dequantizer(base) is not None:
            fused = "packed"
        self._set_plain(_active_lora=active, _fused=fused)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routed = self._routed
        if routed is not None:
            return routed(x, self.base_layer(x, *args, **kwargs))
        active = self._active_lora
        base = self.base_layer
        fused = self._fused
        if fused == "lora" and not args and not kwargs:
            lora_a, lora_b, _, p, scaling = active[0]
            if torch.is_grad_enabled() or (p and self.training):
                siblings = self._siblings
                out = siblings(self, x) if siblings is not None else None  # the siblings' one node, where it applies
                if out is not None:
                    return out
                return lora_linear(x, base.weight, base.bias, lora_a.weight, lora_b.weight, scaling, p, self.training)
            return lora_infer(x, base.weight, base.bias, lora_a.weight, lora_b.weight, scaling)  # serving, decode
        if fused == "packed" and not args and not kwargs and torch.is_grad_enabled():
            # Training only: without gradients bitsandbytes picks its own kernels (a fused 4-bit GEMV for decode).
            siblings = self._siblings
            out = siblings(self, x) if siblings is not None else None
            if out is not None:
                return out
            lora_a, lora_b, _, p, scaling = active[0]
            bias = base.bias
            if x.dtype == self.view.compute_dtype(base) and (bias is None or bias.dtype == x.dtype):
                return lora_linear(x, self.view.dequantizer(base), bias, lora_a.weight, lora_b.weight, scaling, p,
                                   self.training)
        if fused == "dora" and not args and not kwargs:
            lora_a, lora_b, magnitude, p, scaling = active[0]
            return dora_linear(x, base.weight, base.bias, lora_a.weight, lora_b.weight, magnitude.weight, scaling, p,
                               self.training, fan_in_fan_out=self.fan_in_fan_out, norm=magnitude.norm(self),
                               recompute=True, from_output=True)
        out = base(x, *args, **kwargs)
        for lora_a, lora_b, magnitude, p, scaling in active:
            h = x.to(lora_a.weight.dtype)  # (..., in)
            if p and self.training:
                h = F.dropout(h, p, True)
            if magnitude is not None:
                out = magnitude.apply(self, h, out, p > 0 and self.training)
                continue
            out = out + (lora_b(lora_a(h)) * scaling).to(out.dtype)  # (..., r) -> (..., out)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        magnitude = self._modules["lora_magnitude_vector"]._modules.get(name)
        if magnitude is not None:
            return magnitude.merged_weight(self) - self.view.float_weight(self.base_layer)
        a = self.lora_A[name].weight.detach().float()  # (r, in)
        b = self.lora_B[name].weight.detach().float()  # (out, r)
        delta = (b @ a) * self.records[name].scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def add_delta(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        if name in self._modules["lora_magnitude_vector"]._modules:
            return weight + self.delta_weight(name)
        a = self.lora_A[name].weight.detach().float()  # (r, in)
        b = self.lora_B[name].weight.detach().float()  # (out, r)
        s = self.records[name].scaling
        if self.fan_in_fan_out:  # weight (in, out)
            return torch.addmm(weight, a.T, b.T, alpha=s)
        return torch.addmm(weight, b, a, alpha=s)  # one pass: weight + s * (B @ A)

    def add_delta_(self, weight: torch.Tensor, name: str) -> None:
        if name in self._modules["lora_magnitude_vector"]._modules:
            weight.add_(self.delta_weight(name))
            return
        a = self.lora_A[name].weight.detach().float()  # (r, in)
        b = self.lora_B[name].weight.detach().float()  # (out, r)
        s = self.records[name].scaling
        if self.fan_in_fan_out:
            weight.addmm_(a.T, b.T, alpha=s)
        else:
            weight.addmm_(b, a, alpha=s)

    def max_delta_bound(self, name: str) -> float:
        if name in self._modules["lora_magnitude_vector"]._modules:
            return float("inf")  # DoRA rescales whole rows: no cheap bound, the merge check computes the delta
        return product_bound(self.lora_A[name].weight, self.lora_B[name].weight, self.records[name].scaling)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT's per-module tensor names (after `base_model.model.<path>.`) for this adapter."""
        out = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        magnitude = self._modules["lora_magnitude_vector"]._modules.get(name)
        if magnitude is not None:
            out["lora_magnitude_vector"] = magnitude.weight
        return out


class LoraEmbedding(AdapterWrapper):
    """LoRA on an embedding table: rows of A^T are looked up like embeddings, then projected by B^T.

    PEFT stores `lora_embedding_A` (r, num_embeddings) and `lora_embedding_B` (embedding_dim, r) as bare parameters.
    The forward reads them from their ParameterDicts at call time (never a cached Parameter object), so parameters
    replaced by `load_state_dict(assign=True)` or FSDP2 are the ones used.
    """

    method = "LORA"
    containers = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Embedding, view=None) -> None:
        super().__init__(base_layer, view)
        self.num_embeddings, self.embedding_dim = self.view.features(base_layer)
        self.lora_embedding_A = self._container(nn.ParameterDict)
        self.lora_embedding_B = self._container(nn.ParameterDict)
        self.lora_magnitude_vector = self._container(nn.ModuleDict)
        # Per-row routing (routing.py): (Aᵀ table (slots, num_embeddings, R), B table (slots, dim, R), slot per row).
        self._set_plain(_active_lora=(), _routed=None)

    def add_adapter(self, name: str, cfg: LoraConfig, path: str, ctx: AttachContext | None = None) -> None:
        r = cfg.rank_for(path)
        if lora_init.is_residual_init(cfg.init_lora_weights):
            raise ConfigError(f"init_lora_weights={cfg.init_lora_weights!r} applies to linear layers only; {path!r} "
                              "is an embedding. Leave it out of target_modules.")
        factory = self._factory(ctx)
        a = torch.empty(r, self.num_embeddings, **factory)
        b = torch.empty(self.embedding_dim, r, **factory)
        if ctx is None or ctx.init:
            if cfg.init_lora_weights is False:
                nn.init.normal_(a)  # random non-zero A and B: the adapter changes outputs from the start
                nn.init.normal_(b)
            else:
                nn.init.zeros_(a)
                nn.init.normal_(b)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        record = LoraRecord(r=r, scaling=cfg.scaling_for(path), use_dora=cfg.use_dora)
        self.records[name] = record
        if cfg.use_dora:
            self.lora_magnitude_vector[name] = dora.Magnitude(self, name, record, ctx is None or ctx.init, factory)

    def _refresh(self) -> None:
        magnitudes = self._modules["lora_magnitude_vector"]._modules
        self._set_plain(_active_lora=tuple((n, magnitudes.get(n), self.records[n].scaling) for n in self._live()))

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._modules["lora_embedding_A"]._parameters[name], self._modules["lora_embedding_B"]._parameters[name]

    def lookup(self, ids: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Rows of Aᵀ for `ids`, with the base embedding's own lookup options."""
        base = self.base_layer
        return F.embedding(ids, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(ids)
        routed = self._routed
        if routed is not None:
            return gathered_embedding(ids, routed[0], routed[1], routed[2], out)
        for name, magnitude, scaling in self._active_lora:
            a, b = self.factors(name)
            if magnitude is not None:
                out = magnitude.apply(self, ids, out, False)
                continue
            out = out + ((self.lookup(ids, a) @ b.T) * scaling).to(out.dtype)  # (..., r) -> (..., dim)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        magnitude = self._modules["lora_magnitude_vector"]._modules.get(name)
        if magnitude is not None:
            return magnitude.merged_weight(self) - self.view.float_weight(self.base_layer)
        a, b = (t.detach().float() for t in self.factors(name))  # (r, num_embeddings), (dim, r)
        return (b @ a).T * self.records[name].scaling  # (num_embeddings, dim)

    def max_delta_bound(self, name: str) -> float:
        a, b = self.factors(name)
        if name in self._modules["lora_magnitude_vector"]._modules:
            return float("inf")  # DoRA: checked exactly
        return product_bound(a, b, self.records[name].scaling)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        a, b = self.factors(name)
        out = {"lora_embedding_A": a, "lora_embedding_B": b}
        magnitude = self._modules["lora_magnitude_vector"]._modules.get(name)
        if magnitude is not None:
            out["lora_magnitude_vector"] = magnitude.weight
        return out


def wrap(module: nn.Module) -> AdapterWrapper:
    """The LoRA wrapper for a bare layer (for tests and hand-built models; `attach` goes through the method table)."""
    return LoraEmbedding(module) if isinstance(module, nn.Embedding) else LoraLinear(module)
