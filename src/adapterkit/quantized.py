"""Quantized base layers (QLoRA): base-layer views for bitsandbytes 4-bit / 8-bit linears (torchao's view:
quantized_torchao.py), `quantize_model` (float linears -> bitsandbytes) and `dequantize_model` (-> plain nn.Linear).

Neither bitsandbytes nor torchao is imported until a layer of theirs is met: a view recognises its layers by class
name and module, so adapterkit imports (and runs float models) without either package installed.

bitsandbytes on a CPU with AVX512-BF16 repacks a 4-bit weight in place the first time the layer runs in eval mode (other
nibble order, absmax widened from its double quantization and rounded to bf16); every read here (`dequantize_4bit`)
takes whichever layout the layer holds, and an unmerge puts back the very parameter object the layer held.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base_layers import BaseView, LinearView, register_view, view_of
from .errors import ConfigError, TargetError
from .kernels import dequant4
from .quantized_torchao import TorchaoView
from .state import adapter_state

QUANT_KINDS = ("nf4", "fp4", "int8")
_INT8_SCALE = 1.0 / 127  # bitsandbytes' int8 rows: w = CB * SCB / 127


def _is_class(module: nn.Module, name: str, package: str) -> bool:
    """`module` is (a subclass of) class `name` from `package`, checked by name so the package is never imported."""
    return any(c.__name__ == name and c.__module__.startswith(package) for c in type(module).__mro__)


def _float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a bitsandbytes layer computes in: its compute dtype when set, else its bias's, else float32."""
    dtype = getattr(module, "compute_dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None and bias.dtype.is_floating_point else torch.float32


# -- bitsandbytes 4-bit ------------------------------------------------------------------------------------------
def _packed_for_cpu(param: torch.Tensor) -> bool:
    return bool(getattr(param.quant_state, "packing_format_for_cpu", False))


def _cpu_packed_codes(param: torch.Tensor) -> torch.Tensor:
    """(N, K) 4-bit code indices of a CPU-packed weight.

    The packed data is (N, K/2) bytes: for each block of 32 rows and pair of columns, 32 bytes holding the 32 rows'
    first-column codes in their low nibbles and second-column codes in their high nibbles.
    """
    n, k_half = param.data.shape
    packed = param.data.view(torch.uint8).reshape(-1, 32)
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)  # (N*K/64, 64): 32 low then 32 high nibbles
    return codes.reshape(n // 32, k_half, 32, 2).transpose(1, 2).reshape(n, 2 * k_half)


def dequantize_4bit(param: torch.Tensor) -> torch.Tensor:
    """float32 (out, in) values of a quantized `Params4bit`, in bitsandbytes' standard layout or its CPU-packed one."""
    state = param.quant_state
    if not _packed_for_cpu(param):
        import bitsandbytes.functional as bnb_f

        return bnb_f.dequantize_4bit(param.data, state).float()
    codes = _cpu_packed_codes(param)  # (N, K)
    n, k = codes.shape
    absmax = state.absmax.float().T  # (N, K / blocksize): stored (K / blocksize, N) in bf16
    values = state.code.float()[codes.long()].reshape(n, k // state.blocksize, state.blocksize)
    return (values * absmax[:, :, None]).reshape(n, k)


def _expanded_absmax(state) -> torch.Tensor:
    """The float32 per-block absmax of a 4-bit quant state, its double quantization undone once and kept.

    bitsandbytes undoes the double quantization (8-bit absmax, its own block scales, an offset) on every dequantize:
    one more kernel and its Python per forward and backward. Kept on the state (1/16 byte per weight: 62 MB for a
    1B model) while the state's absmax tensor is the one it was computed from, unchanged; a requantized layer has a new
    state, so it never reads a stale copy. The values are bitsandbytes' own, computed the same way.
    """
    if not state.nested:
        return state.absmax
    source = state.absmax
    kept = getattr(state, "_adapterkit_absmax", None)
    if kept is not None and kept[0] is source and kept[1] == source._version:
        return kept[2]
    import bitsandbytes.functional as bnb_f

    with torch.inference_mode(False), torch.no_grad():  # a plain tensor even when first met under inference_mode
        absmax = bnb_f.dequantize_blockwise(source, state.state2)
        absmax += state.offset
        absmax = absmax.float()
    state._adapterkit_absmax = (source, source._version, absmax)
    return absmax


def _dequantizer_4bit(param: torch.Tensor, dtype: torch.dtype):
    """A zero-argument callable giving a standard-layout `Params4bit`'s (out, in) values in `dtype`, as bitsandbytes'
    matmul dequantizes them, with the absmax kept expanded: on CUDA, for a weight stored in `dtype`, one Triton launch
    (`kernels/dequant4.py`, kept on the parameter while its data and absmax stay the same); else bitsandbytes' op."""
    state = param.quant_state
    absmax = _expanded_absmax(state)
    kept = getattr(param, "_adapterkit_dequant", None)
    if (kept is not None and kept.source is absmax and kept.dtype is dtype and kept.ptr == param.data_ptr()
            and dequant4.enabled()):
        return kept
    data = param.data
    if data.dim() != 2 or data.shape[1] != 1:  # a packed layout the op does not take as is: bitsandbytes' own call
        import bitsandbytes.functional as bnb_f

        return lambda: bnb_f.dequantize_4bit(data, state).to(dtype)
    blocksize, quant_type, shape, stored = state.blocksize, state.quant_type, state.shape, state.dtype
    if stored is dtype and dequant4.available(data.device):
        kept = dequant4.Dequant4(data, absmax, blocksize, quant_type, shape, dtype)
        kept.source, kept.ptr = absmax, param.data_ptr()
        param._adapterkit_dequant = kept
        return kept
    op = torch.ops.bitsandbytes.dequantize_4bit.default
    if stored is dtype:
        return lambda: op(data, absmax, blocksize, quant_type, shape, stored)
    return lambda: op(data, absmax, blocksize, quant_type, shape, stored).to(dtype)


def _unpack_for_training(module: nn.Module) -> None:
    """Put a CPU-packed 4-bit weight back in bitsandbytes' standard layout, with the same values.

    The packed state keeps absmax as bf16 (double quantization already undone), so the standard state gets that
    absmax widened to float32 without double quantization: every weight entry dequantizes to exactly what the packed
    layer computed with (bitsandbytes' own inverse re-quantizes the absmax, which moves the weights).
    """
    param = module.weight
    state = param.quant_state
    codes = _cpu_packed_codes(param).reshape(-1)  # (N*K,) row-major
    data = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).reshape(state.original_qshape)  # high nibble first
    storage = getattr(state, "original_storage_type", None)
    state.absmax = state.absmax.float().T.contiguous().reshape(-1)  # (N * K / blocksize,) row-major blocks
    state.dtype = state.original_dtype
    state.nested = False
    state.packing_format_for_cpu = False
    param.data = data.view(storage) if storage is not None else data
    module.quant_state = state


def _source_dtype_4bit(param: torch.Tensor) -> torch.dtype:
    """The float dtype the weight was quantized from (what bitsandbytes dequantizes to)."""
    state = param.quant_state
    return getattr(state, "original_dtype", state.dtype) if _packed_for_cpu(param) else state.dtype


class Bnb4bitView(BaseView):
    """`bitsandbytes.nn.Linear4bit` (and LinearNF4 / LinearFP4): NF4 or FP4, any blocksize, double quantization,
    compute dtype and quant_storage. Merging requantizes with the layer's own settings."""

    kind = "bnb4bit"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and _is_class(module, "Linear4bit", "bitsandbytes")

    @staticmethod
    def features(module: nn.Module) -> tuple[int, int]:
        if not getattr(module.weight, "bnb_quantized", False):
            raise TargetError(
                f"this {type(module).__name__} holds a float weight that bitsandbytes has not quantized yet; move it "
                "to its device first (layer.to('cpu') or .to('cuda') quantizes it), then attach the adapter."
            )
        return module.in_features, module.out_features

    compute_dtype = staticmethod(_float_dtype)

    @staticmethod
    def float_weight(module: nn.Module) -> torch.Tensor:
        return dequantize_4bit(module.weight)

    @staticmethod
    def stored_dtype(module: nn.Module) -> torch.dtype:
        return _source_dtype_4bit(module.weight)

    @staticmethod
    def install_weight(module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = module.weight
        new = bnb.nn.Params4bit(
            weight.to(device=old.device, dtype=_source_dtype_4bit(old)).contiguous(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=module,
        )._quantize(old.device)  # what Params4bit.to(device) runs for a float weight
        module.weight = new
        module.quant_state = new.quant_state

    @staticmethod
    def in_place_ok(module: nn.Module) -> bool:
        return False

    @staticmethod
    def restore_weight(module: nn.Module, saved: Any) -> None:
        module.weight = saved
        module.quant_state = saved.quant_state

    @staticmethod
    def prepare(module: nn.Module) -> None:
        """Keep the layer in bitsandbytes' standard layout once the model carries an adapter (`attach` prepares
        every 4-bit layer of the model, adapted or not: gradients of lower adapters pass through it).

        bitsandbytes 0.50's CPU-packed layout (made by the first eval-mode forward on AVX512-BF16 CPUs) has no
        backward: a later training step silently gets no gradient through the layer (and fails when it has a bias).
        So the repacking is turned off, and a layer packed already is put back in the standard
        layout with the same values (`_unpack_for_training`).
        """
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
        if getattr(module.weight, "quant_state", None) is not None and _packed_for_cpu(module.weight):
            _unpack_for_training(module)

    @staticmethod
    def saved_float_weight(module: nn.Module, saved: Any) -> torch.Tensor:
        return dequantize_4bit(saved)

    @staticmethod
    def quantized(module: nn.Module) -> bool:
        return True

    @staticmethod
    def dequantizer(module: nn.Module):
        """The weight as the layer's own training path computes with it: bitsandbytes' dequantization in the
        compute dtype (what `MatMul4Bit` multiplies by, forward and backward). None for the CPU-packed layout."""
        param = module.weight
        if getattr(param, "quant_state", None) is None or _packed_for_cpu(param):
            return None
        return _dequantizer_4bit(param, _float_dtype(module))


# -- bitsandbytes 8-bit ------------------------------------------------------------------------------------------
def _dequantize_8bit(cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    return cb.float() * (scb.float() * _INT8_SCALE)[:, None]  # (out, in) int8 rows times their absmax / 127


class Bnb8bitView(BaseView):
    """`bitsandbytes.nn.Linear8bitLt` with int8 weights (LLM.int8(), `has_fp16_weights=False`, transformers' default).

    The row scales (SCB) live on the weight until the first forward, then on the layer's `state`; the saved weight is
    (parameter, state.CB, state.SCB) so an unmerge puts both back.
    """

    kind = "bnb8bit"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and _is_class(module, "Linear8bitLt", "bitsandbytes")

    @staticmethod
    def features(module: nn.Module) -> tuple[int, int]:
        if module.weight.dtype != torch.int8:
            raise TargetError(
                f"this {type(module).__name__} does not hold int8 weights (has_fp16_weights=True, or not yet moved to "
                "its device); adapterkit adapts int8 layers: build it with has_fp16_weights=False and move it to its "
                "device, as transformers' BitsAndBytesConfig(load_in_8bit=True) does."
            )
        return module.in_features, module.out_features

    compute_dtype = staticmethod(_float_dtype)

    @staticmethod
    def _scb(module: nn.Module) -> torch.Tensor:
        scb = getattr(module.weight, "SCB", None)
        return scb if scb is not None else module.state.SCB

    @staticmethod
    def float_weight(module: nn.Module) -> torch.Tensor:
        return _dequantize_8bit(module.weight.data, Bnb8bitView._scb(module))

    @staticmethod
    def stored_dtype(module: nn.Module) -> torch.dtype:
        return torch.float16  # bitsandbytes quantizes int8 rows from a float16 copy

    @staticmethod
    def install_weight(module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = module.weight
        new = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
        module.weight = new._quantize(old.device)
        module.state.CB = None  # the next forward takes CB / SCB from the new weight
        module.state.SCB = None

    @staticmethod
    def in_place_ok(module: nn.Module) -> bool:
        return False

    @staticmethod
    def saved_weight(module: nn.Module) -> Any:
        return (module.weight, module.state.CB, module.state.SCB)

    @staticmethod
    def restore_weight(module: nn.Module, saved: Any) -> None:
        module.weight, module.state.CB, module.state.SCB = saved

    @staticmethod
    def saved_float_weight(module: nn.Module, saved: Any) -> torch.Tensor:
        param, _, state_scb = saved
        scb = getattr(param, "SCB", None)
        return _dequantize_8bit(param.data, scb if scb is not None else state_scb)

    @staticmethod
    def quantized(module: nn.Module) -> bool:
        return True


QUANTIZED_VIEWS = (Bnb4bitView, Bnb8bitView, TorchaoView)
for _view in QUANTIZED_VIEWS:
    register_view(_view, before=LinearView)  # they pass isinstance(nn.Linear): tried before the float view


def quantized_view(module: nn.Module) -> type[BaseView] | None:
    """The view of a quantized layer adapterkit can adapt, or None (float layers, other types)."""
    view = view_of(module)
    return view if view is not None and view.quantized(module) else None


# -- whole models ------------------------------------------------------------------------------------------------
def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # an optional dependency
        raise ConfigError(
            "quantizing needs bitsandbytes, which is not installed: pip install 'adapterkit[qlora]'."
        ) from err
    return bnb


def quantize_model(
    model: nn.Module,
    kind: str = "nf4",
    *,
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    skip: tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """Replace `model`'s float nn.Linear layers by bitsandbytes layers in place and return the same model.

    kind: "nf4" / "fp4" (Linear4bit, blocksize 64, double quantization unless double_quant=False) or "int8"
    (Linear8bitLt, outlier threshold 6.0 as transformers' BitsAndBytesConfig). compute_dtype: the 4-bit layers'
    compute dtype (default: each weight's dtype). Layers whose name is in `skip` and the model's output head are kept.
    A transformers model is marked `is_loaded_in_4bit` / `is_loaded_in_8bit`, as transformers marks the models it
    quantizes while loading.
    """
    if kind not in QUANT_KINDS:
        raise ConfigError(f"quantization kind must be one of {', '.join(QUANT_KINDS)}, got {kind!r}.")
    if adapter_state(model) is not None:
        raise ConfigError("the model carries adapters; quantize the base before attaching them.")
    bnb = _bnb()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    targets = [
        (name, module) for name, module in model.named_modules()
        if type(module) is nn.Linear and module is not head and name.rsplit(".", 1)[-1] not in skip
    ]
    for name, module in targets:
        weight, bias = module.weight.detach(), module.bias
        if kind == "int8":
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias is not None,
                                        has_fp16_weights=False, threshold=6.0, device="meta")
            layer.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias is not None,
                                      compute_dtype=compute_dtype or weight.dtype, compress_statistics=double_quant,
                                      quant_type=kind, quant_storage=quant_storage, device="meta")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                             quant_type=kind, quant_storage=quant_storage, module=layer)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        # What bitsandbytes' .to(device) runs for a float weight; called directly, as .to() skips it for a weight
        # already on its device.
        layer.weight = layer.weight._quantize(weight.device)
        if kind != "int8":
            layer.weight.module = layer
            layer.quant_state = layer.weight.quant_state
        layer.train(module.training)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)
    if targets and hasattr(model, "config"):
        # What transformers records on a model it loads with BitsAndBytesConfig; PEFT reads it to pick its
        # bitsandbytes layers and to prepare the model for k-bit training.
        model.__dict__["is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit"] = True
    return model


def to_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain nn.Linear in `dtype` computing what the quantized `module` computes (its dequantized weight)."""
    view = quantized_view(module)
    in_features, out_features = view.features(module)
    bias = getattr(module, "bias", None)
    layer = nn.Linear(in_features, out_features, bias is not None, device="meta", dtype=dtype)
    weight = view.float_weight(module).to(dtype)
    layer.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=bias.requires_grad)
    layer.train(module.training)
    return layer


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every quantized linear layer of a plain model (no adapters) by an nn.Linear in `dtype`, in place;
    transformers' record of the quantization is dropped so `save_pretrained` writes a plain model."""
    for name, module in list(model.named_modules()):
        if name and quantized_view(module) is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, to_linear(module, dtype))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, False):
            model.__dict__[attr] = False
    return model
