"""adapterkit: parameter-efficient fine-tuning (LoRA and relatives) for PyTorch and transformers models, in PEFT's
format, with save and load correct by construction.

    import adapterkit as ak
    ak.attach(model, ak.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    ak.save(model, "out/")
    report = ak.load(other_model, "out/")
"""

from . import integrations, vocab  # vocab: add_tokens / find_ties; integrations: save_pretrained on adapted models
from .adalora_schedule import RankAllocator, adalora_callback
from .checkpoint import LoadReport, load, save
from .config import AdapterConfig
from .errors import AdapterError, AdapterLoadError, AdapterSaveError, ConfigError, MergeError, TargetError
from .export import ExportReport, export
from .kbit_training import prepare_for_kbit_training
from .losses import causal_lm_loss, chunked_loss
from .memory import checkpoint_layers, checkpointed, decoder_layers, uncheckpoint_layers
from .methods import METHODS, Method, register
from .integrations.hf_load import from_pretrained
from .methods.adalora import AdaLoraConfig
from .methods.ia3 import IA3Config
from .methods.loha import LoHaConfig
from .methods.lokr import LoKrConfig
from .methods.lora_config import LoraConfig
from .methods.oft import OFTConfig
from .methods.prompt_tuning import PromptTuningConfig
from .methods.vera import VeraConfig
from .optim import create_loraplus_optimizer, loraplus_param_groups
from .quantized import dequantize_model, quantize_model
from .routing import AdapterTable, drop_serving_table, routed, serving_table
from .summary import parameter_summary, print_trainable_parameters
from .verbs import (
    MergeReport,
    active_adapters,
    adapters,
    attach,
    count_parameters,
    delete,
    disabled,
    merge,
    set_active,
    trainable_parameters,
    unload,
    unmerge,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AdaLoraConfig",
    "AdapterConfig",
    "AdapterTable",
    "AdapterError",
    "AdapterLoadError",
    "AdapterSaveError",
    "ConfigError",
    "ExportReport",
    "LoHaConfig",
    "LoKrConfig",
    "IA3Config",
    "LoadReport",
    "LoraConfig",
    "MergeError",
    "MergeReport",
    "OFTConfig",
    "Method",
    "PromptTuningConfig",
    "RankAllocator",
    "TargetError",
    "VeraConfig",
    "active_adapters",
    "adalora_callback",
    "causal_lm_loss",
    "checkpoint_layers",
    "checkpointed",
    "chunked_loss",
    "decoder_layers",
    "adapters",
    "attach",
    "count_parameters",
    "create_loraplus_optimizer",
    "delete",
    "dequantize_model",
    "disabled",
    "drop_serving_table",
    "export",
    "from_pretrained",
    "load",
    "loraplus_param_groups",
    "merge",
    "parameter_summary",
    "prepare_for_kbit_training",
    "print_trainable_parameters",
    "quantize_model",
    "register",
    "routed",
    "save",
    "serving_table",
    "set_active",
    "trainable_parameters",
    "uncheckpoint_layers",
    "unload",
    "unmerge",
    "vocab",
]
