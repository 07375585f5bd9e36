"""Saving and loading adapters in PEFT's file format."""

from .load import load, read_adapter
from .report import LoadReport
from .save import save

__all__ = ["LoadReport", "load", "read_adapter", "save"]
