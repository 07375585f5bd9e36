"""Glue between adapterkit and training frameworks (Hugging Face Trainer); each module imports its framework lazily.

`integrations.trainer`: a `compute_loss` with the chunked output loss, as a function or a Trainer mixin.
"""
