"""OFT (Qiu et al., 2023; PEFT 0.21's `OFTConfig`): a block-diagonal orthogonal rotation of the layer's input (its
output for embeddings). Config, the rotation, and layers around nn.Linear, 1x1 nn.Conv2d and nn.Embedding.

    linear / conv:  y = W (x R) + b          embedding:  y = E[ids] R          R = diag(R_1, ..., R_k), bs x bs blocks

Each block comes from a skew-symmetric Q_i filled from `oft_R.<name>.weight` (k, bs(bs-1)/2) row-major above the
diagonal: exactly R_i = (I - Q_i)(I + Q_i)^-1 (Cayley), or PEFT's default truncated Neumann series
I + 2Q + 2Q² + ... + 2Q^(n-2) + Q^(n-1). block_share: one block repeated. Merging folds R into the weight
(W Rᵀ, or E R for embeddings); unmerge puts the original weight object back (PEFT inverts R).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import MAX_RANK, AdapterConfig
from ..errors import ConfigError, TargetError
from .base import AdapterWrapper, AttachContext

MAX_BLOCK = 4096  # a block of bs x bs entries, stored as bs(bs-1)/2 numbers


@dataclass
class OFTConfig(AdapterConfig):
    """OFT with PEFT 0.21's JSON keys and defaults. Set exactly one of r (blocks per layer) and oft_block_size."""

    r: int = 0  # number of blocks per layer (0: derived from oft_block_size)
    oft_block_size: int = 32  # block size (0: derived from r); adjusted to a divisor of the features as PEFT does
    module_dropout: float = 0.0  # kept for PEFT compatibility: PEFT 0.21 stores it but never applies it; nor do we
    fan_in_fan_out: bool = False  # OFT does not adapt Conv1D, so this stays False
    bias: str = "none"  # only "none": base biases stay frozen
    init_weights: bool = True  # True: Q = 0 (R = I, a no-op); False: Q ~ normal(0, 0.1)
    coft: bool = False  # constrained OFT: not implemented, refused when True
    eps: float = 6e-5  # COFT's radius (unused without coft)
    block_share: bool = False  # one block shared by all blocks of a layer
    use_cayley_neumann: bool = True  # truncated Neumann series instead of the exact inverse
    num_cayley_neumann_terms: int = 5
    peft_type: str = "OFT"

    PEFT_TYPE: ClassVar[str] = "OFT"
    FIELD_TYPES: ClassVar[dict[str, str]] = {
        **AdapterConfig.FIELD_TYPES,
        "r": "int",
        "oft_block_size": "int",
        "module_dropout": "number",
        "fan_in_fan_out": "bool",
        "bias": "str",
        "init_weights": "bool",
        "coft": "bool",
        "eps": "number",
        "block_share": "bool",
        "use_cayley_neumann": "bool",
        "num_cayley_neumann_terms": "int",
    }

    def validate(self) -> None:
        super().validate()
        if self.r < 0 or self.r > MAX_RANK or self.oft_block_size < 0 or self.oft_block_size > MAX_BLOCK:
            raise ConfigError(
                f"OFTConfig: r must be in [0, {MAX_RANK}] and oft_block_size in [0, {MAX_BLOCK}], "
                f"got r={self.r}, oft_block_size={self.oft_block_size}."
            )
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(
                f"OFTConfig: set exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) to a "
                "non-zero value (r x oft_block_size = the layer's input features); e.g. r=0, oft_block_size=32."
            )
        if not (0.0 <= self.module_dropout < 1.0):
            raise ConfigError(f"OFTConfig: module_dropout must be in [0, 1), got {self.module_dropout!r}.")
        if self.num_cayley_neumann_terms < 1 or self.num_cayley_neumann_terms > 64:
            raise ConfigError(
                f"OFTConfig: num_cayley_neumann_terms must be in [1, 64], got {self.num_cayley_neumann_terms!r}."
            )
        if self.coft:
            raise ConfigError(
                "OFTConfig: coft=True (constrained OFT) is a PEFT feature adapterkit does not support yet; PEFT "
                "rewrites the weights inside the forward pass. Use coft=False."
            )
        if self.bias != "none":
            raise ConfigError(
                f"OFTConfig: bias={self.bias!r} is not supported yet: adapterkit keeps base biases frozen "
                "(bias='none'). Use modules_to_save for the modules whose bias should train."
            )


def _nearest_divisor(n: int, value: int) -> int:
    """The divisor of n closest to `value` (ties go down; n itself when value >= n): PEFT's adjustment rule."""
    if value >= n:
        return n
    higher = value
    while higher <= n and n % higher:
        higher += 1
    lower = value
    while lower > 1 and n % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def blocks_for(cfg: OFTConfig, features: int, path: str) -> tuple[int, int]:
    """(number of blocks, block size) for a layer rotating `features` values, adjusted as PEFT adjusts them."""
    if cfg.r == 0:
        size = cfg.oft_block_size
        if features % size or size > features:
            size = _nearest_divisor(features, size)
            warnings.warn(f"{path}: oft_block_size {cfg.oft_block_size} does not divide {features}; using {size}.")
        return features // size, size
    r = cfg.r
    if features % r or r > features:
        r = _nearest_divisor(features, r)
        warnings.warn(f"{path}: r={cfg.r} does not divide {features}; using r={r}.")
    return r, features // r


class Rotation(nn.Module):
    """`weight` (stored blocks, bs(bs-1)/2): the upper triangles of the skew-symmetric Q blocks of one adapter."""

    def __init__(self, blocks: int, size: int, cfg: OFTConfig, init: bool | None, factory: dict, training: bool):
        super().__init__()
        self.__dict__.update(
            blocks=blocks,  # blocks applied (rank)
            size=size,
            shared=cfg.block_share,
            neumann=cfg.use_cayley_neumann,
            terms=cfg.num_cayley_neumann_terms,
            training=training,
        )
        stored = 1 if cfg.block_share else blocks
        weight = torch.empty(stored, size * (size - 1) // 2, **factory)
        if init is True:
            weight.zero_()
        elif init is False:
            weight.normal_(0.0, 0.1)
        self.register_parameter("weight", nn.Parameter(weight))
        rows, cols = torch.triu_indices(size, size, 1, device=factory["device"])
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def matrices(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(blocks, bs, bs) rotation blocks in the weight's dtype (one block repeated when shared)."""
        q = self.weight if weight is None else weight  # (stored, n)
        stored, size = q.shape[0], self.size
        upper = q.new_zeros(stored, size, size)
        upper[:, self.rows, self.cols] = q
        skew = upper - upper.transpose(-2, -1)  # (stored, bs, bs)
        eye = torch.eye(size, device=q.device, dtype=q.dtype).expand(stored, size, size)
        if self.neumann:
            rot = eye.clone()
            n = self.terms
            if n > 1:
                rot = rot + 2.0 * skew
            if n > 2:
                power = skew @ skew
                rot = rot + 2.0 * power
                for _ in range(3, n - 1):
                    power = power @ skew
                    rot = rot + 2.0 * power
                rot = rot + power @ skew
        else:
            rot = torch.linalg.solve(eye + skew, eye - skew, left=False)  # (I - Q)(I + Q)^-1
        return rot.expand(self.blocks, size, size) if self.shared else rot

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x R over the last dimension: (..., blocks * bs) -> same shape, in x's dtype."""
        rot = self.matrices()
        h = x.to(rot.dtype).reshape(*x.shape[:-1], self.blocks, self.size)
        return torch.einsum("...rk,rkc->...rc", h, rot).reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}, block_size={self.size}, shared={self.shared}"


@dataclass
class OFTRecord:
    """One OFT adapter on one layer."""

    blocks: int
    block_size: int


class OFTLinear(AdapterWrapper):
    """OFT around nn.Linear: the input is rotated before the base layer; merged, W becomes W Rᵀ."""

    method = "OFT"
    containers = ("oft_R",)
    file_suffix: ClassVar[str] = "oft_R.weight"

    def __init__(self, base_layer: nn.Module, view=None) -> None:
        super().__init__(base_layer, view)
        reason = self.refuses(base_layer)
        if reason:
            raise TargetError(reason)
        self._set_plain(_active_oft=(), _rotated=self.in_features)  # _rotated: the features R acts on
        setattr(self, self.containers[0], self._container(nn.ModuleDict))

    def _rotations(self) -> nn.ModuleDict:
        return self._modules[self.containers[0]]

    def add_adapter(self, name: str, cfg: OFTConfig, path: str, ctx: AttachContext | None = None) -> None:
        blocks, size = blocks_for(cfg, self._rotated, path)
        init = cfg.init_weights if ctx is None or ctx.init else None
        self._rotations()[name] = Rotation(blocks, size, cfg, init, self._factory(ctx), self.training)
        self.records[name] = OFTRecord(blocks=blocks, block_size=size)

    def _refresh(self) -> None:
        rotations = self._rotations()._modules
        self._set_plain(_active_oft=tuple(rotations[n] for n in self._live()))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        for rotation in self._active_oft:  # in activation order: x R_1 R_2 ...
            x = rotation.rotate(x)
        return self.base_layer(x, *args, **kwargs)

    # -- merge ----------------------------------------------------------------------------------------------
    def _blocks(self, name: str) -> torch.Tensor:
        rotation = self._rotations()[name]
        return rotation.matrices(rotation.weight.detach().float())  # (blocks, bs, bs) float32

    def add_delta(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        rot = self._blocks(name)
        blocks, size = rot.shape[0], rot.shape[1]
        w = weight.reshape(weight.shape[0], blocks, size)  # (out, blocks, bs)
        return torch.einsum("ork,rck->orc", w, rot).reshape(weight.shape)  # W Rᵀ

    def add_delta_(self, weight: torch.Tensor, name: str) -> None:
        weight.copy_(self.add_delta(weight, name))

    # The forward rotates the input by R_1 then R_2: W (R_1 R_2)ᵀ = W R_2ᵀ R_1ᵀ, so the last adapter folds in first.
    fold_last_first: ClassVar[bool] = True

    def merge(self, names: tuple[str, ...], keep_original: bool = True, shared: bool = True) -> None:
        ordered = tuple(reversed(names)) if self.fold_last_first else tuple(names)
        super().merge(ordered, keep_original=keep_original, shared=shared)

    def delta_weight(self, name: str) -> torch.Tensor:
        weight = self.view.float_weight(self.base_layer)
        return self.add_delta(weight, name) - weight

    def max_delta_bound(self, name: str) -> float:
        rot = self._blocks(name)
        if not torch.isfinite(rot).all():
            return math.inf
        weight_max = float(self.view.float_weight(self.base_layer).abs().max())
        # |W Rᵀ - W| <= max|W| (max row sum of |R| + 1); E R takes column sums: the larger of the two serves both.
        sums = max(float(rot.abs().sum(-1).max()), float(rot.abs().sum(-2).max()))
        return weight_max * (sums + 1.0)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {self.file_suffix: self._rotations()[name].weight}


class OFTConv2d(OFTLinear):
    """OFT around a 1x1 nn.Conv2d: each pixel's channel vector is rotated, as PEFT's unfold/fold does for 1x1."""

    @classmethod
    def refuses(cls, base_layer: nn.Module) -> str | None:
        if tuple(base_layer.kernel_size) != (1, 1) or base_layer.groups != 1 or base_layer.dilation[0] > 1:
            return (
                f"OFT on a Conv2d with kernel {tuple(base_layer.kernel_size)}, groups={base_layer.groups}, dilation="
                f"{tuple(base_layer.dilation)}: adapterkit supports 1x1 ungrouped convolutions only. PEFT 0.21 "
                "rotates overlapping input patches and sums them back for larger kernels (its outputs then differ "
                "from the base model's at init and its merged weights from its unmerged outputs). Exclude this "
                "module (exclude_modules) or target other layers."
            )
        return None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._active_oft:
            h = x.movedim(1, -1)  # (B, H, W, C)
            for rotation in self._active_oft:
                h = rotation.rotate(h)
            x = h.movedim(-1, 1)
        return self.base_layer(x, *args, **kwargs)

    def add_delta(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        flat = weight.reshape(weight.shape[0], -1)  # (out, in) of the 1x1 kernel
        return super().add_delta(flat, name).reshape(weight.shape)


class OFTEmbedding(OFTLinear):
    """OFT around nn.Embedding: each looked-up row is rotated (`oft_embedding_R`); merged, E becomes E R."""

    containers = ("oft_embedding_R",)
    file_suffix: ClassVar[str] = "oft_embedding_R.weight"

    def __init__(self, base_layer: nn.Embedding, view=None) -> None:
        super().__init__(base_layer, view)
        self.num_embeddings, self.embedding_dim = self.view.features(base_layer)
        self.__dict__["_rotated"] = self.embedding_dim

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(ids, *args, **kwargs)
        for rotation in self._active_oft:  # out R_1 R_2 ...
            out = rotation.rotate(out)
        return out

    def add_delta(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        rot = self._blocks(name)
        blocks, size = rot.shape[0], rot.shape[1]
        w = weight.reshape(weight.shape[0], blocks, size)  # (num, blocks, bs)
        return torch.einsum("nrk,rkc->nrc", w, rot).reshape(weight.shape)  # E R

    fold_last_first: ClassVar[bool] = False  # the output is rotated: E R_1 R_2, folded in activation order
