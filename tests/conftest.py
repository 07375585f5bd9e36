"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py importable as `helpers`

# Tiny models: one thread is fastest and immune to other processes competing for the cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smollm2_dir(request, tmp_path_factory):
    """Directory of the real SmolLM2-135M-Instruct, converted from its embedded GGUF once and then reused.

    The conversion (~30 s) goes to $ADAPTERKIT_CACHE when set, else into pytest's own cache directory
    (.pytest_cache), so it survives between test runs; `-p no:cacheprovider` falls back to a session tmp dir.
    """
    from pathlib import Path

    from adapterkit.base_models import resolve_model

    if os.environ.get("ADAPTERKIT_CACHE"):
        cache = Path(os.environ["ADAPTERKIT_CACHE"])
    elif getattr(request.config, "cache", None) is not None:
        cache = Path(request.config.cache.mkdir("adapterkit-cache"))
    else:
        cache = tmp_path_factory.mktemp("adapterkit-cache")
    return resolve_model(None, cache=cache).local_dir
