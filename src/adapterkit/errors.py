"""The exceptions adapterkit raises for bad input.

Every message says what was expected, what was found, and what to do about it.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base class of every adapterkit error."""


class ConfigError(AdapterError, ValueError):
    """An adapter configuration is invalid or asks for a feature adapterkit does not support."""


class TargetError(ConfigError):
    """`target_modules` / `modules_to_save` do not fit the model (nothing matched, or an unsupported layer type)."""


class AdapterLoadError(AdapterError):
    """An adapter could not be loaded onto a model; the model is left as it was."""


class AdapterSaveError(AdapterError):
    """An adapter could not be saved; whatever was at the destination before is left intact."""


class MergeError(AdapterError, ValueError):
    """Merging was refused (non-finite delta, nothing to merge, ...); no weight was changed."""
