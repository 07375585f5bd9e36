"""Glue between adapterkit and the training stacks people use (transformers Trainer, TRL, accelerate): each module
registers what it adds when imported."""

from . import hf_save  # noqa: F401  (installs save_pretrained on adapted transformers models)
