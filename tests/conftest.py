"""Shared fixtures: tiny random-weight HF models, built once per session and reused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from zomni.testing import ARCHS, build_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """arch name -> directory of a tiny random-weight model of that architecture."""
    root = tmp_path_factory.mktemp("models")
    return {arch: build_model(root / arch, arch, shape="tiny", seed=i)
            for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def llama_dir(model_dirs) -> Path:
    return model_dirs["llama"]
