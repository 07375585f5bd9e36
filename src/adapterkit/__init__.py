"""adapterkit: LoRA fine-tuning for PyTorch and transformers models, PEFT-format compatible, correct save/load.

    import adapterkit as ak
    ak.attach(model, ak.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    ak.save(model, "out/")
    report = ak.load(other_model, "out/")
"""

from . import vocab  # adapterkit.vocab.add_tokens / find_ties
from .adalora_schedule import RankAllocator, adalora_callback
from .checkpoint import LoadReport, load, save
from .config import AdapterConfig
from .errors import AdapterError, AdapterLoadError, AdapterSaveError, ConfigError, MergeError, TargetError
from .methods import METHODS, Method, register
from .methods.adalora import AdaLoraConfig
from .methods.lora_config import LoraConfig
from .methods.prompt_tuning import PromptTuningConfig
from .optim import create_loraplus_optimizer, loraplus_param_groups
from .verbs import (
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
    "AdapterError",
    "AdapterLoadError",
    "AdapterSaveError",
    "ConfigError",
    "LoadReport",
    "LoraConfig",
    "MergeError",
    "Method",
    "PromptTuningConfig",
    "RankAllocator",
    "TargetError",
    "active_adapters",
    "adalora_callback",
    "adapters",
    "attach",
    "count_parameters",
    "create_loraplus_optimizer",
    "delete",
    "disabled",
    "load",
    "loraplus_param_groups",
    "merge",
    "register",
    "save",
    "set_active",
    "trainable_parameters",
    "unload",
    "unmerge",
    "vocab",
]
