"""Glue between adapterkit and the training stacks people use (transformers Trainer, TRL, accelerate); each module
imports its framework lazily.

`integrations.hf_save`: save_pretrained on adapted transformers models (registered on import, below).
`integrations.trainer`: a `compute_loss` with the chunked output loss, as a function or a Trainer mixin.
"""

from . import hf_save  # noqa: F401  (installs save_pretrained on adapted transformers models)
