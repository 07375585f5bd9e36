"""`save_pretrained` on an adapted transformers model writes the adapter (PEFT format), so that Trainer.save_model,
Trainer checkpoints, TRL and anything else calling `model.save_pretrained(d)` produce an adapter directory.

The method is set on the model instance (its `__dict__`) when the first adapter is attached and removed when the
model is plain again; the class and its other instances are untouched. Trainer resumes a model that is not a
PeftModel through `load_sharded_checkpoint` (an index + `load_state_dict(strict=False)`), so a Trainer checkpoint
folder (`checkpoint-<step>`) also gets `model.safetensors.index.json` and a shard holding the adapter tensors under the
model's own parameter names: `trainer.train(resume_from_checkpoint=...)` then restores them exactly. There is no
`config.json`, so `from_pretrained(d)` of transformers takes the base from `base_model_name_or_path`.
"""

from __future__ import annotations

import json
import os
import re
import types
from pathlib import Path

from torch import nn

from .. import distributed
from ..checkpoint.format import adapter_tensors
from ..checkpoint.save import save
from ..checkpoint.serialize import to_bytes
from ..errors import AdapterSaveError
from ..state import adapter_state
from ..verbs import MODEL_HOOKS

METHOD = "save_pretrained"
RESUME_INDEX = "model.safetensors.index.json"  # the name Trainer's load_sharded_checkpoint looks for
RESUME_SHARD = "adapterkit-resume.safetensors"
_CHECKPOINT_DIR = re.compile(r"checkpoint-\d+")  # transformers' PREFIX_CHECKPOINT_DIR + "-" + step


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    state_dict: dict | None = None,
    push_to_hub: bool = False,
    selected_adapters: list[str] | None = None,
    **kwargs,
) -> None:
    """Write the model's adapters to `save_directory` in PEFT's format (what PeftModel.save_pretrained writes).

    Accepts transformers' keywords; `state_dict`, shard sizes and serialisation options are ignored (the adapter
    is always safetensors and read from the live parameters). `push_to_hub` is refused: adapterkit never uploads.
    """
    if push_to_hub:
        raise AdapterSaveError(
            "save_pretrained(push_to_hub=True): adapterkit never touches the network. Save locally, then upload the "
            "folder with huggingface_hub.upload_folder."
        )
    if state_dict is not None and any(distributed.is_sharded(p) for p in model.parameters()):
        # Trainer under FSDP gathers a state dict and calls this on rank 0 only; gathering the shards here would
        # wait forever for the other ranks.
        raise AdapterSaveError(
            "save_pretrained was called on one rank with a gathered state dict, but this model's parameters are "
            "sharded (FSDP2): adapterkit gathers shards itself, on every rank. Call adapterkit.save(model, dir) on "
            "every rank instead (e.g. from a TrainerCallback's on_save)."
        )
    names = [selected_adapters] if isinstance(selected_adapters, str) else selected_adapters
    target = save(model, save_directory, names=names, writer=is_main_process)
    if is_main_process and _CHECKPOINT_DIR.fullmatch(Path(save_directory).name):
        write_resume_shard(model, target)


def write_resume_shard(model: nn.Module, directory: Path) -> None:
    """The adapter tensors under the model's parameter names, with the index Trainer's resume reads."""
    state = adapter_state(model)
    live = {}
    for name in state.configs:
        for tensor in adapter_tensors(state, name).values():
            live[id(tensor)] = tensor
    tensors = {}
    for pname, p in model.named_parameters(remove_duplicate=True):  # a shared tensor under its first name
        if id(p) in live:
            tensors[pname] = distributed.full(p).to("cpu", copy=True).contiguous()
    blob = to_bytes(tensors, {"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
                          "note": "adapter tensors by model parameter name, for Trainer resume; the adapter itself "
                                  "is adapter_model.safetensors"},
             "weight_map": {k: RESUME_SHARD for k in sorted(tensors)}}
    _write(directory / RESUME_SHARD, blob)
    _write(directory / RESUME_INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def install(model: nn.Module) -> None:
    """Give `model` (a transformers model) the adapter-writing save_pretrained, on the instance only."""
    if callable(getattr(type(model), METHOD, None)) and METHOD not in model.__dict__:
        model.__dict__[METHOD] = types.MethodType(save_pretrained, model)


def remove(model: nn.Module) -> None:
    bound = model.__dict__.get(METHOD)
    if isinstance(bound, types.MethodType) and bound.__func__ is save_pretrained:
        del model.__dict__[METHOD]


MODEL_HOOKS.append((install, remove))
