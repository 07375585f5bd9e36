"""LoRA layers: `W x + s * B(A(dropout(x)))` around nn.Linear, transformers Conv1D and nn.Embedding.

Parameter names follow PEFT (`lora_A.<name>.weight`, `lora_B.<name>.weight`, `lora_embedding_A.<name>`), so the
model's own state dict reads like a PEFT model's. A (r, in) starts kaiming-uniform(a=sqrt(5)), B (out, r) at zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig
from ..kernels import lora_linear
from ..targeting import is_conv1d
from .base import AdapterWrapper


def supports(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module)


def wrap(module: nn.Module) -> AdapterWrapper:
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    return LoraLinear(module)


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


def _product_bound(a: torch.Tensor, b: torch.Tensor, scaling: float) -> float:
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
    """LoRA around a linear layer. For Conv1D (weight stored (in, out)) the delta is transposed on merge only.

    Dropout on the adapter's input is functional (`dropout_p[name]`, applied while the layer is training), so it
    costs no module per adapter.
    """

    adapter_containers = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        w = base_layer.weight
        fan_in_fan_out = is_conv1d(base_layer)
        in_features, out_features = (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])
        self._set_plain(
            fan_in_fan_out=fan_in_fan_out,
            in_features=in_features,
            out_features=out_features,
            scaling={},
            dropout_p={},
            # Hot-path cache: ((A, B, dropout p, scaling), ...) for the active, unmerged adapters.
            _active_lora=(),
        )
        self.lora_A = self._container(nn.ModuleDict)
        self.lora_B = self._container(nn.ModuleDict)

    def add_adapter(
        self, name: str, cfg: LoraConfig, path: str, *, dtype: torch.dtype | None = None, init: bool = True
    ) -> None:
        r = cfg.rank_for(path)
        w = self._modules["base_layer"].weight
        factory = {"device": w.device, "dtype": dtype or w.dtype}
        a, b = _linear_pair(r, self.in_features, self.out_features, cfg.init_lora_weights if init else None, factory)
        self.lora_A[name] = _Factor(a, self.training)
        self.lora_B[name] = _Factor(b, self.training)
        self.dropout_p[name] = float(cfg.lora_dropout)
        self.scaling[name] = cfg.scaling_for(path)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.dropout_p.pop(name, None)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        factors = self._factors(name)
        return [f._parameters["weight"] for f in factors] if factors else []

    def _factors(self, name: str) -> tuple[_Factor, _Factor] | None:
        """(A, B) modules of adapter `name`, read from the registered containers without attribute lookups (this is
        asked for every layer of the model on each activation change)."""
        lora_a = self._modules["lora_A"]._modules.get(name)
        return None if lora_a is None else (lora_a, self._modules["lora_B"]._modules[name])

    def _refresh(self) -> None:
        active = tuple(
            (*self._factors(n), self.dropout_p[n], self.scaling[n])
            for n in self.active_names
            if n not in self.merged_names
        )
        self._set_plain(_active_lora=active)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self._active_lora
        base = self.base_layer
        if len(active) == 1 and type(base) is nn.Linear and not args and not kwargs:
            # One unmerged adapter on a plain nn.Linear: the fused kernel (one autograd node, rank-r update added in
            # place, only x saved). Conv1D, subclasses (quantized layers) and several adapters take the loop below.
            lora_a, lora_b, p, scaling = active[0]
            return lora_linear(x, base.weight, base.bias, lora_a.weight, lora_b.weight, scaling, p, self.training)
        out = base(x, *args, **kwargs)
        for lora_a, lora_b, p, scaling in active:
            h = x.to(lora_a.weight.dtype)  # (..., in)
            if p and self.training:
                h = F.dropout(h, p, True)
            out = out + (lora_b(lora_a(h)) * scaling).to(out.dtype)  # (..., r) -> (..., out)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight.float()  # (r, in)
        b = self.lora_B[name].weight.float()  # (out, r)
        delta = (b @ a) * self.scaling[name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def add_delta(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight.detach().float()  # (r, in)
        b = self.lora_B[name].weight.detach().float()  # (out, r)
        if self.fan_in_fan_out:  # weight (in, out)
            return torch.addmm(weight, a.T, b.T, alpha=self.scaling[name])
        return torch.addmm(weight, b, a, alpha=self.scaling[name])  # one pass: weight + s * (B @ A)

    def add_delta_(self, weight: torch.Tensor, name: str) -> None:
        a = self.lora_A[name].weight.detach().float()  # (r, in)
        b = self.lora_B[name].weight.detach().float()  # (out, r)
        if self.fan_in_fan_out:
            weight.addmm_(a.T, b.T, alpha=self.scaling[name])
        else:
            weight.addmm_(b, a, alpha=self.scaling[name])

    def max_delta_bound(self, name: str) -> float:
        return _product_bound(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT's per-module tensor names (after `base_model.model.<path>.`) for this adapter."""
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}


class LoraEmbedding(AdapterWrapper):
    """LoRA on an embedding table: rows of A^T are looked up like embeddings, then projected by B^T.

    PEFT stores `lora_embedding_A` (r, num_embeddings) and `lora_embedding_B` (embedding_dim, r) as bare parameters.
    """

    adapter_containers = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        self.lora_embedding_A = self._container(nn.ParameterDict)
        self.lora_embedding_B = self._container(nn.ParameterDict)
        self.scaling: dict[str, float] = {}
        self._active_lora: tuple[tuple[nn.Parameter, nn.Parameter, float], ...] = ()

    def add_adapter(
        self, name: str, cfg: LoraConfig, path: str, *, dtype: torch.dtype | None = None, init: bool = True
    ) -> None:
        r = cfg.rank_for(path)
        w = self.base_layer.weight
        factory = {"device": w.device, "dtype": dtype or w.dtype}
        a = torch.empty(r, self.num_embeddings, **factory)
        b = torch.empty(self.embedding_dim, r, **factory)
        if init:
            if cfg.init_lora_weights is False:
                nn.init.normal_(a)  # random non-zero A and B: the adapter changes outputs from the start
                nn.init.normal_(b)
            else:
                nn.init.zeros_(a)
                nn.init.normal_(b)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        self.scaling[name] = cfg.scaling_for(path)

    def _refresh(self) -> None:
        self._active_lora = tuple(
            (self.lora_embedding_A[n], self.lora_embedding_B[n], self.scaling[n])
            for n in self.active_names
            if n not in self.merged_names
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        out = base(ids)
        for a, b, scaling in self._active_lora:
            h = F.embedding(ids, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
            out = out + ((h @ b.T) * scaling).to(out.dtype)  # (..., r) -> (..., dim)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_embedding_A[name].float()  # (r, num_embeddings)
        b = self.lora_embedding_B[name].float()  # (dim, r)
        return (b @ a).T * self.scaling[name]  # (num_embeddings, dim)

    def max_delta_bound(self, name: str) -> float:
        return _product_bound(self.lora_embedding_A[name], self.lora_embedding_B[name], self.scaling[name])

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_embedding_A": self.lora_embedding_A[name], "lora_embedding_B": self.lora_embedding_B[name]}
